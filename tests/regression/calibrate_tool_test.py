#!/usr/bin/env python3
"""tools/calibrate_dms.py from its cached dense runs to the adapter file, without the model.

The dense runs are the tool's slow half (minutes on the real model); its `--cache` file holds
their features and targets. This test writes such a cache from a synthetic linear problem whose
answer is known (2 layers, 2 KV heads, 16 features, targets = a linear map of the features plus
noise, several runs), then runs the tool's fit, thresholds and writer on it and checks:

- one file per --rate, whose tensors have the Variant B names and shapes and whose metadata
  states the window, the sinks and the calibration hash;
- the runtime's formula (100 * (W . n + b) - 5 > 0 flags) applied to the stored tensors flags the
  asked share of the calibration rows, and keeps the rows whose true target is largest (the fit
  recovers the planted map);
- --floor-quantile keeps mostly the same rows on such a problem, and bad input is refused.

    python3 tests/regression/calibrate_tool_test.py
"""

import hashlib
import os
import sys
import tempfile
import unittest

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import calibrate_dms  # noqa: E402

LAYERS, HEADS, DIM, RUNS, RUN_LEN = 2, 2, 16, 10, 300
WINDOW, CHUNK = 8, 64


def make_cache(tmp, texts, seed=0):
    """A cache file as calibrate_dms writes it, for `texts` (whose hash keys it)."""
    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    for t in texts:
        with open(t, "rb") as f:
            h.update(f.read())
    n = RUNS * RUN_LEN
    arrays, truth = {}, []
    for i in range(LAYERS):
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        w = rng.standard_normal((DIM, HEADS))
        y = (x @ w + 0.3 * rng.standard_normal((n, HEADS)) - 4.0).astype(np.float32)
        arrays[f"x{i}"], arrays[f"y{i}"], arrays[f"g{i}"] = x, y, np.ones(DIM, np.float32)
        truth.append(x @ w)
    chunk_id = np.repeat(np.arange(RUNS), RUN_LEN)
    valid = np.tile(np.arange(RUN_LEN) + WINDOW + 1 <= RUN_LEN - 1, RUNS)
    path = os.path.join(tmp, "cache.npz")
    np.savez(path, key=f"{h.hexdigest()}:future:{WINDOW}:{CHUNK}", n_layers=LAYERS, valid=valid,
             chunk_id=chunk_id, n_tokens=n, **arrays)
    return path, arrays, truth, h.hexdigest()


def runtime_flags(tensors, layer, x):
    """The runtime's decision for feature rows x (rmsnorm already applied, as the cache holds)."""
    g = tensors[f"model.layers.{layer}.self_attn.dms_proj_alpha_norm.weight"]
    return calibrate_dms.runtime_flags(tensors, layer, x * g)


class CalibrateToolTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.texts = []
        for k in range(2):
            p = os.path.join(self.tmp.name, f"t{k}.txt")
            with open(p, "w") as f:
                f.write(f"calibration text {k}\n")
            self.texts.append(p)
        self.cache, self.arrays, self.truth, self.sha = make_cache(self.tmp.name, self.texts)

    def tearDown(self):
        self.tmp.cleanup()

    def run_tool(self, *extra, rates=("0.5", "0.8")):
        out = os.path.join(self.tmp.name, "a_{rate}.safetensors")
        argv = ["--text", *self.texts, "--window", str(WINDOW), "--chunk", str(CHUNK), "--cache",
                self.cache, "--sinks", "2", "--rate", *rates, "--out", out, *extra]
        self.assertEqual(calibrate_dms.main(argv), 0)
        return [out.replace("{rate}", r) for r in rates]

    def test_files_flag_the_asked_share_and_keep_the_largest_targets(self):
        from safetensors import safe_open
        from safetensors.numpy import load_file
        for path, rate in zip(self.run_tool(), (0.5, 0.8)):
            t = load_file(path)
            self.assertEqual(len(t), 3 * LAYERS)
            meta = safe_open(path, "np").metadata()
            self.assertEqual(meta["dms_window_size"], str(WINDOW))
            self.assertEqual(meta["dms_sink_tokens"], "2")
            self.assertEqual(meta["calibration_sha256"], self.sha)
            flagged, kept_truth, all_truth = [], [], []
            for i in range(LAYERS):
                self.assertEqual(t[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"].shape, (HEADS, DIM))
                self.assertEqual(t[f"model.layers.{i}.self_attn.dms_proj_alpha.bias"].shape, (HEADS,))
                f = runtime_flags(t, i, self.arrays[f"x{i}"])
                flagged.append(f)
                kept_truth.append(self.truth[i][~f])
                all_truth.append(self.truth[i])
            share = float(np.mean(np.concatenate([f.ravel() for f in flagged])))
            self.assertAlmostEqual(share, rate, delta=0.02)
            # The kept rows are the planted map's high end: their mean true score is well above
            # the mean of all rows (by a margin that random flags at this rate would not give).
            kept = np.concatenate([k.ravel() for k in kept_truth]).mean()
            allm = np.concatenate([a.ravel() for a in all_truth]).mean()
            std = np.concatenate([a.ravel() for a in all_truth]).std()
            self.assertGreater(kept - allm, 0.6 * std)

    def test_floor_quantile_fits_and_keeps_the_order_of_the_top(self):
        from safetensors.numpy import load_file
        plain = load_file(self.run_tool(rates=("0.9",))[0])
        floored = load_file(self.run_tool("--floor-quantile", "0.5", rates=("0.9",))[0])
        for i in range(LAYERS):
            a = runtime_flags(plain, i, self.arrays[f"x{i}"])
            b = runtime_flags(floored, i, self.arrays[f"x{i}"])
            # Both keep about the top tenth of the same linear scores: mostly the same rows.
            both_kept = np.mean(~a & ~b) / max(np.mean(~a), 1e-9)
            self.assertGreater(both_kept, 0.7)

    def test_bad_input_is_refused(self):
        with self.assertRaises(SystemExit) as e:
            self.run_tool("--floor-quantile", "1.0")
        self.assertIn("--floor-quantile", str(e.exception))
        with self.assertRaises(SystemExit) as e:
            calibrate_dms.main(["--rate", "1.5", "--out", os.path.join(self.tmp.name, "x.safetensors")])
        self.assertIn("--rate", str(e.exception))
        heldout = os.path.join(ROOT, "tests", "data", "eval", "heldout.txt")
        with self.assertRaises(SystemExit) as e:
            calibrate_dms.main(["--text", heldout, "--rate", "0.5", "--out",
                                os.path.join(self.tmp.name, "x.safetensors")])
        self.assertIn("held-out", str(e.exception))
        # A cache made for other settings (here another window) is refused, not silently reused.
        with self.assertRaises(SystemExit) as e:
            calibrate_dms.main(["--text", *self.texts, "--window", "16", "--chunk", str(CHUNK),
                                "--cache", self.cache, "--rate", "0.5", "--out",
                                os.path.join(self.tmp.name, "x.safetensors")])
        self.assertIn("other settings", str(e.exception))


if __name__ == "__main__":
    unittest.main()
