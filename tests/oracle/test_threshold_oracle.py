"""Score-threshold eviction (--kv-policy threshold) against kvpress, an independent implementation.

kvpress's DMSPress around KnormPress scores each token by minus the L2 norm of its key after RoPE,
flags the tokens whose score is below a threshold, and masks a flagged token once it leaves a
sliding window of W tokens. Run token by token with decoding=True, a flagged token k is seen by
the queries k .. k+W and by none after: the visibility of docs/dms-semantics.md §3 with w = W and
no one-token shift, which is dmsrt's --threshold-shift 0 with --dms-window W.

transformers loads the same GGUF dequantized to float32; dmsrt quantizes activations to int8, so
scores differ slightly and a score near the threshold may land on the other side (and then the
caches differ, and later scores with them). The test measures the score difference (its maximum,
the margin), and requires:
- decisions agree on >= 99% of the (layer, KV head, token) entries whose kvpress score is
  farther from the threshold than the margin (raw agreement is reported too);
- perplexities under eviction agree within 2%.
The threshold is the median score of the text itself (dmsrt --threshold-rate 0.5 calibrated on
it), so about half of the tokens are flagged. Figures go to $DMSRT_ORACLE_REPORT.
"""
import math
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import run_json
import oracle_common

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
WINDOW = 16


def report(key, value):
    oracle_common.report("DMSRT_ORACLE_REPORT", key, value)


@pytest.fixture(scope="module")
def kvpress_mods():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import kvpress  # noqa: F401
    except ImportError as e:
        pytest.skip(f"kvpress, transformers or torch is not installed ({e}): run launch/setup.sh --test-deps")
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers, kvpress


def short_text():
    with open(os.path.join(DATA, "teacher_forced.txt")) as f:
        return "\n\n".join(f.read().split("\n\n")[:2]) + "\n"


def dmsrt_threshold(dmsrt_bin, model_path, text_file):
    """The threshold --threshold-rate 0.5 picks on the text (printed by dmsrt)."""
    cmd = [dmsrt_bin, "score", "--model", model_path, "--file", text_file, "--json",
           "--kv-policy", "threshold", "--threshold-rate", "0.5", "--threshold-calibration",
           text_file, "--dms-window", str(WINDOW)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = re.search(r"threshold-rate 0\.5: threshold (\S+)", p.stderr)
    assert m, p.stderr
    return float(m.group(1))


def kvpress_run(torch, transformers, model_path, ids, threshold):
    """Token-by-token decoding under DMSPress(KnormPress): per-layer scores [kv_heads, n], the
    masked (layer, head, token) set, and the perplexity."""
    from kvpress import DMSPress, KnormPress

    rec = {}

    class RecordingKnorm(KnormPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            s = super().score(module, hidden_states, keys, values, attentions, kwargs)
            rec.setdefault(module.layer_idx, []).append(s[0].detach().double().numpy().copy())
            return s

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
        dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    press = DMSPress(press=RecordingKnorm(), threshold=threshold, sliding_window_size=WINDOW,
                     decoding=True)
    cache = transformers.DynamicCache()
    nll = 0.0
    with torch.no_grad(), press(model):
        for i, tok in enumerate(ids):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([i]))
            if i + 1 < len(ids):
                logp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
                nll -= float(logp[ids[i + 1]])
        masked = set()
        for layer in model.model.layers:
            mki = getattr(layer.self_attn, "masked_key_indices", None)
            if mki is None:
                continue
            for b, h, s in zip(*(t.tolist() for t in mki)):
                masked.add((layer.self_attn.layer_idx, h, s))
    scores = {l: np.concatenate(v, axis=-1) for l, v in rec.items()}
    return scores, masked, math.exp(nll / (len(ids) - 1))


def test_threshold_against_kvpress(dmsrt_bin, model_path, kvpress_mods, tmp_path):
    torch, transformers, _ = kvpress_mods
    text_file = str(tmp_path / "text.txt")
    with open(text_file, "w") as f:
        f.write(short_text())
    threshold = dmsrt_threshold(dmsrt_bin, model_path, text_file)

    dump = str(tmp_path / "decisions.txt")
    env = dict(os.environ, DMSRT_THRESHOLD_DUMP=dump)
    ours = run_json([dmsrt_bin, "score", "--model", model_path, "--file", text_file, "--json",
                     "--kv-policy", "threshold", "--threshold", repr(threshold), "--dms-window",
                     str(WINDOW), "--threshold-shift", "0"], env=env)
    dense = run_json([dmsrt_bin, "score", "--model", model_path, "--file", text_file, "--json",
                      "--kv-policy", "none"])
    ids = ours["token_ids"]
    n = len(ids)
    d = np.loadtxt(dump)  # layer head token score flag
    n_layers = int(d[:, 0].max()) + 1
    n_kv = int(d[:, 1].max()) + 1
    ds = np.full((n_layers, n_kv, n), np.nan)
    dflag = np.zeros((n_layers, n_kv, n), dtype=bool)
    li, hi, ti = d[:, 0].astype(int), d[:, 1].astype(int), d[:, 2].astype(int)
    ds[li, hi, ti] = d[:, 3]
    dflag[li, hi, ti] = d[:, 4] > 0

    scores, masked, ppl_kv = kvpress_run(torch, transformers, model_path, ids, threshold)
    ks = np.stack([scores[l] for l in range(n_layers)])  # [layers, kv_heads, n]
    assert ks.shape == (n_layers, n_kv, n)

    # Scores: every token but the newest has a dmsrt decision.
    diff = np.abs(ds[:, :, : n - 1] - ks[:, :, : n - 1])
    assert not np.isnan(diff).any()
    margin = float(diff.max())

    # Decisions: kvpress has judged the tokens that left its window, 0 .. n-1-W.
    judged = n - WINDOW
    kflag = np.zeros((n_layers, n_kv, judged), dtype=bool)
    for (l, h, s) in masked:
        assert s < judged, (l, h, s)
        kflag[l, h, s] = True
    # kvpress masks exactly what its scores say (its own consistency).
    assert np.array_equal(kflag, ks[:, :, :judged] < threshold)
    ours_flag = dflag[:, :, :judged]
    agree = ours_flag == kflag
    clear = np.abs(ks[:, :, :judged] - threshold) > margin
    raw = float(agree.mean())
    clear_agree = float(agree[clear].mean()) if clear.any() else 1.0
    ppl_ours = ours["perplexity"]
    ppl_rel = abs(ppl_ours - ppl_kv) / ppl_kv
    figures = {
        "tokens": n, "window": WINDOW, "threshold": threshold,
        "entries": int(agree.size), "flagged_share_kvpress": float(kflag.mean()),
        "flagged_share_dmsrt": float(ours_flag.mean()),
        "score_diff_max": margin, "score_diff_mean": float(diff.mean()),
        "score_diff_p99": float(np.quantile(diff, 0.99)),
        "raw_agreement": raw, "entries_beyond_margin": int(clear.sum()),
        "agreement_beyond_margin": clear_agree,
        "perplexity_dmsrt": ppl_ours, "perplexity_kvpress": ppl_kv,
        "perplexity_rel_diff": ppl_rel, "perplexity_dmsrt_dense": dense["perplexity"],
    }
    print("threshold oracle:", figures)
    report("threshold_kvpress", figures)
    assert clear.sum() > 0.5 * clear.size, figures  # the margin leaves most entries to check
    assert clear_agree >= 0.99, figures
    assert ppl_rel <= 0.02, figures
