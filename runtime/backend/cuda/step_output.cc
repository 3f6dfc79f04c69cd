// The end of a CUDA backend step: the rows that need logits (returned, sampled or both) are
// gathered, normed and put through the output GEMM (under tensor parallelism each rank's
// vocabulary slice, all-gathered into full rows); sampled rows are sampled on the device; the
// sampled tokens and log-probabilities come back through pinned staging memory and the returned
// logits in one copy per run of rows, so that the step waits for the device once, here.
#include <vector>

#include "kernels/elementwise.cuh"
#include "kernels/sampling.cuh"
#include "runtime/backend/cuda/cuda_backend.h"

namespace dmsrt {
namespace cuda_backend {
namespace {

// Rows that need logits on the device, in chunk order; fills result.row_chunk for the returned
// ones.
LogitRows SelectLogitRows(const std::vector<SeqChunk>& batch, const StepRows& s,
                          ForwardResult& result) {
  LogitRows sel;
  sel.sample_idx.assign(batch.size(), -1);
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    const SeqChunk& ch = batch[ci];
    const int32_t n = static_cast<int32_t>(ch.tokens.size());
    const int32_t r0 = s.row0_of[ci];
    if (ch.logits == SeqChunk::Logits::kAll) {
      for (int32_t i = 0; i < n; ++i) {
        sel.dev_rows.push_back(r0 + i);
        sel.ret.push_back(true);
        result.row_chunk.push_back(static_cast<int32_t>(ci));
      }
    } else if (ch.logits == SeqChunk::Logits::kLast) {
      sel.dev_rows.push_back(r0 + n - 1);
      sel.ret.push_back(true);
      result.row_chunk.push_back(static_cast<int32_t>(ci));
    } else if (ch.sample) {
      sel.dev_rows.push_back(r0 + n - 1);
      sel.ret.push_back(false);
    }
    if (ch.sample) sel.sample_idx[ci] = static_cast<int32_t>(sel.dev_rows.size()) - 1;
  }
  sel.returned = result.row_chunk.size();
  return sel;
}

}  // namespace

absl::StatusOr<LogitRows> CudaBackend::PrepareOutputs(const std::vector<SeqChunk>& batch,
                                                      const StepRows& s, ForwardResult& result) {
  LogitRows sel = SelectLogitRows(batch, s, result);
  const int64_t R = static_cast<int64_t>(sel.dev_rows.size());
  if (R == 0) return sel;
  DMSRT_RETURN_IF_ERROR(final_.Reserve(R * H_, wait_));
  if (leader()) DMSRT_RETURN_IF_ERROR(logits_.Reserve(R * vocab_, wait_));
  if (shard_.tp > 1) {
    const int64_t M = shard_.max_vocab_slice;
    DMSRT_RETURN_IF_ERROR(logits_local_.Reserve(R * M, wait_));
    DMSRT_RETURN_IF_ERROR(logits_all_.Reserve(shard_.tp * R * M, wait_));
  }
  return sel;
}

absl::Status CudaBackend::StepOutputs(const std::vector<SeqChunk>& batch, const StepRows& s,
                                      const LogitRows& sel, ForwardResult& result) {
  result.sampled.assign(batch.size(), -1);
  result.sampled_logprob.assign(batch.size(), 0.0f);
  if (sel.dev_rows.empty()) return WaitStream();
  DMSRT_RETURN_IF_ERROR(ComputeLogits(sel.dev_rows, s.count));
  if (!leader()) {
    // The group's results are the leader's; this rank's share of the rows is in.
    result.row_chunk.clear();
    return WaitStream();
  }
  int32_t* tokens = nullptr;
  float* lps = nullptr;
  DMSRT_RETURN_IF_ERROR(SampleOnDevice(batch, sel, &tokens, &lps));
  // Copies into pageable memory wait for the stream: with a TP group, wait through the
  // watchdog first.
  if (shard_.tp > 1 && sel.returned > 0) DMSRT_RETURN_IF_ERROR(WaitStream());
  DMSRT_RETURN_IF_ERROR(CopyReturnedLogits(sel, result));
  DMSRT_RETURN_IF_ERROR(WaitStream());
  int32_t si = 0;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (sel.sample_idx[ci] < 0) continue;
    result.sampled[ci] = tokens[si];
    result.sampled_logprob[ci] = lps[si];
    ++si;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::ComputeLogits(const std::vector<int32_t>& dev_rows, int64_t step_rows) {
  const int64_t R = static_cast<int64_t>(dev_rows.size());
  DMSRT_RETURN_IF_ERROR(stage_.Reserve(Bytes(dev_rows)));
  cudaError_t staged = cudaSuccess;
  const auto* rows_d =
      static_cast<const int32_t*>(stage_.Stage(dev_rows.data(), Bytes(dev_rows), stream_, &staged));
  DMSRT_CUDA_OK(staged);
  // The rows of x, gathered as if x were an embedding table.
  DMSRT_CUDA_OK(EmbeddingGather(x_.get(), static_cast<int32_t>(step_rows), H_, rows_d,
                                static_cast<int32_t>(R), final_.get(), stream_));
  DMSRT_CUDA_OK(RmsNorm(final_.get(), output_norm_, static_cast<int32_t>(R), H_, cfg_.rms_eps,
                        final_.get(), stream_));
  if (shard_.tp == 1) {
    return Gemm(R, vocab_, H_, final_.get(), output_, logits_.get(), GemmOut::kF32, vocab_);
  }
  // This rank's vocabulary columns (rows padded to the largest slice), then every rank's.
  const int64_t M = shard_.max_vocab_slice;
  if (vrows_ > 0) {
    DMSRT_RETURN_IF_ERROR(
        Gemm(R, vrows_, H_, final_.get(), output_, logits_local_.get(), GemmOut::kF32, M));
  }
  return GatherLogits(R);
}

absl::Status CudaBackend::SampleOnDevice(const std::vector<SeqChunk>& batch, const LogitRows& sel,
                                         int32_t** tokens, float** logprobs) {
  std::vector<DeviceSamplingParams> sp;
  std::vector<int32_t> srow;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (sel.sample_idx[ci] < 0) continue;
    sp.push_back(batch[ci].sampling);
    srow.push_back(sel.sample_idx[ci]);
  }
  // Sampled rows are gathered into their own compact logits block when they are not already
  // contiguous from row 0 (the usual decode step: every chunk samples, one row each).
  const int32_t S = static_cast<int32_t>(sp.size());
  if (S == 0) return absl::OkStatus();
  // Sampled tokens and log-probabilities come back into pinned staging memory, so that the
  // copies are asynchronous and the step waits once, at its end.
  DMSRT_RETURN_IF_ERROR(tokens_.Reserve(S, wait_));
  DMSRT_RETURN_IF_ERROR(logprobs_.Reserve(S, wait_));
  DMSRT_RETURN_IF_ERROR(stage_.Reserve(Bytes(sp) + 2 * S * sizeof(int32_t) + 32));
  *tokens = static_cast<int32_t*>(stage_.Claim(S * sizeof(int32_t)));
  *logprobs = static_cast<float*>(stage_.Claim(S * sizeof(float)));
  cudaError_t staged = cudaSuccess;
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
  DMSRT_CUDA_OK(cudaMemcpyAsync(*tokens, tokens_.get(), S * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream_));
  DMSRT_CUDA_OK(cudaMemcpyAsync(*logprobs, logprobs_.get(), S * sizeof(float),
                                cudaMemcpyDeviceToHost, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyReturnedLogits(const LogitRows& sel, ForwardResult& result) {
  const int64_t R = static_cast<int64_t>(sel.dev_rows.size());
  const int64_t returned = static_cast<int64_t>(result.row_chunk.size());
  result.logits.resize(static_cast<size_t>(returned) * vocab_);
  // Returned rows in runs of consecutive device rows, one copy per run (into pageable memory,
  // each copy waits for the stream: a prefill step that returns every row waits once).
  int64_t out_r = 0;
  for (int64_t r = 0; r < R;) {
    if (!sel.ret[r]) {
      ++r;
      continue;
    }
    int64_t r1 = r;
    while (r1 < R && sel.ret[r1]) ++r1;
    DMSRT_CUDA_OK(cudaMemcpyAsync(result.logits.data() + out_r * vocab_,
                                  logits_.get() + r * vocab_, sizeof(float) * vocab_ * (r1 - r),
                                  cudaMemcpyDeviceToHost, stream_));
    out_r += r1 - r;
    r = r1;
  }
  return absl::OkStatus();
}

}  // namespace cuda_backend
}  // namespace dmsrt
