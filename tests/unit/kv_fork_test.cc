// Fork and copy-on-write: N forks of a prefilled prompt that diverge (different tokens and
// decision bits per fork) must give exactly the attention outputs and resident sets of N
// independent sequences fed the same tokens, while holding fewer blocks; Reserve must account
// for the copies; every reference count returns to zero once everything is freed. With dead
// slots (the CPU store's default) the same, except that the outputs may differ by summation
// order (the forks place their tokens in other slots), and that under eviction the forks keep
// sharing the prompt instead of copying it.
#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/kv/kv_cache.h"
#include "tests/unit/kv_test_util.h"

namespace dmsrt {
namespace {

using kvtest::FeedChunk;
using kvtest::Geo;
using kvtest::MakeStream;
using kvtest::Stream;

// Stream of fork f: the prompt's first `prompt` tokens, then the fork's own random tokens.
Stream ForkStream(const Stream& root, int32_t prompt, int32_t total, uint64_t seed, double p) {
  Stream s = MakeStream(total, root.n_layers, root.nh, root.nkv, root.hd, seed, p);
  for (int32_t l = 0; l < root.n_layers; ++l) {
    std::copy(root.q[l].begin(), root.q[l].begin() + (size_t)prompt * root.nh * root.hd, s.q[l].begin());
    std::copy(root.k[l].begin(), root.k[l].begin() + (size_t)prompt * root.nkv * root.hd, s.k[l].begin());
    std::copy(root.v[l].begin(), root.v[l].begin() + (size_t)prompt * root.nkv * root.hd, s.v[l].begin());
    std::copy(root.bits[l].begin(), root.bits[l].begin() + (size_t)prompt * root.nkv, s.bits[l].begin());
  }
  return s;
}

struct ForkCase {
  KvPolicyKind kind;
  int32_t window, budget, block, prompt, steps, forks;
};

class ForkCow : public ::testing::TestWithParam<std::tuple<ForkCase, bool>> {};

TEST_P(ForkCow, ForksMatchIndependentSequences) {
  const auto [c, dead_slots] = GetParam();
  const int32_t layers = 2, nkv = 2, nh = 4, hd = 12;
  KvPolicyConfig pol;
  pol.kind = c.kind;
  pol.window = c.window;
  pol.budget_tokens = c.budget;
  pol.sinks = 2;
  pol.force_rate = 0.7;
  pol.seed = 9;
  const bool bits = c.kind == KvPolicyKind::kDms;
  auto shared = MakeCpuKvCache(Geo(layers, nkv, nh, hd, c.block), pol, 8 << 20, dead_slots);
  auto indep = MakeCpuKvCache(Geo(layers, nkv, nh, hd, c.block), pol, 8 << 20);
  ASSERT_TRUE(shared.ok() && indep.ok());
  KvCache& S = **shared;
  KvCache& I = **indep;
  const int32_t total = c.prompt + c.steps;
  Stream root = MakeStream(total, layers, nh, nkv, hd, 100 + c.prompt, 0.6);

  auto rs = S.Create();
  ASSERT_TRUE(rs.ok());
  ASSERT_TRUE(FeedChunk(S, *rs, root, 0, c.prompt, bits).ok());
  const int64_t prompt_blocks = S.total_blocks() - S.free_blocks();
  std::vector<SeqId> forks, solos;
  std::vector<Stream> streams;
  for (int32_t f = 0; f < c.forks; ++f) {
    auto fs = f % 2 == 0 || forks.empty() ? S.Fork(*rs) : S.Fork(forks.back());  // forks of forks too
    ASSERT_TRUE(fs.ok());
    forks.push_back(*fs);
    streams.push_back(ForkStream(root, c.prompt, total, 1000 + f, 0.3 + 0.1 * f));
    auto is = I.Create();
    ASSERT_TRUE(is.ok());
    solos.push_back(*is);
    ASSERT_TRUE(FeedChunk(I, *is, streams[f], 0, c.prompt, bits).ok());
  }
  // No copy yet: forking shares everything.
  EXPECT_EQ(S.total_blocks() - S.free_blocks(), prompt_blocks);
  EXPECT_EQ(S.Figures().blocks_held, prompt_blocks);
  EXPECT_EQ(S.Figures(forks[0]).blocks_held, prompt_blocks);
  // The root is freed; its blocks stay alive through the forks.
  ASSERT_TRUE(S.Free(*rs).ok());
  EXPECT_EQ(S.total_blocks() - S.free_blocks(), prompt_blocks);

  // Diverge: forks take turns, with decode steps and small chunks.
  std::mt19937 rng(c.steps);
  std::vector<int32_t> pos(c.forks, c.prompt);
  bool any = true;
  while (any) {
    any = false;
    for (int32_t f = 0; f < c.forks; ++f) {
      if (pos[f] >= total) continue;
      any = true;
      const int32_t n = std::min<int32_t>(total - pos[f], rng() % 3 == 0 ? 1 + rng() % 5 : 1);
      std::vector<std::vector<float>> a, b;
      ASSERT_TRUE(FeedChunk(S, forks[f], streams[f], pos[f], n, bits, &a).ok());
      ASSERT_TRUE(FeedChunk(I, solos[f], streams[f], pos[f], n, bits, &b).ok());
      if (dead_slots) {
        for (int32_t l = 0; l < layers; ++l) {
          for (size_t i = 0; i < a[l].size(); ++i) {
            ASSERT_NEAR(a[l][i], b[l][i], 1e-5 * (1 + std::fabs(b[l][i])))
                << "fork " << f << " at " << pos[f] << " layer " << l;
          }
        }
      } else {
        ASSERT_EQ(a, b) << "fork " << f << " at " << pos[f];
      }
      pos[f] += n;
      for (int32_t l = 0; l < layers; ++l)
        for (int32_t j = 0; j < nkv; ++j)
          ASSERT_EQ(S.ResidentPositions(forks[f], l, j), I.ResidentPositions(solos[f], l, j));
    }
  }
  const KvFigures fs = S.Figures(), fi = I.Figures();
  EXPECT_EQ(fs.logical_tokens, fi.logical_tokens);
  EXPECT_EQ(fs.resident_tokens, fi.resident_tokens);
  EXPECT_EQ(fs.kv_reads - fi.kv_reads, 0);
  EXPECT_LE(fs.blocks_held, fi.blocks_held);
  if (c.kind == KvPolicyKind::kNone || c.kind == KvPolicyKind::kDms ||
      c.kind == KvPolicyKind::kForced) {
    // Unflagged prompt tokens are never rewritten, so their blocks stay shared. (window and
    // tova/h2o eventually rewrite every slot of the prompt, and each fork then owns copies.)
    EXPECT_LT(fs.blocks_held, fi.blocks_held) << "sharing should save blocks";
  }
  EXPECT_EQ(fs.blocks_held, S.total_blocks() - S.free_blocks());
  int64_t per_seq_sum = 0;
  for (SeqId f : forks) per_seq_sum += S.Figures(f).blocks_held;
  EXPECT_GE(per_seq_sum, fs.blocks_held);  // shared blocks are counted once in the total
  for (SeqId f : forks) ASSERT_TRUE(S.Free(f).ok());
  for (SeqId f : solos) ASSERT_TRUE(I.Free(f).ok());
  EXPECT_EQ(S.free_blocks(), S.total_blocks());  // every reference count is back to zero
  EXPECT_EQ(I.free_blocks(), I.total_blocks());
}

INSTANTIATE_TEST_SUITE_P(
    Policies, ForkCow,
    ::testing::Combine(::testing::Values(ForkCase{KvPolicyKind::kNone, 0, 0, 4, 19, 13, 5},
                      ForkCase{KvPolicyKind::kDms, 3, 0, 4, 21, 30, 6},
                      ForkCase{KvPolicyKind::kDms, 8, 0, 16, 48, 40, 4},
                      ForkCase{KvPolicyKind::kDms, 1, 0, 1, 7, 25, 3},
                      ForkCase{KvPolicyKind::kForced, 5, 0, 3, 33, 40, 4},
                      ForkCase{KvPolicyKind::kWindow, 6, 0, 5, 20, 30, 3},
                      ForkCase{KvPolicyKind::kTova, 0, 12, 4, 20, 25, 3},
                      ForkCase{KvPolicyKind::kH2o, 0, 10, 3, 18, 25, 3}),
                       ::testing::Bool()),
    [](const auto& info) {
      const ForkCase& c = std::get<0>(info.param);
      return absl::StrCat(KvPolicyName(c.kind), "_w", c.window, "_budget", c.budget, "_block",
                          c.block, "_prompt", c.prompt, "_steps", c.steps, "_forks", c.forks,
                          std::get<1>(info.param) ? "_dead_slots" : "_cow");
    });

// The best-of-N shape: many forks of a prompt under forced eviction, in three stores: the CPU
// store with dead slots, the same with copy-on-write, and an index with dead slots (the
// planner's). The same outputs (to summation order) and resident sets in all, and the index
// keeps exactly the CPU store's books. Returns the blocks held by the two CPU stores at the end.
std::pair<int64_t, int64_t> ForkBlocks(int32_t prompt, int32_t steps, int32_t forks, int32_t window,
                                       double rate, int64_t* prompt_blocks) {
  const int32_t layers = 2, nkv = 2, nh = 4, hd = 8, block = 16;
  KvPolicyConfig pol;
  pol.kind = KvPolicyKind::kForced;
  pol.window = window;
  pol.force_rate = rate;
  pol.seed = 3;
  const KvGeometry geo = Geo(layers, nkv, nh, hd, block);
  auto dead = MakeCpuKvCache(geo, pol, 16 << 20, /*dead_slots=*/true);
  auto cow = MakeCpuKvCache(geo, pol, 16 << 20, /*dead_slots=*/false);
  const int64_t row_bytes = 256;
  auto index = MakeKvIndex(geo, pol, 4096 * row_bytes, row_bytes, /*dead_slots=*/true);
  EXPECT_TRUE(dead.ok() && cow.ok() && index.ok());
  KvCache& D = **dead;
  KvCache& C = **cow;
  KvIndex& X = **index;
  class Discard final : public KvSlotSink {
    void CopyBlock(int32_t, int32_t) override {}
    void WriteSlot(int32_t, int32_t, int32_t, int32_t, int32_t, int32_t) override {}
  } sink;
  auto feed_index = [&](SeqId id, int32_t n) {
    EXPECT_TRUE(X.Reserve(id, n).ok());
    for (int32_t l = 0; l < layers; ++l) EXPECT_TRUE(X.CommitRows(id, l, n, 0, nullptr, sink));
  };
  Stream root = MakeStream(prompt + steps, layers, nh, nkv, hd, 41, 0.5);
  const SeqId rd = *D.Create(), rc = *C.Create(), rx = *X.Create();
  EXPECT_TRUE(FeedChunk(D, rd, root, 0, prompt, false).ok());
  EXPECT_TRUE(FeedChunk(C, rc, root, 0, prompt, false).ok());
  feed_index(rx, prompt);
  *prompt_blocks = D.total_blocks() - D.free_blocks();
  std::vector<SeqId> fd, fc, fx;
  std::vector<Stream> streams;
  for (int32_t f = 0; f < forks; ++f) {
    fd.push_back(*D.Fork(rd));
    fc.push_back(*C.Fork(rc));
    fx.push_back(*X.Fork(rx));
    streams.push_back(ForkStream(root, prompt, prompt + steps, 70 + f, 0.5));
  }
  for (int32_t t = prompt; t < prompt + steps; ++t) {
    for (int32_t f = 0; f < forks; ++f) {
      std::vector<std::vector<float>> a, b;
      EXPECT_TRUE(FeedChunk(D, fd[f], streams[f], t, 1, false, &a).ok());
      EXPECT_TRUE(FeedChunk(C, fc[f], streams[f], t, 1, false, &b).ok());
      feed_index(fx[f], 1);
      for (int32_t l = 0; l < layers; ++l) {
        for (size_t i = 0; i < a[l].size(); ++i) {
          EXPECT_NEAR(a[l][i], b[l][i], 1e-5 * (1 + std::fabs(b[l][i]))) << "fork " << f << " at " << t;
        }
        for (int32_t j = 0; j < nkv; ++j) {
          EXPECT_EQ(D.ResidentPositions(fd[f], l, j), C.ResidentPositions(fc[f], l, j));
          EXPECT_EQ(D.ResidentPositions(fd[f], l, j), X.ResidentPositions(fx[f], l, j));
        }
      }
    }
  }
  EXPECT_EQ(X.Figures().blocks_held, D.Figures().blocks_held);
  EXPECT_EQ(X.Figures().resident_tokens, D.Figures().resident_tokens);
  EXPECT_EQ(X.Figures().kv_reads, D.Figures().kv_reads);
  EXPECT_EQ(D.Figures().resident_tokens, C.Figures().resident_tokens);
  const std::pair<int64_t, int64_t> held{D.total_blocks() - D.free_blocks(),
                                         C.total_blocks() - C.free_blocks()};
  std::printf("prompt %d tokens, %lld blocks; %d forks of %d tokens hold %lld blocks with dead "
              "slots, %lld with copy-on-write\n", prompt, static_cast<long long>(*prompt_blocks),
              forks, steps, static_cast<long long>(held.first), static_cast<long long>(held.second));
  for (SeqId f : fd) EXPECT_TRUE(D.Free(f).ok());
  EXPECT_TRUE(D.Free(rd).ok());
  EXPECT_EQ(D.free_blocks(), D.total_blocks());
  return held;
}

// A long prompt: each fork's first w+1 tokens push the prompt's last tokens out of its ring, and
// ring recycling has scattered those over every block of the prompt, so with copy-on-write each
// fork ends up copying nearly all of them; with dead slots the prompt stays shared and a fork
// holds little more than its own tokens (its window and a fifth of the rest: 2 blocks per head,
// where copy-on-write adds most of the prompt's 3).
TEST(ForkDeadSlots, ForksKeepALongPromptShared_forced08_w8_prompt160) {
  int64_t prompt_blocks = 0;
  const auto [dead, cow] = ForkBlocks(160, 40, 8, 8, 0.8, &prompt_blocks);
  const int64_t own = 2 * 2 * ((8 + 1 + 40 / 5 + 15) / 16);
  EXPECT_LE(dead, prompt_blocks + 8 * own);
  EXPECT_GT(cow, prompt_blocks + 8 * own);
}

// A short prompt whose ring sits mostly in one block: dead slots there would be followed by a
// copy anyway, so the fork copies at once and holds no more than with copy-on-write.
TEST(ForkDeadSlots, ShortPromptCostsNoMoreThanCopies_forced0875_w16_prompt64) {
  int64_t prompt_blocks = 0;
  const auto [dead, cow] = ForkBlocks(64, 48, 16, 16, 0.875, &prompt_blocks);
  EXPECT_LE(dead, cow);
}

// Reserve counts copy-on-write copies: with the pool exactly full, a fork that must copy a shared
// block cannot reserve, and the other sequences are untouched.
TEST(ForkCowBudget, ReserveCountsCopies_block4) {
  const int32_t layers = 1, nkv = 1, nh = 2, hd = 8, block = 4;
  KvPolicyConfig pol;  // dense
  const int64_t bb = 2 * block * hd * 4;
  auto cache = MakeCpuKvCache(Geo(layers, nkv, nh, hd, block), pol, 4 * bb);
  ASSERT_TRUE(cache.ok());
  KvCache& kv = **cache;
  Stream s = MakeStream(16, layers, nh, nkv, hd, 5, 0.5);
  auto root = kv.Create();
  ASSERT_TRUE(FeedChunk(kv, *root, s, 0, 6, false).ok());  // 2 blocks, the second half full
  auto child = kv.Fork(*root);
  ASSERT_TRUE(child.ok());
  auto other = kv.Create();
  ASSERT_TRUE(FeedChunk(kv, *other, s, 0, 8, false).ok());  // 2 blocks: the pool is full
  EXPECT_EQ(kv.free_blocks(), 0);
  // The child's next token goes into the shared, half-full block: a copy is needed.
  absl::Status st = kv.Reserve(*child, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  ASSERT_TRUE(kv.Free(*other).ok());
  // Now there is room: fork and root both write, one copy happens, root writes in place.
  ASSERT_TRUE(FeedChunk(kv, *child, s, 6, 1, false).ok());
  EXPECT_EQ(kv.free_blocks(), 1);
  ASSERT_TRUE(FeedChunk(kv, *root, s, 6, 1, false).ok());
  EXPECT_EQ(kv.free_blocks(), 1);
  ASSERT_TRUE(kv.Free(*root).ok());
  ASSERT_TRUE(kv.Free(*child).ok());
  EXPECT_EQ(kv.free_blocks(), 4);
}

// A tight pool under random forks, steps and preemptions: whenever Reserve succeeds the step
// completes (the reservation covers new blocks and copies), outputs equal those of a mirror cache
// with room to spare, and a refused Reserve leaves everything as it was.
class TightPool : public ::testing::TestWithParam<KvPolicyKind> {};

TEST_P(TightPool, StressForksStepsPreemptions_w3_block2_pool60) {
  const int32_t layers = 2, nkv = 2, nh = 4, hd = 5, block = 2;
  KvPolicyConfig pol;
  pol.kind = GetParam();
  pol.window = 3;
  pol.sinks = 1;
  pol.force_rate = 0.6;
  pol.budget_tokens = 6;
  const int64_t bb = 2 * block * hd * 4;
  auto tight = MakeCpuKvCache(Geo(layers, nkv, nh, hd, block), pol, 60 * bb);
  auto roomy = MakeCpuKvCache(Geo(layers, nkv, nh, hd, block), pol, 8 << 20);
  ASSERT_TRUE(tight.ok() && roomy.ok());
  KvCache& A = **tight;
  KvCache& B = **roomy;
  const int32_t T = 200;
  std::mt19937 rng(17);
  struct Live {
    SeqId a, b;
    Stream s;
  };
  std::vector<Live> live;
  int refused = 0, steps = 0, forks = 0;
  for (int iter = 0; iter < 1500; ++iter) {
    const int r = rng() % 10;
    if (live.empty() || r == 0) {
      auto a = A.Create();
      auto b = B.Create();
      ASSERT_TRUE(a.ok() && b.ok());
      live.push_back({*a, *b, MakeStream(T, layers, nh, nkv, hd, rng(), 0.5)});
      continue;
    }
    const size_t i = rng() % live.size();
    if (r == 1 && live.size() < 6) {
      auto a = A.Fork(live[i].a);
      auto b = B.Fork(live[i].b);
      ASSERT_TRUE(a.ok() && b.ok());
      // The fork continues with its own tokens after the shared prefix.
      const int64_t len = A.Length(*a);
      Stream s = MakeStream(T, layers, nh, nkv, hd, rng(), 0.3);
      for (int32_t l = 0; l < layers; ++l) {
        std::copy(live[i].s.q[l].begin(), live[i].s.q[l].begin() + len * nh * hd, s.q[l].begin());
        std::copy(live[i].s.k[l].begin(), live[i].s.k[l].begin() + len * nkv * hd, s.k[l].begin());
        std::copy(live[i].s.v[l].begin(), live[i].s.v[l].begin() + len * nkv * hd, s.v[l].begin());
        std::copy(live[i].s.bits[l].begin(), live[i].s.bits[l].begin() + len * nkv, s.bits[l].begin());
      }
      live.push_back({*a, *b, std::move(s)});
      ++forks;
      continue;
    }
    const int64_t pos = A.Length(live[i].a);
    if (r == 2 || pos >= T - 8) {
      ASSERT_TRUE(A.Free(live[i].a).ok());
      ASSERT_TRUE(B.Free(live[i].b).ok());
      live.erase(live.begin() + i);
      continue;
    }
    const int32_t n = rng() % 4 == 0 ? 1 + rng() % 7 : 1;
    const int64_t free_before = A.free_blocks();
    std::vector<std::vector<float>> oa, ob;
    absl::Status st = FeedChunk(A, live[i].a, live[i].s, (int32_t)pos, n, true, &oa);
    if (!st.ok()) {
      ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
      ASSERT_EQ(A.free_blocks(), free_before);
      ASSERT_EQ(A.Length(live[i].a), pos);
      ++refused;
      // Preempt: drop the sequence (the scheduler would recompute it later).
      ASSERT_TRUE(A.Free(live[i].a).ok());
      ASSERT_TRUE(B.Free(live[i].b).ok());
      live.erase(live.begin() + i);
      continue;
    }
    ASSERT_TRUE(FeedChunk(B, live[i].b, live[i].s, (int32_t)pos, n, true, &ob).ok());
    ASSERT_EQ(oa, ob) << "iteration " << iter;
    ASSERT_LE(A.total_blocks() - A.free_blocks(), 60);
    ++steps;
  }
  EXPECT_GT(refused, 5);
  EXPECT_GT(steps, 500);
  EXPECT_GT(forks, 20);
  for (auto& l : live) {
    ASSERT_TRUE(A.Free(l.a).ok());
    ASSERT_TRUE(B.Free(l.b).ok());
  }
  EXPECT_EQ(A.free_blocks(), A.total_blocks());
  EXPECT_EQ(B.free_blocks(), B.total_blocks());
}

INSTANTIATE_TEST_SUITE_P(Policies, TightPool,
                         ::testing::Values(KvPolicyKind::kNone, KvPolicyKind::kDms,
                                           KvPolicyKind::kForced, KvPolicyKind::kWindow,
                                           KvPolicyKind::kTova, KvPolicyKind::kH2o),
                         [](const auto& info) { return std::string(KvPolicyName(info.param)); });

}  // namespace
}  // namespace dmsrt
