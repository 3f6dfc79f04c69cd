// The planner's simulated backend (launch/plan/sim.h): a Backend whose forward pass is a step
// time from the profile and whose KV bookkeeping is the real KvIndex, for the real Engine to
// drive. Internal to launch/plan/.
//
// The simulated model has the planned model's shapes and a three-token vocabulary: a prompt
// token, "continue" and EOS. The logits of a row continue the thread, or, with per-thread
// lengths, end it with the length distribution's hazard at that token. The KV index has one
// simulated layer whose KV heads stand for all the rank's (layer, KV head) pairs (sim.h explains
// why that stands for the real pool); a decode row reads the heads' mean resident count.
//
// Decode spans (Backend::DecodeSpanLimit / ForwardDecodeSpan): a run of pure decode steps
// between events is committed as one KvIndex::CommitDecodeRun per sequence, and the clock and
// the tallies still advance step by step with Forward's arithmetic, so a span gives the same
// figures as its steps one by one.
//
// Threading: one simulation thread drives it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "launch/plan/profile.h"
#include "launch/plan/sim.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/clock.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {
namespace plan_internal {

// Token ids of the simulated vocabulary.
inline constexpr int32_t kContinue = 0;  // a generated token
inline constexpr int32_t kEos = 1;
inline constexpr int32_t kPromptToken = 2;
inline constexpr int32_t kSimVocab = 3;

class SimTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool, bool) const override {
    return std::vector<int32_t>(text.size(), kPromptToken);
  }
  std::string Decode(absl::Span<const int32_t> ids) const override;
  // Generated tokens decode to nothing, so per-thread text stays empty (cheap).
  std::string TokenBytes(int32_t) const override { return ""; }
  bool IsEndOfGeneration(int32_t id) const override { return id == kEos; }
  int32_t vocab_size() const override { return kSimVocab; }
};

// What the backend knows of a sequence: prompt and generated tokens it holds (to know which
// token number the next logits decide).
struct SeqTokens {
  int64_t prompt = 0;
  int64_t generated = 0;
};

// The real KV index, with Create/Fork/Free seen on the way so the backend can follow sequences.
class SimKv final : public KvCache {
 public:
  SimKv(std::unique_ptr<KvIndex> index, std::unordered_map<SeqId, SeqTokens>* seqs)
      : index_(std::move(index)), seqs_(seqs) {}
  KvIndex& index() { return *index_; }
  const KvGeometry& geometry() const override { return index_->geometry(); }
  const KvPolicyConfig& policy() const override { return index_->policy(); }
  absl::StatusOr<SeqId> Create() override;
  absl::StatusOr<SeqId> Fork(SeqId parent) override;
  absl::Status Free(SeqId seq) override;
  int64_t Length(SeqId seq) const override { return index_->Length(seq); }
  absl::Status Reserve(SeqId seq, int32_t n) override { return index_->Reserve(seq, n); }
  void AttendAndAppend(SeqId seq, int32_t layer, int32_t n, const float* q, const float* k,
                       const float* v, const uint8_t* evict, float* out) override {
    index_->AttendAndAppend(seq, layer, n, q, k, v, evict, out);
  }
  int64_t total_blocks() const override { return index_->total_blocks(); }
  int64_t free_blocks() const override { return index_->free_blocks(); }
  int64_t block_bytes() const override { return index_->block_bytes(); }
  KvFigures Figures() const override { return index_->Figures(); }
  KvFigures Figures(SeqId seq) const override { return index_->Figures(seq); }
  std::vector<int32_t> ResidentPositions(SeqId seq, int32_t layer, int32_t head) const override {
    return index_->ResidentPositions(seq, layer, head);
  }

 private:
  std::unique_ptr<KvIndex> index_;
  std::unordered_map<SeqId, SeqTokens>* seqs_;
};

class NullSink final : public KvSlotSink {
 public:
  void CopyBlock(int32_t, int32_t) override {}
  void WriteSlot(int32_t, int32_t, int32_t, int32_t, int32_t, int32_t) override {}
};

// Counts, during a CommitDecodeRun of one sequence, the slots resident after each token: what the
// decode step of that token reads (SimBackend::Forward reads the head's length after the commit).
class SpanSink final : public KvSlotSink {
 public:
  explicit SpanSink(int32_t block_tokens) : bt_(block_tokens) {}
  // Tokens from position `first` on, the heads holding `views`' slots before them; adds the
  // resident count of every head after token first + j to per_step[j].
  void Start(int64_t first, const std::vector<KvHeadView>& views, int64_t* per_step) {
    first_ = first;
    n_.resize(views.size());
    dead_.resize(views.size());
    for (size_t h = 0; h < views.size(); ++h) {
      n_[h] = views[h].length;
      dead_[h] = views[h].length - views[h].live;
    }
    per_step_ = per_step;
  }
  void CopyBlock(int32_t, int32_t) override {}
  void WriteSlot(int32_t, int32_t head, int32_t, int32_t offset, int32_t pos,
                 int32_t table_index) override {
    int32_t& n = n_[static_cast<size_t>(head)];
    n = std::max(n, table_index * bt_ + offset + 1);  // an append takes slot n
    per_step_[pos - first_] += n - dead_[static_cast<size_t>(head)];
  }
  void DeadSlot(int32_t head) override { ++dead_[static_cast<size_t>(head)]; }

 private:
  int32_t bt_;
  int64_t first_ = 0;
  std::vector<int32_t> n_;     // per head: slots in use
  std::vector<int32_t> dead_;  // per head: dead slots among them
  int64_t* per_step_ = nullptr;
};

// Where a replica's step time went.
struct StepTally {
  int64_t steps = 0;
  int64_t decode_rows = 0;
  double busy = 0.0, fixed = 0.0, rows = 0.0, kv = 0.0, prefill = 0.0;
  double host = 0.0;  // what host-bound steps took beyond the device's time
  double sampling = 0.0;  // the engine's sampling after each forward pass
};

class SimBackend final : public Backend {
 public:
  // `per_thread`: every thread's own length distribution (ended by its hazard), or null (threads
  // run to the job's max_tokens). The clock is the replica's; both must outlive the backend.
  // `speed`: step times times its factor at each step's start (null: 1; spans included); it
  // must outlive the backend.
  SimBackend(std::unique_ptr<KvIndex> index, const StepCosts& costs, SimClock* clock,
             const LengthDist* per_thread, const SpeedTrace* speed = nullptr);
  const char* name() const override { return "sim"; }
  KvCache& kv() override { return kv_; }
  const StepTally& tally() const { return tally_; }
  // Decode spans may hold only steps that start before `before` (the next arrival) and no later
  // than `until` (the cut-off): what the event loop would run before it looks at anything else.
  void SetSpanWindow(double before, double until) {
    span_before_ = before;
    span_until_ = until;
  }

  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override;
  int64_t DecodeSpanLimit(const std::vector<SeqId>& seqs, int64_t max_steps,
                          std::vector<float>* row) override;
  absl::Status ForwardDecodeSpan(const std::vector<SeqId>& seqs, int64_t steps) override;

 private:
  // One step's time on the clock and in the tally.
  void Account(int64_t decode_rows, int64_t kv_tokens, int64_t prefill_tokens, int64_t sampled_rows);
  // Reserves `n` tokens for every sequence (0 gives reservations back); false when one fails.
  bool ReserveAll(const std::vector<SeqId>& seqs, int64_t n);
  // The simulated heads' views of `seq` (in views_, valid until the next call).
  const std::vector<KvHeadView>& Views(SeqId seq);
  // Resident slots of `seq` summed over the simulated heads (a decode row reads their mean).
  int64_t LiveSlots(SeqId seq);

  std::unordered_map<SeqId, SeqTokens> seqs_;
  SimKv kv_;
  StepCosts costs_;
  SimClock* clock_;
  const LengthDist* per_thread_;
  const SpeedTrace* speed_;
  NullSink sink_;
  StepTally tally_;
  int64_t zero_hazard_ = 0;  // per-thread lengths: tokens 1 .. this one end no thread
  double span_before_ = 0.0, span_until_ = 0.0;
  SpanSink span_sink_;
  std::vector<int64_t> span_kv_;  // [steps] slots the span's steps read, summed over heads
  std::vector<KvHeadView> views_;  // Views' scratch, one per simulated head
};

}  // namespace plan_internal
}  // namespace dmsrt
