#!/usr/bin/env python3
"""Decode speed at a long resident context, dense against a cache that holds one eighth of it.

    python3 tests/bench/long_context_decode.py [--context 4096] [--batch 1,8] [--kv-window 512]
        [--kv-sinks 4] [--steps 16] [--threads 2] [--rounds 3] [--out result.json]

For every batch size, `dmsrt bench-decode` runs decode steps after `context` tokens per sequence
(filled without running the model), once with policy none (every token resident) and once with
policy window (the last --kv-window tokens plus --kv-sinks first ones), in alternating rounds so
that a load change on a shared machine hits both alike. Prints the decode tokens/s of each, the
measured speed-up (window / none, median of the per-round ratios), and the speed-up expected if
a step cost only its bytes read: the weights once per step plus every resident K and V row of
every sequence (the KV bytes held), (W + KV_none) / (W + KV_window); and the attention-bytes
ratio KV_none / KV_window alone. "closeness" is the share of the expected gain that was measured,
(measured - 1) / (expected - 1). On the CPU backend decode is compute bound rather than bandwidth
bound (docs/perf.md), so the bytes model is an upper bound on the gain, not a prediction.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cell(args, batch, policy):
    cmd = [args.bin, "bench-decode", "--model", args.model, "--batch", str(batch),
           "--context", str(args.context), "--steps", str(args.steps), "--threads", str(args.threads),
           "--kv-policy", policy, "--kv-budget", args.kv_budget, "--json"]
    if policy == "window":
        cmd += ["--kv-window", str(args.kv_window), "--kv-sinks", str(args.kv_sinks)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"dmsrt bench-decode failed ({' '.join(cmd)}):\n{p.stderr}")
    j = json.loads(p.stdout.strip().splitlines()[-1])
    cell = j["cells"][0]
    if not cell["fits"]:
        sys.exit(f"batch {batch} x {args.context} does not fit under policy {policy}: {cell.get('reason')}")
    return j, cell


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin", "dmsrt"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--kv-window", type=int, default=512)
    ap.add_argument("--kv-sinks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-budget", default="4GiB")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    rows, prov = [], None
    for batch in [int(b) for b in args.batch.split(",")]:
        tps = {"none": [], "window": []}
        ratios, held = [], {}
        for _ in range(args.rounds):
            for policy in ("none", "window"):
                j, cell = run_cell(args, batch, policy)
                tps[policy].append(cell["decode_tokens_per_s"])
                held[policy] = cell["kv_bytes_held"]
                weights = j["weight_bytes"]
                prov = j.get("provenance", prov)
            ratios.append(tps["window"][-1] / tps["none"][-1])
        expected = (weights + held["none"]) / (weights + held["window"])
        kv_ratio = held["none"] / held["window"]
        measured = statistics.median(ratios)
        rows.append({"batch": batch, "context": args.context,
                     "none_tokens_per_s": statistics.median(tps["none"]),
                     "window_tokens_per_s": statistics.median(tps["window"]),
                     "none_runs": tps["none"], "window_runs": tps["window"],
                     "measured_speedup": measured, "round_speedups": ratios,
                     "kv_bytes_none": held["none"], "kv_bytes_window": held["window"],
                     "weight_bytes": weights, "attention_bytes_ratio": kv_ratio,
                     "expected_speedup_bytes": expected,
                     "closeness": (measured - 1) / (expected - 1) if expected > 1 else float("nan")})

    if prov:
        print(f"commit {prov['commit']}, {prov['cpu_model']} ({' '.join(prov['cpu_flags'])}; matmul "
              f"{prov['matmul_path']}), {args.threads} threads, {prov['date']}")
    print(f"context {args.context}; window policy keeps {args.kv_window} + {args.kv_sinks} sinks; "
          f"median of {args.rounds} alternating rounds of {args.steps} steps")
    print(f"{'batch':>5} {'none tok/s':>11} {'window tok/s':>13} {'speed-up':>9} {'bytes model':>12} "
          f"{'KV ratio':>9} {'closeness':>10}   KV held none / window, weights")
    for r in rows:
        print(f"{r['batch']:5d} {r['none_tokens_per_s']:11.1f} {r['window_tokens_per_s']:13.1f} "
              f"{r['measured_speedup']:9.2f} {r['expected_speedup_bytes']:12.2f} "
              f"{r['attention_bytes_ratio']:9.2f} {100 * r['closeness']:9.0f}%   "
              f"{r['kv_bytes_none'] / 2**20:.0f} / {r['kv_bytes_window'] / 2**20:.0f} MiB, "
              f"{r['weight_bytes'] / 2**20:.0f} MiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"provenance": prov, "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
