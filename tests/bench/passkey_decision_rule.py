"""Passkey retrieval under a DMS adapter's decisions, in transformers with exact masks: the
runtime's rule (a token is flagged when its decision logit > 0) against a rank rule (flagged
unless its logit is among the lowest --keep share of the last --M logits of its KV head, so that
a low-scoring haystack is evicted no harder than prose). Test-only; not used by the runtime.

The prompts are `dmsrt eval`'s passkey probe, token for token (`dmsrt eval
--write-passkey-prompts`, read as kvpress_presses.py reads them); greedy decoding over a full
KV cache with the eviction applied as an attention mask (token k hidden from queries more than
w tokens later when flagged), the flags computed from the adapter's logits as runtime/backend/dms_decisions.cc computes them. The zero
rule reproduces the runtime's cache CR on the 4096-token probe (8.38x for the w = 480 adapter).
About 4 to 6 minutes per prompt on 1 to 2 cores.

    python3 tests/bench/passkey_decision_rule.py --rule rank --window 256 --keep 0.07 \\
        --passkey-depths 0.1,0.5
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import retrofit_dms as R  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvpress_presses import passkey_prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--adapter", default=os.path.join(ROOT, "adapters",
                                                      "SmolLM2-135M-Instruct.dms-w480.safetensors"))
    ap.add_argument("--rule", choices=["zero", "rank"], default="zero")
    ap.add_argument("--keep", type=float, default=0.0085, help="rank: share of tokens kept")
    ap.add_argument("--M", type=int, default=512, help="rank: tokens the share is taken over")
    ap.add_argument("--window", type=int, default=0, help="delay window (0: the adapter's)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin", "dmsrt"))
    ap.add_argument("--passkey-lengths", default="4096")
    ap.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    ap.add_argument("--json-out", default="/tmp/passkey_decision_rule.json",
                    help="results; the prompts are written beside it")
    ap.add_argument("--max-new", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok, model = R.load_model(a.model, "cpu")
    cfg = model.config
    tensors, meta = R.read_file(a.adapter, cfg)
    W = a.window or int(meta["dms_window_size"])
    scale, offset = float(meta["dms_alpha_scale"]), float(meta["dms_initial_alpha_offset"])
    adapters = R.adapters_from(tensors, cfg, scale, offset)
    L = cfg.num_hidden_layers

    logits = {}  # layer -> [S, n_kv] all logits so far

    def pre_hook(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            lg = R.runtime_logits(x[0], adapters[i].weight, adapters[i].norm, adapters[i].bias,
                                  adapters[i].eps, scale, offset)
            logits[i] = lg if i not in logits else torch.cat([logits[i], lg])
        return hook

    def flags_of(lg):
        """[S, n_kv] logits -> [S, n_kv] flags (flag(k) from logit[k+1]; the newest 0)."""
        S, H = lg.shape
        if a.rule == "zero":
            d = lg > 0
        else:
            # threshold at t: the `keep` quantile of logits[t-M+1 .. t] (fewer at the start)
            pad = torch.full((a.M - 1, H), float("nan"))
            x = torch.cat([pad, lg]).T.unfold(1, a.M, 1)  # [H, S, M]
            thr = torch.nanquantile(x, a.keep, dim=-1).T   # [S, H]
            d = lg > thr
        return F.pad(d[1:], (0, 0, 0, 1), value=False)

    stats = {"flagged": 0, "total": 0}

    def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g = Hq // Hkv
        q = query.view(B, Hkv, g, T, D)
        scores = torch.matmul(q, key[:, :, None].transpose(-1, -2)) * scaling  # [B,Hkv,g,T,S]
        qpos = torch.arange(S - T, S)[:, None]
        kpos = torch.arange(S)[None, :]
        scores = scores.masked_fill((kpos > qpos)[None, None, None], float("-inf"))
        fl = flags_of(logits[module.layer_idx])  # [S, Hkv]
        far = (qpos - kpos) > W                    # [T, S]
        ev = far[None] & fl.T[:, None, :]          # [Hkv, T, S]
        scores = scores.masked_fill(ev[None, :, None], float("-inf"))
        if T > 1 and module.layer_idx is not None:
            stats["flagged"] += int(fl[: S - W - 1].sum()) if S > W + 1 else 0
            stats["total"] += max(0, S - W - 1) * Hkv
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value[:, :, None]).reshape(B, Hq, T, D).transpose(1, 2).contiguous()
        return out, None

    from transformers import AttentionInterface
    AttentionInterface.register("pkrank", attn)
    model.config._attn_implementation = "pkrank"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "pkrank"
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)

    res = []
    key_offset = len(tok.encode(" The pass key is", add_special_tokens=False))
    for p in passkey_prompts(a)["prompts"]:
        ids, key, depth = p["tokens"], p["key"], p["depth"]
        logits.clear()
        stats.update(flagged=0, total=0)
        t0 = time.time()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            past = out.past_key_values
            gen = []
            nxt = int(out.logits[0, -1].argmax())
            for _ in range(a.max_new):
                gen.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = int(out.logits[0, -1].argmax())
        ans = tok.decode(gen)
        # needle kept: heads (of L x n_kv) that keep the first key digit token of the needle
        key_tok = p["needle_token"] + key_offset
        kept = sum(int(not flags_of(logits[i])[key_tok, h]) for i in range(L)
                   for h in range(cfg.num_key_value_heads))
        rate = stats["flagged"] / max(1, stats["total"])
        n = len(ids)
        cr = n / (W + 1 + (1 - rate) * (n - W - 1))
        r = {"length": n, "depth": depth, "key": key, "answer": ans, "correct": key in ans, "rate": rate,
             "cr_est": cr, "heads_keeping_key": kept, "seconds": time.time() - t0}
        print(json.dumps(r), flush=True)
        res.append(r)
    summary = {"rule": a.rule, "keep": a.keep, "M": a.M, "window": W,
               "correct": sum(r["correct"] for r in res), "of": len(res)}
    print(json.dumps(summary))
    with open(a.json_out, "w") as f:
        json.dump({**summary, "passkey": res}, f, indent=1)


if __name__ == "__main__":
    main()
