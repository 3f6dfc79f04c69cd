// Engine tests on a tiny generated model (tests/fixtures/make_tiny_model.py): forked threads equal
// independent runs, cancel frees every block within one step, preemption under a tiny budget
// reproduces the unconstrained run exactly, a sequence that cannot fit alone fails with a reason,
// background stepping with concurrent submitters, the idle and failure hooks, peak figures; plus
// answer extraction and voting.
#include "runtime/engine/engine.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "runtime/engine/answer.h"

namespace dmsrt {
namespace {

namespace fs = std::filesystem;

struct ThreadOut {
  std::vector<int32_t> tokens;  // from token events
  std::vector<float> logprobs;
  std::vector<std::vector<TokenLogprob>> top;  // per token, when the job asked for a listing
  std::string text;             // concatenated deltas
  std::string final_text;
  FinishReason reason = FinishReason::kError;
  bool finished = false;
  std::string message;
  int32_t preemptions = 0;
};

struct JobOut {
  std::map<int32_t, ThreadOut> threads;
  bool finished = false;
};

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system("python3 -c 'import gguf, numpy' >/dev/null 2>&1") != 0) {
      skip_reason_ = "python3 with the gguf and numpy packages is not available";
      return;
    }
    char tmpl[] = "/tmp/dmsrt_engine_XXXXXX";
    dir_ = mkdtemp(tmpl);
    const std::string cmd = "python3 " + std::string(DMSRT_SOURCE_DIR) +
                            "/tests/fixtures/make_tiny_model.py --out " + dir_ +
                            " --arch llama --format gguf --seed 11 >/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      skip_reason_ = "make_tiny_model.py failed";
      return;
    }
    auto m = LoadModel(dir_ + "/model.gguf");
    if (!m.ok()) {
      skip_reason_ = "LoadModel failed: " + m.status().ToString();
      return;
    }
    model_ = m->release();
    auto t = Tokenizer::Create(model_->tokenizer);
    if (!t.ok()) {
      skip_reason_ = "Tokenizer::Create failed: " + t.status().ToString();
      return;
    }
    tok_ = t->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete model_;
    tok_ = nullptr;
    model_ = nullptr;
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }

  std::unique_ptr<Backend> MakeBackend(int64_t budget_bytes) {
    BackendOptions o;
    o.threads = 1;
    o.kv_budget_bytes = budget_bytes;
    o.kv_block_tokens = 16;
    auto b = MakeCpuBackend(*model_, o);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }

  // Blocks one sequence of `tokens` tokens holds in a dense cache.
  int64_t DenseBlocks(const Backend& b, int64_t tokens) {
    const KvGeometry& g = const_cast<Backend&>(b).kv().geometry();
    return static_cast<int64_t>(g.n_layers) * g.n_kv_heads * ((tokens + g.block_tokens - 1) / g.block_tokens);
  }

  static EngineJobSpec Spec(std::vector<int32_t> threads, int32_t max_tokens, uint64_t seed) {
    EngineJobSpec s;
    // 19 prompt tokens: an awkward length that leaves the last prompt block partly filled, so
    // every forked thread must copy it on its first write.
    for (int32_t i = 0; i < 19; ++i) s.prompt.push_back(5 + (i * 37) % 250);
    s.thread_indices = std::move(threads);
    // The random-weight model's logits are very peaked (a token's own embedding dominates), so a
    // high temperature is what makes threads with different seeds diverge.
    s.sampling.temperature = 16.0f;
    s.sampling.top_k = 0;
    s.sampling.seed = seed;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    return s;
  }

  // Submits and returns the sink's target.
  static JobId SubmitTo(Engine& e, EngineJobSpec spec, std::shared_ptr<JobOut> out,
                        std::shared_ptr<std::mutex> mu) {
    auto sink = [out, mu](const EngineEvent& ev) {
      std::lock_guard<std::mutex> l(*mu);
      switch (ev.kind) {
        case EngineEvent::Kind::kTokens: {
          ThreadOut& t = out->threads[ev.thread_index];
          t.tokens.insert(t.tokens.end(), ev.token_ids.begin(), ev.token_ids.end());
          t.logprobs.insert(t.logprobs.end(), ev.logprobs.begin(), ev.logprobs.end());
          t.top.insert(t.top.end(), ev.top_logprobs.begin(), ev.top_logprobs.end());
          t.text += ev.text;
          break;
        }
        case EngineEvent::Kind::kThreadFinished: {
          ThreadOut& t = out->threads[ev.thread_index];
          t.finished = true;
          t.reason = ev.reason;
          t.final_text = ev.text;
          t.message = ev.message;
          t.preemptions = ev.preemptions;
          break;
        }
        case EngineEvent::Kind::kJobFinished:
          out->finished = true;
          break;
      }
    };
    auto id = e.Submit(std::move(spec), sink);
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }

  static void RunUntilIdle(Engine& e, int max_steps = 5000) {
    for (int i = 0; i < max_steps && !e.Idle(); ++i) {
      auto r = e.Step();
      ASSERT_TRUE(r.ok()) << r.status();
    }
    ASSERT_TRUE(e.Idle()) << "engine did not finish within " << max_steps << " steps";
  }

  // Runs an n-thread job unconstrained and under a budget of about 1.5 full threads; every thread
  // must come out identical, and some must have been preempted and recomputed.
  void PreemptionCase(int32_t n);

  static inline std::string dir_;
  static inline std::string skip_reason_;
  static inline Model* model_ = nullptr;
  static inline Tokenizer* tok_ = nullptr;
};

TEST_F(EngineTest, ForkedThreads_n4_EqualIndependentRuns) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  auto mu = std::make_shared<std::mutex>();
  auto forked = std::make_shared<JobOut>();
  SubmitTo(engine, Spec({0, 1, 2, 3}, 24, 7), forked, mu);
  // One step prefills the root and forks: the four threads share the prompt's blocks.
  ASSERT_TRUE(engine.Step().ok());
  const int64_t used = backend->kv().total_blocks() - backend->kv().free_blocks();
  EXPECT_GT(used, 0);
  EXPECT_LT(used, 4 * DenseBlocks(*backend, 19 + 1)) << "forked threads should share the prompt";
  RunUntilIdle(engine);

  std::vector<std::shared_ptr<JobOut>> alone;
  for (int32_t i = 0; i < 4; ++i) {
    alone.push_back(std::make_shared<JobOut>());
    SubmitTo(engine, Spec({i}, 24, 7), alone.back(), mu);
    RunUntilIdle(engine);
  }
  ASSERT_TRUE(forked->finished);
  std::set<std::vector<int32_t>> distinct;
  for (int32_t i = 0; i < 4; ++i) {
    const ThreadOut& f = forked->threads[i];
    const ThreadOut& a = alone[i]->threads[i];
    ASSERT_TRUE(f.finished && a.finished);
    EXPECT_EQ(f.reason, FinishReason::kLength);
    EXPECT_EQ(f.tokens.size(), 24u);
    EXPECT_EQ(f.tokens, a.tokens) << "thread " << i;
    EXPECT_EQ(f.final_text, a.final_text) << "thread " << i;
    EXPECT_EQ(f.text, f.final_text);
    distinct.insert(f.tokens);
  }
  EXPECT_GT(distinct.size(), 1u) << "different seeds should give different threads";
  EXPECT_EQ(backend->kv().free_blocks(), backend->kv().total_blocks());
}

TEST_F(EngineTest, CancelFreesBlocksWithinOneStep) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  auto mu = std::make_shared<std::mutex>();
  auto out = std::make_shared<JobOut>();
  JobId id = SubmitTo(engine, Spec({0, 1, 2, 3}, 500, 1), out, mu);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(engine.Step().ok());
  EXPECT_LT(backend->kv().free_blocks(), backend->kv().total_blocks());
  EXPECT_EQ(engine.Stats().running_threads, 4);
  ASSERT_TRUE(engine.Cancel(id).ok());
  ASSERT_TRUE(engine.Step().ok());
  EXPECT_EQ(backend->kv().free_blocks(), backend->kv().total_blocks());
  EXPECT_TRUE(out->finished);
  for (int32_t i = 0; i < 4; ++i) EXPECT_EQ(out->threads[i].reason, FinishReason::kCancelled);
  EXPECT_TRUE(engine.Idle());
  EXPECT_EQ(engine.Cancel(id).code(), absl::StatusCode::kNotFound);
}

TEST_F(EngineTest, CancelOneThreadLeavesOthersRunning) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  auto mu = std::make_shared<std::mutex>();
  auto out = std::make_shared<JobOut>();
  JobId id = SubmitTo(engine, Spec({0, 1, 2}, 12, 3), out, mu);
  ASSERT_TRUE(engine.Step().ok());
  ASSERT_TRUE(engine.Cancel(id, 1).ok());
  RunUntilIdle(engine);
  EXPECT_EQ(out->threads[1].reason, FinishReason::kCancelled);
  EXPECT_EQ(out->threads[0].reason, FinishReason::kLength);
  EXPECT_EQ(out->threads[2].reason, FinishReason::kLength);
  EXPECT_EQ(backend->kv().free_blocks(), backend->kv().total_blocks());
}

TEST_F(EngineTest, PreemptionUnderTinyBudget_n4_MatchesUnconstrainedRun) {
  PreemptionCase(4);
}

// Eight threads: even the fork's copy-on-write blocks do not all fit, so threads are preempted
// right after the fork and recomputed one by one.
TEST_F(EngineTest, PreemptionUnderTinyBudget_n8_MatchesUnconstrainedRun) {
  PreemptionCase(8);
}

void EngineTest::PreemptionCase(int32_t n) {
  const int32_t kMaxTokens = 45;
  std::vector<int32_t> idx;
  for (int32_t i = 0; i < n; ++i) idx.push_back(i);
  auto mu = std::make_shared<std::mutex>();
  // Unconstrained.
  auto big = MakeBackend(8 << 20);
  ASSERT_NE(big, nullptr);
  Engine e1(*big, *tok_, *model_);
  auto ref = std::make_shared<JobOut>();
  SubmitTo(e1, Spec(idx, kMaxTokens, 5), ref, mu);
  RunUntilIdle(e1);
  EXPECT_EQ(e1.Stats().preemptions, 0);

  // A budget that holds about one and a half full threads: the threads must take turns.
  auto probe = MakeBackend(8 << 20);
  const int64_t per_thread = DenseBlocks(*probe, 19 + kMaxTokens);
  const int64_t block_bytes = probe->kv().block_bytes();
  probe.reset();
  auto small = MakeBackend(per_thread * 3 / 2 * block_bytes);
  ASSERT_NE(small, nullptr);
  ASSERT_LT(small->kv().total_blocks(), 2 * per_thread);
  Engine e2(*small, *tok_, *model_);
  auto got = std::make_shared<JobOut>();
  SubmitTo(e2, Spec(idx, kMaxTokens, 5), got, mu);
  int64_t max_used = 0;
  for (int i = 0; i < 5000 && !e2.Idle(); ++i) {
    ASSERT_TRUE(e2.Step().ok());
    max_used = std::max(max_used, small->kv().total_blocks() - small->kv().free_blocks());
  }
  ASSERT_TRUE(e2.Idle());
  EXPECT_GT(e2.Stats().preemptions, 0) << "the budget was meant to force preemption";
  EXPECT_LE(max_used, small->kv().total_blocks());
  int32_t preempted_threads = 0;
  for (int32_t i = 0; i < n; ++i) {
    const ThreadOut& r = ref->threads[i];
    const ThreadOut& g = got->threads[i];
    ASSERT_TRUE(g.finished);
    EXPECT_EQ(g.reason, FinishReason::kLength) << g.message;
    EXPECT_EQ(g.tokens, r.tokens) << "thread " << i;
    EXPECT_EQ(g.final_text, r.final_text) << "thread " << i;
    preempted_threads += g.preemptions > 0 ? 1 : 0;
  }
  EXPECT_GT(preempted_threads, 0);
  EXPECT_EQ(small->kv().free_blocks(), small->kv().total_blocks());
}

TEST_F(EngineTest, SequenceThatCannotFitAloneFailsWithReason) {
  auto probe = MakeBackend(8 << 20);
  const int64_t per_thread = DenseBlocks(*probe, 19 + 64);
  const int64_t block_bytes = probe->kv().block_bytes();
  probe.reset();
  auto small = MakeBackend(per_thread / 2 * block_bytes);
  ASSERT_NE(small, nullptr);
  Engine engine(*small, *tok_, *model_);
  auto mu = std::make_shared<std::mutex>();
  auto out = std::make_shared<JobOut>();
  SubmitTo(engine, Spec({0}, 64, 2), out, mu);
  RunUntilIdle(engine);
  ASSERT_TRUE(out->finished);
  EXPECT_EQ(out->threads[0].reason, FinishReason::kPreemptedFailed);
  EXPECT_NE(out->threads[0].message.find("KV budget"), std::string::npos) << out->threads[0].message;
  EXPECT_EQ(small->kv().free_blocks(), small->kv().total_blocks());
}

TEST_F(EngineTest, RejectsBadJobs) {
  auto backend = MakeBackend(1 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  EngineJobSpec empty = Spec({0}, 4, 0);
  empty.prompt.clear();
  EXPECT_EQ(engine.Submit(empty, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.Submit(Spec({}, 4, 0), nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.Submit(Spec({1, 1}, 4, 0), nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.Submit(Spec({0}, 0, 0), nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EngineJobSpec bad_id = Spec({0}, 4, 0);
  bad_id.prompt[0] = 1 << 30;
  EXPECT_EQ(engine.Submit(bad_id, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EngineJobSpec too_many = Spec({0}, 4, 0);
  too_many.top_logprobs = kMaxTopLogprobs + 1;
  EXPECT_EQ(engine.Submit(too_many, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  too_many.top_logprobs = -1;
  EXPECT_EQ(engine.Submit(too_many, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.Cancel(12345).code(), absl::StatusCode::kNotFound);
}

TEST_F(EngineTest, TopLogprobs_k5_OneListingPerTokenOnlyWhenAsked) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  auto mu = std::make_shared<std::mutex>();
  // Greedy, two threads: the first token comes from the root's logits (ForkRoot), the rest from
  // decode steps, and both paths must list.
  EngineJobSpec greedy = Spec({0, 1}, 11, 3);
  greedy.sampling.temperature = 0.0f;
  greedy.top_logprobs = 5;
  auto listed = std::make_shared<JobOut>();
  SubmitTo(engine, greedy, listed, mu);
  greedy.top_logprobs = 0;
  auto plain = std::make_shared<JobOut>();
  SubmitTo(engine, greedy, plain, mu);
  RunUntilIdle(engine);
  ASSERT_TRUE(listed->finished && plain->finished);
  for (int32_t i : {0, 1}) {
    const ThreadOut& t = listed->threads[i];
    ASSERT_EQ(t.tokens.size(), 11u);
    ASSERT_EQ(t.top.size(), t.tokens.size()) << "thread " << i;
    for (size_t j = 0; j < t.tokens.size(); ++j) {
      const std::vector<TokenLogprob>& top = t.top[j];
      ASSERT_EQ(top.size(), 5u);
      EXPECT_EQ(top[0].token, t.tokens[j]) << "greedy picks the most likely token";
      EXPECT_EQ(top[0].logprob, t.logprobs[j]);
      for (size_t k = 1; k < top.size(); ++k) EXPECT_GE(top[k - 1].logprob, top[k].logprob);
    }
    // The listing changes nothing else.
    EXPECT_EQ(plain->threads[i].tokens, t.tokens);
    EXPECT_EQ(plain->threads[i].logprobs, t.logprobs);
    EXPECT_TRUE(plain->threads[i].top.empty());
  }
}

TEST_F(EngineTest, BackgroundThreadWithConcurrentSubmitters) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  engine.Start();
  auto mu = std::make_shared<std::mutex>();
  std::vector<std::shared_ptr<JobOut>> outs(12);
  std::vector<std::thread> clients;
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([&, c] {
      for (int j = 0; j < 4; ++j) {
        auto o = std::make_shared<JobOut>();
        outs[c * 4 + j] = o;
        SubmitTo(engine, Spec({0, 1}, 6, c * 10 + j), o, mu);
      }
    });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < 3000 && !engine.Idle(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  engine.Stop();
  ASSERT_TRUE(engine.Idle());
  for (auto& o : outs) {
    std::lock_guard<std::mutex> l(*mu);
    EXPECT_TRUE(o->finished);
    EXPECT_EQ(o->threads.size(), 2u);
  }
  EngineStats s = engine.Stats();
  EXPECT_EQ(s.generation_tokens_total, 12 * 2 * 6);
  EXPECT_EQ(s.kv_blocks_used, 0);
}

// The peaks are sampled at every forward step, before the last step's finished threads free
// their blocks: after a 4-thread job the peak shows 4 running threads and the blocks of the last
// step, while the current figures are back to 0.
TEST_F(EngineTest, PeaksCountTheLastStepBeforeBlocksAreFreed) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  Engine engine(*backend, *tok_, *model_);
  auto mu = std::make_shared<std::mutex>();
  auto out = std::make_shared<JobOut>();
  SubmitTo(engine, Spec({0, 1, 2, 3}, 20, 3), out, mu);
  RunUntilIdle(engine);
  const EngineStats s = engine.Stats();
  EXPECT_EQ(s.running_threads, 0);
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.peak_running_threads, 4);
  // Four threads of 19 + 19 tokens in the KV cache at the last step (the 20th token is sampled
  // from it, never stored), sharing the prompt's first full block: at least the blocks of 4
  // threads' own 3rd block onwards, at most 4 dense copies.
  EXPECT_GE(s.peak_kv_blocks_used, DenseBlocks(*backend, 38));
  EXPECT_LE(s.peak_kv_blocks_used, 4 * DenseBlocks(*backend, 38));
}

// A backend that samples where the logits are (Backend::samples_on_device, the CUDA backend) gets
// every decode row of a job as a sampled chunk: no logits row comes back to the host, the draw is
// the counter-based one seeded by the thread's seed and the position drawn, and the engine
// streams the backend's tokens and log-probabilities. The fork of the prompt, and a job that asks
// for top log-probabilities, keep host rows. Here a wrapper around the CPU backend says it
// samples on the device; the CPU backend samples such chunks with the same reference rule.
TEST_F(EngineTest, DeviceSamplingBackendDrawsDecodeRows) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  struct Draw {
    uint64_t seed, counter;
    int32_t token;
    float logprob;
    int64_t position;
  };
  struct DeviceSampling : Backend {
    Backend& inner;
    std::vector<Draw> draws;
    int64_t host_rows = 0, sampled_with_logits = 0;
    explicit DeviceSampling(Backend& b) : inner(b) {}
    const char* name() const override { return "device-sampling"; }
    bool samples_on_device() const override { return true; }
    absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override {
      std::vector<int64_t> pos;
      for (const SeqChunk& c : batch) pos.push_back(inner.kv().Length(c.seq) + static_cast<int64_t>(c.tokens.size()));
      absl::StatusOr<ForwardResult> r = inner.Forward(batch);
      if (!r.ok()) return r;
      for (size_t ci = 0; ci < batch.size(); ++ci) {
        if (batch[ci].sample) {
          if (batch[ci].logits != SeqChunk::Logits::kNone) ++sampled_with_logits;
          draws.push_back({batch[ci].sampling.seed, batch[ci].sampling.counter, r->sampled[ci],
                           r->sampled_logprob[ci], pos[ci]});
        } else if (batch[ci].logits != SeqChunk::Logits::kNone) {
          ++host_rows;
        }
      }
      // What a device backend returns: no row for a chunk that was only sampled.
      ForwardResult out;
      out.vocab = r->vocab;
      out.sampled = r->sampled;
      out.sampled_logprob = r->sampled_logprob;
      for (size_t row = 0; row < r->row_chunk.size(); ++row) {
        const int32_t ci = r->row_chunk[row];
        if (batch[ci].logits == SeqChunk::Logits::kNone) continue;
        out.row_chunk.push_back(ci);
        out.logits.insert(out.logits.end(), r->logits.begin() + row * r->vocab,
                          r->logits.begin() + (row + 1) * r->vocab);
      }
      return out;
    }
    KvCache& kv() override { return inner.kv(); }
  };
  auto run = [&](int32_t top_logprobs, DeviceSampling& dev) {
    Engine engine(dev, *tok_, *model_, EngineOptions{});
    auto mu = std::make_shared<std::mutex>();
    auto out = std::make_shared<JobOut>();
    EngineJobSpec spec = Spec({0, 1}, 7, 40);
    spec.top_logprobs = top_logprobs;
    SubmitTo(engine, std::move(spec), out, mu);
    RunUntilIdle(engine);
    EXPECT_TRUE(out->finished);
    return *out;
  };
  DeviceSampling dev(*backend);
  const JobOut a = run(0, dev);
  EXPECT_EQ(dev.sampled_with_logits, 0);
  EXPECT_EQ(dev.host_rows, 1) << "only the prompt's last row comes back (the fork)";
  ASSERT_EQ(dev.draws.size(), 2u * 6u) << "every token after the first of each thread";
  std::map<uint64_t, std::vector<Draw>> by_seed;
  for (const Draw& d : dev.draws) by_seed[d.seed].push_back(d);
  ASSERT_EQ(by_seed.size(), 2u);
  for (int32_t idx : {0, 1}) {
    const std::vector<Draw>& ds = by_seed[40 + idx];  // the thread's seed: the job's + its index
    const ThreadOut& t = a.threads.at(idx);
    ASSERT_EQ(t.tokens.size(), 7u);
    ASSERT_EQ(ds.size(), 6u);
    for (size_t i = 0; i < ds.size(); ++i) {
      EXPECT_EQ(ds[i].counter, static_cast<uint64_t>(19 + 1 + i)) << "the position drawn";
      EXPECT_EQ(static_cast<int64_t>(ds[i].counter), ds[i].position);
      EXPECT_EQ(t.tokens[i + 1], ds[i].token);
      EXPECT_EQ(t.logprobs[i + 1], ds[i].logprob);
    }
  }
  // The draws depend only on (seed, position): the same job again gives the same threads.
  DeviceSampling again(*backend);
  const JobOut b = run(0, again);
  for (int32_t idx : {0, 1}) EXPECT_EQ(a.threads.at(idx).tokens, b.threads.at(idx).tokens);
  // A listing of top log-probabilities needs the rows: such a job samples on the host.
  DeviceSampling listed(*backend);
  const JobOut c = run(3, listed);
  EXPECT_TRUE(listed.draws.empty());
  EXPECT_EQ(listed.host_rows, 1 + 2 * 6);
  for (int32_t idx : {0, 1}) EXPECT_EQ(c.threads.at(idx).top.size(), 7u);
}

// The engine reads time only through EngineOptions::clock: with a simulated clock that moves
// 0.25 s per forward step, tokens/s is exactly tokens / (steps x 0.25 s), and Stats() keeps it
// until the simulated clock is 2 s past the last step.
// A backend wrapper that advances a simulated clock by 0.25 s per forward pass.
struct TimedBackend : Backend {
  Backend& inner;
  SimClock& clock;
  TimedBackend(Backend& b, SimClock& c) : inner(b), clock(c) {}
  const char* name() const override { return "timed"; }
  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override {
    clock.AdvanceSeconds(0.25);
    return inner.Forward(batch);
  }
  KvCache& kv() override { return inner.kv(); }
};

TEST_F(EngineTest, InjectedClockTimesSteps) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  SimClock clock;
  TimedBackend timed(*backend, clock);
  EngineOptions o;
  o.clock = &clock;
  Engine engine(timed, *tok_, *model_, o);
  auto mu = std::make_shared<std::mutex>();
  auto out = std::make_shared<JobOut>();
  SubmitTo(engine, Spec({0, 1}, 6, 3), out, mu);
  // Step 1 prefills the prompt and samples each thread's first token; steps 2..6 decode one token
  // per thread.
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine.Step().ok());
  EngineStats s = engine.Stats();
  EXPECT_DOUBLE_EQ(clock.Seconds(), 0.75);
  EXPECT_DOUBLE_EQ(s.tokens_per_second, 6.0 / 0.75);
  clock.AdvanceSeconds(1.9);
  EXPECT_DOUBLE_EQ(engine.Stats().tokens_per_second, 6.0 / 0.75);
  clock.AdvanceSeconds(0.2);
  EXPECT_EQ(engine.Stats().tokens_per_second, 0.0);
  RunUntilIdle(engine);
  EXPECT_TRUE(out->finished);
}

// on_step gets every step's shape and duration: the prompt's prefill, then one decode row per
// thread reading that thread's resident tokens and its new one (serve --step-log; plan
// --check-steps).
TEST_F(EngineTest, StepHookReportsEachStepsShape) {
  auto backend = MakeBackend(8 << 20);
  ASSERT_NE(backend, nullptr);
  SimClock clock;
  TimedBackend timed(*backend, clock);
  std::vector<std::pair<StepShape, double>> steps;
  EngineOptions o;
  o.clock = &clock;
  o.on_step = [&steps](const StepShape& s, double seconds) { steps.emplace_back(s, seconds); };
  Engine engine(timed, *tok_, *model_, o);
  auto mu = std::make_shared<std::mutex>();
  auto out = std::make_shared<JobOut>();
  SubmitTo(engine, Spec({0, 1}, 6, 3), out, mu);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine.Step().ok());
  // Two threads of a 19-token prompt.
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0].first.decode_rows, 0);
  EXPECT_EQ(steps[0].first.prefill_tokens, 19);
  EXPECT_EQ(steps[0].first.sampled_rows, 1);
  for (int i = 1; i < 3; ++i) {
    EXPECT_EQ(steps[i].first.decode_rows, 2) << "step " << i;
    EXPECT_EQ(steps[i].first.prefill_tokens, 0) << "step " << i;
    EXPECT_EQ(steps[i].first.kv_tokens, 2 * (19 + i)) << "step " << i;  // dense: all resident
    EXPECT_EQ(steps[i].first.sampled_rows, 2) << "step " << i;
  }
  for (const auto& [shape, seconds] : steps) {
    EXPECT_EQ(shape.retries, 0);
    EXPECT_DOUBLE_EQ(seconds, 0.25);
  }
  RunUntilIdle(engine);
  EXPECT_TRUE(out->finished);
}

// With on_idle set, the stepping thread calls it while there is no work; its errors, like step
// errors other than a full cache, go to on_failure.
TEST_F(EngineTest, IdleHookRunsWhileIdleAndReportsFailures) {
  auto backend = MakeBackend(1 << 20);
  ASSERT_NE(backend, nullptr);
  EngineOptions o;
  std::atomic<int> idles{0};
  std::mutex fmu;
  std::vector<absl::Status> failures;
  o.idle_period = absl::Milliseconds(20);
  o.on_idle = [&] {
    return ++idles == 3 ? absl::DeadlineExceededError("ping timed out") : absl::OkStatus();
  };
  o.on_failure = [&](const absl::Status& s) {
    std::lock_guard<std::mutex> l(fmu);
    failures.push_back(s);
  };
  Engine engine(*backend, *tok_, *model_, o);
  engine.Start();
  for (int i = 0; i < 500 && idles.load() < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  engine.Stop();
  EXPECT_GE(idles.load(), 5);
  std::lock_guard<std::mutex> l(fmu);
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_TRUE(absl::IsDeadlineExceeded(failures[0])) << failures[0];
}

// ---- answer extraction and voting ------------------------------------------------------------

TEST(AnswerTest, ExtractsBoxedWithBalancedBraces) {
  EXPECT_EQ(ExtractAnswer("so \\boxed{3} then \\boxed{\\frac{1}{2}} done", nullptr), "\\frac{1}{2}");
  EXPECT_EQ(ExtractAnswer("\\boxed{1,000}", nullptr), "1000");
  // An empty box (the prompt's instruction echoed) is skipped.
  EXPECT_EQ(ExtractAnswer("it is \\boxed{12}. Put it in \\boxed{}", nullptr), "12");
  EXPECT_EQ(ExtractAnswer("so 9. Answer: \\boxed{}", nullptr), "9");
}

TEST(AnswerTest, FallsBackToLastNumberNormalised) {
  EXPECT_EQ(ExtractAnswer("we get 12 apples, total 1,000.0.", nullptr), "1000");
  EXPECT_EQ(ExtractAnswer("x = -7", nullptr), "-7");
  EXPECT_EQ(ExtractAnswer("2.50", nullptr), "2.5");
  EXPECT_FALSE(ExtractAnswer("no digits here", nullptr).has_value());
}

TEST(AnswerTest, RegexUsesLastMatchAndGroup) {
  auto re = CompileAnswerRegex("answer is (\\w+)");
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(ExtractAnswer("answer is foo. no, answer is bar", re->get()), "bar");
  EXPECT_EQ(CompileAnswerRegex("(unclosed").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(AnswerTest, MajorityTiesGoToEarliestAndEarlyStop) {
  VoteTable v;
  v.Add(std::string("5"), -1.0);
  v.Add(std::string("7"), -0.5);
  EXPECT_EQ(v.Select(Selection::kMajorityVote), "5");
  EXPECT_EQ(v.Select(Selection::kMaxMeanLogprob), "7");
  EXPECT_EQ(v.Select(Selection::kFirstFinished), "5");
  v.Add(std::string("7"), -0.7);
  v.Add(std::nullopt, 0);
  EXPECT_EQ(v.Select(Selection::kMajorityVote), "7");
  EXPECT_EQ(v.abstained(), 1);
  // 7:2, 5:1 -> with 1 running the leader cannot be caught only if 2 > 1 + 1: not decided.
  EXPECT_FALSE(v.Decided(1));
  EXPECT_TRUE(v.Decided(0));
  v.Add(std::string("7"), -0.7);
  EXPECT_TRUE(v.Decided(1));  // 3 > 1 + 1
}

}  // namespace
}  // namespace dmsrt
