#!/usr/bin/env python3
"""Fits DMS Variant B eviction predictors for a model from dense runs over calibration text.

For every layer and KV head this fits the Variant B adapter (docs/dms-semantics.md §1: RMSNorm of
the layer's input residual stream, then a linear map to one logit) so that its logit predicts how
much a token will matter later, and sets each head's bias so that the tokens predicted to matter
least are flagged at a target eviction rate. The result is an adapter file that
`dmsrt ... --dms-adapter FILE` loads (and that the main job finds beside the default model).

Targets (`--target`):

  future  (default) the log of the largest attention weight the token receives from any query
          more than `--window` tokens after it, over the query heads of its KV head group. That is
          exactly the attention a DMS flag takes away: a flagged token stays visible to the next
          w queries and to none after (§3), so a token whose attention beyond the window is small
          is a token whose eviction costs little.
  future-mean  the log of the mean attention weight the token receives from the queries more
          than `--window` tokens after it, averaged over the query heads of its group: the
          attention mass it would take away from each of them (H2O's accumulated attention,
          per query so that tokens near a run's end, with fewer later queries, are not
          penalised), where `future` asks for the single largest weight. On the held-out
          text it gives a higher KL than `future` at every window tried (docs/quality.md).
  future-v  `future` weighted by what the token's value adds to the layer's output: the largest
          attention weight from beyond the window times || W_o[:, head] v_k ||, the norm of the
          token's value through the query head's slice of the output projection. A token that
          is attended to but whose value is small changes the output little when it goes.
  kvzip   the KVzap baseline (Jegou et al., arXiv 2601.07891): the KVzip+ score, i.e. the largest
          attention weight a token receives while the model reconstructs the context (context,
          a "repeat the previous context" instruction, the context again), times the norm of the
          token's value after the output projection, divided by the norm of the query's hidden
          state; input features are the attention input (after input_layernorm), as KVzap's
          linear surrogate reads them.

Both are fitted the same way (ridge regression per layer, closed form, the ridge strength picked
on a held-out tenth of the calibration tokens) and both respect what the runtime can do: the
decision for token k is made from the input of token k+1 (the one-token shift of §2), so the
features of token k are the hidden state of token k+1.

Thresholds (`--budget`): `global` (default) flags the given fraction of all (layer, head, token)
predictions below one threshold, so heads whose tokens rarely matter later evict more than heads
that look far back; `head` gives every head the same rate.

    python3 tools/calibrate_dms.py --rate 0.885 --out adapters/SmolLM2-135M-Instruct.dms.safetensors
    python3 tools/calibrate_dms.py --target kvzip --rate 0.885 --out /tmp/kvzap.safetensors

The runtime's logit is 100 * (W . (rmsnorm(x) * g) + b) - 5, and the token is flagged when it is
positive (alpha_scale 100, initial_alpha_offset 5): the file stores W = -w, b = tau - c + 0.05 for
a fitted score w . n + c and a threshold tau, so that flagged <=> predicted score < tau.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n\n"
ALPHA_SCALE = 100.0
ALPHA_OFFSET = 5.0


def default_texts():
    files = [os.path.join(ROOT, "tests", "data", "eval", "calibration.txt")]
    files += sorted(glob.glob(os.path.join(ROOT, "tests", "data", "calib", "*.txt")))
    return [f for f in files if os.path.exists(f)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF model file")
    p.add_argument("--text", nargs="+", default=None,
                   help="calibration text files (default: tests/data/eval/calibration.txt and "
                        "tests/data/calib/*.txt); never the held-out text")
    p.add_argument("--target", choices=["future", "future-mean", "future-v", "kvzip"],
                   default="future")
    p.add_argument("--window", type=int, default=32, help="DMS delay window w (dms_window_size)")
    p.add_argument("--delay-window", type=int, default=None,
                   help="the window written to the file (dms_window_size) when it differs from "
                        "the --window the targets were measured with (default: --window)")
    p.add_argument("--rate", type=float, nargs="+", default=[0.885],
                   help="target eviction rate on the calibration text (asymptotic CR "
                        "1/(1-rate)); several rates write one file each, with {rate} in --out")
    p.add_argument("--budget", choices=["global", "head"], default="global")
    p.add_argument("--sinks", type=int, default=4,
                   help="dms_sink_tokens: the runtime never flags the first N tokens of a "
                        "sequence (attention sinks, which layer 0's input cannot recognise: it "
                        "carries no position); their rows are left out of the fit. 0 gives the "
                        "reference DMS rule")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per dense calibration run")
    p.add_argument("--ridge", type=float, nargs="+", default=[1, 10, 100, 1000, 10000],
                   help="ridge strengths tried (chosen on the held-out tenth)")
    p.add_argument("--floor-quantile", type=float, default=0.0,
                   help="raise every target below this quantile of all targets (over layers and "
                        "heads) to it before the fit: the least squares then spend their fit on "
                        "ordering the tokens that compete for the kept share, not on how little "
                        "attention the many evicted ones get (0: off)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--report", default=None, help="also write the fit report here (JSON)")
    p.add_argument("--cache", default=None,
                   help="keep the dense runs' features and targets in this .npz file and reuse "
                        "them when it exists (refits with other --rate/--budget/--ridge in seconds)")
    return p.parse_args(argv)


def attention_target(args):
    """Whether the target is attention from beyond the window (`future`, `future-mean`,
    `future-v`): plain RMS-normalised features, rows valid only where some query lies beyond
    the window."""
    return args.target != "kvzip"


def runtime_flags(tensors, layer, n):
    """The runtime's decisions from an adapter file's tensors for normalised feature rows `n`
    (rmsnorm(x) * g): flagged where 100 * (W . n + b) - 5 > 0."""
    pre = f"model.layers.{layer}.self_attn."
    logit = ALPHA_SCALE * (n @ tensors[pre + "dms_proj_alpha.weight"].T +
                           tensors[pre + "dms_proj_alpha.bias"]) - ALPHA_OFFSET
    return logit > 0


def rmsnorm(x, eps):
    return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps)


class Collector:
    """Forward hooks that keep, per layer, the input residual stream, the attention input and
    the per-KV-head target of each token, without holding every layer's attention at once."""

    def __init__(self, torch, model, args):
        self.torch = torch
        self.model = model
        self.args = args
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = cfg.hidden_size // self.n_heads
        self.resid = {}
        self.attn_in = {}
        self.values = {}
        self.target = {}
        self.ctx_len = None  # kvzip: tokens of the context part
        self.query_from = None  # kvzip: first reconstruction query
        handles = []
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            handles.append(layer.self_attn.v_proj.register_forward_hook(self._v(i)))
            handles.append(layer.self_attn.register_forward_hook(self._attn(i), with_kwargs=True))
        self.handles = handles

    def _pre(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.resid[i] = h[0].detach().float().numpy().copy()
        return hook

    def _v(self, i):
        def hook(module, inp, out):
            self.values[i] = out[0].detach()
        return hook

    def _attn(self, i):
        def hook(module, args, kwargs, out):
            torch = self.torch
            h = args[0] if args else kwargs["hidden_states"]
            self.attn_in[i] = h[0].detach().float().numpy().copy()
            a = out[1][0].detach()  # [heads, L, L]
            L = a.shape[-1]
            w = self.args.window
            if attention_target(self.args):
                q = torch.arange(L).view(L, 1)
                k = torch.arange(L).view(1, L)
                a = a.masked_fill((q - k) <= w, 0.0)
                if self.args.target == "future-mean":
                    n_q = (L - 1 - w - torch.arange(L)).clamp(min=1).to(a.dtype)
                    m = a.sum(dim=1) / n_q  # [heads, L]: mean over the queries beyond the window
                else:
                    m = a.amax(dim=1)  # [heads, L]: best query beyond the window, per key
                if self.args.target == "future-v":
                    m = m * self._out_norms(module, i, L)
            else:
                c, q0 = self.ctx_len, self.query_from
                a = a[:, q0:, :c]  # reconstruction queries x context keys
                hq = torch.linalg.norm(h[0, q0:], dim=-1)  # [Q]
                a = a / hq.view(1, -1, 1)
                a = a * self._out_norms(module, i, c).view(self.n_heads, 1, c)
                m = a.amax(dim=1)  # [heads, c]
            if self.args.target == "future-mean":
                m = m.view(self.n_kv, self.group, -1).mean(dim=1)
            else:
                m = m.view(self.n_kv, self.group, -1).amax(dim=1)
            self.target[i] = torch.log(m + 1e-6).float().numpy()
        return hook

    def _out_norms(self, module, i, c):
        """|| W_o[:, head] v_k || for the first c tokens, per query head (its KV head's value
        through that query head's slice of the output projection): [heads, c]."""
        torch = self.torch
        wo = module.o_proj.weight.detach()  # [hidden, heads*hd]
        v = self.values[i][:c].view(c, self.n_kv, self.head_dim)
        norms = []
        for hh in range(self.n_heads):
            j = hh // self.group
            wo_h = wo[:, hh * self.head_dim:(hh + 1) * self.head_dim]
            norms.append(torch.linalg.norm(v[:, j, :] @ wo_h.T, dim=-1))
        return torch.stack(norms)

    def close(self):
        for h in self.handles:
            h.remove()


def load(args):
    import torch
    import transformers
    if args.threads:
        torch.set_num_threads(args.threads)
    d, f = os.path.dirname(os.path.abspath(args.model)), os.path.basename(args.model)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return torch, tok, model


def chunks_of(ids, n, window):
    out = []
    for s in range(0, len(ids), n):
        c = ids[s:s + n]
        if len(c) > 4 * window:
            out.append(c)
    return out


def collect(args, torch, tok, model, texts):
    """Runs the dense model over every chunk; returns per-layer feature rows, targets and a mask
    of the rows that have a target, plus the chunk index of each row."""
    col = Collector(torch, model, args)
    eps = model.config.rms_norm_eps
    ln_w = [layer.input_layernorm.weight.detach().float().numpy() for layer in model.model.layers]
    feats = [[] for _ in range(col.n_layers)]
    targs = [[] for _ in range(col.n_layers)]
    valid = []
    chunk_id = []
    runs = []
    for path in texts:
        ids = tok(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
        runs += chunks_of(ids, args.chunk, args.window)
    if not runs:
        raise SystemExit(f"calibrate_dms: no calibration run is longer than 4 x --window "
                         f"({4 * args.window} tokens) with --chunk {args.chunk}: use a longer "
                         f"--chunk, longer texts or a shorter --window")
    repeat = tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
    t0 = time.time()
    for ci, ids in enumerate(runs):
        L = len(ids)
        seq = ids if attention_target(args) else ids + repeat + ids
        col.ctx_len, col.query_from = L, L + len(repeat)
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]), use_cache=False)
        # Row k is token k's decision, made from the input of token k+1: rows 0..L-2.
        for i in range(col.n_layers):
            if attention_target(args):
                x = rmsnorm(col.resid[i][1:L], eps)
            else:
                x = rmsnorm(col.resid[i][1:L], eps) * ln_w[i]
            t = col.target[i][:, :L - 1].T.copy()  # [L-1, kv]
            feats[i].append(x.astype(np.float32))
            targs[i].append(t.astype(np.float32))
        k = np.arange(L - 1)
        v = np.ones(L - 1, dtype=bool)
        if attention_target(args):
            v = k + args.window + 1 <= L - 1  # some query lies beyond the window
        valid.append(v)
        chunk_id.append(np.full(L - 1, ci))
        print(f"\rcalibration run {ci + 1}/{len(runs)} ({L} tokens, {time.time() - t0:.0f} s)",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    col.close()
    X = [np.concatenate(f) for f in feats]
    Y = [np.concatenate(t) for t in targs]
    return X, Y, np.concatenate(valid), np.concatenate(chunk_id), ln_w, sum(len(r) for r in runs)


class Ridge:
    """Least squares with an unpenalised intercept, for several ridge strengths from one pass
    over the rows: keeps the centred Gram matrices."""

    def __init__(self, X, Y):
        X = X.astype(np.float64)
        Y = Y.astype(np.float64)
        self.mx, self.my = X.mean(0), Y.mean(0)
        Xc = X - self.mx
        self.G = Xc.T @ Xc
        self.R = Xc.T @ (Y - self.my)

    def solve(self, lam):
        """Returns (W [kv, d], c [kv])."""
        W = np.linalg.solve(self.G + lam * np.eye(self.G.shape[0]), self.R).T
        return W, self.my - W @ self.mx


def recall_at_keep(y, s, keep):
    """Of the tokens whose true score is in the top `keep` fraction, the fraction that the
    predicted score also keeps (top `keep`)."""
    n = max(1, int(round(keep * len(y))))
    true_top = set(np.argsort(-y)[:n].tolist())
    pred_top = np.argsort(-s)[:n].tolist()
    return sum(1 for i in pred_top if i in true_top) / n


def fit(args, X, Y, valid, chunk_id):
    n_chunks = int(chunk_id.max()) + 1
    held = chunk_id >= n_chunks - max(1, n_chunks // 10)  # the last tenth of the runs
    report = []
    params = []
    keep = 1.0 - (args.rate[0] if isinstance(args.rate, list) else args.rate)
    for i, (x, y) in enumerate(zip(X, Y)):
        tr, va = valid & ~held, valid & held
        fit_tr = Ridge(x[tr], y[tr])
        best = None
        for lam in args.ridge:
            W, c = fit_tr.solve(lam)
            s_va = x[va] @ W.T + c
            err = float(np.mean((s_va - y[va]) ** 2))
            if best is None or err < best[0]:
                best = (err, lam, s_va)
        W, c = Ridge(x[valid], y[valid]).solve(best[1])
        var = float(np.var(y[va]))
        rec = [recall_at_keep(y[va][:, j], best[2][:, j], keep) for j in range(y.shape[1])]
        report.append({"layer": i, "ridge": best[1], "r2": 1 - best[0] / var if var > 0 else 0.0,
                       "recall_at_keep": rec})
        params.append((W, c))
        print(f"\rfit layer {i + 1}/{len(X)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return params, report


def thresholds(args, X, params):
    scores = [x @ W.T + c for x, (W, c) in zip(X, params)]  # [N, kv] per layer
    if args.budget == "global":
        tau = float(np.quantile(np.concatenate([s.ravel() for s in scores]), args.rate))
        taus = [np.full(s.shape[1], tau) for s in scores]
    else:
        taus = [np.quantile(s, args.rate, axis=0) for s in scores]
    rates = [(s < t).mean(0) for s, t in zip(scores, taus)]
    return taus, rates


def write_adapter(args, params, taus, ln_w, rate, texts_sha, extra):
    import torch
    from safetensors.torch import save_file
    tensors = {}
    for i, ((W, c), tau) in enumerate(zip(params, taus)):
        pre = f"model.layers.{i}.self_attn."
        g = np.ones_like(ln_w[i]) if attention_target(args) else ln_w[i]
        # Features were rmsnorm(x) * g with g folded in; the runtime applies g itself.
        tensors[pre + "dms_proj_alpha_norm.weight"] = torch.tensor(np.ascontiguousarray(g), dtype=torch.float32)
        tensors[pre + "dms_proj_alpha.weight"] = torch.tensor(np.ascontiguousarray(-W), dtype=torch.float32)
        b = tau - c + ALPHA_OFFSET / ALPHA_SCALE
        tensors[pre + "dms_proj_alpha.bias"] = torch.tensor(np.ascontiguousarray(b), dtype=torch.float32)
    meta = {
        "dms_window_size": str(args.delay_window or args.window),
        "dms_alpha_scale": str(ALPHA_SCALE),
        "dms_initial_alpha_offset": str(ALPHA_OFFSET),
        "dms_alpha_per": "head",
        "dms_cr": f"{1.0 / (1.0 - args.rate):.1f}x",
        "dms_eviction_rate": f"{rate:.4f}",
        "dms_sink_tokens": str(args.sinks),
        "producer": "tools/calibrate_dms.py",
        "command": " ".join(shlex.quote(a) for a in ["python3", "tools/calibrate_dms.py"] + sys.argv[1:]),
        "calibration_sha256": texts_sha,
        "target": args.target,
        "budget": args.budget,
    }
    meta.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=meta)


def check_written(args, X, params, taus):
    """Re-reads the file and applies the runtime's formula to the calibration features: the hard
    decisions must equal the fitted ones."""
    from safetensors.numpy import load_file
    t = load_file(args.out)
    mism = 0
    total = 0
    for i, (x, (W, c), tau) in enumerate(zip(X, params, taus)):
        g = t[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"]
        # kvzip features already include g (the input_layernorm weight); future ones use g = 1.
        got = runtime_flags(t, i, x * g if attention_target(args) else x)
        want = (x @ W.T + c) < tau
        # Rows at the threshold itself may round either way in float32.
        near = np.abs(x @ W.T + c - tau) < 1e-4
        mism += int(((want != got) & ~near).sum())
        total += want.size
    if mism:
        raise SystemExit(f"calibrate_dms: {args.out}: {mism} of {total} decisions differ from the fit")


def main(argv):
    args = parse_args(argv)
    if not all(0.0 < r < 1.0 for r in args.rate):
        raise SystemExit("--rate must be in (0, 1)")
    if not 0.0 <= args.floor_quantile < 1.0:
        raise SystemExit("--floor-quantile must be in [0, 1)")
    if len(args.rate) > 1 and "{rate}" not in args.out:
        raise SystemExit("several --rate values need {rate} in --out")
    texts = args.text or default_texts()
    heldout = os.path.join(ROOT, "tests", "data", "eval", "heldout.txt")
    for t in texts:
        if os.path.abspath(t) == heldout:
            raise SystemExit(f"calibrate_dms: {t} is the held-out text; calibrate on other text")
    h = hashlib.sha256()
    for t in texts:
        with open(t, "rb") as f:
            h.update(f.read())
    t0 = time.time()
    key = f"{h.hexdigest()}:{args.target}:{args.window}:{args.chunk}"
    if args.cache and os.path.exists(args.cache):
        z = np.load(args.cache)
        if str(z["key"]).split(":")[:4] != key.split(":"):
            raise SystemExit(f"calibrate_dms: {args.cache} holds runs of other settings; remove it")
        n_layers = int(z["n_layers"])
        X = [z[f"x{i}"] for i in range(n_layers)]
        Y = [z[f"y{i}"] for i in range(n_layers)]
        ln_w = [z[f"g{i}"] for i in range(n_layers)]
        valid, chunk_id, n_tokens = z["valid"], z["chunk_id"], int(z["n_tokens"])
    else:
        torch, tok, model = load(args)
        X, Y, valid, chunk_id, ln_w, n_tokens = collect(args, torch, tok, model, texts)
        if args.cache:
            arrays = {f"x{i}": x for i, x in enumerate(X)}
            arrays.update({f"y{i}": y for i, y in enumerate(Y)})
            arrays.update({f"g{i}": g for i, g in enumerate(ln_w)})
            np.savez(args.cache, key=key, n_layers=len(X), valid=valid, chunk_id=chunk_id,
                     n_tokens=n_tokens, **arrays)
    t1 = time.time()
    # Rows of the sinks (position < --sinks in their run) are decided by the runtime, not the fit.
    first = np.r_[0, np.flatnonzero(np.diff(chunk_id)) + 1]
    pos = np.arange(len(chunk_id)) - first[np.searchsorted(first, np.arange(len(chunk_id)), "right") - 1]
    decided = pos >= args.sinks
    valid = valid & decided
    X = [x[decided] for x in X]
    Y = [y[decided] for y in Y]
    valid, chunk_id = valid[decided], chunk_id[decided]
    if args.floor_quantile > 0:
        floor = float(np.quantile(np.concatenate([y[valid].ravel() for y in Y]), args.floor_quantile))
        Y = [np.maximum(y, floor) for y in Y]
    params, report = fit(args, X, Y, valid, chunk_id)
    all_rates, out_template = args.rate, args.out
    for target_rate in all_rates:
        args.rate = target_rate
        args.out = out_template.replace("{rate}", f"{target_rate:g}")
        write_one(args, X, params, report, ln_w, h.hexdigest(), texts, n_tokens, t0, t1)
    return 0


def write_one(args, X, params, report, ln_w, texts_sha, texts, n_tokens, t0, t1):
    taus, rates = thresholds(args, X, params)
    rate = float(np.mean([r.mean() for r in rates]))
    extra = {"calibration_tokens": str(n_tokens), "calibration_files": ",".join(
        os.path.relpath(t, ROOT) for t in texts)}
    write_adapter(args, params, taus, ln_w, rate, texts_sha, extra)
    check_written(args, X, params, taus)
    mean_r2 = float(np.mean([r["r2"] for r in report]))
    keep = 1.0 - (args.rate[0] if isinstance(args.rate, list) else args.rate)
    mean_rec = float(np.mean([np.mean(r["recall_at_keep"]) for r in report]))
    summary = {
        "out": args.out, "target": args.target, "budget": args.budget, "window": args.window,
        "sinks": args.sinks, "floor_quantile": args.floor_quantile, "rate_target": args.rate,
        "rate_on_calibration": rate,
        "calibration_tokens": n_tokens, "calibration_sha256": texts_sha,
        "dense_runs_s": round(t1 - t0, 1), "fit_s": round(time.time() - t1, 1),
        "mean_r2_heldout_tenth": mean_r2, "mean_recall_at_keep_heldout_tenth": mean_rec,
        "per_layer_rate": [[round(float(v), 3) for v in r] for r in rates],
        "layers": report,
    }
    if args.report:
        with open(args.report.replace("{rate}", f"{args.rate:g}"), "w") as f:
            json.dump(summary, f, indent=1)
    print(f"calibrate_dms: wrote {args.out}: target {args.target}, budget {args.budget}, window "
          f"{args.window}, sinks {args.sinks}, eviction rate {rate:.4f} on {n_tokens} calibration "
          f"tokens; held-out tenth: mean R^2 {mean_r2:.3f}, recall of the kept "
          f"{100 * keep:.1f}% {mean_rec:.3f} (at the first rate); {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
