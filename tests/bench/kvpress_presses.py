#!/usr/bin/env python3
"""kvpress's own presses beside dmsrt's eviction policies, protocol b, same model, same tokens.

Protocol b (compress-then-continue) of `dmsrt eval`: the first C tokens of the held-out text are
the context, the rest C..L-1 is a teacher-forced continuation, and only the continuation is
scored. Here the context goes through kvpress's normal prefill under a press (BasePress's forward
hook compresses each layer's cache once, during the prefill forward only: its is_prefilling
check skips every later forward), then the continuation runs in one forward over the compressed
cache at its true positions C..L-1 (as kvpress's pipeline does for a question): each continuation
token attends to the kept context and to every continuation token before it. Nothing is evicted
after the prefill.

The model is the GGUF that dmsrt runs, loaded into transformers dequantized to float32 (as
tests/oracle/test_threshold_oracle.py does). The token ids are dmsrt's own: `dmsrt tokenize
--no-special` of the file, cut to --max-tokens, the ids `dmsrt eval --file F --max-tokens L`
evaluates. C follows dmsrt eval's rule (7/8 of L rounded down to the 512-token prefill chunk)
unless --context is given.

Scored predictions: those made by continuation tokens C..L-2 (of tokens C+1..L-1), L-1-C of them.
The prediction of token C comes from the last context position, computed in the dense prefill
before the press runs, so it is not scored (dmsrt's protocol b rows score it too, one more).
Per row: perplexity, KL(dense || press) over the dense top-k + remainder bucket (dmsrt eval's
definition, against this script's own dense float32 run; the full-vocabulary KL is written
as kl_full), top-1 agreement with the dense run, and the cache CR at C measured from the cache:
C / (context tokens kept), per layer (kvpress's presses here keep the same count in every layer
and head).

Rows are written in `dmsrt eval --json-out`'s format (policy "kvpress:NAME r=R", kind
"kvpress:NAME", protocol "b", source "kvpress"), so `dmsrt eval --merge` joins them. With
--run-dmsrt the script also runs `dmsrt eval` protocol b at the same C and CRs (window, tova, h2o,
forced with budgets set at C; dms with --dms-adapter) and merges both into one table
(--merged-json, --svg).

Budgets: with --budget-at context (the default) every setting keeps C / CR tokens per head, so
the cache CR at C is the target; with --budget-at length it keeps L / CR (the budgets of `dmsrt
eval`'s own grid, whose protocol a rows are then at the target CR at L), and the presses keep
the same count out of C (compression_ratio = 1 - keep / C).

Passkey (--passkey-lengths): the probe of `dmsrt eval` (its prompts, written by `dmsrt eval
--write-passkey-prompts`: the same token ids and keys) run under each press as kvpress's
pipeline runs a context and a question: the haystack (everything before the question) is the
context, compressed once by the press to the setting's budget (the same tokens per head as the
dmsrt policy keeps: compression_ratio = 1 - keep / context, no press where the context fits),
then the question and a greedy answer of at most max_new_tokens run over the compressed cache.
Correct when the decoded answer contains the key.

Exit status 77 (skip) with the reason when torch, transformers or kvpress, the dmsrt binary or
the model is missing.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_FILE = os.path.join(ROOT, "tests", "data", "eval", "heldout.txt")
PREFILL_CHUNK = 512  # dmsrt's default --prefill-chunk, used by eval's default C

PRESSES = ["streaming", "tova", "snapkv", "expected", "knorm"]


def make_press(kvpress, name, ratio):
    """The press and its settings (kvpress's defaults, stated)."""
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4), "n_sink=4"
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio), ""
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5), \
            "window_size=64 kernel_size=5"
    if name == "expected":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio, n_future_positions=512,
                                              n_sink=4, use_covariance=True, use_vnorm=True), \
            "n_future_positions=512 n_sink=4 use_covariance use_vnorm"
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio), ""
    raise ValueError(f"unknown press {name}")


def press_kind(name):
    return {"streaming": "streamingllm", "expected": "expected_attention"}.get(name, name)


def dmsrt_ids(bin_path, model, path):
    p = subprocess.run([bin_path, "tokenize", "--model", model, "--file", path, "--no-special",
                        "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"dmsrt tokenize failed: {p.stderr}")
    return json.loads(p.stdout)["ids"]


def passkey_prompts(a):
    """dmsrt eval's passkey prompts (token ids, keys, where the question starts)."""
    path = a.json_out + ".prompts.json"
    p = subprocess.run([a.bin, "eval", "--model", a.model, "--passkey-lengths", a.passkey_lengths,
                        "--passkey-depths", a.passkey_depths, "--write-passkey-prompts", path],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"dmsrt eval --write-passkey-prompts failed: {p.stderr}")
    with open(path) as f:
        return json.load(f)


def run_passkey(torch, model, prompts, make, policy, keep):
    """Greedy answers under `make(compression_ratio)` (None: dense) with `keep` context tokens
    per head; rows without the decoded answer (decode_answers fills it)."""
    import transformers
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    t0 = time.time()
    for pr in prompts["prompts"]:
        toks, q = pr["tokens"], pr["question_token"]
        ratio = 0.0 if make is None or keep >= q else round(1 - keep / q, 6)
        cache = transformers.DynamicCache()
        with torch.no_grad():
            ctx = torch.tensor([toks[:q]])
            if ratio > 0:
                with make(ratio)(model):
                    model.model(input_ids=ctx, past_key_values=cache)
            else:
                model.model(input_ids=ctx, past_key_values=cache)
            kept = min(cache.get_seq_length(l) for l in range(len(cache)))
            pos = len(toks)
            logits = model(input_ids=torch.tensor([toks[q:]]), past_key_values=cache,
                           position_ids=torch.arange(q, pos).unsqueeze(0)).logits[0, -1]
            answer = []
            for _ in range(prompts["max_new_tokens"]):
                nxt = int(logits.argmax())
                if nxt in eos:
                    break
                answer.append(nxt)
                logits = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                               position_ids=torch.tensor([[pos]])).logits[0, -1]
                pos += 1
        out.append({"policy": policy, "length": pr["length"], "depth": pr["depth"],
                    "key": pr["key"], "answer_ids": answer,
                    "cache_cr": pr["length"] / (kept + len(toks) - q)})
    print(f"{policy:<34} passkey: {len(out)} trials in {time.time() - t0:.1f} s", flush=True)
    return out


def decode_answers(a, rows):
    """Decodes every answer with dmsrt's tokenizer (one call) and marks the correct ones."""
    if not rows:
        return []
    path = a.json_out + ".answers.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r["answer_ids"]) + "\n")
    p = subprocess.run([a.bin, "tokenize", "--model", a.model, "--decode-jsonl", path],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"dmsrt tokenize --decode-jsonl failed: {p.stderr}")
    texts = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(texts) == len(rows), (len(texts), len(rows))
    for r, t in zip(rows, texts):
        r["answer"] = t
        r["correct"] = r["key"] in t
    return rows


def default_context(L):
    c = L * 7 // 8
    if c >= PREFILL_CHUNK:
        c -= c % PREFILL_CHUNK
    return max(1, c)


def dmsrt_policies(base, crs, forced_window, threshold):
    """dmsrt policy specs whose cache CR at `base` tokens is each target (C or L: --budget-at).
    forced and threshold: delay window `forced_window`, rate r with w + (base - w)(1 - r) = keep
    (threshold: the rate on the calibration text; its CR here is measured)."""
    specs = []
    for cr in crs:
        keep = round(base / cr)
        specs += [f"window:w={keep - 4},s=4", f"tova:t={keep}", f"h2o:t={keep}"]
        if keep > forced_window:
            r = round(1 - (keep - forced_window) / (base - forced_window), 3)
            specs.append(f"forced:r={r},w={forced_window}")
            if threshold:
                specs.append(f"threshold:rate={r},w={forced_window}")
    return specs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.environ.get("DMSRT_BIN"),
                    help="dmsrt binary (tokenizes the text; with --run-dmsrt also evaluates)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--file", default=DEFAULT_FILE)
    ap.add_argument("--max-tokens", type=int, default=1024, help="L")
    ap.add_argument("--context", type=int, default=0, help="C (0: dmsrt eval's rule)")
    ap.add_argument("--target-cr", default="2,4,8")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forced-window", type=int, default=16,
                    help="delay window of dmsrt's forced and threshold rows")
    ap.add_argument("--budget-at", choices=["context", "length"], default="context",
                    help="keep C / CR or L / CR tokens per head")
    ap.add_argument("--no-threshold", action="store_true", help="no dmsrt threshold rows")
    ap.add_argument("--passkey-lengths", default="",
                    help="passkey prompt lengths (e.g. 1024,2048,4096; empty: no passkey)")
    ap.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    ap.add_argument("--json-out", required=True, help="the kvpress rows (dmsrt eval's format)")
    ap.add_argument("--run-dmsrt", metavar="JSON",
                    help="also run `dmsrt eval` protocol b at the same C and CRs, report here")
    ap.add_argument("--dms-adapter",
                    help="with --run-dmsrt: also a dms row, these learned decisions at their own CR")
    ap.add_argument("--merged-json", help="with --run-dmsrt: the merged report")
    ap.add_argument("--svg", help="with --run-dmsrt: the merged plot")
    a = ap.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        import transformers
        import kvpress
    except ImportError as e:
        print(f"SKIP: kvpress, transformers or torch is not installed ({e}): "
              "run launch/setup.sh --test-deps", flush=True)
        return 77
    if not a.bin or not os.path.exists(a.bin):
        print("SKIP: no dmsrt binary (--bin or $DMSRT_BIN) to tokenize the text", flush=True)
        return 77
    if not os.path.exists(a.model):
        print(f"SKIP: the model {a.model} is not installed", flush=True)
        return 77
    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    ids = dmsrt_ids(a.bin, a.model, a.file)
    L = min(len(ids), a.max_tokens) if a.max_tokens > 0 else len(ids)
    ids = ids[:L]
    C = a.context or default_context(L)
    assert 1 <= C < L - 1, (C, L)
    crs = [float(x) for x in a.target_cr.split(",")]
    label = os.path.basename(a.file)
    base = C if a.budget_at == "context" else L
    prompts = passkey_prompts(a) if a.passkey_lengths else None

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(a.model)), gguf_file=os.path.basename(a.model),
        dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ctx = torch.tensor([ids[:C]])
    cont = torch.tensor([ids[C:]])
    targets = torch.tensor(ids[C + 1:])  # predicted by continuation positions C..L-2
    n = L - 1 - C

    def run(press):
        """Prefill the context (under the press), then the continuation; its log-probs [n, V]
        and the kept context length per layer."""
        cache = transformers.DynamicCache()
        t0 = time.time()
        with torch.no_grad():
            if press is None:
                model.model(input_ids=ctx, past_key_values=cache)
            else:
                with press(model):
                    model.model(input_ids=ctx, past_key_values=cache)
            kept = [cache.get_seq_length(l) for l in range(len(cache))]
            out = model(input_ids=cont, past_key_values=cache,
                        position_ids=torch.arange(C, L).unsqueeze(0))
        logp = torch.log_softmax(out.logits[0, :n].double(), dim=-1)
        return logp, kept, time.time() - t0

    k = a.top_k
    dense, kept, dense_s = run(None)
    assert all(x == C for x in kept), kept
    top_lp, top_ids = dense.topk(k, dim=-1)
    lp_rest = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-15))
    dense_top1 = dense.argmax(-1)
    tail_mass = float(lp_rest.exp().mean())

    def row(policy, kind, settings, logp, kept, seconds, ratio):
        nll = -logp.gather(1, targets[:, None])[:, 0]
        lq = logp.gather(1, top_ids)
        lq_rest = torch.log1p(-lq.exp().sum(-1).clamp(max=1 - 1e-15))
        kl = ((top_lp.exp() * (top_lp - lq)).sum(-1) + lp_rest.exp() * (lp_rest - lq_rest))
        kl_full = (dense.exp() * (dense - logp)).sum(-1)
        agree = (logp.argmax(-1) == dense_top1).double()
        res = min(kept)
        return {"policy": policy, "kind": kind, "protocol": "b",
                "protocol_name": "compress-then-continue", "length": L, "context": C,
                "scored": n, "perplexity": math.exp(float(nll.mean())),
                "mean_nll": float(nll.mean()), "kl": float(kl.mean()),
                "kl_full": float(kl_full.mean()), "top1_agreement": float(agree.mean()),
                "cr_length": C, "cache_cr": C / res, "eviction_rate": 1 - res / C,
                "asymptotic_cr": 0.0, "block_cr": 0.0, "resident_tokens": res,
                "logical_tokens": C, "kept_per_layer": sorted(set(kept)),
                "compression_ratio": ratio, "settings": settings, "seconds": seconds,
                "source": "kvpress"}

    rows = [row("kvpress:none", "kvpress:none", "dense float32", dense, kept, dense_s, 0.0)]
    print(f"kvpress dense: L={L} C={C} scored={n} ppl {rows[0]['perplexity']:.3f} "
          f"({dense_s:.1f} s)", flush=True)
    passkey = []
    if prompts:
        passkey += run_passkey(torch, model, prompts, None, "kvpress:none", 0)
    for name in a.presses.split(","):
        for cr in crs:
            keep = round(base / cr)
            ratio = round(1 - keep / C, 6)
            press, settings = make_press(kvpress, name, ratio)
            logp, kept, s = run(press)
            policy = f"kvpress:{press_kind(name)} r={ratio:.3f}"
            r = row(policy, f"kvpress:{press_kind(name)}", settings, logp, kept, s, ratio)
            rows.append(r)
            print(f"{r['policy']:<34} CR {r['cache_cr']:.2f}x ppl {r['perplexity']:.3f} "
                  f"KL {r['kl']:.5f} top1 {r['top1_agreement']:.4f} ({s:.1f} s)", flush=True)
            if prompts:
                passkey += run_passkey(torch, model, prompts,
                                       lambda rr: make_press(kvpress, name, rr)[0], policy, keep)

    report = {"text": label, "length": L, "context": C, "top_k": k,
              "kl_definition": "top-k + remainder bucket (lower bound of the full KL)",
              "dense_seconds": dense_s, "dense_tail_mass": tail_mass,
              "implementation": f"kvpress {getattr(kvpress, '__version__', '?')}, transformers "
                                f"{transformers.__version__}, torch {torch.__version__}, float32",
              "scored_predictions": "continuation positions C..L-2 (tokens C+1..L-1)",
              "rows": rows, "passkey": decode_answers(a, passkey)}
    with open(a.json_out, "w") as f:
        json.dump(report, f, indent=1)

    if a.run_dmsrt:
        specs = dmsrt_policies(base, crs, a.forced_window, not a.no_threshold)
        if a.dms_adapter:
            specs.append("dms")
        cmd = [a.bin, "eval", "--model", a.model, "--file", a.file, "--max-tokens", str(L),
               "--context", str(C), "--top-k", str(k), "--threads", str(a.threads),
               "--policies", ";".join(specs), "--json-out", a.run_dmsrt]
        if a.passkey_lengths:
            cmd += ["--passkey-lengths", a.passkey_lengths, "--passkey-depths", a.passkey_depths]
        else:
            cmd += ["--no-passkey"]
        if a.dms_adapter:
            cmd += ["--dms-adapter", a.dms_adapter]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        merge = [a.bin, "eval", "--merge", f"{a.run_dmsrt},{a.json_out}"]
        if a.merged_json:
            merge += ["--json-out", a.merged_json]
        if a.svg:
            merge += ["--svg", a.svg]
        print(" ".join(merge), flush=True)
        subprocess.run(merge, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
