#!/usr/bin/env python3
"""How long `dmsrt plan` takes to simulate the Qwen3-8B best-of-16 workload (prompt 512, 8192
reasoning tokens per thread, p90 <= 120 s) for one simulated hour, on this machine:

  one   one deployment (--replicas R, TP 1, h100-sxm) x eviction rates 0, 0.5, 0.875 at --rate
        jobs/h, --rate jobs (one hour of arrivals); target < 60 s of wall time
  wide  64 GPUs: 8 deployments (TP 1, 2, 4, 8 with 64 / TP replicas, on h100-sxm and h200) x the
        same 3 eviction rates; target < 600 s
  both  both of the above

Each deployment is one `dmsrt plan --replicas` call (three simulations, one per eviction rate),
timed from outside; the per-simulation host seconds and the steps each one simulated come from
its JSON. Prints a table and, with --json, writes it.

    python3 tests/bench/plan_speed.py --binary build/bin/dmsrt --mode both [--step-by-step]
"""
import argparse
import json
import subprocess
import sys
import time

WORKLOAD = ["--model", "qwen3-8b", "--n", "16", "--prompt", "fixed:512", "--reasoning",
            "fixed:8192", "--max-tokens", "16384", "--slo", "p90=120", "--evict", "0,0.5,0.875"]


def run(binary, profile, tp, replicas, rate, jobs, step_by_step):
    cmd = [binary, "plan", *WORKLOAD, "--profile", profile, "--nodes", "8", "--gpus", "8",
           "--tp", str(tp), "--replicas", str(replicas), "--rate", str(rate), "--jobs", str(jobs),
           "--json"]
    if step_by_step:
        cmd.append("--step-by-step")
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    # Exit 1 with JSON means no deployment met the SLO: still a timing.
    try:
        j = json.loads(p.stdout)
    except json.JSONDecodeError:
        sys.exit(f"plan_speed: {' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr}")
    sims = []
    for d in j["deployments"]:
        s = d.get("at_target", {})
        sims.append({"eviction_rate": d["eviction_rate"], "wall_s": s.get("wall_seconds"),
                     "steps": s.get("steps"), "step_calls": s.get("step_calls"),
                     "simulated_s": s.get("simulated_seconds"), "p90_s": s.get("latency_p90_s"),
                     "preemptions": s.get("preemptions"), "complete": s.get("complete")})
    return {"profile": profile, "tp": tp, "replicas": replicas, "gpus": tp * replicas,
            "wall_s": wall, "simulations": sims, "command": " ".join(cmd)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/bin/dmsrt")
    ap.add_argument("--mode", choices=["one", "wide", "both"], default="both")
    ap.add_argument("--rate", type=float, default=1000, help="jobs/h (default 1000)")
    ap.add_argument("--jobs", type=int, default=0, help="jobs per simulation (default: one hour)")
    ap.add_argument("--replicas", type=int, default=34, help="mode one: replicas (default 34)")
    ap.add_argument("--step-by-step", action="store_true", help="no decode spans (for comparison)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    jobs = a.jobs or int(round(a.rate))
    rows = []
    groups = []
    if a.mode in ("one", "both"):
        groups.append(("one", [("h100-sxm", 1, a.replicas)], 60))
    if a.mode in ("wide", "both"):
        groups.append(("wide", [(p, tp, 64 // tp) for p in ("h100-sxm", "h200") for tp in (1, 2, 4, 8)], 600))
    out = {}
    for name, deps, target in groups:
        t0 = time.monotonic()
        for profile, tp, reps in deps:
            r = run(a.binary, profile, tp, reps, a.rate, jobs, a.step_by_step)
            rows.append(r)
            sims = " ".join(f"{s['eviction_rate']}:{s['wall_s']:.1f}s/{s['steps']}st" for s in r["simulations"])
            print(f"{name:5} {profile:9} TP {tp} x {reps:2} = {r['gpus']:2} GPUs: {r['wall_s']:7.1f} s  ({sims})",
                  flush=True)
        total = time.monotonic() - t0
        out[name] = {"wall_s": total, "target_s": target, "met": total < target}
        print(f"{name}: {total:.1f} s for {len(deps)} deployment(s) x 3 eviction rates "
              f"(target < {target} s: {'met' if total < target else 'NOT met'})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"groups": out, "runs": rows, "rate": a.rate, "jobs": jobs,
                       "step_by_step": a.step_by_step}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
