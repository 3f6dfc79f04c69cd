// Continuous-batching engine (see engine.h for the scheduling rules). Everything below the inbox
// runs on the stepping thread; the inbox, the live-job set and the stats snapshot are the only
// state shared with submitting threads.
#include "runtime/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "parallel/status_macros.h"

namespace dmsrt {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "STOP";
    case FinishReason::kStopString: return "STOP_STRING";
    case FinishReason::kLength: return "LENGTH";
    case FinishReason::kCancelled: return "CANCELLED";
    case FinishReason::kPreemptedFailed: return "PREEMPTED_FAILED";
    case FinishReason::kError: return "ERROR";
  }
  return "UNKNOWN";
}

struct Engine::Thread {
  int32_t index = 0;
  SeqId seq = -1;
  std::vector<int32_t> tokens;  // prompt + generated
  int64_t kv_len = 0;           // tokens of `tokens` already in the sequence
  int64_t prompt_len = 0;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<StreamDecoder> decoder;
  std::unique_ptr<StopMatcher> stop;
  std::string text;
  int64_t generated = 0;
  double logprob_sum = 0.0;
  bool started = false;   // has its first token (forked from the root, or resumed)
  bool finished = false;
  bool waiting = false;   // in waiting_
  int64_t admit_order = 0;
  int32_t preemptions = 0;
};

struct Engine::Job {
  JobId id = 0;
  EngineJobSpec spec;
  std::shared_ptr<EventSink> sink;
  std::vector<std::unique_ptr<Thread>> threads;
  SeqId root = -1;
  int64_t root_len = 0;     // prompt tokens in the root sequence
  bool forked = false;
  bool root_waiting = false;
  int64_t root_admit = 0;
  int64_t generated_total = 0;
  bool done = false;
};

Engine::Engine(Backend& backend, const Tokenizer& tokenizer, const Model& model,
               EngineOptions options)
    : backend_(backend),
      clock_(options.clock != nullptr ? *options.clock : RealClock()),
      tok_(tokenizer),
      model_(model),
      options_(std::move(options)) {
  if (options_.prefill_chunk < 1) options_.prefill_chunk = 1;
  if (options_.max_running_threads < 1) options_.max_running_threads = 1;
  UpdateStats(0.0, 0);
}

Engine::~Engine() { Stop(); }

absl::StatusOr<JobId> Engine::Submit(EngineJobSpec spec, EventSink sink) {
  if (spec.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (spec.thread_indices.empty()) return absl::InvalidArgumentError("the job has no threads");
  std::set<int32_t> seen;
  for (int32_t i : spec.thread_indices) {
    if (i < 0) return absl::InvalidArgumentError("thread indices must be >= 0");
    if (!seen.insert(i).second) {
      return absl::InvalidArgumentError(absl::StrCat("thread index ", i, " appears twice"));
    }
  }
  if (spec.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be >= 1");
  if (spec.top_logprobs < 0 || spec.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "top_logprobs = %d is out of range: send 0 (none) to %d", spec.top_logprobs, kMaxTopLogprobs));
  }
  const int64_t ctx = model_.config.max_positions;
  if (ctx > 0 && static_cast<int64_t>(spec.prompt.size()) + spec.max_tokens > ctx) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prompt (%d tokens) + max_tokens (%d) exceeds the model context of %d tokens: shorten the "
        "prompt or lower max_tokens",
        spec.prompt.size(), spec.max_tokens, ctx));
  }
  for (int32_t t : spec.prompt) {
    if (t < 0 || t >= model_.config.vocab) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", t, " is outside the vocabulary"));
    }
  }
  absl::MutexLock lock(&mu_);
  JobId id = next_id_++;
  live_[id] = true;
  inbox_.push_back(Pending{id, std::move(spec), std::move(sink)});
  return id;
}

absl::Status Engine::Cancel(JobId job, int32_t thread_index) {
  absl::MutexLock lock(&mu_);
  if (live_.find(job) == live_.end()) {
    return absl::NotFoundError(absl::StrCat("job ", job, " is not running on this engine"));
  }
  cancels_.push_back(CancelReq{job, thread_index});
  return absl::OkStatus();
}

bool Engine::Idle() const {
  absl::MutexLock lock(&mu_);
  return inbox_.empty() && cancels_.empty() && live_.empty();
}

int64_t Engine::BlocksFor(int64_t tokens) const {
  const KvGeometry& g = backend_.kv().geometry();
  const int64_t per = static_cast<int64_t>(g.n_layers) * g.n_kv_heads;
  return per * ((tokens + g.block_tokens - 1) / g.block_tokens);
}

int64_t Engine::FreeBlocks() const {
  if (options_.free_blocks) return options_.free_blocks();
  return backend_.kv().free_blocks();
}

void Engine::DrainInbox() {
  std::vector<Pending> inbox;
  std::vector<CancelReq> cancels;
  {
    absl::MutexLock lock(&mu_);
    inbox.swap(inbox_);
    cancels.swap(cancels_);
  }
  for (Pending& p : inbox) {
    auto job = std::make_unique<Job>();
    job->id = p.id;
    job->spec = std::move(p.spec);
    job->sink = std::make_shared<EventSink>(std::move(p.sink));
    for (int32_t idx : job->spec.thread_indices) {
      auto t = std::make_unique<Thread>();
      t->index = idx;
      t->prompt_len = static_cast<int64_t>(job->spec.prompt.size());
      t->tokens = job->spec.prompt;
      SamplingParams sp = job->spec.sampling;
      sp.seed = job->spec.sampling.seed + static_cast<uint64_t>(idx);
      t->sampler = std::make_unique<Sampler>(sp);
      t->decoder = std::make_unique<StreamDecoder>(tok_);
      t->stop = std::make_unique<StopMatcher>(job->spec.stop);
      job->threads.push_back(std::move(t));
    }
    job->root_waiting = true;
    waiting_.push_back(Resident{job.get(), nullptr});
    jobs_[job->id] = std::move(job);
  }
  Outbox out;
  for (const CancelReq& c : cancels) {
    auto it = jobs_.find(c.job);
    if (it == jobs_.end() || it->second->done) continue;
    Job& job = *it->second;
    for (auto& t : job.threads) {
      if (t->finished) continue;
      if (c.thread_index < 0 || c.thread_index == t->index) CancelThread(job, *t, out);
    }
    MaybeFinishJob(job, out);
  }
  Emit(out);
}

void Engine::CancelThread(Job& job, Thread& t, Outbox& out) {
  FinishThread(job, t, FinishReason::kCancelled, "cancelled", out);
}

void Engine::FinishThread(Job& job, Thread& t, FinishReason reason, const std::string& message,
                          Outbox& out) {
  if (t.finished) return;
  t.finished = true;
  EngineEvent ev;
  ev.kind = EngineEvent::Kind::kThreadFinished;
  ev.job = job.id;
  ev.thread_index = t.index;
  KvCache& kv = backend_.kv();
  if (t.seq >= 0) {
    KvFigures f = kv.Figures(t.seq);
    ev.cache_cr = f.resident_tokens > 0 ? f.cache_cr() : 1.0;
    ev.logical_tokens = f.logical_tokens;
    ev.resident_tokens = f.resident_tokens;
    kv.Free(t.seq).IgnoreError();
    t.seq = -1;
  }
  resident_.erase(std::remove_if(resident_.begin(), resident_.end(),
                                 [&](const Resident& r) { return r.thread == &t; }),
                  resident_.end());
  if (t.waiting) {
    waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(),
                                  [&](const Resident& r) { return r.thread == &t; }),
                   waiting_.end());
    t.waiting = false;
  }
  ev.reason = reason;
  ev.message = message;
  ev.text = t.text;
  ev.token_ids.assign(t.tokens.begin() + t.prompt_len, t.tokens.end());
  ev.generated_tokens = t.generated;
  ev.mean_logprob = t.generated > 0 ? t.logprob_sum / static_cast<double>(t.generated) : 0.0;
  ev.preemptions = t.preemptions;
  out.emplace_back(job.sink, std::move(ev));
}

void Engine::MaybeFinishJob(Job& job, Outbox& out) {
  if (job.done) return;
  for (auto& t : job.threads) {
    if (!t->finished) return;
  }
  job.done = true;
  KvCache& kv = backend_.kv();
  if (job.root >= 0) {
    kv.Free(job.root).IgnoreError();
    job.root = -1;
  }
  resident_.erase(std::remove_if(resident_.begin(), resident_.end(),
                                 [&](const Resident& r) { return r.job == &job; }),
                  resident_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(),
                                [&](const Resident& r) { return r.job == &job; }),
                 waiting_.end());
  EngineEvent ev;
  ev.kind = EngineEvent::Kind::kJobFinished;
  ev.job = job.id;
  ev.prompt_tokens = static_cast<int64_t>(job.spec.prompt.size());
  ev.total_generated = job.generated_total;
  out.emplace_back(job.sink, std::move(ev));
  absl::MutexLock lock(&mu_);
  live_.erase(job.id);
}

void Engine::SampleInto(Job& job, Thread& t, const float* logits, int32_t vocab, Outbox& out) {
  float lp = 0.0f;
  std::vector<TokenLogprob> top;
  const int32_t tok = t.sampler->Sample(logits, vocab, &lp, job.spec.top_logprobs, &top);
  HandleToken(job, t, tok, lp, std::move(top), out);
}

void Engine::HandleToken(Job& job, Thread& t, int32_t token, float logprob,
                         std::vector<TokenLogprob> top, Outbox& out) {
  t.tokens.push_back(token);
  ++t.generated;
  ++job.generated_total;
  ++counters_.generation_tokens_total;
  t.logprob_sum += logprob;
  const bool eos = !job.spec.ignore_eos && tok_.IsEndOfGeneration(token);
  std::string delta;
  if (!eos) delta = t.stop->Push(t.decoder->Push(token));
  const bool length = t.generated >= job.spec.max_tokens;
  if ((eos || length) && !t.stop->matched()) {
    delta += t.stop->Push(t.decoder->Flush());
    if (!t.stop->matched()) delta += t.stop->Flush();
  }
  t.text += delta;
  EngineEvent ev;
  ev.kind = EngineEvent::Kind::kTokens;
  ev.job = job.id;
  ev.thread_index = t.index;
  ev.text = std::move(delta);
  ev.token_ids = {token};
  ev.logprobs = {logprob};
  if (job.spec.top_logprobs > 0) ev.top_logprobs.push_back(std::move(top));
  out.emplace_back(job.sink, std::move(ev));
  if (t.stop->matched()) {
    FinishThread(job, t, FinishReason::kStopString, "", out);
  } else if (eos) {
    FinishThread(job, t, FinishReason::kStop, "", out);
  } else if (length) {
    FinishThread(job, t, FinishReason::kLength, "", out);
  }
}

void Engine::Preempt(const Resident& r) {
  KvCache& kv = backend_.kv();
  ++counters_.preemptions;
  resident_.erase(std::remove_if(resident_.begin(), resident_.end(),
                                 [&](const Resident& x) {
                                   return x.job == r.job && x.thread == r.thread;
                                 }),
                  resident_.end());
  if (r.thread == nullptr) {
    Job& job = *r.job;
    if (job.root >= 0) kv.Free(job.root).IgnoreError();
    job.root = -1;
    job.root_len = 0;
    job.root_waiting = true;
  } else {
    Thread& t = *r.thread;
    if (t.seq >= 0) kv.Free(t.seq).IgnoreError();
    t.seq = -1;
    t.kv_len = 0;
    ++t.preemptions;
    t.waiting = true;
  }
  // Preempted work resumes before anything newer.
  waiting_.push_front(r);
}

void Engine::Admit(Outbox& out) {
  KvCache& kv = backend_.kv();
  const KvGeometry& g = kv.geometry();
  const int64_t per_token_block = static_cast<int64_t>(g.n_layers) * g.n_kv_heads;
  while (!waiting_.empty()) {
    Resident r = waiting_.front();
    Job& job = *r.job;
    int64_t running = 0;
    for (const Resident& x : resident_) {
      running += x.thread ? 1 : static_cast<int64_t>(x.job->threads.size());
    }
    int64_t need;
    int64_t need_alone;  // what one thread of it needs with the whole budget to itself
    int64_t new_threads;
    if (r.thread == nullptr) {
      new_threads = 0;
      for (auto& t : job.threads) new_threads += t->finished ? 0 : 1;
      // The prompt, then one copy-on-write/growth block per (layer, head) for every thread.
      // Threads that do not fit after the fork are preempted and recomputed one by one.
      need = BlocksFor(static_cast<int64_t>(job.spec.prompt.size())) + new_threads * per_token_block;
      need_alone = BlocksFor(static_cast<int64_t>(job.spec.prompt.size())) + per_token_block;
    } else {
      new_threads = 1;
      need = BlocksFor(static_cast<int64_t>(r.thread->tokens.size())) + per_token_block;
      need_alone = need;
    }
    const int64_t headroom = running * per_token_block;
    const int64_t free_now = FreeBlocks();
    const bool nothing_resident = resident_.empty();
    if (nothing_resident && need_alone > kv.total_blocks()) {
      // Cannot fit even with the whole budget to itself.
      waiting_.pop_front();
      std::string msg = absl::StrFormat(
          "needs about %d KV blocks (%d bytes) but the whole budget is %d blocks: raise the KV "
          "budget or shorten the prompt",
          need_alone, need_alone * kv.block_bytes(), kv.total_blocks());
      if (r.thread == nullptr) {
        job.root_waiting = false;
        for (auto& t : job.threads) FinishThread(job, *t, FinishReason::kPreemptedFailed, msg, out);
      } else {
        r.thread->waiting = false;
        FinishThread(job, *r.thread, FinishReason::kPreemptedFailed, msg, out);
      }
      MaybeFinishJob(job, out);
      continue;
    }
    if (!nothing_resident &&
        (need + headroom > free_now || running + new_threads > options_.max_running_threads)) {
      break;
    }
    absl::StatusOr<SeqId> seq = kv.Create();
    if (!seq.ok()) {
      if (nothing_resident) {
        waiting_.pop_front();
        std::string msg = absl::StrCat("cannot create a KV sequence: ", seq.status().message());
        if (r.thread == nullptr) {
          job.root_waiting = false;
          for (auto& t : job.threads) FinishThread(job, *t, FinishReason::kError, msg, out);
        } else {
          r.thread->waiting = false;
          FinishThread(job, *r.thread, FinishReason::kError, msg, out);
        }
        MaybeFinishJob(job, out);
        continue;
      }
      break;
    }
    waiting_.pop_front();
    if (r.thread == nullptr) {
      job.root = *seq;
      job.root_len = 0;
      job.root_waiting = false;
      job.root_admit = ++admit_counter_;
    } else {
      r.thread->seq = *seq;
      r.thread->kv_len = 0;
      r.thread->waiting = false;
      r.thread->admit_order = ++admit_counter_;
    }
    resident_.push_back(r);
  }
}

void Engine::Emit(Outbox& events) {
  for (auto& [sink, ev] : events) {
    if (sink && *sink) (*sink)(ev);
  }
  events.clear();
}

void Engine::FailEverything(const absl::Status& status, Outbox& out) {
  std::string msg = absl::StrCat("engine step failed: ", status.ToString());
  for (auto& [id, job] : jobs_) {
    for (auto& t : job->threads) FinishThread(*job, *t, FinishReason::kError, msg, out);
    MaybeFinishJob(*job, out);
  }
}

absl::StatusOr<bool> Engine::Step() {
  DMSRT_ASSIGN_OR_RETURN(const int64_t n, StepMany(1));
  return n > 0;
}

absl::StatusOr<int64_t> Engine::StepMany(int64_t max_steps) {
  const Clock::TimePoint t0 = clock_.Now();
  DrainInbox();
  Outbox out;
  Admit(out);
  if (max_steps > 1 && out.empty()) {
    DMSRT_ASSIGN_OR_RETURN(const int64_t k, DecodeSpan(max_steps, t0));
    if (k > 0) return k;
  }
  const int64_t gen_before = counters_.generation_tokens_total;
  bool did_work = false;
  StepShape shape;

  // Build the batch; on RESOURCE_EXHAUSTED preempt the newest resident sequence and retry.
  while (!resident_.empty()) {
    std::vector<SeqChunk> batch;
    std::vector<Resident> owners;
    BuildBatch(&batch, &owners);
    if (batch.empty()) break;
    if (options_.on_step) shape = Shape(batch, owners, shape.retries);

    absl::StatusOr<ForwardResult> fr = backend_.Forward(batch);
    if (!fr.ok()) {
      if (!absl::IsResourceExhausted(fr.status())) {
        FailEverything(fr.status(), out);
        Emit(out);
        return fr.status();
      }
      MakeRoom(fr.status(), out);
      did_work = true;
      ++shape.retries;
      continue;
    }
    did_work = true;
    UpdatePeaks();
    RecordFed(batch, owners);
    SampleReturned(*fr, owners, out);
    break;
  }
  Emit(out);
  DropFinishedJobs();
  if (did_work) ++counters_.steps;
  const double secs =
      std::chrono::duration<double>(clock_.Now() - t0).count();
  UpdateStats(did_work ? secs : 0.0, counters_.generation_tokens_total - gen_before);
  if (did_work && options_.on_step) options_.on_step(shape, secs);
  return did_work ? 1 : 0;
}

StepShape Engine::Shape(const std::vector<SeqChunk>& batch, const std::vector<Resident>& owners,
                        int64_t retries) const {
  StepShape s;
  s.retries = retries;
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    if (n == 1) {
      ++s.decode_rows;
      // What the row's attention reads: its resident slots (per KV head) and its new token.
      const KvFigures f = backend_.kv().Figures(batch[i].seq);
      const int64_t heads = std::max<int64_t>(1, static_cast<int64_t>(f.per_head.size()));
      s.kv_tokens += f.resident_tokens / heads + 1;
    } else {
      s.prefill_tokens += n;
    }
    s.sampled_rows += batch[i].sample || batch[i].logits != SeqChunk::Logits::kNone ? 1 : 0;
  }
  return s;
}

absl::StatusOr<int64_t> Engine::DecodeSpan(int64_t max_steps, Clock::TimePoint t0) {
  if (resident_.empty()) return 0;
  int64_t limit = max_steps;
  span_seqs_.clear();
  for (const Resident& r : resident_) {
    if (r.thread == nullptr || !r.job->spec.stop.empty()) return 0;
    const Thread& t = *r.thread;
    if (static_cast<int64_t>(t.tokens.size()) - t.kv_len != 1) return 0;
    // The step that samples token max_tokens ends the thread: it is not part of a span.
    limit = std::min<int64_t>(limit, r.job->spec.max_tokens - t.generated - 1);
    span_seqs_.push_back(t.seq);
  }
  if (limit < 2) return 0;
  int64_t k = backend_.DecodeSpanLimit(span_seqs_, limit, &span_row_);
  const int32_t vocab = static_cast<int32_t>(span_row_.size());
  bool ok = k >= 2 && k <= limit && vocab > 0;
  span_tokens_.clear();
  for (size_t i = 0; ok && i < resident_.size(); ++i) {
    const Resident& r = resident_[i];
    int32_t tok = -1;
    ok = r.thread->sampler->Certain(span_row_.data(), vocab, &tok) &&
         (r.job->spec.ignore_eos || !tok_.IsEndOfGeneration(tok));
    span_tokens_.push_back(tok);
  }
  if (!ok) {
    if (k > 0) DMSRT_RETURN_IF_ERROR(backend_.ForwardDecodeSpan(span_seqs_, 0));
    return 0;
  }
  const int64_t gen_before = counters_.generation_tokens_total;
  Outbox out;
  absl::Status st = backend_.ForwardDecodeSpan(span_seqs_, k);
  if (!st.ok()) {
    FailEverything(st, out);
    Emit(out);
    return st;
  }
  UpdatePeaks();  // blocks in use only grow during a span: its last step holds the most
  for (size_t i = 0; i < resident_.size(); ++i) {
    Job& job = *resident_[i].job;
    Thread& t = *resident_[i].thread;
    const int32_t tok = span_tokens_[i];
    float lp = 0.0f;
    t.sampler->Sample(span_row_.data(), vocab, &lp);  // the row's log-probability, one draw
    t.sampler->Skip(k - 1);
    EngineEvent ev;
    ev.kind = EngineEvent::Kind::kTokens;
    ev.job = job.id;
    ev.thread_index = t.index;
    // A token with no bytes adds no text and leaves the decoder's pending tail as it is.
    const bool silent = tok_.TokenBytes(tok).empty();
    t.tokens.insert(t.tokens.end(), static_cast<size_t>(k), tok);
    for (int64_t j = 0; j < k; ++j) {
      t.logprob_sum += lp;
      if (!silent) ev.text += t.stop->Push(t.decoder->Push(tok));
    }
    t.text += ev.text;
    t.generated += k;
    t.kv_len += k;
    job.generated_total += k;
    counters_.generation_tokens_total += k;
    ev.token_ids.assign(static_cast<size_t>(k), tok);
    ev.logprobs.assign(static_cast<size_t>(k), lp);
    out.emplace_back(job.sink, std::move(ev));
  }
  Emit(out);
  counters_.steps += k;
  const double secs = std::chrono::duration<double>(clock_.Now() - t0).count();
  UpdateStats(secs, counters_.generation_tokens_total - gen_before);
  return k;
}

void Engine::BuildBatch(std::vector<SeqChunk>* batch, std::vector<Resident>* owners) const {
  int32_t prefill_left = options_.prefill_chunk;
  for (const Resident& r : resident_) {
    SeqChunk c;
    int64_t have, total;
    const std::vector<int32_t>* src;
    if (r.thread == nullptr) {
      c.seq = r.job->root;
      have = r.job->root_len;
      src = &r.job->spec.prompt;
    } else {
      c.seq = r.thread->seq;
      have = r.thread->kv_len;
      src = &r.thread->tokens;
    }
    total = static_cast<int64_t>(src->size());
    int64_t pending = total - have;
    if (pending <= 0) continue;
    int64_t take = pending;
    if (pending > 1) {  // a prefill or a recompute: bounded per step
      take = std::min<int64_t>(pending, prefill_left);
      if (take <= 0) continue;
      prefill_left -= static_cast<int32_t>(take);
    }
    c.tokens.assign(src->begin() + have, src->begin() + have + take);
    c.logits = (have + take == total) ? SeqChunk::Logits::kLast : SeqChunk::Logits::kNone;
    if (c.logits == SeqChunk::Logits::kLast && r.thread != nullptr && SamplesOnBackend(*r.job)) {
      // The backend samples the thread's next token where the logits are (the fork of a
      // prompt, which samples every thread from one row, stays on the host).
      c.logits = SeqChunk::Logits::kNone;
      c.sample = true;  // the counter is the position of the token drawn
      c.sampling = CounterSampling(r.thread->sampler->params(), static_cast<uint64_t>(total));
    }
    batch->push_back(std::move(c));
    owners->push_back(r);
  }
}

void Engine::MakeRoom(const absl::Status& status, Outbox& out) {
  const KvCache& kv = backend_.kv();
  // Newest resident sequence.
  auto newest = std::max_element(resident_.begin(), resident_.end(),
                                 [](const Resident& a, const Resident& b) {
                                   int64_t oa = a.thread ? a.thread->admit_order : a.job->root_admit;
                                   int64_t ob = b.thread ? b.thread->admit_order : b.job->root_admit;
                                   return oa < ob;
                                 });
  Resident victim = *newest;
  if (resident_.size() == 1) {
    std::string msg = absl::StrFormat(
        "the sequence does not fit in the KV budget even alone (%d blocks of %d bytes; %s): "
        "raise the KV budget or lower max_tokens",
        kv.total_blocks(), kv.block_bytes(), status.message());
    Job& job = *victim.job;
    if (victim.thread == nullptr) {
      for (auto& t : job.threads) FinishThread(job, *t, FinishReason::kPreemptedFailed, msg, out);
    } else {
      FinishThread(job, *victim.thread, FinishReason::kPreemptedFailed, msg, out);
    }
    MaybeFinishJob(job, out);
    return;
  }
  Preempt(victim);
}

void Engine::RecordFed(const std::vector<SeqChunk>& batch, const std::vector<Resident>& owners) {
  for (size_t i = 0; i < batch.size(); ++i) {
    const Resident& r = owners[i];
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    if (r.thread == nullptr) {
      r.job->root_len += n;
      if (r.job->root_len == static_cast<int64_t>(r.job->spec.prompt.size())) {
        counters_.prompt_tokens_total += r.job->root_len;
      }
    } else {
      r.thread->kv_len += n;
    }
  }
}

bool Engine::SamplesOnBackend(const Job& job) const {
  // A listing of the top log-probabilities needs the whole row on the host.
  return backend_.samples_on_device() && job.spec.top_logprobs == 0;
}

void Engine::SampleReturned(const ForwardResult& res, const std::vector<Resident>& owners,
                            Outbox& out) {
  // Per chunk, in chunk order: the token the backend sampled, or the last logits row returned.
  std::vector<int64_t> row_of(owners.size(), -1);
  for (size_t row = 0; row < res.row_chunk.size(); ++row) {
    const int32_t ci = res.row_chunk[row];
    if (ci >= 0 && ci < static_cast<int32_t>(owners.size())) row_of[ci] = static_cast<int64_t>(row);
  }
  for (size_t ci = 0; ci < owners.size(); ++ci) {
    const bool sampled = ci < res.sampled.size() && res.sampled[ci] >= 0 && owners[ci].thread != nullptr;
    if (!sampled && row_of[ci] < 0) continue;
    const float* logits = sampled ? nullptr : res.logits.data() + row_of[ci] * static_cast<int64_t>(res.vocab);
    Resident r = owners[ci];
    Job& job = *r.job;
    if (job.done) continue;
    if (r.thread == nullptr) {
      ForkRoot(job, logits, res.vocab, out);
      continue;
    }
    Thread& t = *r.thread;
    if (t.finished) continue;
    if (sampled) {
      HandleToken(job, t, res.sampled[ci], res.sampled_logprob[ci], {}, out);
    } else {
      SampleInto(job, t, logits, res.vocab, out);
    }
    MaybeFinishJob(job, out);
  }
}

void Engine::ForkRoot(Job& job, const float* logits, int32_t vocab, Outbox& out) {
  KvCache& kv = backend_.kv();
  resident_.erase(std::remove_if(resident_.begin(), resident_.end(),
                                 [&](const Resident& x) {
                                   return x.job == &job && x.thread == nullptr;
                                 }),
                  resident_.end());
  for (auto& tp : job.threads) {
    Thread& t = *tp;
    if (t.finished) continue;
    absl::StatusOr<SeqId> child = kv.Fork(job.root);
    if (!child.ok()) {
      FinishThread(job, t, FinishReason::kError,
                   absl::StrCat("fork failed: ", child.status().message()), out);
      continue;
    }
    t.seq = *child;
    t.kv_len = job.root_len;
    t.started = true;
    t.admit_order = ++admit_counter_;
    resident_.push_back(Resident{&job, &t});
    SampleInto(job, t, logits, vocab, out);
  }
  kv.Free(job.root).IgnoreError();
  job.root = -1;
  job.forked = true;
  MaybeFinishJob(job, out);
}

void Engine::DropFinishedJobs() {
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (it->second->done) {
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
}

void Engine::UpdatePeaks() {
  const KvCache& kv = backend_.kv();
  int64_t threads = 0;
  for (const Resident& r : resident_) threads += r.thread ? 1 : 0;
  counters_.NotePeaks(threads, kv.total_blocks() - kv.free_blocks());
}

void Engine::UpdateStats(double step_seconds, int64_t generated_this_step) {
  counters_.RecordStep(step_seconds, generated_this_step);
  EngineStats s;
  // A resident root counts all its unfinished threads as waiting: they fork from it later.
  auto count = [&s](const Resident& r, int64_t* slot) {
    if (r.thread) {
      ++*slot;
    } else {
      for (auto& t : r.job->threads) s.waiting_threads += t->finished ? 0 : 1;
    }
  };
  for (const Resident& r : resident_) count(r, &s.running_threads);
  for (const Resident& r : waiting_) count(r, &s.waiting_threads);
  for (auto& [id, job] : jobs_) ++(job->forked ? s.running_jobs : s.waiting_jobs);
  FillKvStats(backend_.kv(), !resident_.empty(), &s);
  counters_.Fill(&s);
  absl::MutexLock lock(&mu_);
  stats_ = s;
  busy_ = !jobs_.empty();
  if (step_seconds > 0.0) last_work_ = clock_.Now();
}

EngineStats Engine::Stats() const {
  absl::MutexLock lock(&mu_);
  EngineStats s = stats_;
  if (clock_.Now() - last_work_ > std::chrono::seconds(2)) s.tokens_per_second = 0.0;
  return s;
}

void Engine::Start() {
  if (running_.exchange(true)) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = false;
  }
  worker_ = std::thread([this] {
    for (;;) {
      bool idle = false;
      {
        absl::MutexLock lock(&mu_);
        const absl::Condition work(
            +[](Engine* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
              return e->stop_ || e->busy_ || !e->inbox_.empty() || !e->cancels_.empty();
            },
            this);
        if (options_.on_idle) {
          idle = !mu_.AwaitWithTimeout(work, options_.idle_period);
        } else {
          mu_.Await(work);
        }
        if (stop_) break;
      }
      // Failures of a step were also reported to its jobs as ERROR events.
      absl::Status s = idle ? options_.on_idle() : Step().status();
      if (!s.ok() && options_.on_failure) options_.on_failure(s);
    }
  });
}

void Engine::Stop() {
  if (!running_.exchange(false)) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (worker_.joinable()) worker_.join();
}

}  // namespace dmsrt
