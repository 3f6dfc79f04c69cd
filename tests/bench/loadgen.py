#!/usr/bin/env python3
"""Best-of-N load against a running `dmsrt serve` (its OpenAI-compatible HTTP door,
--http-listen): jobs arrive as a Poisson process (--rate jobs/h) or from a trace file, each a
streamed /v1/completions request with n threads, a prompt of a drawn length and max_tokens of a
drawn length with EOS ignored (so the lengths are the ones drawn, on any model). Reports, as
JSON: sustained jobs/h and threads/s over the measured jobs (after a warm-up share), job latency
p50/p90/p99 and time to the first finished thread.

    python3 tests/bench/loadgen.py --url http://127.0.0.1:8080 --rate 60 --jobs 100 --n 4 \
        --prompt fixed:64 --reasoning uniform:64:192 --json out.json

Traces (the jobs `dmsrt plan --trace` simulates; format in launch/plan/trace.h): one job per
line, "ARRIVAL_SECONDS PROMPT_TOKENS GENERATED_TOKENS" ('#' comments). --write-trace FILE writes
the jobs this run submits (with --dry-run: writes them and exits, no server needed); --trace FILE
submits a trace's jobs (lines of an arrival time alone draw their lengths here, with --seed).
The same trace given to `dmsrt plan --replicas R --trace FILE` predicts this run.

Length forms are those of `dmsrt plan`: fixed:N, uniform:A:B, lognormal:MEDIAN:SIGMA (clipped to
--max-prompt / --max-tokens). The prompt is built from a word that the default model's tokenizer
turns into one token each (checked against the usage the server reports: prompt_tokens_error in
the output). Standard library only.
"""

import argparse
import http.client
import json
import math
import random
import sys
import threading
import time
import urllib.parse


def parse_dist(s, cap):
    parts = s.split(":")
    if parts[0] == "fixed" and len(parts) == 2:
        v = float(parts[1])
        return lambda r: max(1, min(cap, math.ceil(v)))
    if parts[0] == "uniform" and len(parts) == 3:
        a, b = float(parts[1]), float(parts[2])
        return lambda r: max(1, min(cap, math.ceil(r.uniform(a, b))))
    if parts[0] == "lognormal" and len(parts) == 3:
        m, s_ = float(parts[1]), float(parts[2])
        return lambda r: max(1, min(cap, math.ceil(math.exp(math.log(m) + s_ * r.gauss(0, 1)))))
    raise SystemExit(f"loadgen: length distribution {s!r}: expected fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA")


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    k = max(1, math.ceil(p / 100 * len(v)))
    return v[min(len(v), k) - 1]


class Job:
    def __init__(self, i, arrival, prompt_len, gen_len):
        self.i, self.arrival, self.prompt_len, self.gen_len = i, arrival, prompt_len, gen_len
        self.start = self.first_done = self.done = None
        self.error = None
        self.prompt_tokens = None
        self.threads_done = 0


def run_job(url, job, n, t0, word, timeout):
    u = urllib.parse.urlparse(url)
    body = {"model": "m", "prompt": (word * job.prompt_len).strip(), "n": n,
            "max_tokens": job.gen_len, "temperature": 0.7, "seed": job.i, "stream": True,
            "stream_options": {"include_usage": True},
            "dmsrt": {"stopping": {"ignoreEos": True}}}
    job.start = time.monotonic() - t0
    try:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            job.error = f"HTTP {r.status}: {r.read()[:300]!r}"
            return
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            for ch in ev.get("choices", []):
                if ch.get("finish_reason"):
                    job.threads_done += 1
                    if job.first_done is None:
                        job.first_done = time.monotonic() - t0
            if ev.get("usage"):
                job.prompt_tokens = ev["usage"].get("prompt_tokens")
        job.done = time.monotonic() - t0
        c.close()
    except Exception as e:  # noqa: BLE001 - reported per job
        job.error = repr(e)


def read_trace(path):
    """(arrival, prompt, generated) per job; prompt and generated are None where a line has only
    the arrival time. Same rules as launch/plan/trace.cc."""
    out = []
    with open(path) as f:
        for no, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) not in (1, 3):
                raise SystemExit(f"loadgen: trace {path} line {no}: expected ARRIVAL_SECONDS [PROMPT GENERATED]")
            t = float(fields[0])
            if t < 0 or (out and t < out[-1][0]):
                raise SystemExit(f"loadgen: trace {path} line {no}: arrival times must be >= 0 and not decrease")
            lengths = (int(fields[1]), int(fields[2])) if len(fields) == 3 else (None, None)
            if lengths[0] is not None and min(lengths) < 1:
                raise SystemExit(f"loadgen: trace {path} line {no}: lengths must be >= 1")
            if out and (lengths[0] is None) != (out[-1][1] is None):
                raise SystemExit(f"loadgen: trace {path} line {no}: either every job has its lengths or none has")
            out.append((t, *lengths))
    if not out:
        raise SystemExit(f"loadgen: trace {path} has no job")
    return out


def make_jobs(a):
    """The jobs of this run: Poisson arrivals at --rate, or the trace's; lengths drawn from
    --prompt/--reasoning (one seeded stream, arrivals first) unless the trace has them."""
    rng = random.Random(a.seed)
    pd, rd = parse_dist(a.prompt, a.max_prompt), parse_dist(a.reasoning, a.max_tokens)
    if a.trace:
        rows = read_trace(a.trace)
    else:
        t, rows = 0.0, []
        for _ in range(a.jobs):
            t += rng.expovariate(a.rate / 3600.0)
            rows.append((t, None, None))
    jobs = []
    for i, (t, p, g) in enumerate(rows):
        if p is None:
            p, g = pd(rng), rd(rng)
        jobs.append(Job(i, t, p, g))
    return jobs


def write_trace(path, jobs, a):
    with open(path, "w") as f:
        f.write(f"# dmsrt job trace: arrival_s prompt_tokens generated_tokens (n {a.n}; written by "
                f"tests/bench/loadgen.py, seed {a.seed})\n")
        for j in jobs:
            f.write(f"{j.arrival:.6f} {j.prompt_len} {j.gen_len}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="the serve's HTTP door, e.g. http://127.0.0.1:8080 (required unless --dry-run)")
    ap.add_argument("--rate", type=float, default=60.0, help="Poisson arrivals, jobs per hour")
    ap.add_argument("--trace", help="a job trace (launch/plan/trace.h) instead of --rate")
    ap.add_argument("--write-trace", help="write the jobs this run submits as a trace")
    ap.add_argument("--dry-run", action="store_true", help="with --write-trace: write it and exit")
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--n", type=int, default=4, help="threads per job (best-of-N)")
    ap.add_argument("--prompt", default="fixed:64")
    ap.add_argument("--reasoning", default="fixed:128")
    ap.add_argument("--max-prompt", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the first jobs left out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--word", default=" x", help="prompt filler (one token per repetition)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    if a.rate <= 0 and not a.trace:
        raise SystemExit("loadgen: --rate must be > 0 jobs/h")
    if a.dry_run and not a.write_trace:
        raise SystemExit("loadgen: --dry-run writes a trace: give --write-trace FILE")
    if not a.dry_run and not a.url:
        raise SystemExit("loadgen: --url is required (unless --dry-run)")
    jobs = make_jobs(a)
    if a.write_trace:
        write_trace(a.write_trace, jobs, a)
        if a.dry_run:
            print(json.dumps({"trace": a.write_trace, "jobs": len(jobs)}))
            return 0
    t0 = time.monotonic()
    threads = []
    for j in jobs:
        delay = j.arrival - (time.monotonic() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=run_job, args=(a.url, j, a.n, t0, a.word, a.timeout), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    warm = int(math.floor(a.warmup * len(jobs)))
    measured = jobs[warm:]
    ok = [j for j in measured if j.error is None and j.done is not None]
    lat = [j.done - j.arrival for j in ok]
    first = [j.first_done - j.arrival for j in ok if j.first_done is not None]
    span = (max(j.done for j in ok) - measured[0].arrival) if ok else 0
    perr = [abs(j.prompt_tokens - j.prompt_len) / j.prompt_len for j in ok if j.prompt_tokens]
    rep = {"jobs": len(jobs), "measured_jobs": len(measured), "failed": [j.error for j in jobs if j.error][:5],
           "failed_count": sum(1 for j in jobs if j.error),
           "offered_jobs_per_hour": a.rate if not a.trace else None,
           "jobs_per_hour": len(ok) * 3600 / span if span > 0 else None,
           "threads_per_second": sum(j.threads_done for j in ok) / span if span > 0 else None,
           "latency_p50_s": pct(lat, 50), "latency_p90_s": pct(lat, 90), "latency_p99_s": pct(lat, 99),
           "first_thread_p50_s": pct(first, 50), "first_thread_p90_s": pct(first, 90),
           "prompt_tokens_error_max": max(perr) if perr else None,
           "n": a.n, "prompt": a.prompt, "reasoning": a.reasoning, "seed": a.seed,
           # Every job in trace order (warm-up included), on this run's clock from its start:
           # to lay beside `dmsrt plan --trace`'s job_done_s job by job.
           "job_arrival_s": [j.arrival for j in jobs],
           "job_done_s": [j.done if j.error is None else None for j in jobs]}
    print(json.dumps(rep))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 1 if rep["failed_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
