"""A replica running synthetic DMS eviction (`--kv-policy forced`, labelled synthetic): threads
report a cache compression ratio above 1, and budget mode fits more threads into the same bytes
than on the dense replica of the main fixture."""

import grpc
import pytest

from conftest import standalone_replica


@pytest.fixture(scope="module")
def forced(stubs_dir):
    with standalone_replica(stubs_dir, "dmsrt_forced_",
                            ["--kv-budget", "64MiB", "--kv-policy", "forced",
                             "--dms-force-rate", "0.5", "--dms-window", "16"]) as client:
        yield client


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
