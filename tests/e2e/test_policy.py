"""A replica running synthetic DMS eviction (`--kv-policy forced`, labelled synthetic): threads
report a cache compression ratio above 1, and budget mode fits more threads into the same bytes
than on the dense replica of the main fixture."""

import os
import signal
import subprocess
import tempfile
import time

import grpc
import pytest

from conftest import BIN, MODEL, free_port


@pytest.fixture(scope="module")
def forced(stubs_dir):
    from dmsrt_client import DmsrtClient
    addr = f"127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile(prefix="dmsrt_forced_", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    proc = subprocess.Popen([BIN, "serve", "--model", MODEL, "--listen", addr, "--threads", "1",
                             "--kv-budget", "64MiB", "--kv-policy", "forced", "--dms-force-rate", "0.5",
                             "--dms-window", "16"],
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


def test_forced_eviction_compresses_threads(forced):
    cs = forced.cluster()
    assert cs.replicas[0].kv_policy == "forced"
    res = forced.run_job(prompt="Write about the moon.", n=2, max_tokens=64, seed=2, ignore_eos=True,
                         timeout=120)
    for t in res["threads"]:
        assert t["tokens"] == 64
        # About 70 logical tokens per head, a 16-token window, half of the rest flagged.
        assert t["cache_cr"] > 1.2, t


def test_budget_mode_fits_more_threads_with_eviction(forced, client):
    kw = dict(prompt="1 + 1 =", kv_budget_bytes=64 << 20, max_tokens=256, seed=1, ignore_eos=True)
    dense = client.submit(**kw)
    evicting = forced.submit(**kw)
    assert 1 <= dense.n < evicting.n, (dense.n, evicting.n)
    client.cancel(dense.job_id)
    forced.cancel(evicting.job_id)
    print(f"64 MiB budget, 256 tokens/thread: {dense.n} dense threads vs {evicting.n} with forced eviction")


def test_policy_mismatch_is_invalid(forced):
    req = forced.request(prompt="hi", n=1)
    req.dms.policy = forced.pb.KV_POLICY_NONE
    with pytest.raises(grpc.RpcError) as ei:
        forced.stub.SubmitJob(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--kv-policy forced" in ei.value.details()
