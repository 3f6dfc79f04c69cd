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
// ffn_begin_ ...). With one rank the ranges are the whole model. With BackendOptions::comm of
// size tp > 1 the rank takes its part of the shard plan (parallel/shard_plan.h): a contiguous
// range of KV heads with their query groups (its KV cache holds only those heads, and the
// eviction policy runs on them with their global indices), the matching rows of q/k/v (pointer
// offsets) and columns of o_proj, an FFN slice aligned to down_proj's blocks (rows of gate/up,
// columns of down), and a vocabulary slice of the output projection. o_proj and down_proj give
// partial sums that are all-reduced (sum); the logits slices are all-gathered so every rank
// returns full rows. A column slice that does not start and end on a block boundary is read as
// the block-aligned cover with zeros in the extra input columns (exact). Embeddings are looked up
// in the full, shared table. KV reservations are agreed across the group before any collective,
// so a full cache on one rank fails the step on every rank alike.
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
#include "parallel/comm.h"
#include "parallel/shard_plan.h"
#include "parallel/status_macros.h"
#include "runtime/backend/backend.h"
#include "runtime/backend/dms_decisions.h"

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
  absl::Status AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate) override;

 private:
  struct Layer {
    LinearView wq, wk, wv, wo, gate, up, down;
    // Input columns of wo / down as read: the owned slice, or its block-aligned cover; `*_pad` is
    // the offset of the owned slice inside it (0 and the slice width when aligned).
    int64_t wo_in = 0, wo_pad = 0, down_in = 0, down_pad = 0;
    std::vector<float> attn_norm, ffn_norm;  // [hidden]
    std::vector<float> q_norm, k_norm;       // [head_dim] (Qwen3) or empty
    std::vector<float> bq, bk, bv;           // local slices of the biases (Qwen2) or empty
  };

  CpuBackend(const Model& model, const BackendOptions& options)
      : model_(model), cfg_(model.config), options_(options) {}
  absl::Status Init();
  // This rank's part of the shard plan (tp > 1): its heads, FFN channels and vocabulary slice.
  absl::Status InitShard();
  // Views of layer l's weight slices and its norms and biases as float.
  absl::Status InitLayer(int32_t l);
  // RoPE inverse frequencies with the configured scaling.
  void InitRope();
  void Matmuls(const kn::MatmulSpec* specs, int n_specs, int64_t cols, const float* x,
               int64_t n);
  // Row-parallel product y = W_slice x_slice, where W's input columns as read are `in` wide and
  // the owned `width` columns sit at `pad` inside them (zeros elsewhere).
  void RowParallel(const LinearView& w, int64_t in, int64_t pad, const float* x, int64_t width,
                   int64_t n, float* y);
  // All-ranks agreement on the step's KV reservations (tp > 1).
  absl::Status AgreeReservations(const absl::Status& mine);

  // The parts of Forward, in order. The step's N tokens live in the scratch vectors below.
  // Checks the batch and reserves its KV slots on every rank; returns N.
  absl::StatusOr<int64_t> ValidateAndReserve(const std::vector<SeqChunk>& batch);
  void GrowScratch(int64_t N);
  // Token embeddings into x_, absolute positions and their RoPE cos/sin table.
  void EmbedTokens(const std::vector<SeqChunk>& batch, int64_t N);
  // x_ += o_proj(attention(rope(qkv(norm(x_))))) for layer l; the KV cache gets the new tokens.
  absl::Status AttentionBlock(int32_t l, const std::vector<SeqChunk>& batch, int64_t N);
  // x_ += down(silu(gate(norm(x_))) * up(norm(x_))) for layer l.
  absl::Status FfnBlock(int32_t l, int64_t N);
  // Final norm and output projection of the rows each chunk asks for (all-gathered with TP).
  absl::Status ComputeLogits(const std::vector<SeqChunk>& batch, ForwardResult& result);

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
  // Tensor parallelism: the group (null with one rank), this rank's vocabulary slice, and every
  // rank's slice (to place the all-gathered logits).
  Communicator* comm_ = nullptr;
  int tp_ = 1;
  int32_t vocab_begin_ = 0, n_vocab_ = 0, max_vocab_slice_ = 0;
  std::vector<Range> vocab_slices_;
  bool dms_bits_ = false;       // pass DMS decisions to the cache (policy dms)
  bool dms_variant_a_ = false;  // zero the repurposed query channel (Variant A models)

  std::vector<Layer> layers_;
  std::vector<float> output_norm_;           // [hidden]
  LinearView output_;                        // [vocab, hidden]
  std::vector<double> inv_freq_;             // [rope_dim / 2], scaling applied

  // Scratch, [N, ...] for the N tokens of a step.
  std::vector<float> x_, xn_, q_, k_, v_, attn_, o_, gate_, up_, cos_sin_, final_;
  std::vector<float> pad_;                   // zero-padded row-parallel input (unaligned slices)
  std::vector<float> logits_local_, logits_all_;  // [R, max_vocab_slice], [tp, R, max_vocab_slice]
  std::vector<uint8_t> bits_;
  std::vector<int64_t> pos_;
};

absl::StatusOr<std::unique_ptr<Backend>> CpuBackend::Create(const Model& model,
                                                            const BackendOptions& options) {
  std::unique_ptr<CpuBackend> b(new CpuBackend(model, options));
  DMSRT_RETURN_IF_ERROR(b->Init());
  return std::unique_ptr<Backend>(std::move(b));
}

absl::Status CpuBackend::InitShard() {
  const ModelConfig& c = cfg_;
  comm_ = options_.comm;
  tp_ = comm_->size();
  if (comm_->device_buffers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the CPU backend needs a host-memory communicator; got ", comm_->Describe()));
  }
  const ModelDims dims{c.n_heads, c.n_kv_heads, c.head_dim, c.hidden, c.ffn, c.vocab};
  ShardOptions so;
  // Split the FFN in whole blocks of down_proj so its column slices need no padding.
  const WeightTensor& down0 = model_.weights.layers[0].w_down;
  if (down0.present() && BlockSize(down0.type) > 0 && c.ffn % BlockSize(down0.type) == 0) {
    so.ffn_align = BlockSize(down0.type);
  }
  absl::StatusOr<ShardPlan> plan = MakeShardPlan(dims, tp_, comm_->rank(), so);
  if (!plan.ok()) {
    return absl::Status(plan.status().code(),
                        absl::StrCat("tensor parallelism over ", tp_, " ranks: ",
                                     plan.status().message()));
  }
  q_head_begin_ = static_cast<int32_t>(plan->q_heads.begin);
  n_heads_ = static_cast<int32_t>(plan->q_heads.size());
  kv_head_begin_ = static_cast<int32_t>(plan->kv_heads.begin);
  n_kv_ = static_cast<int32_t>(plan->kv_heads.size());
  ffn_begin_ = static_cast<int32_t>(plan->ffn.begin);
  ffn_ = static_cast<int32_t>(plan->ffn.size());
  vocab_begin_ = static_cast<int32_t>(plan->vocab.begin);
  n_vocab_ = static_cast<int32_t>(plan->vocab.size());
  max_vocab_slice_ = static_cast<int32_t>(plan->max_vocab_slice);
  vocab_slices_.clear();
  for (int r = 0; r < tp_; ++r) {
    DMSRT_ASSIGN_OR_RETURN(ShardPlan pr, MakeShardPlan(dims, tp_, r, so));
    vocab_slices_.push_back(pr.vocab);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::InitLayer(int32_t l) {
  const ModelConfig& c = cfg_;
  const int64_t hd = head_dim_;
  const LayerWeights& lw = model_.weights.layers[l];
  Layer& L = layers_[l];
  const int64_t q0 = q_head_begin_ * hd, nq = n_heads_ * hd;
  const int64_t k0 = kv_head_begin_ * hd, nk = n_kv_ * hd;
  DMSRT_ASSIGN_OR_RETURN(L.wq, MakeView(lw.wq, "attn_q", q0, nq, 0, hidden_));
  DMSRT_ASSIGN_OR_RETURN(L.wk, MakeView(lw.wk, "attn_k", k0, nk, 0, hidden_));
  DMSRT_ASSIGN_OR_RETURN(L.wv, MakeView(lw.wv, "attn_v", k0, nk, 0, hidden_));
  {
    // Row-parallel: the owned input columns, widened to whole blocks when they are not.
    const Range cov = BlockCover(Range{q0, q0 + nq}, lw.wo.cols, BlockSize(lw.wo.type));
    DMSRT_ASSIGN_OR_RETURN(L.wo, MakeView(lw.wo, "attn_output", 0, hidden_, cov.begin,
                                          cov.size()));
    L.wo_in = cov.size();
    L.wo_pad = q0 - cov.begin;
  }
  DMSRT_ASSIGN_OR_RETURN(L.gate, MakeView(lw.w_gate, "ffn_gate", ffn_begin_, ffn_, 0, hidden_));
  DMSRT_ASSIGN_OR_RETURN(L.up, MakeView(lw.w_up, "ffn_up", ffn_begin_, ffn_, 0, hidden_));
  {
    const Range cov = BlockCover(Range{ffn_begin_, ffn_begin_ + ffn_}, lw.w_down.cols,
                                 BlockSize(lw.w_down.type));
    DMSRT_ASSIGN_OR_RETURN(L.down, MakeView(lw.w_down, "ffn_down", 0, hidden_, cov.begin,
                                            cov.size()));
    L.down_in = cov.size();
    L.down_pad = ffn_begin_ - cov.begin;
  }
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
  return absl::OkStatus();
}

void CpuBackend::InitRope() {
  // RoPE frequencies with the configured scaling (HF's rope_scaling semantics), the same
  // function the CUDA kernel uses.
  const kernels::RopeScalingParams scaling = RopeParams(cfg_.rope_scaling);
  inv_freq_.resize(rope_dim_ / 2);
  for (int32_t i = 0; i < rope_dim_ / 2; ++i) {
    inv_freq_[i] = kernels::RopeInvFreq(cfg_.rope_theta, scaling, i, rope_dim_);
  }
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
  DMSRT_RETURN_IF_ERROR(CheckKvPolicy(c, options_.kv_policy));
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
  vocab_begin_ = 0;
  n_vocab_ = c.vocab;
  max_vocab_slice_ = c.vocab;
  vocab_slices_ = {Range{0, c.vocab}};
  if (options_.comm != nullptr && options_.comm->size() > 1) DMSRT_RETURN_IF_ERROR(InitShard());

  const WeightTensor& emb = model_.weights.tok_embd;
  if (!emb.present() || emb.rows != vocab_ || emb.cols != hidden_ ||
      !kn::QuantTypeKnown(static_cast<int>(emb.type))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token embedding must be [", vocab_, ", ", hidden_, "] of a supported type; got ",
        emb.name, " [", emb.rows, ", ", emb.cols, "] ", DTypeName(emb.type)));
  }
  DMSRT_ASSIGN_OR_RETURN(output_norm_,
                         ToFloat(model_.weights.output_norm, "output_norm", 0, hidden_));
  DMSRT_ASSIGN_OR_RETURN(output_, MakeView(model_.weights.output, "output", vocab_begin_,
                                            n_vocab_, 0, hidden_));

  layers_.resize(c.n_layers);
  for (int32_t l = 0; l < c.n_layers; ++l) DMSRT_RETURN_IF_ERROR(InitLayer(l));

  InitRope();

  KvGeometry geo;
  geo.n_layers = c.n_layers;
  geo.n_kv_heads = n_kv_;
  geo.n_heads = n_heads_;
  geo.head_dim = head_dim_;
  geo.block_tokens = options_.kv_block_tokens;
  geo.kv_head_offset = kv_head_begin_;
  KvPolicyConfig policy = options_.kv_policy;
  if (policy.kind == KvPolicyKind::kDms && policy.window <= 0) policy.window = c.dms.window;
  if (policy.kind == KvPolicyKind::kDms) policy.dms_sinks = c.dms.sink_tokens;
  DMSRT_ASSIGN_OR_RETURN(kv_, MakeCpuKvCache(geo, policy, options_.kv_budget_bytes, options_.kv_dead_slots));
  pool_ = std::make_unique<kn::ThreadPool>(options_.threads);
  kv_->SetThreadPool(pool_.get());  // attention of different KV heads runs on the same workers
  return absl::OkStatus();
}

void CpuBackend::Matmuls(const kn::MatmulSpec* specs, int n_specs, int64_t cols, const float* x,
                         int64_t n) {
  // Types and shapes were validated in Init, so the kernels cannot refuse.
  kn::MatMulBatch(pool_.get(), specs, n_specs, cols, x, n, &ws_);
}

void CpuBackend::RowParallel(const LinearView& w, int64_t in, int64_t pad, const float* x,
                             int64_t width, int64_t n, float* y) {
  const float* input = x;
  if (in != width) {
    Grow(pad_, static_cast<size_t>(n * in));
    std::fill(pad_.begin(), pad_.begin() + n * in, 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      std::copy(x + t * width, x + (t + 1) * width, pad_.data() + t * in + pad);
    }
    input = pad_.data();
  }
  const kn::MatmulSpec spec = {w.type, w.data, w.rows, y, w.rows, w.stride};
  Matmuls(&spec, 1, in, input, n);
}

absl::Status CpuBackend::AgreeReservations(const absl::Status& mine) {
  // The largest failing status code over the group (0 = every rank reserved).
  int64_t code = mine.ok() ? 0 : static_cast<int64_t>(mine.code());
  DMSRT_RETURN_IF_ERROR(comm_->host()->AllReduce(&code, &code, 1, ReduceOp::kMax));
  if (!mine.ok()) return mine;
  if (code == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(code),
                      absl::StrCat("KV reservation failed on another rank of the TP group ",
                                   comm_->Describe(), " (",
                                   absl::StatusCodeToString(static_cast<absl::StatusCode>(code)),
                                   "); raise --kv-budget, or run fewer or shorter sequences at "
                                   "once"));
}

absl::StatusOr<int64_t> CpuBackend::ValidateAndReserve(const std::vector<SeqChunk>& batch) {
  // Validate everything before touching the cache.
  DMSRT_ASSIGN_OR_RETURN(const int64_t N, ValidateStep(batch, vocab_));
  if (N == 0) return N;
  absl::Status reserved;
  for (const SeqChunk& ch : batch) {
    reserved = kv_->Reserve(ch.seq, static_cast<int32_t>(ch.tokens.size()));
    if (!reserved.ok()) break;
  }
  // Ranks evict different amounts, so one may be full while the others are not: agree before
  // the first collective of the step, so every rank runs it or none does.
  if (comm_ != nullptr) reserved = AgreeReservations(reserved);
  DMSRT_RETURN_IF_ERROR(reserved);
  return N;
}

void CpuBackend::GrowScratch(int64_t N) {
  const int64_t QW = static_cast<int64_t>(n_heads_) * head_dim_;
  const int64_t KW = static_cast<int64_t>(n_kv_) * head_dim_;
  const int64_t H = hidden_, F = ffn_;
  Grow(x_, N * H);
  Grow(xn_, N * H);
  Grow(q_, N * QW);
  Grow(k_, N * KW);
  Grow(v_, N * KW);
  Grow(attn_, N * QW);
  Grow(o_, N * H);
  Grow(gate_, N * F);
  Grow(up_, N * F);
  Grow(cos_sin_, N * (rope_dim_ / 2) * 2);
  Grow(bits_, N * n_kv_);
  Grow(pos_, N);
}

void CpuBackend::EmbedTokens(const std::vector<SeqChunk>& batch, int64_t N) {
  const int64_t H = hidden_;
  const int64_t half = rope_dim_ / 2;
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

absl::Status CpuBackend::AttentionBlock(int32_t l, const std::vector<SeqChunk>& batch, int64_t N) {
  const Layer& L = layers_[l];
  const int64_t hd = head_dim_;
  const int64_t H = hidden_;
  const int64_t QW = static_cast<int64_t>(n_heads_) * hd;  // q row width
  const int64_t KW = static_cast<int64_t>(n_kv_) * hd;     // k/v row width
  const float eps = cfg_.rms_eps;
  float* x = x_.data();
  float* xn = xn_.data();
  float* q = q_.data();
  float* k = k_.data();
  float* v = v_.data();
  uint8_t* bits = dms_bits_ ? bits_.data() : nullptr;  // handed to the cache
  uint8_t* bits_a = bits_.data();                      // Variant A decisions (always computed)

  if (dms_bits_ && cfg_.dms.separate_alpha) {
    DmsDecideVariantB(cfg_.dms, model_.weights.layers[l], eps, static_cast<int32_t>(N), hidden_,
                      n_kv_, kv_head_begin_, x, bits);
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
    // One decision per layer comes from global KV head 0's query channel, which rank 0 holds:
    // its bits (head 0's, copied to every local head) are every rank's.
    if (comm_ != nullptr && cfg_.dms.alpha_per_layer) {
      DMSRT_RETURN_IF_ERROR(comm_->host()->Broadcast(bits_a, N * n_kv_, 0));
    }
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
  RowParallel(L.wo, L.wo_in, L.wo_pad, attn_.data(), QW, N, o_.data());
  if (comm_ != nullptr) DMSRT_RETURN_IF_ERROR(comm_->AllReduceSum(o_.data(), N * H));
  kn::AddInPlace(x, o_.data(), N * H);
  return absl::OkStatus();
}

absl::Status CpuBackend::FfnBlock(int32_t l, int64_t N) {
  const Layer& L = layers_[l];
  const int64_t H = hidden_;
  const int64_t F = ffn_;
  float* x = x_.data();
  float* xn = xn_.data();
  kn::RmsNorm(x, L.ffn_norm.data(), N, H, cfg_.rms_eps, xn);
  {
    const kn::MatmulSpec specs[2] = {
        {L.gate.type, L.gate.data, L.gate.rows, gate_.data(), F, L.gate.stride},
        {L.up.type, L.up.data, L.up.rows, up_.data(), F, L.up.stride},
    };
    Matmuls(specs, 2, H, xn, N);
  }
  kn::SiluMul(gate_.data(), up_.data(), gate_.data(), N * F);
  RowParallel(L.down, L.down_in, L.down_pad, gate_.data(), F, N, o_.data());
  if (comm_ != nullptr) DMSRT_RETURN_IF_ERROR(comm_->AllReduceSum(o_.data(), N * H));
  kn::AddInPlace(x, o_.data(), N * H);
  return absl::OkStatus();
}

absl::Status CpuBackend::ComputeLogits(const std::vector<SeqChunk>& batch, ForwardResult& result) {
  const int64_t H = hidden_;
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
      } else if (ch.logits == SeqChunk::Logits::kLast || ch.sample) {
        rows.push_back(t + n - 1);
        result.row_chunk.push_back(static_cast<int32_t>(ci));
      }
      t += n;
    }
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return absl::OkStatus();
  Grow(final_, R * H);
  for (int64_t r = 0; r < R; ++r) {
    kn::RmsNorm(x_.data() + rows[r] * H, output_norm_.data(), 1, H, cfg_.rms_eps, &final_[r * H]);
  }
  result.logits.resize(static_cast<size_t>(R) * vocab_);
  if (comm_ == nullptr) {
    const kn::MatmulSpec spec = {output_.type, output_.data, output_.rows, result.logits.data(),
                                 vocab_, output_.stride};
    Matmuls(&spec, 1, H, final_.data(), R);
    return absl::OkStatus();
  }
  // This rank's vocabulary columns, padded to the largest slice, then every rank's.
  const int64_t M = max_vocab_slice_;
  Grow(logits_local_, static_cast<size_t>(R * M));
  Grow(logits_all_, static_cast<size_t>(tp_ * R * M));
  std::fill(logits_local_.begin(), logits_local_.begin() + R * M, 0.0f);
  const kn::MatmulSpec spec = {output_.type, output_.data, output_.rows, logits_local_.data(), M,
                               output_.stride};
  if (n_vocab_ > 0) Matmuls(&spec, 1, H, final_.data(), R);
  DMSRT_RETURN_IF_ERROR(comm_->AllGather(logits_local_.data(), R * M, logits_all_.data()));
  for (int r = 0; r < tp_; ++r) {
    const Range vs = vocab_slices_[static_cast<size_t>(r)];
    for (int64_t row = 0; row < R; ++row) {
      const float* src = logits_all_.data() + (static_cast<int64_t>(r) * R + row) * M;
      std::copy(src, src + vs.size(), result.logits.data() + row * vocab_ + vs.begin);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ForwardResult> CpuBackend::Forward(const std::vector<SeqChunk>& batch) {
  ForwardResult result;
  result.vocab = vocab_;
  DMSRT_ASSIGN_OR_RETURN(const int64_t N, ValidateAndReserve(batch));
  if (N == 0) return result;
  GrowScratch(N);
  EmbedTokens(batch, N);
  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    DMSRT_RETURN_IF_ERROR(AttentionBlock(l, batch, N));
    DMSRT_RETURN_IF_ERROR(FfnBlock(l, N));
  }
  DMSRT_RETURN_IF_ERROR(ComputeLogits(batch, result));
  SampleOnHost(batch, result);
  return result;
}

absl::Status CpuBackend::AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate) {
  if (n <= 0) return absl::OkStatus();
  absl::Status reserved = kv_->Reserve(seq, n);
  // Under tensor parallelism every rank appends to its own heads, or none does.
  if (comm_ != nullptr) reserved = AgreeReservations(reserved);
  DMSRT_RETURN_IF_ERROR(reserved);
  const int64_t kw = static_cast<int64_t>(n_kv_) * head_dim_;
  std::vector<float> zeros(static_cast<size_t>(n) * kw, 0.0f);
  std::vector<uint8_t> bits(static_cast<size_t>(n) * n_kv_, 0);
  const int64_t pos0 = kv_->Length(seq);
  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    if (dms_bits_) UncomputedDmsBits(l, n_kv_, kv_head_begin_, pos0, n, dms_flag_rate, bits.data());
    kv_->AttendAndAppend(seq, l, n, nullptr, zeros.data(), zeros.data(),
                         dms_bits_ ? bits.data() : nullptr, nullptr);
  }
  if (kv_->Length(seq) < 0) return absl::NotFoundError(absl::StrCat("no KV sequence ", seq));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCpuBackend(const Model& model,
                                                        const BackendOptions& options) {
  return CpuBackend::Create(model, options);
}

}  // namespace dmsrt
