#!/usr/bin/env python3
"""`dmsrt plan` on the command line: a datasheet run whose JSON has the promised fields, and clear
errors (a message, a non-zero exit, no crash) for a profile missing a field, a negative rate, an
SLO no deployment meets (an answer with the closest miss) and a model that fits nowhere; a job
trace written by tests/bench/loadgen.py simulated by --trace (and a bad trace refused); a serve
step log checked against a profile by --check-steps; a simulated run's own step log (--step-log)
that --check-steps predicts exactly and whose timeline matches the run's. One case per ctest
(label unit), seconds each:

    plan_cli_test.py BIN CASE   CASE: datasheet | bad_profile | negative_rate | no_slo | no_fit |
                                      trace | check_steps | step_log
"""
import json
import os
import subprocess
import sys
import tempfile

# A small workload on Qwen3-8B shapes: fast to simulate.
BASE = ["plan", "--model", "qwen3-8b", "--gpus", "2", "--n", "4", "--prompt", "fixed:256",
        "--reasoning", "uniform:256:768", "--max-tokens", "1024", "--jobs", "30",
        "--search-steps", "3"]


def run(bin_, *args):
    p = subprocess.run([bin_, *BASE, *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def expect_error(rc, err, needle, code=1):
    assert rc == code, f"exit code {rc}, wanted {code}\n{err}"
    assert err.startswith("dmsrt plan"), f"no clear message: {err!r}"
    assert needle in err, f"{needle!r} not in {err!r}"


def cpu_profile(tmp):
    """A small measured (CPU) profile."""
    p = os.path.join(tmp, "cpu.json")
    json.dump({"schema_version": 2, "model": "m.gguf", "weight_bytes": 100 << 20,
               "provenance": {"cpu_model": "test"},
               "step_model": {"decode": [{"batch": 1, "kv_tokens": 64, "seconds": 0.02},
                                         {"batch": 4, "kv_tokens": 4096, "seconds": 0.03},
                                         {"batch": 16, "kv_tokens": 1024, "seconds": 0.05}],
                              "prefill": [{"tokens": 16, "seconds": 0.03},
                                          {"tokens": 256, "seconds": 0.2}]}}, open(p, "w"))
    return p


def main():
    bin_, case = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        if case == "datasheet":
            out, svg = os.path.join(tmp, "plan.json"), os.path.join(tmp, "plan.svg")
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--tp", "1,2", "--evict", "0,0.875",
                             "--slo", "p90=60", "--rate", "2000", "--out", out, "--svg", svg)
            assert rc == 0, f"rc {rc}\n{so}\n{se}"
            assert "UNMEASURED" in so, so
            j = json.load(open(out))
            assert j["provenance"]["measured"] is False
            assert len(j["deployments"]) == 4, j["deployments"]
            for d in j["deployments"]:
                for k in ("gpus", "replicas", "capacity_jobs_per_hour_per_replica", "binding",
                          "memory", "step_model", "at_capacity", "gpu_hours_per_1000_jobs"):
                    assert k in d, k
                assert d["runnable"] == (d["tp"] == 1), d
            assert j["winner"] >= 0 and j["answer"], j["answer"]
            gpus = [d["gpus"] for d in j["deployments"]]
            assert gpus == sorted(gpus), gpus
            assert open(svg).read().startswith("<svg") or "<svg" in open(svg).read()
        elif case == "bad_profile":
            p = os.path.join(tmp, "p.json")
            json.dump({"schema_version": 2, "model": "m", "weight_bytes": 1, "provenance": {}}, open(p, "w"))
            rc, so, se = run(bin_, "--profile", p)
            expect_error(rc, se, "'step_model'")
        elif case == "negative_rate":
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--rate", "-5")
            expect_error(rc, se, "--rate", code=2)
        elif case == "no_slo":
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--slo", "p90=0.01")
            expect_error(rc, se, "closest miss")
        elif case == "no_fit":
            # A measured (CPU) profile and a KV budget far below one thread's need.
            p = cpu_profile(tmp)
            rc, so, se = run(bin_, "--profile", p, "--kv-budget", "1MiB")
            expect_error(rc, se, "fit no deployment")
        elif case == "check_steps":
            # Steps as `serve --step-log` writes them, against the measured profile.
            p, log = cpu_profile(tmp), os.path.join(tmp, "steps.csv")
            open(log, "w").write("decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,seconds\n"
                                 "4,0,400,4,0,0.031\n0,256,0,1,0,0.21\n")
            rc, so, se = run(bin_, "--profile", p, "--check-steps", log, "--json")
            assert rc == 0, f"rc {rc}\n{se}"
            j = json.loads(so)
            assert j["all"]["steps"] == 2 and set(j["groups"]) == {"decode 1-4", "prefill only"}, j
            assert abs(j["all"]["measured_s"] - 0.241) < 1e-9 and j["all"]["predicted_s"] > 0, j
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--check-steps", log)
            expect_error(rc, se, "datasheet")
            open(log, "a").write("x,0,0,0,0,0.1\n4,0,400,4,0,0.031\n")
            rc, so, se = run(bin_, "--profile", p, "--check-steps", log)
            expect_error(rc, se, "steps.csv:4")
        elif case == "trace":
            # The shared job stream: loadgen writes the jobs it would submit, plan simulates them.
            trace = os.path.join(tmp, "jobs.trace")
            lg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "loadgen.py")
            subprocess.run([sys.executable, lg, "--rate", "3000", "--jobs", "24", "--n", "4",
                            "--prompt", "uniform:100:300", "--reasoning", "uniform:256:768",
                            "--max-tokens", "1024", "--write-trace", trace, "--dry-run"], check=True,
                           capture_output=True)
            rows = [l.split() for l in open(trace) if l.strip() and not l.startswith("#")]
            assert len(rows) == 24 and all(len(r) == 3 for r in rows), rows
            out = os.path.join(tmp, "plan.json")
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--replicas", "1", "--evict", "0",
                             "--trace", trace, "--out", out)
            assert rc in (0, 1), f"rc {rc}\n{se}"
            j = json.load(open(out))
            at = j["deployments"][0]["at_target"]
            assert at["jobs"] == 24, at
            # Job by job: one finish time per trace line, none before its arrival.
            done = at["job_done_s"]
            assert len(done) == 24, done
            assert all(d is None or d > float(r[0]) for d, r in zip(done, rows)), (done, rows)
            # The rate reported is the trace's own.
            want = 24 * 3600 / float(rows[-1][0])
            assert abs(j["workload"]["target_jobs_per_hour"] - want) < 1e-6 * want, j["workload"]
            bad = os.path.join(tmp, "bad.trace")
            open(bad, "w").write("1 10 10\n0.5 10 10\n")
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--replicas", "1", "--trace", bad)
            expect_error(rc, se, "line 2")
            rc, so, se = run(bin_, "--profile", "h100-sxm", "--trace", trace)
            expect_error(rc, se, "--replicas")
        elif case == "step_log":
            # The simulated steps of a trace, written as serve writes its own: --check-steps on the
            # same profile predicts each exactly, and end_s is the run's clock.
            p = cpu_profile(tmp)
            trace, log, out = (os.path.join(tmp, f) for f in ("jobs.trace", "sim_steps.csv", "plan.json"))
            open(trace, "w").write("".join(f"{0.5 + 0.7 * i:.3f} {16 + 8 * (i % 3)} {20 + 10 * (i % 4)}\n"
                                           for i in range(12)))
            cpu = ["--profile", p, "--kv-budget", "64MiB", "--replicas", "1", "--trace", trace]
            rc, so, se = run(bin_, *cpu, "--evict", "0.5", "--dms-window", "16", "--step-log", log,
                             "--out", out)
            assert rc in (0, 1), f"rc {rc}\n{se}"
            at = json.load(open(out))["deployments"][0]["at_target"]
            lines = open(log).read().split("\n")
            assert lines[0] == "decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,seconds,end_s", lines[0]
            steps = [[float(x) for x in l.split(",")] for l in lines[1:] if l]
            assert len(steps) == at["steps"], (len(steps), at["steps"])
            ends = [s[6] for s in steps]
            assert ends == sorted(ends) and ends[0] > 0.5, ends[:3]
            assert abs(ends[-1] - at["simulated_seconds"]) < 1e-5, (ends[-1], at["simulated_seconds"])
            assert abs(max(d for d in at["job_done_s"]) - ends[-1]) < 1e-5, at["job_done_s"]
            busy = sum(s[5] for s in steps)
            parts = sum(at["step_seconds"].values())
            assert abs(busy - parts) < 1e-4 * parts, (busy, at["step_seconds"])
            rc, so, se = run(bin_, "--profile", p, "--check-steps", log, "--json")
            assert rc == 0, f"rc {rc}\n{se}"
            a = json.loads(so)["all"]
            assert a["steps"] == len(steps) and abs(a["measured_s"] / a["predicted_s"] - 1) < 1e-4, a
            # A speed trace of one factor is --step-scale; a bad one is refused with its line.
            speed = os.path.join(tmp, "speed.txt")
            open(speed, "w").write("# from factor\n0 1.5\n")
            p90 = []
            for extra in (["--step-scale-trace", speed], ["--step-scale", "1.5"]):
                rc, so, se = run(bin_, *cpu, "--evict", "0.5", "--dms-window", "16", "--json", *extra)
                assert rc in (0, 1), f"rc {rc}\n{se}"
                p90.append(json.loads(so)["deployments"][0]["at_target"]["latency_p90_s"])
            assert abs(p90[0] - p90[1]) < 1e-5, p90
            open(speed, "w").write("0 1.5\n5 0\n")
            rc, so, se = run(bin_, *cpu, "--step-scale-trace", speed)
            expect_error(rc, se, "speed.txt line 2")
            # One deployment only, and only a predicted one.
            rc, so, se = run(bin_, *cpu, "--evict", "0,0.5", "--step-log", log)
            expect_error(rc, se, "--step-log")
            rc, so, se = run(bin_, "--profile", p, "--kv-budget", "64MiB", "--step-log", log)
            expect_error(rc, se, "--step-log")
        else:
            raise SystemExit(f"unknown case {case}")
    print(f"{case}: ok")


if __name__ == "__main__":
    main()
