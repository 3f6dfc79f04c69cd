// The CUDA backend's weights on the device: one bf16 buffer per tensor (gate and up share one
// [2F, H] buffer), converted from the file's type on the device, or, for a synthetic model without
// host weights, generated there (runtime/model/synthetic_model.h).
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/dequant.cuh"
#include "kernels/kv_store.cuh"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/backend/dms_decisions.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace cuda_backend {
namespace {

// Stands in for the host tensors of a synthetic model that has none.
const WeightTensor kAbsent{};

}  // namespace

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

absl::Status CudaBackend::UploadWeights() {
  const ModelConfig& c = cfg_;
  const ModelWeights& W = model_.weights;
  const bool host = !W.layers.empty();
  if (!host && !model_.synthetic) return absl::InvalidArgumentError("model has no weights");
  if (host && static_cast<int32_t>(W.layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError("model layer count does not match its config");
  }
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
    DMSRT_RETURN_IF_ERROR(UploadLayer(l, host ? &W.layers[l] : nullptr, layers_[l]));
  }
  DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadLayer(int32_t l, const LayerWeights* L, DeviceLayer& D) {
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
  if (cfg_.qk_norm) {
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
  if (variant_b_) return UploadAdapter(l, L, D);
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadAdapter(int32_t l, const LayerWeights* L, DeviceLayer& D) {
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
  return absl::OkStatus();
}

}  // namespace cuda_backend
}  // namespace dmsrt
