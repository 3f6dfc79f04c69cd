"""TLS: `serve --tls-cert --tls-key` (a self-signed certificate for 127.0.0.1 made here with the
openssl CLI); `submit --tls-ca` and a Python secure channel get answers, a plaintext client does
not; the OpenAI-compatible HTTP API is served over HTTPS with the same certificate."""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import grpc
import pytest

from conftest import BIN, MODEL, free_port


HTTPS = {}  # the OpenAI-compatible API's port, with the same certificate


@pytest.fixture(scope="module")
def tls_server():
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")
    d = tempfile.mkdtemp(prefix="dmsrt_tls_")
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    addr = f"127.0.0.1:{free_port()}"
    HTTPS["port"] = free_port()
    log = tempfile.NamedTemporaryFile(prefix="dmsrt_tls_", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    proc = subprocess.Popen([BIN, "serve", "--model", MODEL, "--listen", addr, "--threads", "1",
                             "--kv-budget", "32MiB", "--tls-cert", cert, "--tls-key", key,
                             "--http-listen", f"127.0.0.1:{HTTPS['port']}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, open(log.name).read()
            if "replica 0" in open(log.name).read():
                break
            assert time.time() < deadline, open(log.name).read()
            time.sleep(0.3)
        yield addr, cert
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


def test_tls_submit_and_python(tls_server, stubs_dir):
    addr, cert = tls_server
    deadline = time.time() + 60
    while True:
        p = subprocess.run([BIN, "submit", "--address", addr, "--tls-ca", cert, "--prompt", "1 + 2 =",
                            "--n", "2", "--max-tokens", "6", "--json"],
                           capture_output=True, text=True, timeout=120)
        # UNAVAILABLE until the replica has registered with its coordinator.
        if p.returncode == 0 or time.time() > deadline or "UNAVAILABLE" not in p.stderr:
            break
        time.sleep(0.5)
    assert p.returncode == 0, p.stderr
    from dmsrt_client import load_stubs
    pb, pb_grpc = load_stubs(stubs_dir)
    with open(cert, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    ch = grpc.secure_channel(addr, creds)
    cs = pb_grpc.JobServiceStub(ch).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
    assert len(cs.replicas) == 1
    ch.close()
    plain = grpc.insecure_channel(addr)
    with pytest.raises(grpc.RpcError) as ei:
        pb_grpc.JobServiceStub(plain).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()


def test_tls_http_api(tls_server):
    openai = pytest.importorskip("openai")
    import ssl

    import httpx
    addr, cert = tls_server
    base = f"https://127.0.0.1:{HTTPS['port']}/v1"
    c = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=60,
                      http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert)))
    r = c.completions.create(model="m", prompt="One, two,", max_tokens=3, temperature=0)
    assert r.choices[0].text
    plain = openai.OpenAI(base_url=base.replace("https", "http"), api_key="-", max_retries=0, timeout=10)
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()


def test_tls_http_disconnect_cancels_non_streamed(tls_server, stubs_dir):
    """A non-streamed HTTPS request writes nothing while its job runs; closing the connection still
    cancels the job (the front door watches the socket under the TLS session)."""
    import http.client
    import json
    import ssl

    from dmsrt_client import load_stubs
    addr, cert = tls_server
    pb, pb_grpc = load_stubs(stubs_dir)
    with open(cert, "rb") as f:
        ch = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=f.read()))
    stub = pb_grpc.JobServiceStub(ch)
    conn = http.client.HTTPSConnection("127.0.0.1", HTTPS["port"], timeout=60,
                                       context=ssl.create_default_context(cafile=cert))
    try:
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"prompt": "Tell a very long story.", "max_tokens": 500,
                                      "dmsrt": {"stopping": {"ignore_eos": True}}}))
        deadline = time.time() + 30
        jobs = []
        while not jobs:  # 500 tokens fit the 32 MiB budget; an over-budget request would get a 400
            assert time.time() < deadline, "the job never started"
            jobs = stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs
            time.sleep(0.05)
        job_id = jobs[0].job_id
        conn.sock.close()
        deadline = time.time() + 30
        while stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).outcome == pb.JOB_RUNNING:
            assert time.time() < deadline, "closing the TLS connection did not end the job"
            time.sleep(0.2)
        assert stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).outcome == pb.JOB_CANCELLED
    finally:
        conn.close()
        ch.close()
