// One job's bookkeeping on the coordinator (see job_record.h).
#include "launch/service/job_record.h"

#include <utility>

namespace dmsrt {

namespace {

Selection SelectionOf(v1::Selection s) {
  switch (s) {
    case v1::SELECTION_MAX_MEAN_LOGPROB: return Selection::kMaxMeanLogprob;
    case v1::SELECTION_FIRST_FINISHED: return Selection::kFirstFinished;
    default: return Selection::kMajorityVote;
  }
}

template <typename Message>
void AddVotes(const VoteTable& votes, Message* m) {
  for (const VoteEntry& e : votes.Sorted()) {
    v1::Vote* v = m->add_votes();
    v->set_answer(e.answer);
    v->set_votes(e.votes);
  }
}

}  // namespace

JobRecord::JobRecord(std::string id, const v1::JobRequest& request, std::string traceparent,
                     std::vector<int32_t> prompt, int32_t n, int32_t max_tokens,
                     std::shared_ptr<const std::regex> pattern, Clock::time_point start)
    : id_(std::move(id)),
      request_(request),
      traceparent_(std::move(traceparent)),
      prompt_(std::move(prompt)),
      max_tokens_(max_tokens),
      pattern_(std::move(pattern)),
      selection_(SelectionOf(request.answer().selection())),
      start_(start),
      threads_(n) {
  if (request.deadline_seconds() > 0) {
    deadline_ = start_ + std::chrono::microseconds(static_cast<int64_t>(request.deadline_seconds() * 1e6));
  }
  v1::JobEvent acc;
  acc.set_job_id(id_);
  acc.mutable_accepted()->set_n(n);
  acc.mutable_accepted()->set_prompt_tokens(static_cast<int64_t>(prompt_.size()));
  acc.mutable_accepted()->set_traceparent(traceparent_);
  events_.push_back(std::move(acc));
}

double JobRecord::SecondsAt(Clock::time_point now) const {
  return std::chrono::duration<double>(now - start_).count();
}

JobRecord::TokenTimes JobRecord::RecordTokens(const v1::JobEvent& ev, Clock::time_point now) {
  TokenTimes times;
  if (ttft_ < 0) {
    ttft_ = SecondsAt(now);
    times.time_to_first_token = ttft_;
  }
  generated_ += ev.token().token_ids_size();
  Thread& t = threads_[ev.token().thread_index()];
  if (t.has_token) times.inter_token = std::chrono::duration<double>(now - t.last_token).count();
  t.has_token = true;
  t.last_token = now;
  if (request_.stream_tokens()) events_.push_back(ev);
  return times;
}

v1::VoteUpdate JobRecord::VoteUpdate() const {
  v1::VoteUpdate vu;
  for (const VoteEntry& e : votes_.Sorted()) {
    v1::Vote* v = vu.add_table();
    v->set_answer(e.answer);
    v->set_votes(e.votes);
  }
  vu.set_finished(finished_count_);
  vu.set_running(n() - finished_count_);
  return vu;
}

bool JobRecord::RecordThreadFinished(const v1::ThreadFinished& finished) {
  const int32_t idx = finished.thread_index();
  if (done_ || idx < 0 || idx >= n()) return false;
  Thread& t = threads_[idx];
  if (t.finished) return false;
  t.finished = true;
  ++finished_count_;
  v1::ThreadFinished tf = finished;
  tf.set_replica(t.replica);
  const bool votes = tf.reason() == v1::STOP || tf.reason() == v1::STOP_STRING ||
                     tf.reason() == v1::LENGTH;
  if (votes) {
    std::optional<std::string> ans = ExtractAnswer(tf.text(), pattern_.get());
    if (ans) {
      tf.set_answer(*ans);
      tf.set_has_answer(true);
    }
    votes_.Add(ans, tf.mean_logprob());
  }
  t.result = tf;
  v1::JobEvent ev;
  ev.set_job_id(id_);
  *ev.mutable_thread_finished() = std::move(tf);
  events_.push_back(std::move(ev));
  v1::JobEvent vu;
  vu.set_job_id(id_);
  *vu.mutable_vote_update() = VoteUpdate();
  events_.push_back(std::move(vu));
  return true;
}

bool JobRecord::StopEarly() {
  const int64_t running = n() - finished_count_;
  if (!request_.answer().early_stop() || early_stopped_ || running <= 0 || !votes_.Decided(running)) {
    return false;
  }
  early_stopped_ = true;
  return true;
}

v1::JobOutcome JobRecord::Outcome(std::string* message) const {
  std::optional<std::string> sel = votes_.Select(selection_);
  bool all_failed = true;
  for (const Thread& t : threads_) {
    if (t.result.reason() != v1::ERROR && t.result.reason() != v1::PREEMPTED_FAILED) all_failed = false;
  }
  if (deadline_hit) {
    *message = "the job's deadline passed; threads still running were cancelled";
    return v1::JOB_DEADLINE_EXCEEDED;
  }
  if (cancel_requested) {
    *message = "cancelled";
    return v1::JOB_CANCELLED;
  }
  if (sel) {
    message->clear();
    return v1::JOB_SUCCEEDED;
  }
  if (all_failed) {
    *message = threads_.empty() ? "no threads" : threads_[0].result.message();
    return v1::JOB_FAILED;
  }
  *message = "no thread produced an answer";
  return v1::JOB_NO_ANSWER;
}

bool JobRecord::Finish(v1::JobOutcome outcome, const std::string& message, Clock::time_point now,
                       double* seconds) {
  if (done_) return false;
  done_ = true;
  finished_at_ = now;
  outcome_ = outcome;
  v1::JobEvent ev;
  ev.set_job_id(id_);
  v1::JobFinished* jf = ev.mutable_job_finished();
  jf->set_outcome(outcome);
  jf->set_n(n());
  jf->set_message(message);
  jf->set_early_stopped(early_stopped_);
  std::optional<std::string> sel = votes_.Select(selection_);
  if (sel) {
    jf->set_selected_answer(*sel);
    jf->set_has_answer(true);
  }
  AddVotes(votes_, jf);
  for (const Thread& t : threads_) *jf->add_threads() = t.result;
  *seconds = SecondsAt(now);
  jf->mutable_usage()->set_prompt_tokens(static_cast<int64_t>(prompt_.size()));
  jf->mutable_usage()->set_generated_tokens(generated_);
  jf->mutable_usage()->set_seconds(*seconds);
  jf->mutable_usage()->set_time_to_first_token_seconds(ttft_);
  events_.push_back(std::move(ev));
  return true;
}

void JobRecord::RecordError(const std::string& message, bool retryable) {
  v1::JobEvent err;
  err.set_job_id(id_);
  err.mutable_error()->set_message(message);
  err.mutable_error()->set_retryable(retryable);
  events_.push_back(std::move(err));
}

void JobRecord::FillStatus(v1::JobStatus* s, Clock::time_point now) const {
  s->set_job_id(id_);
  s->set_traceparent(traceparent_);
  s->set_outcome(outcome_);
  s->set_n(n());
  s->set_threads_finished(finished_count_);
  s->set_threads_running(n() - finished_count_);
  AddVotes(votes_, s);
  std::optional<std::string> sel = votes_.Select(selection_);
  if (sel) {
    s->set_selected_answer(*sel);
    s->set_has_answer(true);
  }
  s->mutable_usage()->set_prompt_tokens(static_cast<int64_t>(prompt_.size()));
  s->mutable_usage()->set_generated_tokens(generated_);
  s->mutable_usage()->set_seconds(SecondsAt(now));
  s->mutable_usage()->set_time_to_first_token_seconds(ttft_);
  for (const Thread& t : threads_) {
    if (t.finished) *s->add_threads() = t.result;
  }
}

}  // namespace dmsrt
