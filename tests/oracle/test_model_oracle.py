"""dmsrt's CPU forward pass against llama.cpp on the default model.

Both keep the KV cache in float32 (llama.cpp's f16 default adds an error that grows with the
context and would hide ours).

Why the assertions look the way they do: the default model is Q4_1 and both implementations
quantize activations to 8 bits per block, so a difference in the last float bit can flip an int8
rounding and the change propagates through 30 layers. llama.cpp disagrees with itself by a mean
|delta logit| of ~0.19 (and ~96% top-1) between two of its own kernel paths (flash attention on or
off) on the same text. So the test measures that self-agreement in the same run and requires:
- teacher-forced over >1000 tokens of varied text: top-1 agreement at least llama.cpp's own
  cross-path agreement minus one point, and >= 99% at every position where llama.cpp's top-1 beats
  its top-2 by at least DECISIVE_MARGIN (a prediction, not a numerical tie); max and mean
  |delta logit| are reported (and written to $DMSRT_ORACLE_REPORT for docs/perf.md);
- greedy 32-token continuations of 10 prompts: on at least 9 of 10, identical or diverging only
  at a step where llama.cpp's own top-2 margin is below DECISIVE_MARGIN.
"""
import json
import os

import numpy as np

from conftest import ROOT, run_json
from llama_ref import open_llama
import oracle_common
from oracle_common import DECISIVE_MARGIN, PROMPTS

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")




def report(key, value):
    oracle_common.report("DMSRT_ORACLE_REPORT", key, value)


def test_teacher_forced_logits(dmsrt_bin, model_path, llama_cpp_mod, tmp_path):
    text_file = os.path.join(DATA, "teacher_forced.txt")
    dump = tmp_path / "logits.f32"
    out = run_json([dmsrt_bin, "score", "--model", model_path, "--file", text_file,
                    "--dump-logits", str(dump), "--threads", "2", "--json"])
    ids = out["token_ids"]
    n = len(ids)
    assert n >= 1000, f"corpus gives only {n} tokens"
    ours = np.fromfile(dump, dtype=np.float32)
    vocab = ours.size // n
    assert vocab * n == ours.size
    ours = ours.reshape(n, vocab)

    llm = open_llama(model_path, f32_kv=True, n_ctx=2048, n_threads=2, n_batch=512, logits_all=True)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:n], dtype=np.float32)
    assert theirs.shape == ours.shape

    del llm
    # llama.cpp against itself: the flash-attention path on the same tokens.
    llm = open_llama(model_path, n_ctx=2048, n_threads=2, n_batch=512, logits_all=True,
                     type_k=0, type_v=0, flash_attn=True)
    llm.eval(ids)
    theirs_flash = np.asarray(llm.scores[:n], dtype=np.float32)
    del llm

    top1_ours = ours.argmax(axis=1)
    top1_theirs = theirs.argmax(axis=1)
    agree = float((top1_ours == top1_theirs).mean())
    self_agree = float((theirs_flash.argmax(axis=1) == top1_theirs).mean())
    top2 = np.sort(theirs, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
    agree_decisive = float((top1_ours == top1_theirs)[decisive].mean())
    delta = np.abs(ours - theirs)
    figures = {"tokens": n, "top1_agreement": agree,
               "llama_cpp_self_top1_agreement": self_agree,
               "llama_cpp_self_mean_abs_dlogit": float(np.abs(theirs_flash - theirs).mean()),
               "decisive_positions": int(decisive.sum()),
               "top1_agreement_decisive": agree_decisive,
               "max_abs_dlogit": float(delta.max()),
               "mean_abs_dlogit": float(delta.mean()),
               "top1_matches_score_json": bool((top1_ours == np.asarray(out["top1"])).all())}
    print("teacher-forced vs llama.cpp:", json.dumps(figures))
    report("teacher_forced", figures)
    assert figures["top1_matches_score_json"]
    assert agree >= self_agree - 0.01, figures
    assert agree_decisive >= 0.99, figures
    assert decisive.mean() > 0.5, figures  # the decisive set is most of the text


def llama_greedy(llm, ids, steps, eog):
    """Greedy tokens and, per step, the margin between llama.cpp's top-1 and top-2 logits."""
    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(steps):
        row = np.asarray(llm.scores[llm.n_tokens - 1])
        top2 = np.partition(row, -2)[-2:]
        nxt = int(np.argmax(row))
        margins.append(float(abs(top2[1] - top2[0])))
        if nxt in eog:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out, margins


def test_greedy_continuations(dmsrt_bin, model_path, llama_cpp_mod):
    llm = open_llama(model_path, f32_kv=True, n_ctx=1024, n_threads=2, logits_all=True)
    eog = {llm.token_eos(), 2}
    identical = 0
    explained = 0
    rows = []
    for prompt in PROMPTS:
        ours = run_json([dmsrt_bin, "generate", "--model", model_path, "--prompt", prompt,
                         "--max-tokens", "32", "--temperature", "0", "--threads", "2", "--json"])
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        theirs, margins = llama_greedy(llm, ids, 32, eog)
        mine = ours["token_ids"]
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if first is None and len(mine) != len(theirs):
            first = min(len(mine), len(theirs))
        same = first is None
        tie = (not same) and first < len(margins) and margins[first] < DECISIVE_MARGIN
        identical += same
        explained += same or tie
        rows.append({"prompt": prompt[:40], "identical": same, "first_difference": first,
                     "llama_cpp_margin_there": None if same or first >= len(margins) else round(margins[first], 4)})
    print("greedy continuations:", json.dumps(rows, indent=1))
    report("greedy", {"identical": identical, "identical_or_near_tie": explained, "prompts": len(PROMPTS),
                      "rows": rows})
    assert explained >= 9, rows
