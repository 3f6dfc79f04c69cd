#!/usr/bin/env python3
"""`dmsrt plan` against real runs: for each scenario (threads per job N, eviction rate, prompt and
reasoning lengths, arrival rate) the script writes one job trace (tests/bench/loadgen.py
--write-trace), predicts it with `dmsrt plan --replicas 1 --trace` on a CPU profile measured here
(`dmsrt bench --out`), then runs a real `dmsrt serve` (CPU, the same KV budget and policy: `none`,
or `forced` at the scenario's rate) and replays the same trace with loadgen, --runs times, a fresh
serve each time. It prints predicted against measured sustained jobs/h and job latency
p50/p90/p99: the mean of the runs, their spread (min..max) and the error of the prediction against
the mean, with the verdicts throughput within 10 % and p90 within 20 %. Exit 0 unless something
failed to run (the verdicts are reported, not enforced; --check enforces them).

The arrival rate of a scenario is `load` x the capacity the planner finds for it (an SLO of 3x its
unloaded p90), so the scenarios load this machine alike whatever its speed; a scenario may give a
rate in jobs/h instead.

    python3 tests/bench/plan_validation.py --binary build/bin/dmsrt --runs 3 --json out.json
    python3 tests/bench/plan_validation.py --smoke          # one tiny scenario, one run (CI)

With --profile-each-run the script measures a profile just before each scenario, which sets
its rate, trace and first prediction, and a fresh one just before every real run, which predicts
that run: the prediction of a scenario is then the mean of its runs' predictions. This VM's
speed drifts by up to 1.7x within an hour, so a profile taken once at the start can be off by
more than the planner's own error by the time a scenario runs; the JSON keeps both predictions
(from the scenario's profile and from the runs' own).

With --step-log each run is also replayed after the fact at the speed serve's steps had during
it (`dmsrt plan --step-scale-trace`, factors per 10 s window from the run's step log): not a
prediction, but it tells the planner's own error from this machine's moving speed.

Writes its files (profile, traces, plans, loadgen reports, serve logs) under --workdir.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
LOADGEN = os.path.join(HERE, "loadgen.py")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# name, N, eviction rate (0: dense), DMS window, prompt, reasoning, KV budget, load (x capacity)
SCENARIOS = [
    dict(name="n4_dense", n=4, evict=0.0, prompt="fixed:32", reasoning="uniform:16:48", kv="128MiB", load=0.6),
    dict(name="n4_forced875", n=4, evict=0.875, window=16, prompt="fixed:32", reasoning="uniform:32:96",
         kv="128MiB", load=0.6),
    dict(name="n8_dense", n=8, evict=0.0, prompt="uniform:16:64", reasoning="uniform:16:48", kv="128MiB", load=0.7),
    dict(name="n8_forced5", n=8, evict=0.5, window=16, prompt="uniform:16:64", reasoning="uniform:16:48",
         kv="128MiB", load=0.7),
    dict(name="n2_long_prompt", n=2, evict=0.0, prompt="fixed:384", reasoning="fixed:16", kv="128MiB", rate=1200.0),
    dict(name="n16_forced875_tight", n=16, evict=0.875, window=16, prompt="fixed:32", reasoning="uniform:24:48",
         kv="16MiB", load=0.8, jobs=40),
    dict(name="n4_dense_overload", n=4, evict=0.0, prompt="fixed:32", reasoning="uniform:16:48", kv="128MiB",
         load=1.3),
]
SMOKE = [dict(name="smoke_n2_dense", n=2, evict=0.0, prompt="fixed:16", reasoning="fixed:12", kv="64MiB",
              rate=1200.0)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return p.returncode, p.stdout, p.stderr


def policy_args(sc, for_plan):
    if sc["evict"] <= 0:
        return ["--evict", "0"] if for_plan else ["--kv-policy", "none"]
    if for_plan:
        return ["--evict", str(sc["evict"]), "--dms-window", str(sc["window"])]
    return ["--kv-policy", "forced", "--dms-force-rate", str(sc["evict"]), "--dms-window", str(sc["window"])]


def measure_profile(a, path):
    """`dmsrt bench` on this machine now: the CPU profile the planner reads."""
    grid = (["--prefill", "32", "--decode", "8", "--reps", "1", "--grid-batch", "1,4", "--grid-context", "64",
             "--grid-chunk", "16,64"] if a.smoke else ["--prefill", "64", "--decode", "16", "--reps", "10"])
    rc, so, se = sh([a.binary, "bench", "--model", MODEL, "--threads", str(a.threads), "--kv-policy", "none",
                     *grid, "--out", path])
    if rc != 0:
        raise RuntimeError(f"dmsrt bench failed:\n{se}")
    return path


def predicted(pj):
    at = pj["deployments"][0]["at_target"]
    return {"jobs_per_hour": at["jobs_per_hour"], "p50": at["latency_p50_s"], "p90": at["latency_p90_s"],
            "p99": at["latency_p99_s"], "preemptions": at["preemptions"], "complete": at["complete"]}


def plan(a, sc, extra, profile=None):
    cmd = [a.binary, "plan", "--model", MODEL, "--profile", profile or a.profile, "--gpus", "1", "--tp", "1",
           "--n", str(sc["n"]), "--prompt", sc["prompt"], "--reasoning", sc["reasoning"],
           "--kv-budget", sc["kv"], "--json", *policy_args(sc, True), *extra]
    rc, out, err = sh(cmd)
    if rc not in (0, 1) or not out.strip():
        raise RuntimeError(f"plan failed (rc {rc}): {' '.join(cmd)}\n{err}")
    return json.loads(out), " ".join(cmd)


def scenario_rate(a, sc, profile):
    """Jobs/h for the scenario: given, or load x the planner's capacity at 3x unloaded p90."""
    if "rate" in sc:
        return sc["rate"], None
    j, _ = plan(a, sc, ["--slo", "p90=100000", "--jobs", "40", "--search-steps", "1"], profile=profile)
    unloaded = j["deployments"][0]["unloaded_latency_s"]
    slo = 3.0 * unloaded
    j, _ = plan(a, sc, ["--slo", f"p90={slo:.3f}", "--jobs", "60", "--search-steps", "5"], profile=profile)
    cap = j["deployments"][0]["capacity_jobs_per_hour_per_replica"]
    if not cap:
        raise RuntimeError(f"{sc['name']}: the planner found no capacity at p90 <= {slo:.2f} s")
    return sc["load"] * cap, {"unloaded_p90_s": unloaded, "slo_s": slo, "capacity_jobs_per_hour": cap}


class Serve:
    """One `dmsrt serve` (its own coordinator) with the scenario's KV budget and policy."""

    def __init__(self, a, sc, log_path, step_log=None):
        self.step_log = step_log
        self.http = free_port()
        self.metrics = free_port()
        self.log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
        self.cmd = [a.binary, "serve", "--model", MODEL, "--threads", str(a.threads), "--kv-budget", sc["kv"],
                    "--listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{self.http}",
                    "--metrics-port", str(self.metrics), *policy_args(sc, False)]
        if step_log:
            if os.path.exists(step_log):
                os.remove(step_log)  # serve appends: a rerun in the same --workdir starts afresh
            self.cmd += ["--step-log", step_log]
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def metric(self, name):
        """One value of serve's /metrics (Prometheus text), or None."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[-1])
        except OSError:
            return None
        return None

    @staticmethod
    def settle():
        """Waits for the replica's next heartbeat (every 250 ms) to carry its figures."""
        time.sleep(1.0)

    def settled_metric(self, name):
        """A metric after the replica's next heartbeat has carried its figures."""
        self.settle()
        return self.metric(name)

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}; log {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=2) as r:
                    for line in r.read().decode().splitlines():
                        if line.startswith("dmsrt:replicas_ready") and float(line.split()[-1]) >= 1:
                            return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve not ready after {timeout} s; log {self.log.name}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def loadgen_trace(sc, trace, rate, jobs, seed):
    rc, so, se = sh([sys.executable, LOADGEN, "--rate", f"{rate:.6f}", "--jobs", str(jobs), "--n", str(sc["n"]),
                     "--prompt", sc["prompt"], "--reasoning", sc["reasoning"], "--seed", str(seed),
                     "--write-trace", trace, "--dry-run"])
    if rc != 0:
        raise RuntimeError(f"loadgen --dry-run failed: {se}")


def serve_overhead(a, sc, srv, run_dir, i, profile):
    """Serve's step time over the profile's, measured on a few jobs with little queueing before the run.

    A calibration trace of CALIB_JOBS jobs of the scenario's shape, arriving at a rate of one per
    CALIB_SPACING x the unloaded latency the fresh profile predicts, runs through the same serve
    with its step log on. `dmsrt plan --check-steps` predicts each of those steps from the
    profile; the ratio of the measured to the predicted step seconds is the factor the run is
    then predicted with (plan --step-scale). It holds what bench does not see (the coordinator,
    the HTTP door and the load generator on the same cores, the serve process's own work, and
    the drift of this machine's speed since the profile). The ratio of the jobs' measured to
    predicted p50, the factor of earlier validation runs, is kept beside it: on five jobs it
    spread from 0.97 to 2.85 where the steps' ratio of the same runs spread from 1.01 to 1.56."""
    j, _ = plan(a, sc, ["--slo", "p90=100000", "--jobs", "10", "--search-steps", "1"], profile=profile)
    unloaded = j["deployments"][0]["unloaded_latency_s"]
    trace = os.path.join(run_dir, f"calibration_{i}.trace")
    loadgen_trace(sc, trace, 3600.0 / (CALIB_SPACING * unloaded), CALIB_JOBS, a.seed + 1000 + i)
    out = os.path.join(run_dir, f"calibration_{i}.json")
    rc, so, se = sh([sys.executable, LOADGEN, "--url", f"http://127.0.0.1:{srv.http}", "--trace", trace,
                     "--n", str(sc["n"]), "--json", out, "--timeout", "3600", "--warmup", "0"])
    if rc != 0 or not os.path.exists(out):
        raise RuntimeError(f"calibration loadgen failed (rc {rc}): {se[-2000:]}")
    measured = json.load(open(out))
    srv.settle()  # the last step's line (serve flushes each one) and the last heartbeat
    steps = os.path.join(run_dir, f"calibration_steps_{i}.csv")
    shutil.copyfile(srv.step_log, steps)
    with open(steps) as f:
        lines = [ln for ln in f.read().split("\n") if ln]
    rc, so, se = sh([a.binary, "plan", "--profile", profile, "--check-steps", steps, "--json"])
    if rc != 0:
        raise RuntimeError(f"plan --check-steps failed (rc {rc}): {se}")
    check = json.loads(so)["all"]
    if not check["steps"] or check["predicted_s"] <= 0:
        raise RuntimeError(f"no calibration steps in {steps}")
    pj, _ = plan(a, sc, ["--replicas", "1", "--trace", trace, "--slo", "p90=100000"], profile=profile)
    pred = pj["deployments"][0]["at_target"]
    m, p = measured.get("latency_p50_s"), pred.get("latency_p50_s")
    return {"factor": check["measured_s"] / check["predicted_s"], "steps": check["steps"],
            "step_log_lines": len(lines) - 1, "measured_step_s": check["measured_s"],
            "predicted_step_s": check["predicted_s"], "job_p50_factor": m / p if m and p else None,
            "measured_p50_s": m, "predicted_p50_s": p, "trace": trace}


CALIB_JOBS = 10
CALIB_SPACING = 1.5


def measure(a, sc, trace, run_dir, i, profile=None):
    srv = Serve(a, sc, os.path.join(run_dir, f"serve_{i}.log"),
                os.path.join(run_dir, f"steps_{i}.csv") if a.step_log or a.serve_overhead else None)
    try:
        srv.wait_ready()
        calibration = serve_overhead(a, sc, srv, run_dir, i, profile) if a.serve_overhead else None
        # The counter is serve's total: the calibration jobs' preemptions are not the run's.
        # serve_overhead has already waited for the last heartbeat before reading the step log.
        before = (srv.metric("dmsrt:num_preemptions_total") or 0.0) if calibration else 0.0
        out = os.path.join(run_dir, f"loadgen_{i}.json")
        rc, so, se = sh([sys.executable, LOADGEN, "--url", f"http://127.0.0.1:{srv.http}", "--trace", trace,
                         "--n", str(sc["n"]), "--json", out, "--timeout", "3600"])
        if rc != 0 or not os.path.exists(out):
            raise RuntimeError(f"loadgen failed (rc {rc}): {se[-2000:]}")
        report = json.load(open(out))
        total = srv.settled_metric("dmsrt:num_preemptions_total")
        report["preemptions"] = None if total is None else total - before
        report["calibration"] = calibration
        return report
    finally:
        srv.stop()


SPEED_WINDOW_S = 10.0


def run_speed_trace(a, run_dir, i, profile, report):
    """After the fact: serve's step speed over the run, as a `dmsrt plan --step-scale-trace` file.

    The run's own lines of its step log (after the calibration jobs') are cut into windows of
    SPEED_WINDOW_S seconds by end_s; each window's factor is its steps' measured over predicted
    seconds (`plan --check-steps` against the run's profile). Serve's log clock is put on the
    trace's by the first prefill step of the run, which starts when the first job arrives.
    Replaying the trace at that speed separates the planner's own error (scheduling, step
    composition) from this machine's speed, which moves by +-25 % between windows of one run.
    None when the log has no end_s column or the report no job records."""
    path = os.path.join(run_dir, f"steps_{i}.csv")
    if not os.path.exists(path) or "job_arrival_s" not in report:
        return None
    skip = (report.get("calibration") or {}).get("step_log_lines", 0)
    with open(path) as f:
        text = [ln for ln in f.read().split("\n") if ln]
    header, lines = text[0] + "\n", [ln for ln in text if not ln.startswith("decode_rows")][skip:]
    rows = [ln.split(",") for ln in lines]
    if not rows or len(rows[0]) < 7:
        return None
    first = next((r for r in rows if int(r[1]) > 0), None)
    if first is None:
        return None
    offset = float(first[6]) - float(first[5]) - report["job_arrival_s"][0]
    start = float(rows[0][6]) - float(rows[0][5])
    windows = {}  # window index -> its lines, in one pass
    for ln, r in zip(lines, rows):
        windows.setdefault(int((float(r[6]) - start) // SPEED_WINDOW_S), []).append(ln)
    out = []
    window = os.path.join(run_dir, "speed_window.csv")
    for w in sorted(windows):
        with open(window, "w") as f:
            f.write(header + "\n".join(windows[w]) + "\n")
        rc, so, se = sh([a.binary, "plan", "--profile", profile, "--check-steps", window, "--json"])
        if rc != 0:
            raise RuntimeError(f"plan --check-steps failed (rc {rc}): {se}")
        c = json.loads(so)["all"]
        if c["predicted_s"] > 0:
            out.append(f"{start + w * SPEED_WINDOW_S - offset:.3f} {c['measured_s'] / c['predicted_s']:.4f}")
    os.remove(window)
    if not out:
        return None
    trace = os.path.join(run_dir, f"speed_{i}.txt")
    with open(trace, "w") as f:
        f.write(f"# serve's step speed over run {i} (measured / profile), {SPEED_WINDOW_S:g} s windows\n")
        f.write("\n".join(out) + "\n")
    return trace


def err(pred, meas):
    if pred is None or meas is None or meas == 0:
        return None
    return 100.0 * (pred - meas) / meas


def run_scenario(a, sc):
    d = os.path.join(a.workdir, sc["name"])
    os.makedirs(d, exist_ok=True)
    # With --profile-each-run the scenario's rate (and its first prediction) comes from a profile
    # measured just before the scenario, not from the one at the start of the whole run: this
    # machine's speed drifts by up to 1.7x within an hour, and a rate set from a fast moment's
    # profile puts the later scenarios near saturation.
    rate_profile = measure_profile(a, os.path.join(d, "profile_rate.json")) if a.profile_each_run else a.profile
    rate, cap = scenario_rate(a, sc, rate_profile)
    trace = os.path.join(d, "jobs.trace")
    jobs = a.jobs or sc.get("jobs", 50)
    loadgen_trace(sc, trace, rate, jobs, a.seed)
    trace_plan = ["--replicas", "1", "--trace", trace, "--slo", "p90=100000"]
    pj, plan_cmd = plan(a, sc, [*trace_plan, "--out", os.path.join(d, "plan.json")], profile=rate_profile)
    pred = first_pred = predicted(pj)
    runs, run_preds, replays = [], [], []
    for i in range(a.runs):
        prof = None
        if a.profile_each_run:
            prof = measure_profile(a, os.path.join(d, f"profile_{i}.json"))
        run = measure(a, sc, trace, d, i, prof or a.profile)
        runs.append(run)
        speed = run_speed_trace(a, d, i, prof or a.profile, run) if a.step_log else None
        if speed:
            # After the fact, not a prediction: the run replayed at the speed serve's steps had.
            pj_r, _ = plan(a, sc, [*trace_plan, "--step-scale-trace", speed,
                                   "--out", os.path.join(d, f"replay_{i}.json")], profile=prof or a.profile)
            replays.append(predicted(pj_r))
        if a.profile_each_run:
            # From what was measured before the run only: its profile, and the calibration jobs.
            scale = ["--step-scale", f"{run['calibration']['factor']:.4f}"] if a.serve_overhead else []
            pj_i, _ = plan(a, sc, [*trace_plan, *scale, "--out", os.path.join(d, f"plan_{i}.json")],
                           profile=prof)
            run_preds.append(predicted(pj_i))
    if run_preds:
        pred = {k: statistics.fmean(p[k] for p in run_preds) if all(p[k] is not None for p in run_preds) else None
                for k in ("jobs_per_hour", "p50", "p90", "p99", "preemptions")}
        pred["complete"] = all(p["complete"] for p in run_preds)
    meas = {}
    for key, field in (("jobs_per_hour", "jobs_per_hour"), ("p50", "latency_p50_s"), ("p90", "latency_p90_s"),
                       ("p99", "latency_p99_s")):
        vals = [r[field] for r in runs if r.get(field) is not None]
        meas[key] = {"mean": statistics.fmean(vals) if vals else None, "min": min(vals) if vals else None,
                     "max": max(vals) if vals else None, "runs": vals}
    replay = None
    if replays and len(replays) == len(runs):
        replay = {k: statistics.fmean(p[k] for p in replays) if all(p[k] is not None for p in replays) else None
                  for k in ("jobs_per_hour", "p50", "p90", "p99")}
    failed = sum(r.get("failed_count", 0) for r in runs)
    meas["preemptions"] = [r.get("preemptions") for r in runs]
    errors = {k: err(pred[k], meas[k]["mean"]) for k in ("jobs_per_hour", "p50", "p90", "p99")}
    verdict = {"throughput_within_10pct": errors["jobs_per_hour"] is not None and abs(errors["jobs_per_hour"]) <= 10,
               "p90_within_20pct": errors["p90"] is not None and abs(errors["p90"]) <= 20}
    return {"scenario": sc, "rate_jobs_per_hour": rate, "capacity": cap, "rate_profile": rate_profile, "jobs": jobs, "trace": trace,
            "plan_command": plan_cmd, "predicted": pred, "predicted_first_profile": first_pred,
            "errors_pct_first_profile": {k: err(first_pred[k], meas[k]["mean"])
                                         for k in ("jobs_per_hour", "p50", "p90", "p99")},
            "predicted_per_run": run_preds, "serve_overhead_per_run": [r.get("calibration") for r in runs],
            "measured": meas, "errors_pct": errors,
            # The runs replayed at serve's measured speed over time (after the fact; no verdict).
            "replay_at_measured_speed": replay, "replay_per_run": replays,
            "errors_pct_replay": {k: err(replay[k], meas[k]["mean"]) for k in ("jobs_per_hour", "p50", "p90", "p99")}
            if replay else None,
            "failed_jobs": failed, "verdict": verdict}


def fmt(v, w=7, p=1):
    return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"


def table(results):
    lines = ["scenario              rate/h | jobs/h pred  meas (min..max)        err% | "
             "p50 pred  meas   err% | p90 pred  meas (min..max)       err% | p99 pred  meas   err% | "
             "thr<=10% p90<=20% | preemptions pred / meas | p90 replayed at the runs' speed, err%"]
    for r in results:
        p, m, e = r["predicted"], r["measured"], r["errors_pct"]
        lines.append(
            f"{r['scenario']['name']:20} {fmt(r['rate_jobs_per_hour'], 7, 0)} | {fmt(p['jobs_per_hour'])} "
            f"{fmt(m['jobs_per_hour']['mean'])} ({fmt(m['jobs_per_hour']['min'], 6)}..{fmt(m['jobs_per_hour']['max'], 6)}) "
            f"{fmt(e['jobs_per_hour'], 6)} | {fmt(p['p50'], 6, 2)} {fmt(m['p50']['mean'], 6, 2)} {fmt(e['p50'], 6)} | "
            f"{fmt(p['p90'], 6, 2)} {fmt(m['p90']['mean'], 6, 2)} ({fmt(m['p90']['min'], 5, 2)}..{fmt(m['p90']['max'], 5, 2)}) "
            f"{fmt(e['p90'], 6)} | {fmt(p['p99'], 6, 2)} {fmt(m['p99']['mean'], 6, 2)} {fmt(e['p99'], 6)} | "
            f"{'yes' if r['verdict']['throughput_within_10pct'] else 'NO':>8} "
            f"{'yes' if r['verdict']['p90_within_20pct'] else 'NO':>8} | preemptions "
            f"{p['preemptions']} / {','.join('-' if x is None else str(int(x)) for x in m['preemptions'])} | "
            f"{fmt((r.get('replay_at_measured_speed') or {}).get('p90'), 6, 2)} "
            f"{fmt((r.get('errors_pct_replay') or {}).get('p90'), 6)}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "dmsrt"))
    ap.add_argument("--profile", help="a CPU profile (dmsrt bench --out); default: measure one here")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of bench and serve")
    ap.add_argument("--runs", type=int, default=3, help="real runs per scenario")
    ap.add_argument("--jobs", type=int, default=0, help="jobs per scenario (default: the scenario's, 50)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--smoke", action="store_true", help="one tiny scenario, one run, 6 jobs")
    ap.add_argument("--check", action="store_true", help="exit 1 when a verdict fails")
    ap.add_argument("--workdir", help="where files go (default: a temporary directory, kept)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile-each-run", action="store_true",
                    help="measure a profile before every real run and predict the run from it")
    ap.add_argument("--step-log", action="store_true",
                    help="serve logs every engine step (steps_<run>.csv beside its log) for "
                         "`dmsrt plan --profile P --check-steps`), and replay each run at the speed "
                         "those steps had (plan --step-scale-trace; reported beside the prediction)")
    ap.add_argument("--serve-overhead", action="store_true",
                    help="with --profile-each-run: before each run, run a few jobs through the same "
                         "serve with its step log on, compare their steps with the profile's "
                         "prediction (plan --check-steps), and predict the run with that ratio "
                         "(plan --step-scale)")
    a = ap.parse_args()
    if a.serve_overhead and not a.profile_each_run:
        ap.error("--serve-overhead needs --profile-each-run")
    if not os.path.exists(MODEL):
        print(f"plan_validation: SKIP: no default model at {MODEL} (launch/setup.sh fetches it)")
        return 0
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="dmsrt_plan_validation_")
    os.makedirs(a.workdir, exist_ok=True)
    scenarios = SMOKE if a.smoke else SCENARIOS
    if a.smoke:
        a.runs, a.jobs = 1, a.jobs or 6
    if a.only:
        names = set(a.only.split(","))
        scenarios = [s for s in scenarios if s["name"] in names]
    if not a.profile:
        try:
            a.profile = measure_profile(a, os.path.join(a.workdir, "cpu_profile.json"))
        except RuntimeError as e:
            print(f"plan_validation: {e}", file=sys.stderr)
            return 1
    print(f"plan_validation: profile {a.profile}, {a.runs} run(s) per scenario, files in {a.workdir}", flush=True)
    results = []
    for sc in scenarios:
        t0 = time.monotonic()
        r = run_scenario(a, sc)
        r["wall_s"] = time.monotonic() - t0
        results.append(r)
        print(f"{sc['name']}: {r['wall_s']:.0f} s", flush=True)
    print(table(results))
    ok = all(r["verdict"]["throughput_within_10pct"] and r["verdict"]["p90_within_20pct"] for r in results)
    failed = sum(r["failed_jobs"] for r in results)
    print(f"verdicts: {sum(r['verdict']['throughput_within_10pct'] for r in results)}/{len(results)} throughput "
          f"within 10 %, {sum(r['verdict']['p90_within_20pct'] for r in results)}/{len(results)} p90 within 20 %; "
          f"{failed} failed job(s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"profile": a.profile, "profile_each_run": a.profile_each_run,
                       "serve_overhead": a.serve_overhead, "threads": a.threads,
                       "runs": a.runs, "results": results}, f, indent=2)
    for r in results:
        for k in ("jobs_per_hour", "p50", "p90", "p99"):
            if r["predicted"][k] is None or r["measured"][k]["mean"] is None:
                print(f"plan_validation: {r['scenario']['name']}: no {k} figure", file=sys.stderr)
                return 1
    if failed:
        return 1
    return 1 if (a.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
