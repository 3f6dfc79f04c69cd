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
// once per layer. Under tova and h2o each decode layer also computes the attention weight of
// every resident slot (kernels/slot_weights.cuh); they come back with the step's results and the
// index picks the victims from them (KvIndex::SetVictimWeights), and a chunk of several tokens
// runs as one-token steps.
//
// Tensor parallelism (BackendOptions::comm an NcclComm of tp > 1 ranks, one device each): the
// rank holds the shard of parallel/shard_plan.h that the CPU backend holds, in bf16 on its
// device: the rows of q/k/v for its heads and of gate/up for its FFN slice, the columns of o_proj
// and down_proj, the vocabulary rows of the embedding and the output projection. Its KV index and
// pools cover its own KV heads only (global indices from kv_head_offset), so it makes the DMS
// decisions and evictions of those heads. Collectives go through the NcclComm, bound to the
// backend's stream (they are ordered with the kernels by the stream and never wait on the host):
// o_proj and down_proj write fp32 partial sums that are all-reduced and then rounded into the
// residual as a single device's bf16 GEMM output is (ResidualAddF32); the embedding rows of
// other ranks' tokens are zero, so an integer sum of the rows' bits gathers them exactly; the
// logits of each vocabulary slice are all-gathered (the leader assembles full rows). The KV
// reservations of a step are agreed over the group before its first collective (one rank's full
// pool fails the step on every rank alike), and every wait of a step goes through the
// communicator's watchdog (--tp-timeout). Only TP rank 0's results are the group's: the other
// ranks compute their share of every row and return no logits and no samples.
//
// Index arrays (block tables, lengths, slot writes) go up through a pinned staging arena that
// is reset at each step; the device arena mirrors it offset for offset. Decode tables, the
// largest, are written by PagedKvLayer straight into the arena (DecodeIndexBuffer). Weights are
// one device buffer per tensor; gate and up share one [2F, H] buffer.
//
// The parts (this header declares what they share; internal to runtime/backend/cuda/):
//   cuda_backend.cc    set-up: model checks, the device, KV pools, activation buffers, GEMM
//   weight_upload.cc   weights to the device (converted to bf16, or generated for synthetic models)
//   device_kv_ops.cc   DeviceKvOps: runtime/kv/paged_kv.h's operations on the device pools
//   step.cc            Forward: row order, staging of the step's inputs, embeddings, deferred bits
//   layer_forward.cc   one transformer layer of a step
//   step_output.cc     logits rows, the output GEMM, device sampling, results back to the host
//   tensor_parallel.cc the shard, the group's collectives and agreements, the watchdog wait
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.cuh"
#include "kernels/gemm.cuh"
#include "parallel/shard_plan.h"
#include "parallel/status_macros.h"
#include "runtime/backend/backend.h"
#include "runtime/kv/paged_kv.h"

namespace dmsrt {

class NcclComm;  // parallel/nccl/nccl_comm.h

namespace cuda_backend {

using bf16 = __nv_bfloat16;

#define DMSRT_CUDA_OK(expr) DMSRT_CUDA_RETURN_IF_ERROR(expr)

// Waits until the stream that uses a buffer is idle (CudaBackend::WaitStream: through the TP
// group's watchdog when there is one, since the stream may hold a collective).
using StreamWait = std::function<absl::Status()>;

// A device buffer that only grows. Growing frees the old storage, so it first waits for the
// stream that may still use it.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  ~DeviceArray() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  absl::Status Reserve(size_t n, const StreamWait& wait) {
    if (n <= n_) return absl::OkStatus();
    if (p_ != nullptr) {
      DMSRT_RETURN_IF_ERROR(wait());
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
  // Frees the storage now (it must be idle).
  void Release() {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }

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
  // Into CudaBackend::victim_w_ at `layer`'s slice ([layers][rows, n_kv, ld]).
  void DecodeSlotWeights(int32_t layer) override;
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
  // The last decode attention launch (device pointers), which DecodeSlotWeights reads again.
  struct DecodeLaunch {
    int32_t batch = 0, max_blocks = 0, max_length = 0;
    const int32_t *tables = nullptr, *table_rows = nullptr, *lengths = nullptr;
  } last_decode_;
  // DecodeAttention's parameters for a launch over `d`.
  DecodeAttentionParams DecodeParams(const DecodeLaunch& d) const;
  // The decode attention launch over `tables` (device) and `lengths` (device).
  void LaunchDecode(int32_t batch, const int32_t* tables, int32_t max_blocks,
                    const int32_t* table_rows, const int32_t* lengths, int32_t max_length);
};

// A step's rows: the one-token (decode) chunks first, so that one decode attention launch serves
// rows 0..n_decode-1, then the others; each chunk's tokens are consecutive rows.
struct StepRows {
  int64_t count = 0;                // T
  int32_t n_decode = 0;             // chunks[0, n_decode) are the one-token chunks
  std::vector<PagedChunk> chunks;   // in row order
  std::vector<int32_t> row0_of;     // batch index -> the chunk's first row
  std::vector<int32_t> ids, pos;    // [T] token id and position of each row
};

// This rank's share of the model (tensor_parallel.cc): with one device, all of it.
struct TpShard {
  int tp = 1, rank = 0;
  Range q_heads, kv_heads, ffn, vocab;  // query heads, KV heads, FFN channels, vocabulary rows
  int64_t max_vocab_slice = 0;          // the largest rank's vocabulary rows (gather padding)
  std::vector<Range> vocab_slices;      // every rank's vocabulary rows, in rank order
};

// Which part of a [rows, cols] weight this rank keeps: rows `r`, columns `c`.
struct WeightSlice {
  int64_t rows = 0, cols = 0;
  Range r, c;
  static WeightSlice Full(int64_t rows, int64_t cols) {
    return WeightSlice{rows, cols, Range{0, rows}, Range{0, cols}};
  }
  static WeightSlice Rows(int64_t rows, int64_t cols, Range r) {
    return WeightSlice{rows, cols, r, Range{0, cols}};
  }
  static WeightSlice Cols(int64_t rows, int64_t cols, Range c) {
    return WeightSlice{rows, cols, Range{0, rows}, c};
  }
  bool full() const { return r.size() == rows && c.size() == cols; }
  int64_t elems() const { return r.size() * c.size(); }
};

// The rows that need logits on the device, in chunk order.
struct LogitRows {
  std::vector<int32_t> dev_rows;    // [R] step rows
  std::vector<bool> ret;            // [R] returned to the caller (else only sampled)
  std::vector<int32_t> sample_idx;  // batch index -> index into dev_rows, or -1
  size_t returned = 0;              // rows returned to the caller
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
  bool samples_on_device() const override { return true; }
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

  // ---- set-up (cuda_backend.cc) ----
  absl::Status Init();
  // Refuses what the kernels cannot run; sets the DMS variant flags and the dimensions.
  absl::Status CheckModel();
  // Picks the device (--device, or the launcher's local rank), binds it, and creates the stream
  // and the cuBLAS handle.
  absl::Status OpenDevice();
  // The KV index and the device pools: what the budget buys (or, with budget <= 0, the memory
  // left less a margin for activations and cuBLAS).
  absl::Status AllocateKvPools();
  // The device is per-thread state in CUDA: every entry point binds it, since the engine may call
  // from a thread other than the one that built the backend.
  absl::Status BindDevice() {
    DMSRT_CUDA_OK(cudaSetDevice(device_));
    return absl::OkStatus();
  }
  absl::Status Grow(int64_t rows);
  // Waits for the stream: through the TP communicator's watchdog when there is one (a step's
  // collectives may be waiting for a rank that died), else cudaStreamSynchronize.
  absl::Status WaitStream();
  absl::Status Gemm(int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* w, void* c,
                    GemmOut out, int64_t ldc);

  // ---- tensor parallelism (tensor_parallel.cc) ----
  // With a communicator of more than one rank: its NcclComm (bound to the stream in OpenDevice),
  // this rank's shard, and the local dimensions. With one device: the whole model.
  absl::Status PlanShard();
  // The group's agreement on the step's KV reservations (`mine`: this rank's outcome).
  absl::Status AgreeReservations(const absl::Status& mine);
  // x += bf16(sum over ranks of partial_), for the row-parallel o_proj and down_proj.
  absl::Status ReduceIntoResidual(int64_t T);
  // Every rank's embedding rows of the step (zero rows for other ranks' tokens) summed into x.
  absl::Status GatherEmbeddings(int64_t T);
  // Rank 0's `n` decision bits (device memory) into every rank's `bits` (DMS Variant A with one
  // decision per layer, from global KV head 0).
  absl::Status BroadcastBits(uint8_t* bits, int64_t n);
  // Every rank's vocabulary slice of the R rows (from logits_local_); on the leader, the full
  // rows [R, vocab] in logits_.
  absl::Status GatherLogits(int64_t R);
  bool leader() const { return shard_.rank == 0; }

  // ---- weights (weight_upload.cc) ----
  // Every weight to the device (this rank's slice of it), then waits for the conversions.
  absl::Status UploadWeights();
  // One layer's weights; `L` is null for a synthetic model without host weights.
  absl::Status UploadLayer(int32_t l, const LayerWeights* L, DeviceLayer& D);
  // The Variant-B adapter of one layer (policy dms with separate alpha only).
  absl::Status UploadAdapter(int32_t l, const LayerWeights* L, DeviceLayer& D);
  // Only the slice's rows (and the whole blocks that cover its columns) leave the host.
  absl::StatusOr<bf16*> Upload(const WeightTensor& w, const char* what, const WeightSlice& s,
                               bf16* dst = nullptr);
  // A slice of a synthetic tensor: generated whole on the device, then the slice copied out.
  absl::StatusOr<bf16*> Generate(const std::string& which, int32_t layer, const WeightSlice& s,
                                 bf16* dst = nullptr);
  absl::StatusOr<bf16*> Weight(const WeightTensor& w, const std::string& which, int32_t layer,
                               const WeightSlice& s, bf16* dst = nullptr);
  absl::StatusOr<bf16*> Weight(const WeightTensor& w, const std::string& which, int32_t layer,
                               int64_t rows, int64_t cols, bf16* dst = nullptr) {
    return Weight(w, which, layer, WeightSlice::Full(rows, cols), dst);
  }
  // Copies a slice of the bf16 matrix `full` [s.rows, s.cols] (device) into dst (queued).
  absl::Status CopySlice(const bf16* full, const WeightSlice& s, bf16* dst);
  absl::StatusOr<void*> AllocBytes(size_t bytes);  // freed with the backend
  absl::StatusOr<bf16*> Alloc(int64_t elems);

  // ---- the step (step.cc) ----
  // One step of `rows` rows; `reserve` (empty: each chunk's length) the tokens to reserve for
  // each chunk.
  absl::StatusOr<ForwardResult> ForwardStep(const std::vector<SeqChunk>& batch, int64_t rows,
                                            const std::vector<int32_t>& reserve);
  // Victim policies (tova, h2o): a step with chunks longer than one token runs as one-token
  // steps, the first reserving every chunk whole.
  absl::StatusOr<ForwardResult> ForwardTokenByToken(const std::vector<SeqChunk>& batch);
  // Reserves KV room for the batch (agreed over the TP group), grows the activations, and waits
  // for the stream so that the staging arena can be reused.
  absl::Status BeginStep(const std::vector<SeqChunk>& batch, int64_t rows,
                         const std::vector<int32_t>& reserve);
  StepRows PlanRows(const std::vector<SeqChunk>& batch, int64_t rows) const;
  // Stages token ids and positions, gathers the embeddings into x; the positions on the device.
  absl::StatusOr<const int32_t*> EmbedTokens(const StepRows& s);
  // Hands the decode rows' deferred decision bits (back with the step's results) to the index.
  absl::Status CommitDeferredBits(const StepRows& s);
  // Victim policies: every layer's attention weights per slot back to the host, to the index.
  absl::Status CommitVictimWeights(const StepRows& s);

  // ---- one layer (layer_forward.cc) ----
  absl::Status ForwardLayer(int32_t l, const StepRows& s, const int32_t* pos_d, bool defer_bits);
  // Variant B: adapter norm, GEMM and threshold into `bits_l`.
  absl::Status AdapterDecisions(const DeviceLayer& L, int64_t T, uint8_t* bits_l);
  // Norm, q/k/v GEMMs (+ biases), q/k norms, RoPE (with Variant A's decisions into `bits_l`).
  absl::Status AttentionInputs(const DeviceLayer& L, int64_t T, const int32_t* pos_d,
                               uint8_t* bits_l);
  // The KV layer (runtime/kv/paged_kv.h): writes, attention; waits for the bits when they are
  // not deferred.
  absl::Status KvLayer(int32_t l, const StepRows& s, const uint8_t* bits_l, bool defer_bits);
  // o_proj and residual, then norm, gate|up, SiLU-mul, down and residual.
  absl::Status AttentionOutputAndMlp(const DeviceLayer& L, int64_t T);
  // x += in [T, k] · w [H, k]^T, summed over the TP group when there is one.
  absl::Status RowParallelIntoResidual(int64_t T, int64_t k, const bf16* in, const bf16* w);

  // ---- results (step_output.cc) ----
  // The rows that need logits (fills result.row_chunk), and room for them on the device. Called
  // before the step's first collective, since growing a buffer waits for the stream.
  absl::StatusOr<LogitRows> PrepareOutputs(const std::vector<SeqChunk>& batch, const StepRows& s,
                                           ForwardResult& result);
  // Logits for the rows that need them, device sampling, and the copies back; waits for the
  // stream once.
  absl::Status StepOutputs(const std::vector<SeqChunk>& batch, const StepRows& s,
                           const LogitRows& sel, ForwardResult& result);
  // Final norm and output GEMM over `dev_rows` into logits_.
  absl::Status ComputeLogits(const std::vector<int32_t>& dev_rows, int64_t step_rows);
  // Samples the rows of `sel` that sample; tokens and log-probabilities land (asynchronously) in
  // pinned staging memory: *tokens and *logprobs.
  absl::Status SampleOnDevice(const std::vector<SeqChunk>& batch, const LogitRows& sel,
                              int32_t** tokens, float** logprobs);
  // Copies the returned rows' logits into result.logits, one copy per run of rows.
  absl::Status CopyReturnedLogits(const LogitRows& sel, ForwardResult& result);

  const Model& model_;
  BackendOptions options_;
  const ModelConfig& cfg_;
  TpShard shard_;
  NcclComm* nccl_ = nullptr;  // the TP group (tp > 1), bound to stream_
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  StreamWait wait_ = [this] { return WaitStream(); };  // for DeviceArray::Reserve
  cublasHandle_t cublas_ = nullptr;
  int32_t num_sms_ = 0;
  std::vector<void*> allocations_;
  bool dms_bits_ = false, variant_a_ = false, variant_b_ = false;
  // Victim policies (tova, h2o): the index takes each step's attention weights per slot,
  // [layers][rows, n_kv, victim_ld_] in victim_w_ (victim_ld_ = the policy's budget, the most
  // slots a head that still evicts holds).
  bool victim_ = false;
  int32_t victim_ld_ = 0;
  DeviceArray<float> victim_w_;
  std::vector<float> victim_host_;
  // H_ and hd_ are the model's; nh_, nkv_, QW_, KW_ and F_ this rank's share. vocab_ is the
  // model's vocabulary (logits rows are full), vrows_ this rank's rows of embed_ and output_.
  int32_t H_ = 0, QW_ = 0, KW_ = 0, F_ = 0, hd_ = 0, nkv_ = 0, nh_ = 0, vocab_ = 0, vrows_ = 0;

  // Weights (this rank's slices).
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
  DeviceArray<float> partial_;                     // [rows, H] fp32 partial sums (tp > 1)
  DeviceArray<float> logits_local_, logits_all_;  // [R, max slice], [tp, R, max slice] (tp > 1)
  DeviceArray<bf16> load_scratch_;                 // a whole synthetic tensor while loading
  DeviceArray<char> workspace_;
  DeviceArray<int32_t> decode_tables_;  // resident decode tables (runtime/kv/paged_kv.h)
  StagingArena stage_;
  uint8_t* bits_pinned_ = nullptr;
  size_t bits_pinned_n_ = 0;
};

}  // namespace cuda_backend
}  // namespace dmsrt
