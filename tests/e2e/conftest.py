"""Fixtures for the gRPC end-to-end tests: a 2-replica `dmsrt serve` under mpirun on loopback,
plus helpers shared by the test files (best-of-N result checks, idle waits).

Every wait is bounded; the server is stopped (SIGTERM to the mpirun process group, then SIGKILL)
whatever the tests do. Ports are free 127.0.0.1 ports picked at start. Nothing leaves the host.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

SRC = os.environ.get("DMSRT_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BIN = os.environ.get("DMSRT_BIN", os.path.join(SRC, "build", "bin", "dmsrt"))
MPIRUN = os.environ.get("DMSRT_MPIRUN", "mpirun")
MODEL = os.environ.get("DMSRT_MODEL", os.path.join(SRC, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))

sys.path.insert(0, os.path.join(SRC, "examples", "python"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VOTING_REASONS = {"STOP", "STOP_STRING", "LENGTH"}


def check_best_of(res, n):
    """Common checks on a finished best-of-n result (dict from submit --json or the client)."""
    threads = res["threads"]
    assert len(threads) == n, res
    assert sorted(t["index"] for t in threads) == list(range(n))
    for t in threads:
        assert t["reason"] in VOTING_REASONS, t
        assert t["tokens"] >= 1, t
        assert t["cache_cr"] >= 1.0 - 1e-9, t
    votes = res["votes"]
    answered = [t for t in threads if t["answer"] is not None]
    # Every answered thread voted once; votes add up to n minus the threads with no answer.
    assert sum(votes.values()) == len(answered)
    assert sum(votes.values()) + (n - len(answered)) == n
    for a in set(t["answer"] for t in answered):
        assert votes[a] == sum(1 for t in answered if t["answer"] == a)
    if answered:
        top = max(votes.values())
        assert votes[res["answer"]] == top, "the selected answer must have the most votes"
    else:
        assert res["answer"] is None


def check_top_logprobs(token_events, k, greedy):
    """Token events of a job run with response.top_logprobs = k (run_job's "token_events"): one
    listing of k entries per token, likeliest first, log-probabilities <= 0 whose probabilities add
    up to at most 1; under greedy sampling the chosen token heads its listing with the same
    log-probability (the same float32). Returns the number of tokens checked."""
    import math
    count = 0
    for ev in token_events:
        assert len(ev["top_logprobs"]) == len(ev["token_ids"]) == len(ev["logprobs"]), ev
        for tok, lp, listing in zip(ev["token_ids"], ev["logprobs"], ev["top_logprobs"]):
            assert len(listing) == k, listing
            lps = [e[2] for e in listing]
            assert lps == sorted(lps, reverse=True), listing
            assert all(x <= 0 for x in lps), listing
            assert sum(math.exp(x) for x in lps) <= 1 + 1e-5, listing
            assert len({e[0] for e in listing}) == k, listing
            assert lp <= 0
            if greedy:
                assert listing[0][0] == tok and listing[0][2] == lp, (tok, lp, listing)
            count += 1
    return count


class Server:
    """`mpirun -np NP dmsrt serve ...` in its own session. `replicas` is how many replicas
    wait_ready expects (NP / tp); `env` adds environment variables; `binary` replaces
    build/bin/dmsrt (the device-emulated build, for one)."""

    def __init__(self, np=2, kv_budget="128MiB", extra=(), replicas=None, env=None, model=None,
                 binary=None):
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="dmsrt_serve_", suffix=".log", delete=False)
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
                   **(env or {}))
        self.cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                    "-np", str(np), binary or BIN, "serve", "--model", model or MODEL,
                    "--listen", self.address,
                    "--threads", "1", "--kv-budget", kv_budget,
                    "--metrics-port", str(self.metrics_port)] + list(extra)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.np = np
        self.replicas = np if replicas is None else replicas

    def log_text(self):
        with open(self.log.name, "r", errors="replace") as f:
            return f.read()

    def wait_ready(self, client, timeout=180):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                cs = client.cluster()
                ready = [r for r in cs.replicas if r.state == "ready"]
                if len(ready) == self.replicas:
                    return cs
                last = f"{len(ready)} of {self.replicas} replicas ready"
            except Exception as e:  # not listening yet
                last = repr(e)
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout}s ({last}):\n{self.log_text()}")

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class Proc:
    """One dmsrt process (`args` after the binary) without mpirun, in its own session, logging to a
    temporary file; stop() ends its process group."""

    def __init__(self, args):
        self.log = tempfile.NamedTemporaryFile(prefix="dmsrt_proc_", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
        self.proc = subprocess.Popen([BIN] + args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def standalone_replica(stubs_dir, log_prefix, serve_args, timeout=120, binary=None):
    """One `dmsrt serve` process started without mpirun (its own coordinator) with `serve_args`;
    yields a client once a replica is ready, and stops the process group afterwards. `binary`
    replaces build/bin/dmsrt (the device-emulated build, for one)."""
    import grpc
    from dmsrt_client import DmsrtClient
    addr = f"127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    proc = subprocess.Popen([binary or BIN, "serve", "--model", MODEL, "--listen", addr, "--threads", "1"]
                            + list(serve_args),
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = DmsrtClient(addr, stubs_dir=stubs_dir)
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, open(log.name).read()
            try:
                if any(r.state == "ready" for r in client.cluster().replicas):
                    break
            except grpc.RpcError:
                pass
            assert time.time() < deadline, open(log.name).read()
            time.sleep(0.3)
        yield client
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def stubs_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="session")
def server(stubs_dir):
    if not os.path.exists(BIN):
        pytest.fail(f"{BIN} not built")
    if not os.path.exists(MODEL):
        pytest.fail(f"default model {MODEL} missing: run launch/setup.sh")
    from dmsrt_client import DmsrtClient
    srv = Server()
    client = DmsrtClient(srv.address, stubs_dir=stubs_dir)
    try:
        srv.wait_ready(client)
        yield srv
    finally:
        client.close()
        srv.stop()


@pytest.fixture()
def client(server, stubs_dir):
    from dmsrt_client import DmsrtClient
    c = DmsrtClient(server.address, stubs_dir=stubs_dir)
    yield c
    c.close()


def wait_replicas_ready(client, count, procs, timeout=180):
    """Polls the coordinator until `count` replicas are ready and returns the cluster status.
    `procs` (Proc or Server objects) must stay up meanwhile; a failure shows their logs."""
    import grpc

    def logs():
        return "".join(p.text() if hasattr(p, "text") else p.log_text() for p in procs)

    deadline = time.time() + timeout
    while True:
        try:
            cs = client.cluster()
            if len([r for r in cs.replicas if r.state == "ready"]) == count:
                return cs
        except grpc.RpcError:
            pass
        assert time.time() < deadline, f"not {count} replicas ready after {timeout} s\n" + logs()
        for p in procs:
            assert p.proc.poll() is None, logs()
        time.sleep(0.5)


def wait_idle(client, timeout=30, after=None):
    """Waits until no KV block is in use and no thread runs or waits on any live replica.

    The coordinator reports each replica's figures from its last heartbeat (one every 250 ms). A
    job shorter than that can start and finish between two heartbeats, and the idle status seen
    then is the one from before the job. With `after` (a time.time() taken when the job was
    answered), only a status whose every live replica's heartbeat arrived later counts, so the
    engine figures returned (preemptions, peaks, blocks used) include the job's."""
    deadline = time.time() + timeout
    cs = None
    while time.time() < deadline:
        asked = time.time()
        cs = client.cluster()
        fresh = after is None or all(asked - r.stats_age_seconds > after
                                     for r in cs.replicas if r.state == "ready")
        if fresh and cs.kv_blocks_used == 0 and cs.running_threads == 0 and cs.queued_threads == 0:
            return cs
        time.sleep(0.2)
    raise AssertionError(f"cluster not idle after {timeout}s (heartbeats after {after}): {cs}")
