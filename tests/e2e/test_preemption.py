"""A replica with a KV budget of about two threads: a best-of-4 job is preempted and recomputed
under memory pressure, yet every thread's text equals the run on the roomy 2-replica server (thread
i samples with seed + i, and a resumed thread keeps its sampler), and a job whose single thread
cannot fit is refused up front with RESOURCE_EXHAUSTED."""

import os
import signal
import subprocess
import tempfile
import time

import grpc
import pytest

from conftest import BIN, MODEL, free_port


@pytest.fixture(scope="module")
def tight(stubs_dir):
    from dmsrt_client import DmsrtClient
    addr = f"127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile(prefix="dmsrt_tight_", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    proc = subprocess.Popen([BIN, "serve", "--model", MODEL, "--listen", addr, "--threads", "1",
                             "--kv-budget", "8MiB"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = DmsrtClient(addr, stubs_dir=stubs_dir)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, open(log.name).read()
            try:
                if any(r.state == "ready" for r in client.cluster().replicas):
                    break
            except grpc.RpcError:
                pass
            assert time.time() < deadline, open(log.name).read()
            time.sleep(0.3)
        yield client
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_preempted_threads_match_roomy_run(tight, client):
    kw = dict(prompt="Count to ten:", n=4, max_tokens=64, temperature=0.8, seed=21, ignore_eos=True,
              timeout=300)
    got = tight.run_job(**kw)
    cs = tight.cluster()
    assert cs.replicas[0].preemptions > 0, "the 8 MiB budget was meant to force preemption"
    ref = client.run_job(**kw)
    assert len(got["threads"]) == len(ref["threads"]) == 4
    for g, r in zip(got["threads"], ref["threads"]):
        assert g["reason"] == r["reason"] == "LENGTH"
        assert g["tokens"] == r["tokens"] == 64
        assert g["text"] == r["text"], (g["index"], g["text"], r["text"])
    assert cs.kv_blocks_used <= cs.kv_blocks_total


def test_thread_that_cannot_fit_is_refused(tight):
    with pytest.raises(grpc.RpcError) as ei:
        tight.submit(prompt="Count to ten:", n=1, max_tokens=400)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "raise the replicas' --kv-budget" in ei.value.details()
