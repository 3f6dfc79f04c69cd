// The CUDA backend's weights on the device: one bf16 buffer per tensor (gate and up share one
// [2F, H] buffer), converted from the file's type on the device, or, for a synthetic model without
// host weights, generated there (runtime/model/synthetic_model.h).
#include <algorithm>
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

absl::Status CudaBackend::CopySlice(const bf16* full, const WeightSlice& s, bf16* dst) {
  const bf16* from = full + s.r.begin * s.cols + s.c.begin;
  DMSRT_CUDA_OK(cudaMemcpy2DAsync(dst, sizeof(bf16) * s.c.size(), from, sizeof(bf16) * s.cols,
                                  sizeof(bf16) * s.c.size(), s.r.size(), cudaMemcpyDeviceToDevice,
                                  stream_));
  return absl::OkStatus();
}

absl::StatusOr<bf16*> CudaBackend::Upload(const WeightTensor& w, const char* what,
                                          const WeightSlice& s, bf16* dst) {
  if (w.rows != s.rows || w.cols != s.cols) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", w.name, " (", what, ") is [", w.rows,
                                                   ", ", w.cols, "], expected [", s.rows, ", ",
                                                   s.cols, "]"));
  }
  if (dst == nullptr) {
    DMSRT_ASSIGN_OR_RETURN(dst, Alloc(s.elems()));
  }
  // The slice's rows, and of each row the whole blocks that cover its columns: only those bytes
  // leave the host.
  const int64_t bs = BlockSize(w.type);
  const Range cover = BlockCover(s.c, w.cols, bs);
  const int64_t row_stride = RowBytes(w.type, w.cols);
  const int64_t cover_bytes = RowBytes(w.type, cover.size());
  const uint8_t* src_host = w.data + s.r.begin * row_stride + cover.begin / bs * BlockBytes(w.type);
  const int64_t nr = s.r.size();
  if (w.type == DType::kBF16 && cover == s.c) {
    DMSRT_CUDA_OK(cudaMemcpy2D(dst, cover_bytes, src_host, row_stride, cover_bytes, nr,
                               cudaMemcpyHostToDevice));
    return dst;
  }
  void* src = nullptr;
  bf16* wide = nullptr;  // the covering columns in bf16, when they are more than the slice
  DMSRT_CUDA_OK(cudaMalloc(&src, std::max<int64_t>(cover_bytes * nr, 1)));
  cudaError_t e = cudaMemcpy2D(src, cover_bytes, src_host, row_stride, cover_bytes, nr,
                               cudaMemcpyHostToDevice);
  if (e == cudaSuccess && cover != s.c) {
    e = cudaMalloc(&wide, std::max<int64_t>(nr * cover.size(), 1) * sizeof(bf16));
  }
  if (e == cudaSuccess) {
    e = DequantizeToBf16(static_cast<int>(w.type), src, nr, cover.size(),
                         wide != nullptr ? wide : dst, stream_);
  }
  if (e == cudaSuccess && wide != nullptr) {
    const WeightSlice in_cover{nr, cover.size(), Range{0, nr},
                               Range{s.c.begin - cover.begin, s.c.end - cover.begin}};
    const absl::Status cs = CopySlice(wide, in_cover, dst);
    if (!cs.ok()) e = cudaErrorInvalidValue;
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream_);
  cudaFree(src);
  if (wide != nullptr) cudaFree(wide);
  if (e != cudaSuccess) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weight ", w.name, " (", what, ", type ", DTypeName(w.type), ") could not be converted to "
        "bf16 on the device: ", cudaGetErrorString(e),
        " (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q6_K)"));
  }
  return dst;
}

absl::StatusOr<bf16*> CudaBackend::Generate(const std::string& which, int32_t layer,
                                            const WeightSlice& s, bf16* dst) {
  if (dst == nullptr) {
    DMSRT_ASSIGN_OR_RETURN(dst, Alloc(s.elems()));
  }
  const SyntheticTensorSpec spec = SyntheticTensor(cfg_, model_.synthetic_seed, which, layer);
  if (spec.offset != 0.0f) {
    // Norms: small, generated on the host exactly as MakeSyntheticModel does.
    std::vector<bf16> h(static_cast<size_t>(s.elems()));
    size_t at = 0;
    for (int64_t r = s.r.begin; r < s.r.end; ++r) {
      for (int64_t c = s.c.begin; c < s.c.end; ++c) {
        h[at++] = __float2bfloat16(SyntheticValue(spec, static_cast<uint64_t>(r * s.cols + c)));
      }
    }
    DMSRT_CUDA_OK(cudaMemcpy(dst, h.data(), h.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    return dst;
  }
  if (s.full()) {
    DMSRT_CUDA_OK(FillRandomBf16(dst, s.elems(), spec.seed, spec.scale, stream_));
    return dst;
  }
  // Values are a function of the index in the whole tensor: the whole tensor is generated in
  // scratch memory (freed after loading) and the slice copied out.
  DMSRT_RETURN_IF_ERROR(load_scratch_.Reserve(static_cast<size_t>(s.rows * s.cols), wait_));
  DMSRT_CUDA_OK(FillRandomBf16(load_scratch_.get(), s.rows * s.cols, spec.seed, spec.scale, stream_));
  DMSRT_RETURN_IF_ERROR(CopySlice(load_scratch_.get(), s, dst));
  return dst;
}

absl::StatusOr<bf16*> CudaBackend::Weight(const WeightTensor& w, const std::string& which,
                                          int32_t layer, const WeightSlice& s, bf16* dst) {
  if (w.present()) return Upload(w, which.c_str(), s, dst);
  if (model_.synthetic) return Generate(which, layer, s, dst);
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
  // Embedding and output projection: this rank's vocabulary rows.
  const WeightSlice vocab_rows = WeightSlice::Rows(vocab_, H_, shard_.vocab);
  DMSRT_ASSIGN_OR_RETURN(embed_, Weight(host ? W.tok_embd : kAbsent, "tok_embd", -1, vocab_rows));
  DMSRT_ASSIGN_OR_RETURN(output_norm_, Weight(host ? W.output_norm : kAbsent, "output_norm", -1, 1, H_));
  if (host && (c.tied_embeddings || W.output.data == W.tok_embd.data)) {
    output_ = embed_;
  } else {
    DMSRT_ASSIGN_OR_RETURN(output_, Weight(host ? W.output : kAbsent, "output", -1, vocab_rows));
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
  load_scratch_.Release();
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadLayer(int32_t l, const LayerWeights* L, DeviceLayer& D) {
  auto get = [&](const WeightTensor LayerWeights::*m) -> const WeightTensor& {
    return L != nullptr ? L->*m : kAbsent;
  };
  const ModelConfig& c = cfg_;
  const int64_t QW = static_cast<int64_t>(c.n_heads) * hd_;     // the model's q width
  const int64_t KW = static_cast<int64_t>(c.n_kv_heads) * hd_;  // and k/v width
  const Range q{shard_.q_heads.begin * hd_, shard_.q_heads.end * hd_};  // this rank's q columns
  const Range kv{shard_.kv_heads.begin * hd_, shard_.kv_heads.end * hd_};
  DMSRT_ASSIGN_OR_RETURN(D.attn_norm, Weight(get(&LayerWeights::attn_norm), "attn_norm", l, 1, H_));
  // Column-parallel q/k/v: the rows of this rank's heads; row-parallel o_proj: their columns.
  DMSRT_ASSIGN_OR_RETURN(D.wq, Weight(get(&LayerWeights::wq), "wq", l, WeightSlice::Rows(QW, H_, q)));
  DMSRT_ASSIGN_OR_RETURN(D.wk, Weight(get(&LayerWeights::wk), "wk", l, WeightSlice::Rows(KW, H_, kv)));
  DMSRT_ASSIGN_OR_RETURN(D.wv, Weight(get(&LayerWeights::wv), "wv", l, WeightSlice::Rows(KW, H_, kv)));
  DMSRT_ASSIGN_OR_RETURN(D.wo, Weight(get(&LayerWeights::wo), "wo", l, WeightSlice::Cols(H_, QW, q)));
  if (L != nullptr && L->bq.present()) {
    DMSRT_ASSIGN_OR_RETURN(D.bq, Upload(L->bq, "bq", WeightSlice::Cols(1, QW, q)));
    DMSRT_ASSIGN_OR_RETURN(D.bk, Upload(L->bk, "bk", WeightSlice::Cols(1, KW, kv)));
    DMSRT_ASSIGN_OR_RETURN(D.bv, Upload(L->bv, "bv", WeightSlice::Cols(1, KW, kv)));
  }
  if (c.qk_norm) {
    DMSRT_ASSIGN_OR_RETURN(D.q_norm, Weight(get(&LayerWeights::q_norm), "q_norm", l, 1, hd_));
    DMSRT_ASSIGN_OR_RETURN(D.k_norm, Weight(get(&LayerWeights::k_norm), "k_norm", l, 1, hd_));
  }
  DMSRT_ASSIGN_OR_RETURN(D.ffn_norm, Weight(get(&LayerWeights::ffn_norm), "ffn_norm", l, 1, H_));
  // Column-parallel gate and up (one [2F, H] buffer of this rank's rows), row-parallel down.
  const WeightSlice ffn_rows = WeightSlice::Rows(c.ffn, H_, shard_.ffn);
  DMSRT_ASSIGN_OR_RETURN(D.gate_up, Alloc(2ll * F_ * H_));
  DMSRT_RETURN_IF_ERROR(Weight(get(&LayerWeights::w_gate), "w_gate", l, ffn_rows, D.gate_up).status());
  DMSRT_RETURN_IF_ERROR(
      Weight(get(&LayerWeights::w_up), "w_up", l, ffn_rows, D.gate_up + static_cast<int64_t>(F_) * H_)
          .status());
  DMSRT_ASSIGN_OR_RETURN(D.down, Weight(get(&LayerWeights::w_down), "w_down", l,
                                        WeightSlice::Cols(H_, c.ffn, shard_.ffn)));
  if (variant_b_) return UploadAdapter(l, L, D);
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadAdapter(int32_t l, const LayerWeights* L, DeviceLayer& D) {
  if (L == nullptr || !L->dms_alpha.present()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DMS Variant B (separate alpha) needs the dms_proj_alpha adapter; layer ", l,
        " has none (attach it with --dms-adapter)"));
  }
  // One row per KV head: this rank's heads; with one decision per layer, the row of head 0.
  const int64_t all_rows = L->dms_alpha.rows;
  const Range rows = cfg_.dms.alpha_per_layer || shard_.tp == 1
                         ? Range{0, shard_.tp == 1 ? all_rows : 1}
                         : shard_.kv_heads;
  D.alpha_rows = static_cast<int32_t>(rows.size());
  if (L->dms_alpha_bias.present()) {
    // Small (one value per adapter row; the loader checked its shape): converted on the
    // host, kept in fp32 like the logits it is added to.
    std::vector<float> bias(D.alpha_rows);
    for (int32_t i = 0; i < D.alpha_rows; ++i) {
      bias[i] = AdapterWeightAt(L->dms_alpha_bias, rows.begin + i);
    }
    DMSRT_ASSIGN_OR_RETURN(void* dev, AllocBytes(Bytes(bias)));
    D.alpha_bias = static_cast<float*>(dev);
    DMSRT_CUDA_OK(cudaMemcpy(D.alpha_bias, bias.data(), Bytes(bias), cudaMemcpyHostToDevice));
  }
  DMSRT_ASSIGN_OR_RETURN(D.alpha,
                         Upload(L->dms_alpha, "dms_alpha", WeightSlice::Rows(all_rows, H_, rows)));
  D.alpha_norm = L->dms_alpha_norm.present() ? nullptr : ones_;
  if (L->dms_alpha_norm.present()) {
    DMSRT_ASSIGN_OR_RETURN(D.alpha_norm, Upload(L->dms_alpha_norm, "dms_alpha_norm",
                                                WeightSlice::Full(1, H_)));
  }
  return absl::OkStatus();
}

}  // namespace cuda_backend
}  // namespace dmsrt
