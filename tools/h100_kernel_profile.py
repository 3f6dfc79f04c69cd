#!/usr/bin/env python3
"""Writes a `dmsrt plan` profile (schema 2, backend cuda) for Qwen3-8B shapes on one H100 from
the kernel figures measured on an NVIDIA H100 80GB HBM3 on 2026-11-23 (docs/perf-gpu-notes.md,
summarised in docs/perf.md), plus the host time of a decode step measured without a GPU
(docs/perf.md, "Resident decode tables"). The end-to-end CUDA backend has never been timed on a
GPU, so the step times below are assembled from parts; every term says where it comes from and
whether it is measured or derived:

  decode step = weights (derived: bf16 matrix weights at the measured copy bandwidth)
              + 36 layers x decode attention per layer (measured, per batch x context)
              + rows x sampling per row (measured 0.30 ms per 64 rows, assumed linear)
              + rows x matrix FLOPs per row at the datasheet bf16 peak (datasheet, unmeasured)
  prefill chunk = weights (derived) + tokens x matrix FLOPs at the datasheet peak
              + 36 layers x causal attention of the chunk at the measured prefill rate
  host floor  = the host's part of a decode step (measured on a 2-core VM with the device
                emulator, forced 0.875 and dms, batch 32 and 256): a step takes the larger of
                device and host time. --no-host leaves it out.

    python3 tools/h100_kernel_profile.py --out launch/plan/profiles/h100-qwen3-8b-kernels.json
    python3 tools/h100_kernel_profile.py --no-host \
        --out launch/plan/profiles/h100-qwen3-8b-kernels-device-only.json
"""
import argparse
import json

NOTES = "docs/perf-gpu-notes.md"
PERF = "docs/perf.md"

# Qwen3-8B shapes (runtime/model/synthetic_model.cc, "qwen3-8b").
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 36, 4096, 32, 8, 128, 12288, 151936

# Measured (NOTES, "Ceilings, same run"): device-to-device copy, bytes read + written.
COPY_BANDWIDTH = 3026e9
# Measured (NOTES, "Decode attention, final version"): one layer, 32/8 heads, head_dim 128, bf16,
# CUDA-event medians: (batch, resident tokens per head, ms).
DECODE_ATTENTION = [
    (1, 1024, 0.0236), (1, 4096, 0.0269), (1, 8192, 0.0347), (1, 16384, 0.0513),
    (1, 32768, 0.0757), (8, 1024, 0.0312), (8, 4096, 0.0697), (8, 8192, 0.1160),
    (8, 16384, 0.2102), (8, 32768, 0.3993), (32, 1024, 0.0738), (32, 4096, 0.2227),
    (32, 8192, 0.4048), (32, 16384, 0.8054), (32, 32768, 1.5858), (64, 1024, 0.1287),
    (64, 4096, 0.4215), (64, 8192, 0.7772), (64, 16384, 1.5184), (64, 32768, 2.9973),
]
# Measured (NOTES, "DMS effect on decode attention time"): forced eviction, resident n = L/8 +
# 512 per head: (batch, L, n, ms).
DECODE_ATTENTION_DMS = [
    (8, 4096, 1024, 0.0312), (8, 8192, 1536, 0.0376), (8, 16384, 2560, 0.0534),
    (8, 32768, 4608, 0.0776), (32, 4096, 1024, 0.0743), (32, 8192, 1536, 0.1019),
    (32, 16384, 2560, 0.1584), (32, 32768, 4608, 0.2552),
]
# Measured (NOTES, "Other kernels"): sampling 64 rows x 151936, 0.30 ms; prefill attention with
# DMS visibility 14.8 TFLOP/s (SIMT kernel, 2048 x 2048 chunk; 4 FLOP per visible pair per channel).
SAMPLING_MS_PER_64_ROWS = 0.30
PREFILL_ATTENTION_FLOPS = 14.8e12
# Datasheet (NVIDIA H100 SXM): dense BF16 tensor-core peak, device memory. Unmeasured.
BF16_PEAK = 989.4e12
DEVICE_MEMORY = 80e9
# Measured (PERF, "Resident decode tables", run 2; 2-core VM, emulator host-only, no GPU):
# host ms of one decode step: (policy, batch, context, ms).
HOST_STEP = [
    ("forced 0.875", 32, 4096, 1.10), ("forced 0.875", 256, 4096, 17.52),
    ("forced 0.875", 32, 32768, 2.12), ("dms", 32, 4096, 1.87), ("dms", 256, 4096, 17.09),
    ("dms", 32, 32768, 1.48),
]


def matrix_params():
    per_layer = (2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * FFN)
    return LAYERS * per_layer + VOCAB * HIDDEN  # as launch/plan/profile.cc MatrixParams


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-host", action="store_true", help="leave the host floor out")
    a = ap.parse_args()
    params = matrix_params()
    weights_s = 2.0 * params / COPY_BANDWIDTH
    row_flops_s = 2.0 * params / BF16_PEAK
    sample_row_s = SAMPLING_MS_PER_64_ROWS / 1e3 / 64
    decode = []
    for batch, ctx, ms in DECODE_ATTENTION:
        decode.append({"batch": batch, "kv_tokens": batch * ctx,
                       "seconds": weights_s + LAYERS * ms / 1e3 + batch * (sample_row_s + row_flops_s),
                       "attention_ms_per_layer": ms, "attention_source": f"{NOTES}: decode attention, batch {batch}, {ctx} slots"})
    for batch, full, n, ms in DECODE_ATTENTION_DMS:
        decode.append({"batch": batch, "kv_tokens": batch * n,
                       "seconds": weights_s + LAYERS * ms / 1e3 + batch * (sample_row_s + row_flops_s),
                       "attention_ms_per_layer": ms,
                       "attention_source": f"{NOTES}: DMS decode attention, batch {batch}, L {full}, resident {n}"})
    prefill = []
    for chunk in (256, 512, 1024, 2048):
        pairs = chunk * (chunk + 1) / 2
        attn_s = LAYERS * 4 * HEAD_DIM * HEADS * pairs / PREFILL_ATTENTION_FLOPS
        prefill.append({"tokens": chunk, "seconds": weights_s + chunk * row_flops_s + attn_s,
                        "attention_s": attn_s})
    terms = {
        "weights_s": {"value": weights_s, "kind": "derived",
                      "how": f"2 x {params:.4g} matrix parameters (bf16) / {COPY_BANDWIDTH:.4g} B/s copy bandwidth; "
                             "the decode matrix kernels were never timed, so this assumes they stream weights at copy bandwidth",
                      "source": f"{NOTES}: Ceilings (copy bandwidth, measured)"},
        "decode_attention": {"kind": "measured", "source": f"{NOTES}: Decode attention, final version; DMS effect",
                             "how": "per-layer CUDA-event medians x 36 layers"},
        "sampling_s_per_row": {"value": sample_row_s, "kind": "measured, per row derived",
                               "source": f"{NOTES}: Other kernels (0.30 ms for 64 rows; linear in rows assumed)"},
        "matrix_flops_s_per_row": {"value": row_flops_s, "kind": "datasheet (unmeasured)",
                                   "how": f"2 x parameters / {BF16_PEAK:.4g} FLOP/s dense bf16 peak"},
        "prefill_attention": {"value": PREFILL_ATTENTION_FLOPS, "kind": "measured (one shape)",
                              "source": f"{NOTES}: Other kernels (SIMT kernel, 2048 x 2048)"},
        "device_memory_bytes": {"value": DEVICE_MEMORY, "kind": "datasheet (80 GB)"},
        "host_step": ({"kind": "measured without a GPU",
                       "source": f"{PERF}: Resident decode tables, run 2 (2-core VM, device emulator in host-only mode)",
                       "caveat": "the host of a GPU machine was not measured; a faster host lowers this floor"}
                      if not a.no_host else {"kind": "left out (--no-host)"}),
        "not_modelled": "all-reduce (TP 1 only), launch gaps between the 657-696 device operations of a step "
                        "(counted, not timed), prefill attention growth with old context beyond the chunk",
    }
    out = {
        "schema_version": 2,
        "model": "qwen3-8b (synthetic shapes)",
        "backend": "cuda",
        "device": "NVIDIA H100 80GB HBM3, kernel figures of 2026-11-23",
        "device_memory_bytes": int(DEVICE_MEMORY),
        "weight_bytes": int(2 * (params + VOCAB * HIDDEN)),
        "partly_derived": True,
        "provenance": {
            "summary": "assembled from H100 kernel figures (measured) and derived terms; end to end never timed"
                       + ("" if not a.no_host else "; host floor left out"),
            "written_by": "tools/h100_kernel_profile.py" + (" --no-host" if a.no_host else ""),
            "terms": terms,
        },
        "step_model": {"decode": decode, "prefill": prefill},
    }
    if not a.no_host:
        out["host_step"] = {"decode": [{"batch": b, "kv_tokens": 0, "seconds": ms / 1e3, "policy": pol,
                                        "context": ctx} for pol, b, ctx, ms in HOST_STEP]}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}: weights {weights_s * 1e3:.2f} ms, sampling {sample_row_s * 1e6:.2f} us/row, "
          f"matrix {row_flops_s * 1e6:.2f} us/row, {len(decode)} decode and {len(prefill)} prefill points"
          + ("" if a.no_host else f", {len(HOST_STEP)} host points"))


if __name__ == "__main__":
    main()
