// The planner's discrete-event simulation (see sim.h).
#include "launch/plan/sim.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <unordered_map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "launch/admission.h"
#include "parallel/status_macros.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/clock.h"
#include "runtime/engine/engine.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

// ---- lengths ----------------------------------------------------------------------------------

namespace {

// Survival function of the unclipped continuous distribution: P(X > x).
double Survival(const LengthDist& d, double x) {
  switch (d.kind) {
    case LengthDist::Kind::kFixed:
      return x < d.a ? 1.0 : 0.0;
    case LengthDist::Kind::kUniform:
      if (x <= d.a) return 1.0;
      if (x >= d.b) return 0.0;
      return (d.b - x) / (d.b - d.a);
    case LengthDist::Kind::kLognormal:
      if (x <= 0) return 1.0;
      return 0.5 * std::erfc((std::log(x) - std::log(d.a)) / (d.b * std::sqrt(2.0)));
  }
  return 0.0;
}

}  // namespace

int64_t LengthDist::Sample(std::mt19937_64& rng) const {
  double x = a;
  if (kind == Kind::kUniform) {
    x = std::uniform_real_distribution<double>(a, b)(rng);
  } else if (kind == Kind::kLognormal) {
    x = std::exp(std::log(a) + b * std::normal_distribution<double>(0.0, 1.0)(rng));
  }
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(x)), 1, max);
}

double LengthDist::Hazard(int64_t k) const {
  // L = clamp(ceil(X), 1, max): P(L >= k) = P(X > k-1) for 2 <= k <= max.
  if (k >= max) return 1.0;
  if (k < 1) return 0.0;
  const double s_prev = k == 1 ? 1.0 : Survival(*this, static_cast<double>(k - 1));
  const double s_here = Survival(*this, static_cast<double>(k));
  if (s_prev <= 0.0) return 1.0;
  return std::clamp(1.0 - s_here / s_prev, 0.0, 1.0);
}

double LengthDist::Mean() const {
  if (kind == Kind::kFixed) return std::clamp<double>(std::ceil(a), 1, max);
  // E[L] = sum_{k>=1} P(L >= k) = 1 + sum_{k=1}^{max-1} P(X > k).
  double m = 1.0;
  for (int64_t k = 1; k < max; ++k) {
    const double s = Survival(*this, static_cast<double>(k));
    if (s < 1e-9) break;
    m += s;
  }
  return m;
}

int64_t LengthDist::Max() const {
  switch (kind) {
    case Kind::kFixed: return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(a)), 1, max);
    case Kind::kUniform: return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(b)), 1, max);
    case Kind::kLognormal: return max;
  }
  return max;
}

std::string LengthDist::ToString() const {
  switch (kind) {
    case Kind::kFixed: return absl::StrFormat("fixed:%g", a);
    case Kind::kUniform: return absl::StrFormat("uniform:%g:%g", a, b);
    case Kind::kLognormal: return absl::StrFormat("lognormal:%g:%g (max %d)", a, b, max);
  }
  return "";
}

absl::StatusOr<LengthDist> ParseLengthDist(const std::string& s, int64_t max) {
  std::vector<std::string> parts = absl::StrSplit(s, ':');
  LengthDist d;
  d.max = std::max<int64_t>(1, max);
  auto num = [&](size_t i, double* v) -> absl::Status {
    if (i >= parts.size() || !absl::SimpleAtod(parts[i], v) || !std::isfinite(*v)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "length distribution '", s, "': expected fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA"));
    }
    return absl::OkStatus();
  };
  if (parts[0] == "fixed" && parts.size() == 2) {
    d.kind = LengthDist::Kind::kFixed;
    DMSRT_RETURN_IF_ERROR(num(1, &d.a));
    if (d.a < 1) return absl::InvalidArgumentError(absl::StrCat("'", s, "': the length must be >= 1"));
  } else if (parts[0] == "uniform" && parts.size() == 3) {
    d.kind = LengthDist::Kind::kUniform;
    DMSRT_RETURN_IF_ERROR(num(1, &d.a));
    DMSRT_RETURN_IF_ERROR(num(2, &d.b));
    if (d.a < 1 || d.b <= d.a) return absl::InvalidArgumentError(absl::StrCat("'", s, "': need 1 <= A < B"));
  } else if (parts[0] == "lognormal" && parts.size() == 3) {
    d.kind = LengthDist::Kind::kLognormal;
    DMSRT_RETURN_IF_ERROR(num(1, &d.a));
    DMSRT_RETURN_IF_ERROR(num(2, &d.b));
    if (d.a < 1 || d.b <= 0) return absl::InvalidArgumentError(absl::StrCat("'", s, "': need MEDIAN >= 1 and SIGMA > 0"));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "length distribution '", s, "': expected fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA"));
  }
  return d;
}

double Percentile(std::vector<double> v, double pct) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const double rank = std::ceil(pct / 100.0 * static_cast<double>(v.size()));
  const size_t i = static_cast<size_t>(std::clamp<double>(rank, 1.0, static_cast<double>(v.size()))) - 1;
  return v[i];
}

// ---- the simulated backend ----------------------------------------------------------------------

namespace {

// Token ids of the simulated vocabulary.
constexpr int32_t kContinue = 0;  // a generated token
constexpr int32_t kEos = 1;
constexpr int32_t kPromptToken = 2;
constexpr int32_t kSimVocab = 3;

class SimTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool, bool) const override {
    return std::vector<int32_t>(text.size(), kPromptToken);
  }
  std::string Decode(absl::Span<const int32_t> ids) const override {
    std::string s;
    for (int32_t id : ids) s += TokenBytes(id);
    return s;
  }
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
  absl::StatusOr<SeqId> Create() override {
    DMSRT_ASSIGN_OR_RETURN(SeqId s, index_->Create());
    (*seqs_)[s] = SeqTokens{};
    return s;
  }
  absl::StatusOr<SeqId> Fork(SeqId parent) override {
    DMSRT_ASSIGN_OR_RETURN(SeqId s, index_->Fork(parent));
    (*seqs_)[s] = (*seqs_)[parent];
    return s;
  }
  absl::Status Free(SeqId seq) override {
    seqs_->erase(seq);
    return index_->Free(seq);
  }
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
  // Tokens from position `first` on, the head holding `resident` slots before them; adds the
  // count after token first + j to per_step[j].
  void Start(int64_t first, int32_t resident, int64_t* per_step) {
    first_ = first;
    n_ = resident;
    per_step_ = per_step;
  }
  void CopyBlock(int32_t, int32_t) override {}
  void WriteSlot(int32_t, int32_t, int32_t, int32_t offset, int32_t pos,
                 int32_t table_index) override {
    n_ = std::max(n_, table_index * bt_ + offset + 1);  // an append takes slot n
    per_step_[pos - first_] += n_;
  }

 private:
  int32_t bt_;
  int64_t first_ = 0;
  int32_t n_ = 0;
  int64_t* per_step_ = nullptr;
};

struct StepTally {
  int64_t steps = 0;
  int64_t decode_rows = 0;
  double busy = 0.0, fixed = 0.0, rows = 0.0, kv = 0.0, prefill = 0.0;
};

class SimBackend final : public Backend {
 public:
  SimBackend(std::unique_ptr<KvIndex> index, const StepCosts& costs, SimClock* clock,
             const LengthDist* per_thread)
      : kv_(std::move(index), &seqs_),
        costs_(costs),
        clock_(clock),
        per_thread_(per_thread),
        span_sink_(kv_.geometry().block_tokens) {
    // Per-thread lengths: the tokens 1 .. zero_hazard_ end no thread (their hazard is 0), so
    // their steps can run in spans. Beyond, every step may end a thread and is run alone.
    if (per_thread_ != nullptr) {
      const int64_t cap = per_thread_->Max();
      while (zero_hazard_ < cap && per_thread_->Hazard(zero_hazard_ + 1) == 0.0) ++zero_hazard_;
    }
  }
  const char* name() const override { return "sim"; }
  KvCache& kv() override { return kv_; }
  const StepTally& tally() const { return tally_; }
  // Decode spans may hold only steps that start before `before` (the next arrival) and no later
  // than `until` (the cut-off): what the event loop would run before it looks at anything else.
  void SetSpanWindow(double before, double until) {
    span_before_ = before;
    span_until_ = until;
  }

  int64_t DecodeSpanLimit(const std::vector<SeqId>& seqs, int64_t max_steps,
                          std::vector<float>* row) override {
    KvIndex& index = kv_.index();
    const int64_t rows = static_cast<int64_t>(seqs.size());
    int64_t k = max_steps;
    if (per_thread_ != nullptr) {
      // At the span's step j the logits decide generated token seqs_[s].generated + j + 1.
      for (SeqId s : seqs) k = std::min(k, zero_hazard_ - seqs_[s].generated - 1);
      if (k < 2) return 0;
    }
    int64_t resident = 0;  // slots the rows read now
    KvHeadView view;
    for (SeqId s : seqs) {
      index.HeadViews(s, 0, &view);
      resident += view.length;
    }
    // Steps whose start is certainly inside the window: each row's resident slots grow by at
    // most one per step, so this bounds each step's time from above; the clock arithmetic is
    // the clock's own.
    SimClock probe = *clock_;
    int64_t m = 0;
    while (m < k && probe.Seconds() < span_before_ && probe.Seconds() <= span_until_) {
      ++m;
      probe.AdvanceSeconds(costs_.Seconds(rows, resident + rows * m, 0));
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

  absl::Status ForwardDecodeSpan(const std::vector<SeqId>& seqs, int64_t steps) override {
    if (steps == 0) {
      ReserveAll(seqs, 0);
      return absl::OkStatus();
    }
    KvIndex& index = kv_.index();
    const int64_t rows = static_cast<int64_t>(seqs.size());
    span_kv_.assign(static_cast<size_t>(steps), 0);
    KvHeadView view;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const SeqId s = seqs[i];
      index.HeadViews(s, 0, &view);
      span_sink_.Start(index.Length(s), view.length, span_kv_.data());
      if (!index.CommitDecodeRun(s, 0, static_cast<int32_t>(steps), static_cast<int32_t>(i),
                                 span_sink_)) {
        return absl::InternalError("the simulated KV index refused a decode run");
      }
      seqs_[s].generated += steps;
    }
    // The clock and the tally step by step, with Forward's arithmetic.
    for (int64_t j = 0; j < steps; ++j) Account(rows, span_kv_[j], 0);
    return absl::OkStatus();
  }

  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override {
    DMSRT_ASSIGN_OR_RETURN(const int64_t n_tokens, ValidateStep(batch, kSimVocab));
    (void)n_tokens;
    for (const SeqChunk& ch : batch) {
      DMSRT_RETURN_IF_ERROR(kv_.Reserve(ch.seq, static_cast<int32_t>(ch.tokens.size())));
    }
    KvIndex& index = kv_.index();
    int64_t decode_rows = 0, kv_tokens = 0, prefill_tokens = 0;
    ForwardResult res;
    res.vocab = kSimVocab;
    int32_t row = 0;
    KvHeadView view;
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
        index.HeadViews(ch.seq, 0, &view);
        kv_tokens += view.length;
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
      }
    }
    res.sampled.assign(batch.size(), -1);
    res.sampled_logprob.assign(batch.size(), 0.0f);
    Account(decode_rows, kv_tokens, prefill_tokens);
    return res;
  }

 private:
  // One step's time on the clock and in the tally.
  void Account(int64_t decode_rows, int64_t kv_tokens, int64_t prefill_tokens) {
    const double secs = costs_.Seconds(decode_rows, kv_tokens, prefill_tokens);
    clock_->AdvanceSeconds(secs);
    ++tally_.steps;
    tally_.decode_rows += decode_rows;
    tally_.busy += secs;
    if (decode_rows > 0) tally_.fixed += costs_.fixed + costs_.allreduce_per_step;
    if (decode_rows == 0 && prefill_tokens > 0) tally_.prefill += costs_.prefill_fixed;
    tally_.rows += costs_.per_decode_row * static_cast<double>(decode_rows);
    tally_.kv += costs_.per_kv_token * static_cast<double>(kv_tokens);
    tally_.prefill += costs_.per_prefill_token * static_cast<double>(prefill_tokens);
  }

  // Reserves `n` tokens for every sequence (0 gives reservations back); false when one fails.
  bool ReserveAll(const std::vector<SeqId>& seqs, int64_t n) {
    for (SeqId s : seqs) {
      if (!kv_.Reserve(s, static_cast<int32_t>(n)).ok()) return false;
    }
    return true;
  }

  std::unordered_map<SeqId, SeqTokens> seqs_;
  SimKv kv_;
  StepCosts costs_;
  SimClock* clock_;
  const LengthDist* per_thread_;
  NullSink sink_;
  StepTally tally_;
  int64_t zero_hazard_ = 0;
  double span_before_ = 0.0, span_until_ = 0.0;
  SpanSink span_sink_;
  std::vector<int64_t> span_kv_;  // [steps] slots the span's steps read
};

struct SimJob {
  double arrival = 0.0;
  int32_t n = 0;
  int32_t finished = 0;
  double first_thread = -1.0;
  double done = -1.0;
  bool failed = false;
  std::map<int32_t, int32_t> open_on;  // replica -> threads not finished
};

// Steps one decode span may hold at most (spans end sooner at events anyway).
constexpr int64_t kMaxSpan = 1 << 20;

struct SimReplica {
  int32_t id = 0;
  SimClock clock;
  std::unique_ptr<SimBackend> backend;
  std::unique_ptr<Engine> engine;
  ReplicaCapacity capacity;
};

}  // namespace

absl::StatusOr<SimResult> Simulate(const SimReplicaConfig& cfg, int32_t replicas,
                                   const Workload& w, double cutoff_after_last_arrival) {
  const auto wall0 = std::chrono::steady_clock::now();
  if (replicas < 1) return absl::InvalidArgumentError("replicas must be >= 1");
  if (w.n < 1) return absl::InvalidArgumentError("n must be >= 1");
  if (w.jobs < 1) return absl::InvalidArgumentError("jobs must be >= 1");
  if (w.arrivals.empty() && !(w.jobs_per_hour > 0)) {
    return absl::InvalidArgumentError("the arrival rate must be > 0 jobs/h");
  }
  const ModelConfig& mc = cfg.model;
  const int64_t kv_heads_rank = mc.n_kv_heads / std::max(1, cfg.tp);
  const int64_t row_blocks = static_cast<int64_t>(mc.n_layers) * kv_heads_rank;
  if (row_blocks < 1 || cfg.kv_block_bytes < 1) return absl::InvalidArgumentError("bad KV geometry");
  // The real pool per rank, in rows of n_layers x local KV heads blocks; a replica's leader
  // counts tp ranks' pools in its own unit (every rank's heads), i.e. the same rows.
  const int64_t rank_blocks = cfg.kv_budget_bytes / cfg.kv_block_bytes;
  const int64_t rows = rank_blocks / row_blocks;
  if (rows < 1) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the KV budget of %d bytes per rank holds no block row (%d blocks of %d bytes)",
        cfg.kv_budget_bytes, row_blocks, cfg.kv_block_bytes));
  }
  KvGeometry geo;
  geo.n_layers = 1;
  geo.n_kv_heads = 1;
  geo.n_heads = 1;
  geo.head_dim = mc.head_dim;
  geo.block_tokens = cfg.block_tokens;
  KvPolicyConfig policy;
  if (cfg.eviction_rate > 0) {
    policy.kind = KvPolicyKind::kForced;
    policy.force_rate = cfg.eviction_rate;
    policy.window = std::max(1, cfg.window);
    policy.seed = 7;
  }
  // The simulated model: the real shapes and context, a three-token vocabulary.
  Model model;
  model.config = mc;
  model.config.vocab = kSimVocab;
  SimTokenizer tok;
  const LengthDist* per_thread = w.per_thread_lengths ? &w.reasoning : nullptr;

  std::vector<std::unique_ptr<SimReplica>> reps;
  for (int32_t r = 0; r < replicas; ++r) {
    auto rep = std::make_unique<SimReplica>();
    rep->id = r;
    const int64_t row_bytes = cfg.kv_block_bytes * row_blocks;
    DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<KvIndex> index,
                           MakeKvIndex(geo, policy, rows * row_bytes, row_bytes));
    rep->backend = std::make_unique<SimBackend>(std::move(index), cfg.costs, &rep->clock, per_thread);
    EngineOptions eo;
    eo.prefill_chunk = cfg.prefill_chunk;
    eo.max_running_threads = cfg.max_running_threads;
    eo.clock = &rep->clock;
    rep->engine = std::make_unique<Engine>(*rep->backend, tok, model, eo);
    ReplicaCapacity& c = rep->capacity;
    c.id = r;
    c.kv_policy = cfg.eviction_rate > 0 ? "forced" : "none";
    c.kv_window = cfg.eviction_rate > 0 ? std::max(1, cfg.window) : 0;
    c.kv_force_rate = cfg.eviction_rate;
    c.kv_block_tokens = cfg.block_tokens;
    c.blocks_per_token_dense = static_cast<int64_t>(mc.n_layers) * mc.n_kv_heads;
    c.kv_blocks_total = rows * c.blocks_per_token_dense;
    c.kv_block_bytes = cfg.kv_block_bytes;
    reps.push_back(std::move(rep));
  }

  // Arrivals and lengths, drawn up front from one seeded stream.
  std::mt19937_64 rng(w.seed);
  std::vector<double> arrivals = w.arrivals;
  if (arrivals.empty()) {
    std::exponential_distribution<double> gap(w.jobs_per_hour / 3600.0);
    double t = 0.0;
    for (int64_t i = 0; i < w.jobs; ++i) {
      t += gap(rng);
      arrivals.push_back(t);
    }
  }
  const int64_t n_jobs = static_cast<int64_t>(arrivals.size());
  std::vector<int64_t> prompt_len(n_jobs), gen_len(n_jobs);
  for (int64_t i = 0; i < n_jobs; ++i) {
    prompt_len[i] = w.prompt.Sample(rng);
    gen_len[i] = w.reasoning.Sample(rng);
  }
  std::vector<SimJob> jobs(n_jobs);
  const int64_t warm = static_cast<int64_t>(std::floor(w.warmup_fraction * n_jobs));

  SimResult res;
  res.jobs_submitted = n_jobs;
  res.first_arrival = arrivals.front();
  res.last_arrival = arrivals.back();
  const double cutoff = arrivals.back() + cutoff_after_last_arrival;
  int64_t next = 0;
  int64_t finished_jobs = 0;
  int64_t threads_done = 0;

  auto sink_for = [&](int64_t job_index, SimReplica* rep) {
    return [&, job_index, rep](const EngineEvent& ev) {
      SimJob& j = jobs[job_index];
      const double now = rep->clock.Seconds();
      if (ev.kind == EngineEvent::Kind::kThreadFinished) {
        ++j.finished;
        ++threads_done;
        if (ev.reason == FinishReason::kPreemptedFailed || ev.reason == FinishReason::kError) {
          j.failed = true;
        }
        if (j.first_thread < 0) j.first_thread = now;
        if (rep->capacity.assigned_open > 0) --rep->capacity.assigned_open;
        if (j.finished == j.n) {
          j.done = now;
          ++finished_jobs;
          res.last_finish = std::max(res.last_finish, now);
        }
      }
    };
  };

  for (;;) {
    // The earliest event: an arrival, or the next step of a replica with work.
    SimReplica* step_rep = nullptr;
    double t_step = std::numeric_limits<double>::infinity();
    for (auto& r : reps) {
      if (r->engine->Idle()) continue;
      if (r->clock.Seconds() < t_step) {
        t_step = r->clock.Seconds();
        step_rep = r.get();
      }
    }
    const double t_arr = next < n_jobs ? arrivals[next] : std::numeric_limits<double>::infinity();
    if (step_rep == nullptr && next >= n_jobs) break;  // all done
    if (std::min(t_arr, t_step) > cutoff) {
      res.complete = false;
      break;
    }
    if (t_arr <= t_step) {
      // The coordinator admits the job and places its threads (launch/admission.h).
      SimJob& j = jobs[next];
      j.arrival = t_arr;
      std::vector<ReplicaCapacity> alive;
      for (auto& r : reps) alive.push_back(r->capacity);
      AdmissionRequest ar;
      ar.prompt_tokens = prompt_len[next];
      ar.max_tokens = static_cast<int32_t>(w.per_thread_lengths ? w.reasoning.Max() : gen_len[next]);
      ar.n = w.n;
      ar.max_n = std::max(64, w.n);
      absl::StatusOr<int32_t> n = AdmitJob(ar, alive);
      if (!n.ok()) return n.status();
      j.n = *n;
      std::vector<int32_t> idx(j.n);
      for (int32_t i = 0; i < j.n; ++i) idx[i] = i;
      const std::map<int32_t, std::vector<int32_t>> plan = PlaceThreads(idx, alive);
      for (auto& [rid, threads] : plan) {
        SimReplica* rep = reps[rid].get();
        rep->capacity.assigned_open += static_cast<int64_t>(threads.size());
        rep->clock.AdvanceTo(Clock::TimePoint(std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::chrono::duration<double>(t_arr))));
        EngineJobSpec spec;
        spec.prompt.assign(static_cast<size_t>(prompt_len[next]), kPromptToken);
        spec.thread_indices = threads;
        spec.sampling.temperature = 1.0f;
        spec.sampling.seed = w.seed * 1000003ull + static_cast<uint64_t>(next) * 7919ull;
        spec.max_tokens = ar.max_tokens;
        spec.ignore_eos = !w.per_thread_lengths;
        absl::StatusOr<JobId> id = rep->engine->Submit(std::move(spec), sink_for(next, rep));
        if (!id.ok()) return id.status();
      }
      ++next;
      continue;
    }
    step_rep->backend->SetSpanWindow(t_arr, cutoff);
    absl::StatusOr<int64_t> stepped = step_rep->engine->StepMany(cfg.decode_spans ? kMaxSpan : 1);
    if (!stepped.ok()) return stepped.status();
    ++res.step_calls;
    const EngineStats s = step_rep->engine->Stats();
    res.peak_running_threads = std::max(res.peak_running_threads, s.peak_running_threads);
    if (s.kv_blocks_total > 0) {
      res.peak_kv_fraction = std::max(
          res.peak_kv_fraction, static_cast<double>(s.peak_kv_blocks_used) / s.kv_blocks_total);
    }
  }

  for (auto& r : reps) {
    const StepTally& t = r->backend->tally();
    res.steps += t.steps;
    res.busy_seconds += t.busy;
    res.seconds_fixed += t.fixed;
    res.seconds_rows += t.rows;
    res.seconds_kv += t.kv;
    res.seconds_prefill += t.prefill;
    res.mean_batch += static_cast<double>(t.decode_rows);
    res.preemptions += r->engine->Stats().preemptions;
    res.sim_seconds = std::max(res.sim_seconds, r->clock.Seconds());
  }
  res.mean_batch = res.steps > 0 ? res.mean_batch / static_cast<double>(res.steps) : 0.0;
  res.jobs_finished = finished_jobs;
  const double inf = std::numeric_limits<double>::infinity();
  double measured_end = 0.0;
  int64_t measured_done = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const SimJob& j = jobs[i];
    if (j.failed) ++res.jobs_failed;
    if (i < warm) continue;
    if (j.done >= 0) {
      res.latency.push_back(j.done - j.arrival);
      measured_end = std::max(measured_end, j.done);
      ++measured_done;
    } else {
      res.latency.push_back(inf);
    }
    res.first_thread.push_back(j.first_thread >= 0 ? j.first_thread - j.arrival : inf);
  }
  const double start = warm < n_jobs ? arrivals[warm] : arrivals.front();
  const double span = measured_end - start;
  if (span > 0 && measured_done > 0) {
    res.jobs_per_hour = static_cast<double>(measured_done) * 3600.0 / span;
  }
  if (res.sim_seconds > 0) {
    res.threads_per_second = static_cast<double>(threads_done) / (res.sim_seconds - res.first_arrival);
    int64_t gen = 0;
    for (auto& r : reps) gen += r->engine->Stats().generation_tokens_total;
    res.tokens_per_second = static_cast<double>(gen) / (res.sim_seconds - res.first_arrival);
  }
  res.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  return res;
}

}  // namespace dmsrt
