// Coordinator implementation (see coordinator.h). Every handler takes mu_ only briefly; messages to
// replicas are collected under mu_ and written after it is released, each under its replica's own
// write mutex, so a slow stream never blocks the job table.
#include "launch/service/coordinator.h"
#include "launch/admission.h"
#include "launch/service/admission.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <regex>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "runtime/kv/kv_cache.h"

namespace dmsrt {

namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

grpc::Status Invalid(const std::string& msg) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, msg);
}

const char* OutcomeName(v1::JobOutcome o) {
  switch (o) {
    case v1::JOB_RUNNING: return "running";
    case v1::JOB_SUCCEEDED: return "succeeded";
    case v1::JOB_NO_ANSWER: return "no_answer";
    case v1::JOB_CANCELLED: return "cancelled";
    case v1::JOB_FAILED: return "failed";
    case v1::JOB_DEADLINE_EXCEEDED: return "deadline_exceeded";
    case v1::JOB_QUEUED: return "queued";
    default: return "unspecified";
  }
}

// One structured line per replica lifecycle event on stderr, for operators:
//   dmsrt coordinator: time=2026-01-02T03:04:05.678Z event=replica_lost replica=1 reason=... ...
void LogEvent(const std::string& fields) {
  const std::string line = absl::StrCat(
      "dmsrt coordinator: time=",
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()), " ", fields, "\n");
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace

void Coordinator::Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds.size() && v > bounds[i]) ++i;
  ++counts[i];
  sum += v;
  ++count;
}

Coordinator::Coordinator(const Model& model, const Tokenizer& tokenizer, CoordinatorOptions options)
    : model_(model), tok_(tokenizer), options_(std::move(options)) {
  const std::vector<double> bounds = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
  {
    absl::MutexLock lock(&mu_);
    ttft_.bounds = bounds;
    ttft_.counts.assign(bounds.size() + 1, 0);
    e2e_.bounds = bounds;
    e2e_.counts.assign(bounds.size() + 1, 0);
    itl_.bounds = {0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5};
    itl_.counts.assign(itl_.bounds.size() + 1, 0);
  }
  monitor_ = std::thread([this] { MonitorLoop(); });
}

Coordinator::~Coordinator() { Shutdown(); }

void Coordinator::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;
    shutdown_ = true;
  }
  if (monitor_.joinable()) monitor_.join();
}

grpc::Status Coordinator::CheckAuth(grpc::ServerContext* ctx) const {
  auto md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return CheckBearer(nullptr);
  const std::string v(it->second.data(), it->second.size());
  return CheckBearer(&v);
}

grpc::Status Coordinator::CheckBearer(const std::string* authorization) const {
  if (options_.auth_token.empty()) return grpc::Status::OK;
  if (authorization == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing 'authorization: Bearer <token>' metadata (the server runs with --auth-token)");
  }
  if (*authorization != "Bearer " + options_.auth_token) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the bearer token does not match");
  }
  return grpc::Status::OK;
}

std::string Coordinator::TraceParent(grpc::ServerContext* ctx) {
  auto md = ctx->client_metadata();
  auto it = md.find("traceparent");
  if (it == md.end()) return "";
  std::string v(it->second.data(), it->second.size());
  // version-traceid-parentid-flags: 2-32-16-2 lowercase hex digits (W3C Trace Context).
  static const std::regex kForm("^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$");
  return std::regex_match(v, kForm) ? v : "";
}

grpc::Status Coordinator::CreateJob(const v1::JobRequest& req, const std::string& traceparent,
                                    std::string* id, int32_t* n_out) {
  // ---- field validation -------------------------------------------------------------------
  std::string rendered;
  int32_t max_tokens = 0;
  std::shared_ptr<const std::regex> pattern;
  if (absl::Status s = ValidateJobRequest(req, model_.tokenizer, options_, &rendered, &max_tokens,
                                          &pattern);
      !s.ok()) {
    return ToGrpcStatus(s);
  }
  const int64_t budget = req.kv().kv_budget_bytes();

  // ---- tokenize -------------------------------------------------------------------------------
  std::vector<int32_t> prompt = tok_.Encode(rendered, /*parse_special=*/true,
                                            /*add_bos=*/model_.tokenizer.add_bos);
  if (prompt.empty()) return Invalid("the prompt tokenizes to nothing: send some text");
  const int64_t ctx_len = model_.config.max_positions;
  if (ctx_len > 0 && static_cast<int64_t>(prompt.size()) + max_tokens > ctx_len) {
    return Invalid(absl::StrFormat(
        "the prompt is %d tokens; with max_tokens %d it exceeds the model context of %d tokens: "
        "shorten the prompt or lower stopping.max_tokens",
        prompt.size(), max_tokens, ctx_len));
  }

  std::vector<Outgoing> out;
  {
    absl::MutexLock lock(&mu_);
    // ---- capacity ---------------------------------------------------------------------------------
    std::vector<ReplicaCapacity> alive = AliveCapacities();
    AdmissionRequest ar;
    ar.prompt_tokens = static_cast<int64_t>(prompt.size());
    ar.max_tokens = max_tokens;
    ar.n = req.n();
    ar.kv_budget_bytes = budget;
    ar.policy = PolicyNameOf(req.dms().policy());
    ar.max_n = options_.max_n;
    absl::StatusOr<int32_t> admitted = AdmitJob(ar, alive);
    if (!admitted.ok()) return ToGrpcStatus(admitted.status());
    const int32_t n = *admitted;

    // Forget the oldest finished jobs beyond the retention count (only those finished a while
    // ago, so a watcher still draining one never loses it).
    {
      int64_t finished = 0;
      for (auto& [jid, j] : jobs_) finished += j->done() ? 1 : 0;
      const auto now = Clock::now();
      for (auto it = jobs_.begin(); it != jobs_.end() && finished > options_.keep_finished_jobs;) {
        if (it->second->done() && now - it->second->finished_at() > std::chrono::seconds(60)) {
          it = jobs_.erase(it);
          --finished;
        } else {
          ++it;
        }
      }
    }
    auto job = std::make_unique<JobRecord>(absl::StrCat("job-", next_job_++), req, traceparent,
                                           std::move(prompt), n, max_tokens, pattern, Clock::now());
    std::vector<int32_t> all(n);
    for (int32_t i = 0; i < n; ++i) all[i] = i;
    JobRecord& ref = *job;
    *id = job->id();
    *n_out = n;
    jobs_[job->id()] = std::move(job);
    AssignThreads(ref, all, &out);
  }
  Send(out);
  return grpc::Status::OK;
}

bool Coordinator::AssignThreads(JobRecord& job, const std::vector<int32_t>& indices,
                                std::vector<Outgoing>* out) {
  std::vector<ReplicaCapacity> alive = AliveCapacities();
  if (alive.empty()) return false;
  const std::map<int32_t, std::vector<int32_t>> plan = PlaceThreads(indices, alive);
  for (auto& [rid, idxs] : plan) {
    replicas_[rid]->assigned_open += static_cast<int64_t>(idxs.size());
    for (int32_t t : idxs) job.threads()[t].replica = rid;
  }
  for (auto& [rid, idxs] : plan) {
    Outgoing o;
    o.replica = replicas_[rid];
    v1::ThreadAssignment* a = o.msg.mutable_assign();
    a->set_job_id(job.id());
    for (int32_t t : job.prompt()) a->add_prompt_tokens(t);
    for (int32_t t : idxs) a->add_thread_indices(t);
    *a->mutable_sampling() = job.request().sampling();
    a->set_max_tokens(job.max_tokens());
    for (const std::string& s : job.request().stopping().stop()) a->add_stop(s);
    a->set_ignore_eos(job.request().stopping().ignore_eos());
    a->set_stream_tokens(true);
    a->set_traceparent(job.traceparent());
    a->set_top_logprobs(job.request().response().top_logprobs());
    out->push_back(std::move(o));
  }
  return true;
}

std::vector<ReplicaCapacity> Coordinator::AliveCapacities() const {
  std::vector<ReplicaCapacity> alive;
  for (auto& [rid, r] : replicas_) {
    if (r->alive) alive.push_back(CapacityOf(r->id, r->info, r->stats, r->assigned_open));
  }
  return alive;
}

void Coordinator::Send(std::vector<Outgoing>& out) {
  for (Outgoing& o : out) {
    bool ok = false;
    {
      absl::MutexLock wl(&o.replica->write_mu);
      if (o.replica->open && o.replica->stream != nullptr) ok = o.replica->stream->Write(o.msg);
    }
    (void)ok;  // a broken stream ends its Connect handler, which reassigns the threads
  }
  out.clear();
}

void Coordinator::CancelRemaining(JobRecord& job, std::vector<Outgoing>* out) {
  std::set<int32_t> replicas;
  for (size_t i = 0; i < job.threads().size(); ++i) {
    const JobRecord::Thread& ts = job.threads()[i];
    if (ts.finished) continue;
    auto it = replicas_.find(ts.replica);
    if (ts.replica < 0 || it == replicas_.end() || !it->second->alive) {
      v1::ThreadFinished tf;
      tf.set_thread_index(static_cast<int32_t>(i));
      tf.set_reason(v1::CANCELLED);
      tf.set_message("cancelled before a replica ran it");
      OnThreadFinished(job, tf, out);
      if (job.done()) return;
      continue;
    }
    replicas.insert(ts.replica);
  }
  for (int32_t rid : replicas) {
    Outgoing o;
    o.replica = replicas_[rid];
    o.msg.mutable_cancel()->set_job_id(job.id());
    o.msg.mutable_cancel()->set_thread_index(-1);
    out->push_back(std::move(o));
  }
}

void Coordinator::OnThreadFinished(JobRecord& job, const v1::ThreadFinished& tf,
                                   std::vector<Outgoing>* out) {
  const int32_t idx = tf.thread_index();
  if (job.done() || idx < 0 || idx >= job.n() || job.threads()[idx].finished) return;
  auto rit = replicas_.find(job.threads()[idx].replica);
  if (rit != replicas_.end() && rit->second->assigned_open > 0) --rit->second->assigned_open;
  job.RecordThreadFinished(tf);
  if (job.StopEarly()) {
    CancelRemaining(job, out);
    if (job.done()) return;
  }
  if (job.AllFinished()) {
    std::string msg;
    const v1::JobOutcome outcome = job.Outcome(&msg);
    FinishJob(job, outcome, msg);
  }
}

void Coordinator::FinishJob(JobRecord& job, v1::JobOutcome outcome, const std::string& message) {
  double secs = 0;
  if (!job.Finish(outcome, message, Clock::now(), &secs)) return;
  ++outcomes_[OutcomeName(outcome)];
  e2e_.Observe(secs);
}

grpc::Status Coordinator::SubmitJob(grpc::ServerContext* ctx, const v1::JobRequest* req,
                                    v1::SubmitJobResponse* resp) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  std::string id;
  int32_t n = 0;
  grpc::Status s = CreateJob(*req, TraceParent(ctx), &id, &n);
  if (!s.ok()) return s;
  resp->set_job_id(id);
  resp->set_n(n);
  return grpc::Status::OK;
}

namespace {
struct WatchArg {
  const std::vector<v1::JobEvent>* events;
  size_t next;
  const bool* shutdown;
};
bool WatchReady(WatchArg* a) { return a->events->size() > a->next || *a->shutdown; }
}  // namespace

grpc::Status Coordinator::Follow(const std::string& id, JobEventSink& sink,
                                 bool cancel_on_disconnect) {
  size_t next = 0;
  for (;;) {
    std::vector<v1::JobEvent> batch;
    bool done = false;
    v1::JobOutcome outcome = v1::JOB_RUNNING;
    {
      absl::MutexLock lock(&mu_);
      auto it = jobs_.find(id);
      if (it == jobs_.end()) {
        return grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("no job '", id, "': list jobs with ListJobs"));
      }
      const JobRecord& job = *it->second;
      WatchArg arg{&job.events(), next, &shutdown_};
      mu_.AwaitWithTimeout(absl::Condition(&WatchReady, &arg), absl::Milliseconds(200));
      for (size_t i = next; i < job.events().size(); ++i) batch.push_back(job.events()[i]);
      next = job.events().size();
      done = job.done();
      outcome = job.outcome();
      if (shutdown_ && !done) {
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
      }
    }
    bool broken = sink.Gone();
    for (const v1::JobEvent& e : batch) {
      if (broken) break;
      if (!sink.Write(e)) broken = true;
    }
    if (broken) {
      if (cancel_on_disconnect) {
        std::vector<Outgoing> out;
        {
          absl::MutexLock lock(&mu_);
          auto it = jobs_.find(id);
          if (it != jobs_.end() && !it->second->done()) {
            it->second->cancel_requested = true;
            CancelRemaining(*it->second, &out);
          }
        }
        Send(out);
      }
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the call; the job was cancelled");
    }
    if (done) {
      if (outcome == v1::JOB_DEADLINE_EXCEEDED) {
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                            "the job's deadline passed; partial results are in the final event");
      }
      if (outcome == v1::JOB_CANCELLED) {
        return grpc::Status(grpc::StatusCode::CANCELLED, "the job was cancelled");
      }
      return grpc::Status::OK;
    }
  }
}

grpc::Status Coordinator::WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                                   grpc::ServerWriter<v1::JobEvent>* writer) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  if (req->job_id().empty()) return Invalid("job_id is empty: pass the id SubmitJob returned");
  GrpcEventSink sink(ctx, writer);
  return Follow(req->job_id(), sink, /*cancel_on_disconnect=*/true);
}

grpc::Status Coordinator::RunJob(grpc::ServerContext* ctx, const v1::JobRequest* req,
                                 grpc::ServerWriter<v1::JobEvent>* writer) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  std::string id;
  int32_t n = 0;
  grpc::Status s = CreateJob(*req, TraceParent(ctx), &id, &n);
  if (!s.ok()) return s;
  GrpcEventSink sink(ctx, writer);
  return Follow(id, sink, /*cancel_on_disconnect=*/true);
}

grpc::Status Coordinator::GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                                 v1::JobStatus* resp) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(req->job_id());
  if (it == jobs_.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("no job '", req->job_id(), "': list jobs with ListJobs"));
  }
  it->second->FillStatus(resp, Clock::now());
  return grpc::Status::OK;
}

grpc::Status Coordinator::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                                    v1::CancelJobResponse* resp) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  std::vector<Outgoing> out;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(req->job_id());
    if (it == jobs_.end()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("no job '", req->job_id(), "': list jobs with ListJobs"));
    }
    JobRecord& job = *it->second;
    if (job.done()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("job '", job.id(), "' already finished (", OutcomeName(job.outcome()), ")"));
    }
    if (req->has_thread_index()) {
      const int32_t t = req->thread_index();
      if (t < 0 || t >= job.n()) {
        return Invalid(absl::StrFormat("thread_index %d is outside 0..%d", t, job.n() - 1));
      }
      const JobRecord::Thread& ts = job.threads()[t];
      if (ts.finished) {
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            absl::StrFormat("thread %d of job '%s' already finished", t, job.id()));
      }
      auto rit = replicas_.find(ts.replica);
      if (rit == replicas_.end() || !rit->second->alive) {
        v1::ThreadFinished tf;
        tf.set_thread_index(t);
        tf.set_reason(v1::CANCELLED);
        OnThreadFinished(job, tf, &out);
      } else {
        Outgoing o;
        o.replica = rit->second;
        o.msg.mutable_cancel()->set_job_id(job.id());
        o.msg.mutable_cancel()->set_thread_index(t);
        out.push_back(std::move(o));
      }
    } else {
      job.cancel_requested = true;
      CancelRemaining(job, &out);
    }
  }
  Send(out);
  return grpc::Status::OK;
}

grpc::Status Coordinator::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                                   v1::ListJobsResponse* resp) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  absl::MutexLock lock(&mu_);
  for (auto& [id, job] : jobs_) {
    if (job->done() && !req->include_finished()) continue;
    v1::JobStatus* s = resp->add_jobs();
    job->FillStatus(s, Clock::now());
    s->clear_threads();
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::GetClusterStatus(grpc::ServerContext* ctx,
                                           const v1::GetClusterStatusRequest* req,
                                           v1::ClusterStatus* resp) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  absl::MutexLock lock(&mu_);
  resp->set_model(model_.config.name);
  for (auto& [rid, r] : replicas_) {
    v1::ReplicaStatus* rs = resp->add_replicas();
    rs->set_replica(rid);
    rs->set_state(r->alive ? "ready" : "lost");
    rs->set_tp(r->info.tp());
    rs->set_running_threads(r->stats.running_threads());
    rs->set_queued_threads(r->stats.waiting_threads());
    rs->set_tokens_per_second(r->stats.tokens_per_second());
    rs->set_preemptions(r->stats.preemptions());
    rs->set_kv_policy(r->info.kv_policy());
    rs->set_kv_window(r->info.kv_window());
    rs->set_kv_force_rate(r->info.kv_force_rate());
    rs->set_dms_expected_eviction_rate(r->info.dms_expected_eviction_rate());
    rs->set_peak_running_threads(r->stats.peak_running_threads());
    rs->set_last_heartbeat_age_seconds(SecondsSince(r->last_heartbeat));
    rs->set_stats_age_seconds(SecondsSince(r->stats_at));
    v1::RankStatus* k = rs->add_ranks();
    k->set_rank(0);
    k->set_kv_blocks_total(r->stats.kv_blocks_total());
    k->set_kv_blocks_used(r->stats.kv_blocks_used());
    k->set_kv_blocks_free(r->stats.kv_blocks_free());
    const int64_t per = std::max<int64_t>(1, r->info.blocks_per_token_dense());
    k->set_kv_tokens_capacity(r->stats.kv_blocks_total() / per * r->info.kv_block_tokens());
    k->set_kv_block_bytes(r->info.kv_block_bytes());
    k->set_logical_tokens(r->stats.logical_tokens());
    k->set_resident_tokens(r->stats.resident_tokens());
    k->set_cache_cr(r->stats.cache_cr());
    k->set_peak_kv_blocks_used(r->stats.peak_kv_blocks_used());
    if (r->alive) {
      resp->set_kv_blocks_total(resp->kv_blocks_total() + r->stats.kv_blocks_total());
      resp->set_kv_blocks_used(resp->kv_blocks_used() + r->stats.kv_blocks_used());
      resp->set_running_threads(resp->running_threads() + r->stats.running_threads());
      resp->set_queued_threads(resp->queued_threads() + r->stats.waiting_threads());
    }
  }
  for (auto& [id, job] : jobs_) {
    if (job->done()) continue;
    if (job->generated() > 0) {
      resp->set_jobs_running(resp->jobs_running() + 1);
    } else {
      resp->set_jobs_queued(resp->jobs_queued() + 1);
    }
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::Connect(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::ReplicaMessage>* stream) {
  grpc::Status a = CheckAuth(ctx);
  if (!a.ok()) return a;
  v1::ReplicaMessage m;
  if (!stream->Read(&m) || m.msg_case() != v1::ReplicaMessage::kRegister) {
    return Invalid("a replica must send `register` first");
  }
  auto rep = std::make_shared<Replica>();
  {
    absl::MutexLock lock(&mu_);
    rep->id = m.register_().replica();
    // Replicas started by separate launches (not one mpirun world) all call themselves 0: give a
    // newcomer whose index is taken by a live replica the next free one.
    if (replicas_.count(rep->id) && replicas_[rep->id]->alive) {
      rep->id = replicas_.rbegin()->first + 1;
    }
    rep->info = m.register_();
    rep->info.set_replica(rep->id);
    rep->stats.set_kv_blocks_total(rep->info.kv_blocks_total());
    rep->stats.set_kv_blocks_free(rep->info.kv_blocks_total());
    rep->last_heartbeat = Clock::now();
    rep->stats_at = rep->last_heartbeat;
    {
      absl::MutexLock wl(&rep->write_mu);
      rep->stream = stream;
      rep->open = true;
    }
    replicas_[rep->id] = rep;
    LogEvent(absl::StrFormat(
        "event=replica_joined replica=%d peer=%s tp=%d kv_policy=%s kv_blocks=%d kv_block_bytes=%d",
        rep->id, ctx->peer(), rep->info.tp(), rep->info.kv_policy(), rep->info.kv_blocks_total(),
        rep->info.kv_block_bytes()));
  }
  while (stream->Read(&m)) {
    std::vector<Outgoing> out;
    {
      absl::MutexLock lock(&mu_);
      rep->last_heartbeat = Clock::now();
      if (!rep->alive) break;
      switch (m.msg_case()) {
        case v1::ReplicaMessage::kHeartbeat:
          rep->stats = m.heartbeat();
          rep->stats_at = rep->last_heartbeat;
          break;
        case v1::ReplicaMessage::kProgress:
          OnProgress(rep->id, m.progress(), &out);
          break;
        case v1::ReplicaMessage::kRejected: {
          auto it = jobs_.find(m.rejected().job_id());
          if (it == jobs_.end()) break;
          for (int32_t t : m.rejected().thread_indices()) {
            v1::ThreadFinished tf;
            tf.set_thread_index(t);
            tf.set_reason(v1::ERROR);
            tf.set_message(m.rejected().message());
            OnThreadFinished(*it->second, tf, &out);
          }
          break;
        }
        default:
          break;
      }
    }
    Send(out);
  }
  {
    absl::MutexLock wl(&rep->write_mu);
    rep->open = false;
    rep->stream = nullptr;
  }
  ReplicaLost(rep->id, ctx->IsCancelled() ? "stream_cancelled" : "stream_closed");
  return grpc::Status::OK;
}

void Coordinator::OnProgress(int32_t replica, const v1::JobEvent& ev, std::vector<Outgoing>* out) {
  auto it = jobs_.find(ev.job_id());
  if (it == jobs_.end() || it->second->done()) return;
  JobRecord& job = *it->second;
  // Only the replica the thread is placed on speaks for it (a lost replica's late events do not).
  const int32_t t = ev.has_token() ? ev.token().thread_index() : ev.thread_finished().thread_index();
  if (t < 0 || t >= job.n() || job.threads()[t].replica != replica) return;
  if (ev.has_token()) {
    const JobRecord::TokenTimes times = job.RecordTokens(ev, Clock::now());
    if (times.time_to_first_token >= 0) ttft_.Observe(times.time_to_first_token);
    if (times.inter_token >= 0) itl_.Observe(times.inter_token);
  } else if (ev.has_thread_finished()) {
    OnThreadFinished(job, ev.thread_finished(), out);
  }
}

void Coordinator::ReplicaLost(int32_t replica_id, const char* reason) {
  std::vector<Outgoing> out;
  {
    absl::MutexLock lock(&mu_);
    auto rit = replicas_.find(replica_id);
    if (rit == replicas_.end() || !rit->second->alive) return;
    LogEvent(absl::StrFormat("event=replica_lost replica=%d reason=%s open_threads=%d", replica_id,
                             reason, rit->second->assigned_open));
    rit->second->alive = false;
    rit->second->assigned_open = 0;
    for (auto& [id, job] : jobs_) {
      if (job->done()) continue;
      std::vector<int32_t> orphans;
      std::vector<JobRecord::Thread>& threads = job->threads();
      for (size_t i = 0; i < threads.size(); ++i) {
        if (!threads[i].finished && threads[i].replica == replica_id) {
          orphans.push_back(static_cast<int32_t>(i));
          threads[i].replica = -1;
        }
      }
      if (orphans.empty()) continue;
      if (job->cancel_requested || job->deadline_hit || job->early_stopped() ||
          !AssignThreads(*job, orphans, &out)) {
        job->RecordError(absl::StrFormat("replica %d was lost and no other replica can take its %d threads",
                                         replica_id, orphans.size()),
                         /*retryable=*/true);
        for (int32_t t : orphans) {
          v1::ThreadFinished tf;
          tf.set_thread_index(t);
          tf.set_reason(job->cancel_requested || job->early_stopped() ? v1::CANCELLED : v1::ERROR);
          tf.set_message(absl::StrCat("replica ", replica_id, " was lost"));
          OnThreadFinished(*job, tf, &out);
          if (job->done()) break;
        }
        LogEvent(absl::StrFormat("event=threads_failed job=%s from_replica=%d threads=%d", job->id(),
                                 replica_id, orphans.size()));
      } else {
        lost_replica_preemptions_ += static_cast<int64_t>(orphans.size());
        std::string to;
        for (int32_t t : orphans) {
          absl::StrAppend(&to, to.empty() ? "" : ",", threads[t].replica);
        }
        LogEvent(absl::StrFormat(
            "event=threads_rerun job=%s from_replica=%d threads=%d to_replicas=%s", job->id(),
            replica_id, orphans.size(), to));
      }
    }
  }
  Send(out);
}

void Coordinator::MonitorLoop() {
  for (;;) {
    std::vector<Outgoing> out;
    std::vector<int32_t> stale;
    {
      absl::MutexLock lock(&mu_);
      if (shutdown_) break;
      const auto now = Clock::now();
      for (auto& [id, job] : jobs_) {
        if (job->done() || job->deadline_hit || !job->deadline() || now < *job->deadline()) continue;
        job->deadline_hit = true;
        CancelRemaining(*job, &out);
      }
      for (auto& [rid, r] : replicas_) {
        if (r->alive && std::chrono::duration<double>(now - r->last_heartbeat).count() >
                            options_.replica_timeout_seconds) {
          stale.push_back(rid);
        }
      }
    }
    Send(out);
    for (int32_t rid : stale) ReplicaLost(rid, "heartbeat_timeout");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::string Coordinator::MetricsText() {
  absl::MutexLock lock(&mu_);
  int64_t running = 0, waiting = 0, total = 0, used = 0, preempt = 0, prompt = 0, gen = 0;
  int64_t logical = 0, resident = 0, flagged = 0;
  for (auto& [rid, r] : replicas_) {
    const v1::ReplicaStats& s = r->stats;
    prompt += s.prompt_tokens_total();
    gen += s.generation_tokens_total();
    preempt += s.preemptions();
    if (!r->alive) continue;
    running += s.running_threads();
    waiting += s.waiting_threads();
    total += s.kv_blocks_total();
    used += s.kv_blocks_used();
    logical += s.logical_tokens();
    resident += s.resident_tokens();
    flagged += s.flagged_tokens();
  }
  int64_t jobs_running = 0;
  for (auto& [id, job] : jobs_) jobs_running += job->done() ? 0 : 1;
  std::string o;
  auto gauge = [&](const char* name, const char* help, double v) {
    absl::StrAppendFormat(&o, "# HELP dmsrt:%s %s\n# TYPE dmsrt:%s gauge\ndmsrt:%s %.17g\n", name,
                          help, name, name, v);
  };
  auto counter = [&](const char* name, const char* help, double v) {
    absl::StrAppendFormat(&o, "# HELP dmsrt:%s %s\n# TYPE dmsrt:%s counter\ndmsrt:%s %.17g\n", name,
                          help, name, name, v);
  };
  gauge("num_requests_running", "Threads (sequences) holding KV on the replicas.", running);
  gauge("num_requests_waiting", "Threads queued on the replicas (new or preempted).", waiting);
  gauge("num_jobs_running", "Jobs accepted and not finished.", jobs_running);
  gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1) over live replicas.",
        total > 0 ? static_cast<double>(used) / total : 0.0);
  gauge("kv_blocks_total", "KV blocks over live replicas.", total);
  gauge("kv_blocks_used", "KV blocks in use over live replicas.", used);
  counter("num_preemptions_total", "Threads preempted for recompute.", preempt);
  counter("prompt_tokens_total", "Prompt tokens prefilled.", prompt);
  counter("generation_tokens_total", "Tokens generated.", gen);
  gauge("kv_logical_tokens", "Tokens a dense cache would hold (summed over layers and heads).", logical);
  gauge("kv_resident_tokens", "Tokens held in the KV cache (summed over layers and heads).", resident);
  gauge("kv_evicted_tokens", "Logical minus resident tokens.", logical - resident);
  gauge("kv_flagged_tokens", "Tokens flagged for eviction.", flagged);
  gauge("kv_cache_cr", "Cache compression ratio: logical / resident tokens.",
        resident > 0 ? static_cast<double>(logical) / resident : 1.0);
  auto hist = [&](const char* name, const char* help, const Histogram& h) {
    absl::StrAppendFormat(&o, "# HELP dmsrt:%s %s\n# TYPE dmsrt:%s histogram\n", name, help, name);
    int64_t cum = 0;
    for (size_t i = 0; i < h.bounds.size(); ++i) {
      cum += h.counts[i];
      absl::StrAppendFormat(&o, "dmsrt:%s_bucket{le=\"%g\"} %d\n", name, h.bounds[i], cum);
    }
    cum += h.counts.back();
    absl::StrAppendFormat(&o, "dmsrt:%s_bucket{le=\"+Inf\"} %d\ndmsrt:%s_sum %.17g\ndmsrt:%s_count %d\n",
                          name, cum, name, h.sum, name, h.count);
  };
  hist("time_to_first_token_seconds", "Time from submission to the first generated token of a job.", ttft_);
  hist("e2e_request_latency_seconds", "Time from submission to the end of a job.", e2e_);
  hist("inter_token_latency_seconds",
       "Time between consecutive tokens of one thread, as seen by the coordinator.", itl_);
  absl::StrAppend(&o, "# HELP dmsrt:jobs_total Finished jobs by outcome.\n# TYPE dmsrt:jobs_total counter\n");
  for (const char* oc : {"succeeded", "no_answer", "cancelled", "failed", "deadline_exceeded"}) {
    auto it = outcomes_.find(oc);
    absl::StrAppendFormat(&o, "dmsrt:jobs_total{outcome=\"%s\"} %d\n", oc,
                          it == outcomes_.end() ? 0 : it->second);
  }
  int64_t alive = 0;
  for (auto& [rid, r] : replicas_) alive += r->alive ? 1 : 0;
  gauge("replicas_ready", "Replicas registered and alive.", alive);
  gauge("replicas_lost", "Replicas whose stream broke or whose heartbeats stopped.",
        static_cast<double>(replicas_.size()) - alive);
  counter("threads_reassigned_total", "Threads moved to another replica after theirs was lost.",
          lost_replica_preemptions_);
  absl::StrAppend(&o,
                  "# HELP dmsrt:replica_info Live replicas (value 1): tensor-parallel degree and KV "
                  "policy.\n# TYPE dmsrt:replica_info gauge\n");
  for (auto& [rid, r] : replicas_) {
    if (!r->alive) continue;
    absl::StrAppendFormat(&o, "dmsrt:replica_info{replica=\"%d\",tp=\"%d\",kv_policy=\"%s\"} 1\n",
                          rid, r->info.tp(), r->info.kv_policy());
  }
  return o;
}

}  // namespace dmsrt
