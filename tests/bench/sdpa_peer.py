#!/usr/bin/env python3
"""Peer figure for the decode-attention benchmark: PyTorch scaled_dot_product_attention on the
same dense shapes (one query token, 32 heads over 8 KV heads, head_dim 128, bf16), timed with
CUDA events, L2 flushed before every repetition (a 256 MiB write), median and spread.

Bytes counted as in gpu_attention_bench: K and V read once, batch * kv_heads * len * 128 * 2 * 2.
Usage: sdpa_peer.py [--json PATH] [--quick]
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, reps, flush):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        flush.zero_()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    out.sort()
    return out[len(out) // 2], out[0], out[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sdpa_peer: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    heads, kv, dim = 32, 8, 128
    batches = [1, 16] if args.quick else [1, 8, 32, 64]
    lens = [1024, 8192] if args.quick else [1024, 4096, 8192, 16384, 32768]
    reps = 5 if args.quick else 15
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'batch':>6} {'len':>7} {'median_ms':>10} {'min_ms':>10} {'max_ms':>10} {'GB/s':>9}")
    for b in batches:
        for L in lens:
            q = torch.randn(b, heads, 1, dim, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, kv, L, dim, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, kv, L, dim, device=dev, dtype=torch.bfloat16)
            fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            med, lo, hi = time_ms(fn, reps, flush)
            gbps = b * kv * L * dim * 2 * 2 / (med * 1e-3) / 1e9
            print(f"{b:>6} {L:>7} {med:>10.4f} {lo:>10.4f} {hi:>10.4f} {gbps:>9.1f}")
            rows.append({"batch": b, "len": L, "median_ms": med, "min_ms": lo, "max_ms": hi,
                         "gbps": gbps})
            del q, k, v
    peak = torch.cuda.max_memory_allocated()
    print(f"torch peak memory allocated: {peak / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                       "sdpa": rows, "peak_bytes": peak}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
