#!/usr/bin/env python3
"""Python client for the dmsrt JobService (proto/dmsrt/v1/dmsrt.proto).

The gRPC stubs are generated from the .proto files at first use with grpcio-tools into a
temporary directory (or --stubs-dir), so nothing generated is committed and the client always
matches the protocol in the tree.

    pip install grpcio grpcio-tools
    python3 examples/python/dmsrt_client.py --address 127.0.0.1:50051 \
        --chat "What is 6 * 7? Answer with \\boxed{}." --n 8 --max-tokens 48

Library use:
    client = DmsrtClient("127.0.0.1:50051")
    result = client.run_job(chat="What is 2+2?", n=4, max_tokens=32)
    print(result["answer"], result["votes"])
"""

import argparse
import importlib
import json
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_PROTO_ROOT = os.path.normpath(os.path.join(_HERE, "..", "..", "proto"))
_pb = None
_pb_grpc = None


def load_stubs(stubs_dir=None, proto_root=_PROTO_ROOT):
    """Generates (once) and imports dmsrt_pb2 / dmsrt_pb2_grpc; returns (pb2, pb2_grpc)."""
    global _pb, _pb_grpc
    if _pb is not None:
        return _pb, _pb_grpc
    from grpc_tools import protoc  # grpcio-tools
    import grpc_tools

    out = stubs_dir or tempfile.mkdtemp(prefix="dmsrt_stubs_")
    os.makedirs(out, exist_ok=True)
    protos = [os.path.join(proto_root, "dmsrt", "v1", f) for f in ("dmsrt.proto", "replica.proto")]
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}"] + protos)
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) for {protos}")
    if out not in sys.path:
        sys.path.insert(0, out)
    _pb = importlib.import_module("dmsrt.v1.dmsrt_pb2")
    _pb_grpc = importlib.import_module("dmsrt.v1.dmsrt_pb2_grpc")
    return _pb, _pb_grpc


class DmsrtClient:
    def __init__(self, address, auth_token=None, stubs_dir=None):
        import grpc

        self.grpc = grpc
        self.pb, pb_grpc = load_stubs(stubs_dir)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.JobServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else None

    def close(self):
        self.channel.close()

    def request(self, prompt=None, chat=None, messages=None, n=0, kv_budget_bytes=0, max_tokens=0,
                temperature=0.7, top_p=1.0, top_k=0, seed=0, stop=(), regex="",
                selection=0, early_stop=False, deadline_seconds=0.0, stream_tokens=False,
                ignore_eos=False, top_logprobs=0):
        pb = self.pb
        req = pb.JobRequest(n=n, deadline_seconds=deadline_seconds, stream_tokens=stream_tokens)
        req.response.top_logprobs = top_logprobs  # per token, the k most likely (with stream_tokens)
        if prompt is not None:
            req.prompt = prompt
        if chat is not None:
            req.chat = chat
        if messages is not None:  # [{"role": "system" | "user" | "assistant", "content": text}, ...]
            for m in messages:
                req.conversation.messages.add(role=m["role"], content=m["content"])
        req.sampling.CopyFrom(pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                                seed=seed))
        req.stopping.CopyFrom(pb.StoppingCriteria(max_tokens=max_tokens, stop=list(stop),
                                                  ignore_eos=ignore_eos))
        if kv_budget_bytes:
            req.kv.kv_budget_bytes = kv_budget_bytes
        req.answer.CopyFrom(pb.AnswerOptions(extraction_regex=regex, selection=selection,
                                             early_stop=early_stop))
        return req

    def run_job(self, timeout=None, **kw):
        """RunJob: submit + watch. Returns a dict with the final event's contents."""
        req = self.request(**kw)
        result = {"job_id": None, "events": 0, "threads": [], "votes": {}, "answer": None,
                  "outcome": None, "tokens_streamed": 0, "token_events": []}
        for ev in self.stub.RunJob(req, timeout=timeout, metadata=self.metadata):
            result["job_id"] = ev.job_id
            result["events"] += 1
            kind = ev.WhichOneof("event")
            if kind == "token":
                result["tokens_streamed"] += len(ev.token.token_ids)
                t = ev.token
                result["token_events"].append({
                    "thread": t.thread_index, "text": t.text, "token_ids": list(t.token_ids),
                    "logprobs": list(t.logprobs),
                    # per token: [(token id, its bytes decoded leniently, logprob)], likeliest first
                    "top_logprobs": [[(e.token_id, e.text.decode("utf-8", "replace"), e.logprob)
                                      for e in listing.entries] for listing in t.top_logprobs]})
            elif kind == "job_finished":
                jf = ev.job_finished
                result["outcome"] = self.pb.JobOutcome.Name(jf.outcome)
                result["answer"] = jf.selected_answer if jf.has_answer else None
                result["votes"] = {v.answer: v.votes for v in jf.votes}
                result["n"] = jf.n
                result["threads"] = [{
                    "index": t.thread_index,
                    "reason": self.pb.FinishReason.Name(t.reason),
                    "tokens": t.tokens,
                    "cache_cr": t.cache_cr,
                    "answer": t.answer if t.has_answer else None,
                    "replica": t.replica,
                    "text": t.text,
                } for t in jf.threads]
                result["usage"] = {"prompt_tokens": jf.usage.prompt_tokens,
                                   "generated_tokens": jf.usage.generated_tokens,
                                   "seconds": jf.usage.seconds}
        return result

    def submit(self, **kw):
        return self.stub.SubmitJob(self.request(**kw), metadata=self.metadata)

    def watch(self, job_id, timeout=None):
        return self.stub.WatchJob(self.pb.WatchJobRequest(job_id=job_id), timeout=timeout,
                                  metadata=self.metadata)

    def get(self, job_id):
        return self.stub.GetJob(self.pb.GetJobRequest(job_id=job_id), metadata=self.metadata)

    def cancel(self, job_id, thread_index=None):
        req = self.pb.CancelJobRequest(job_id=job_id)
        if thread_index is not None:
            req.has_thread_index = True
            req.thread_index = thread_index
        return self.stub.CancelJob(req, metadata=self.metadata)

    def cluster(self):
        return self.stub.GetClusterStatus(self.pb.GetClusterStatusRequest(), metadata=self.metadata)


def main():
    ap = argparse.ArgumentParser(description="dmsrt Python client: run one best-of-N job")
    ap.add_argument("--address", default="127.0.0.1:50051")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--chat")
    g.add_argument("--message", action="append", metavar="ROLE:TEXT",
                   help="one conversation turn (system, user or assistant); repeat in order")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--auth-token")
    ap.add_argument("--stubs-dir")
    ap.add_argument("--timeout", type=float, default=None)
    a = ap.parse_args()
    client = DmsrtClient(a.address, auth_token=a.auth_token, stubs_dir=a.stubs_dir)
    try:
        messages = None
        if a.message:
            messages = [dict(zip(("role", "content"), m.split(":", 1))) for m in a.message]
        res = client.run_job(timeout=a.timeout, prompt=a.prompt, chat=a.chat, messages=messages, n=a.n,
                             max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)
    except client.grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
