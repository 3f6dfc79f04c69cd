// Replica agent (see replica_agent.h).
#include "launch/service/replica_agent.h"

#include <chrono>
#include <iostream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"

namespace dmsrt {

namespace {

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return v1::STOP;
    case FinishReason::kStopString: return v1::STOP_STRING;
    case FinishReason::kLength: return v1::LENGTH;
    case FinishReason::kCancelled: return v1::CANCELLED;
    case FinishReason::kPreemptedFailed: return v1::PREEMPTED_FAILED;
    case FinishReason::kError: return v1::ERROR;
  }
  return v1::ERROR;
}

}  // namespace

ReplicaAgent::ReplicaAgent(Engine& engine, v1::ReplicaInfo info, std::string address,
                           std::shared_ptr<grpc::ChannelCredentials> credentials,
                           std::string auth_token)
    : engine_(engine),
      info_(std::move(info)),
      address_(std::move(address)),
      credentials_(std::move(credentials)),
      auth_token_(std::move(auth_token)) {}

void ReplicaAgent::Push(v1::ReplicaMessage m) {
  absl::MutexLock lock(&mu_);
  outbox_.push_back(std::move(m));
}

v1::ReplicaStats ReplicaAgent::Heartbeat() const {
  EngineStats s = engine_.Stats();
  v1::ReplicaStats h;
  h.set_running_threads(s.running_threads);
  h.set_waiting_threads(s.waiting_threads);
  h.set_kv_blocks_total(s.kv_blocks_total);
  h.set_kv_blocks_free(s.kv_blocks_free);
  h.set_kv_blocks_used(s.kv_blocks_used);
  h.set_logical_tokens(s.logical_tokens);
  h.set_resident_tokens(s.resident_tokens);
  h.set_flagged_tokens(s.flagged_tokens);
  h.set_cache_cr(s.cache_cr);
  h.set_eviction_rate(s.eviction_rate);
  h.set_tokens_per_second(s.tokens_per_second);
  h.set_preemptions(s.preemptions);
  h.set_prompt_tokens_total(s.prompt_tokens_total);
  h.set_generation_tokens_total(s.generation_tokens_total);
  h.set_peak_running_threads(s.peak_running_threads);
  h.set_peak_kv_blocks_used(s.peak_kv_blocks_used);
  return h;
}

void ReplicaAgent::HandleAssign(const v1::ThreadAssignment& a) {
  EngineJobSpec spec;
  spec.prompt.assign(a.prompt_tokens().begin(), a.prompt_tokens().end());
  spec.thread_indices.assign(a.thread_indices().begin(), a.thread_indices().end());
  spec.sampling.temperature = a.sampling().temperature();
  spec.sampling.top_k = a.sampling().top_k();
  spec.sampling.top_p = a.sampling().top_p() > 0 ? a.sampling().top_p() : 1.0f;
  spec.sampling.min_p = a.sampling().min_p();
  spec.sampling.seed = a.sampling().seed();
  spec.max_tokens = a.max_tokens();
  spec.stop.assign(a.stop().begin(), a.stop().end());
  spec.ignore_eos = a.ignore_eos();
  spec.top_logprobs = a.top_logprobs();
  const std::string job_id = a.job_id();
  const bool stream_tokens = a.stream_tokens();
  auto sink = [this, job_id, stream_tokens](const EngineEvent& ev) {
    v1::ReplicaMessage m;
    v1::JobEvent* je = m.mutable_progress();
    je->set_job_id(job_id);
    switch (ev.kind) {
      case EngineEvent::Kind::kTokens: {
        if (!stream_tokens) return;
        v1::TokenDelta* t = je->mutable_token();
        t->set_thread_index(ev.thread_index);
        t->set_text(ev.text);
        for (int32_t id : ev.token_ids) t->add_token_ids(id);
        for (float lp : ev.logprobs) t->add_logprobs(lp);
        for (const std::vector<TokenLogprob>& listing : ev.top_logprobs) {
          v1::TopLogprobs* l = t->add_top_logprobs();
          for (const TokenLogprob& e : listing) {
            v1::TopLogprob* x = l->add_entries();
            x->set_token_id(e.token);
            x->set_text(engine_.tokenizer().TokenBytes(e.token));
            x->set_logprob(e.logprob);
          }
        }
        break;
      }
      case EngineEvent::Kind::kThreadFinished: {
        v1::ThreadFinished* f = je->mutable_thread_finished();
        f->set_thread_index(ev.thread_index);
        f->set_reason(ToProto(ev.reason));
        f->set_tokens(ev.generated_tokens);
        f->set_cache_cr(ev.cache_cr);
        f->set_mean_logprob(ev.mean_logprob);
        f->set_text(ev.text);
        f->set_message(ev.message);
        f->set_replica(info_.replica());
        break;
      }
      case EngineEvent::Kind::kJobFinished: {
        absl::MutexLock lock(&mu_);
        for (auto it = jobs_.lower_bound(job_id); it != jobs_.end() && it->first == job_id;) {
          if (it->second == ev.job) {
            it = jobs_.erase(it);
          } else {
            ++it;
          }
        }
        return;
      }
    }
    Push(std::move(m));
  };
  absl::StatusOr<JobId> id = engine_.Submit(std::move(spec), sink);
  if (!id.ok()) {
    v1::ReplicaMessage m;
    m.mutable_rejected()->set_job_id(job_id);
    m.mutable_rejected()->set_message(std::string(id.status().message()));
    for (int32_t t : a.thread_indices()) m.mutable_rejected()->add_thread_indices(t);
    Push(std::move(m));
    return;
  }
  absl::MutexLock lock(&mu_);
  jobs_.emplace(job_id, *id);
}

void ReplicaAgent::HandleCancel(const v1::ThreadCancel& c) {
  std::vector<JobId> ids;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = jobs_.lower_bound(c.job_id()); it != jobs_.end() && it->first == c.job_id(); ++it) {
      ids.push_back(it->second);
    }
  }
  for (JobId id : ids) engine_.Cancel(id, c.thread_index()).IgnoreError();
}

void ReplicaAgent::CancelAll() {
  std::vector<JobId> ids;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [k, v] : jobs_) ids.push_back(v);
    jobs_.clear();
    outbox_.clear();
  }
  for (JobId id : ids) engine_.Cancel(id).IgnoreError();
}

void ReplicaAgent::Run(const std::atomic<bool>* stop) {
  while (!stop->load()) {
    auto channel = grpc::CreateChannel(address_, credentials_);
    auto stub = v1::ReplicaService::NewStub(channel);
    grpc::ClientContext ctx;
    if (!auth_token_.empty()) ctx.AddMetadata("authorization", "Bearer " + auth_token_);
    auto stream = stub->Connect(&ctx);
    v1::ReplicaMessage reg;
    *reg.mutable_register_() = info_;
    if (!stream->Write(reg)) {
      ctx.TryCancel();
      stream->Finish().IgnoreError();
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      continue;
    }
    std::atomic<bool> broken{false};
    std::thread reader([&] {
      v1::CoordinatorMessage m;
      while (stream->Read(&m)) {
        if (m.has_assign()) HandleAssign(m.assign());
        if (m.has_cancel()) HandleCancel(m.cancel());
      }
      broken = true;
    });
    auto last_hb = std::chrono::steady_clock::now() - std::chrono::seconds(1);
    while (!stop->load() && !broken.load()) {
      std::deque<v1::ReplicaMessage> batch;
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(
                                 +[](std::deque<v1::ReplicaMessage>* q) { return !q->empty(); },
                                 &outbox_),
                             absl::Milliseconds(100));
        batch.swap(outbox_);
      }
      bool ok = true;
      for (v1::ReplicaMessage& m : batch) {
        if (!stream->Write(m)) {
          ok = false;
          break;
        }
      }
      const auto now = std::chrono::steady_clock::now();
      if (ok && now - last_hb > std::chrono::milliseconds(250)) {
        v1::ReplicaMessage hb;
        *hb.mutable_heartbeat() = Heartbeat();
        ok = stream->Write(hb);
        last_hb = now;
      }
      if (!ok) break;
    }
    ctx.TryCancel();
    reader.join();
    stream->Finish().IgnoreError();
    CancelAll();
    if (!stop->load()) std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

}  // namespace dmsrt
