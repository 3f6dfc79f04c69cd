#!/usr/bin/env python3
"""Host time of a CUDA decode step at full model size, on any machine.

Runs `dmsrt bench-decode --backend cuda` linked against the device emulator in host-only mode
(tests/cuda_emulator/emulator.h): device memory is untouched address space and device work is
counted and dropped, so what the step costs is the host's part alone (the KV index's
bookkeeping, building and staging the decode tables, enqueueing). A device cannot hide that
part: it bounds the step from below when the host enqueues while the device runs, which holds
when a step waits for the device only once, at its end. The emulator counts those waits: a
probe (batch 1, steps 2 and 6) prints device operations and host waits per decode step for each
policy. Policy dms runs the synthetic model with Variant-A decisions (qwen3-8b:dms), its context
filled at rate 0.875 like forced.

Prints per (policy, batch, context) the host ms/step next to the device floor for the same
step: (weights + resident K/V) / bandwidth, with the bandwidth given (default: the copy
bandwidth measured on an H100 80GB HBM3, docs/perf.md). With --compare, a second binary runs
the same cells in the same process order, and the table gives the ratio.

  python3 tests/bench/host_step_bench.py [--binary build/tests/dmsrt_cuda_emulated]
      [--compare OTHER_BINARY] [--batch 1,32,256] [--context 4096,32768] [--steps 16] [--repeat 1]
      [--policies none,forced,dms] [--device-mib 81559] [--bandwidth-gbs 3026] [--json]
"""
import argparse
import json
import os
import re
import subprocess
import sys

HEAD_DIM = 128  # qwen3-8b


def bench(binary, policy, args, batch, context, steps):
    """Runs bench-decode host-only; returns (its JSON, device operations, host waits)."""
    env = dict(os.environ, DMSRT_CUDA_EMULATOR_HOST_ONLY="1",
               DMSRT_CUDA_EMULATOR_MIB=str(args.device_mib))
    model, rate = ("qwen3-8b:dms", "--dms-fill-rate") if policy == "dms" else ("qwen3-8b", "--dms-force-rate")
    cmd = [binary, "bench-decode", "--backend", "cuda", "--synthetic", model,
           "--batch", batch, "--context", context, "--steps", str(steps),
           "--kv-policy", policy, rate, "0.875", "--dms-window", "16", "--json"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    m = re.search(r"cuda emulator \(host only\): (\d+) device operations queued, (\d+) host waits",
                  p.stderr)
    if not m:
        sys.exit(f"{binary} did not run on the emulator in host-only mode:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), int(m.group(1)), int(m.group(2))


def run(binary, policy, args):
    return bench(binary, policy, args, args.batch, args.context, args.steps)[0]


def per_step(binary, policy, args):
    """Device operations and host waits per decode step: two runs that differ by 4 steps."""
    context = args.context.split(",")[0]
    _, ops_a, waits_a = bench(binary, policy, args, "1", context, 2)
    _, ops_b, waits_b = bench(binary, policy, args, "1", context, 6)
    return (ops_b - ops_a) / 4, (waits_b - waits_a) / 4


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default="build/tests/dmsrt_cuda_emulated")
    ap.add_argument("--compare", help="a second emulated binary (e.g. an older build)")
    ap.add_argument("--batch", default="1,32,256")
    ap.add_argument("--context", default="4096,32768")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over every policy; each cell reports its fastest round")
    ap.add_argument("--policies", default="none,forced,dms")
    ap.add_argument("--device-mib", type=int, default=81559)  # an H100 80GB
    ap.add_argument("--bandwidth-gbs", type=float, default=3026.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-waits-per-step", type=float,
                    help="exit 1 when a policy's decode step waits for the device more often")
    args = ap.parse_args()

    policies = args.policies.split(",")
    probes = {p: per_step(args.binary, p, args) for p in policies}
    # Rounds over every policy (and binary), so that a noisy spell of a shared machine spreads
    # over all of them; each cell keeps its fastest round.
    runs = {}
    for _ in range(args.repeat):
        for policy in policies:
            for key, binary in (("ours", args.binary), ("peer", args.compare)):
                if binary is None:
                    continue
                j = run(binary, policy, args)
                best = runs.setdefault((policy, key), j)
                for c, b in zip(j["cells"], best["cells"]):
                    if c["fits"] and b["fits"] and c["ms_per_step"] < b["ms_per_step"]:
                        b.update(c)
    rows = []
    for policy in policies:
        ours = runs[(policy, "ours")]
        peer = runs.get((policy, "peer"))
        for i, cell in enumerate(ours["cells"]):
            row = {"policy": policy, "batch": cell["batch"], "context": cell["context"],
                   "fits": cell["fits"]}
            if cell["fits"]:
                kv_read = cell["kv_bytes_held"] * (4 * HEAD_DIM) / (4 * HEAD_DIM + 8)
                floor_ms = 1e3 * (ours["weight_bytes"] + kv_read) / (args.bandwidth_gbs * 1e9)
                row.update(host_ms=cell["ms_per_step"], floor_ms=floor_ms,
                           kv_gib=cell["kv_bytes_held"] / 2**30)
                if peer is not None and peer["cells"][i]["fits"]:
                    row["compare_ms"] = peer["cells"][i]["ms_per_step"]
            rows.append(row)

    if args.json:
        print(json.dumps({"bandwidth_gbs": args.bandwidth_gbs, "steps": args.steps,
                          "repeat": args.repeat, "rows": rows,
                          "per_step": {p: {"device_operations": o, "host_waits": w}
                                       for p, (o, w) in probes.items()}}))
        return
    for policy, (ops, waits) in probes.items():
        print(f"{policy}: {ops:.0f} device operations and {waits:g} host waits per decode step")
    print(f"host time per decode step (fastest of {args.repeat} rounds), qwen3-8b shapes, emulated "
          f"{args.device_mib} MiB device; device floor at {args.bandwidth_gbs:.0f} GB/s")
    head = f"{'policy':>7} {'batch':>6} {'context':>8} {'KV GiB':>8} {'host ms':>9} {'floor ms':>9} {'host/floor':>10}"
    if args.compare:
        head += f" {'compare ms':>11} {'speed-up':>9}"
    print(head)
    for r in rows:
        if not r["fits"]:
            print(f"{r['policy']:>7} {r['batch']:>6} {r['context']:>8} {'does not fit':>30}")
            continue
        line = (f"{r['policy']:>7} {r['batch']:>6} {r['context']:>8} {r['kv_gib']:>8.2f} "
                f"{r['host_ms']:>9.2f} {r['floor_ms']:>9.2f} {r['host_ms'] / r['floor_ms']:>10.2f}")
        if "compare_ms" in r:
            line += f" {r['compare_ms']:>11.2f} {r['compare_ms'] / r['host_ms']:>8.2f}x"
        print(line)
    if args.max_waits_per_step is not None:
        over = [p for p, (_, w) in probes.items() if w > args.max_waits_per_step]
        if over:
            sys.exit(f"decode steps of policy {', '.join(over)} wait for the device more than "
                     f"{args.max_waits_per_step:g} times")


if __name__ == "__main__":
    main()
