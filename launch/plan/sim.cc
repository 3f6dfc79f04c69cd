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
#include "launch/plan/sim_backend.h"

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

// ---- the event loop ---------------------------------------------------------------------------

namespace {

using plan_internal::kPromptToken;
using plan_internal::kSimVocab;
using plan_internal::SimBackend;
using plan_internal::SimTokenizer;
using plan_internal::StepTally;

struct SimJob {
  double arrival = 0.0;
  int64_t prompt = 0, generated = 0;  // tokens (generated: max_tokens of the job)
  int32_t n = 0;
  int32_t finished = 0;
  double first_thread = -1.0;
  double done = -1.0;
  bool failed = false;
};

// Steps one decode span may hold at most (spans end sooner at events anyway).
constexpr int64_t kMaxSpan = 1 << 20;

// A thread's blocks should grow in steps of at most this share of its footprint (see SimHeads).
constexpr double kHeadGrain = 1.0 / 32;

// Mean tokens a thread holds at its end (prompt and generated): the trace's or the
// distributions'.
double MeanThreadTokens(const Workload& w) {
  // DrawJobs refuses lengths that are not one pair per job; here only the pairs count.
  const size_t n = std::min(w.prompt_tokens.size(), w.generated_tokens.size());
  if (n == 0) return w.prompt.Mean() + w.reasoning.Mean();
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += static_cast<double>(w.prompt_tokens[i] + w.generated_tokens[i]);
  return sum / static_cast<double>(n);
}

// Simulated KV heads for a rank whose row holds `row_blocks` (layer, KV head) pairs. Under the
// forced rule each has its own flags, so a thread's blocks grow head by head as in the real
// store instead of a whole row at once, in steps of 1 / (heads x its blocks per head) of its
// footprint; each head costs its share of every step's KV bookkeeping. So: 1 where every head
// holds the same slots (no eviction, or all of it); otherwise the smallest divisor of the row
// (a simulated block then stands for a whole number of real ones) that makes that step at most
// kHeadGrain for a thread of the workload's mean length, or the largest one up to `max_heads`.
// Short threads in a tight pool need many (a best-of-16 fork of 70-token threads); threads of
// thousands of tokens need one.
int64_t SimHeads(int64_t row_blocks, const SimReplicaConfig& cfg, const Workload& w) {
  const double rate = cfg.eviction_rate;
  if (rate <= 0.0 || rate >= 1.0) return 1;
  const double tokens = MeanThreadTokens(w);
  const double window = std::min<double>(tokens, std::max(1, cfg.window));
  const double resident = window + (1.0 - rate) * (tokens - window);
  const double blocks = std::max(1.0, resident / std::max(1, cfg.block_tokens));
  const int64_t want = static_cast<int64_t>(std::ceil(1.0 / (kHeadGrain * blocks)));
  int64_t best = 1;
  for (int64_t h = 2; h <= std::min<int64_t>(cfg.max_sim_heads, row_blocks); ++h) {
    if (row_blocks % h != 0) continue;
    best = h;
    if (h >= want) break;
  }
  return want <= 1 ? 1 : best;
}

struct SimReplica {
  int32_t id = 0;
  SimClock clock;
  std::unique_ptr<SimBackend> backend;
  std::unique_ptr<Engine> engine;
  ReplicaCapacity capacity;
};

Clock::TimePoint AtSeconds(double t) {
  return Clock::TimePoint(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(t)));
}

class Simulation {
 public:
  Simulation(const SimReplicaConfig& cfg, const Workload& w, const SloStop* stop)
      : cfg_(cfg), w_(w), stop_(stop) {}
  absl::Status Build(int32_t replicas);
  absl::Status DrawJobs();
  absl::StatusOr<SimResult> Run(double cutoff_after_last_arrival);

 private:
  absl::Status Arrive(double t);
  absl::Status StepReplica(SimReplica* rep, double t_arr, double cutoff);
  EventSink SinkFor(int64_t job, SimReplica* rep);
  bool MissIsCertain(double now);
  void Summarise();

  const SimReplicaConfig& cfg_;
  const Workload& w_;
  const SloStop* stop_;
  Model model_;
  SimTokenizer tok_;
  std::vector<std::unique_ptr<SimReplica>> reps_;
  std::vector<SimJob> jobs_;
  int64_t warm_ = 0;
  int64_t next_ = 0;
  int64_t finished_jobs_ = 0, threads_done_ = 0, failed_jobs_ = 0;
  int64_t decided_ = 0, late_ = 0;  // MissIsCertain: jobs before decided_ judged, late_ of them
  SimResult res_;
};

absl::Status Simulation::Build(int32_t replicas) {
  const ModelConfig& mc = cfg_.model;
  const int64_t kv_heads_rank = mc.n_kv_heads / std::max(1, cfg_.tp);
  const int64_t row_blocks = static_cast<int64_t>(mc.n_layers) * kv_heads_rank;
  if (row_blocks < 1 || cfg_.kv_block_bytes < 1) return absl::InvalidArgumentError("bad KV geometry");
  // The simulated heads (SimHeads), each simulated block standing for `per_block` real blocks of
  // the rank (a share of its row of n_layers x local KV heads blocks).
  const int64_t heads = SimHeads(row_blocks, cfg_, w_);
  const int64_t per_block = row_blocks / heads;
  // The real pool per rank in those units; a replica's leader counts tp ranks' pools in its own
  // unit (every rank's heads), i.e. the same number of simulated blocks.
  const int64_t pool = cfg_.kv_budget_bytes / cfg_.kv_block_bytes / per_block;
  if (pool < heads) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the KV budget of %d bytes per rank holds no block row (%d blocks of %d bytes)",
        cfg_.kv_budget_bytes, row_blocks, cfg_.kv_block_bytes));
  }
  KvGeometry geo;
  geo.n_layers = 1;
  geo.n_kv_heads = static_cast<int32_t>(heads);
  geo.n_heads = static_cast<int32_t>(heads);
  geo.head_dim = mc.head_dim;
  geo.block_tokens = cfg_.block_tokens;
  KvPolicyConfig policy;
  if (cfg_.eviction_rate > 0) {
    policy.kind = KvPolicyKind::kForced;
    policy.force_rate = cfg_.eviction_rate;
    policy.window = std::max(1, cfg_.window);
    policy.seed = 7;
  }
  // The simulated model: the real shapes and context, a three-token vocabulary.
  model_.config = mc;
  model_.config.vocab = kSimVocab;
  const LengthDist* per_thread = w_.per_thread_lengths ? &w_.reasoning : nullptr;
  for (int32_t r = 0; r < replicas; ++r) {
    auto rep = std::make_unique<SimReplica>();
    rep->id = r;
    const int64_t unit_bytes = cfg_.kv_block_bytes * per_block;
    DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<KvIndex> index,
                           MakeKvIndex(geo, policy, pool * unit_bytes, unit_bytes, cfg_.dead_slots));
    rep->backend = std::make_unique<SimBackend>(std::move(index), cfg_.costs, &rep->clock, per_thread,
                                                cfg_.speed.empty() ? nullptr : &cfg_.speed);
    EngineOptions eo;
    eo.prefill_chunk = cfg_.prefill_chunk;
    eo.max_running_threads = cfg_.max_running_threads;
    eo.clock = &rep->clock;
    if (cfg_.on_step) {
      const SimClock* clock = &rep->clock;
      eo.on_step = [this, r, clock](const StepShape& shape, double seconds) {
        cfg_.on_step(r, shape, seconds, clock->Seconds());
      };
    }
    rep->engine = std::make_unique<Engine>(*rep->backend, tok_, model_, eo);
    ReplicaCapacity& c = rep->capacity;
    c.id = r;
    c.kv_policy = cfg_.eviction_rate > 0 ? "forced" : "none";
    c.kv_window = cfg_.eviction_rate > 0 ? std::max(1, cfg_.window) : 0;
    c.kv_force_rate = cfg_.eviction_rate;
    c.dead_slots = cfg_.dead_slots;
    c.kv_block_tokens = cfg_.block_tokens;
    c.blocks_per_token_dense = static_cast<int64_t>(mc.n_layers) * mc.n_kv_heads;
    c.kv_blocks_total = pool * (c.blocks_per_token_dense / heads);
    c.kv_block_bytes = cfg_.kv_block_bytes;
    reps_.push_back(std::move(rep));
  }
  return absl::OkStatus();
}

// Arrivals and lengths: the trace's, or drawn up front from one seeded stream.
absl::Status Simulation::DrawJobs() {
  std::mt19937_64 rng(w_.seed);
  std::vector<double> arrivals = w_.arrivals;
  if (arrivals.empty()) {
    std::exponential_distribution<double> gap(w_.jobs_per_hour / 3600.0);
    double t = 0.0;
    for (int64_t i = 0; i < w_.jobs; ++i) {
      t += gap(rng);
      arrivals.push_back(t);
    }
  }
  const size_t n = arrivals.size();
  const bool given = !w_.prompt_tokens.empty();
  if (given && (w_.prompt_tokens.size() != n || w_.generated_tokens.size() != n)) {
    return absl::InvalidArgumentError("a trace needs a prompt and a generated length per job");
  }
  jobs_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (i > 0 && arrivals[i] < arrivals[i - 1]) {
      return absl::InvalidArgumentError("trace arrival times must not decrease");
    }
    jobs_[i].arrival = arrivals[i];
    jobs_[i].prompt = given ? w_.prompt_tokens[i] : w_.prompt.Sample(rng);
    jobs_[i].generated = given ? w_.generated_tokens[i] : w_.reasoning.Sample(rng);
    if (jobs_[i].prompt < 1 || jobs_[i].generated < 1) {
      return absl::InvalidArgumentError("every job needs at least one prompt and one generated token");
    }
  }
  warm_ = static_cast<int64_t>(std::floor(w_.warmup_fraction * static_cast<double>(n)));
  return absl::OkStatus();
}

EventSink Simulation::SinkFor(int64_t job, SimReplica* rep) {
  return [this, job, rep](const EngineEvent& ev) {
    if (ev.kind != EngineEvent::Kind::kThreadFinished) return;
    SimJob& j = jobs_[job];
    const double now = rep->clock.Seconds();
    ++j.finished;
    ++threads_done_;
    if ((ev.reason == FinishReason::kPreemptedFailed || ev.reason == FinishReason::kError) &&
        !j.failed) {
      j.failed = true;
      ++failed_jobs_;
    }
    if (j.first_thread < 0) j.first_thread = now;
    if (rep->capacity.assigned_open > 0) --rep->capacity.assigned_open;
    if (j.finished == j.n) {
      j.done = now;
      ++finished_jobs_;
      res_.last_finish = std::max(res_.last_finish, now);
    }
  };
}

// The coordinator admits job next_ and places its threads (launch/admission.h).
absl::Status Simulation::Arrive(double t) {
  SimJob& j = jobs_[next_];
  std::vector<ReplicaCapacity> alive;
  for (auto& r : reps_) alive.push_back(r->capacity);
  AdmissionRequest ar;
  ar.prompt_tokens = j.prompt;
  ar.max_tokens = static_cast<int32_t>(w_.per_thread_lengths ? w_.reasoning.Max() : j.generated);
  ar.n = w_.n;
  ar.max_n = std::max(64, w_.n);
  DMSRT_ASSIGN_OR_RETURN(j.n, AdmitJob(ar, alive));
  std::vector<int32_t> idx(j.n);
  for (int32_t i = 0; i < j.n; ++i) idx[i] = i;
  const std::map<int32_t, std::vector<int32_t>> plan = PlaceThreads(idx, alive);
  for (auto& [rid, threads] : plan) {
    SimReplica* rep = reps_[rid].get();
    rep->capacity.assigned_open += static_cast<int64_t>(threads.size());
    rep->clock.AdvanceTo(AtSeconds(t));
    EngineJobSpec spec;
    spec.prompt.assign(static_cast<size_t>(j.prompt), kPromptToken);
    spec.thread_indices = threads;
    spec.sampling.temperature = 1.0f;
    spec.sampling.seed = w_.seed * 1000003ull + static_cast<uint64_t>(next_) * 7919ull;
    spec.max_tokens = ar.max_tokens;
    spec.ignore_eos = !w_.per_thread_lengths;
    DMSRT_RETURN_IF_ERROR(rep->engine->Submit(std::move(spec), SinkFor(next_, rep)).status());
  }
  ++next_;
  return absl::OkStatus();
}

absl::Status Simulation::StepReplica(SimReplica* rep, double t_arr, double cutoff) {
  rep->backend->SetSpanWindow(t_arr, cutoff);
  DMSRT_RETURN_IF_ERROR(rep->engine->StepMany(cfg_.decode_spans && !cfg_.on_step ? kMaxSpan : 1).status());
  ++res_.step_calls;
  const EngineStats s = rep->engine->Stats();
  res_.peak_running_threads = std::max(res_.peak_running_threads, s.peak_running_threads);
  if (s.kv_blocks_total > 0) {
    res_.peak_kv_fraction = std::max(
        res_.peak_kv_fraction, static_cast<double>(s.peak_kv_blocks_used) / s.kv_blocks_total);
  }
  return absl::OkStatus();
}

// Whether the SLO is already missed whatever happens next: a failed job, or more measured jobs
// over the SLO (finished late, or still running past it at `now`) than the percentile allows.
// Jobs are judged in arrival order; one still running within the SLO stops the scan, which can
// only delay the verdict.
bool Simulation::MissIsCertain(double now) {
  if (stop_ == nullptr) return false;
  if (failed_jobs_ > 0) return true;
  const int64_t n = static_cast<int64_t>(jobs_.size());
  const int64_t measured = n - warm_;
  const int64_t need = static_cast<int64_t>(
      std::ceil(stop_->percentile / 100.0 * static_cast<double>(measured)));
  const int64_t allowed = measured - std::clamp<int64_t>(need, 1, measured);
  decided_ = std::max(decided_, warm_);
  while (decided_ < n && decided_ < next_) {
    const SimJob& j = jobs_[decided_];
    if (j.done >= 0) {
      late_ += j.done - j.arrival > stop_->seconds ? 1 : 0;
    } else if (now - j.arrival > stop_->seconds) {
      ++late_;
    } else {
      break;
    }
    ++decided_;
  }
  return failed_jobs_ > 0 || late_ > allowed;
}

absl::StatusOr<SimResult> Simulation::Run(double cutoff_after_last_arrival) {
  const int64_t n_jobs = static_cast<int64_t>(jobs_.size());
  res_.jobs_submitted = n_jobs;
  res_.first_arrival = jobs_.front().arrival;
  res_.last_arrival = jobs_.back().arrival;
  const double cutoff = res_.last_arrival + cutoff_after_last_arrival;
  const double inf = std::numeric_limits<double>::infinity();
  for (;;) {
    // The earliest event: an arrival, or the next step of a replica with work.
    SimReplica* step_rep = nullptr;
    double t_step = inf;
    for (auto& r : reps_) {
      if (!r->engine->Idle() && r->clock.Seconds() < t_step) {
        t_step = r->clock.Seconds();
        step_rep = r.get();
      }
    }
    const double t_arr = next_ < n_jobs ? jobs_[next_].arrival : inf;
    if (step_rep == nullptr && next_ >= n_jobs) break;  // all done
    if (std::min(t_arr, t_step) > cutoff) {
      res_.complete = false;
      break;
    }
    if (MissIsCertain(std::min(t_arr, t_step))) {
      res_.complete = false;
      res_.stopped_at_miss = true;
      break;
    }
    if (t_arr <= t_step) {
      DMSRT_RETURN_IF_ERROR(Arrive(t_arr));
    } else {
      DMSRT_RETURN_IF_ERROR(StepReplica(step_rep, t_arr, cutoff));
    }
  }
  Summarise();
  return res_;
}

void Simulation::Summarise() {
  SimResult& res = res_;
  for (auto& r : reps_) {
    const StepTally& t = r->backend->tally();
    res.steps += t.steps;
    res.busy_seconds += t.busy;
    res.seconds_fixed += t.fixed;
    res.seconds_rows += t.rows;
    res.seconds_kv += t.kv;
    res.seconds_prefill += t.prefill;
    res.seconds_host += t.host;
    res.seconds_sampling += t.sampling;
    res.mean_batch += static_cast<double>(t.decode_rows);
    res.preemptions += r->engine->Stats().preemptions;
    res.sim_seconds = std::max(res.sim_seconds, r->clock.Seconds());
  }
  res.mean_batch = res.steps > 0 ? res.mean_batch / static_cast<double>(res.steps) : 0.0;
  res.jobs_finished = finished_jobs_;
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t n_jobs = static_cast<int64_t>(jobs_.size());
  double measured_end = 0.0;
  int64_t measured_done = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    const SimJob& j = jobs_[i];
    if (j.failed) ++res.jobs_failed;
    res.job_done.push_back(j.done);
    if (i < warm_) continue;
    if (j.done >= 0) {
      res.latency.push_back(j.done - j.arrival);
      measured_end = std::max(measured_end, j.done);
      ++measured_done;
    } else {
      res.latency.push_back(inf);
    }
    res.first_thread.push_back(j.first_thread >= 0 ? j.first_thread - j.arrival : inf);
  }
  const double start = warm_ < n_jobs ? jobs_[warm_].arrival : jobs_.front().arrival;
  const double span = measured_end - start;
  if (span > 0 && measured_done > 0) {
    res.jobs_per_hour = static_cast<double>(measured_done) * 3600.0 / span;
  }
  if (res.sim_seconds > 0) {
    res.threads_per_second = static_cast<double>(threads_done_) / (res.sim_seconds - res.first_arrival);
    int64_t gen = 0;
    for (auto& r : reps_) gen += r->engine->Stats().generation_tokens_total;
    res.tokens_per_second = static_cast<double>(gen) / (res.sim_seconds - res.first_arrival);
  }
}

}  // namespace

absl::StatusOr<SimResult> Simulate(const SimReplicaConfig& cfg, int32_t replicas,
                                   const Workload& w, double cutoff_after_last_arrival,
                                   const SloStop* stop) {
  const auto wall0 = std::chrono::steady_clock::now();
  if (replicas < 1) return absl::InvalidArgumentError("replicas must be >= 1");
  if (w.n < 1) return absl::InvalidArgumentError("n must be >= 1");
  if (w.jobs < 1 && w.arrivals.empty()) return absl::InvalidArgumentError("jobs must be >= 1");
  if (w.arrivals.empty() && !(w.jobs_per_hour > 0)) {
    return absl::InvalidArgumentError("the arrival rate must be > 0 jobs/h");
  }
  Simulation sim(cfg, w, stop);
  DMSRT_RETURN_IF_ERROR(sim.Build(replicas));
  DMSRT_RETURN_IF_ERROR(sim.DrawJobs());
  DMSRT_ASSIGN_OR_RETURN(SimResult res, sim.Run(cutoff_after_last_arrival));
  res.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  return res;
}

}  // namespace dmsrt
