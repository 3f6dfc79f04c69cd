#!/usr/bin/env python3
"""The committed DMS adapters still decide what they decided when they were made.

Runs `dmsrt eval` on the default model over the first tokens of the held-out text, WITHOUT
--dms-adapter for the default adapter (so it must be found beside the model, as the main job finds
it) and with it for the others, and checks that the row is the adapter's, and that its eviction
rate and cache CR are within the band recorded in adapters/README.md. A change that breaks the
predictor path (the adapter not found, the shift, the norm, the bias, the sink rule, the
threshold, the window) moves the rate out of the band.

    python3 tests/regression/adapter_rate.py --dmsrt build/bin/dmsrt
"""

import argparse
import collections
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# One committed adapter: whether the default model finds it without a flag, the tokens of the
# held-out text it is run on, and its eviction rate and cache CR measured there when it was
# committed (adapters/README.md); the bands allow for the SIMD paths' different summation orders.
Case = collections.namedtuple("Case", "name default tokens rate cr")


RATE_BAND, CR_BAND = 0.03, 0.05  # absolute, relative
CASES = [
    # The default adapter (w = 32), found beside the default model without a flag.
    Case("SmolLM2-135M-Instruct.dms", True, 512, 0.8409, 4.618),
    # The long-context adapter (w = 480): over 1024 tokens its window holds most of them.
    Case("SmolLM2-135M-Instruct.dms-w480", False, 1024, 0.9793, 2.054),
]


def check(dmsrt, case):
    path = os.path.join(ROOT, "adapters", case.name + ".safetensors")
    if not os.path.exists(path):
        print(f"adapter_rate: adapters/{case.name}.safetensors is missing", file=sys.stderr)
        return False
    env = dict(os.environ)
    env.pop("DMSRT_MODEL", None)  # the default model, so that the default adapter is attached
    cmd = [dmsrt, "eval", "--policies", "dms", "--max-tokens", str(case.tokens), "--context",
           str(case.tokens * 7 // 8), "--no-passkey", "--quiet", "--json", "--threads", "2"]
    if not case.default:
        cmd += ["--dms-adapter", path]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return False
    rows = [row for row in json.loads(r.stdout)["rows"] if row["kind"] == "dms" and row["protocol"] == "a"]
    if len(rows) != 1 or case.name not in rows[0]["policy"]:
        print(f"adapter_rate: expected one dms row made by {case.name}, got {rows}", file=sys.stderr)
        return False
    row = rows[0]
    ok = abs(row["eviction_rate"] - case.rate) <= RATE_BAND and abs(row["cache_cr"] / case.cr - 1) <= CR_BAND
    print(f"adapter_rate: {row['policy']} over {case.tokens} tokens: eviction rate "
          f"{row['eviction_rate']:.4f} (expected {case.rate} +- {RATE_BAND}), cache CR "
          f"{row['cache_cr']:.3f} (expected {case.cr} +- {100 * CR_BAND:g}%), KL {row['kl']:.4f}, "
          f"perplexity {row['perplexity']:.3f}: {'ok' if ok else 'OUT OF BAND'}")
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dmsrt", default=os.path.join(ROOT, "build", "bin", "dmsrt"))
    a = p.parse_args()
    results = [check(a.dmsrt, c) for c in CASES]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
