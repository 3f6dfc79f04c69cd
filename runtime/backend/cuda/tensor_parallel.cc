// Tensor parallelism of the CUDA backend (runtime/backend/cuda/cuda_backend.h describes it): the
// shard this rank holds, the collectives of a step on the device (through the TP group's
// NcclComm, on the backend's stream), the reservation agreement on the host, and the one wait
// that every step's waits go through.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/elementwise.cuh"
#include "parallel/comm.h"
#include "runtime/backend/cuda/cuda_backend.h"

#ifdef DMSRT_HAVE_NCCL
#include "parallel/nccl/nccl_comm.h"
#endif

namespace dmsrt {
namespace cuda_backend {

absl::Status CudaBackend::PlanShard() {
  const ModelConfig& c = cfg_;
  shard_ = TpShard{};
  shard_.q_heads = Range{0, c.n_heads};
  shard_.kv_heads = Range{0, c.n_kv_heads};
  shard_.ffn = Range{0, c.ffn};
  shard_.vocab = Range{0, c.vocab};
  shard_.max_vocab_slice = c.vocab;
  shard_.vocab_slices = {shard_.vocab};
  Communicator* comm = options_.comm;
  if (comm != nullptr && comm->size() > 1) {
#ifndef DMSRT_HAVE_NCCL
    return absl::FailedPreconditionError(
        "tensor parallelism on the CUDA backend needs NCCL, and this build has none (install "
        "NCCL and rebuild)");
#else
    nccl_ = dynamic_cast<NcclComm*>(comm);
    if (nccl_ == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor parallelism on the CUDA backend needs an NCCL communicator (one device per "
          "rank); got ", comm->Describe()));
    }
    if (c.hidden % 4 != 0) {
      return absl::UnimplementedError(absl::StrCat(
          "tensor parallelism on the CUDA backend needs a hidden size that is a multiple of 4 "
          "(the embedding rows travel as 64-bit words); this model has ", c.hidden));
    }
    const ModelDims dims{c.n_heads, c.n_kv_heads, c.head_dim, c.hidden, c.ffn, c.vocab};
    ShardOptions so;
    // The CPU backend's plan: the FFN split in whole blocks of down_proj when it is quantized.
    if (!model_.weights.layers.empty()) {
      const WeightTensor& down0 = model_.weights.layers[0].w_down;
      if (down0.present() && BlockSize(down0.type) > 0 && c.ffn % BlockSize(down0.type) == 0) {
        so.ffn_align = BlockSize(down0.type);
      }
    }
    const int tp = comm->size();
    absl::StatusOr<ShardPlan> plan = MakeShardPlan(dims, tp, comm->rank(), so);
    if (!plan.ok()) {
      return absl::Status(plan.status().code(),
                          absl::StrCat("tensor parallelism over ", tp, " ranks: ",
                                       plan.status().message()));
    }
    shard_.tp = tp;
    shard_.rank = comm->rank();
    shard_.q_heads = plan->q_heads;
    shard_.kv_heads = plan->kv_heads;
    shard_.ffn = plan->ffn;
    shard_.vocab = plan->vocab;
    shard_.max_vocab_slice = plan->max_vocab_slice;
    shard_.vocab_slices.clear();
    for (int r = 0; r < tp; ++r) {
      DMSRT_ASSIGN_OR_RETURN(ShardPlan pr, MakeShardPlan(dims, tp, r, so));
      shard_.vocab_slices.push_back(pr.vocab);
    }
#endif
  }
  nh_ = static_cast<int32_t>(shard_.q_heads.size());
  nkv_ = static_cast<int32_t>(shard_.kv_heads.size());
  QW_ = nh_ * hd_;
  KW_ = nkv_ * hd_;
  F_ = static_cast<int32_t>(shard_.ffn.size());
  vrows_ = static_cast<int32_t>(shard_.vocab.size());
  return absl::OkStatus();
}

absl::Status CudaBackend::WaitStream() {
#ifdef DMSRT_HAVE_NCCL
  if (nccl_ != nullptr) return nccl_->Synchronize();
#endif
  DMSRT_CUDA_OK(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AgreeReservations(const absl::Status& mine) {
  if (shard_.tp == 1) return mine;
  // The largest failing status code over the group (0 = every rank reserved).
  int64_t code = mine.ok() ? 0 : static_cast<int64_t>(mine.code());
  DMSRT_RETURN_IF_ERROR(options_.comm->host()->AllReduce(&code, &code, 1, ReduceOp::kMax));
  if (!mine.ok()) return mine;
  if (code == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(code),
                      absl::StrCat("KV reservation failed on another rank of the TP group ",
                                   options_.comm->Describe(), " (",
                                   absl::StatusCodeToString(static_cast<absl::StatusCode>(code)),
                                   "); raise --kv-budget, or run fewer or shorter sequences at "
                                   "once"));
}

absl::Status CudaBackend::ReduceIntoResidual(int64_t T) {
  DMSRT_RETURN_IF_ERROR(options_.comm->AllReduceSum(partial_.get(), T * H_));
  DMSRT_CUDA_OK(ResidualAddF32(x_.get(), partial_.get(), T * H_, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherEmbeddings(int64_t T) {
  // Each row is some rank's table row and zero (all bits clear) on every other rank, so the sum
  // of the 64-bit words adds disjoint bits: it is the row, exactly, with no float arithmetic.
  // hidden % 4 == 0 (PlanShard) makes T * H bf16 values a whole number of words.
  auto* words = reinterpret_cast<int64_t*>(x_.get());
  return options_.comm->AllReduce(words, words, T * H_ / 4, ReduceOp::kSum);
}

absl::Status CudaBackend::BroadcastBits(uint8_t* bits, int64_t n) {
  return options_.comm->Broadcast(bits, n, /*root=*/0);
}

absl::Status CudaBackend::GatherLogits(int64_t R) {
  const int64_t M = shard_.max_vocab_slice;
  const int tp = shard_.tp;
  DMSRT_RETURN_IF_ERROR(options_.comm->AllGather(logits_local_.get(), R * M, logits_all_.get()));
  if (!leader()) return absl::OkStatus();  // only the leader's rows are read
  // [tp, R, M] -> [R, vocab]: each rank's block of columns, one 2D copy per rank.
  for (int r = 0; r < tp; ++r) {
    const Range vs = shard_.vocab_slices[static_cast<size_t>(r)];
    if (vs.empty()) continue;
    DMSRT_CUDA_OK(cudaMemcpy2DAsync(logits_.get() + vs.begin, sizeof(float) * vocab_,
                                    logits_all_.get() + static_cast<int64_t>(r) * R * M,
                                    sizeof(float) * M, sizeof(float) * vs.size(), R,
                                    cudaMemcpyDeviceToDevice, stream_));
  }
  return absl::OkStatus();
}

}  // namespace cuda_backend
}  // namespace dmsrt
