#!/usr/bin/env python3
"""`dmsrt eval` on the command line: clear errors (non-zero exit, a message, no crash) and a tiny
run on the default model. One case per ctest (label unit):

    eval_cli_test.py BIN CASE      CASE: corrupt_model | empty_corpus | too_long | tiny_run |
                                         threshold_rate | passkey_prompts

Exit 77 (ctest SKIP_RETURN_CODE) when the case needs the default model and it is not installed.
"""
import json
import os
import subprocess
import sys
import tempfile

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(SOURCE, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def run(bin_, *args):
    p = subprocess.run([bin_, "eval", *args, "--threads", "2", "--quiet"], capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def expect_error(rc, err, needle):
    assert 0 < rc < 128, f"exit code {rc} (wanted an error exit, not success or a signal)\n{err}"
    assert err.startswith("dmsrt eval: "), f"no clear message: {err!r}"
    assert needle in err, f"{needle!r} not in {err!r}"


def need_model():
    if not os.path.exists(MODEL):
        print(f"skipped: {MODEL} not installed (launch/setup.sh)")
        sys.exit(77)


def main():
    bin_, case = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        if case == "corrupt_model":
            bad = os.path.join(tmp, "bad.gguf")
            with open(bad, "wb") as f:
                f.write(b"GGUF" + os.urandom(4000))
            rc, _, err = run(bin_, "--model", bad, "--text", "hello there", "--no-passkey")
            expect_error(rc, err, "")
        elif case == "empty_corpus":
            need_model()
            empty = os.path.join(tmp, "empty.txt")
            open(empty, "w").close()
            rc, _, err = run(bin_, "--file", empty, "--no-passkey")
            expect_error(rc, err, "has 0 tokens")
        elif case == "too_long":
            need_model()
            rc, _, err = run(bin_, "--text", "a b c d", "--passkey-lengths", "1000000")
            expect_error(rc, err, "longer than the model's context")
        elif case == "tiny_run":
            need_model()
            svg = os.path.join(tmp, "q.svg")
            text = open(os.path.join(SOURCE, "tests", "data", "eval", "heldout.txt")).read()
            rc, out, err = run(bin_, "--text", text, "--max-tokens", "96", "--context", "64",
                               "--policies", "window:w=16,s=4;tova:t=20",
                               "--passkey-lengths", "200", "--passkey-depths", "0.5",
                               "--json", "--svg", svg, "--prefill-chunk", "32")
            assert rc == 0, err
            j = json.loads(out)
            rows = j["rows"]
            assert len(rows) == 6, rows
            assert j["length"] == 96 and j["context"] == 64
            dense = [r for r in rows if r["kind"] == "none" and r["protocol"] == "a"][0]
            assert dense["kl"] == 0 and dense["top1_agreement"] == 1, dense
            win = [r for r in rows if r["kind"] == "window" and r["protocol"] == "a"][0]
            assert abs(win["cache_cr"] - 96 / 20) < 1e-9, win
            assert win["kl"] > 0 and 0 <= win["top1_agreement"] < 1, win
            assert len(j["passkey"]) == 3 and all(p["length"] == 200 for p in j["passkey"])
            assert open(svg).read().rstrip().endswith("</svg>")
        elif case == "threshold_rate":
            # A threshold given as a rate is calibrated on the calibration text, never the
            # evaluated one, and runs as a DMS policy with its delay window.
            need_model()
            calib = os.path.join(tmp, "calib.txt")
            with open(calib, "w") as f:
                f.write(open(os.path.join(SOURCE, "tests", "data", "eval", "calibration.txt")).read()[:2000])
            text = open(os.path.join(SOURCE, "tests", "data", "eval", "heldout.txt")).read()
            rc, out, err = run(bin_, "--text", text, "--max-tokens", "128", "--context", "96",
                               "--policies", "threshold:rate=0.6,w=8", "--calibration", calib,
                               "--no-passkey", "--json", "--prefill-chunk", "32")
            assert rc == 0, err
            rows = [r for r in json.loads(out)["rows"] if r["kind"] == "threshold"]
            assert len(rows) == 2, rows
            a = [r for r in rows if r["protocol"] == "a"][0]
            assert a["policy"].startswith("threshold t=-") and a["policy"].endswith("w=8 rate=0.6"), a
            # w = 8 over 128 tokens: the flagged share leaves; a rate of 0.6 on other text evicts
            # a real share here too.
            assert 0.2 < a["eviction_rate"] < 0.9 and a["cache_cr"] > 1.2, a
            assert a["kl"] > 0, a
            rc, _, err = run(bin_, "--text", text, "--max-tokens", "64", "--policies",
                             "threshold:rate=0.6,w=8", "--calibration",
                             os.path.join(tmp, "missing.txt"), "--no-passkey")
            expect_error(rc, err, "cannot read")
        elif case == "passkey_prompts":
            need_model()
            out_path = os.path.join(tmp, "prompts.json")
            rc, _, err = run(bin_, "--passkey-lengths", "200,300", "--passkey-depths", "0.1,0.9",
                             "--write-passkey-prompts", out_path)
            assert rc == 0, err
            j = json.load(open(out_path))
            ps = j["prompts"]
            assert [(p["length"], p["depth"]) for p in ps] == \
                [(200, 0.1), (200, 0.9), (300, 0.1), (300, 0.9)], ps
            assert j["max_new_tokens"] == j["digits"] + 5
            for p in ps:
                assert len(p["tokens"]) == p["length"]
                assert 0 < p["needle_token"] < p["question_token"] < p["length"], p
                d = subprocess.run([bin_, "tokenize", "--decode",
                                    " ".join(map(str, p["tokens"][p["needle_token"]:p["question_token"]]))],
                                   capture_output=True, text=True)
                assert d.returncode == 0, d.stderr
                assert d.stdout.startswith(f" The pass key is {p['key']}."), d.stdout[:80]
        else:
            print(f"unknown case {case}")
            return 2
    print(f"{case}: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
