"""A replica on the CUDA backend, served end to end: `serve --backend cuda` from the dmsrt binary
linked with the device emulator (tests/cuda_emulator/), so the backend runs under the real
scheduler (a shared prompt forked into best-of-N threads, batched decode steps, device sampling,
eviction, cancellation) on machines without a GPU; and a tensor-parallel replica of two emulated
GPUs (`mpirun -np 2 serve --backend cuda --tp 2`, NCCL over MPI) with forks, eviction,
preemption and cancellation; and the production layout of TP groups, one `mpirun` per group
under a standalone coordinator, where a group that loses a rank is marked lost and its threads
run again on the other group. Skipped when that binary was not built (no CUDA headers)."""

import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import (SRC, Proc, Server, check_best_of, check_top_logprobs, free_port, standalone_replica,
                      wait_idle, wait_replicas_ready)
from test_tp_serve import children

EMU_BIN = os.environ.get("DMSRT_EMU_BIN", "")


@pytest.fixture(scope="module")
def cuda_replica(stubs_dir):
    if not EMU_BIN or not os.path.exists(EMU_BIN):
        pytest.skip("dmsrt_cuda_emulated not built (needs the CUDA headers)")
    with standalone_replica(stubs_dir, "dmsrt_cuda_emulated_",
                            ["--backend", "cuda", "--kv-budget", "16MiB", "--kv-policy", "forced",
                             "--dms-force-rate", "0.5", "--dms-window", "8"],
                            timeout=180, binary=EMU_BIN) as client:
        yield client


def test_best_of_n_on_the_cuda_backend(cuda_replica):
    res = cuda_replica.run_job(prompt="What is 3 + 4? Answer:", n=4, max_tokens=12, seed=3,
                               ignore_eos=True, temperature=0.8, stream_tokens=True, timeout=300)
    check_best_of(res, 4)
    for t in res["threads"]:
        assert t["tokens"] == 12, t
        assert t["text"], t
        assert t["cache_cr"] > 1.0, t
    assert res["tokens_streamed"] == sum(t["tokens"] for t in res["threads"])
    wait_idle(cuda_replica, timeout=60)


def test_greedy_threads_agree(cuda_replica):
    # Forked from one prompt, decoded side by side in the same steps, greedy, with the forced
    # policy's decisions independent of the thread: any mix-up of rows, block tables or sampled
    # rows between threads shows up as texts that differ.
    res = cuda_replica.run_job(prompt="The three primary colours are", n=3, max_tokens=10, seed=1,
                               ignore_eos=True, temperature=0.0, stream_tokens=True, top_logprobs=5,
                               timeout=300)
    check_best_of(res, 3)
    texts = [t["text"] for t in res["threads"]]
    assert texts[0] and texts.count(texts[0]) == 3, texts
    # A job that asks for a listing gets logits rows back and samples on the host (other jobs
    # sample on the device), so the CUDA backend gives the same listings as the CPU one.
    assert check_top_logprobs(res["token_events"], 5, greedy=True) == 30


def test_cancel_frees_device_blocks(cuda_replica):
    job = cuda_replica.submit(prompt="Count slowly:", n=3, max_tokens=400, seed=5, ignore_eos=True)
    cuda_replica.cancel(job.job_id)
    cs = wait_idle(cuda_replica, timeout=120, after=time.time())
    assert cs.kv_blocks_used == 0


# ---- a tensor-parallel replica: serve --backend cuda --tp 2 ---------------------------------
# Two emulated GPUs (one per rank), NCCL over MPI, a tiny random-weight model with 4 KV heads
# (head_dim 64, the CUDA kernels' smallest), forced eviction, and a KV budget per rank smaller
# than three threads of the preemption job, so the engine preempts and recomputes threads over
# the group.


@pytest.fixture(scope="module")
def tiny_kv4(tmp_path_factory):
    if not EMU_BIN or not os.path.exists(EMU_BIN):
        pytest.skip("dmsrt_cuda_emulated not built (needs the CUDA headers)")
    pytest.importorskip("numpy")
    model = str(tmp_path_factory.mktemp("tp2_cuda") / "tiny_kv4")
    subprocess.run(["python3", os.path.join(SRC, "tests", "fixtures", "make_tiny_model.py"),
                    "--out", model, "--arch", "llama", "--format", "hf", "--heads", "8",
                    "--kv-heads", "4", "--head-dim", "64", "--layers", "2", "--hidden", "128",
                    "--ffn", "192", "--seed", "1"], check=True, capture_output=True, timeout=120)
    return model


@pytest.fixture(scope="module")
def tp2_cuda(stubs_dir, tiny_kv4):
    from dmsrt_client import DmsrtClient
    model = tiny_kv4
    srv = Server(np=2, kv_budget="112KiB", replicas=1, model=model, binary=EMU_BIN,
                 env={"DMSRT_CUDA_EMULATOR_DEVICES": "2"},
                 extra=["--backend", "cuda", "--tp", "2", "--tp-timeout", "30", "--kv-policy",
                        "forced", "--dms-force-rate", "0.5", "--dms-window", "8"])
    client = DmsrtClient(srv.address, stubs_dir=stubs_dir)
    try:
        srv.wait_ready(client, timeout=180)
        yield srv, client
    finally:
        client.close()
        srv.stop()


def test_tp2_registers_one_replica_over_two_devices(tp2_cuda):
    srv, client = tp2_cuda
    cs = client.cluster()
    assert len(cs.replicas) == 1 and cs.replicas[0].tp == 2, cs
    log = srv.log_text()
    assert "following the TP leader, world rank 0" in log, log
    for rank in range(2):
        assert f"tp_rank {rank}/2, device {rank})" in log, log


def test_tp2_best_of_n_with_forks_and_eviction(tp2_cuda):
    _, client = tp2_cuda
    res = client.run_job(prompt="hello world", n=3, max_tokens=16, seed=3, ignore_eos=True,
                         temperature=0.8, stream_tokens=True, timeout=300)
    check_best_of(res, 3)
    for t in res["threads"]:
        assert t["tokens"] == 16 and t["reason"] == "LENGTH", t
        assert t["cache_cr"] > 1.0, t
    assert res["tokens_streamed"] == sum(t["tokens"] for t in res["threads"])
    greedy = client.run_job(prompt="hello world", n=3, max_tokens=10, seed=1, ignore_eos=True,
                            temperature=0.0, timeout=300)
    texts = [t["text"] for t in greedy["threads"]]
    assert texts[0] and texts.count(texts[0]) == 3, texts
    wait_idle(client, timeout=60)


def test_tp2_preempts_and_recomputes_under_a_tight_budget(tp2_cuda):
    _, client = tp2_cuda
    before = client.cluster().replicas[0].preemptions
    # Three of these threads near full length need more blocks than a rank holds (3 blocks per
    # head each, 27 blocks of 2 layers x 2 heads per rank); one thread recomputed from its
    # tokens (dense while it is prefilled: 5 blocks per head) fits.
    res = client.run_job(prompt="hello world", n=6, max_tokens=68, seed=7, ignore_eos=True,
                         temperature=0.8, timeout=600)
    answered = time.time()
    assert len(res["threads"]) == 6, res
    for t in res["threads"]:
        assert t["reason"] == "LENGTH" and t["tokens"] == 68, t
    cs = wait_idle(client, timeout=60, after=answered)  # a heartbeat after the job: its figures
    assert cs.replicas[0].preemptions > before, "the budget was meant to force preemption"
    assert cs.replicas[0].peak_running_threads >= 2


def test_tp2_cancel_frees_every_ranks_blocks(tp2_cuda):
    _, client = tp2_cuda
    job = client.submit(prompt="Count slowly:", n=4, max_tokens=140, seed=5, ignore_eos=True)
    client.cancel(job.job_id)
    cs = wait_idle(client, timeout=120, after=time.time())
    assert cs.kv_blocks_used == 0


def test_two_replicas_of_tp2_on_four_devices(stubs_dir, tiny_kv4):
    """mpirun -np 4 serve --backend cuda --tp 2: two replicas, each with its own NCCL
    communicator over its two devices, register separately and share a job."""
    from dmsrt_client import DmsrtClient
    srv = Server(np=4, kv_budget="1MiB", replicas=2, model=tiny_kv4, binary=EMU_BIN,
                 env={"DMSRT_CUDA_EMULATOR_DEVICES": "4"},
                 extra=["--backend", "cuda", "--tp", "2", "--tp-timeout", "30"])
    client = DmsrtClient(srv.address, stubs_dir=stubs_dir)
    try:
        cs = srv.wait_ready(client, timeout=180)
        assert sorted(r.replica for r in cs.replicas) == [0, 1]
        assert all(r.tp == 2 for r in cs.replicas), cs
        res = client.run_job(prompt="hello world", n=4, max_tokens=8, temperature=1.0, seed=1,
                             ignore_eos=True, timeout=300)
        assert all(t["reason"] == "LENGTH" and t["tokens"] == 8 for t in res["threads"]), res
        assert {t["replica"] for t in res["threads"]} == {0, 1}, res["threads"]
        log = srv.log_text()
        for rank in range(4):
            assert f"tp_rank {rank % 2}/2, device {rank})" in log, log
    finally:
        client.close()
        srv.stop()


def test_lost_tp_group_threads_rerun_on_another_group(stubs_dir, tiny_kv4):
    """One `mpirun -np 2 serve --backend cuda --tp 2 --coordinator A` per TP group under a
    standalone `coordinator` (a failed rank ends its own mpirun world, never the other group's).
    A follower rank of the second group is killed (SIGKILL) while both groups run threads of one
    job: the group goes down, the coordinator marks it lost and runs its threads again on the
    first group, and the job is answered in full."""
    import grpc
    from dmsrt_client import DmsrtClient
    addr = f"127.0.0.1:{free_port()}"
    mport = free_port()
    coord = Proc(["coordinator", "--model", tiny_kv4, "--listen", addr, "--metrics-port", str(mport)])
    groups = [Server(np=2, kv_budget="1MiB", model=tiny_kv4, binary=EMU_BIN,
                     env={"DMSRT_CUDA_EMULATOR_DEVICES": "2"},
                     extra=["--backend", "cuda", "--tp", "2", "--tp-timeout", "10",
                            "--coordinator", addr]) for _ in range(2)]
    client = DmsrtClient(addr, stubs_dir=stubs_dir)
    try:
        cs = wait_replicas_ready(client, 2, [coord] + groups)
        assert all(r.tp == 2 for r in cs.replicas), cs
        result = {}

        def run():
            try:
                result["res"] = client.run_job(prompt="hello world", n=4, max_tokens=400, seed=3,
                                               temperature=0.8, ignore_eos=True, timeout=600)
            except grpc.RpcError as e:
                result["err"] = (e.code(), e.details())

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 120
        both = False
        while time.time() < deadline and not both:
            both = sum(1 for r in client.cluster().replicas if r.running_threads > 0) == 2
            time.sleep(0.05)
        assert both, "the job never ran on both groups"
        # The second group's ranks are mpirun's children; its follower is the later-started one.
        ranks = sorted(children(groups[1].proc.pid))
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        assert groups[1].proc.wait(timeout=60) != 0, groups[1].log_text()
        # mpirun names the rank and the cause; the coordinator logs the loss and the re-run.
        assert "process rank 1" in groups[1].log_text() and "signal 9" in groups[1].log_text(), \
            groups[1].log_text()
        t.join(timeout=600)
        assert not t.is_alive()
        assert "res" in result, (result, coord.text())
        res = result["res"]
        check_best_of(res, 4)
        for th in res["threads"]:
            assert th["reason"] == "LENGTH" and th["tokens"] == 400, th
        cs = client.cluster()
        assert sorted(r.state for r in cs.replicas) == ["lost", "ready"], cs
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        reassigned = [l for l in body.splitlines() if l.startswith("dmsrt:threads_reassigned_total ")]
        assert reassigned and float(reassigned[0].split()[1]) >= 1, body
        assert "dmsrt:replicas_lost 1" in body, body
        log = coord.text()
        assert "event=replica_lost replica=" in log and "event=threads_rerun " in log, log
        # The surviving group keeps serving.
        res2 = client.run_job(prompt="hello", n=2, max_tokens=6, seed=1, ignore_eos=True, timeout=120)
        assert all(th["tokens"] == 6 for th in res2["threads"]), res2
        assert coord.proc.poll() is None
    finally:
        client.close()
        for g in groups:
            g.stop()
        coord.stop()
