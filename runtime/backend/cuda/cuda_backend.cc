// The CUDA backend's set-up: the checks of the model against what the kernels take, the device,
// the KV pools and the activation buffers (runtime/backend/cuda/cuda_backend.h describes the
// backend and lists its parts).
#include <algorithm>

#include "absl/strings/str_format.h"
#include "kernels/kv_store.cuh"
#include "parallel/comm.h"
#include "parallel/world.h"
#include "runtime/kv/kv_sizing.h"
#include "runtime/backend/cuda/cuda_backend.h"

#ifdef DMSRT_HAVE_NCCL
#include "parallel/nccl/nccl_comm.h"
#endif

namespace dmsrt {
namespace cuda_backend {

// ---- set-up ------------------------------------------------------------------------------------

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  if (stream_ != nullptr) {
#ifdef DMSRT_HAVE_NCCL
    // Work of a failed step may wait for a rank that is gone: the watchdog bounds the wait.
    if (nccl_ != nullptr) {
      (void)nccl_->Synchronize();
      nccl_->UseStream(nullptr, true);
    }
#endif
    if (nccl_ == nullptr) cudaStreamSynchronize(stream_);
  }
  for (void* p : allocations_) cudaFree(p);
  if (bits_pinned_ != nullptr) cudaFreeHost(bits_pinned_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Init() {
  DMSRT_RETURN_IF_ERROR(CheckModel());
  DMSRT_RETURN_IF_ERROR(PlanShard());
  DMSRT_RETURN_IF_ERROR(OpenDevice());
  DMSRT_RETURN_IF_ERROR(UploadWeights());
  return AllocateKvPools();
}

absl::Status CudaBackend::CheckModel() {
  const ModelConfig& c = cfg_;
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
  if (c.rope_dim > 0 && c.rope_dim != c.head_dim) {
    return absl::UnimplementedError(
        "the CUDA RoPE kernel rotates every channel; this model uses partial rotation (run it on "
        "--backend cpu)");
  }
  DMSRT_RETURN_IF_ERROR(CheckKvPolicy(c, options_.kv_policy));
  variant_a_ = c.dms.enabled && !c.dms.separate_alpha;
  dms_bits_ = options_.kv_policy.kind == KvPolicyKind::kDms && c.dms.enabled;
  variant_b_ = dms_bits_ && c.dms.separate_alpha;
  H_ = c.hidden;
  hd_ = c.head_dim;
  vocab_ = c.vocab;
  return absl::OkStatus();  // the per-rank dimensions: PlanShard
}

absl::Status CudaBackend::OpenDevice() {
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
#ifdef DMSRT_HAVE_NCCL
  if (nccl_ != nullptr) {
    // The communicator was bound to this rank's device (its local rank) when it was created.
    if (options_.device >= 0 && options_.device != nccl_->device()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--device ", options_.device, ": under tensor parallelism each rank takes the device of "
          "its local rank, and this rank's NCCL communicator is bound to device ",
          nccl_->device()));
    }
    device_ = nccl_->device();
  }
#endif
  DMSRT_RETURN_IF_ERROR(BindDevice());
  DMSRT_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
#ifdef DMSRT_HAVE_NCCL
  // Collectives go on this stream, in order with the kernels, without waiting on the host.
  if (nccl_ != nullptr) nccl_->UseStream(stream_, /*sync=*/false);
#endif
  DMSRT_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
  DMSRT_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
  DMSRT_CUDA_OK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AllocateKvPools() {
  const ModelConfig& c = cfg_;
  KvGeometry geo;
  geo.n_layers = c.n_layers;
  geo.n_kv_heads = nkv_;
  geo.n_heads = nh_;
  geo.head_dim = hd_;
  geo.block_tokens = options_.kv_block_tokens;
  geo.kv_head_offset = static_cast<int32_t>(shard_.kv_heads.begin);
  KvPolicyConfig policy = options_.kv_policy;
  if (policy.kind == KvPolicyKind::kDms && policy.window <= 0) policy.window = c.dms.window;
  if (policy.kind == KvPolicyKind::kDms) policy.dms_sinks = c.dms.sink_tokens;
  const int64_t bt = geo.block_tokens;
  const int64_t block_bytes = CudaKvBlockBytes(hd_, geo.block_tokens);
  static_assert(sizeof(bf16) == 2, "CudaKvBlockBytes counts K and V in 2-byte bf16");
  int64_t budget = options_.kv_budget_bytes;
  if (budget <= 0) {
    size_t free_b = 0, total_b = 0;
    DMSRT_CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
    budget = DeviceKvBudgetBytes(static_cast<int64_t>(free_b), static_cast<int64_t>(total_b));
    if (budget < block_bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "no device memory left for the KV cache: %d MiB free after the weights", free_b >> 20));
    }
  }
  DMSRT_ASSIGN_OR_RETURN(kv_, MakeKvIndex(geo, policy, budget, block_bytes));
  victim_ = kv_->victim_weights();
  victim_ld_ = victim_ ? policy.budget_tokens : 0;
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
  DMSRT_RETURN_IF_ERROR(x_.Reserve(r * H_, wait_));
  DMSRT_RETURN_IF_ERROR(xn_.Reserve(r * H_, wait_));
  DMSRT_RETURN_IF_ERROR(q_.Reserve(r * QW_, wait_));
  DMSRT_RETURN_IF_ERROR(k_.Reserve(r * KW_, wait_));
  DMSRT_RETURN_IF_ERROR(v_.Reserve(r * KW_, wait_));
  DMSRT_RETURN_IF_ERROR(attn_.Reserve(r * QW_, wait_));
  DMSRT_RETURN_IF_ERROR(tmp_.Reserve(r * H_, wait_));
  DMSRT_RETURN_IF_ERROR(gu_.Reserve(r * 2 * F_, wait_));
  DMSRT_RETURN_IF_ERROR(act_.Reserve(r * F_, wait_));
  if (shard_.tp > 1) DMSRT_RETURN_IF_ERROR(partial_.Reserve(r * H_, wait_));
  // Decision bits: one [rows, n_kv] slice per layer (a decode step brings them all back at once).
  const size_t bits_n = r * nkv_ * (dms_bits_ ? cfg_.n_layers : 1);
  DMSRT_RETURN_IF_ERROR(bits_.Reserve(bits_n, wait_));
  DMSRT_RETURN_IF_ERROR(alpha_logits_.Reserve(r * nkv_, wait_));
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

}  // namespace cuda_backend

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const Model& model,
                                                         const BackendOptions& options) {
  return cuda_backend::CudaBackend::Create(model, options);
}

}  // namespace dmsrt
