"""dmsrt's CPU forward pass against llama.cpp on the default model.

- Teacher-forced logits over the varied text in data/teacher_forced.txt (>1000 tokens): top-1
  agreement >= 99%; max and mean |delta logit| are reported (and written to
  $DMSRT_ORACLE_REPORT when set, for docs/perf.md).
- Greedy 32-token continuations of 10 prompts: identical on at least 9 of 10.
"""
import json
import os

import numpy as np

from conftest import ROOT, run_json

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 15 plus 27?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colours are",
    "Water boils at 100 degrees Celsius because",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\nx = np.arange(10)\n",
    "The most important rule of writing clearly is",
    "1, 2, 3, 5, 8, 13,",
]


def report(key, value):
    path = os.environ.get("DMSRT_ORACLE_REPORT")
    if not path:
        return
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


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

    llm = llama_cpp_mod.Llama(model_path=model_path, n_ctx=2048, n_threads=2, n_batch=512,
                              logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:n], dtype=np.float32)
    assert theirs.shape == ours.shape

    top1_ours = ours.argmax(axis=1)
    top1_theirs = theirs.argmax(axis=1)
    agree = float((top1_ours == top1_theirs).mean())
    delta = np.abs(ours - theirs)
    figures = {"tokens": n, "top1_agreement": agree, "max_abs_dlogit": float(delta.max()),
               "mean_abs_dlogit": float(delta.mean()),
               "top1_matches_score_json": bool((top1_ours == np.asarray(out["top1"])).all())}
    print("teacher-forced vs llama.cpp:", json.dumps(figures))
    report("teacher_forced", figures)
    assert figures["top1_matches_score_json"]
    assert agree >= 0.99, figures


def llama_greedy(llm, ids, steps, eog):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in eog:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


def test_greedy_continuations(dmsrt_bin, model_path, llama_cpp_mod):
    llm = llama_cpp_mod.Llama(model_path=model_path, n_ctx=1024, n_threads=2, logits_all=True,
                              verbose=False)
    eog = {llm.token_eos(), 2}
    identical = 0
    rows = []
    for prompt in PROMPTS:
        ours = run_json([dmsrt_bin, "generate", "--model", model_path, "--prompt", prompt,
                         "--max-tokens", "32", "--temperature", "0", "--threads", "2", "--json"])
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        theirs = llama_greedy(llm, ids, 32, eog)
        same = ours["token_ids"] == theirs
        identical += same
        rows.append({"prompt": prompt[:40], "identical": same,
                     "first_difference": next((i for i, (a, b) in enumerate(zip(ours["token_ids"], theirs)) if a != b), None)})
    print("greedy continuations:", json.dumps(rows, indent=1))
    report("greedy_identical", {"identical": identical, "prompts": len(PROMPTS)})
    assert identical >= 9, rows
