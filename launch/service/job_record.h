// One job's bookkeeping on the coordinator: what was asked, where each thread runs and how it
// ended, the answers and votes, the event log watchers replay, and the usage figures.
//
// The record knows nothing of replicas, streams or metrics: the coordinator places threads
// (Thread::replica), decides when to cancel, and turns what the record reports (token timings,
// "stop early", the seconds a finished job took) into messages and histograms. Events are
// appended in the order the coordinator calls in: accepted, then per thread its tokens (when
// the request streams them), ThreadFinished and the VoteUpdate after it, errors, and
// JobFinished last.
//
// Threading: none of its own; the coordinator calls it under its mutex.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "dmsrt/v1/dmsrt.pb.h"
#include "runtime/engine/answer.h"

namespace dmsrt {

class JobRecord {
 public:
  using Clock = std::chrono::steady_clock;

  struct Thread {
    int32_t replica = -1;  // the replica running it; -1 while unplaced (set by the coordinator)
    bool finished = false;
    v1::ThreadFinished result;  // once finished
    bool has_token = false;
    Clock::time_point last_token;  // for the inter-token latency
  };

  // Seconds to observe for one token event; negative: nothing to observe.
  struct TokenTimes {
    double time_to_first_token = -1;  // the job's first token
    double inter_token = -1;          // since the thread's previous token
  };

  // A job of `n` threads starting at `start`, with its Accepted event logged. The answer
  // selection and the deadline come from `request`.
  JobRecord(std::string id, const v1::JobRequest& request, std::string traceparent,
            std::vector<int32_t> prompt, int32_t n, int32_t max_tokens,
            std::shared_ptr<const std::regex> pattern, Clock::time_point start);

  const std::string& id() const { return id_; }
  const v1::JobRequest& request() const { return request_; }
  const std::string& traceparent() const { return traceparent_; }
  const std::vector<int32_t>& prompt() const { return prompt_; }
  int32_t n() const { return static_cast<int32_t>(threads_.size()); }
  int32_t max_tokens() const { return max_tokens_; }
  const std::optional<Clock::time_point>& deadline() const { return deadline_; }
  std::vector<Thread>& threads() { return threads_; }
  const std::vector<Thread>& threads() const { return threads_; }
  const std::vector<v1::JobEvent>& events() const { return events_; }
  bool done() const { return done_; }
  v1::JobOutcome outcome() const { return outcome_; }
  Clock::time_point finished_at() const { return finished_at_; }
  int64_t generated() const { return generated_; }

  // Why threads end before they run out: these decide the outcome (Outcome) and whether a lost
  // replica's threads are rerun. Set by the coordinator before it cancels them.
  bool cancel_requested = false;  // CancelJob, or the client went away
  bool deadline_hit = false;
  bool early_stopped() const { return early_stopped_; }

  // A TokenDelta event from thread `ev.token().thread_index()` (checked by the caller): counts
  // its tokens, logs it when the request streams tokens, and returns the latencies to observe.
  TokenTimes RecordTokens(const v1::JobEvent& ev, Clock::time_point now);
  // A thread ended: extracts its answer when it ran to the end (STOP, STOP_STRING, LENGTH) and
  // counts the vote, stamps its replica, logs ThreadFinished and the vote table. False (and
  // nothing recorded) when the job is done, the index is out of range or the thread already ended.
  bool RecordThreadFinished(const v1::ThreadFinished& finished);
  // True once, right after the thread that makes the majority final when the request asked for
  // early_stop and threads still run: the caller cancels them.
  bool StopEarly();
  bool AllFinished() const { return finished_count_ == n(); }
  // The outcome of a job whose threads all ended, and its message.
  v1::JobOutcome Outcome(std::string* message) const;
  // Ends the job: logs JobFinished (outcome, selected answer, votes, every thread, usage). False
  // when it had already ended; else *seconds is how long it ran.
  bool Finish(v1::JobOutcome outcome, const std::string& message, Clock::time_point now,
              double* seconds);
  // Logs an Error event (a job that was accepted and then fails: whether a retry can help).
  void RecordError(const std::string& message, bool retryable);
  // GetJob/ListJobs figures: the finished threads' results, votes, usage so far.
  void FillStatus(v1::JobStatus* status, Clock::time_point now) const;

 private:
  v1::VoteUpdate VoteUpdate() const;
  double SecondsAt(Clock::time_point now) const;

  std::string id_;
  v1::JobRequest request_;
  std::string traceparent_;
  std::vector<int32_t> prompt_;
  int32_t max_tokens_ = 0;
  std::shared_ptr<const std::regex> pattern_;
  Selection selection_ = Selection::kMajorityVote;
  Clock::time_point start_;
  std::optional<Clock::time_point> deadline_;

  std::vector<Thread> threads_;
  int32_t finished_count_ = 0;
  VoteTable votes_;
  std::vector<v1::JobEvent> events_;
  bool done_ = false;
  bool early_stopped_ = false;
  v1::JobOutcome outcome_ = v1::JOB_RUNNING;
  Clock::time_point finished_at_;
  double ttft_ = -1;
  int64_t generated_ = 0;
};

}  // namespace dmsrt
