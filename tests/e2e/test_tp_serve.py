"""`dmsrt serve --tp N`: tensor-parallel replicas under mpirun.

The default model has 3 KV heads, so its only TP degrees are 1 and 3: the main case is one replica
of 3 ranks (`mpirun -np 3 dmsrt serve --tp 3`). It registers with tp 3 and the group's KV (three
ranks' pools), a best-of-4 job through `dmsrt submit` completes with votes that add up, greedy
output is well formed, the group outlives its collective timeout while idle (keepalive pings), and
SIGTERM to the ranks ends every rank cleanly (mpirun exits 0). Also: two replicas of TP 2 in one
world on a tiny 4-KV-head model register as separate replicas and share a job, a failing follower
brings the whole job down with its rank named, and bad --tp values are refused with the command to
run. About 20 s on 2 cores."""

import json
import os
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest

from conftest import BIN, MODEL, MPIRUN, SRC, Server, check_best_of, check_top_logprobs, wait_idle

TP_TIMEOUT_S = 4  # collective watchdog of the TP group; the idle test waits longer than this
MATH = "What is 3 + 4? Put the final answer in \\boxed{}."


def children(pid):
    """PIDs whose parent is `pid` (the ranks mpirun started)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces, so split after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def tp3(stubs_dir):
    from dmsrt_client import DmsrtClient
    srv = Server(np=3, kv_budget="64MiB", replicas=1,
                 extra=["--tp", "3", "--tp-timeout", str(TP_TIMEOUT_S)])
    client = DmsrtClient(srv.address, stubs_dir=stubs_dir)
    try:
        srv.wait_ready(client)
        yield srv, client
    finally:
        client.close()
        srv.stop()


def test_registers_one_replica_of_tp3(tp3):
    srv, client = tp3
    cs = client.cluster()
    assert len(cs.replicas) == 1, cs
    r = cs.replicas[0]
    assert r.state == "ready" and r.tp == 3, r
    # Each rank holds its own 64 MiB pool of 8 KiB blocks (16 slots x 64 dims x K+V x f32), and
    # blocks are counted over the group; its token capacity is a dense 64 MiB rank's, since every
    # token needs a slot on every rank (30 layers x 1 KV head per rank).
    k = r.ranks[0]
    assert k.kv_block_bytes == 8192
    assert k.kv_blocks_total == 3 * (64 << 20) // 8192
    assert k.kv_tokens_capacity == (64 << 20) // 8192 // 30 * 16
    assert cs.kv_blocks_total == k.kv_blocks_total
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    assert "dmsrt:replicas_ready 1\n" in body
    assert 'dmsrt:replica_info{replica="0",tp="3",kv_policy="none"} 1\n' in body, body
    assert f"dmsrt:kv_blocks_total {k.kv_blocks_total}\n" in body
    log = srv.log_text()
    assert "(192.0 MiB over 3 ranks)" in log, log
    assert log.count("following the TP leader, world rank 0") == 2, log


def test_submit_best_of_4(tp3):
    srv, client = tp3
    p = subprocess.run([BIN, "submit", "--address", srv.address, "--chat", MATH, "--n", "4",
                        "--max-tokens", "32", "--temperature", "0.7", "--seed", "1", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["votes"] = {v["answer"]: v["votes"] for v in res["votes"]}
    assert res["outcome"] in ("succeeded", "no_answer"), res
    assert res["n"] == 4
    check_best_of(res, 4)
    assert {t["replica"] for t in res["threads"]} == {0}
    assert res["usage"]["generated_tokens"] == sum(t["tokens"] for t in res["threads"])
    r = wait_idle(client, after=time.time()).replicas[0]  # a heartbeat after the job
    assert r.peak_running_threads == 4, r
    assert 0 < r.ranks[0].peak_kv_blocks_used <= r.ranks[0].kv_blocks_total, r


def test_greedy_answer_is_well_formed(tp3):
    _, client = tp3
    res = client.run_job(chat="What is the capital of France? Answer in one sentence.", n=2,
                         max_tokens=24, temperature=0.0, seed=3, stream_tokens=True, top_logprobs=3,
                         timeout=120)
    assert res["outcome"] in ("JOB_SUCCEEDED", "JOB_NO_ANSWER"), res
    # Only the leader samples; its listings cover the whole vocabulary (the logits are gathered
    # over the ranks' vocabulary shards), so greedy tokens head their listings.
    assert check_top_logprobs(res["token_events"], 3, greedy=True) == res["usage"]["generated_tokens"]
    a, b = res["threads"]
    # Greedy threads are the same sequence whatever their seed.
    assert a["text"] == b["text"] and a["tokens"] == b["tokens"]
    text = a["text"]
    assert text.strip() and "\ufffd" not in text, repr(text)
    assert sum(ch.isalpha() for ch in text) >= len(text) // 2, repr(text)
    assert "Paris" in text, repr(text)


def test_idle_group_outlives_its_timeout(tp3):
    """While no job runs the leader pings its followers, so waiting longer than --tp-timeout
    leaves the group working."""
    srv, client = tp3
    wait_idle(client)
    time.sleep(TP_TIMEOUT_S + 2)
    assert srv.proc.poll() is None, srv.log_text()
    res = client.run_job(prompt="1, 2, 3,", n=2, max_tokens=6, seed=2, timeout=60)
    assert res["outcome"] in ("JOB_SUCCEEDED", "JOB_NO_ANSWER"), res
    assert all(t["reason"] in ("STOP", "LENGTH") for t in res["threads"]), res


def test_sigterm_ends_every_rank_cleanly(tp3):
    """SIGTERM to every rank (what mpirun forwards, and what a process manager sends): each
    leader stops its agent and engine and releases its followers, every rank says so and exits 0,
    and mpirun exits 0. Runs last in this module: it ends the server."""
    srv, _ = tp3
    ranks = children(srv.proc.pid)
    assert len(ranks) == 3, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    rc = srv.proc.wait(timeout=30)
    log = srv.log_text()
    assert rc == 0, log
    for rank in range(3):
        assert f"(rank {rank}/3 (replica 0/1, tp_rank {rank}/3, device {rank})): stopped" in log, log


def test_two_replicas_of_tp2_in_one_world(stubs_dir, tmp_path):
    """mpirun -np 4 serve --tp 2: replicas 0 and 1 (ranks 0-1 and 2-3) register separately and a
    job's threads go to both. A tiny random-weight model with 4 KV heads (the default model's 3
    cannot be split in 2)."""
    pytest.importorskip("numpy")
    from dmsrt_client import DmsrtClient
    model = str(tmp_path / "tiny_kv4")
    subprocess.run(["python3", os.path.join(SRC, "tests", "fixtures", "make_tiny_model.py"),
                    "--out", model, "--arch", "llama", "--format", "hf", "--heads", "8",
                    "--kv-heads", "4", "--layers", "2", "--hidden", "128", "--ffn", "192",
                    "--seed", "1"], check=True, capture_output=True, timeout=120)
    srv = Server(np=4, kv_budget="8MiB", replicas=2, model=model, extra=["--tp", "2"])
    client = DmsrtClient(srv.address, stubs_dir=stubs_dir)
    try:
        cs = srv.wait_ready(client, timeout=60)
        assert sorted(r.replica for r in cs.replicas) == [0, 1]
        assert all(r.tp == 2 for r in cs.replicas), cs
        res = client.run_job(prompt="hello world", n=4, max_tokens=8, temperature=1.0, seed=1,
                             ignore_eos=True, timeout=60)
        assert len(res["threads"]) == 4
        assert all(t["reason"] == "LENGTH" and t["tokens"] == 8 for t in res["threads"]), res
        assert {t["replica"] for t in res["threads"]} == {0, 1}, res["threads"]
    finally:
        client.close()
        srv.stop()


def test_failing_follower_brings_the_job_down(stubs_dir):
    """A follower whose first step fails (test hook) ends RunTpFollower with the error and stops
    the whole job, naming its rank, instead of leaving the leader waiting."""
    from dmsrt_client import DmsrtClient
    srv = Server(np=3, kv_budget="64MiB", replicas=1, env={"DMSRT_TEST_FAIL_RANK": "2"},
                 extra=["--tp", "3", "--tp-timeout", "30"])
    client = DmsrtClient(srv.address, stubs_dir=stubs_dir)
    try:
        srv.wait_ready(client)
        try:
            res = client.run_job(prompt="1 + 1 =", n=1, max_tokens=4, timeout=60)
            assert res["outcome"] == "JOB_FAILED", res
        except grpc.RpcError:
            pass  # the coordinator (rank 0) went down with the job before the final event
        rc = srv.proc.wait(timeout=30)
        log = srv.log_text()
        assert rc != 0, log
        assert "dmsrt: rank 2 failed: DATA_LOSS: injected failure" in log, log
    finally:
        client.close()
        srv.stop()


@pytest.mark.parametrize("np_, args, expect", [
    (0, ["--tp", "3"], "--tp 3 needs 3 processes per replica: launch with mpirun -np 3"),
    (2, ["--tp", "3"], "must be a multiple of 3 (replicas x tp): launch with mpirun -np 3"),
    (4, ["--tp", "3"], "launch with mpirun -np 6 or -np 3"),
    (2, ["--tp", "2"], "does not divide the model's 3 KV heads"),
])
def test_bad_tp_is_refused(np_, args, expect):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [BIN, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--threads", "1"] + args
    if np_:
        cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np_)] + cmd
    else:
        env = {k: v for k, v in env.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0, p.stdout + p.stderr
    assert expect in p.stdout + p.stderr, p.stdout + p.stderr
