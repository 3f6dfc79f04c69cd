#!/usr/bin/env python3
"""HTTP front door under load: --requests concurrent streaming chat completions from --clients
clients (each an `openai.AsyncOpenAI` with its own connection pool, --requests / --clients streams
open at once), then the same requests over gRPC RunJob with token streaming, against one
`dmsrt serve` (mpirun -np --np replicas) on loopback.

Reports per path: requests completed (a stream that ends without its finish chunk, usage and
[DONE] counts as lost), time to first token (median, p90, max; from sending the request to the
first token event), and wall time. Exits non-zero when any HTTP or gRPC request is lost.

    python3 tests/bench/http_load_bench.py --json build/http_load_bench.json

Needs the openai, grpcio and grpcio-tools packages (launch/setup.sh --test-deps).
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))

from conftest import Server, free_port  # noqa: E402

PROMPTS = ["What is {} + {}?", "Name a colour and a number above {}.", "Count from {} to {}."]


def prompt(i):
    return PROMPTS[i % len(PROMPTS)].format(i, i + 7)


def summary(ttfts, ok, total, wall):
    t = sorted(ttfts)
    pick = (lambda q: t[min(len(t) - 1, int(q * len(t)))]) if t else (lambda q: float("nan"))
    return {"completed": ok, "requests": total, "lost": total - ok, "wall_s": round(wall, 2),
            "ttft_median_s": round(statistics.median(t), 3) if t else None,
            "ttft_p90_s": round(pick(0.9), 3) if t else None, "ttft_max_s": round(t[-1], 3) if t else None}


async def http_run(port, requests, clients, max_tokens):
    import openai
    ttfts, ok = [], 0
    per_client = requests // clients

    async def one(c, i):
        nonlocal ok
        start = time.perf_counter()
        first, finished, usage = None, False, None
        stream = await c.chat.completions.create(
            model="m", max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": prompt(i)}])
        async for chunk in stream:
            for ch in chunk.choices:
                if first is None and ch.delta.content:
                    first = time.perf_counter() - start
                finished = finished or ch.finish_reason is not None
            usage = chunk.usage or usage
        if finished and usage is not None:
            ok += 1
        if first is not None:
            ttfts.append(first)

    async def client(k):
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=600,
                               max_retries=0)
        try:
            results = await asyncio.gather(*(one(c, k * per_client + j) for j in range(per_client)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    print(f"http request failed: {r!r} ({r.__cause__!r})", file=sys.stderr)
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return summary(ttfts, ok, per_client * clients, time.perf_counter() - t0)


def grpc_run(client, requests, max_tokens):
    ttfts, ok, lock = [], [0], threading.Lock()

    def one(i):
        req = client.request(messages=[{"role": "user", "content": prompt(i)}], n=1, max_tokens=max_tokens,
                             temperature=0.7, seed=i, stream_tokens=True)
        start = time.perf_counter()
        first, done = None, False
        try:
            for ev in client.stub.RunJob(req, metadata=client.metadata, timeout=600):
                kind = ev.WhichOneof("event")
                if kind == "token" and first is None and ev.token.text:
                    first = time.perf_counter() - start
                done = done or kind == "job_finished"
        except Exception as e:  # counted as lost
            print(f"grpc request failed: {e!r}", file=sys.stderr)
        with lock:
            ok[0] += done
            if first is not None:
                ttfts.append(first)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(ttfts, ok[0], requests, time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--grpc-first", action="store_true", help="run the gRPC round before the HTTP one")
    ap.add_argument("--json")
    a = ap.parse_args()
    from dmsrt_client import DmsrtClient
    import tempfile
    http_port = free_port()
    srv = Server(np=a.np, kv_budget="128MiB", extra=["--http-listen", f"127.0.0.1:{http_port}",
                                                     "--http-threads", "256", "--max-n", "64"])
    stubs = tempfile.TemporaryDirectory(prefix="dmsrt_stubs_")  # removed when the run ends
    client = DmsrtClient(srv.address, stubs_dir=stubs.name)
    try:
        srv.wait_ready(client)
        if a.grpc_first:
            grpc = grpc_run(client, a.requests, a.max_tokens)
            http = asyncio.run(http_run(http_port, a.requests, a.clients, a.max_tokens))
        else:
            http = asyncio.run(http_run(http_port, a.requests, a.clients, a.max_tokens))
            grpc = grpc_run(client, a.requests, a.max_tokens)
    finally:
        client.close()
        srv.stop()
    res = {"order": "grpc, http" if a.grpc_first else "http, grpc", "requests": a.requests, "clients": a.clients, "max_tokens": a.max_tokens, "replicas": a.np,
           "http": http, "grpc": grpc}
    print(f"{'path':6} {'done':>9} {'ttft med':>9} {'ttft p90':>9} {'ttft max':>9} {'wall s':>7}")
    for k in ("http", "grpc"):
        r = res[k]
        print(f"{k:6} {r['completed']:>4}/{r['requests']:<4} {r['ttft_median_s']:>9} {r['ttft_p90_s']:>9} "
              f"{r['ttft_max_s']:>9} {r['wall_s']:>7}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if http["lost"] == 0 and grpc["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
