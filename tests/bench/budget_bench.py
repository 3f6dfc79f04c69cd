#!/usr/bin/env python3
"""Budget mode, measured: how many threads of one KV budget each policy admits AND runs.

For each policy (`none`, then `forced` synthetic DMS eviction at --rate with window --window) this
starts a real replica (`dmsrt serve`, one process that hosts its own coordinator) with
`--kv-budget BUDGET`, submits one budget-mode job (`kv.kv_budget_bytes = BUDGET`, n chosen by the
coordinator) whose threads run to exactly --tokens tokens each (prompt + generated, EOS ignored),
and reports what happened:

  admitted      n the coordinator chose (JobAccepted)
  peak running  the engine's highest count of threads holding KV at once (ReplicaStatus)
  preemptions   threads the engine had to evict for recompute (0 = the admitted n really fit)
  peak KV       the engine's highest KV blocks in use, in MiB, against the budget
  cache CR      logical / resident tokens of each thread at its end (KvCache figures)
  tokens/s      generated tokens / job seconds (submission to the last thread)

then the ratios forced / none of threads admitted and of threads run at once without preemption.
With --check-ratio R it exits non-zero unless both ratios are >= R, every thread ran to its full
length, nothing was preempted and peak KV stayed within the budget.

    python3 tests/bench/budget_bench.py                      # the 4K-token comparison (minutes)
    python3 tests/bench/budget_bench.py --tokens 384 --window 16 --budget 52MiB --check-ratio 4

The budget is per replica and is both the replica's --kv-budget and the job's kv_budget_bytes, so
an admission estimate that is too optimistic shows up as preemptions. Needs grpcio + grpcio-tools
(the e2e test dependencies).
"""

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("DMSRT_BIN", os.path.join(SRC, "build", "bin", "dmsrt"))
MODEL = os.environ.get("DMSRT_MODEL", os.path.join(SRC, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
sys.path.insert(0, os.path.join(SRC, "examples", "python"))

# A short reasoning question: the prompt is a small share of a thread, as in best-of-N reasoning.
QUESTION = ("A train leaves at 9:40 and arrives at 13:05. How many minutes does the trip take? "
            "Think step by step, then give the final answer in \\boxed{}.")


def parse_bytes(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 768MiB)")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `dmsrt serve` process (its own coordinator) with `extra` options; stopped on exit."""

    def __init__(self, budget, threads, extra, stubs_dir):
        from dmsrt_client import DmsrtClient
        self.address = f"127.0.0.1:{free_port()}"
        self.log = tempfile.NamedTemporaryFile(prefix="dmsrt_budget_", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
        self.cmd = [BIN, "serve", "--model", MODEL, "--listen", self.address, "--threads",
                    str(threads), "--kv-budget", str(budget)] + list(extra)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.client = DmsrtClient(self.address, stubs_dir=stubs_dir)

    def log_text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                cs = self.client.cluster()
                if any(r.state == "ready" for r in cs.replicas):
                    return cs
            except Exception:  # not listening yet
                pass
            time.sleep(0.3)
        raise RuntimeError(f"replica not ready after {timeout}s:\n{self.log_text()}")

    def wait_idle(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            cs = self.client.cluster()
            if cs.kv_blocks_used == 0 and cs.running_threads == 0 and cs.queued_threads == 0:
                return cs
            time.sleep(0.3)
        raise RuntimeError("replica not idle")

    def stop(self):
        self.client.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def run_policy(args, policy, stubs_dir):
    if policy == "none":
        extra = ["--kv-policy", "none"]
    else:
        extra = ["--kv-policy", "forced", "--dms-force-rate", str(args.rate), "--dms-window",
                 str(args.window), "--dms-seed", str(args.dms_seed)]
    rep = Replica(args.budget, args.threads, extra, stubs_dir)
    try:
        cs = rep.wait_ready()
        status = cs.replicas[0]
        block_bytes = status.ranks[0].kv_block_bytes
        blocks_total = status.ranks[0].kv_blocks_total
        c = rep.client
        # The prompt's length as the coordinator tokenizes it, so every thread ends at --tokens.
        probe = c.submit(chat=QUESTION, n=1, max_tokens=1, seed=1)
        while c.get(probe.job_id).outcome in (c.pb.JOB_RUNNING, c.pb.JOB_QUEUED):
            time.sleep(0.1)
        prompt_tokens = c.get(probe.job_id).usage.prompt_tokens
        rep.wait_idle()
        max_tokens = args.tokens - prompt_tokens
        if max_tokens < 1:
            raise RuntimeError(f"--tokens {args.tokens} leaves no room after {prompt_tokens} prompt tokens")

        # Cluster samples while the job runs (the engine's own peaks are read at the end).
        samples = []
        stop = threading.Event()

        def sampler():
            from dmsrt_client import DmsrtClient
            sc = DmsrtClient(rep.address, stubs_dir=stubs_dir)
            while not stop.is_set():
                try:
                    r = sc.cluster().replicas[0]
                    k = r.ranks[0]
                    samples.append((r.running_threads, k.kv_blocks_used, k.logical_tokens,
                                    k.resident_tokens))
                except Exception:
                    pass
                time.sleep(0.25)
            sc.close()

        t = threading.Thread(target=sampler)
        t.start()
        t0 = time.time()
        try:
            res = c.run_job(chat=QUESTION, kv_budget_bytes=args.budget, max_tokens=max_tokens,
                            temperature=0.7, seed=args.seed, ignore_eos=True, timeout=args.job_timeout)
        finally:
            stop.set()
            t.join()
        wall = time.time() - t0
        time.sleep(0.6)  # one more heartbeat carries the engine's final figures
        rs = c.cluster().replicas[0]
        threads = res["threads"]
        full = [th for th in threads if th["reason"] == "LENGTH" and th["tokens"] == max_tokens]
        crs = sorted(th["cache_cr"] for th in threads)
        peak_blocks = rs.ranks[0].peak_kv_blocks_used
        # The whole cache's compression at the busiest sample (logical / resident over threads).
        busiest = max(samples, key=lambda s: s[1]) if samples else (0, 0, 0, 0)
        out = {
            "policy": policy,
            "kv_policy_reported": rs.kv_policy,
            "window": rs.kv_window,
            "force_rate": rs.kv_force_rate,
            "budget_bytes": args.budget,
            "kv_blocks_total": blocks_total,
            "kv_block_bytes": block_bytes,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "tokens_per_thread": prompt_tokens + max_tokens,
            "admitted": res["n"],
            "outcome": res["outcome"],
            "threads_full_length": len(full),
            "peak_running_threads": rs.peak_running_threads,
            "peak_running_sampled": max((s[0] for s in samples), default=0),
            "preemptions": rs.preemptions,
            "peak_kv_blocks_used": peak_blocks,
            "peak_kv_bytes": peak_blocks * block_bytes,
            "peak_kv_bytes_per_thread": peak_blocks * block_bytes / max(1, res["n"]),
            "cache_cr_min": crs[0] if crs else 0.0,
            "cache_cr_median": crs[len(crs) // 2] if crs else 0.0,
            "cache_cr_max": crs[-1] if crs else 0.0,
            "cache_cr_busiest_sample": busiest[2] / busiest[3] if busiest[3] else 1.0,
            "generated_tokens": res["usage"]["generated_tokens"],
            "job_seconds": res["usage"]["seconds"],
            "tokens_per_second": res["usage"]["generated_tokens"] / max(1e-9, res["usage"]["seconds"]),
            "wall_seconds": wall,
        }
        return out
    except Exception:
        sys.stderr.write(rep.log_text())
        raise
    finally:
        rep.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per thread, prompt included")
    ap.add_argument("--budget", type=parse_bytes, default=parse_bytes("768MiB"),
                    help="KV bytes: the replica's --kv-budget and the job's kv_budget_bytes")
    ap.add_argument("--rate", type=float, default=0.875, help="forced eviction rate")
    ap.add_argument("--window", type=int, default=512, help="forced policy's delay window w")
    ap.add_argument("--dms-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the replica")
    ap.add_argument("--seed", type=int, default=1, help="sampling seed (thread i: seed + i)")
    ap.add_argument("--job-timeout", type=float, default=3600)
    ap.add_argument("--json", help="write the figures here as JSON")
    ap.add_argument("--check-ratio", type=float, default=0.0,
                    help="fail unless forced/none >= this for admitted and for run-at-once threads")
    args = ap.parse_args()
    stubs = tempfile.mkdtemp(prefix="dmsrt_stubs_")
    atexit.register(shutil.rmtree, stubs, True)  # the generated gRPC stubs
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    runs = [run_policy(args, p, stubs) for p in ("none", "forced")]
    none, forced = runs
    ratio_admitted = forced["admitted"] / max(1, none["admitted"])
    ran = lambda r: r["peak_running_threads"] if r["preemptions"] == 0 else 0
    ratio_running = ran(forced) / max(1, ran(none))
    ratio_bytes = none["peak_kv_bytes_per_thread"] / max(1.0, forced["peak_kv_bytes_per_thread"])
    report = {"started": started, "command": " ".join([os.path.relpath(sys.argv[0], SRC)] + sys.argv[1:]),
              "model": os.path.basename(MODEL), "runs": runs, "ratio_admitted": ratio_admitted,
              "ratio_running_without_preemption": ratio_running,
              "ratio_kv_bytes_per_thread": ratio_bytes}

    mib = lambda b: b / 1048576.0
    print(f"\nbudget {mib(args.budget):.0f} MiB per replica, threads of {args.tokens} tokens "
          f"({none['prompt_tokens']} prompt + {none['max_tokens']} generated, EOS ignored), "
          f"forced rate {args.rate} w={args.window}")
    print("| policy | admitted | peak running | preemptions | peak KV MiB (budget) | KV MiB/thread "
          "| cache CR min/median/max | tokens/s | job s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        label = r["policy"] if r["policy"] == "none" else f"forced {r['force_rate']:g}, w={r['window']}"
        print(f"| {label} | {r['admitted']} | {r['peak_running_threads']} | {r['preemptions']} | "
              f"{mib(r['peak_kv_bytes']):.1f} ({mib(args.budget):.0f}) | "
              f"{mib(r['peak_kv_bytes_per_thread']):.1f} | {r['cache_cr_min']:.2f} / "
              f"{r['cache_cr_median']:.2f} / {r['cache_cr_max']:.2f} | {r['tokens_per_second']:.1f} | "
              f"{r['job_seconds']:.1f} |")
    print(f"forced / none: {ratio_admitted:.2f}x threads admitted, {ratio_running:.2f}x threads run "
          f"at once without preemption, {ratio_bytes:.2f}x less peak KV per thread")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)

    problems = []
    for r in runs:
        if r["outcome"] not in ("JOB_SUCCEEDED", "JOB_NO_ANSWER"):
            problems.append(f"{r['policy']}: job ended {r['outcome']}")
        if r["threads_full_length"] != r["admitted"]:
            problems.append(f"{r['policy']}: {r['admitted'] - r['threads_full_length']} of "
                            f"{r['admitted']} threads did not run to {r['max_tokens']} tokens")
        if r["preemptions"]:
            problems.append(f"{r['policy']}: {r['preemptions']} preemptions")
        if r["peak_running_threads"] != r["admitted"]:
            problems.append(f"{r['policy']}: {r['peak_running_threads']} of {r['admitted']} admitted "
                            "threads ran at once")
        if r["peak_kv_bytes"] > args.budget:
            problems.append(f"{r['policy']}: peak KV {r['peak_kv_bytes']} bytes > budget {args.budget}")
    if args.check_ratio:
        if ratio_admitted < args.check_ratio:
            problems.append(f"admitted ratio {ratio_admitted:.2f} < {args.check_ratio}")
        if ratio_running < args.check_ratio:
            problems.append(f"run-at-once ratio {ratio_running:.2f} < {args.check_ratio}")
        for p in problems:
            print("FAIL:", p)
        return 1 if problems else 0
    for p in problems:
        print("note:", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
