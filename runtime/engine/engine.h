// The replica engine: a continuous-batching scheduler for best-of-N reasoning jobs that share one
// KV budget.
//
// A job is a prompt and N threads (thread i samples with seed + i, whatever replica runs it). The
// prompt is prefilled once as a root sequence; its last logits give every thread its first token
// (each with its own sampler), then the root is forked into the threads, which share the prompt's
// KV blocks copy-on-write. Every Step() builds one batch that mixes one decode token of every
// running thread of every job with prefill chunks (bounded per step) of newly admitted work.
//
// Memory: admission compares the blocks a new root (or a resumed thread) needs now, plus one block
// per (layer, head) of growth for every running thread, with the free-block count. The count comes
// from a callable so a tensor-parallel leader can supply the minimum over its ranks. When the
// backend cannot reserve a step (RESOURCE_EXHAUSTED), the newest resident sequence is preempted:
// its blocks are freed and it is re-queued for recompute from prompt + generated tokens. Its
// sampler object survives preemption, so a resumed thread continues with exactly the RNG state it
// had: the output is the one an unconstrained run gives. A sequence that cannot fit even alone
// ends with PREEMPTED_FAILED and a message naming the numbers.
//
// Threading: Submit(), Cancel() and Stats() may be called from any thread. Step() is driven by one
// thread (Start() spawns it, or a test calls Step() itself). Event sinks are called on the
// stepping thread, never under the engine's lock, so a sink may call Submit() or Cancel().
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/clock.h"
#include "runtime/engine/engine_stats.h"
#include "runtime/engine/sampler.h"
#include "runtime/engine/stop_matcher.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

enum class FinishReason { kStop, kStopString, kLength, kCancelled, kPreemptedFailed, kError };
const char* FinishReasonName(FinishReason r);

using JobId = uint64_t;

struct EngineJobSpec {
  std::vector<int32_t> prompt;          // token ids, non-empty
  std::vector<int32_t> thread_indices;  // global thread indices run here; seed = sampling.seed + index
  SamplingParams sampling;
  int32_t max_tokens = 256;             // generated tokens per thread
  std::vector<std::string> stop;        // stop strings, matched on decoded text
  bool ignore_eos = false;
  // Per generated token, list this many most likely tokens with their log-probabilities
  // (0..kMaxTopLogprobs; 0 = none, and nothing is computed). See Sampler::Sample for the
  // distribution.
  int32_t top_logprobs = 0;
};

struct EngineEvent {
  enum class Kind { kTokens, kThreadFinished, kJobFinished } kind = Kind::kTokens;
  JobId job = 0;
  int32_t thread_index = -1;
  // kTokens: the text delta (whole UTF-8 characters, stop strings removed), the ids and their
  // log-probabilities. kThreadFinished: the full text and token ids of the thread.
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<float> logprobs;
  // kTokens when the job asked for top_logprobs: one listing per token id, most likely first.
  std::vector<std::vector<TokenLogprob>> top_logprobs;
  // kThreadFinished.
  FinishReason reason = FinishReason::kStop;
  std::string message;        // why, for PREEMPTED_FAILED and ERROR
  int64_t generated_tokens = 0;
  double mean_logprob = 0.0;  // mean over generated tokens
  double cache_cr = 1.0;      // KvCache::Figures(seq).cache_cr() at the end
  int64_t logical_tokens = 0;
  int64_t resident_tokens = 0;
  int32_t preemptions = 0;
  // kJobFinished.
  int64_t prompt_tokens = 0;
  int64_t total_generated = 0;
};

using EventSink = std::function<void(const EngineEvent&)>;

// One engine step as it ran (EngineOptions::on_step): what it computed, for comparing a real
// run's steps with the capacity planner's step-time model (`dmsrt plan --check-steps`).
struct StepShape {
  int64_t decode_rows = 0;     // one-token chunks
  int64_t prefill_tokens = 0;  // tokens of the longer chunks
  // The KV tokens the decode rows read: each row's resident tokens per KV head before the step
  // (KvFigures, averaged over heads) plus its new token; under eviction the token leaving in
  // the step makes this one more than the attention reads.
  int64_t kv_tokens = 0;
  int64_t sampled_rows = 0;    // rows whose logits were asked for (sampled)
  int64_t retries = 0;         // batches refused for a full KV cache (a preemption each) first
};

struct EngineOptions {
  int32_t prefill_chunk = 256;        // prefill tokens per step (over all prefilling sequences)
  int32_t max_running_threads = 256;  // resident threads at most
  // Free KV blocks the scheduler admits against. Null: the backend's own KvCache (for a TP
  // leader that is already the group's figure, from the fullest rank; see tp_replica.h).
  std::function<int64_t()> free_blocks;
  // Called on the stepping thread (Start()) after `idle_period` without work, and again every
  // `idle_period` while idle. A TP leader pings its followers here (PingTpFollowers), so their
  // wait for the next step stays inside the communicator's watchdog.
  std::function<absl::Status()> on_idle;
  absl::Duration idle_period = absl::Seconds(30);
  // Called on the stepping thread (Start()) when a step or on_idle fails with an error other than
  // a full KV cache; the jobs of a failed step have already ended with ERROR. The owner decides
  // whether the backend can go on (a broken TP group cannot).
  std::function<void(const absl::Status&)> on_failure;
  // The time source of the step timings and the tokens/s figure. Null: the real steady clock.
  // The capacity planner passes a simulated clock that its backend advances by each step's
  // predicted duration. Must outlive the engine.
  const Clock* clock = nullptr;
  // Called on the stepping thread after every step that ran, with its shape and its seconds
  // (admission, the forward pass, sampling and the events, as the planner's step time counts).
  // Not called for decode spans (Backend::DecodeSpanLimit), which only the planner's simulated
  // backend runs.
  std::function<void(const StepShape&, double seconds)> on_step;
};

class Engine {
 public:
  // The references must outlive the engine.
  Engine(Backend& backend, const Tokenizer& tokenizer, const Model& model,
         EngineOptions options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a job. INVALID_ARGUMENT for an empty prompt, no threads, max_tokens < 1, top_logprobs
  // outside 0..kMaxTopLogprobs, or a prompt that, with max_tokens, exceeds the model's context. `sink` receives every event of the job.
  absl::StatusOr<JobId> Submit(EngineJobSpec spec, EventSink sink);
  // Cancels a job (thread_index < 0) or one of its threads; the blocks are freed by the next
  // Step(). NOT_FOUND for an unknown or finished job.
  absl::Status Cancel(JobId job, int32_t thread_index = -1);

  // Runs one scheduling step. Returns false when there was nothing to do.
  absl::StatusOr<bool> Step();
  // Runs one scheduling step, or up to `max_steps` steps as one when the backend runs decode
  // spans (Backend::DecodeSpanLimit) and the next steps can only be decode steps of the same
  // threads: every resident sequence is a started thread with one token to feed, whatever
  // waits cannot be admitted before a thread ends (admission is checked first, as in Step, and
  // free blocks only shrink while nothing ends), no thread reaches max_tokens, none has stop
  // strings, and every thread's sampler picks the same token from the backend's row whatever
  // its draw (Sampler::Certain; EOS only under ignore_eos). The state afterwards is the one
  // that many Step() calls give, except that a span's tokens reach the sink as one kTokens event
  // per thread and the tokens/s window counts the span as one entry. Returns the steps run (0:
  // nothing to do). For simulations (launch/plan/); a backend without spans steps once.
  absl::StatusOr<int64_t> StepMany(int64_t max_steps);
  // True when no job is queued, running or pending in the inbox.
  bool Idle() const;

  // Background stepping thread (idles on a condition variable when there is no work).
  void Start();
  void Stop();

  EngineStats Stats() const;
  const Tokenizer& tokenizer() const { return tok_; }
  const Model& model() const { return model_; }

 private:
  struct Thread;
  struct Job;
  struct Pending {
    JobId id;
    EngineJobSpec spec;
    EventSink sink;
  };
  struct CancelReq {
    JobId job;
    int32_t thread_index;
  };
  // Something that holds (or wants) a KV sequence: a job's root or one thread.
  using Outbox = std::vector<std::pair<std::shared_ptr<EventSink>, EngineEvent>>;
  struct Resident {
    Job* job = nullptr;
    Thread* thread = nullptr;  // null for the root
  };

  void DrainInbox();
  void CancelThread(Job& job, Thread& t, Outbox& out);
  void FinishThread(Job& job, Thread& t, FinishReason reason, const std::string& message,
                    Outbox& out);
  void MaybeFinishJob(Job& job, Outbox& out);
  // Samples thread `t`'s next token from `logits` and handles it.
  void SampleInto(Job& job, Thread& t, const float* logits, int32_t vocab, Outbox& out);
  void HandleToken(Job& job, Thread& t, int32_t token, float logprob,
                   std::vector<TokenLogprob> top, Outbox& out);
  void Preempt(const Resident& r);
  int64_t BlocksFor(int64_t tokens) const;
  int64_t FreeBlocks() const;
  void Admit(Outbox& out);
  void Emit(Outbox& events);
  void UpdateStats(double step_seconds, int64_t generated_this_step);
  void UpdatePeaks();
  void FailEverything(const absl::Status& status, Outbox& out);
  // Step's parts, in order.
  // The next chunk of every resident sequence that has tokens to feed (prefill chunks share
  // options_.prefill_chunk tokens per step); owners[i] holds batch[i].
  void BuildBatch(std::vector<SeqChunk>* batch, std::vector<Resident>* owners) const;
  // The step did not fit in the KV budget (`status`): preempts the newest resident sequence, or
  // fails it when it is the only one.
  void MakeRoom(const absl::Status& status, Outbox& out);
  // What a step of `batch` computes (EngineOptions::on_step).
  StepShape Shape(const std::vector<SeqChunk>& batch, const std::vector<Resident>& owners,
                  int64_t retries) const;
  // Every chunk of the batch was fed: advances its sequence's length.
  void RecordFed(const std::vector<SeqChunk>& batch, const std::vector<Resident>& owners);
  // Whether the backend samples the job's decode rows itself (Backend::samples_on_device): the
  // counter-based draws of kernels/reference/sampling_ref.h, seeded by the thread's seed and
  // the position drawn. Otherwise the thread's Sampler draws on the host from the logits row.
  bool SamplesOnBackend(const Job& job) const;
  // Takes each chunk's next token: the one the backend sampled, or one drawn here from the
  // logits row that came back (a thread's next token, or a finished root's fork).
  void SampleReturned(const ForwardResult& res, const std::vector<Resident>& owners,
                      Outbox& out);
  // The root is complete: forks every unfinished thread from it, samples each one's first token
  // from `logits`, and frees the root.
  void ForkRoot(Job& job, const float* logits, int32_t vocab, Outbox& out);
  void DropFinishedJobs();
  // StepMany's span: the steps run as one (0: declined, run a normal step). `t0` is the clock at
  // the start of the call.
  absl::StatusOr<int64_t> DecodeSpan(int64_t max_steps, Clock::TimePoint t0);

  Backend& backend_;
  const Clock& clock_;
  const Tokenizer& tok_;
  const Model& model_;
  EngineOptions options_;

  // Submission side (any thread).
  mutable absl::Mutex mu_;
  std::vector<Pending> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<CancelReq> cancels_ ABSL_GUARDED_BY(mu_);
  std::map<JobId, bool> live_ ABSL_GUARDED_BY(mu_);  // job id -> accepted and not finished
  JobId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;  // jobs_ not empty after the last step
  EngineStats stats_ ABSL_GUARDED_BY(mu_);
  Clock::TimePoint last_work_ ABSL_GUARDED_BY(mu_);

  // Stepping side (the engine thread only).
  std::map<JobId, std::unique_ptr<Job>> jobs_;
  std::deque<Resident> waiting_;    // wants a sequence, in admission order (preempted first)
  std::vector<Resident> resident_;  // holds a sequence, oldest first
  int64_t admit_counter_ = 0;
  EngineCounters counters_;
  std::vector<SeqId> span_seqs_;   // DecodeSpan scratch
  std::vector<float> span_row_;
  std::vector<int32_t> span_tokens_;

  std::thread worker_;
  std::atomic<bool> running_{false};
};

}  // namespace dmsrt
