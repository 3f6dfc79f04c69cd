"""A replica on the CUDA backend, served end to end: `serve --backend cuda` from the dmsrt binary
linked with the device emulator (tests/cuda_emulator/), so the backend runs under the real
scheduler (a shared prompt forked into best-of-N threads, batched decode steps, device sampling,
eviction, cancellation) on machines without a GPU. Skipped when that binary was not built (no
CUDA headers)."""

import os

import pytest

from conftest import check_best_of, check_top_logprobs, standalone_replica, wait_idle

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
    # The engine samples on the host from the logits rows the backend returns, so the CUDA
    # backend gives the same log-probability listings as the CPU one.
    assert check_top_logprobs(res["token_events"], 5, greedy=True) == 30


def test_cancel_frees_device_blocks(cuda_replica):
    job = cuda_replica.submit(prompt="Count slowly:", n=3, max_tokens=400, seed=5, ignore_eos=True)
    cuda_replica.cancel(job.job_id)
    cs = wait_idle(cuda_replica, timeout=120)
    assert cs.kv_blocks_used == 0
