#!/usr/bin/env python3
"""How long `dmsrt eval` takes for one policy, against `dmsrt score` of the same tokens.

`dmsrt eval --kv-policy P` runs a dense pass and one policy pass; each is a teacher-forced pass
like `dmsrt score`, plus the per-position top-k / KL work. The target: eval time <= 2 x score
time x 1.2. Both run on the same token ids (the first --tokens of the held-out corpus, passed as ids), with
the same threads and prefill chunk, alternating, --repeat times; the best time of each is compared.

    python3 tests/bench/eval_bench.py [--bin build/bin/dmsrt] [--tokens 4096] [--threads 2]
        [--repeat 1] [--policy "--kv-policy window --kv-window 1020"] [--json OUT] [--check]

Prints one JSON object; --check exits 1 when the ratio is above 1.2.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(cmd):
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return dt, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("DMSRT_BIN", os.path.join(SOURCE, "build", "bin", "dmsrt")))
    ap.add_argument("--file", default=os.path.join(SOURCE, "tests", "data", "eval", "heldout.txt"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--policy", default="--kv-policy window --kv-window 1020 --kv-sinks 4")
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()

    _, out = timed([a.bin, "tokenize", "--file", a.file, "--no-special"])
    ids = out.split()[: a.tokens]
    if len(ids) < a.tokens:
        sys.exit(f"{a.file} has only {len(ids)} tokens")
    common = ["--threads", str(a.threads), "--prefill-chunk", str(a.prefill_chunk)]
    score_cmd = [a.bin, "score", "--tokens", " ".join(ids), "--json"] + common
    eval_cmd = [a.bin, "eval", "--tokens", " ".join(ids), "--no-passkey", "--quiet",
                "--json"] + shlex.split(a.policy) + common
    score_t, eval_t = [], []
    for _ in range(a.repeat):
        score_t.append(timed(score_cmd)[0])
        dt, out = timed(eval_cmd)
        eval_t.append(dt)
    rows = json.loads(out)["rows"]
    best_score, best_eval = min(score_t), min(eval_t)
    ratio = best_eval / (2 * best_score)
    res = {"tokens": a.tokens, "threads": a.threads, "policy": a.policy,
           "score_seconds": score_t, "eval_seconds": eval_t,
           "dense_pass_seconds": rows[0]["seconds"], "policy_pass_seconds": rows[2]["seconds"],
           "eval_over_two_scores": ratio, "target": 1.2, "ok": ratio <= 1.2}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if a.check and not res["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
