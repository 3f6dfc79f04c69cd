"""A standalone coordinator with bearer-token auth and two replicas started separately (so one can
be killed without taking an mpirun job down): unauthenticated calls are refused, and when one
replica is killed mid-job its threads move to the other and the job is still answered."""

import signal
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest

from conftest import BIN, MODEL, Proc, free_port, wait_replicas_ready

TOKEN = "e2e-secret"


@pytest.fixture(scope="module")
def cluster(stubs_dir):
    from dmsrt_client import DmsrtClient
    port = free_port()
    addr = f"127.0.0.1:{port}"
    mport = free_port()
    coord = Proc(["coordinator", "--model", MODEL, "--listen", addr, "--auth-token", TOKEN,
                  "--metrics-port", str(mport)])
    coord.metrics_port = mport
    reps = [Proc(["serve", "--model", MODEL, "--coordinator", addr, "--auth-token", TOKEN,
                  "--threads", "1", "--kv-budget", "64MiB"]) for _ in range(2)]
    client = DmsrtClient(addr, auth_token=TOKEN, stubs_dir=stubs_dir)
    try:
        wait_replicas_ready(client, 2, [coord] + reps)
        yield addr, client, coord, reps
    finally:
        client.close()
        for p in reps + [coord]:
            p.stop()


def test_auth_required(cluster, stubs_dir):
    from dmsrt_client import DmsrtClient
    addr, client, _, _ = cluster
    for token in (None, "wrong"):
        anon = DmsrtClient(addr, auth_token=token, stubs_dir=stubs_dir)
        with pytest.raises(grpc.RpcError) as ei:
            anon.submit(prompt="1+1=", n=1, max_tokens=2)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        anon.close()
    p = subprocess.run([BIN, "submit", "--address", addr, "--prompt", "1+1=", "--n", "1",
                        "--max-tokens", "2", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "UNAUTHENTICATED" in p.stderr, p.stderr
    p = subprocess.run([BIN, "submit", "--address", addr, "--prompt", "1+1=", "--n", "1",
                        "--max-tokens", "2", "--json", "--auth-token", TOKEN],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_replica_killed_mid_job(cluster):
    addr, client, coord, reps = cluster
    result = {}

    def run():
        try:
            result["res"] = client.run_job(prompt="Write about rivers.", n=4, max_tokens=64, seed=3,
                                           ignore_eos=True, timeout=300)
        except grpc.RpcError as e:
            result["err"] = (e.code(), e.details())

    t = threading.Thread(target=run)
    t.start()
    # Wait until both replicas hold running threads, then kill the second one outright.
    deadline = time.time() + 60
    both = False
    while time.time() < deadline and not both:
        cs = client.cluster()
        both = sum(1 for r in cs.replicas if r.running_threads > 0) == 2
        time.sleep(0.05)
    assert both, "the job never ran on both replicas"
    reps[1].stop(signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    assert "res" in result, result
    res = result["res"]
    assert res["outcome"] in ("JOB_SUCCEEDED", "JOB_NO_ANSWER"), res
    assert len(res["threads"]) == 4
    for th in res["threads"]:
        assert th["reason"] == "LENGTH" and th["tokens"] == 64, th
    cs = client.cluster()
    states = sorted(r.state for r in cs.replicas)
    assert states == ["lost", "ready"], states
    # The coordinator stays up and answers new jobs on the surviving replica.
    res2 = client.run_job(prompt="2 + 2 =", n=2, max_tokens=6, seed=1, timeout=120)
    assert res2["outcome"] in ("JOB_SUCCEEDED", "JOB_NO_ANSWER")
    assert coord.proc.poll() is None
    body = urllib.request.urlopen(f"http://127.0.0.1:{coord.metrics_port}/metrics", timeout=10).read().decode()
    reassigned = [l for l in body.splitlines() if l.startswith("dmsrt:threads_reassigned_total ")]
    assert reassigned and float(reassigned[0].split()[1]) >= 1, body
    assert "dmsrt:replicas_lost 1" in body
