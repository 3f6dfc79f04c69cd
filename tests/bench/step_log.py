#!/usr/bin/env python3
"""A real run's engine steps against the capacity planner's step-time model.

`dmsrt serve --step-log FILE` appends one CSV line per engine step (decode rows, prefill tokens,
the decode rows' KV tokens, sampled rows, retries, seconds). This reads such logs and a profile
(`dmsrt bench --out`), predicts each step as `dmsrt plan` does (launch/plan/profile.cc,
StepCosts::Seconds: the fitted decode terms, the measured prefill curve, the sampling term) and
prints measured against predicted time by kind of step (decode only, by batch; prefill only;
mixed), so that the terms the model gets wrong show up.

  python3 tests/bench/step_log.py --profile cpu.json run_0.csv [run_1.csv ...] [--json out.json]
"""
import argparse
import csv
import json
import sys


def prefill_seconds(tokens, with_decode, fit, curve):
    """StepCosts::PrefillSeconds."""
    if tokens <= 0:
        return 0.0
    if not curve:
        return (0.0 if with_decode else fit["prefill_fixed_s"]) + fit["per_prefill_token_s"] * tokens
    if len(curve) == 1 or tokens <= curve[0][0]:
        return curve[0][1] * tokens / curve[0][0]
    i = 1
    while i + 1 < len(curve) and curve[i][0] < tokens:
        i += 1
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return max(0.0, y0 + (y1 - y0) / (x1 - x0) * (tokens - x0))


def predict(step, fit, curve):
    """StepCosts::Seconds for a CPU profile (no host floor)."""
    rows, pre = step["decode_rows"], step["prefill_tokens"]
    s = 0.0
    if rows > 0:
        s += fit["fixed_s"] + fit["per_decode_row_s"] * rows + fit["per_kv_token_s"] * step["kv_tokens"]
    s += prefill_seconds(pre, rows > 0, fit, curve)
    return s + fit["per_sampled_row_s"] * step["sampled_rows"]


def kind(step):
    rows, pre = step["decode_rows"], step["prefill_tokens"]
    if pre == 0:
        for lo, hi in ((1, 4), (5, 8), (9, 16), (17, 32)):
            if lo <= rows <= hi:
                return f"decode {lo}-{hi}"
        return "decode >32"
    return "prefill only" if rows == 0 else "mixed"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="CSV files written by serve --step-log")
    ap.add_argument("--profile", required=True, help="the profile the prediction uses")
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args()
    sm = json.load(open(a.profile))["step_model"]
    fit = sm["fit"]
    curve = sorted((p["tokens"], p["mean"]) for p in sm.get("prefill", []))
    groups = {}
    for path in a.logs:
        with open(path) as f:
            for r in csv.DictReader(f):
                if r["decode_rows"] == "decode_rows" or r.get("seconds") in (None, ""):
                    continue  # a header repeated by a later serve, or a line still being written
                step = {k: int(r[k]) for k in ("decode_rows", "prefill_tokens", "kv_tokens", "sampled_rows",
                                               "retries")}
                step["seconds"] = float(r["seconds"])
                g = groups.setdefault(kind(step), {"steps": 0, "measured_s": 0.0, "predicted_s": 0.0})
                g["steps"] += 1
                g["measured_s"] += step["seconds"]
                g["predicted_s"] += predict(step, fit, curve)
    if not groups:
        print("step_log: no steps in the logs", file=sys.stderr)
        return 1
    order = ["decode 1-4", "decode 5-8", "decode 9-16", "decode 17-32", "decode >32", "prefill only", "mixed"]
    total = {"steps": 0, "measured_s": 0.0, "predicted_s": 0.0}
    print(f"{'steps':<14} {'count':>6} {'measured s':>11} {'predicted s':>12} {'measured/predicted':>19}")
    for k in [k for k in order if k in groups]:
        g = groups[k]
        for f in total:
            total[f] += g[f]
        print(f"{k:<14} {g['steps']:>6} {g['measured_s']:>11.2f} {g['predicted_s']:>12.2f} "
              f"{g['measured_s'] / g['predicted_s']:>19.3f}")
    print(f"{'all':<14} {total['steps']:>6} {total['measured_s']:>11.2f} {total['predicted_s']:>12.2f} "
          f"{total['measured_s'] / total['predicted_s']:>19.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"profile": a.profile, "logs": a.logs, "groups": groups, "all": total}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
