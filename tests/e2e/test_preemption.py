"""A replica with a KV budget of about two threads: a best-of-4 job is preempted and recomputed
under memory pressure, yet every thread's text equals the run on the roomy 2-replica server (thread
i samples with seed + i, and a resumed thread keeps its sampler), and a job whose single thread
cannot fit is refused up front with RESOURCE_EXHAUSTED."""

import time

import grpc
import pytest

from conftest import standalone_replica, wait_idle


@pytest.fixture(scope="module")
def tight(stubs_dir):
    with standalone_replica(stubs_dir, "dmsrt_tight_", ["--kv-budget", "8MiB"]) as client:
        yield client


def test_preempted_threads_match_roomy_run(tight, client):
    kw = dict(prompt="Count to ten:", n=4, max_tokens=64, temperature=0.8, seed=21, ignore_eos=True,
              timeout=300)
    got = tight.run_job(**kw)
    cs = wait_idle(tight, timeout=60, after=time.time())  # a heartbeat after the job
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
