// The CPU backend: one forward pass of a Llama / Qwen2 / Qwen3 decoder over a batch of sequence
// chunks, with quantized weights used in place (kernels/cpu/matmul.h) and attention delegated to
// the KV cache (which applies the eviction policy).
//
// Every token of every chunk goes through each matmul together ([N, hidden] activations), so a
// step with many decode tokens or a long prefill chunk reads each weight once. Only attention is
// per chunk. Scratch buffers are members, grown when a larger batch arrives and then reused.
//
// Tensor-parallel layout: each layer keeps views of the weight slices this rank uses and the
// ranges of query heads, KV heads and FFN channels it owns (q_head_begin_, kv_head_begin_,
// ffn_begin_ ...). With one rank the ranges are the whole model; a rank of a TP group would own a
// contiguous range of KV heads with their query groups, the matching rows of q/k/v and columns of
// o_proj, a contiguous FFN slice (rows of gate/up, columns of down), and all-reduce after o_proj
// and down_proj.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/reference/quant.h"
#include "parallel/status_macros.h"
#include "runtime/backend.h"
#include "runtime/dms.h"

namespace dmsrt {
namespace {

namespace kn = kernels;

// A block-aligned [rows, cols] window of a weight matrix, as the matmul kernels take it.
struct LinearView {
  int type = 0;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride = 0;  // bytes between rows
};

absl::StatusOr<LinearView> MakeView(const WeightTensor& w, const char* what, int64_t row0,
                                    int64_t rows, int64_t col0, int64_t cols) {
  if (!w.present()) return absl::InvalidArgumentError(absl::StrCat("missing weight: ", what));
  const int type = static_cast<int>(w.type);
  if (row0 < 0 || col0 < 0 || row0 + rows > w.rows || col0 + cols > w.cols) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight ", w.name, " (", what, ") is [", w.rows, ", ", w.cols, "], expected at least [",
        row0 + rows, ", ", col0 + cols, "]"));
  }
  const int64_t bs = BlockSize(w.type);
  if (!kn::MatMulSupported(type, cols) || bs == 0 || col0 % bs != 0 || w.cols % bs != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight ", w.name, " (", what, ") has type ", DTypeName(w.type), " and ", w.cols,
        " columns, which the CPU matmul does not support (F32, F16, BF16, Q4_0, Q4_1, Q8_0, "
        "Q6_K with block-aligned columns)"));
  }
  LinearView v;
  v.type = type;
  v.stride = RowBytes(w.type, w.cols);
  v.data = w.data + row0 * v.stride + col0 / bs * BlockBytes(w.type);
  v.rows = rows;
  v.cols = cols;
  return v;
}

// Elements [begin, begin+count) of a 1-D (or flattened) weight, as float.
absl::StatusOr<std::vector<float>> ToFloat(const WeightTensor& w, const char* what, int64_t begin,
                                           int64_t count) {
  if (!w.present()) return absl::InvalidArgumentError(absl::StrCat("missing weight: ", what));
  if (begin < 0 || begin + count > w.numel()) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", w.name, " (", what, ") has ",
                                                   w.numel(), " values, expected at least ",
                                                   begin + count));
  }
  const int type = static_cast<int>(w.type);
  if (!kn::QuantTypeKnown(type) || w.cols % kn::QuantBlockSize(type) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", w.name, " (", what,
                                                   ") has unsupported type ",
                                                   DTypeName(w.type)));
  }
  std::vector<float> all(static_cast<size_t>(w.numel()));
  for (int64_t r = 0; r < w.rows; ++r) {
    kn::DequantizeRowFast(type, w.row(r), all.data() + r * w.cols, w.cols);
  }
  return std::vector<float>(all.begin() + begin, all.begin() + begin + count);
}

template <typename T>
void Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

class CpuBackend : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<Backend>> Create(const Model& model,
                                                         const BackendOptions& options);

  const char* name() const override { return "cpu"; }
  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override;
  KvCache& kv() override { return *kv_; }

 private:
  struct Layer {
    LinearView wq, wk, wv, wo, gate, up, down;
    std::vector<float> attn_norm, ffn_norm;  // [hidden]
    std::vector<float> q_norm, k_norm;       // [head_dim] (Qwen3) or empty
    std::vector<float> bq, bk, bv;           // local slices of the biases (Qwen2) or empty
  };

  CpuBackend(const Model& model, const BackendOptions& options)
      : model_(model), cfg_(model.config), options_(options) {}
  absl::Status Init();
  void Matmuls(const kn::MatmulSpec* specs, int n_specs, int64_t cols, const float* x,
               int64_t n);

  const Model& model_;
  const ModelConfig& cfg_;
  BackendOptions options_;
  std::unique_ptr<KvCache> kv_;
  std::unique_ptr<kn::ThreadPool> pool_;
  kn::MatmulWorkspace ws_;

  // This rank's share of the model (everything, with one rank).
  int32_t q_head_begin_ = 0, n_heads_ = 0;   // query heads
  int32_t kv_head_begin_ = 0, n_kv_ = 0;     // KV heads
  int32_t ffn_begin_ = 0, ffn_ = 0;          // FFN channels
  int32_t hidden_ = 0, head_dim_ = 0, rope_dim_ = 0, vocab_ = 0;
  bool dms_bits_ = false;       // pass DMS decisions to the cache (policy dms)
  bool dms_variant_a_ = false;  // zero the repurposed query channel (Variant A models)

  std::vector<Layer> layers_;
  std::vector<float> output_norm_;           // [hidden]
  LinearView output_;                        // [vocab, hidden]
  std::vector<double> inv_freq_;             // [rope_dim / 2], scaling applied

  // Scratch, [N, ...] for the N tokens of a step.
  std::vector<float> x_, xn_, q_, k_, v_, attn_, o_, gate_, up_, cos_sin_, final_;
  std::vector<uint8_t> bits_;
  std::vector<int64_t> pos_;
};

absl::StatusOr<std::unique_ptr<Backend>> CpuBackend::Create(const Model& model,
                                                            const BackendOptions& options) {
  std::unique_ptr<CpuBackend> b(new CpuBackend(model, options));
  DMSRT_RETURN_IF_ERROR(b->Init());
  return std::unique_ptr<Backend>(std::move(b));
}

absl::Status CpuBackend::Init() {
  const ModelConfig& c = cfg_;
  if (c.n_layers <= 0 || c.hidden <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
      c.head_dim <= 0 || c.ffn <= 0 || c.vocab <= 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad model config: layers ", c.n_layers, ", hidden ", c.hidden, ", heads ", c.n_heads,
        ", kv heads ", c.n_kv_heads, ", head_dim ", c.head_dim, ", ffn ", c.ffn, ", vocab ",
        c.vocab));
  }
  if (static_cast<int32_t>(model_.weights.layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("model has ", model_.weights.layers.size(),
                                                   " layers of weights, config says ",
                                                   c.n_layers));
  }
  rope_dim_ = c.rope_dim > 0 ? c.rope_dim : c.head_dim;
  if (rope_dim_ % 2 != 0 || rope_dim_ > c.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("bad rope_dim ", rope_dim_, " for head_dim ",
                                                   c.head_dim));
  }
  if (options_.kv_policy.kind == KvPolicyKind::kDms && !c.dms.enabled) {
    return absl::InvalidArgumentError(
        "KV policy 'dms' needs a model with DMS decisions (dms_* config fields or an attached "
        "adapter); use policy 'forced' for synthetic eviction on other models");
  }
  // Variant A repurposes a query channel: it is zeroed in every forward pass of a DMS model,
  // whatever the KV policy, because the model was trained that way. The bits reach the cache only
  // under the dms policy.
  dms_variant_a_ = c.dms.enabled && !c.dms.separate_alpha;
  dms_bits_ = options_.kv_policy.kind == KvPolicyKind::kDms && c.dms.enabled;

  // One rank: everything is local.
  q_head_begin_ = 0;
  n_heads_ = c.n_heads;
  kv_head_begin_ = 0;
  n_kv_ = c.n_kv_heads;
  ffn_begin_ = 0;
  ffn_ = c.ffn;
  hidden_ = c.hidden;
  head_dim_ = c.head_dim;
  vocab_ = c.vocab;

  const int64_t hd = head_dim_;
  const WeightTensor& emb = model_.weights.tok_embd;
  if (!emb.present() || emb.rows != vocab_ || emb.cols != hidden_ ||
      !kn::QuantTypeKnown(static_cast<int>(emb.type))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token embedding must be [", vocab_, ", ", hidden_, "] of a supported type; got ",
        emb.name, " [", emb.rows, ", ", emb.cols, "] ", DTypeName(emb.type)));
  }
  DMSRT_ASSIGN_OR_RETURN(output_norm_,
                         ToFloat(model_.weights.output_norm, "output_norm", 0, hidden_));
  DMSRT_ASSIGN_OR_RETURN(output_, MakeView(model_.weights.output, "output", 0, vocab_, 0, hidden_));

  layers_.resize(c.n_layers);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = model_.weights.layers[l];
    Layer& L = layers_[l];
    const int64_t q0 = q_head_begin_ * hd, nq = n_heads_ * hd;
    const int64_t k0 = kv_head_begin_ * hd, nk = n_kv_ * hd;
    DMSRT_ASSIGN_OR_RETURN(L.wq, MakeView(lw.wq, "attn_q", q0, nq, 0, hidden_));
    DMSRT_ASSIGN_OR_RETURN(L.wk, MakeView(lw.wk, "attn_k", k0, nk, 0, hidden_));
    DMSRT_ASSIGN_OR_RETURN(L.wv, MakeView(lw.wv, "attn_v", k0, nk, 0, hidden_));
    DMSRT_ASSIGN_OR_RETURN(L.wo, MakeView(lw.wo, "attn_output", 0, hidden_, q0, nq));
    DMSRT_ASSIGN_OR_RETURN(L.gate, MakeView(lw.w_gate, "ffn_gate", ffn_begin_, ffn_, 0, hidden_));
    DMSRT_ASSIGN_OR_RETURN(L.up, MakeView(lw.w_up, "ffn_up", ffn_begin_, ffn_, 0, hidden_));
    DMSRT_ASSIGN_OR_RETURN(L.down, MakeView(lw.w_down, "ffn_down", 0, hidden_, ffn_begin_, ffn_));
    DMSRT_ASSIGN_OR_RETURN(L.attn_norm, ToFloat(lw.attn_norm, "attn_norm", 0, hidden_));
    DMSRT_ASSIGN_OR_RETURN(L.ffn_norm, ToFloat(lw.ffn_norm, "ffn_norm", 0, hidden_));
    if (c.qk_norm) {
      DMSRT_ASSIGN_OR_RETURN(L.q_norm, ToFloat(lw.q_norm, "attn_q_norm", 0, hd));
      DMSRT_ASSIGN_OR_RETURN(L.k_norm, ToFloat(lw.k_norm, "attn_k_norm", 0, hd));
    }
    if (c.attn_bias) {
      DMSRT_ASSIGN_OR_RETURN(L.bq, ToFloat(lw.bq, "attn_q bias", q0, nq));
      DMSRT_ASSIGN_OR_RETURN(L.bk, ToFloat(lw.bk, "attn_k bias", k0, nk));
      DMSRT_ASSIGN_OR_RETURN(L.bv, ToFloat(lw.bv, "attn_v bias", k0, nk));
    }
    if (dms_bits_ && c.dms.separate_alpha && !lw.dms_alpha.present()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DMS Variant B (separate alpha) needs the dms_proj_alpha adapter; layer ", l,
          " has none (attach it with --dms-adapter)"));
    }
  }

  // RoPE frequencies with the configured scaling (HF's rope_scaling semantics).
  inv_freq_.resize(rope_dim_ / 2);
  const RopeScaling& rs = c.rope_scaling;
  for (int32_t i = 0; i < rope_dim_ / 2; ++i) {
    double f = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / rope_dim_);
    if (rs.type == RopeScaling::Type::kLinear && rs.factor > 0) {
      f /= rs.factor;
    } else if (rs.type == RopeScaling::Type::kLlama3 && rs.factor > 0) {
      const double low_wavelen = rs.original_max_positions / rs.low_freq_factor;
      const double high_wavelen = rs.original_max_positions / rs.high_freq_factor;
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f /= rs.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (rs.original_max_positions / wavelen - rs.low_freq_factor) /
                              (rs.high_freq_factor - rs.low_freq_factor);
        f = (1.0 - smooth) * f / rs.factor + smooth * f;
      }
    }
    inv_freq_[i] = f;
  }

  KvGeometry geo;
  geo.n_layers = c.n_layers;
  geo.n_kv_heads = n_kv_;
  geo.n_heads = n_heads_;
  geo.head_dim = head_dim_;
  geo.block_tokens = options_.kv_block_tokens;
  geo.kv_head_offset = kv_head_begin_;
  KvPolicyConfig policy = options_.kv_policy;
  if (policy.kind == KvPolicyKind::kDms && policy.window <= 0) policy.window = c.dms.window;
  DMSRT_ASSIGN_OR_RETURN(kv_, MakeCpuKvCache(geo, policy, options_.kv_budget_bytes));
  pool_ = std::make_unique<kn::ThreadPool>(options_.threads);
  kv_->SetThreadPool(pool_.get());  // attention of different KV heads runs on the same workers
  return absl::OkStatus();
}

void CpuBackend::Matmuls(const kn::MatmulSpec* specs, int n_specs, int64_t cols, const float* x,
                         int64_t n) {
  // Types and shapes were validated in Init, so the kernels cannot refuse.
  kn::MatMulBatch(pool_.get(), specs, n_specs, cols, x, n, &ws_);
}

absl::StatusOr<ForwardResult> CpuBackend::Forward(const std::vector<SeqChunk>& batch) {
  ForwardResult result;
  result.vocab = vocab_;
  // Validate everything before touching the cache.
  absl::flat_hash_set<SeqId> seen;
  int64_t N = 0;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    const SeqChunk& ch = batch[ci];
    if (ch.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk ", ci, " (sequence ", ch.seq,
                                                     ") has no tokens"));
    }
    if (!seen.insert(ch.seq).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", ch.seq, " appears in more than one chunk of the same step"));
    }
    for (int32_t t : ch.tokens) {
      if (t < 0 || t >= vocab_) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " in chunk ", ci,
                                                       " is outside the vocabulary [0, ",
                                                       vocab_, ")"));
      }
    }
    N += static_cast<int64_t>(ch.tokens.size());
  }
  if (N == 0) return result;
  for (const SeqChunk& ch : batch) {
    DMSRT_RETURN_IF_ERROR(kv_->Reserve(ch.seq, static_cast<int32_t>(ch.tokens.size())));
  }

  const int64_t hd = head_dim_;
  const int64_t H = hidden_;
  const int64_t QW = static_cast<int64_t>(n_heads_) * hd;  // q row width
  const int64_t KW = static_cast<int64_t>(n_kv_) * hd;     // k/v row width
  const int64_t F = ffn_;
  const int64_t half = rope_dim_ / 2;
  Grow(x_, N * H);
  Grow(xn_, N * H);
  Grow(q_, N * QW);
  Grow(k_, N * KW);
  Grow(v_, N * KW);
  Grow(attn_, N * QW);
  Grow(o_, N * H);
  Grow(gate_, N * F);
  Grow(up_, N * F);
  Grow(cos_sin_, N * half * 2);
  Grow(bits_, N * n_kv_);
  Grow(pos_, N);

  // Embeddings and positions.
  {
    const WeightTensor& emb = model_.weights.tok_embd;
    int64_t t = 0;
    for (const SeqChunk& ch : batch) {
      const int64_t p0 = kv_->Length(ch.seq);
      for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
        kn::DequantizeRowFast(static_cast<int>(emb.type), emb.row(ch.tokens[i]), &x_[t * H], H);
        pos_[t] = p0 + static_cast<int64_t>(i);
      }
    }
    for (int64_t t2 = 0; t2 < N; ++t2) {
      for (int64_t i = 0; i < half; ++i) {
        const double a = static_cast<double>(pos_[t2]) * inv_freq_[i];
        cos_sin_[(t2 * half + i) * 2] = static_cast<float>(std::cos(a));
        cos_sin_[(t2 * half + i) * 2 + 1] = static_cast<float>(std::sin(a));
      }
    }
  }

  float* x = x_.data();
  float* xn = xn_.data();
  float* q = q_.data();
  float* k = k_.data();
  float* v = v_.data();
  uint8_t* bits = dms_bits_ ? bits_.data() : nullptr;  // handed to the cache
  uint8_t* bits_a = bits_.data();                      // Variant A decisions (always computed)
  const float eps = cfg_.rms_eps;

  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    const Layer& L = layers_[l];
    if (dms_bits_ && cfg_.dms.separate_alpha) {
      DmsDecideVariantB(cfg_.dms, model_.weights.layers[l], eps, static_cast<int32_t>(N),
                        hidden_, n_kv_, kv_head_begin_, x, bits);
    }
    kn::RmsNorm(x, L.attn_norm.data(), N, H, eps, xn);
    {
      const kn::MatmulSpec specs[3] = {
          {L.wq.type, L.wq.data, L.wq.rows, q, QW, L.wq.stride},
          {L.wk.type, L.wk.data, L.wk.rows, k, KW, L.wk.stride},
          {L.wv.type, L.wv.data, L.wv.rows, v, KW, L.wv.stride},
      };
      Matmuls(specs, 3, H, xn, N);
    }
    if (!L.bq.empty()) {
      for (int64_t t = 0; t < N; ++t) {
        kn::AddInPlace(q + t * QW, L.bq.data(), QW);
        kn::AddInPlace(k + t * KW, L.bk.data(), KW);
        kn::AddInPlace(v + t * KW, L.bv.data(), KW);
      }
    }
    if (!L.q_norm.empty()) {
      kn::RmsNorm(q, L.q_norm.data(), N * n_heads_, hd, eps, q);
      kn::RmsNorm(k, L.k_norm.data(), N * n_kv_, hd, eps, k);
    }
    if (dms_variant_a_) {
      DmsDecideVariantA(cfg_.dms, static_cast<int32_t>(N), n_heads_, n_kv_, head_dim_, q, bits_a);
    }
    kn::RopeNeox(q, N, n_heads_, hd, rope_dim_, QW, cos_sin_.data());
    kn::RopeNeox(k, N, n_kv_, hd, rope_dim_, KW, cos_sin_.data());
    if (dms_variant_a_) {
      DmsZeroAfterRope(static_cast<int32_t>(N), n_heads_, n_kv_, head_dim_, q);
    }
    {
      int64_t t = 0;
      for (const SeqChunk& ch : batch) {
        const int32_t n = static_cast<int32_t>(ch.tokens.size());
        kv_->AttendAndAppend(ch.seq, l, n, q + t * QW, k + t * KW, v + t * KW,
                             bits ? bits + t * n_kv_ : nullptr, &attn_[t * QW]);
        t += n;
      }
    }
    {
      const kn::MatmulSpec spec = {L.wo.type, L.wo.data, L.wo.rows, o_.data(), H, L.wo.stride};
      Matmuls(&spec, 1, QW, attn_.data(), N);
    }
    // (tensor parallelism: all-reduce o_ here)
    kn::AddInPlace(x, o_.data(), N * H);

    kn::RmsNorm(x, L.ffn_norm.data(), N, H, eps, xn);
    {
      const kn::MatmulSpec specs[2] = {
          {L.gate.type, L.gate.data, L.gate.rows, gate_.data(), F, L.gate.stride},
          {L.up.type, L.up.data, L.up.rows, up_.data(), F, L.up.stride},
      };
      Matmuls(specs, 2, H, xn, N);
    }
    kn::SiluMul(gate_.data(), up_.data(), gate_.data(), N * F);
    {
      const kn::MatmulSpec spec = {L.down.type, L.down.data, L.down.rows, o_.data(), H,
                                   L.down.stride};
      Matmuls(&spec, 1, F, gate_.data(), N);
    }
    // (tensor parallelism: all-reduce o_ here)
    kn::AddInPlace(x, o_.data(), N * H);
  }

  // Logits for the requested rows only.
  std::vector<int64_t> rows;
  {
    int64_t t = 0;
    for (size_t ci = 0; ci < batch.size(); ++ci) {
      const SeqChunk& ch = batch[ci];
      const int64_t n = static_cast<int64_t>(ch.tokens.size());
      if (ch.logits == SeqChunk::Logits::kAll) {
        for (int64_t i = 0; i < n; ++i) {
          rows.push_back(t + i);
          result.row_chunk.push_back(static_cast<int32_t>(ci));
        }
      } else if (ch.logits == SeqChunk::Logits::kLast) {
        rows.push_back(t + n - 1);
        result.row_chunk.push_back(static_cast<int32_t>(ci));
      }
      t += n;
    }
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R > 0) {
    Grow(final_, R * H);
    for (int64_t r = 0; r < R; ++r) {
      kn::RmsNorm(x + rows[r] * H, output_norm_.data(), 1, H, eps, &final_[r * H]);
    }
    result.logits.resize(static_cast<size_t>(R) * vocab_);
    const kn::MatmulSpec spec = {output_.type, output_.data, output_.rows, result.logits.data(),
                                 vocab_, output_.stride};
    Matmuls(&spec, 1, H, final_.data(), R);
  }
  return result;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCpuBackend(const Model& model,
                                                        const BackendOptions& options) {
  return CpuBackend::Create(model, options);
}

}  // namespace dmsrt
