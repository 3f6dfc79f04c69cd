// The CUDA backend: the forward pass of runtime/backend/cpu_backend.cc on one device, bf16 storage and
// fp32 accumulation, with the KV store split between the host and the device:
//   host    the KvIndex (the CPU store's bookkeeping: block tables, rings, flags, reservations)
//           and runtime/kv/paged_kv.h, which turns each layer of a step into the data movement and
//           attention calls below, in an order that is exact for any mix of chunks;
//   device  the pools (K, V, position and last-visible value per slot) and every kernel.
// Resident sets are therefore those of the CPU backend by construction; only the arithmetic
// differs (bf16 activations).
//
// A step: the batch is reordered so that one-token (decode) chunks take rows 0..B-1 (one decode
// attention launch serves them all); embeddings; per layer RMSNorm, q/k/v GEMMs (+ biases),
// q/k norms, RoPE with the Variant-A decisions and channel zeroing, (Variant B: adapter norm,
// GEMM, threshold), the KV layer, o_proj, residual, RMSNorm, one gate|up GEMM, SiLU-mul, down
// GEMM, residual; then the final norm and the output GEMM for the rows that need logits only,
// and device sampling where asked. The other policies fix their bits on the host, so a step runs
// without a sync until its results are copied back. Under policy dms the decision bits (rows x
// KV heads bytes per layer) are computed on the device. A step of decode tokens only runs without
// them too: no commit of the step reads them (KvIndex::CommitDecodeDeferred), so every layer's
// bits come back with the step's results, in one copy, and the host hands them to the index
// after the step. A step with a prefill chunk needs each layer's bits before that layer's slots
// are written (the chunk's own visibility and slot reuse depend on them), so it waits for them
// once per layer.
//
// Index arrays (block tables, lengths, slot writes) go up through a pinned staging arena that
// is reset at each step; the device arena mirrors it offset for offset. Decode tables, the
// largest, are written by PagedKvLayer straight into the arena (DecodeIndexBuffer). Weights are
// one device buffer per tensor; gate and up share one [2F, H] buffer.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.cuh"
#include "kernels/dequant.cuh"
#include "kernels/dms.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/gemm.cuh"
#include "kernels/kv_store.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/sampling.cuh"
#include "parallel/comm.h"
#include "parallel/status_macros.h"
#include "parallel/world.h"
#include "runtime/backend/backend.h"
#include "runtime/backend/dms_decisions.h"
#include "runtime/kv/paged_kv.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace {

using bf16 = __nv_bfloat16;

#define DMSRT_CUDA_OK(expr) DMSRT_CUDA_RETURN_IF_ERROR(expr)

// A device buffer that only grows. Growing frees the old storage, so callers synchronise the
// stream first when kernels may still use it.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  ~DeviceArray() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  absl::Status Reserve(size_t n, cudaStream_t stream) {
    if (n <= n_) return absl::OkStatus();
    if (p_ != nullptr) {
      DMSRT_CUDA_OK(cudaStreamSynchronize(stream));
      cudaFree(p_);
      p_ = nullptr;
      n_ = 0;
    }
    DMSRT_CUDA_OK(cudaMalloc(&p_, n * sizeof(T)));
    n_ = n;
    return absl::OkStatus();
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Pinned host staging and its device mirror: Stage copies host data up (asynchronously) and
// returns where it lands on the device. Every pointer handed out stays valid until Reset, which
// the step calls once the stream is idle: growing keeps the old buffers until then.
class StagingArena {
 public:
  ~StagingArena() {
    Retire();
    FreeRetired();
  }
  void Reset() {
    FreeRetired();
    used_ = 0;
  }
  // Makes room for `bytes` more.
  absl::Status Reserve(size_t bytes) {
    const size_t need = used_ + bytes + 16 * 8;
    if (need <= cap_) return absl::OkStatus();
    Retire();
    cap_ = std::max<size_t>(need * 2, 1 << 20);
    used_ = 0;
    DMSRT_CUDA_OK(cudaMallocHost(&host_, cap_));
    DMSRT_CUDA_OK(cudaMalloc(&dev_, cap_));
    return absl::OkStatus();
  }
  // Pinned host memory for `bytes`, to be filled and then sent with Send. Call Reserve first.
  void* Claim(size_t bytes) {
    used_ = (used_ + 15) / 16 * 16;
    char* h = static_cast<char*>(host_) + used_;
    used_ += bytes;
    return h;
  }
  // Copies [host, host + bytes) of claimed memory up (asynchronously); where it lands.
  void* Send(const void* host, size_t bytes, cudaStream_t stream, cudaError_t* err) {
    const size_t off = static_cast<size_t>(static_cast<const char*>(host) - static_cast<char*>(host_));
    char* d = static_cast<char*>(dev_) + off;
    const cudaError_t e = cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess && *err == cudaSuccess) *err = e;
    return d;
  }
  // Claim, copy in, Send. Call Reserve for the total first.
  void* Stage(const void* data, size_t bytes, cudaStream_t stream, cudaError_t* err) {
    void* h = Claim(bytes);
    std::memcpy(h, data, bytes);
    return Send(h, bytes, stream, err);
  }

 private:
  void Retire() {
    if (host_ != nullptr) retired_.push_back({host_, dev_});
    host_ = dev_ = nullptr;
    cap_ = 0;
  }
  void FreeRetired() {
    for (auto [h, d] : retired_) {
      cudaFreeHost(h);
      cudaFree(d);
    }
    retired_.clear();
  }
  void* host_ = nullptr;
  void* dev_ = nullptr;
  size_t cap_ = 0, used_ = 0;
  std::vector<std::pair<void*, void*>> retired_;
};

template <typename T>
size_t Bytes(const std::vector<T>& v) {
  return v.size() * sizeof(T);
}

struct DeviceLayer {
  bf16 *attn_norm = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  bf16 *bq = nullptr, *bk = nullptr, *bv = nullptr;
  bf16 *q_norm = nullptr, *k_norm = nullptr, *ffn_norm = nullptr;
  bf16 *gate_up = nullptr, *down = nullptr;
  bf16 *alpha_norm = nullptr, *alpha = nullptr;  // DMS Variant B adapter
  float* alpha_bias = nullptr;                    // [alpha_rows] fp32, or null
  int32_t alpha_rows = 0;
};

class CudaBackend;

// runtime/kv/paged_kv.h's operations on the device pools.
class DeviceKvOps final : public PagedKvOps {
 public:
  explicit DeviceKvOps(CudaBackend* b) : b_(b) {}
  void SetLastVisible(const std::vector<std::pair<int32_t, int32_t>>& slots) override {
    Scatter(slots, false);
  }
  void ResetLastVisible(const std::vector<std::pair<int32_t, int32_t>>& slots) override {
    Scatter(slots, true);
  }
  void PrefillAttention(const PagedChunk& c, int32_t q_pos0, const std::vector<int32_t>& table,
                        int32_t max_blocks, const std::vector<int32_t>& old_lengths,
                        const std::vector<int32_t>& last_vis_new) override;
  void CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& copies) override;
  void WriteSlots(const std::vector<KvSlotWrite>& writes) override;
  // In the pinned staging arena (on failure, which status() then reports, plain host memory).
  int32_t* DecodeIndexBuffer(size_t n) override;
  void DecodeAttention(int32_t batch, const int32_t* tables, int32_t max_blocks,
                       const int32_t* lengths, int32_t max_length) override;
  // Resident decode tables in one device buffer, [layers][rows, n_kv, cap].
  bool ResizeDecodeTables(int32_t rows, int32_t cap) override;
  void DecodeAttentionRows(int32_t layer, const std::vector<std::pair<int32_t, int32_t>>& entries,
                           int32_t batch, const std::vector<int32_t>& table_rows,
                           const std::vector<int32_t>& lengths, int32_t max_length) override;
  absl::Status status() const { return status_; }
  void ClearStatus() { status_ = absl::OkStatus(); }

 private:
  void Scatter(const std::vector<std::pair<int32_t, int32_t>>& slots, bool reset);
  // Copies host index arrays (int32 elements, or records of them) up through the pinned arena;
  // their device addresses in order, or false once an error is noted.
  template <typename... V>
  bool Stage(const char* what, std::array<const int32_t*, sizeof...(V)>* out, const V&... v);
  void Note(cudaError_t e, const char* what) {
    if (e != cudaSuccess && status_.ok()) {
      status_ = absl::InternalError(absl::StrCat(what, " failed: ", cudaGetErrorName(e), " (",
                                                 cudaGetErrorString(e), ")"));
    }
  }
  void Note(const absl::Status& s) {
    if (!s.ok() && status_.ok()) status_ = s;
  }
  CudaBackend* b_;
  absl::Status status_;
  int32_t* decode_index_ = nullptr;  // the last DecodeIndexBuffer
  size_t decode_index_n_ = 0;
  int64_t table_layer_ints_ = 0;  // resident tables: rows * n_kv * cap per layer
  int32_t table_cap_ = 0;
  // The decode attention launch over `tables` (device) and `lengths` (device).
  void LaunchDecode(int32_t batch, const int32_t* tables, int32_t max_blocks,
                    const int32_t* table_rows, const int32_t* lengths, int32_t max_length);
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Model& model, const BackendOptions& options)
      : model_(model), options_(options), cfg_(model.config), ops_(this) {}
  ~CudaBackend() override;

  static absl::StatusOr<std::unique_ptr<Backend>> Create(const Model& model,
                                                         const BackendOptions& options) {
    auto b = std::make_unique<CudaBackend>(model, options);
    DMSRT_RETURN_IF_ERROR(b->Init());
    return std::unique_ptr<Backend>(std::move(b));
  }

  const char* name() const override { return "cuda"; }
  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override;
  KvCache& kv() override { return *kv_; }
  absl::Status AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate) override;
  int64_t DeviceBytesInUse() const override {
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(device_) != cudaSuccess) return 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return 0;
    return static_cast<int64_t>(total_b - free_b);
  }

 private:
  friend class DeviceKvOps;

  absl::Status Init();
  // The device is per-thread state in CUDA: every entry point binds it, since the engine may call
  // from a thread other than the one that built the backend.
  absl::Status BindDevice() {
    DMSRT_CUDA_OK(cudaSetDevice(device_));
    return absl::OkStatus();
  }
  absl::StatusOr<bf16*> Upload(const WeightTensor& w, const char* what, int64_t rows,
                               int64_t cols, bf16* dst = nullptr);
  absl::StatusOr<bf16*> Generate(const std::string& which, int32_t layer, int64_t rows,
                                 int64_t cols, bf16* dst = nullptr);
  absl::StatusOr<bf16*> Weight(const WeightTensor& w, const std::string& which, int32_t layer,
                               int64_t rows, int64_t cols, bf16* dst = nullptr);
  absl::StatusOr<void*> AllocBytes(size_t bytes);  // freed with the backend
  absl::StatusOr<bf16*> Alloc(int64_t elems);
  absl::Status Grow(int64_t rows);
  absl::Status Gemm(int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* w, void* c,
                    GemmOut out, int64_t ldc);

  const Model& model_;
  BackendOptions options_;
  const ModelConfig& cfg_;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  int32_t num_sms_ = 0;
  std::vector<void*> allocations_;
  bool dms_bits_ = false, variant_a_ = false, variant_b_ = false;
  int32_t H_ = 0, QW_ = 0, KW_ = 0, F_ = 0, hd_ = 0, nkv_ = 0, nh_ = 0, vocab_ = 0;

  // Weights.
  bf16* embed_ = nullptr;
  bf16* output_norm_ = nullptr;
  bf16* output_ = nullptr;
  bf16* ones_ = nullptr;  // [H] for an adapter without its own norm weight
  std::vector<DeviceLayer> layers_;

  // KV: host index + device pools.
  std::unique_ptr<KvIndex> kv_;
  PagedKvLayer paged_;
  DeviceKvOps ops_;
  bf16 *k_pool_ = nullptr, *v_pool_ = nullptr;
  int32_t *pos_pool_ = nullptr, *last_vis_pool_ = nullptr;

  // Activations, grown to the largest step.
  int64_t rows_cap_ = 0;
  DeviceArray<bf16> x_, xn_, q_, k_, v_, attn_, tmp_, gu_, act_;
  DeviceArray<uint8_t> bits_;
  DeviceArray<float> alpha_logits_;
  DeviceArray<int32_t> tokens_;
  DeviceArray<bf16> final_;
  DeviceArray<float> logits_, logprobs_;
  DeviceArray<char> workspace_;
  DeviceArray<int32_t> decode_tables_;  // resident decode tables (runtime/kv/paged_kv.h)
  StagingArena stage_;
  uint8_t* bits_pinned_ = nullptr;
  size_t bits_pinned_n_ = 0;
};

// ---- device KV operations ----------------------------------------------------------------------

template <typename... V>
bool DeviceKvOps::Stage(const char* what, std::array<const int32_t*, sizeof...(V)>* out,
                        const V&... v) {
  // One claim and one copy for all of them: each starts on a 16-byte boundary inside it.
  constexpr size_t kN = sizeof...(V);
  const std::array<size_t, kN> bytes = {Bytes(v)...};
  std::array<size_t, kN> offset{};
  size_t total = 0;
  for (size_t i = 0; i < kN; ++i) {
    offset[i] = total;
    total += (bytes[i] + 15) / 16 * 16;
  }
  Note(b_->stage_.Reserve(total));
  if (!status_.ok()) return false;
  char* host = static_cast<char*>(b_->stage_.Claim(total));
  const std::array<const void*, kN> src = {static_cast<const void*>(v.data())...};
  for (size_t i = 0; i < kN; ++i) {
    if (bytes[i] > 0) std::memcpy(host + offset[i], src[i], bytes[i]);
  }
  cudaError_t e = cudaSuccess;
  char* dev = static_cast<char*>(b_->stage_.Send(host, total, b_->stream_, &e));
  for (size_t i = 0; i < kN; ++i) (*out)[i] = reinterpret_cast<const int32_t*>(dev + offset[i]);
  Note(e, what);
  return status_.ok();
}

void DeviceKvOps::Scatter(const std::vector<std::pair<int32_t, int32_t>>& slots, bool reset) {
  std::array<const int32_t*, 1> d;
  if (!Stage("staging last-visible values", &d, slots)) return;
  Note(KvScatterInt32(d[0], static_cast<int32_t>(slots.size()), reset,
                      std::numeric_limits<int32_t>::max(), b_->last_vis_pool_, b_->stream_),
       "KvScatterInt32");
}

void DeviceKvOps::PrefillAttention(const PagedChunk& c, int32_t q_pos0,
                                   const std::vector<int32_t>& table, int32_t max_blocks,
                                   const std::vector<int32_t>& old_lengths,
                                   const std::vector<int32_t>& last_vis_new) {
  std::array<const int32_t*, 3> d;
  if (!Stage("staging a prefill block table", &d, table, old_lengths, last_vis_new)) return;
  const auto [dt, dl, dv] = d;
  PrefillAttentionParams p;
  p.n_queries = c.n;
  p.q_pos0 = q_pos0;
  p.n_heads = b_->nh_;
  p.n_kv_heads = b_->nkv_;
  p.head_dim = b_->hd_;
  p.block_tokens = b_->kv_->geometry().block_tokens;
  p.max_blocks_per_head = max_blocks;
  p.scale = 1.0f / std::sqrt(static_cast<float>(b_->hd_));
  const int64_t qrow = static_cast<int64_t>(c.row0) * b_->QW_;
  const int64_t krow = static_cast<int64_t>(c.row0) * b_->KW_;
  Note(::dmsrt::PrefillAttention(p, b_->q_.get() + qrow, b_->k_.get() + krow, b_->v_.get() + krow,
                                 dv, b_->k_pool_, b_->v_pool_, b_->pos_pool_, b_->last_vis_pool_,
                                 dt, dl, b_->attn_.get() + qrow, b_->stream_),
       "PrefillAttention");
}

void DeviceKvOps::CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  std::array<const int32_t*, 1> d;
  if (!Stage("staging block copies", &d, copies)) return;
  Note(KvCopyBlocks(d[0], static_cast<int32_t>(copies.size()), b_->kv_->geometry().block_tokens,
                    b_->hd_, b_->k_pool_, b_->v_pool_, b_->pos_pool_, b_->last_vis_pool_,
                    b_->stream_),
       "KvCopyBlocks");
}

void DeviceKvOps::WriteSlots(const std::vector<KvSlotWrite>& writes) {
  static_assert(sizeof(KvSlotWrite) == 4 * sizeof(int32_t), "KvSlotWrite is four int32");
  std::array<const int32_t*, 1> d;
  if (!Stage("staging slot writes", &d, writes)) return;
  Note(KvWriteSlots(d[0], static_cast<int32_t>(writes.size()), b_->k_.get(), b_->v_.get(), b_->nkv_,
                    b_->hd_, b_->k_pool_, b_->v_pool_, b_->pos_pool_, b_->stream_),
       "KvWriteSlots");
}

int32_t* DeviceKvOps::DecodeIndexBuffer(size_t n) {
  Note(b_->stage_.Reserve(n * sizeof(int32_t)));
  if (!status_.ok()) {  // the step fails; Run still needs somewhere to write
    decode_index_ = nullptr;
    return PagedKvOps::DecodeIndexBuffer(n);
  }
  decode_index_ = static_cast<int32_t*>(b_->stage_.Claim(n * sizeof(int32_t)));
  decode_index_n_ = n;
  return decode_index_;
}

void DeviceKvOps::LaunchDecode(int32_t batch, const int32_t* tables, int32_t max_blocks,
                               const int32_t* table_rows, const int32_t* lengths,
                               int32_t max_length) {
  DecodeAttentionParams p;
  p.batch = batch;
  p.n_heads = b_->nh_;
  p.n_kv_heads = b_->nkv_;
  p.head_dim = b_->hd_;
  p.block_tokens = b_->kv_->geometry().block_tokens;
  p.max_blocks_per_head = max_blocks;
  p.max_length = std::max(max_length, 1);
  p.scale = 1.0f / std::sqrt(static_cast<float>(b_->hd_));
  p.table_rows = table_rows;
  const size_t ws = DecodeAttentionWorkspaceSize(p, b_->num_sms_);
  Note(b_->workspace_.Reserve(std::max<size_t>(ws, 1), b_->stream_));
  if (!status_.ok()) return;
  Note(::dmsrt::DecodeAttention(p, b_->q_.get(), b_->k_pool_, b_->v_pool_, tables, lengths,
                                b_->attn_.get(), b_->workspace_.get(), b_->workspace_.size(),
                                b_->num_sms_, b_->stream_),
       "DecodeAttention");
}

void DeviceKvOps::DecodeAttention(int32_t batch, const int32_t* tables, int32_t max_blocks,
                                  const int32_t* lengths, int32_t max_length) {
  int32_t* const index = decode_index_;
  decode_index_ = nullptr;  // one use
  if (!status_.ok()) return;
  if (index == nullptr || tables != index ||
      lengths + static_cast<size_t>(batch) * b_->nkv_ > index + decode_index_n_) {
    Note(absl::InternalError("decode tables must be in the last DecodeIndexBuffer"));
    return;
  }
  cudaError_t e = cudaSuccess;
  const auto* dt = static_cast<const int32_t*>(
      b_->stage_.Send(index, decode_index_n_ * sizeof(int32_t), b_->stream_, &e));
  Note(e, "staging decode block tables");
  if (!status_.ok()) return;
  LaunchDecode(batch, dt, max_blocks, nullptr, dt + (lengths - tables), max_length);
}

bool DeviceKvOps::ResizeDecodeTables(int32_t rows, int32_t cap) {
  const int64_t per_layer = static_cast<int64_t>(rows) * b_->nkv_ * cap;
  if (per_layer > std::numeric_limits<int32_t>::max()) return false;  // scatter indices are int32
  // Growing waits for the stream before freeing the old tables; a failure leaves the step's
  // own tables as the way (PagedKvLayer stops asking).
  if (!b_->decode_tables_.Reserve(static_cast<size_t>(per_layer) * b_->cfg_.n_layers, b_->stream_).ok()) {
    return false;
  }
  table_layer_ints_ = per_layer;
  table_cap_ = cap;
  return true;
}

void DeviceKvOps::DecodeAttentionRows(int32_t layer,
                                      const std::vector<std::pair<int32_t, int32_t>>& entries,
                                      int32_t batch, const std::vector<int32_t>& table_rows,
                                      const std::vector<int32_t>& lengths, int32_t max_length) {
  std::array<const int32_t*, 3> d;
  if (!Stage("staging decode table entries, rows and lengths", &d, entries, table_rows, lengths)) {
    return;
  }
  int32_t* tables = b_->decode_tables_.get() + layer * table_layer_ints_;
  if (!entries.empty()) {
    Note(KvScatterInt32(d[0], static_cast<int32_t>(entries.size()), false, 0, tables, b_->stream_),
         "KvScatterInt32 (decode tables)");
  }
  LaunchDecode(batch, tables, table_cap_, d[1], d[2], max_length);
}

// ---- set-up ------------------------------------------------------------------------------------

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (void* p : allocations_) cudaFree(p);
  if (bits_pinned_ != nullptr) cudaFreeHost(bits_pinned_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::StatusOr<void*> CudaBackend::AllocBytes(size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e != cudaSuccess) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "device memory exhausted allocating %d MiB of weights (%s); the model does not fit on "
        "this device", bytes >> 20, cudaGetErrorString(e)));
  }
  allocations_.push_back(p);
  return p;
}

absl::StatusOr<bf16*> CudaBackend::Alloc(int64_t elems) {
  DMSRT_ASSIGN_OR_RETURN(void* p, AllocBytes(static_cast<size_t>(elems) * sizeof(bf16)));
  return static_cast<bf16*>(p);
}

absl::StatusOr<bf16*> CudaBackend::Upload(const WeightTensor& w, const char* what, int64_t rows,
                                          int64_t cols, bf16* dst) {
  if (w.rows != rows || w.cols != cols) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", w.name, " (", what, ") is [", w.rows,
                                                   ", ", w.cols, "], expected [", rows, ", ",
                                                   cols, "]"));
  }
  if (dst == nullptr) {
    DMSRT_ASSIGN_OR_RETURN(dst, Alloc(rows * cols));
  }
  const size_t raw = static_cast<size_t>(RowBytes(w.type, cols)) * rows;
  if (w.type == DType::kBF16) {
    DMSRT_CUDA_OK(cudaMemcpy(dst, w.data, raw, cudaMemcpyHostToDevice));
    return dst;
  }
  void* src = nullptr;
  DMSRT_CUDA_OK(cudaMalloc(&src, raw));
  cudaError_t e = cudaMemcpy(src, w.data, raw, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = DequantizeToBf16(static_cast<int>(w.type), src, rows, cols, dst, stream_);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream_);
  cudaFree(src);
  if (e != cudaSuccess) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight ", w.name, " (", what, ", type ", DTypeName(w.type), ") could not be converted to "
        "bf16 on the device: ", cudaGetErrorString(e),
        " (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q6_K)"));
  }
  return dst;
}

absl::StatusOr<bf16*> CudaBackend::Generate(const std::string& which, int32_t layer, int64_t rows,
                                            int64_t cols, bf16* dst) {
  if (dst == nullptr) {
    DMSRT_ASSIGN_OR_RETURN(dst, Alloc(rows * cols));
  }
  const SyntheticTensorSpec s = SyntheticTensor(cfg_, model_.synthetic_seed, which, layer);
  if (s.offset != 0.0f) {
    // Norms: small, generated on the host exactly as MakeSyntheticModel does.
    std::vector<bf16> h(static_cast<size_t>(rows * cols));
    for (size_t i = 0; i < h.size(); ++i) {
      h[i] = __float2bfloat16(SyntheticValue(s, i));
    }
    DMSRT_CUDA_OK(cudaMemcpy(dst, h.data(), h.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    return dst;
  }
  DMSRT_CUDA_OK(FillRandomBf16(dst, rows * cols, s.seed, s.scale, stream_));
  return dst;
}

absl::StatusOr<bf16*> CudaBackend::Weight(const WeightTensor& w, const std::string& which,
                                          int32_t layer, int64_t rows, int64_t cols, bf16* dst) {
  if (w.present()) return Upload(w, which.c_str(), rows, cols, dst);
  if (model_.synthetic) return Generate(which, layer, rows, cols, dst);
  return absl::InvalidArgumentError(absl::StrCat("missing weight: ", which,
                                                 layer >= 0 ? absl::StrCat(" of layer ", layer) : ""));
}

absl::Status CudaBackend::Init() {
  const ModelConfig& c = cfg_;
  if (options_.comm != nullptr && options_.comm->size() > 1) {
    return absl::UnimplementedError(
        "the CUDA backend runs on one device; tensor parallelism is on the CPU backend");
  }
  if (c.n_layers <= 0 || c.hidden <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
      c.head_dim <= 0 || c.ffn <= 0 || c.vocab <= 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError("bad model config for the CUDA backend");
  }
  if (c.head_dim != 64 && c.head_dim != 128 && c.head_dim != 256) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA attention kernels take head_dim 64, 128 or 256; this model has ", c.head_dim));
  }
  if (c.gqa_group() > 8) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA decode attention takes at most 8 query heads per KV head; this model has ",
        c.gqa_group()));
  }
  if ((c.rope_dim > 0 && c.rope_dim != c.head_dim) ||
      c.rope_scaling.type != RopeScaling::Type::kNone) {
    return absl::UnimplementedError(
        "the CUDA RoPE kernel rotates every channel without frequency scaling; this model uses "
        "partial rotation or RoPE scaling (run it on --backend cpu)");
  }
  DMSRT_RETURN_IF_ERROR(CheckKvPolicy(c, options_.kv_policy));
  variant_a_ = c.dms.enabled && !c.dms.separate_alpha;
  dms_bits_ = options_.kv_policy.kind == KvPolicyKind::kDms && c.dms.enabled;
  variant_b_ = dms_bits_ && c.dms.separate_alpha;
  H_ = c.hidden;
  nh_ = c.n_heads;
  nkv_ = c.n_kv_heads;
  hd_ = c.head_dim;
  QW_ = nh_ * hd_;
  KW_ = nkv_ * hd_;
  F_ = c.ffn;
  vocab_ = c.vocab;

  int n_dev = 0;
  const cudaError_t de = cudaGetDeviceCount(&n_dev);
  if (de != cudaSuccess || n_dev == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no CUDA device (", de != cudaSuccess ? cudaGetErrorString(de) : "none found",
        "); use --backend cpu"));
  }
  if (options_.device >= n_dev) {
    return absl::InvalidArgumentError(absl::StrCat("--device ", options_.device, ": this machine has ",
                                                   n_dev, " CUDA device(s)"));
  }
  device_ = options_.device >= 0 ? options_.device : ReadLauncherEnv().local_rank.value_or(0) % n_dev;
  DMSRT_RETURN_IF_ERROR(BindDevice());
  DMSRT_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  DMSRT_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
  DMSRT_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
  DMSRT_CUDA_OK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_));

  // Weights.
  const ModelWeights& W = model_.weights;
  const bool host = !W.layers.empty();
  if (!host && !model_.synthetic) return absl::InvalidArgumentError("model has no weights");
  if (host && static_cast<int32_t>(W.layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError("model layer count does not match its config");
  }
  static const WeightTensor kAbsent;
  auto lw = [&](int32_t l) -> const LayerWeights* { return host ? &W.layers[l] : nullptr; };
  DMSRT_ASSIGN_OR_RETURN(embed_, Weight(host ? W.tok_embd : kAbsent, "tok_embd", -1, vocab_, H_));
  DMSRT_ASSIGN_OR_RETURN(output_norm_, Weight(host ? W.output_norm : kAbsent, "output_norm", -1, 1, H_));
  if (host && (c.tied_embeddings || W.output.data == W.tok_embd.data)) {
    output_ = embed_;
  } else {
    DMSRT_ASSIGN_OR_RETURN(output_, Weight(host ? W.output : kAbsent, "output", -1, vocab_, H_));
  }
  {
    std::vector<bf16> ones(H_, __float2bfloat16(1.0f));
    DMSRT_ASSIGN_OR_RETURN(ones_, Alloc(H_));
    DMSRT_CUDA_OK(cudaMemcpy(ones_, ones.data(), Bytes(ones), cudaMemcpyHostToDevice));
  }
  layers_.resize(c.n_layers);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights* L = lw(l);
    DeviceLayer& D = layers_[l];
    auto get = [&](const WeightTensor LayerWeights::*m) -> const WeightTensor& {
      return L != nullptr ? L->*m : kAbsent;
    };
    DMSRT_ASSIGN_OR_RETURN(D.attn_norm, Weight(get(&LayerWeights::attn_norm), "attn_norm", l, 1, H_));
    DMSRT_ASSIGN_OR_RETURN(D.wq, Weight(get(&LayerWeights::wq), "wq", l, QW_, H_));
    DMSRT_ASSIGN_OR_RETURN(D.wk, Weight(get(&LayerWeights::wk), "wk", l, KW_, H_));
    DMSRT_ASSIGN_OR_RETURN(D.wv, Weight(get(&LayerWeights::wv), "wv", l, KW_, H_));
    DMSRT_ASSIGN_OR_RETURN(D.wo, Weight(get(&LayerWeights::wo), "wo", l, H_, QW_));
    if (L != nullptr && L->bq.present()) {
      DMSRT_ASSIGN_OR_RETURN(D.bq, Upload(L->bq, "bq", 1, QW_));
      DMSRT_ASSIGN_OR_RETURN(D.bk, Upload(L->bk, "bk", 1, KW_));
      DMSRT_ASSIGN_OR_RETURN(D.bv, Upload(L->bv, "bv", 1, KW_));
    }
    if (c.qk_norm) {
      DMSRT_ASSIGN_OR_RETURN(D.q_norm, Weight(get(&LayerWeights::q_norm), "q_norm", l, 1, hd_));
      DMSRT_ASSIGN_OR_RETURN(D.k_norm, Weight(get(&LayerWeights::k_norm), "k_norm", l, 1, hd_));
    }
    DMSRT_ASSIGN_OR_RETURN(D.ffn_norm, Weight(get(&LayerWeights::ffn_norm), "ffn_norm", l, 1, H_));
    DMSRT_ASSIGN_OR_RETURN(D.gate_up, Alloc(2ll * F_ * H_));
    DMSRT_RETURN_IF_ERROR(Weight(get(&LayerWeights::w_gate), "w_gate", l, F_, H_, D.gate_up).status());
    DMSRT_RETURN_IF_ERROR(
        Weight(get(&LayerWeights::w_up), "w_up", l, F_, H_, D.gate_up + static_cast<int64_t>(F_) * H_)
            .status());
    DMSRT_ASSIGN_OR_RETURN(D.down, Weight(get(&LayerWeights::w_down), "w_down", l, H_, F_));
    if (variant_b_) {
      if (L == nullptr || !L->dms_alpha.present()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "DMS Variant B (separate alpha) needs the dms_proj_alpha adapter; layer ", l,
            " has none (attach it with --dms-adapter)"));
      }
      D.alpha_rows = static_cast<int32_t>(L->dms_alpha.rows);
      if (L->dms_alpha_bias.present()) {
        // Small (one value per adapter row; the loader checked its shape): converted on the
        // host, kept in fp32 like the logits it is added to.
        std::vector<float> bias(D.alpha_rows);
        for (int32_t i = 0; i < D.alpha_rows; ++i) bias[i] = AdapterWeightAt(L->dms_alpha_bias, i);
        DMSRT_ASSIGN_OR_RETURN(void* dev, AllocBytes(Bytes(bias)));
        D.alpha_bias = static_cast<float*>(dev);
        DMSRT_CUDA_OK(cudaMemcpy(D.alpha_bias, bias.data(), Bytes(bias), cudaMemcpyHostToDevice));
      }
      DMSRT_ASSIGN_OR_RETURN(D.alpha, Upload(L->dms_alpha, "dms_alpha", D.alpha_rows, H_));
      D.alpha_norm = L->dms_alpha_norm.present() ? nullptr : ones_;
      if (L->dms_alpha_norm.present()) {
        DMSRT_ASSIGN_OR_RETURN(D.alpha_norm, Upload(L->dms_alpha_norm, "dms_alpha_norm", 1, H_));
      }
    }
  }
  DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));

  // KV pools: what the budget buys (or, with budget <= 0, the memory left less a margin for
  // activations and cuBLAS).
  KvGeometry geo;
  geo.n_layers = c.n_layers;
  geo.n_kv_heads = nkv_;
  geo.n_heads = nh_;
  geo.head_dim = hd_;
  geo.block_tokens = options_.kv_block_tokens;
  KvPolicyConfig policy = options_.kv_policy;
  if (policy.kind == KvPolicyKind::kDms && policy.window <= 0) policy.window = c.dms.window;
  const int64_t bt = geo.block_tokens;
  const int64_t block_bytes = bt * (2ll * hd_ * static_cast<int64_t>(sizeof(bf16)) + 2 * sizeof(int32_t));
  int64_t budget = options_.kv_budget_bytes;
  if (budget <= 0) {
    size_t free_b = 0, total_b = 0;
    DMSRT_CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
    const int64_t margin = std::max<int64_t>(2ll << 30, static_cast<int64_t>(total_b) / 20);
    budget = static_cast<int64_t>(free_b) - margin;
    if (budget < block_bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "no device memory left for the KV cache: %d MiB free after the weights", free_b >> 20));
    }
  }
  DMSRT_ASSIGN_OR_RETURN(kv_, MakeKvIndex(geo, policy, budget, block_bytes));
  const int64_t blocks = kv_->total_blocks();
  const int64_t slots = blocks * bt;
  auto alloc_raw = [&](void** p, size_t bytes) -> absl::Status {
    const cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "could not allocate the device KV pool (%d MiB: %s); lower --kv-budget",
          blocks * block_bytes >> 20, cudaGetErrorString(e)));
    }
    allocations_.push_back(*p);
    return absl::OkStatus();
  };
  DMSRT_RETURN_IF_ERROR(alloc_raw(reinterpret_cast<void**>(&k_pool_), slots * hd_ * sizeof(bf16)));
  DMSRT_RETURN_IF_ERROR(alloc_raw(reinterpret_cast<void**>(&v_pool_), slots * hd_ * sizeof(bf16)));
  DMSRT_RETURN_IF_ERROR(alloc_raw(reinterpret_cast<void**>(&pos_pool_), slots * sizeof(int32_t)));
  DMSRT_RETURN_IF_ERROR(alloc_raw(reinterpret_cast<void**>(&last_vis_pool_), slots * sizeof(int32_t)));
  // Slots never written hold small finite values (uncomputed appends read them); last_vis is
  // "never" (0x7F7F7F7F: any value above every position means never).
  DMSRT_CUDA_OK(FillRandomBf16(k_pool_, slots * hd_, 0x6b, 1.0f, stream_));
  DMSRT_CUDA_OK(FillRandomBf16(v_pool_, slots * hd_, 0x76, 1.0f, stream_));
  DMSRT_CUDA_OK(cudaMemsetAsync(pos_pool_, 0, slots * sizeof(int32_t), stream_));
  DMSRT_CUDA_OK(cudaMemsetAsync(last_vis_pool_, 0x7F, slots * sizeof(int32_t), stream_));
  DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Grow(int64_t rows) {
  if (rows <= rows_cap_) return absl::OkStatus();
  const size_t r = static_cast<size_t>(std::max<int64_t>(rows, 2 * rows_cap_));
  DMSRT_RETURN_IF_ERROR(x_.Reserve(r * H_, stream_));
  DMSRT_RETURN_IF_ERROR(xn_.Reserve(r * H_, stream_));
  DMSRT_RETURN_IF_ERROR(q_.Reserve(r * QW_, stream_));
  DMSRT_RETURN_IF_ERROR(k_.Reserve(r * KW_, stream_));
  DMSRT_RETURN_IF_ERROR(v_.Reserve(r * KW_, stream_));
  DMSRT_RETURN_IF_ERROR(attn_.Reserve(r * QW_, stream_));
  DMSRT_RETURN_IF_ERROR(tmp_.Reserve(r * H_, stream_));
  DMSRT_RETURN_IF_ERROR(gu_.Reserve(r * 2 * F_, stream_));
  DMSRT_RETURN_IF_ERROR(act_.Reserve(r * F_, stream_));
  // Decision bits: one [rows, n_kv] slice per layer (a decode step brings them all back at once).
  const size_t bits_n = r * nkv_ * (dms_bits_ ? cfg_.n_layers : 1);
  DMSRT_RETURN_IF_ERROR(bits_.Reserve(bits_n, stream_));
  DMSRT_RETURN_IF_ERROR(alpha_logits_.Reserve(r * nkv_, stream_));
  if (bits_pinned_n_ < bits_n) {
    if (bits_pinned_ != nullptr) cudaFreeHost(bits_pinned_);
    bits_pinned_ = nullptr;
    DMSRT_CUDA_OK(cudaMallocHost(&bits_pinned_, bits_n));
    bits_pinned_n_ = bits_n;
  }
  rows_cap_ = static_cast<int64_t>(r);
  return absl::OkStatus();
}

absl::Status CudaBackend::Gemm(int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* w,
                               void* c, GemmOut out, int64_t ldc) {
  DMSRT_CUDA_OK(GemmBf16(cublas_, static_cast<int32_t>(m), static_cast<int32_t>(n),
                         static_cast<int32_t>(k), a, static_cast<int32_t>(k), w,
                         static_cast<int32_t>(k), c, static_cast<int32_t>(ldc), out, 1.0f, 0.0f,
                         stream_));
  return absl::OkStatus();
}

// ---- the step ------------------------------------------------------------------------------------

absl::Status CudaBackend::AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate) {
  if (n <= 0) return absl::OkStatus();
  DMSRT_RETURN_IF_ERROR(BindDevice());
  DMSRT_RETURN_IF_ERROR(kv_->Reserve(seq, n));
  // Bookkeeping only: the slots keep whatever values they hold.
  class Discard final : public KvSlotSink {
   public:
    void CopyBlock(int32_t, int32_t) override {}
    void WriteSlot(int32_t, int32_t, int32_t, int32_t, int32_t, int32_t) override {}
  } sink;
  std::vector<uint8_t> bits(static_cast<size_t>(n) * nkv_, 0);
  const int64_t pos0 = kv_->Length(seq);
  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    if (dms_bits_) UncomputedDmsBits(l, nkv_, 0, pos0, n, dms_flag_rate, bits.data());
    if (!kv_->CommitRows(seq, l, n, 0, dms_bits_ ? bits.data() : nullptr, sink)) {
      return absl::InternalError(absl::StrCat("appending to KV sequence ", seq, " failed"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ForwardResult> CudaBackend::Forward(const std::vector<SeqChunk>& batch) {
  ForwardResult result;
  result.vocab = vocab_;
  DMSRT_ASSIGN_OR_RETURN(const int64_t T, ValidateStep(batch, vocab_));
  if (T == 0) return result;
  DMSRT_RETURN_IF_ERROR(BindDevice());
  for (const SeqChunk& ch : batch) {
    DMSRT_RETURN_IF_ERROR(kv_->Reserve(ch.seq, static_cast<int32_t>(ch.tokens.size())));
  }
  DMSRT_RETURN_IF_ERROR(Grow(T));
  // A step that failed part-way may have left work queued: the staging arena is reused only
  // once the stream is idle.
  DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
  stage_.Reset();
  ops_.ClearStatus();

  // Rows: one-token chunks first.
  std::vector<size_t> order;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (batch[ci].tokens.size() == 1) order.push_back(ci);
  }
  const int32_t n_decode = static_cast<int32_t>(order.size());
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (batch[ci].tokens.size() != 1) order.push_back(ci);
  }
  std::vector<PagedChunk> chunks(batch.size());
  std::vector<int32_t> row0_of(batch.size());
  std::vector<int32_t> ids(T), pos(T);
  {
    int32_t row = 0;
    for (size_t oi = 0; oi < order.size(); ++oi) {
      const SeqChunk& ch = batch[order[oi]];
      const int32_t n = static_cast<int32_t>(ch.tokens.size());
      const int64_t p0 = kv_->Length(ch.seq);
      chunks[oi] = PagedChunk{ch.seq, row, n};
      row0_of[order[oi]] = row;
      for (int32_t i = 0; i < n; ++i) {
        ids[row + i] = ch.tokens[i];
        pos[row + i] = static_cast<int32_t>(p0 + i);
      }
      row += n;
    }
  }
  // Small per-step inputs go up through the pinned staging arena (asynchronous copies).
  DMSRT_RETURN_IF_ERROR(stage_.Reserve(Bytes(ids) + Bytes(pos)));
  cudaError_t staged = cudaSuccess;
  const auto* ids_d = static_cast<const int32_t*>(stage_.Stage(ids.data(), Bytes(ids), stream_, &staged));
  const auto* pos_d = static_cast<const int32_t*>(stage_.Stage(pos.data(), Bytes(pos), stream_, &staged));
  DMSRT_CUDA_OK(staged);
  DMSRT_CUDA_OK(EmbeddingGather(embed_, vocab_, H_, ids_d, static_cast<int32_t>(T), x_.get(), stream_));

  const float eps = cfg_.rms_eps;
  const int32_t rows = static_cast<int32_t>(T);
  const bool defer_bits = dms_bits_ && PagedKvLayer::CanDeferBits(*kv_, chunks, n_decode);
  const int64_t bits_layer = T * nkv_;  // bytes of one layer's bits
  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    const DeviceLayer& L = layers_[l];
    uint8_t* bits_l = bits_.get() + (defer_bits ? l * bits_layer : 0);
    if (variant_b_) {
      DMSRT_CUDA_OK(RmsNorm(x_.get(), L.alpha_norm, rows, H_, eps, xn_.get(), stream_));
      DMSRT_RETURN_IF_ERROR(Gemm(T, L.alpha_rows, H_, xn_.get(), L.alpha, alpha_logits_.get(),
                                 GemmOut::kF32, L.alpha_rows));
      DMSRT_CUDA_OK(DmsThreshold(rows, nkv_, alpha_logits_.get(), L.alpha_rows, L.alpha_bias,
                                 cfg_.dms.alpha_scale, cfg_.dms.initial_alpha_offset,
                                 cfg_.dms.alpha_per_layer, bits_l, stream_));
    }
    DMSRT_CUDA_OK(RmsNorm(x_.get(), L.attn_norm, rows, H_, eps, xn_.get(), stream_));
    DMSRT_RETURN_IF_ERROR(Gemm(T, QW_, H_, xn_.get(), L.wq, q_.get(), GemmOut::kBf16, QW_));
    DMSRT_RETURN_IF_ERROR(Gemm(T, KW_, H_, xn_.get(), L.wk, k_.get(), GemmOut::kBf16, KW_));
    DMSRT_RETURN_IF_ERROR(Gemm(T, KW_, H_, xn_.get(), L.wv, v_.get(), GemmOut::kBf16, KW_));
    if (L.bq != nullptr) {
      DMSRT_CUDA_OK(AddBiasRows(q_.get(), L.bq, rows, QW_, QW_, stream_));
      DMSRT_CUDA_OK(AddBiasRows(k_.get(), L.bk, rows, KW_, KW_, stream_));
      DMSRT_CUDA_OK(AddBiasRows(v_.get(), L.bv, rows, KW_, KW_, stream_));
    }
    if (L.q_norm != nullptr) {
      DMSRT_CUDA_OK(RmsNorm(q_.get(), L.q_norm, rows * nh_, hd_, eps, q_.get(), stream_));
      DMSRT_CUDA_OK(RmsNorm(k_.get(), L.k_norm, rows * nkv_, hd_, eps, k_.get(), stream_));
    }
    RopeDmsParams rp;
    rp.n_tokens = rows;
    rp.n_heads = nh_;
    rp.n_kv_heads = nkv_;
    rp.head_dim = hd_;
    rp.theta = cfg_.rope_theta;
    rp.decide = variant_a_;
    rp.alpha_scale = cfg_.dms.alpha_scale;
    rp.alpha_offset = cfg_.dms.initial_alpha_offset;
    rp.alpha_per_layer = cfg_.dms.alpha_per_layer;
    DMSRT_CUDA_OK(RopeDmsVariantA(rp, pos_d, q_.get(), k_.get(),
                                  variant_a_ ? bits_l : nullptr, stream_));
    const uint8_t* host_bits = nullptr;
    if (dms_bits_ && !defer_bits) {
      DMSRT_CUDA_OK(cudaMemcpyAsync(bits_pinned_, bits_l, static_cast<size_t>(bits_layer),
                                    cudaMemcpyDeviceToHost, stream_));
      DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
      host_bits = bits_pinned_;
    }
    DMSRT_RETURN_IF_ERROR(paged_.Run(*kv_, l, chunks, n_decode, host_bits, ops_, defer_bits));
    DMSRT_RETURN_IF_ERROR(ops_.status());
    DMSRT_RETURN_IF_ERROR(Gemm(T, H_, QW_, attn_.get(), L.wo, tmp_.get(), GemmOut::kBf16, H_));
    DMSRT_CUDA_OK(ResidualAdd(x_.get(), tmp_.get(), T * H_, stream_));
    DMSRT_CUDA_OK(RmsNorm(x_.get(), L.ffn_norm, rows, H_, eps, xn_.get(), stream_));
    DMSRT_RETURN_IF_ERROR(Gemm(T, 2ll * F_, H_, xn_.get(), L.gate_up, gu_.get(), GemmOut::kBf16, 2ll * F_));
    DMSRT_CUDA_OK(SiluMul(gu_.get(), gu_.get() + F_, rows, F_, 2 * F_, act_.get(), F_, stream_));
    DMSRT_RETURN_IF_ERROR(Gemm(T, H_, F_, act_.get(), L.down, tmp_.get(), GemmOut::kBf16, H_));
    DMSRT_CUDA_OK(ResidualAdd(x_.get(), tmp_.get(), T * H_, stream_));
  }
  // Deferred bits, every layer's, come back with the step's results ([layers, rows, n_kv]).
  if (defer_bits) {
    DMSRT_CUDA_OK(cudaMemcpyAsync(bits_pinned_, bits_.get(),
                                  static_cast<size_t>(cfg_.n_layers * bits_layer),
                                  cudaMemcpyDeviceToHost, stream_));
  }

  // Rows that need logits on the device, in chunk order; `ret` = returned to the caller.
  std::vector<int32_t> dev_rows;
  std::vector<bool> ret;
  std::vector<int32_t> sample_idx(batch.size(), -1);
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    const SeqChunk& ch = batch[ci];
    const int32_t n = static_cast<int32_t>(ch.tokens.size());
    const int32_t r0 = row0_of[ci];
    if (ch.logits == SeqChunk::Logits::kAll) {
      for (int32_t i = 0; i < n; ++i) {
        dev_rows.push_back(r0 + i);
        ret.push_back(true);
        result.row_chunk.push_back(static_cast<int32_t>(ci));
      }
    } else if (ch.logits == SeqChunk::Logits::kLast) {
      dev_rows.push_back(r0 + n - 1);
      ret.push_back(true);
      result.row_chunk.push_back(static_cast<int32_t>(ci));
    } else if (ch.sample) {
      dev_rows.push_back(r0 + n - 1);
      ret.push_back(false);
    }
    if (ch.sample) sample_idx[ci] = static_cast<int32_t>(dev_rows.size()) - 1;
  }
  result.sampled.assign(batch.size(), -1);
  result.sampled_logprob.assign(batch.size(), 0.0f);
  const int64_t R = static_cast<int64_t>(dev_rows.size());
  if (R > 0) {
    DMSRT_RETURN_IF_ERROR(final_.Reserve(R * H_, stream_));
    DMSRT_RETURN_IF_ERROR(logits_.Reserve(R * vocab_, stream_));
    DMSRT_RETURN_IF_ERROR(stage_.Reserve(Bytes(dev_rows)));
    const auto* rows_d =
        static_cast<const int32_t*>(stage_.Stage(dev_rows.data(), Bytes(dev_rows), stream_, &staged));
    DMSRT_CUDA_OK(staged);
    // The rows of x, gathered as if x were an embedding table.
    DMSRT_CUDA_OK(EmbeddingGather(x_.get(), rows, H_, rows_d, static_cast<int32_t>(R),
                                  final_.get(), stream_));
    DMSRT_CUDA_OK(RmsNorm(final_.get(), output_norm_, static_cast<int32_t>(R), H_, eps, final_.get(), stream_));
    DMSRT_RETURN_IF_ERROR(Gemm(R, vocab_, H_, final_.get(), output_, logits_.get(), GemmOut::kF32, vocab_));
    std::vector<DeviceSamplingParams> sp;
    std::vector<int32_t> srow;
    for (size_t ci = 0; ci < batch.size(); ++ci) {
      if (sample_idx[ci] < 0) continue;
      sp.push_back(batch[ci].sampling);
      srow.push_back(sample_idx[ci]);
    }
    // Sampled rows are gathered into their own compact logits block when they are not already
    // contiguous from row 0 (the usual decode step: every chunk samples, one row each).
    const int32_t S = static_cast<int32_t>(sp.size());
    // Sampled tokens and log-probabilities come back into pinned staging memory, so that the
    // copies are asynchronous and the step waits once, at its end.
    int32_t* tokens = nullptr;
    float* lps = nullptr;
    if (S > 0) {
      DMSRT_RETURN_IF_ERROR(tokens_.Reserve(S, stream_));
      DMSRT_RETURN_IF_ERROR(logprobs_.Reserve(S, stream_));
      DMSRT_RETURN_IF_ERROR(stage_.Reserve(Bytes(sp) + 2 * S * sizeof(int32_t) + 32));
      tokens = static_cast<int32_t*>(stage_.Claim(S * sizeof(int32_t)));
      lps = static_cast<float*>(stage_.Claim(S * sizeof(float)));
      const auto* sp_d = static_cast<const DeviceSamplingParams*>(
          stage_.Stage(sp.data(), Bytes(sp), stream_, &staged));
      DMSRT_CUDA_OK(staged);
      bool identity = true;
      for (int32_t i = 0; i < S; ++i) identity = identity && srow[i] == i;
      if (!identity) {
        // One sampled row at a time keeps this simple; steps that mix sampled and returned rows
        // are prefill steps, where this is not the cost that matters.
        for (int32_t i = 0; i < S; ++i) {
          DMSRT_CUDA_OK(SampleTokens(logits_.get() + static_cast<int64_t>(srow[i]) * vocab_, 1,
                                     vocab_, vocab_, sp_d + i, tokens_.get() + i,
                                     logprobs_.get() + i, stream_));
        }
      } else {
        DMSRT_CUDA_OK(SampleTokens(logits_.get(), S, vocab_, vocab_, sp_d, tokens_.get(),
                                   logprobs_.get(), stream_));
      }
      DMSRT_CUDA_OK(cudaMemcpyAsync(tokens, tokens_.get(), S * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
      DMSRT_CUDA_OK(cudaMemcpyAsync(lps, logprobs_.get(), S * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
    const int64_t returned = static_cast<int64_t>(result.row_chunk.size());
    result.logits.resize(static_cast<size_t>(returned) * vocab_);
    // Returned rows in runs of consecutive device rows, one copy per run (into pageable memory,
    // each copy waits for the stream: a prefill step that returns every row waits once).
    int64_t out_r = 0;
    for (int64_t r = 0; r < R;) {
      if (!ret[r]) {
        ++r;
        continue;
      }
      int64_t r1 = r;
      while (r1 < R && ret[r1]) ++r1;
      DMSRT_CUDA_OK(cudaMemcpyAsync(result.logits.data() + out_r * vocab_,
                                    logits_.get() + r * vocab_, sizeof(float) * vocab_ * (r1 - r),
                                    cudaMemcpyDeviceToHost, stream_));
      out_r += r1 - r;
      r = r1;
    }
    DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
    int32_t si = 0;
    for (size_t ci = 0; ci < batch.size(); ++ci) {
      if (sample_idx[ci] < 0) continue;
      result.sampled[ci] = tokens[si];
      result.sampled_logprob[ci] = lps[si];
      ++si;
    }
  } else {
    DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
  }
  if (defer_bits) {
    for (int32_t b = 0; b < n_decode; ++b) {
      DMSRT_RETURN_IF_ERROR(
          kv_->SetDeferredBits(chunks[b].seq, bits_pinned_ + static_cast<int64_t>(b) * nkv_, bits_layer));
    }
  }
  return result;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const Model& model,
                                                         const BackendOptions& options) {
  return CudaBackend::Create(model, options);
}

}  // namespace dmsrt
