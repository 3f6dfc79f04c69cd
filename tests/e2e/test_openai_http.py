"""The OpenAI-compatible HTTP API of the coordinator (serve --http-listen), driven by the official
`openai` Python client and by raw HTTP for the malformed requests a client library would not send.

One replica (mpirun -np 1) with the API on a free loopback port; a second server checks
--auth-token; a coordinator with one separately started replica checks the status of a
non-streamed request whose replica is killed. Every wait is bounded.
"""

import http.client
import json
import math
import signal
import threading
import time

import pytest

from conftest import MODEL, Proc, Server, free_port, wait_idle

openai = pytest.importorskip("openai", reason="the openai package is a test dependency (launch/setup.sh --test-deps)")


def start(stubs_dir, extra=(), attempts=3):
    """A one-replica serve with the HTTP front door. Ports come from free_port(), which another
    test running at the same time can take before serve binds them (an outgoing connection gets
    an ephemeral port too), so a start that could not listen is retried on fresh ports."""
    from dmsrt_client import DmsrtClient
    for attempt in range(attempts):
        http_port = free_port()
        srv = Server(np=1, kv_budget="64MiB",
                     extra=["--http-listen", f"127.0.0.1:{http_port}"] + list(extra))
        srv.http_port = http_port
        grpc_client = DmsrtClient(srv.address, stubs_dir=stubs_dir,
                                  **({"auth_token": extra[extra.index("--auth-token") + 1]}
                                     if "--auth-token" in extra else {}))
        try:
            srv.wait_ready(grpc_client)
            return srv, grpc_client
        except Exception as e:
            grpc_client.close()
            srv.stop()
            if "address in use" not in str(e) or attempt + 1 == attempts:
                raise


@pytest.fixture(scope="module")
def api(stubs_dir):
    srv, grpc_client = start(stubs_dir)
    try:
        yield srv, grpc_client
    finally:
        grpc_client.close()
        srv.stop()


@pytest.fixture()
def oai(api):
    srv, _ = api
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused",
                         timeout=120, max_retries=0)


def raw(srv, method, path, body=None, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_models(oai):
    models = oai.models.list().data
    assert len(models) == 1 and models[0].id


def test_chat(oai):
    r = oai.chat.completions.create(
        model="default", max_tokens=16, temperature=0, seed=3, user="e2e",
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is 2+3?"}])
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_with_logprobs(oai):
    r = oai.completions.create(model="default", prompt="The capital of France is", max_tokens=6,
                               temperature=0, logprobs=0, stop=["\n\n"])
    c = r.choices[0]
    assert c.text
    assert len(c.logprobs.token_logprobs) == r.usage.completion_tokens
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def check_chat_listing(content, k):
    """choices[].logprobs.content of a greedy chat completion with top_logprobs = k."""
    for entry in content:
        top = entry.top_logprobs
        assert len(top) == k, entry
        lps = [t.logprob for t in top]
        assert lps == sorted(lps, reverse=True), entry
        assert all(x <= 0 for x in lps) and sum(math.exp(x) for x in lps) <= 1 + 1e-5, entry
        # Greedy: the chosen token is the likeliest, with the same log-probability.
        assert bytes(top[0].bytes) == bytes(entry.bytes) and top[0].logprob == entry.logprob, entry
        assert entry.logprob <= 0


def test_chat_top_logprobs_whole_and_streamed(oai):
    kwargs = dict(model="default", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                  messages=[{"role": "user", "content": "Name three colours."}])
    whole = oai.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    check_chat_listing(content, 3)
    streamed = []
    for chunk in oai.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            if ch.logprobs is not None and ch.logprobs.content:
                streamed += ch.logprobs.content
    check_chat_listing(streamed, 3)
    key = lambda c: [(bytes(e.bytes), e.logprob, [(bytes(t.bytes), t.logprob) for t in e.top_logprobs])
                     for e in c]
    assert key(streamed) == key(content)
    # logprobs alone: the chosen tokens with empty listings.
    plain = oai.chat.completions.create(**dict(kwargs, top_logprobs=None))
    assert [e.logprob for e in plain.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_completions_top_logprobs_whole_and_streamed(oai):
    kwargs = dict(model="default", prompt="The capital of France is", max_tokens=6, temperature=0,
                  logprobs=3)
    whole = oai.completions.create(**kwargs)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == whole.usage.completion_tokens
    for tok, tlp, alternatives in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(alternatives) == 3, alternatives  # greedy: the chosen token is among the 3
        assert alternatives[tok] == tlp and max(alternatives.values()) == tlp, (tok, tlp, alternatives)
        assert sum(math.exp(x) for x in alternatives.values()) <= 1 + 1e-5
    tokens, token_lps, tops = [], [], []
    for chunk in oai.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            if ch.logprobs is not None and ch.logprobs.tokens:
                tokens += ch.logprobs.tokens
                token_lps += ch.logprobs.token_logprobs
                tops += ch.logprobs.top_logprobs
    assert (tokens, token_lps, tops) == (lp.tokens, lp.token_logprobs, lp.top_logprobs)


def test_streaming_matches_non_streaming(oai):
    kwargs = dict(model="default", max_tokens=12, temperature=0,
                  messages=[{"role": "user", "content": "Name three colours."}])
    whole = oai.chat.completions.create(**kwargs)
    text, usage, finish, chunks = "", None, None, 0
    for chunk in oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        chunks += 1
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert chunks >= 3
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_best_of_4_vote(oai):
    r = oai.chat.completions.create(
        model="default", n=4, max_tokens=24, temperature=0.8, seed=11,
        messages=[{"role": "user", "content": "What is 12 + 30? Answer with a number."}],
        extra_body={"dmsrt": {"answer": {"selection": "SELECTION_MAJORITY_VOTE"}}})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    ext = r.model_extra["dmsrt"]
    assert ext["n"] == 4 and ext["outcome"] in ("JOB_SUCCEEDED", "JOB_NO_ANSWER")
    answers = [c.model_extra["dmsrt"]["answer"] for c in r.choices]
    answered = [a for a in answers if a is not None]
    assert sum(ext["votes"].values()) == len(answered)
    if answered:
        assert ext["votes"][ext["selected_answer"]] == max(ext["votes"].values())
    # usage counts every thread's tokens.
    assert r.usage.completion_tokens == sum(c.model_extra["dmsrt"]["tokens"] for c in r.choices)


def running_job_id(grpc_client, timeout=20):
    """The id of the one job that is running (a non-streamed request sends no header until its
    job ends)."""
    pb = grpc_client.pb
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = grpc_client.stub.ListJobs(pb.ListJobsRequest()).jobs
        if jobs:
            assert len(jobs) == 1, jobs
            return jobs[0].job_id
        time.sleep(0.05)
    raise AssertionError("no job started")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_disconnect_cancels_and_frees_blocks(api, stream):
    srv, grpc_client = api
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a very long story."}],
                       "max_tokens": 900, "n": 2, "stream": stream,
                       "dmsrt": {"stopping": {"ignore_eos": True}}})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        job_id = resp.getheader("X-Dmsrt-Job-Id")
        got = 0
        while got < 5:  # a few token events, then hang up mid-stream
            line = resp.fp.readline()
            assert line, "the stream ended early"
            got += line.startswith(b"data: ")
    else:
        job_id = running_job_id(grpc_client)
    deadline = time.time() + 20  # blocks reach the coordinator with the next heartbeat
    while grpc_client.cluster().kv_blocks_used == 0:
        assert time.time() < deadline, "the job never held KV blocks"
        time.sleep(0.1)
    assert grpc_client.get(job_id).outcome == 1  # JOB_RUNNING: nothing ended it but the client
    conn.sock.close()
    conn.close()
    deadline = time.time() + 30
    while grpc_client.get(job_id).outcome == 1:  # JOB_RUNNING
        assert time.time() < deadline, "closing the connection did not end the job"
        time.sleep(0.2)
    assert grpc_client.get(job_id).outcome == 4  # JOB_CANCELLED
    wait_idle(grpc_client, timeout=30)
    status, metrics = raw(srv, "GET", "/v1/models")
    assert status == 200


def test_late_deadline_is_504_whole_and_in_band_streamed(api, oai):
    """A job admitted and then ended by its deadline: a non-streamed request gets 504 and an error
    object (the job's vote so far beside it), not a 200; a streamed one has sent its 200 already
    and ends with the outcome in its last chunk."""
    srv, grpc_client = api
    body = {"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 900,
            "dmsrt": {"deadline_seconds": 1.0, "stopping": {"ignore_eos": True}}}
    status, data = raw(srv, "POST", "/v1/chat/completions", body=json.dumps(body))
    assert status == 504, data[:300]
    reply = json.loads(data)
    assert reply["error"]["code"] == "deadline_exceeded" and reply["error"]["type"] == "server_error"
    assert "deadline" in reply["error"]["message"]
    assert reply["dmsrt"]["outcome"] == "JOB_DEADLINE_EXCEEDED"
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(model="default", prompt="Once upon a time", max_tokens=900,
                               extra_body={"dmsrt": {"deadline_seconds": 1.0, "stopping": {"ignore_eos": True}}})
    assert e.value.status_code == 504
    last = None
    for chunk in oai.completions.create(model="default", prompt="Once upon a time", max_tokens=900,
                                        stream=True, extra_body={"dmsrt": {"deadline_seconds": 1.0,
                                                                           "stopping": {"ignore_eos": True}}}):
        last = chunk
    assert last.model_extra["dmsrt"]["outcome"] == "JOB_DEADLINE_EXCEEDED"
    wait_idle(grpc_client, timeout=30)


def test_late_replica_loss_is_503(stubs_dir):
    """A coordinator and one replica started on its own: the replica is killed while a
    non-streamed request waits for its job, no other replica can take the threads, and the
    request gets 503 with a retryable error, not a 200."""
    from dmsrt_client import DmsrtClient
    addr, http_port = f"127.0.0.1:{free_port()}", free_port()
    coord = Proc(["coordinator", "--model", MODEL, "--listen", addr, "--http-listen", f"127.0.0.1:{http_port}"])
    rep = Proc(["serve", "--model", MODEL, "--coordinator", addr, "--threads", "1", "--kv-budget", "64MiB"])
    client = DmsrtClient(addr, stubs_dir=stubs_dir)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if any(r.state == "ready" for r in client.cluster().replicas):
                    break
            except client.grpc.RpcError:
                pass  # not listening yet
            assert time.time() < deadline, coord.text() + rep.text()
            assert coord.proc.poll() is None and rep.proc.poll() is None, coord.text() + rep.text()
            time.sleep(0.3)
        result = {}

        def request():
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
            body = json.dumps({"messages": [{"role": "user", "content": "Tell a very long story."}],
                               "max_tokens": 900, "dmsrt": {"stopping": {"ignore_eos": True}}})
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            result["status"], result["body"] = resp.status, resp.read()
            conn.close()

        t = threading.Thread(target=request)
        t.start()
        deadline = time.time() + 30
        while client.cluster().kv_blocks_used == 0:
            assert time.time() < deadline, "the job never held KV blocks"
            time.sleep(0.1)
        rep.stop(signal.SIGKILL)
        t.join(timeout=60)
        assert not t.is_alive(), "the request did not end when its replica was lost"
        assert result["status"] == 503, result
        reply = json.loads(result["body"])
        assert reply["error"]["code"] == "retryable" and "lost" in reply["error"]["message"], reply
        assert reply["dmsrt"]["outcome"] == "JOB_FAILED", reply
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200  # the coordinator stays up
        conn.close()
    finally:
        client.close()
        rep.stop()
        coord.stop()


LONG = "hello " * 9000  # more tokens than the model's context


@pytest.mark.parametrize("name,body,status", [
    ("malformed_json", b'{"messages": [', 400),
    ("not_an_object", b'[1, 2]', 400),
    ("wrong_type_max_tokens", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400),
    ("wrong_type_messages", json.dumps({"messages": "hi"}).encode(), 400),
    ("n_zero", json.dumps({"prompt": "x", "n": 0}).encode(), 400),
    ("n_huge", json.dumps({"prompt": "x", "n": 10000}).encode(), 400),
    ("negative_max_tokens", json.dumps({"prompt": "x", "max_tokens": -5}).encode(), 400),
    ("invalid_utf8", b'{"prompt": "\xff\xfe bad"}', 400),
    ("tools", json.dumps({"prompt": "x", "tools": [{"type": "function"}]}).encode(), 400),
    ("response_format_json", json.dumps({"prompt": "x", "response_format": {"type": "json_object"}}).encode(), 400),
    ("bad_extension", json.dumps({"prompt": "x", "dmsrt": {"no_such_field": 1}}).encode(), 400),
    ("logprobs_21", json.dumps({"prompt": "x", "logprobs": 21}).encode(), 400),
    ("top_logprobs_on_completions", json.dumps({"prompt": "x", "top_logprobs": 2}).encode(), 400),
    ("too_long_for_context", json.dumps({"prompt": LONG, "max_tokens": 16}).encode(), 400),
    ("ten_megabytes", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413),
])
def test_bad_input_is_an_openai_error(api, name, body, status):
    srv, _ = api
    path = "/v1/completions"
    got, data = raw(srv, "POST", path, body=body)
    assert got == status, (name, got, data[:300])
    err = json.loads(data)["error"]
    assert err["message"] and err["type"]
    assert set(err) == {"message", "type", "param", "code"}
    # The server stays up.
    assert raw(srv, "GET", "/v1/models")[0] == 200


def test_long_conversation_is_context_error(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="default", max_tokens=8,
                                    messages=[{"role": "user", "content": LONG}])
    assert e.value.code == "context_length_exceeded"


def test_auth_required_when_configured(stubs_dir):
    srv, grpc_client = start(stubs_dir, extra=["--auth-token", "s3cret"])
    try:
        base = f"http://127.0.0.1:{srv.http_port}/v1"
        bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert raw(srv, "GET", "/v1/models")[0] == 401
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0, timeout=60)
        r = good.completions.create(model="default", prompt="One, two,", max_tokens=3, temperature=0)
        assert r.choices[0].text
    finally:
        grpc_client.close()
        srv.stop()


def test_grpc_conversation_python_and_submit(api):
    import subprocess
    from conftest import BIN
    srv, grpc_client = api
    conv = [{"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": "What is 6 * 7?"}]
    res = grpc_client.run_job(messages=conv, n=2, max_tokens=8, timeout=120)
    assert len(res["threads"]) == 2
    with pytest.raises(grpc_client.grpc.RpcError) as e:
        grpc_client.run_job(messages=[{"role": "tool", "content": "x"}], n=1, max_tokens=4, timeout=60)
    assert e.value.code().name == "INVALID_ARGUMENT"
    out = subprocess.run([BIN, "submit", "--address", srv.address, "--message", "system:Answer with a number.",
                          "--message", "user:What is 6 * 7?", "--n", "1", "--max-tokens", "6", "--json",
                          "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["threads"]) == 1
