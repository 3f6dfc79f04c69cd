// The planner's simulated backend (see sim_backend.h).
#include "launch/plan/sim_backend.h"

#include <algorithm>
#include <cmath>

#include "parallel/status_macros.h"

namespace dmsrt {
namespace plan_internal {

std::string SimTokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string s;
  for (int32_t id : ids) s += TokenBytes(id);
  return s;
}

absl::StatusOr<SeqId> SimKv::Create() {
  DMSRT_ASSIGN_OR_RETURN(SeqId s, index_->Create());
  (*seqs_)[s] = SeqTokens{};
  return s;
}

absl::StatusOr<SeqId> SimKv::Fork(SeqId parent) {
  DMSRT_ASSIGN_OR_RETURN(SeqId s, index_->Fork(parent));
  (*seqs_)[s] = (*seqs_)[parent];
  return s;
}

absl::Status SimKv::Free(SeqId seq) {
  seqs_->erase(seq);
  return index_->Free(seq);
}

SimBackend::SimBackend(std::unique_ptr<KvIndex> index, const StepCosts& costs, SimClock* clock,
                       const LengthDist* per_thread, const SpeedTrace* speed)
    : kv_(std::move(index), &seqs_),
      costs_(costs),
      clock_(clock),
      per_thread_(per_thread),
      speed_(speed),
      span_sink_(kv_.geometry().block_tokens),
      views_(static_cast<size_t>(kv_.geometry().n_kv_heads)) {
  // Per-thread lengths: the tokens 1 .. zero_hazard_ end no thread (their hazard is 0), so
  // their steps can run in spans. Beyond, every step may end a thread and is run alone.
  if (per_thread_ != nullptr) {
    const int64_t cap = per_thread_->Max();
    while (zero_hazard_ < cap && per_thread_->Hazard(zero_hazard_ + 1) == 0.0) ++zero_hazard_;
  }
}

absl::StatusOr<ForwardResult> SimBackend::Forward(const std::vector<SeqChunk>& batch) {
  DMSRT_ASSIGN_OR_RETURN(const int64_t n_tokens, ValidateStep(batch, kSimVocab));
  (void)n_tokens;
  for (const SeqChunk& ch : batch) {
    DMSRT_RETURN_IF_ERROR(kv_.Reserve(ch.seq, static_cast<int32_t>(ch.tokens.size())));
  }
  KvIndex& index = kv_.index();
  int64_t decode_rows = 0, kv_tokens = 0, prefill_tokens = 0, sampled_rows = 0;
  ForwardResult res;
  res.vocab = kSimVocab;
  int32_t row = 0;
  const int32_t heads = index.geometry().n_kv_heads;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    const SeqChunk& ch = batch[ci];
    const int32_t n = static_cast<int32_t>(ch.tokens.size());
    SeqTokens& st = seqs_[ch.seq];
    for (int32_t t : ch.tokens) {
      if (t == kPromptToken) {
        ++st.prompt;
      } else {
        ++st.generated;
      }
    }
    if (!index.CommitRows(ch.seq, 0, n, row, nullptr, sink_)) {
      return absl::InternalError("the simulated KV index refused a commit");
    }
    row += n;
    if (n == 1 && ch.tokens[0] != kPromptToken) {
      ++decode_rows;
      kv_tokens += LiveSlots(ch.seq);
    } else {
      prefill_tokens += n;
    }
    if (ch.logits != SeqChunk::Logits::kNone) {
      // The next token is generated token number st.generated + 1.
      const double h = per_thread_ != nullptr ? per_thread_->Hazard(st.generated + 1) : 0.0;
      const float cont = h >= 1.0 ? -1e30f : static_cast<float>(std::log1p(-h));
      const float eos = h <= 0.0 ? -1e30f : static_cast<float>(std::log(h));
      res.logits.insert(res.logits.end(), {cont, eos, -1e30f});
      res.row_chunk.push_back(static_cast<int32_t>(ci));
      ++sampled_rows;  // a prompt's last row forks its job's threads: counted once, not n times
    }
  }
  res.sampled.assign(batch.size(), -1);
  res.sampled_logprob.assign(batch.size(), 0.0f);
  Account(decode_rows, kv_tokens / heads, prefill_tokens, sampled_rows);
  return res;
}

const std::vector<KvHeadView>& SimBackend::Views(SeqId seq) {
  kv_.index().HeadViews(seq, 0, views_.data());
  return views_;
}

int64_t SimBackend::LiveSlots(SeqId seq) {
  int64_t live = 0;
  for (const KvHeadView& v : Views(seq)) live += v.live;
  return live;
}

int64_t SimBackend::DecodeSpanLimit(const std::vector<SeqId>& seqs, int64_t max_steps,
                                    std::vector<float>* row) {
  KvIndex& index = kv_.index();
  const int64_t rows = static_cast<int64_t>(seqs.size());
  int64_t k = max_steps;
  if (per_thread_ != nullptr) {
    // At the span's step j the logits decide generated token seqs_[s].generated + j + 1.
    for (SeqId s : seqs) k = std::min(k, zero_hazard_ - seqs_[s].generated - 1);
    if (k < 2) return 0;
  }
  int64_t resident = 0;  // slots the rows read now, per head
  for (SeqId s : seqs) resident += LiveSlots(s);
  resident /= index.geometry().n_kv_heads;
  // Steps whose start is certainly inside the window: each row's resident slots grow by at
  // most one per step and no later step is slowed by more than the speed trace's largest
  // factor from now on, so this bounds each step's time from above; the clock arithmetic is
  // the clock's own.
  SimClock probe = *clock_;
  const double slowest = speed_ != nullptr ? speed_->MaxFrom(clock_->Seconds()) : 1.0;
  int64_t m = 0;
  while (m < k && probe.Seconds() < span_before_ && probe.Seconds() <= span_until_) {
    ++m;
    probe.AdvanceSeconds(slowest * costs_.Seconds(rows, resident + rows * m, 0, rows));
  }
  k = m;
  if (k < 2) return 0;
  // The blocks. Reserve(k) bounds what the k steps take from above (appends counted exactly
  // where the flags are known; a block several sequences share counts one copy for each,
  // though its last writer keeps it), so when it succeeds every one of the k single steps'
  // reservations does too. Halve until it succeeds.
  while (k >= 2 && !ReserveAll(seqs, k)) k /= 2;
  if (k < 2) {
    ReserveAll(seqs, 0);
    return 0;
  }
  row->assign({0.0f, -1e30f, -1e30f});  // continue (hazard 0)
  return k;
}

absl::Status SimBackend::ForwardDecodeSpan(const std::vector<SeqId>& seqs, int64_t steps) {
  if (steps == 0) {
    ReserveAll(seqs, 0);
    return absl::OkStatus();
  }
  KvIndex& index = kv_.index();
  const int64_t rows = static_cast<int64_t>(seqs.size());
  span_kv_.assign(static_cast<size_t>(steps), 0);
  const int32_t heads = index.geometry().n_kv_heads;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqId s = seqs[i];
    span_sink_.Start(index.Length(s), Views(s), span_kv_.data());
    if (!index.CommitDecodeRun(s, 0, static_cast<int32_t>(steps), static_cast<int32_t>(i),
                               span_sink_)) {
      return absl::InternalError("the simulated KV index refused a decode run");
    }
    seqs_[s].generated += steps;
  }
  // The clock and the tally step by step, with Forward's arithmetic.
  for (int64_t j = 0; j < steps; ++j) Account(rows, span_kv_[j] / heads, 0, rows);
  return absl::OkStatus();
}

void SimBackend::Account(int64_t decode_rows, int64_t kv_tokens, int64_t prefill_tokens,
                         int64_t sampled_rows) {
  const double f = speed_ != nullptr ? speed_->At(clock_->Seconds()) : 1.0;
  const double secs = f * costs_.Seconds(decode_rows, kv_tokens, prefill_tokens, sampled_rows);
  const double sampling = f * costs_.per_sampled_row * static_cast<double>(sampled_rows);
  clock_->AdvanceSeconds(secs);
  ++tally_.steps;
  tally_.decode_rows += decode_rows;
  tally_.busy += secs;
  if (decode_rows > 0) tally_.fixed += f * (costs_.fixed + costs_.allreduce_per_step);
  tally_.rows += f * costs_.per_decode_row * static_cast<double>(decode_rows);
  tally_.kv += f * costs_.per_kv_token * static_cast<double>(kv_tokens);
  tally_.prefill += f * costs_.PrefillSeconds(prefill_tokens, decode_rows > 0);
  tally_.sampling += sampling;
  tally_.host += std::max(0.0, secs - sampling -
                                   f * costs_.DeviceSeconds(decode_rows, kv_tokens, prefill_tokens));
}

bool SimBackend::ReserveAll(const std::vector<SeqId>& seqs, int64_t n) {
  for (SeqId s : seqs) {
    if (!kv_.Reserve(s, static_cast<int32_t>(n)).ok()) return false;
  }
  return true;
}

}  // namespace plan_internal
}  // namespace dmsrt
