#!/usr/bin/env python3
"""The committed DMS adapter still decides what it decided when it was made.

Runs `dmsrt eval` on the default model WITHOUT --dms-adapter (so the default adapter must be found
beside the model, as the main job finds it) over the first 512 tokens of the held-out text, and
checks that the row is the adapter's, and that its eviction rate and cache CR are within the band
recorded in adapters/README.md. A change that breaks the predictor path (the adapter not found,
the shift, the norm, the bias, the sink rule, the threshold) moves the rate out of the band.

    python3 tests/regression/adapter_rate.py --dmsrt build/bin/dmsrt
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADAPTER = "SmolLM2-135M-Instruct.dms"
# Measured on the first 512 tokens of tests/data/eval/heldout.txt when the adapter was committed
# (adapters/README.md); the band allows for the SIMD paths' different summation orders.
RATE, RATE_BAND = 0.8409, 0.03
CR, CR_BAND = 4.618, 0.05  # relative


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dmsrt", default=os.path.join(ROOT, "build", "bin", "dmsrt"))
    a = p.parse_args()
    if not os.path.exists(os.path.join(ROOT, "adapters", ADAPTER + ".safetensors")):
        print(f"adapter_rate: adapters/{ADAPTER}.safetensors is missing", file=sys.stderr)
        return 1
    env = dict(os.environ)
    env.pop("DMSRT_MODEL", None)  # the default model, so that the default adapter is attached
    cmd = [a.dmsrt, "eval", "--policies", "dms", "--max-tokens", "512", "--context", "448",
           "--no-passkey", "--quiet", "--json", "--threads", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return 1
    rows = [row for row in json.loads(r.stdout)["rows"] if row["kind"] == "dms" and row["protocol"] == "a"]
    if len(rows) != 1 or ADAPTER not in rows[0]["policy"]:
        print(f"adapter_rate: expected one dms row made by {ADAPTER}, got {rows}", file=sys.stderr)
        return 1
    row = rows[0]
    print(f"adapter_rate: {row['policy']}: eviction rate {row['eviction_rate']:.4f} (expected "
          f"{RATE} +- {RATE_BAND}), cache CR {row['cache_cr']:.3f} (expected {CR} +- {100 * CR_BAND:g}%), "
          f"KL {row['kl']:.4f}, perplexity {row['perplexity']:.3f}")
    ok = abs(row["eviction_rate"] - RATE) <= RATE_BAND and abs(row["cache_cr"] / CR - 1) <= CR_BAND
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
