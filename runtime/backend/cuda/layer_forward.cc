// One transformer layer of a CUDA backend step, over all the step's rows: (Variant B: adapter
// norm, GEMM, threshold), RMSNorm, q/k/v GEMMs (+ biases), q/k norms, RoPE with the Variant-A
// decisions and channel zeroing, the KV layer (runtime/kv/paged_kv.h through DeviceKvOps),
// o_proj, residual, RMSNorm, one gate|up GEMM, SiLU-mul, down GEMM, residual. Under tensor
// parallelism o_proj and down_proj sum over the group before their residual adds.
#include "kernels/dms.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/kv_store.cuh"
#include "runtime/backend/cuda/cuda_backend.h"

namespace dmsrt {
namespace cuda_backend {

absl::Status CudaBackend::ForwardLayer(int32_t l, const StepRows& s, const int32_t* pos_d,
                                       bool defer_bits) {
  const DeviceLayer& L = layers_[l];
  const int64_t bits_layer = s.count * nkv_;  // bytes of one layer's bits
  uint8_t* bits_l = bits_.get() + (defer_bits ? l * bits_layer : 0);
  if (variant_b_) {
    DMSRT_RETURN_IF_ERROR(AdapterDecisions(L, s.count, bits_l));
  }
  DMSRT_RETURN_IF_ERROR(AttentionInputs(L, s.count, pos_d, bits_l));
  DMSRT_RETURN_IF_ERROR(KvLayer(l, s, bits_l, defer_bits));
  return AttentionOutputAndMlp(L, s.count);
}

absl::Status CudaBackend::AdapterDecisions(const DeviceLayer& L, int64_t T, uint8_t* bits_l) {
  const int32_t rows = static_cast<int32_t>(T);
  DMSRT_CUDA_OK(RmsNorm(x_.get(), L.alpha_norm, rows, H_, cfg_.rms_eps, xn_.get(), stream_));
  DMSRT_RETURN_IF_ERROR(Gemm(T, L.alpha_rows, H_, xn_.get(), L.alpha, alpha_logits_.get(),
                             GemmOut::kF32, L.alpha_rows));
  DMSRT_CUDA_OK(DmsThreshold(rows, nkv_, alpha_logits_.get(), L.alpha_rows, L.alpha_bias,
                             cfg_.dms.alpha_scale, cfg_.dms.initial_alpha_offset,
                             cfg_.dms.alpha_per_layer, bits_l, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AttentionInputs(const DeviceLayer& L, int64_t T, const int32_t* pos_d,
                                          uint8_t* bits_l) {
  const float eps = cfg_.rms_eps;
  const int32_t rows = static_cast<int32_t>(T);
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
  rp.scaling = RopeParams(cfg_.rope_scaling);
  rp.decide = variant_a_;
  rp.alpha_scale = cfg_.dms.alpha_scale;
  rp.alpha_offset = cfg_.dms.initial_alpha_offset;
  rp.alpha_per_layer = cfg_.dms.alpha_per_layer;
  DMSRT_CUDA_OK(RopeDmsVariantA(rp, pos_d, q_.get(), k_.get(), variant_a_ ? bits_l : nullptr,
                                stream_));
  // One decision per layer comes from global KV head 0's query channel, which rank 0 holds: its
  // bits (head 0's, copied to every local head) are every rank's, broadcast on the stream.
  if (variant_a_ && cfg_.dms.alpha_per_layer && shard_.tp > 1) {
    DMSRT_RETURN_IF_ERROR(BroadcastBits(bits_l, T * nkv_));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::KvLayer(int32_t l, const StepRows& s, const uint8_t* bits_l,
                                  bool defer_bits) {
  const uint8_t* host_bits = nullptr;
  if (dms_bits_ && !defer_bits) {
    DMSRT_CUDA_OK(cudaMemcpyAsync(bits_pinned_, bits_l, static_cast<size_t>(s.count * nkv_),
                                  cudaMemcpyDeviceToHost, stream_));
    DMSRT_RETURN_IF_ERROR(WaitStream());
    host_bits = bits_pinned_;
  }
  DMSRT_RETURN_IF_ERROR(paged_.Run(*kv_, l, s.chunks, s.n_decode, host_bits, ops_, defer_bits));
  return ops_.status();
}

absl::Status CudaBackend::AttentionOutputAndMlp(const DeviceLayer& L, int64_t T) {
  const int32_t rows = static_cast<int32_t>(T);
  DMSRT_RETURN_IF_ERROR(RowParallelIntoResidual(T, QW_, attn_.get(), L.wo));
  DMSRT_CUDA_OK(RmsNorm(x_.get(), L.ffn_norm, rows, H_, cfg_.rms_eps, xn_.get(), stream_));
  DMSRT_RETURN_IF_ERROR(
      Gemm(T, 2ll * F_, H_, xn_.get(), L.gate_up, gu_.get(), GemmOut::kBf16, 2ll * F_));
  DMSRT_CUDA_OK(SiluMul(gu_.get(), gu_.get() + F_, rows, F_, 2 * F_, act_.get(), F_, stream_));
  return RowParallelIntoResidual(T, F_, act_.get(), L.down);
}

absl::Status CudaBackend::RowParallelIntoResidual(int64_t T, int64_t k, const bf16* in,
                                                  const bf16* w) {
  if (shard_.tp == 1) {
    DMSRT_RETURN_IF_ERROR(Gemm(T, H_, k, in, w, tmp_.get(), GemmOut::kBf16, H_));
    DMSRT_CUDA_OK(ResidualAdd(x_.get(), tmp_.get(), T * H_, stream_));
    return absl::OkStatus();
  }
  // This rank's columns give an fp32 partial sum; the group's sum is rounded to bf16 once, as
  // the single-device GEMM rounds its output.
  DMSRT_RETURN_IF_ERROR(Gemm(T, H_, k, in, w, partial_.get(), GemmOut::kF32, H_));
  return ReduceIntoResidual(T);
}

}  // namespace cuda_backend
}  // namespace dmsrt
