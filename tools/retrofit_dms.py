#!/usr/bin/env python3
"""DMS retrofit of a frozen model: trains the per-layer Variant B adapters and writes them as a
.safetensors file that `dmsrt <cmd> --dms-adapter FILE` loads.

What is trained (docs/dms-semantics.md, the DMS paper arXiv 2506.05345):
- per layer i, an RMSNorm over the layer's input residual stream (the hidden state entering
  decoder layer i, before input_layernorm; eps = the model's rms_norm_eps) with weight g[hidden],
  then a linear W[n_kv, hidden] + bias b[n_kv]. The runtime decides with
      logit[t, j] = scale * (W[j] . (rmsnorm(x_t) * g) + b[j]) - offset,   d[t, j] = logit > 0
  (scale = dms_alpha_scale = 100, offset = dms_initial_alpha_offset = 5); the trained logit is
  this very expression, so the hard decision of the trained adapter is the runtime's.
- one-token shift: the decision computed at token t flags token t-1 (flag(k) = d[k+1]).
- soft decisions during training: alpha_k = sigmoid((logit[k+1] + logistic noise) / tau), the
  binary-concrete (Gumbel-sigmoid) relaxation; noise = log(u) - log(1 - u).
- delayed eviction: a query q adds log(1 - alpha_k + 1e-6) to its score for key k when
  q - k > w (every query head of the KV head's group); nothing changes for q - k <= w.
- loss: KL(teacher || student) on next-token distributions (teacher = the same frozen model with
  a dense cache) + lambda * relu(target_rate(step) - mean alpha), the target ramped linearly from
  0 to --target-rate over the first --ramp of the steps, then held. Only the adapters train.

The model weights are loaded in float32 from the GGUF with transformers and frozen. Training text:
tests/data/eval/calibration.txt plus every tests/data/calib/*.txt (never heldout.txt), random
crops of --seq-len tokens.

Examples:
  python tools/retrofit_dms.py --steps 300                        # train, write, verify
  python tools/retrofit_dms.py --check adapters/X.safetensors     # verify a written file
  build/bin/dmsrt eval --dms-adapter adapters/X.safetensors --policies dms --max-tokens 4096
"""
import argparse
import glob
import hashlib
import math
import os
import random
import shlex
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "adapters/SmolLM2-135M-Instruct.dms-retrofit.safetensors"
CALIBRATION = "tests/data/eval/calibration.txt"
CALIB_DIR = "tests/data/calib"
HELDOUT = "tests/data/eval/heldout.txt"
ATTN_NAME = "dms_retrofit"
TIE = 1e-3  # |logit| below which float32 rounding may flip a decision
TENSOR_FMT = {
    "weight": "model.layers.{i}.self_attn.dms_proj_alpha.weight",
    "norm": "model.layers.{i}.self_attn.dms_proj_alpha_norm.weight",
    "bias": "model.layers.{i}.self_attn.dms_proj_alpha.bias",
}


def repo_path(p):
    """A path as given if it exists, else relative to the repository root."""
    if os.path.isabs(p) or os.path.exists(p):
        return p
    return os.path.join(ROOT, p)


# ----------------------------------------------------------------------------------------------
# Data


def training_files(extra):
    files = [repo_path(CALIBRATION)]
    calib = repo_path(CALIB_DIR)
    if os.path.isdir(calib):
        files += sorted(glob.glob(os.path.join(calib, "*.txt")))
    files += extra
    heldout = os.path.realpath(repo_path(HELDOUT))
    for f in files:
        if os.path.realpath(f) == heldout or os.path.basename(f) == "heldout.txt":
            raise SystemExit(f"refusing to train on the held-out text {f}")
    return files


def training_text(files):
    parts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            t = fh.read()
        if parts and not parts[-1].endswith("\n"):
            parts[-1] += "\n"
        parts.append(t)
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Adapters


class DmsAdapter(torch.nn.Module):
    """Variant B decision head of one layer; logit() is the runtime's expression."""

    def __init__(self, hidden, n_kv, eps, scale, offset, init_logit):
        super().__init__()
        self.eps, self.scale, self.offset = eps, scale, offset
        self.norm = torch.nn.Parameter(torch.ones(hidden))
        self.weight = torch.nn.Parameter(torch.zeros(n_kv, hidden))
        # W = 0: logit = scale * b - offset = init_logit for every token.
        self.bias = torch.nn.Parameter(torch.full((n_kv,), (init_logit + offset) / scale))

    def logit(self, x):  # x [..., hidden] -> [..., n_kv]
        x = x.float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return self.scale * F.linear(y, self.weight, self.bias) - self.offset


def runtime_logits(x, weight, norm, bias, eps, scale, offset):
    """Logits as runtime/backend/dms_decisions.cc computes them: sum of squares in double, inverse
    RMS and the products x * inv_rms * g in float32, the dot product with W plus b, then
    `acc * scale - offset` in float32 (the dot product is summed in double here, in float32 in
    order there: the two differ by rounding only). x [T, hidden] -> [T, n_kv]."""
    x = x.detach().float()
    hidden = x.shape[-1]
    ss = x.double().pow(2).sum(-1)
    inv_rms = 1.0 / torch.sqrt((ss / hidden).float() + eps)
    y = x * inv_rms[:, None] * norm.float()[None, :]
    acc = (y.double() @ weight.double().T).float() + bias.float()[None, :]
    return acc * scale - offset


class DmsState:
    """Shared between the decoder-layer pre-hooks and the attention function."""

    def __init__(self, adapters, window, tau):
        self.adapters = adapters
        self.window = window
        self.tau = tau
        self.mode = "dense"  # dense | soft | hard
        self.logits = {}     # layer -> [B, T, n_kv] trained logits of this forward
        self.alphas = {}     # layer -> [B, T-1, n_kv] soft decisions (soft mode) of keys 0..T-2
        self.inputs = {}     # layer -> [B, T, hidden] inputs (kept only when keep_inputs)
        self.keep_inputs = False

    def pre_hook(self, layer_idx):
        def hook(module, args, kwargs):
            if self.mode == "dense":
                return None
            x = args[0] if args else kwargs["hidden_states"]
            if self.keep_inputs:
                self.inputs[layer_idx] = x.detach().clone()
            self.logits[layer_idx] = self.adapters[layer_idx].logit(x)
            return None
        return hook

    def eviction_bias(self, layer_idx, T, S, device):
        """Additive score term [B, n_kv, 1, T, S] for the delayed eviction, or None (dense)."""
        if self.mode == "dense":
            return None
        lg = self.logits[layer_idx]  # [B, T, n_kv]; logit[t] flags token t-1
        B, _, n_kv = lg.shape
        assert T == S == lg.shape[1], "training runs whole sequences without a cache"
        shifted = lg[:, 1:, :]       # flags of keys 0 .. T-2
        if self.mode == "soft":
            u = torch.rand_like(shifted).clamp_(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)
            alpha = torch.sigmoid((shifted + noise) / self.tau)
            self.alphas[layer_idx] = alpha
            term = torch.log((1.0 - alpha + 1e-6).clamp(min=1e-6))
        else:
            term = torch.where(shifted > 0, float("-inf"), 0.0).to(shifted.dtype)
        term = F.pad(term, (0, 0, 0, 1))  # the newest token: flag 0
        term = term.permute(0, 2, 1)      # [B, n_kv, S]
        q = torch.arange(T, device=device)[:, None]
        k = torch.arange(S, device=device)[None, :]
        far = (q - k) > self.window       # [T, S]
        bias = torch.where(far[None, None], term[:, :, None, :], torch.zeros((), device=device))
        return bias[:, :, None]           # [B, n_kv, 1, T, S]


def make_attention(state):
    def dms_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query [B, Hq, T, D], key/value [B, Hkv, S, D] after RoPE, as the model computed them.
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g = Hq // Hkv
        q = query.view(B, Hkv, g, T, D)  # query heads j*g .. j*g+g-1 read KV head j
        scores = torch.matmul(q, key[:, :, None].transpose(-1, -2)) * scaling  # [B,Hkv,g,T,S]
        causal = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
        scores = scores.masked_fill(~causal, float("-inf"))  # no padding: batches are crops
        bias = state.eviction_bias(module.layer_idx, T, S, query.device)
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value[:, :, None])  # [B, Hkv, g, T, D]
        out = out.reshape(B, Hq, T, D).transpose(1, 2).contiguous()
        return out, None
    return dms_attention


def load_model(path, device):
    """Tokenizer and frozen float32 model from a GGUF file, as tests/oracle loads them."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f,
                                                              dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model.to(device)


def attach(model, args, adapters=None):
    """Hooks the adapters (new ones, initialised, unless given) and the DMS attention into the
    model; returns (adapters, state). state.mode picks dense, soft or hard eviction."""
    cfg = model.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    n_kv = cfg.num_key_value_heads
    eps = float(cfg.rms_norm_eps)
    if adapters is None:
        adapters = torch.nn.ModuleList(
            [DmsAdapter(hidden, n_kv, eps, args.alpha_scale, args.alpha_offset, args.init_logit)
             for _ in range(n_layers)])
    adapters.to(next(model.parameters()).device)
    state = DmsState(adapters, args.window, args.tau)
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, make_attention(state))
    model.config._attn_implementation = ATTN_NAME
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = ATTN_NAME
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(state.pre_hook(i), with_kwargs=True)
    return adapters, state


# ----------------------------------------------------------------------------------------------
# Measurement


def flags_from_logits(logits):
    """[B, T, n_kv] logits -> [B, T, n_kv] bool flags (flag(k) = logit[k+1] > 0; newest 0)."""
    d = logits > 0
    return F.pad(d[:, 1:], (0, 0, 0, 1), value=False)


def file_tensors(adapters):
    """The adapters as the float32 tensors that go into the file."""
    t = {}
    for i, a in enumerate(adapters):
        t[TENSOR_FMT["weight"].format(i=i)] = a.weight.detach().float().cpu().contiguous()
        t[TENSOR_FMT["norm"].format(i=i)] = a.norm.detach().float().cpu().contiguous()
        t[TENSOR_FMT["bias"].format(i=i)] = a.bias.detach().float().cpu().contiguous()
    return t


def hard_pass(model, state, ids, chunk, tensors, scale, offset):
    """Hard-eviction forward over `ids` in independent segments of at most `chunk` tokens (the
    adapters' own decisions drive the eviction). On the same layer inputs, the runtime formula
    (runtime_logits) is evaluated on `tensors` and its decisions compared with the adapters'.
    Returns the per-layer flags [T, n_kv] and the comparison figures."""
    n_layers = len(state.adapters)
    eps = state.adapters[0].eps
    flags = [[] for _ in range(n_layers)]
    cmp = {"decisions": 0, "mismatches": 0, "clear_mismatches": 0, "max_logit_diff": 0.0,
           "min_abs_logit": math.inf}
    dev = next(model.parameters()).device
    state.mode, state.keep_inputs = "hard", True
    try:
        with torch.no_grad():
            for s in range(0, len(ids), chunk):
                seg = torch.tensor([ids[s:s + chunk]], device=dev)
                if seg.shape[1] < 2:
                    continue
                model(input_ids=seg, use_cache=False)
                for i in range(n_layers):
                    trained = state.logits[i][0].float().cpu()
                    flags[i].append(flags_from_logits(state.logits[i])[0].cpu())
                    rl = runtime_logits(state.inputs[i][0].cpu(),
                                        tensors[TENSOR_FMT["weight"].format(i=i)],
                                        tensors[TENSOR_FMT["norm"].format(i=i)],
                                        tensors[TENSOR_FMT["bias"].format(i=i)],
                                        eps, scale, offset)
                    bad = (rl > 0) != (trained > 0)
                    cmp["decisions"] += bad.numel()
                    cmp["mismatches"] += int(bad.sum())
                    # a tie at the threshold may fall either way with another summation order
                    cmp["clear_mismatches"] += int((bad & (trained.abs() > TIE)).sum())
                    cmp["max_logit_diff"] = max(cmp["max_logit_diff"],
                                                float((rl - trained).abs().max()))
                    cmp["min_abs_logit"] = min(cmp["min_abs_logit"],
                                               float(trained.abs().min()))
                    if bad.any():
                        print(f"  layer {i}: {int(bad.sum())} decisions differ; |trained "
                              f"logit| there <= {float(trained[bad].abs().max()):.3g}",
                              file=sys.stderr)
                state.inputs = {}
    finally:
        state.mode, state.keep_inputs, state.inputs, state.logits = "dense", False, {}, {}
    return [torch.cat(f) for f in flags], cmp


def cache_figures(flags, window, chunk):
    """Eviction rate and cache CR (docs/dms-semantics.md §6) of the per-layer flags, segment by
    segment: resident n = unflagged tokens + the last min(L, w+1) tokens."""
    L_sum = n_sum = 0
    flagged = total = 0
    for f in flags:  # [T, n_kv]
        T = f.shape[0]
        for s in range(0, T, chunk):
            seg = f[s:s + chunk]
            L = seg.shape[0]
            tail = min(L, window + 1)
            resident = (~seg[:L - tail]).sum(0) + tail  # per head
            L_sum += L * seg.shape[1]
            n_sum += int(resident.sum())
            flagged += int(seg.sum())
            total += seg.numel()
    return flagged / max(total, 1), L_sum / max(n_sum, 1)


def read_file(path, cfg):
    """Tensors and metadata of an adapter file, with its names, shapes and dtypes checked."""
    n_layers, hidden, n_kv = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads
    shapes = {"weight": (n_kv, hidden), "norm": (hidden,), "bias": (n_kv,)}
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for i in range(n_layers):
        for what, k in TENSOR_FMT.items():
            name = k.format(i=i)
            if name not in tensors:
                raise SystemExit(f"{path}: no tensor {name}")
            if tuple(tensors[name].shape) != shapes[what]:
                raise SystemExit(f"{path}: {name} has shape {tuple(tensors[name].shape)}, not "
                                 f"{shapes[what]}")
            if tensors[name].dtype != torch.float32:
                raise SystemExit(f"{path}: {name} is {tensors[name].dtype}, not float32")
    for k in ("dms_window_size", "dms_alpha_scale", "dms_initial_alpha_offset"):
        if k not in meta:
            raise SystemExit(f"{path}: no metadata {k}")
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# Training


class Progress:
    def __init__(self, total):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.n = total, 0

    def update(self, text):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"\r{self.n}/{self.total} {text}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


class Teacher:
    """Dense next-token distributions of the frozen model for a crop. With top_k > 0 they are kept
    per crop start as the top-k log-probabilities plus the remaining mass, and the KL is taken over
    those k + 1 outcomes (the student's mass outside the teacher's top k is lumped the same way);
    with top_k = 0 the full distribution is recomputed for every batch."""

    def __init__(self, model, state, top_k):
        self.model, self.state, self.top_k = model, state, top_k
        self.cache = {}
        self.passes = 0

    def _dense(self, batch):
        self.state.mode = "dense"
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=batch, use_cache=False).logits.float(),
                                     -1)
        self.passes += 1
        return logp

    def kl(self, starts, batch, s_logp):
        """Mean KL(teacher || student) over the positions of the batch (s_logp [B, T, V])."""
        if self.top_k <= 0:
            t_logp = self._dense(batch)
            return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        missing = [i for i, s in enumerate(starts) if s not in self.cache]
        if missing:
            t_logp = self._dense(batch[missing])
            top, idx = t_logp.topk(self.top_k, dim=-1)
            rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
            for j, i in enumerate(missing):
                self.cache[starts[i]] = (top[j], idx[j], rest[j])
        top = torch.stack([self.cache[s][0] for s in starts])   # [B, T, k]
        idx = torch.stack([self.cache[s][1] for s in starts])   # [B, T, k]
        rest = torch.stack([self.cache[s][2] for s in starts])  # [B, T]
        s_top = s_logp.gather(-1, idx)
        s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
        kl_top = (top.exp() * (top - s_top)).sum(-1)
        kl_rest = rest.exp() * (rest - s_rest)
        return (kl_top + kl_rest).mean()


def target_rate(step, steps, final, ramp):
    ramp_steps = max(1, int(round(ramp * steps)))
    return final * min(1.0, step / ramp_steps)


def save(path, tensors, meta):
    from safetensors.torch import save_file
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})


def adapters_from(tensors, cfg, scale, offset):
    adapters = torch.nn.ModuleList()
    for i in range(cfg.num_hidden_layers):
        a = DmsAdapter(cfg.hidden_size, cfg.num_key_value_heads, float(cfg.rms_norm_eps),
                       scale, offset, -offset)
        with torch.no_grad():
            a.weight.copy_(tensors[TENSOR_FMT["weight"].format(i=i)])
            a.norm.copy_(tensors[TENSOR_FMT["norm"].format(i=i)])
            a.bias.copy_(tensors[TENSOR_FMT["bias"].format(i=i)])
        adapters.append(a)
    return adapters


def report_pass(flags, cmp, window, chunk, n_tokens):
    rate, cr = cache_figures(flags, window, chunk)
    print(f"hard eviction rate on the training text {rate:.4f} (asymptotic CR "
          f"{1 / max(1e-9, 1 - rate):.2f}); cache CR {cr:.3f} over segments of "
          f"{min(n_tokens, chunk)} tokens, window {window}", file=sys.stderr)
    print("per-layer rate: " + " ".join(f"{float(f.float().mean()):.2f}" for f in flags),
          file=sys.stderr)
    print(f"check: {cmp['mismatches']} of {cmp['decisions']} decisions differ between the runtime "
          f"formula on the file's tensors and the adapter ({cmp['clear_mismatches']} with "
          f"|logit| > {TIE:g}; max logit difference {cmp['max_logit_diff']:.3g}, smallest "
          f"|logit| {cmp['min_abs_logit']:.3g})", file=sys.stderr)
    return rate


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="adapter file (default: %(default)s)")
    ap.add_argument("--check", metavar="FILE",
                    help="verify FILE (runtime formula vs the adapter's decisions; eviction rate "
                         "and cache CR on the training text) instead of training")
    ap.add_argument("--window", type=int, default=32, help="DMS window w (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--crop-stride", type=int, default=64,
                    help="crops start at multiples of this (so the teacher cache is reused)")
    ap.add_argument("--teacher-top-k", type=int, default=64,
                    help="teacher log-probabilities kept per position and crop (0: the full "
                         "distribution, recomputed every step)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    ap.add_argument("--warmup", type=int, default=10, help="linear LR warm-up steps")
    ap.add_argument("--tau", type=float, default=0.25,
                    help="temperature of the Gumbel-sigmoid soft decisions")
    ap.add_argument("--target-rate", type=float, default=0.875,
                    help="final target eviction rate (0.875: 8x asymptotic)")
    ap.add_argument("--ramp", type=float, default=0.6,
                    help="share of the steps over which the target rate ramps up from 0")
    ap.add_argument("--lambda", dest="lam", type=float, default=2.0,
                    help="weight of the compression loss")
    ap.add_argument("--cr-label", default="8x",
                    help="dms_cr metadata, a label only (docs/dms-semantics.md §7); the measured "
                         "rate goes to dms_eviction_rate (default: %(default)s)")
    ap.add_argument("--alpha-scale", type=float, default=100.0)
    ap.add_argument("--alpha-offset", type=float, default=5.0)
    ap.add_argument("--init-logit", type=float, default=-5.0,
                    help="the logit of every token at step 0 (W = 0); must be negative")
    ap.add_argument("--data", nargs="*", default=[],
                    help="extra training text files (besides the calibration texts)")
    ap.add_argument("--eval-tokens", type=int, default=0,
                    help="tokens of the training text in the final hard-eviction pass (0: all)")
    ap.add_argument("--eval-chunk", type=int, default=2048,
                    help="segment length of the final hard-eviction pass over the training text")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    if args.init_logit >= 0:
        ap.error("--init-logit must be negative (nothing evicted at step 0)")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = pick_device(args.device)
    model_path = repo_path(args.model)

    files = training_files(args.data)
    text = training_text(files)
    calib_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    t0 = time.time()
    tok, model = load_model(model_path, device)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cfg = model.config
    eps = float(cfg.rms_norm_eps)
    print(f"model {model_path}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, "
          f"eps {eps:g}; loaded in {time.time() - t0:.1f} s on {device}", file=sys.stderr)
    print(f"training text: {len(files)} files, {len(ids)} tokens, sha256 {calib_sha[:16]}…",
          file=sys.stderr)

    if args.check:
        tensors, meta = read_file(args.check, cfg)
        args.window = int(meta["dms_window_size"])
        args.alpha_scale = float(meta["dms_alpha_scale"])
        args.alpha_offset = float(meta["dms_initial_alpha_offset"])
        adapters, state = attach(
            model, args, adapters_from(tensors, cfg, args.alpha_scale, args.alpha_offset))
        eval_ids = ids[:args.eval_tokens] if args.eval_tokens > 0 else ids
        flags, cmp = hard_pass(model, state, eval_ids, args.eval_chunk, tensors, args.alpha_scale,
                               args.alpha_offset)
        report_pass(flags, cmp, args.window, args.eval_chunk, len(eval_ids))
        print(f"{args.check}: metadata " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())
                                                     if k != "command"), file=sys.stderr)
        sys.exit(0 if cmp["clear_mismatches"] == 0 else 1)

    if len(ids) < args.seq_len + 1:
        ap.error(f"the training text has {len(ids)} tokens, fewer than --seq-len {args.seq_len}")
    if args.seq_len < 3 * args.window:
        print(f"warning: --seq-len {args.seq_len} is under 3x the window {args.window}: few "
              f"tokens ever leave the window in training", file=sys.stderr)

    adapters, state = attach(model, args)
    params = [p for a in adapters for p in a.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    n_trained = sum(p.numel() for p in params)
    print(f"training {n_trained} adapter parameters for {args.steps} steps: seq-len "
          f"{args.seq_len}, batch {args.batch}, window {args.window}, tau {args.tau}, lr "
          f"{args.lr}, target rate {args.target_rate} (ramp {args.ramp:.0%}), lambda {args.lam}",
          file=sys.stderr)

    teacher = Teacher(model, state, args.teacher_top_k)
    bar = Progress(args.steps)
    t_train = time.time()
    step_times = []
    for step in range(args.steps):
        ts = time.time()
        starts = [random.randrange(0, len(ids) - args.seq_len + 1, args.crop_stride)
                  for _ in range(args.batch)]
        batch = torch.tensor([ids[s:s + args.seq_len] for s in starts], device=device)
        state.mode = "soft"
        s_logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        kl = teacher.kl(starts, batch, s_logp)
        # mean alpha over (layer, KV head, key) of the flags that exist (keys 0 .. T-2): the
        # soft decisions the attention used
        mean_alpha = torch.stack([state.alphas[i].mean() for i in range(len(adapters))]).mean()
        with torch.no_grad():
            hard = sum(int((state.logits[i][:, 1:] > 0).sum()) for i in range(len(adapters)))
            n_dec = sum(state.logits[i][:, 1:].numel() for i in range(len(adapters)))
        tgt = target_rate(step, args.steps, args.target_rate, args.ramp)
        comp = F.relu(tgt - mean_alpha)
        loss = kl + args.lam * comp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state.mode = "dense"
        state.logits, state.alphas = {}, {}
        dt = time.time() - ts
        step_times.append(dt)
        bar.update(f"loss {loss.item():.4f} KL {kl.item():.4f} mean_a {mean_alpha.item():.3f} "
                   f"tgt {tgt:.3f} hard {hard / n_dec:.3f} {dt:.2f}s/step")
    bar.close()
    train_s = time.time() - t_train
    # the first steps include warm-up of the allocator; report the mean over all steps too
    sps = sum(step_times) / len(step_times)
    print(f"trained {args.steps} steps in {train_s:.0f} s ({sps:.2f} s/step; {teacher.passes} "
          f"teacher passes)", file=sys.stderr)

    tensors = file_tensors(adapters)
    eval_ids = ids[:args.eval_tokens] if args.eval_tokens > 0 else ids
    flags, cmp = hard_pass(model, state, eval_ids, args.eval_chunk, tensors, args.alpha_scale,
                           args.alpha_offset)
    rate = report_pass(flags, cmp, args.window, args.eval_chunk, len(eval_ids))

    meta = {
        "dms_window_size": str(args.window),
        "dms_alpha_scale": repr(float(args.alpha_scale)),
        "dms_initial_alpha_offset": repr(float(args.alpha_offset)),
        "dms_alpha_per": "head",
        "dms_cr": args.cr_label,
        "dms_eviction_rate": f"{rate:.3f}",
        "producer": "tools/retrofit_dms.py",
        "command": command,
        "calibration_sha256": calib_sha,
        "calibration_files": ",".join(os.path.relpath(f, ROOT) for f in files),
        "calibration_tokens": str(len(ids)),
        "eviction_rate_tokens": str(len(eval_ids)),
        "base_model": os.path.basename(model_path),
        "steps": str(args.steps),
        "seconds_per_step": f"{sps:.2f}",
        "training_seconds": f"{train_s:.0f}",
        "device": str(device),
    }
    save(args.out, tensors, meta)
    back, back_meta = read_file(args.out, cfg)
    same = back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)
    if not same or back_meta != meta:
        raise SystemExit(f"{args.out}: the file read back differs from what was written")
    print(f"wrote {args.out} ({len(back)} tensors; read back identical)", file=sys.stderr)
    if cmp["clear_mismatches"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
