// What the tensor-parallel backend tests share (tests/mpi/tp_backend_test.cc on the CPU backend,
// tests/mpi/tp_cuda_backend_test.cc on the CUDA backend): the test cases and their policies, the
// scripted workload every backend runs (so that the TP group's results can be compared with a
// single rank's), the comparisons of its logits, the full-pool test, and main() under mpirun.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/comm.h"
#include "parallel/comm_factory.h"
#include "parallel/world.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/tp_replica.h"
#include "runtime/model/model.h"
#include "tests/logits_test_util.h"

namespace dmsrt {
namespace tptest {

// The process's parallel context under mpirun (RunTpTests sets it); null otherwise, and every
// test skips.
inline ParallelContext* g_par = nullptr;

// $env/name, or fallback/name.
inline std::string ModelDir(const char* env, const char* fallback, const std::string& name) {
  const char* root = std::getenv(env);
  return std::string(root ? root : fallback) + "/" + name;
}

using logits_test::Argmax;    // tests/logits_test_util.h
using logits_test::Margin;
using logits_test::RelError;

// A model under one KV policy.
struct Case {
  std::string model;   // directory under the tests' model root
  std::string file;    // file inside it ("" = the directory is an HF model)
  std::string policy;  // none | forced | dms | tova | h2o
};

inline void PrintTo(const Case& c, std::ostream* os) { *os << c.model << "/" << c.policy; }

inline std::string CaseName(const ::testing::TestParamInfo<Case>& i) {
  return i.param.model + "_" + i.param.policy;
}

// The case's policy in `o`: forced at 0.75 with window 4, dms with the model's window, tova and
// h2o with 10 tokens per head.
inline void ApplyPolicy(const Case& tc, const Model& model, BackendOptions* o) {
  if (tc.policy == "forced") {
    o->kv_policy.kind = KvPolicyKind::kForced;
    o->kv_policy.force_rate = 0.75;
    o->kv_policy.window = 4;
    o->kv_policy.seed = 7;
  } else if (tc.policy == "dms") {
    o->kv_policy.kind = KvPolicyKind::kDms;
    o->kv_policy.window = model.config.dms.window;
  } else if (tc.policy == "tova" || tc.policy == "h2o") {
    o->kv_policy.kind = tc.policy == "tova" ? KvPolicyKind::kTova : KvPolicyKind::kH2o;
    o->kv_policy.budget_tokens = 10;
  }
}

// The scripted workload: a 21-token prompt in two chunks, a fork that takes another branch,
// `steps` batched steps of both (every third one gives the fork a 3-token chunk next to the
// parent's decode token), the parent freed before step `free_at`, and a final reservation.
// Tokens come from each step's greedy choice or, with `replay`, from the list, so that every
// backend sees the same inputs. With `sample`, the fork's chunks ask for a sampled token.
struct ScriptShape {
  int steps = 14;
  int free_at = 9;
  bool sample = false;
};

struct Script {
  std::vector<int32_t> chosen;             // tokens fed after each choice, in order
  std::vector<std::vector<float>> logits;  // every step's returned rows
  std::vector<SeqId> live;                 // sequences alive at the end
  int sampled = 0, sampled_wrong = 0;      // samples, and those not their row's argmax
};

inline absl::Status RunScript(Backend& b, const ScriptShape& shape,
                              const std::vector<int32_t>* replay, Script* out) {
  KvCache& kv = b.kv();
  size_t next = 0;
  auto choose = [&](const float* row, int32_t vocab, int32_t bump) {
    int32_t t = (Argmax(row, vocab) + bump) % vocab;
    if (replay != nullptr) t = (*replay)[next++];
    out->chosen.push_back(t);
    return t;
  };
  auto forward = [&](const std::vector<SeqChunk>& batch) -> absl::StatusOr<ForwardResult> {
    absl::StatusOr<ForwardResult> r = b.Forward(batch);
    if (!r.ok()) return r.status();
    out->logits.push_back(r->logits);
    // A sampled chunk's token (greedy) is the argmax of its returned last row.
    for (size_t row = 0; row < r->row_chunk.size(); ++row) {
      const size_t ci = static_cast<size_t>(r->row_chunk[row]);
      const bool last = row + 1 == r->row_chunk.size() || r->row_chunk[row + 1] != r->row_chunk[row];
      if (!batch[ci].sample || !last) continue;
      ++out->sampled;
      out->sampled_wrong += r->sampled[ci] != Argmax(r->logits.data() + row * r->vocab, r->vocab);
    }
    return r;
  };
  std::vector<int32_t> prompt;
  for (int i = 0; i < 21; ++i) prompt.push_back((i * 37 + 11) % 150 + 3);

  absl::StatusOr<SeqId> a = kv.Create();
  if (!a.ok()) return a.status();
  absl::StatusOr<ForwardResult> r = forward(
      {MakeChunk(*a, std::vector<int32_t>(prompt.begin(), prompt.begin() + 13), SeqChunk::Logits::kAll)});
  if (!r.ok()) return r.status();
  r = forward({MakeChunk(*a, std::vector<int32_t>(prompt.begin() + 13, prompt.end()))});
  if (!r.ok()) return r.status();
  const int32_t vocab = r->vocab;
  int32_t ta = choose(r->logits.data(), vocab, 0);
  int32_t tb = choose(r->logits.data(), vocab, 1);  // the fork takes another branch

  absl::StatusOr<SeqId> bseq = kv.Fork(*a);
  if (!bseq.ok()) return bseq.status();
  bool a_live = true;
  for (int step = 0; step < shape.steps; ++step) {
    if (step == shape.free_at) {  // free the parent; the fork keeps its shared blocks
      absl::Status s = kv.Free(*a);
      if (!s.ok()) return s;
      a_live = false;
    }
    std::vector<SeqChunk> batch;
    if (a_live) batch.push_back(MakeChunk(*a, {ta}));
    SeqChunk fc = step % 3 == 1 ? MakeChunk(*bseq, {tb, (tb + 5) % vocab, 7}, SeqChunk::Logits::kAll)
                                : MakeChunk(*bseq, {tb});
    fc.sample = shape.sample;
    batch.push_back(std::move(fc));
    r = forward(batch);
    if (!r.ok()) return r.status();
    if (a_live) ta = choose(r->logits.data(), vocab, 0);
    const size_t row = r->row_chunk.size() - 1;  // the fork's last row
    tb = choose(r->logits.data() + row * vocab, vocab, 0);
  }
  absl::Status s = kv.Reserve(*bseq, 4);
  if (!s.ok()) return s;
  out->live = {*bseq};
  return absl::OkStatus();
}

// Rows whose choice the reference makes at a margin of at least `min_margin`, and how many of
// them the other run's argmax agrees on.
struct Agreement {
  int decisive = 0, agree = 0;
};

inline Agreement GreedyAgreement(const Script& got, const Script& ref, int32_t vocab,
                                 double min_margin) {
  Agreement a;
  for (size_t i = 0; i < ref.logits.size(); ++i) {
    const size_t rows = ref.logits[i].size() / vocab;
    for (size_t row = 0; row < rows; ++row) {
      const float* want = ref.logits[i].data() + row * vocab;
      if (Margin(want, vocab) < min_margin) continue;
      ++a.decisive;
      a.agree += Argmax(got.logits[i].data() + row * vocab, vocab) == Argmax(want, vocab);
    }
  }
  return a;
}

inline std::vector<float> Flatten(const Script& s) {
  std::vector<float> all;
  for (const auto& step : s.logits) all.insert(all.end(), step.begin(), step.end());
  return all;
}

using BackendMaker =
    std::function<absl::StatusOr<std::unique_ptr<Backend>>(const Model&, const BackendOptions&)>;

// A full KV pool on any rank fails the step on every rank alike (RESOURCE_EXHAUSTED at the
// leader, the followers keep following), and the group goes on after a sequence is freed.
// `opts` (with the communicator) must fill up within 2000 decode steps.
inline void ExpectFullPoolFailsEverywhere(const Model& model, const BackendOptions& opts,
                                          const BackendMaker& make) {
  Communicator* comm = opts.comm;
  absl::StatusOr<std::unique_ptr<Backend>> shard = make(model, opts);
  ASSERT_TRUE(shard.ok()) << shard.status();
  if (comm->rank() != 0) {
    absl::Status s = RunTpFollower(**shard, comm);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_TRUE(comm->Barrier().ok());
    return;
  }
  absl::StatusOr<std::unique_ptr<Backend>> l = MakeTpLeaderBackend(std::move(*shard), comm);
  ASSERT_TRUE(l.ok()) << l.status();
  Backend& b = **l;
  absl::StatusOr<SeqId> seq = b.kv().Create();
  ASSERT_TRUE(seq.ok()) << seq.status();
  absl::Status last;
  int steps = 0;
  for (; steps < 2000; ++steps) {
    absl::StatusOr<ForwardResult> r =
        b.Forward({MakeChunk(*seq, {static_cast<int32_t>(3 + steps % 100)})});
    if (!r.ok()) {
      last = r.status();
      break;
    }
  }
  EXPECT_TRUE(absl::IsResourceExhausted(last)) << last;
  EXPECT_GT(steps, 0);
  const int64_t full_free = b.kv().free_blocks();
  ASSERT_TRUE(b.kv().Free(*seq).ok());
  EXPECT_GT(b.kv().free_blocks(), full_free);
  seq = b.kv().Create();
  ASSERT_TRUE(seq.ok()) << seq.status();
  absl::StatusOr<ForwardResult> r = b.Forward({MakeChunk(*seq, {5, 6, 7})});
  EXPECT_TRUE(r.ok()) << r.status();
  std::printf("[tp %d] %s: pool full after %d decode steps: %s\n", comm->size(), b.name(), steps,
              std::string(last.message()).c_str());
  ASSERT_TRUE(ShutdownTpFollowers(b).ok());
  ASSERT_TRUE(comm->Barrier().ok());
}

// main(): under mpirun, the parallel context (g_par) for the tests; outside it, the tests skip.
inline int RunTpTests(int* argc, char*** argv, const ParallelOptions& opts) {
  std::unique_ptr<ParallelContext> par;
  if (InsideMpirun()) {
    absl::StatusOr<ParallelContext> p = InitParallel(argc, argv, opts);
    if (!p.ok()) {
      std::fprintf(stderr, "InitParallel: %s\n", p.status().ToString().c_str());
      return 1;
    }
    par = std::make_unique<ParallelContext>(std::move(*p));
    g_par = par.get();
  }
  const int rc = RUN_ALL_TESTS();
  g_par = nullptr;
  return rc;
}

}  // namespace tptest
}  // namespace dmsrt
