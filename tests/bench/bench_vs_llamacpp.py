#!/usr/bin/env python3
"""Prefill and decode speed on the default model: dmsrt and llama.cpp in the same run.

    python3 tests/bench/bench_vs_llamacpp.py [--prefill 512] [--decode 128] [--threads 2] [--reps 3]

Both get the same 512 prompt token ids (from the varied oracle text) and decode greedily for a
fixed number of steps with EOS ignored. The two run in alternating rounds (one llama.cpp
repetition, then one `dmsrt bench --reps 1`, which warms up first), so a load change on a shared
machine hits both alike; each ratio is the median of the per-round ratios. Prints median/min/max
tokens/s for each, the ratio dmsrt / llama.cpp, dmsrt's measured memory-bandwidth floor, and where
the figures were measured (commit, CPU and its SIMD flags, dmsrt's matmul path, threads, date),
and writes all of it as JSON (--out). llama.cpp comes from the PyPI package llama-cpp-python
(installed by launch/setup.sh --test-deps).
"""
import argparse
import datetime
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


def provenance(threads):
    """Commit of this source tree, CPU model and SIMD flags, thread count, date (UTC)."""
    def git(*a):
        r = subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    model, flags = "unknown", []
    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                if key == "flags" and not flags:
                    have = set(value.split())
                    flags = [w for w in wanted if w in have]
    except OSError:
        pass
    return {"commit": commit, "cpu_model": model, "cpu_flags": flags, "threads": threads,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def llama_cpp_module():
    import llama_cpp
    return llama_cpp


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

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(" ".join(map(str, ids)))
        tok_file = f.name

    def llama_rep():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        nxt = int(np.argmax(last_logits()))
        for _ in range(args.decode):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits()))
        t2 = time.perf_counter()
        return args.prefill / (t1 - t0), args.decode / (t2 - t1) if args.decode else 0.0

    def dmsrt_rep():
        p = subprocess.run([args.bin, "bench", "--model", args.model, "--prefill", str(args.prefill),
                            "--decode", str(args.decode), "--threads", str(args.threads),
                            "--reps", "1", "--tokens-file", tok_file, "--json"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"dmsrt bench failed:\n{p.stderr}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    # Alternating rounds after one warm-up of llama.cpp (dmsrt bench warms up by itself).
    llama_rep()
    pf, dc, runs, pf_ratio, dc_ratio = [], [], [], [], []
    for _ in range(args.reps):
        lp, ld = llama_rep()
        ours_r = dmsrt_rep()
        pf.append(lp)
        dc.append(ld)
        runs.append(ours_r)
        pf_ratio.append(ours_r["prefill_tokens_per_s"]["median"] / lp)
        if args.decode:
            dc_ratio.append(ours_r["decode_tokens_per_s"]["median"] / ld)
    os.unlink(tok_file)
    theirs = {"prefill_tokens_per_s": stats(pf), "decode_tokens_per_s": stats(dc)}
    del llm
    ours = dict(runs[-1])
    ours["prefill_tokens_per_s"] = stats([r["prefill_tokens_per_s"]["median"] for r in runs])
    ours["decode_tokens_per_s"] = stats([r["decode_tokens_per_s"]["median"] for r in runs])
    ours["copy_bandwidth_gb_per_s"] = max(r["copy_bandwidth_gb_per_s"] for r in runs)
    ours["decode_floor_tokens_per_s"] = max(r["decode_floor_tokens_per_s"] for r in runs)
    ours["decode_fraction_of_floor"] = (ours["decode_tokens_per_s"]["median"] /
                                        ours["decode_floor_tokens_per_s"])
    prov = provenance(args.threads)
    prov["dmsrt_matmul_path"] = runs[-1].get("provenance", {}).get("matmul_path", "unknown")
    prov["llama_cpp_version"] = getattr(llama_cpp_module(), "__version__", "unknown")
    ratios = {"prefill_tokens_per_s": pf_ratio, "decode_tokens_per_s": dc_ratio}

    print(f"commit {prov['commit']}, {prov['cpu_model']} ({' '.join(prov['cpu_flags'])}; dmsrt matmul "
          f"{prov['dmsrt_matmul_path']}), {args.threads} threads, {prov['date']}, "
          f"llama-cpp-python {prov['llama_cpp_version']}")
    print(f"{'':24}{'dmsrt':>12}{'llama.cpp':>12}{'ratio':>8}   (median of {args.reps} alternating "
          f"rounds; ratio: median of the per-round ratios; min..max)")
    result = {"provenance": prov, "threads": args.threads, "prefill_tokens": args.prefill,
              "decode_tokens": args.decode, "dmsrt": ours, "llama_cpp": theirs,
              "round_ratios": ratios}
    for key, label in [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")]:
        a, b = ours[key], theirs[key]
        if not ratios[key]:
            continue
        ratio = statistics.median(ratios[key])
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
