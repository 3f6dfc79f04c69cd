#!/usr/bin/env python3
"""Greedy output pinned token for token, per KV policy, so that a change meant to keep behaviour
(a refactor of the KV store, a backend split) shows any drift at once.

Cases:
  - the default model (SmolLM2-135M Q4_1, CPU) under none, window + sinks, TOVA, H2O and forced,
    with windows of 16-48 tokens over a ~330-token chat prompt and up to 64 generated tokens,
    so every evicting policy evicts;
  - tiny random-weight DMS models (DMS Variant A and Variant B, window 4) under policy dms;
  - the same tiny Variant B model and the default model under forced eviction on the CUDA backend
    (the emulated device: tests/cuda_emulator/), when that binary is built.

The pins were recorded with --record; a deliberate change of behaviour records them again and says
why in its commit. The CPU backend's quantized matmul has one code path per instruction set
(avx512 / avx2 / scalar: kernels/cpu/matmul.cc), and each sums in its own order, so CPU pins hold
for the path they were recorded with (the file names it). On another path the CPU cases are
skipped with that reason; the emulated CUDA cases (plain C++ references) are checked everywhere. Usage:
  greedy_pins.py --dmsrt build/bin/dmsrt [--cuda-emulated build/tests/dmsrt_cuda_emulated]
                 [--record] [--work DIR]
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PINS = pathlib.Path(__file__).with_name("greedy_pins.json")
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# ~300 tokens of public-domain prose (Mark Twain, "Life on the Mississippi", ch. 1).
PROMPT = (
    "The Mississippi is well worth reading about. It is not a commonplace river, but on the "
    "contrary is in all ways remarkable. Considering the Missouri its main branch, it is the "
    "longest river in the world--four thousand three hundred miles. It seems safe to say that it "
    "is also the crookedest river in the world, since in one part of its journey it uses up one "
    "thousand three hundred miles to cover the same ground that the crow would fly over in six "
    "hundred and seventy-five. It discharges three times as much water as the St. Lawrence, "
    "twenty-five times as much as the Rhine, and three hundred and thirty-eight times as much as "
    "the Thames. No other river has so vast a drainage-basin: it draws its water supply from "
    "twenty-eight States and Territories; from Delaware, on the Atlantic seaboard, and from all "
    "the country between that and Idaho on the Pacific slope--a spread of forty-five degrees of "
    "longitude. The Mississippi receives and carries to the Gulf water from fifty-four subordinate "
    "rivers that are navigable by steamboats, and from some hundreds that are navigable by flats "
    "and keels. Summarise the passage above in three sentences, then name the longest river.")

CPU_POLICIES = {
    "none": ["--kv-policy", "none"],
    "window": ["--kv-policy", "window", "--kv-window", "32", "--kv-sinks", "4"],
    "tova": ["--kv-policy", "tova", "--kv-tokens", "48"],
    "h2o": ["--kv-policy", "h2o", "--kv-tokens", "48"],
    "forced": ["--kv-policy", "forced", "--dms-force-rate", "0.5", "--dms-window", "16"],
}
TINY = {
    # name: make_tiny_model.py arguments (HF directories, Variant A on Llama, Variant B on Qwen3)
    "tiny_dms_a": ["--arch", "llama", "--format", "hf", "--seed", "11", "--dms-window", "4",
                   "--dms-variant", "A", "--head-dim", "64", "--hidden", "128", "--heads", "4",
                   "--kv-heads", "2", "--ffn", "192", "--layers", "2"],
    "tiny_dms_b": ["--arch", "qwen3", "--format", "hf", "--seed", "12", "--dms-window", "4",
                   "--dms-variant", "B", "--head-dim", "64", "--hidden", "128", "--heads", "4",
                   "--kv-heads", "2", "--ffn", "192", "--layers", "2"],
}
TINY_PROMPT = "the quick brown fox jumps over the lazy dog " * 6


def generate(binary, model, prompt, extra, max_tokens, chat=True):
    cmd = [str(binary), "generate", "--model", str(model), "--chat" if chat else "--prompt",
           prompt, "--max-tokens",
           str(max_tokens), "--json", "--threads", "2"] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}): {r.stderr[-2000:]}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return {"token_ids": j["token_ids"], "cache_cr": round(j.get("cache_cr", 0.0), 6)}


def matmul_path(binary):
    """The quantized matmul path compiled into `binary` (from `dmsrt bench`'s provenance)."""
    r = subprocess.run([str(binary), "bench", "--model", str(DEFAULT_MODEL), "--prefill", "1",
                        "--decode", "1", "--reps", "1", "--threads", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"dmsrt bench failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["provenance"]["matmul_path"]


def run_cases(a, work, cpu=True):
    out = {}
    if not DEFAULT_MODEL.exists():
        raise RuntimeError(f"{DEFAULT_MODEL} is missing: run launch/setup.sh")
    if cpu:
        for name, extra in CPU_POLICIES.items():
            out[f"cpu/default/{name}"] = generate(a.dmsrt, DEFAULT_MODEL, PROMPT, extra, 64)
    tiny = {}
    for name, margs in TINY.items():
        d = pathlib.Path(work) / name
        subprocess.run([sys.executable, str(ROOT / "tests/fixtures/make_tiny_model.py"), "--out",
                        str(d)] + margs, check=True, capture_output=True)
        tiny[name] = d
        if not cpu:
            continue
        out[f"cpu/{name}/dms"] = generate(a.dmsrt, d, TINY_PROMPT, ["--kv-policy", "dms"], 48,
                                             chat=False)
    if a.cuda_emulated:
        cuda = ["--backend", "cuda", "--kv-budget", "64MiB"]
        out["cuda_emulated/tiny_dms_b/dms"] = generate(
            a.cuda_emulated, tiny["tiny_dms_b"], TINY_PROMPT, cuda + ["--kv-policy", "dms"], 24,
            chat=False)
        out["cuda_emulated/default/forced"] = generate(
            a.cuda_emulated, DEFAULT_MODEL, PROMPT[:400], cuda + CPU_POLICIES["forced"], 8)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dmsrt", required=True)
    ap.add_argument("--cuda-emulated", default="")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--work", default="")
    a = ap.parse_args()
    path = matmul_path(a.dmsrt)
    pins = {} if a.record else json.loads(PINS.read_text())
    cpu = a.record or pins.get("matmul_path") == path
    if not cpu:
        print(f"SKIP cpu cases: the CPU pins were recorded with the {pins.get('matmul_path')} "
              f"matmul path and this binary uses {path} (a different summation order); record "
              f"them on such a machine with --record")
    with tempfile.TemporaryDirectory() as tmp:
        got = run_cases(a, a.work or tmp, cpu=cpu)
    if a.record:
        got["matmul_path"] = path
        PINS.write_text(json.dumps(got, indent=1) + "\n")
        print(f"recorded {len(got) - 1} pins in {PINS} (matmul path {path})")
        return 0
    failed = 0
    for name, g in got.items():
        want = pins.get(name)
        if want is None:
            print(f"MISSING PIN {name} (record it with --record)")
            failed += 1
            continue
        if g["token_ids"] != want["token_ids"]:
            first = next((i for i, (x, y) in enumerate(zip(g["token_ids"], want["token_ids"]))
                          if x != y), min(len(g["token_ids"]), len(want["token_ids"])))
            print(f"DRIFT {name}: first differing token at {first}: got {g['token_ids'][first:first+8]} "
                  f"want {want['token_ids'][first:first+8]}")
            failed += 1
        elif abs(g["cache_cr"] - want["cache_cr"]) > 1e-6:
            print(f"DRIFT {name}: cache CR {g['cache_cr']} != {want['cache_cr']}")
            failed += 1
        else:
            print(f"ok {name}: {len(g['token_ids'])} tokens, cache CR {g['cache_cr']}")
    print(f"greedy pins: {len(got) - failed}/{len(got)} identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
