#!/usr/bin/env python3
"""Prefill and decode speed on the default model: dmsrt and llama.cpp in the same run.

    python3 tests/bench/bench_vs_llamacpp.py [--prefill 512] [--decode 128] [--threads 2] [--reps 3]

Both get the same 512 prompt token ids (from the varied oracle text) and decode greedily for a
fixed number of steps with EOS ignored. Prints median/min/max tokens/s for each, the ratio
dmsrt / llama.cpp, dmsrt's measured memory-bandwidth floor, and writes JSON (--out).
llama.cpp comes from the PyPI package llama-cpp-python (installed by launch/setup.sh --test-deps).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stats(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin", "dmsrt"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))
    from llama_ref import open_llama

    text = open(os.path.join(ROOT, "tests", "oracle", "data", "teacher_forced.txt"), "rb").read()
    llm = open_llama(args.model, n_ctx=args.prefill + args.decode + 8, n_threads=args.threads,
                     n_threads_batch=args.threads, n_batch=args.prefill, logits_all=False)
    ids = llm.tokenize(text, add_bos=False, special=True)
    while len(ids) < args.prefill:
        ids = ids + ids
    ids = ids[: args.prefill]

    n_vocab = llm.n_vocab()

    def last_logits():
        # Without logits_all llama.cpp computes only the last row's logits (as dmsrt does) and
        # llama-cpp-python no longer copies them into `scores`: read them from the context.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    # llama.cpp: warm-up + reps.
    pf, dc = [], []
    for rep in range(args.reps + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        nxt = int(np.argmax(last_logits()))
        for _ in range(args.decode):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits()))
        t2 = time.perf_counter()
        if rep:
            pf.append(args.prefill / (t1 - t0))
            dc.append(args.decode / (t2 - t1))
    theirs = {"prefill_tokens_per_s": stats(pf), "decode_tokens_per_s": stats(dc)}
    del llm

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(" ".join(map(str, ids)))
        tok_file = f.name
    p = subprocess.run([args.bin, "bench", "--model", args.model, "--prefill", str(args.prefill),
                        "--decode", str(args.decode), "--threads", str(args.threads),
                        "--reps", str(args.reps), "--tokens-file", tok_file, "--json"],
                       capture_output=True, text=True)
    os.unlink(tok_file)
    if p.returncode != 0:
        sys.exit(f"dmsrt bench failed:\n{p.stderr}")
    ours = json.loads(p.stdout.strip().splitlines()[-1])

    print(f"{'':24}{'dmsrt':>12}{'llama.cpp':>12}{'ratio':>8}   (median of {args.reps}; min..max)")
    result = {"threads": args.threads, "prefill_tokens": args.prefill, "decode_tokens": args.decode,
              "dmsrt": ours, "llama_cpp": theirs}
    for key, label in [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")]:
        a, b = ours[key], theirs[key]
        ratio = a["median"] / b["median"]
        result[key.replace("_tokens_per_s", "_ratio")] = ratio
        print(f"{label:24}{a['median']:12.1f}{b['median']:12.1f}{ratio:8.2f}   "
              f"dmsrt {a['min']:.1f}..{a['max']:.1f}, llama.cpp {b['min']:.1f}..{b['max']:.1f}")
    print(f"decode floor (dmsrt's measured copy bandwidth {ours['copy_bandwidth_gb_per_s']:.1f} GB/s over "
          f"{ours['weight_bytes'] / 2**20:.1f} MiB of weights): {ours['decode_floor_tokens_per_s']:.1f} tokens/s; "
          f"dmsrt at {100 * ours['decode_fraction_of_floor']:.0f}%, llama.cpp at "
          f"{100 * theirs['decode_tokens_per_s']['median'] / ours['decode_floor_tokens_per_s']:.0f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
