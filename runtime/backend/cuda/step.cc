// The CUDA backend's step (Forward): the batch's rows in decode-first order, the step's inputs
// staged up, embeddings, every layer (layer_forward.cc), the results (step_output.cc), and the
// decision bits a decode-only step brings back with them (policy dms) or the attention weights
// per slot (policies tova and h2o, whose steps take one token per sequence). Also
// AppendUncomputed.
#include <algorithm>
#include <vector>

#include "kernels/elementwise.cuh"
#include "runtime/backend/cuda/cuda_backend.h"

namespace dmsrt {
namespace cuda_backend {

absl::Status CudaBackend::AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate) {
  if (n <= 0) return absl::OkStatus();
  if (victim_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KV policy ", KvPolicyName(options_.kv_policy.kind), " picks victims by attention "
        "weights, so tokens cannot be appended without running the model"));
  }
  DMSRT_RETURN_IF_ERROR(BindDevice());
  // Under tensor parallelism every rank appends to its own heads, or none does.
  DMSRT_RETURN_IF_ERROR(AgreeReservations(kv_->Reserve(seq, n)));
  // Bookkeeping only: the slots keep whatever values they hold.
  class Discard final : public KvSlotSink {
   public:
    void CopyBlock(int32_t, int32_t) override {}
    void WriteSlot(int32_t, int32_t, int32_t, int32_t, int32_t, int32_t) override {}
  } sink;
  std::vector<uint8_t> bits(static_cast<size_t>(n) * nkv_, 0);
  const int64_t pos0 = kv_->Length(seq);
  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    if (dms_bits_) {
      UncomputedDmsBits(l, nkv_, static_cast<int32_t>(shard_.kv_heads.begin), pos0, n,
                        dms_flag_rate, bits.data());
    }
    if (!kv_->CommitRows(seq, l, n, 0, dms_bits_ ? bits.data() : nullptr, sink)) {
      return absl::InternalError(absl::StrCat("appending to KV sequence ", seq, " failed"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ForwardResult> CudaBackend::Forward(const std::vector<SeqChunk>& batch) {
  DMSRT_ASSIGN_OR_RETURN(const int64_t T, ValidateStep(batch, vocab_));
  if (victim_ && T > static_cast<int64_t>(batch.size())) return ForwardTokenByToken(batch);
  return ForwardStep(batch, T, {});
}

// The CPU store, too, runs a victim policy's chunk token by token (commit, attend, pick the next
// victim). Reserving every chunk whole in the first step makes a full pool fail the call before
// anything is committed; the later steps need no more than that bound.
absl::StatusOr<ForwardResult> CudaBackend::ForwardTokenByToken(const std::vector<SeqChunk>& batch) {
  size_t longest = 0;
  for (const SeqChunk& ch : batch) longest = std::max(longest, ch.tokens.size());
  ForwardResult result;
  result.vocab = vocab_;
  result.sampled.assign(batch.size(), -1);
  result.sampled_logprob.assign(batch.size(), 0.0f);
  std::vector<std::vector<float>> rows(batch.size());  // each chunk's returned logits rows
  std::vector<SeqChunk> sub;
  std::vector<size_t> from;
  std::vector<int32_t> reserve;
  for (size_t i = 0; i < longest; ++i) {
    sub.clear();
    from.clear();
    reserve.clear();
    for (size_t ci = 0; ci < batch.size(); ++ci) {
      const SeqChunk& ch = batch[ci];
      const size_t n = ch.tokens.size();
      if (i >= n) continue;
      const bool last = i + 1 == n;
      SeqChunk c = MakeChunk(ch.seq, {ch.tokens[i]}, SeqChunk::Logits::kNone);
      if (ch.logits == SeqChunk::Logits::kAll || (last && ch.logits == SeqChunk::Logits::kLast)) {
        c.logits = SeqChunk::Logits::kLast;
      }
      c.sample = last && ch.sample;
      c.sampling = ch.sampling;
      sub.push_back(std::move(c));
      from.push_back(ci);
      reserve.push_back(static_cast<int32_t>(i == 0 ? n : 1));
    }
    DMSRT_ASSIGN_OR_RETURN(ForwardResult r,
                           ForwardStep(sub, static_cast<int64_t>(sub.size()), reserve));
    for (size_t k = 0; k < r.row_chunk.size(); ++k) {
      const auto row = r.logits.begin() + static_cast<int64_t>(k) * vocab_;
      std::vector<float>& dst = rows[from[r.row_chunk[k]]];
      dst.insert(dst.end(), row, row + vocab_);
    }
    for (size_t k = 0; k < sub.size(); ++k) {
      if (!sub[k].sample) continue;
      result.sampled[from[k]] = r.sampled[k];
      result.sampled_logprob[from[k]] = r.sampled_logprob[k];
    }
  }
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    result.logits.insert(result.logits.end(), rows[ci].begin(), rows[ci].end());
    for (size_t k = 0; k < rows[ci].size() / vocab_; ++k) {
      result.row_chunk.push_back(static_cast<int32_t>(ci));
    }
  }
  return result;
}

absl::StatusOr<ForwardResult> CudaBackend::ForwardStep(const std::vector<SeqChunk>& batch,
                                                       int64_t T,
                                                       const std::vector<int32_t>& reserve) {
  ForwardResult result;
  result.vocab = vocab_;
  if (T == 0) return result;
  DMSRT_RETURN_IF_ERROR(BeginStep(batch, T, reserve));
  const StepRows s = PlanRows(batch, T);
  DMSRT_ASSIGN_OR_RETURN(const LogitRows sel, PrepareOutputs(batch, s, result));
  DMSRT_ASSIGN_OR_RETURN(const int32_t* pos_d, EmbedTokens(s));
  const bool defer_bits = dms_bits_ && PagedKvLayer::CanDeferBits(*kv_, s.chunks, s.n_decode);
  for (int32_t l = 0; l < cfg_.n_layers; ++l) {
    DMSRT_RETURN_IF_ERROR(ForwardLayer(l, s, pos_d, defer_bits));
  }
  // Deferred bits, every layer's, come back with the step's results ([layers, rows, n_kv]).
  if (defer_bits) {
    DMSRT_CUDA_OK(cudaMemcpyAsync(bits_pinned_, bits_.get(),
                                  static_cast<size_t>(cfg_.n_layers * T * nkv_),
                                  cudaMemcpyDeviceToHost, stream_));
  }
  DMSRT_RETURN_IF_ERROR(StepOutputs(batch, s, sel, result));
  if (defer_bits) DMSRT_RETURN_IF_ERROR(CommitDeferredBits(s));
  if (victim_) DMSRT_RETURN_IF_ERROR(CommitVictimWeights(s));
  return result;
}

absl::Status CudaBackend::BeginStep(const std::vector<SeqChunk>& batch, int64_t rows,
                                    const std::vector<int32_t>& reserve) {
  DMSRT_RETURN_IF_ERROR(BindDevice());
  absl::Status reserved;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    const int32_t n = reserve.empty() ? static_cast<int32_t>(batch[ci].tokens.size()) : reserve[ci];
    reserved = kv_->Reserve(batch[ci].seq, n);
    if (!reserved.ok()) break;
  }
  // Ranks evict different amounts, so one may be full while the others are not: agree before
  // the first collective of the step, so every rank runs it or none does.
  DMSRT_RETURN_IF_ERROR(AgreeReservations(reserved));
  // A step that failed part-way may have left work queued: the staging arena is reused only
  // once the stream is idle.
  DMSRT_RETURN_IF_ERROR(WaitStream());
  DMSRT_RETURN_IF_ERROR(Grow(rows));
  if (victim_) {
    DMSRT_RETURN_IF_ERROR(victim_w_.Reserve(
        static_cast<size_t>(cfg_.n_layers) * rows * nkv_ * victim_ld_, wait_));
  }
  stage_.Reset();
  ops_.ClearStatus();
  return absl::OkStatus();
}

StepRows CudaBackend::PlanRows(const std::vector<SeqChunk>& batch, int64_t rows) const {
  StepRows s;
  s.count = rows;
  // Rows: one-token chunks first.
  std::vector<size_t> order;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (batch[ci].tokens.size() == 1) order.push_back(ci);
  }
  s.n_decode = static_cast<int32_t>(order.size());
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (batch[ci].tokens.size() != 1) order.push_back(ci);
  }
  s.chunks.resize(batch.size());
  s.row0_of.resize(batch.size());
  s.ids.resize(rows);
  s.pos.resize(rows);
  int32_t row = 0;
  for (size_t oi = 0; oi < order.size(); ++oi) {
    const SeqChunk& ch = batch[order[oi]];
    const int32_t n = static_cast<int32_t>(ch.tokens.size());
    const int64_t p0 = kv_->Length(ch.seq);
    s.chunks[oi] = PagedChunk{ch.seq, row, n};
    s.row0_of[order[oi]] = row;
    for (int32_t i = 0; i < n; ++i) {
      s.ids[row + i] = ch.tokens[i];
      s.pos[row + i] = static_cast<int32_t>(p0 + i);
    }
    row += n;
  }
  return s;
}

absl::StatusOr<const int32_t*> CudaBackend::EmbedTokens(const StepRows& s) {
  // Small per-step inputs go up through the pinned staging arena (asynchronous copies).
  DMSRT_RETURN_IF_ERROR(stage_.Reserve(Bytes(s.ids) + Bytes(s.pos)));
  cudaError_t staged = cudaSuccess;
  const int32_t* ids_d = nullptr;
  if (shard_.tp == 1) {
    ids_d = static_cast<const int32_t*>(stage_.Stage(s.ids.data(), Bytes(s.ids), stream_, &staged));
  } else {
    // Rows of this rank's vocabulary slice; the gather gives zero rows for the others' tokens.
    auto* local = static_cast<int32_t*>(stage_.Claim(Bytes(s.ids)));
    for (size_t i = 0; i < s.ids.size(); ++i) {
      local[i] = static_cast<int32_t>(s.ids[i] - shard_.vocab.begin);
    }
    ids_d = static_cast<const int32_t*>(stage_.Send(local, Bytes(s.ids), stream_, &staged));
  }
  const auto* pos_d =
      static_cast<const int32_t*>(stage_.Stage(s.pos.data(), Bytes(s.pos), stream_, &staged));
  DMSRT_CUDA_OK(staged);
  DMSRT_CUDA_OK(EmbeddingGather(embed_, vrows_, H_, ids_d, static_cast<int32_t>(s.count), x_.get(),
                                stream_));
  if (shard_.tp > 1) DMSRT_RETURN_IF_ERROR(GatherEmbeddings(s.count));
  return pos_d;
}

absl::Status CudaBackend::CommitDeferredBits(const StepRows& s) {
  const int64_t bits_layer = s.count * nkv_;  // bytes of one layer's bits
  for (int32_t b = 0; b < s.n_decode; ++b) {
    DMSRT_RETURN_IF_ERROR(kv_->SetDeferredBits(
        s.chunks[b].seq, bits_pinned_ + static_cast<int64_t>(b) * nkv_, bits_layer));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::CommitVictimWeights(const StepRows& s) {
  // StepOutputs waited for the stream: the copy finds the weights written.
  const int64_t layer_floats = s.count * nkv_ * victim_ld_;
  victim_host_.resize(static_cast<size_t>(cfg_.n_layers * layer_floats));
  DMSRT_CUDA_OK(cudaMemcpyAsync(victim_host_.data(), victim_w_.get(),
                                victim_host_.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                stream_));
  DMSRT_RETURN_IF_ERROR(WaitStream());
  for (int32_t b = 0; b < s.n_decode; ++b) {
    DMSRT_RETURN_IF_ERROR(kv_->SetVictimWeights(
        s.chunks[b].seq, victim_host_.data() + static_cast<int64_t>(b) * nkv_ * victim_ld_,
        layer_floats, victim_ld_));
  }
  return absl::OkStatus();
}

}  // namespace cuda_backend
}  // namespace dmsrt
