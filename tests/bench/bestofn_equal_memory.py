#!/usr/bin/env python3
"""Best-of-N at equal memory: dense against a learned DMS adapter under one KV budget.

For each question of tests/data/bestofn/tasks.jsonl this submits one budget-mode job
(`kv.kv_budget_bytes = BUDGET`, n chosen by the coordinator, majority vote over the threads'
extracted answers) to a real replica (`dmsrt serve` on loopback, which hosts its own coordinator,
`--kv-budget BUDGET`), once per configuration:

  dense   --kv-policy none
  dms     --dms-adapter FILE (policy dms: the adapter's learned decisions, window from its
          metadata); the coordinator plans the threads with the adapter's calibrated eviction
          rate (metadata `dms_eviction_rate`), as a fresh or idle replica has observed none
  forced  instead of dms when no adapter is given or found: --kv-policy forced
          --dms-force-rate R --dms-window W (synthetic eviction, for developing without one)

Each question runs on an idle replica, one job at a time, so every job is admitted on the same
terms. Per configuration it reports: threads admitted per question (mean, min, max), majority-vote
accuracy, mean one-thread accuracy (share of a question's threads whose answer is right, averaged
over questions), generated tokens/s (generated tokens over the jobs' seconds), KV held per thread
at its end (resident tokens per KV head = (prompt + generated) / the thread's cache CR, and that
as bytes), cache CR, the replica's peak KV and preemptions, the number of questions and the run
time. Then the accuracy differences dms - dense with 95 % confidence intervals from a paired
bootstrap over questions (10,000 resamples), and an exact two-sided McNemar test on the
questions where the two votes disagree.

    python3 tests/bench/bestofn_equal_memory.py                        # all questions (tens of minutes)
    python3 tests/bench/bestofn_equal_memory.py --questions 1 --check-admitted-ratio 3   # CI

Prompts are chat conversations: the few-shot turns of tests/data/bestofn/prompt.json, then the
question. The answer is what the coordinator extracts (the last \\boxed{}, else the last number),
compared with the task's answer after the same normalisation. Needs grpcio + grpcio-tools.
"""

import argparse
import atexit
import glob
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import budget_bench as bb  # noqa: E402  (Replica, parse_bytes; also puts the client on the path)

SRC = bb.SRC
DATA = os.path.join(SRC, "tests", "data", "bestofn")


def normalise(a):
    """The coordinator's normalisation of a numeric answer ("1,000" / "1000.0" -> "1000")."""
    if a is None:
        return None
    s = str(a).strip().rstrip(".").replace(",", "")
    try:
        x = float(s)
    except ValueError:
        return s
    if math.isfinite(x) and x == int(x):
        return str(int(x))
    return repr(x).rstrip("0").rstrip(".")


def load_tasks(path, limit):
    tasks = [json.loads(line) for line in open(path) if line.strip()]
    return tasks[:limit] if limit else tasks


def messages_for(prompt_cfg, question):
    msgs = []
    if prompt_cfg.get("system"):
        msgs.append({"role": "system", "content": prompt_cfg["system"]})
    for user, assistant in prompt_cfg.get("fewshot", []):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": prompt_cfg.get("template", "{question}").format(
        question=question)})
    return msgs


def find_adapter():
    """The default model's learned adapter, else any adapter file in adapters/, else None."""
    default = os.path.join(SRC, "adapters", "SmolLM2-135M-Instruct.dms.safetensors")
    if os.path.exists(default):
        return default
    found = sorted(glob.glob(os.path.join(SRC, "adapters", "*.safetensors")))
    return found[0] if found else None


def run_config(args, name, extra, tasks, prompt_cfg, stubs):
    rep = bb.Replica(args.budget, args.threads, extra, stubs)
    t_start = time.time()
    try:
        cs = rep.wait_ready()
        rs0 = cs.replicas[0]
        k0 = rs0.ranks[0]
        block_bytes = k0.kv_block_bytes
        # Bytes of one token position in every (layer, KV head): the pool over its token capacity.
        per_token_bytes = k0.kv_blocks_total * block_bytes / max(1, k0.kv_tokens_capacity)
        c = rep.client
        rows = []
        # KV blocks in use, sampled from the replica's heartbeats while each job runs.
        samples = []
        stop = threading.Event()

        def sampler():
            from dmsrt_client import DmsrtClient
            sc = DmsrtClient(rep.address, stubs_dir=stubs)
            while not stop.is_set():
                try:
                    samples.append(sc.cluster().replicas[0].ranks[0].kv_blocks_used)
                except Exception:
                    pass
                time.sleep(0.2)
            sc.close()

        for qi, task in enumerate(tasks):
            rep.wait_idle()
            samples.clear()
            stop.clear()
            sampling = threading.Thread(target=sampler)
            sampling.start()
            try:
                res = c.run_job(messages=messages_for(prompt_cfg, task["question"]),
                                kv_budget_bytes=args.budget, max_tokens=args.max_tokens,
                                temperature=args.temperature, seed=args.seed + 1000 * qi,
                                timeout=args.job_timeout)
            finally:
                stop.set()
                sampling.join()
            peak_blocks = max(samples, default=0)
            gold = normalise(task["answer"])
            prompt_tokens = res["usage"]["prompt_tokens"]
            threads = []
            for th in res["threads"]:
                cr = th["cache_cr"] if th["cache_cr"] > 0 else 1.0
                threads.append({"index": th["index"], "reason": th["reason"], "tokens": th["tokens"],
                                "answer": th["answer"], "correct": normalise(th["answer"]) == gold,
                                "cache_cr": cr, "resident_tokens": (prompt_tokens + th["tokens"]) / cr,
                                "text": th["text"]})
            row = {"id": task.get("id", str(qi)), "gold": gold, "n": res["n"],
                   "outcome": res["outcome"], "answer": res["answer"],
                   "vote_correct": normalise(res["answer"]) == gold, "votes": res["votes"],
                   "one_thread_accuracy": sum(t["correct"] for t in threads) / max(1, len(threads)),
                   "prompt_tokens": prompt_tokens,
                   "generated_tokens": res["usage"]["generated_tokens"],
                   "seconds": res["usage"]["seconds"],
                   "peak_kv_bytes_sampled": peak_blocks * block_bytes,
                   "peak_kv_bytes_per_thread": peak_blocks * block_bytes / max(1, res["n"]),
                   "threads": threads}
            rows.append(row)
            if args.verbose:
                print(f"  {name} {row['id']}: n={row['n']} vote={row['answer']} gold={gold} "
                      f"{'ok' if row['vote_correct'] else 'x'} one-thread "
                      f"{row['one_thread_accuracy']:.2f} tokens "
                      f"{[t['tokens'] for t in threads]}", flush=True)
        time.sleep(0.6)  # one more heartbeat carries the engine's final figures
        rs = c.cluster().replicas[0]
        wall = time.time() - t_start
        return summarise(name, rs, rows, block_bytes, per_token_bytes, wall, extra)
    except Exception:
        sys.stderr.write(rep.log_text())
        raise
    finally:
        rep.stop()


def summarise(name, rs, rows, block_bytes, per_token_bytes, wall, extra):
    all_threads = [t for r in rows for t in r["threads"]]
    ns = [r["n"] for r in rows]
    gen = sum(r["generated_tokens"] for r in rows)
    secs = sum(r["seconds"] for r in rows)
    resident = [t["resident_tokens"] for t in all_threads]
    crs = [t["cache_cr"] for t in all_threads]
    lengths = [t["tokens"] for t in all_threads]
    return {
        "config": name,
        "options": extra,
        "kv_policy_reported": rs.kv_policy,
        "window": rs.kv_window,
        "force_rate": rs.kv_force_rate,
        "calibrated_eviction_rate": getattr(rs, "dms_expected_eviction_rate", 0.0),
        "questions": len(rows),
        "admitted_mean": statistics.mean(ns),
        "admitted_min": min(ns),
        "admitted_max": max(ns),
        "vote_accuracy": statistics.mean(r["vote_correct"] for r in rows),
        "one_thread_accuracy": statistics.mean(r["one_thread_accuracy"] for r in rows),
        "generated_tokens": gen,
        "job_seconds": secs,
        "tokens_per_second": gen / max(1e-9, secs),
        "reply_tokens_median": statistics.median(lengths) if lengths else 0,
        "threads_at_length_limit": sum(t["reason"] == "LENGTH" for t in all_threads),
        "resident_tokens_per_thread_mean": statistics.mean(resident) if resident else 0,
        "kv_bytes_per_thread_mean": (statistics.mean(resident) if resident else 0) * per_token_bytes,
        "cache_cr_mean": statistics.mean(crs) if crs else 1.0,
        "cache_cr_median": statistics.median(crs) if crs else 1.0,
        "peak_kv_bytes_per_thread_mean": statistics.mean(r["peak_kv_bytes_per_thread"] for r in rows),
        "peak_kv_bytes": rs.ranks[0].peak_kv_blocks_used * block_bytes,
        "peak_running_threads": rs.peak_running_threads,
        "preemptions": rs.preemptions,
        "outcomes": sorted(set(r["outcome"] for r in rows)),
        "wall_seconds": wall,
        "rows": rows,
    }


def paired_bootstrap(a, b, resamples, seed):
    """95 % percentile interval of mean(b - a) over questions resampled with replacement."""
    d = [float(y) - float(x) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return 0.0, 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return sum(d) / n, means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def mcnemar_exact(a, b):
    """Discordant counts (only a right, only b right) and the exact two-sided binomial p-value."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    m = only_a + only_b
    if m == 0:
        return only_a, only_b, 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return only_a, only_b, min(1.0, 2 * tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="learned DMS adapter (.safetensors); default: "
                    "adapters/SmolLM2-135M-Instruct.dms.safetensors (else another file in adapters/), "
                    "else forced synthetic eviction (--forced-rate, --window)")
    ap.add_argument("--forced-rate", type=float, default=0.875,
                    help="without an adapter: the forced policy's eviction rate")
    ap.add_argument("--window", type=int, default=32, help="without an adapter: the forced window")
    ap.add_argument("--budget", type=bb.parse_bytes, default=bb.parse_bytes("96MiB"),
                    help="KV bytes: each replica's --kv-budget and every job's kv_budget_bytes")
    ap.add_argument("--questions", type=int, default=0, help="the first N questions (0: all)")
    ap.add_argument("--tasks", default=os.path.join(DATA, "tasks.jsonl"))
    ap.add_argument("--prompt", default=os.path.join(DATA, "prompt.json"),
                    help="few-shot turns and the question template")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=512,
                    help="generated tokens per thread at most (budget mode plans for it)")
    ap.add_argument("--seed", type=int, default=1,
                    help="sampling seed: question q's thread i draws with seed + 1000 q + i")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the replica")
    ap.add_argument("--configs", default="dense,dms", help="which to run, in order")
    ap.add_argument("--job-timeout", type=float, default=1800)
    ap.add_argument("--verbose", action="store_true", help="one line per question and config")
    ap.add_argument("--json-out", help="write the figures (and every thread's answer and text) here")
    ap.add_argument("--check-admitted-ratio", type=float, default=0.0,
                    help="fail unless every job ended with an answer or none, nothing failed, and "
                    "dms admitted at least this many times dense's threads on every question; "
                    "nothing about accuracy is checked")
    args = ap.parse_args()

    tasks = load_tasks(args.tasks, args.questions)
    with open(args.prompt) as f:
        prompt_cfg = json.load(f)
    adapter = args.adapter or find_adapter()
    if adapter:
        dms_name, dms_extra = "dms", ["--dms-adapter", adapter, "--kv-policy", "dms"]
    else:
        dms_name = "forced"
        dms_extra = ["--kv-policy", "forced", "--dms-force-rate", str(args.forced_rate),
                     "--dms-window", str(args.window)]
    configs = {"dense": ("dense", ["--kv-policy", "none"]), "dms": (dms_name, dms_extra)}
    stubs = tempfile.mkdtemp(prefix="dmsrt_stubs_")
    atexit.register(shutil.rmtree, stubs, True)  # the generated gRPC stubs
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.time()
    runs = {}
    for key in args.configs.split(","):
        name, extra = configs[key]
        runs[key] = run_config(args, name, extra, tasks, prompt_cfg, stubs)

    mib = lambda b: b / 1048576.0
    print(f"\n{len(tasks)} questions ({os.path.relpath(args.tasks, SRC)}), budget "
          f"{mib(args.budget):.0f} MiB per job and replica, temperature {args.temperature}, "
          f"max {args.max_tokens} tokens, seed {args.seed}, model {os.path.basename(bb.MODEL)}"
          + (f", adapter {os.path.relpath(adapter, SRC)}" if adapter else
             f", no adapter: forced {args.forced_rate} w={args.window}"))
    print("| config | threads admitted, mean (min-max) | vote accuracy | one-thread accuracy "
          "| tokens/s | reply tokens, median | resident tokens/thread at end | cache CR, mean "
          "| peak KV MiB/thread | peak KV MiB | preemptions | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in runs.items():
        label = r["config"]
        if r["config"] == "dms":
            label = f"dms (w={r['window']}, calibrated rate {r['calibrated_eviction_rate']:.3f})"
        elif r["config"] == "forced":
            label = f"forced {r['force_rate']:g} (w={r['window']})"
        print(f"| {label} | {r['admitted_mean']:.2f} ({r['admitted_min']}-{r['admitted_max']}) | "
              f"{r['vote_accuracy']:.3f} | {r['one_thread_accuracy']:.3f} | "
              f"{r['tokens_per_second']:.1f} | {r['reply_tokens_median']:.0f} | "
              f"{r['resident_tokens_per_thread_mean']:.0f} | {r['cache_cr_mean']:.2f} | "
              f"{mib(r['peak_kv_bytes_per_thread_mean']):.2f} | {mib(r['peak_kv_bytes']):.1f} | "
              f"{r['preemptions']} | {r['wall_seconds']:.0f} |")
    print("resident tokens/thread: (prompt + generated) / the thread's cache CR when it ends, per KV "
          "head, prompt included (dense threads share the prompt's blocks); peak KV MiB/thread: the "
          "most KV blocks in use during a job (sampled) over its threads, averaged over questions; "
          "peak KV MiB: the replica's highest over the run")

    report = {"started": started, "command": " ".join([os.path.relpath(sys.argv[0], SRC)] + sys.argv[1:]),
              "model": os.path.basename(bb.MODEL), "adapter": adapter, "budget_bytes": args.budget,
              "temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed,
              "runs": runs, "wall_seconds": time.time() - t0}
    problems = []
    if "dense" in runs and "dms" in runs:
        dense, dms = runs["dense"], runs["dms"]
        ratio = dms["admitted_mean"] / max(1e-9, dense["admitted_mean"])
        vd = [r["vote_correct"] for r in dense["rows"]]
        vm = [r["vote_correct"] for r in dms["rows"]]
        od = [r["one_thread_accuracy"] for r in dense["rows"]]
        om = [r["one_thread_accuracy"] for r in dms["rows"]]
        vote_diff = paired_bootstrap(vd, vm, 10000, args.seed)
        one_diff = paired_bootstrap(od, om, 10000, args.seed + 1)
        only_dense, only_dms, p = mcnemar_exact(vd, vm)
        kv_ratio = dense["peak_kv_bytes_per_thread_mean"] / max(1.0, dms["peak_kv_bytes_per_thread_mean"])
        print(f"{dms['config']} / dense: {ratio:.2f}x threads admitted (mean over questions); "
              f"{kv_ratio:.2f}x less peak KV per thread")
        print(f"vote accuracy {dms['config']} - dense: {vote_diff[0]:+.3f}, 95 % CI "
              f"[{vote_diff[1]:+.3f}, {vote_diff[2]:+.3f}] (paired bootstrap over {len(vd)} questions, "
              f"10,000 resamples); votes disagree on {only_dense + only_dms} questions: "
              f"{only_dense} only dense right, {only_dms} only {dms['config']} right, exact McNemar "
              f"p = {p:.3f}")
        print(f"one-thread accuracy {dms['config']} - dense: {one_diff[0]:+.3f}, 95 % CI "
              f"[{one_diff[1]:+.3f}, {one_diff[2]:+.3f}] (paired bootstrap)")
        report.update({"ratio_admitted": ratio, "ratio_peak_kv_per_thread": kv_ratio,
                       "vote_accuracy_diff": {"mean": vote_diff[0], "ci95": vote_diff[1:],
                                              "method": "paired bootstrap over questions, 10000"},
                       "one_thread_accuracy_diff": {"mean": one_diff[0], "ci95": one_diff[1:],
                                                    "method": "paired bootstrap over questions, 10000"},
                       "mcnemar": {"only_dense_right": only_dense, "only_dms_right": only_dms,
                                   "p_two_sided_exact": p}})
        if args.check_admitted_ratio:
            for a, b in zip(dense["rows"], dms["rows"]):
                if b["n"] < args.check_admitted_ratio * a["n"]:
                    problems.append(f"question {a['id']}: {dms['config']} admitted {b['n']} threads, "
                                    f"dense {a['n']}: below {args.check_admitted_ratio}x")
            if adapter and dms["calibrated_eviction_rate"] <= 0:
                problems.append("the dms replica reports no calibrated eviction rate "
                                "(adapter metadata dms_eviction_rate)")
    if args.check_admitted_ratio:
        for r in runs.values():
            bad = [o for o in r["outcomes"] if o not in ("JOB_SUCCEEDED", "JOB_NO_ANSWER")]
            if bad:
                problems.append(f"{r['config']}: jobs ended {bad}")
            if r["questions"] != len(tasks):
                problems.append(f"{r['config']}: ran {r['questions']} of {len(tasks)} questions")
        if len(runs) < 2:
            problems.append("--check-admitted-ratio needs both configs")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    for p in problems:
        print("FAIL:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
