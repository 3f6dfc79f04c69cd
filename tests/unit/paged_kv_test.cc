// The paged KV layer (runtime/kv/paged_kv.h) that device backends use, run here on host pools with
// the plain C++ references of the CUDA kernels as its operations, against the CPU KvCache on the
// same token streams: attention outputs, resident sets and figures must agree for every policy
// the index supports, through forks (shared blocks whose tokens one fork has flagged and another
// has not), mixed steps of decode tokens and prefill chunks, and frees. Under policy dms the
// decode-only steps also run with deferred decision bits (handed over after the step, as the
// CUDA backend does), which must change nothing.
#include "runtime/kv/paged_kv.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "kernels/reference/attention_ref.h"
#include "tests/unit/kv_test_util.h"

namespace dmsrt {
namespace {

using kvtest::Geo;
using kvtest::MakeStream;
using kvtest::Stream;

constexpr int32_t kNever = std::numeric_limits<int32_t>::max();

// Host pools + the references of the CUDA kernels.
class HostOps final : public PagedKvOps {
 public:
  HostOps(const KvGeometry& g, int64_t blocks) : g_(g) {
    const size_t slots = static_cast<size_t>(blocks) * g.block_tokens;
    k_.assign(slots * g.head_dim, std::nanf(""));
    v_.assign(slots * g.head_dim, std::nanf(""));
    pos_.assign(slots, -1);
    last_vis_.assign(slots, kNever);
  }
  // The step's rows for the current layer.
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  float* out = nullptr;
  int set_calls = 0, prefill_calls = 0, decode_calls = 0, copies = 0;

  void SetLastVisible(const std::vector<std::pair<int32_t, int32_t>>& slots) override {
    ++set_calls;
    ExpectDistinct(slots, [](const auto& p) { return p.first; }, "SetLastVisible slot");
    for (auto [s, val] : slots) {
      EXPECT_EQ(last_vis_[s], kNever) << "last_vis left set in slot " << s;
      last_vis_[s] = val;
    }
  }
  void ResetLastVisible(const std::vector<std::pair<int32_t, int32_t>>& slots) override {
    for (auto [s, val] : slots) last_vis_[s] = kNever;
  }
  void PrefillAttention(const PagedChunk& c, int32_t q_pos0, const std::vector<int32_t>& table,
                        int32_t max_blocks, const std::vector<int32_t>& old_lengths,
                        const std::vector<int32_t>& last_vis_new) override {
    ++prefill_calls;
    const int64_t qw = static_cast<int64_t>(g_.n_heads) * g_.head_dim;
    const int64_t kw = static_cast<int64_t>(g_.n_kv_heads) * g_.head_dim;
    kernels::PrefillAttentionRef(c.n, q_pos0, g_.n_heads, g_.n_kv_heads, g_.head_dim,
                                 g_.block_tokens, max_blocks, Scale(), q + c.row0 * qw,
                                 k + c.row0 * kw, v + c.row0 * kw, last_vis_new.data(), k_.data(),
                                 v_.data(), pos_.data(), last_vis_.data(), table.data(),
                                 old_lengths.data(), out + c.row0 * qw);
  }
  void CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& pairs) override {
    const int64_t bt = g_.block_tokens, hd = g_.head_dim;
    ExpectDistinct(pairs, [](const auto& p) { return p.second; }, "CopyBlocks destination");
    for (auto [src, dst] : pairs) {
      for (auto [s2, d2] : pairs) EXPECT_NE(src, d2) << "block " << src << " copied and overwritten";
    }
    for (auto [src, dst] : pairs) {
      ++copies;
      std::copy_n(k_.begin() + src * bt * hd, bt * hd, k_.begin() + dst * bt * hd);
      std::copy_n(v_.begin() + src * bt * hd, bt * hd, v_.begin() + dst * bt * hd);
      std::copy_n(pos_.begin() + src * bt, bt, pos_.begin() + dst * bt);
      std::copy_n(last_vis_.begin() + src * bt, bt, last_vis_.begin() + dst * bt);
    }
  }
  void WriteSlots(const std::vector<KvSlotWrite>& writes) override {
    const int64_t hd = g_.head_dim, kw = static_cast<int64_t>(g_.n_kv_heads) * hd;
    ExpectDistinct(writes, [](const KvSlotWrite& w) { return w.slot; }, "WriteSlots slot");
    for (const KvSlotWrite& w : writes) {
      std::copy_n(k + w.row * kw + w.head * hd, hd, k_.begin() + w.slot * hd);
      std::copy_n(v + w.row * kw + w.head * hd, hd, v_.begin() + w.slot * hd);
      pos_[w.slot] = w.pos;
    }
  }
  void DecodeAttention(int32_t batch, const int32_t* tables, int32_t max_blocks,
                       const int32_t* lengths, int32_t max_length) override {
    ++decode_calls;
    for (int32_t i = 0; i < batch * g_.n_kv_heads; ++i) EXPECT_LE(lengths[i], max_length);
    kernels::DecodeAttentionRef(batch, g_.n_heads, g_.n_kv_heads, g_.head_dim, g_.block_tokens,
                                max_blocks, Scale(), q, k_.data(), v_.data(), tables, lengths, out);
    Remember(batch, tables, max_blocks, lengths);
  }

  // Victim policies: the weights of every layer of the step, [layers][batch, n_kv, slot_ld]
  // (what the CUDA backend brings back), from the last decode call's tables.
  int32_t slot_ld = 0;
  std::vector<float> weights;
  void DecodeSlotWeights(int32_t layer) override {
    ASSERT_GT(slot_ld, 0);
    const size_t layer_floats = static_cast<size_t>(last_batch_) * g_.n_kv_heads * slot_ld;
    weights.resize(std::max(weights.size(), (layer + 1) * layer_floats), std::nanf(""));
    kernels::DecodeSlotWeightsRef(last_batch_, g_.n_heads, g_.n_kv_heads, g_.head_dim,
                                  g_.block_tokens, last_max_blocks_, Scale(), q, k_.data(),
                                  last_tables_.data(), last_lengths_.data(),
                                  weights.data() + layer * layer_floats, slot_ld);
  }

  // Resident tables, when `resident` is set: per layer [rows, n_kv, cap], garbage after a resize
  // (an entry read before it is written shows up as a block outside the pool).
  bool resident = false;
  int64_t entries_sent = 0, entries_used = 0;
  int resizes = 0;
  int64_t last_sent = 0, last_batch = 0;  // entries and batch of the last call
  bool ResizeDecodeTables(int32_t rows, int32_t cap) override {
    if (!resident) return false;
    ++resizes;
    rows_ = rows;
    cap_ = cap;
    tables_.assign(g_.n_layers,
                   std::vector<int32_t>(static_cast<size_t>(rows) * g_.n_kv_heads * cap, -7));
    return true;
  }
  void DecodeAttentionRows(int32_t layer, const std::vector<std::pair<int32_t, int32_t>>& entries,
                           int32_t batch, const std::vector<int32_t>& table_rows,
                           const std::vector<int32_t>& lengths, int32_t max_length) override {
    ++decode_calls;
    ExpectDistinct(entries, [](const auto& p) { return p.first; }, "decode table entry");
    for (auto [i, b] : entries) {
      ASSERT_GE(i, 0);
      ASSERT_LT(static_cast<size_t>(i), tables_[layer].size());
      tables_[layer][i] = b;
    }
    entries_sent += static_cast<int64_t>(entries.size());
    last_sent = static_cast<int64_t>(entries.size());
    last_batch = batch;
    const int32_t nkv = g_.n_kv_heads, bt = g_.block_tokens;
    const int64_t blocks = static_cast<int64_t>(k_.size()) / (bt * g_.head_dim);
    ASSERT_EQ(static_cast<int32_t>(table_rows.size()), batch);
    std::vector<int32_t> dense(static_cast<size_t>(batch) * nkv * cap_);
    for (int32_t b = 0; b < batch; ++b) {
      ASSERT_GE(table_rows[b], 0);
      ASSERT_LT(table_rows[b], rows_);
      for (int32_t j = 0; j < nkv; ++j) {
        const int32_t len = lengths[b * nkv + j];
        EXPECT_LE(len, max_length);
        ASSERT_LE(len, cap_ * bt);
        const int32_t* src = tables_[layer].data() + (static_cast<size_t>(table_rows[b]) * nkv + j) * cap_;
        for (int32_t i = 0; i < (len + bt - 1) / bt; ++i) {
          ASSERT_GE(src[i], 0) << "layer " << layer << " row " << b << " head " << j << " entry " << i;
          ASSERT_LT(src[i], blocks);
        }
        entries_used += (len + bt - 1) / bt;
        std::copy_n(src, cap_, dense.begin() + (static_cast<size_t>(b) * nkv + j) * cap_);
      }
    }
    kernels::DecodeAttentionRef(batch, g_.n_heads, nkv, g_.head_dim, bt, cap_, Scale(), q,
                                k_.data(), v_.data(), dense.data(), lengths.data(), out);
    Remember(batch, dense.data(), cap_, lengths.data());
  }

 private:
  // A device runs the elements of one call in parallel: the same target twice is a race.
  template <typename T, typename Key>
  static void ExpectDistinct(const std::vector<T>& v, Key key, const char* what) {
    std::set<int32_t> seen;
    for (const T& e : v) EXPECT_TRUE(seen.insert(key(e)).second) << what << " " << key(e) << " twice in one call";
  }
  float Scale() const { return 1.0f / std::sqrt(static_cast<float>(g_.head_dim)); }
  void Remember(int32_t batch, const int32_t* tables, int32_t max_blocks, const int32_t* lengths) {
    const size_t heads = static_cast<size_t>(batch) * g_.n_kv_heads;
    last_batch_ = batch;
    last_max_blocks_ = max_blocks;
    last_tables_.assign(tables, tables + heads * max_blocks);
    last_lengths_.assign(lengths, lengths + heads);
  }
  int32_t last_batch_ = 0, last_max_blocks_ = 0;
  std::vector<int32_t> last_tables_, last_lengths_;
  int32_t rows_ = 0, cap_ = 0;
  std::vector<std::vector<int32_t>> tables_;
  KvGeometry g_;
  std::vector<float> k_, v_;
  std::vector<int32_t> pos_, last_vis_;
};

struct Case {
  const char* name;
  KvPolicyConfig policy;
  bool defer = false;  // decode-only steps commit without their bits, given after the step
  bool resident = false;  // decode tables kept between steps (PagedKvOps::ResizeDecodeTables)
};

KvPolicyConfig Policy(KvPolicyKind kind, int32_t window, double rate = 0, int32_t sinks = 2) {
  KvPolicyConfig p;
  p.kind = kind;
  p.window = window;
  p.force_rate = rate;
  p.sinks = sinks;
  p.seed = 11;
  return p;
}

KvPolicyConfig WithDmsSinks(KvPolicyConfig p, int32_t sinks) {
  p.dms_sinks = sinks;
  return p;
}

class PagedKvTest : public ::testing::TestWithParam<Case> {};

TEST_P(PagedKvTest, MatchesCpuStoreThroughForksAndMixedSteps) {
  const KvGeometry geo = Geo(/*layers=*/2, /*nkv=*/2, /*nh=*/4, /*hd=*/8, /*block=*/4);
  const KvPolicyConfig pol = GetParam().policy;
  const int64_t cpu_block_bytes = 2 * 4 * 8 * sizeof(float);
  const int64_t budget = 400 * cpu_block_bytes;
  // The CPU store in the layout of the index it checks (no dead slots: the reference kernels read
  // every slot below the length, as the CUDA ones do).
  auto cpu_or = MakeCpuKvCache(geo, pol, budget, /*dead_slots=*/false);
  ASSERT_TRUE(cpu_or.ok()) << cpu_or.status();
  auto idx_or = MakeKvIndex(geo, pol, budget, cpu_block_bytes);
  ASSERT_TRUE(idx_or.ok()) << idx_or.status();
  KvCache& cpu = **cpu_or;
  KvIndex& idx = **idx_or;
  HostOps ops(geo, idx.total_blocks());
  ops.resident = GetParam().resident;
  PagedKvLayer layer_runner;

  // One random stream per logical sequence (forks continue their own stream after the prefix).
  const int32_t kT = 40;
  const Stream base = MakeStream(kT, geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim, 1, 0.5);
  std::map<int, Stream> streams;
  for (int s = 1; s < 6; ++s) {
    streams[s] = MakeStream(kT, geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim, 100 + s, 0.5);
  }
  // Logical sequence -> (cpu id, index id); tokens before `fork_at` come from `base`.
  struct Seq { SeqId cpu, idx; int stream; int fork_at; };
  std::map<int, Seq> seqs;
  auto stream_of = [&](const Seq& s, int32_t t) -> const Stream& {
    return t < s.fork_at ? base : streams[s.stream];
  };

  // One step: (logical seq, tokens); decode chunks (one token) are placed first.
  int deferred_steps = 0;
  auto step = [&](std::vector<std::pair<int, int32_t>> batch) {
    std::stable_sort(batch.begin(), batch.end(),
                     [](auto& a, auto& b) { return (a.second == 1) > (b.second == 1); });
    std::vector<PagedChunk> chunks;
    int32_t rows = 0, n_decode = 0;
    for (auto [ls, n] : batch) {
      const Seq& s = seqs.at(ls);
      ASSERT_TRUE(cpu.Reserve(s.cpu, n).ok());
      ASSERT_TRUE(idx.Reserve(s.idx, n).ok());
      chunks.push_back(PagedChunk{s.idx, rows, n});
      if (n == 1 && n_decode == static_cast<int32_t>(chunks.size()) - 1) ++n_decode;
      rows += n;
    }
    const int64_t qw = static_cast<int64_t>(geo.n_heads) * geo.head_dim;
    const int64_t kw = static_cast<int64_t>(geo.n_kv_heads) * geo.head_dim;
    const bool defer = GetParam().defer && PagedKvLayer::CanDeferBits(idx, chunks, n_decode);
    if (defer) ++deferred_steps;
    std::vector<uint8_t> step_bits;  // [layer, rows, n_kv] when deferred
    std::vector<int64_t> start;
    for (auto [ls, n] : batch) start.push_back(cpu.Length(seqs.at(ls).cpu));
    for (int32_t l = 0; l < geo.n_layers; ++l) {
      std::vector<float> q(rows * qw), k(rows * kw), v(rows * kw), out_ref(rows * qw),
          out(rows * qw, std::nanf(""));
      std::vector<uint8_t> bits(static_cast<size_t>(rows) * geo.n_kv_heads);
      for (size_t ci = 0; ci < batch.size(); ++ci) {
        const Seq& s = seqs.at(batch[ci].first);
        for (int32_t i = 0; i < chunks[ci].n; ++i) {
          const int32_t t = static_cast<int32_t>(start[ci]) + i;
          const Stream& st = stream_of(s, t);
          const int32_t r = chunks[ci].row0 + i;
          std::copy_n(st.qt(l, t), qw, q.begin() + r * qw);
          std::copy_n(st.kt(l, t), kw, k.begin() + r * kw);
          std::copy_n(st.vt(l, t), kw, v.begin() + r * kw);
          std::copy_n(st.bt(l, t), geo.n_kv_heads, bits.begin() + r * geo.n_kv_heads);
        }
      }
      const bool dms = pol.kind == KvPolicyKind::kDms;
      for (size_t ci = 0; ci < batch.size(); ++ci) {
        const PagedChunk& c = chunks[ci];
        cpu.AttendAndAppend(seqs.at(batch[ci].first).cpu, l, c.n, &q[c.row0 * qw], &k[c.row0 * kw],
                            &v[c.row0 * kw], dms ? &bits[c.row0 * geo.n_kv_heads] : nullptr,
                            &out_ref[c.row0 * qw]);
      }
      ops.q = q.data();
      ops.k = k.data();
      ops.v = v.data();
      ops.out = out.data();
      if (defer) {
        step_bits.insert(step_bits.end(), bits.begin(), bits.end());
        ASSERT_TRUE(layer_runner.Run(idx, l, chunks, n_decode, nullptr, ops, true).ok());
      } else {
        ASSERT_TRUE(layer_runner.Run(idx, l, chunks, n_decode, dms ? bits.data() : nullptr, ops).ok());
      }
      for (int64_t i = 0; i < rows * qw; ++i) {
        ASSERT_NEAR(out[i], out_ref[i], 1e-4 * (1 + std::fabs(out_ref[i])))
            << GetParam().name << " layer " << l << " element " << i;
      }
    }
    if (defer) {
      for (const PagedChunk& c : chunks) {
        ASSERT_TRUE(idx.SetDeferredBits(c.seq, step_bits.data() + c.row0 * geo.n_kv_heads,
                                        rows * geo.n_kv_heads).ok());
      }
    }
    // Given bits reach the ring only at the next commit; the figures count them already.
    ASSERT_EQ(cpu.Figures().flagged_tokens, idx.Figures().flagged_tokens) << GetParam().name;
    for (auto& [ls, s] : seqs) {
      ASSERT_EQ(cpu.Length(s.cpu), idx.Length(s.idx));
      for (int32_t l = 0; l < geo.n_layers; ++l) {
        for (int32_t j = 0; j < geo.n_kv_heads; ++j) {
          const auto resident = idx.ResidentPositions(s.idx, l, j);
          ASSERT_EQ(cpu.ResidentPositions(s.cpu, l, j), resident)
              << GetParam().name << " seq " << ls << " layer " << l << " head " << j;
          // dms sinks: the first tokens stay whatever bits flagged them, deferred or not.
          const int64_t sinks = std::min<int64_t>(pol.dms_sinks, idx.Length(s.idx));
          for (int64_t t = 0; t < sinks; ++t) {
            ASSERT_TRUE(std::find(resident.begin(), resident.end(), t) != resident.end())
                << GetParam().name << " sink " << t << " left: seq " << ls << " layer " << l
                << " head " << j;
          }
        }
      }
    }
  };
  auto create = [&](int ls, int stream) {
    seqs[ls] = Seq{*cpu.Create(), *idx.Create(), stream, 0};
  };
  auto fork = [&](int parent, int ls, int stream) {
    const Seq& p = seqs.at(parent);
    seqs[ls] = Seq{*cpu.Fork(p.cpu), *idx.Fork(p.idx), stream,
                   static_cast<int>(cpu.Length(p.cpu))};
  };

  create(0, 1);
  seqs[0].fork_at = kT;  // the prompt: all from `base`
  step({{0, 9}});
  fork(0, 1, 2);
  fork(0, 2, 3);
  create(3, 4);
  step({{1, 1}, {3, 6}, {2, 1}});
  for (int i = 0; i < 6; ++i) step({{1, 1}, {2, 1}, {3, 1}});
  // Compress, then continue (FreezeEviction): sequence 3 stops evicting from here, and so does
  // its fork; on the index path a step's bits no longer flag its tokens, in a chunk either.
  ASSERT_TRUE(cpu.FreezeEviction(seqs[3].cpu).ok());
  ASSERT_TRUE(idx.FreezeEviction(seqs[3].idx).ok());
  EXPECT_EQ(idx.FirstFlaggable(seqs[3].idx), std::numeric_limits<int64_t>::max());
  EXPECT_EQ(idx.FirstFlaggable(seqs[1].idx), pol.kind == KvPolicyKind::kDms ? pol.dms_sinks : 0);
  fork(3, 5, 5);  // right after a decode-only step: its bits are given, not yet in the ring
  step({{5, 1}, {3, 1}});
  ASSERT_TRUE(cpu.Free(seqs[0].cpu).ok());
  ASSERT_TRUE(idx.Free(seqs[0].idx).ok());
  seqs.erase(0);
  step({{2, 3}, {1, 1}});  // a chunk on a fork whose prefix blocks are still shared
  fork(1, 4, 4);
  step({{4, 5}, {1, 1}, {3, 2}});
  for (int i = 0; i < 5; ++i) step({{4, 1}, {1, 1}, {2, 1}, {3, 1}});

  const KvFigures fc = cpu.Figures(), fi = idx.Figures();
  EXPECT_EQ(fc.logical_tokens, fi.logical_tokens);
  EXPECT_EQ(fc.resident_tokens, fi.resident_tokens);
  EXPECT_EQ(fc.flagged_tokens, fi.flagged_tokens);
  EXPECT_EQ(fc.kv_reads, fi.kv_reads);
  EXPECT_EQ(fc.dense_reads, fi.dense_reads);
  EXPECT_EQ(fc.blocks_held, fi.blocks_held);
  EXPECT_EQ(cpu.free_blocks(), idx.free_blocks());
  EXPECT_GT(ops.prefill_calls, 0);
  EXPECT_GT(ops.decode_calls, 0);
  EXPECT_GT(ops.copies, 0) << "no copy-on-write happened: the test lost its fork coverage";
  if (pol.kind != KvPolicyKind::kNone) {
    EXPECT_GT(ops.set_calls, 0);
  }
  if (GetParam().defer && pol.window >= 1) {
    EXPECT_GE(deferred_steps, 12) << "the deferred path did not run";
  }
  if (GetParam().resident) {
    // The tables grew along the way, and a steady decode step sends one entry per head (the
    // one its write touched), not whole tables.
    EXPECT_GT(ops.resizes, 1);
    EXPECT_LT(ops.entries_sent, ops.entries_used);
    EXPECT_EQ(ops.last_sent, ops.last_batch * geo.n_kv_heads)
        << "the last decode step rebuilt tables instead of updating them";
  }
  for (auto& [ls, s] : seqs) {
    ASSERT_TRUE(cpu.Free(s.cpu).ok());
    ASSERT_TRUE(idx.Free(s.idx).ok());
  }
  EXPECT_EQ(idx.free_blocks(), idx.total_blocks());
}

INSTANTIATE_TEST_SUITE_P(
    Policies, PagedKvTest,
    ::testing::Values(Case{"none", Policy(KvPolicyKind::kNone, 0)},
                      Case{"dms_w3", Policy(KvPolicyKind::kDms, 3)},
                      Case{"dms_w0", Policy(KvPolicyKind::kDms, 0)},
                      Case{"dms_w3_deferred", Policy(KvPolicyKind::kDms, 3), true},
                      Case{"dms_w1_deferred", Policy(KvPolicyKind::kDms, 1), true},
                      Case{"dms_w0_cannot_defer", Policy(KvPolicyKind::kDms, 0), true},
                      Case{"forced_w2", Policy(KvPolicyKind::kForced, 2, 0.5)},
                      Case{"none_resident_tables", Policy(KvPolicyKind::kNone, 0), false, true},
                      Case{"dms_w3_deferred_resident_tables", Policy(KvPolicyKind::kDms, 3), true, true},
                      Case{"forced_w2_resident_tables", Policy(KvPolicyKind::kForced, 2, 0.5), false, true},
                      Case{"window5", Policy(KvPolicyKind::kWindow, 5, 0, 2)},
                      Case{"dms_w3_sinks3", WithDmsSinks(Policy(KvPolicyKind::kDms, 3), 3)},
                      Case{"dms_w3_sinks3_deferred", WithDmsSinks(Policy(KvPolicyKind::kDms, 3), 3), true},
                      Case{"dms_w1_sinks2_deferred", WithDmsSinks(Policy(KvPolicyKind::kDms, 1), 2), true}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// A sink for bookkeeping-only tests: the data movement is not looked at.
struct NullSink final : KvSlotSink {
  void CopyBlock(int32_t, int32_t) override {}
  void WriteSlot(int32_t, int32_t, int32_t, int32_t, int32_t, int32_t) override {}
};

// Deferred bits against a pool kept nearly full: every Reserve that succeeds must cover the
// commits that follow, although a layer's block needs for the next token are computed while the
// bit that flags the previous token is still unknown (with w = 1 that token leaves next, and its
// slot may sit in a block a fork shares), and a chunk after a deferred step reserves from flags
// given but not yet applied. Random forks, frees, chunks and bits, windows 1..4.
TEST(PagedKvIndex, DeferredBitsKeepReservationsABound) {
  NullSink sink;
  int64_t exhausted = 0, forks = 0, commits = 0;
  for (int32_t w = 1; w <= 4; ++w) {
    for (uint32_t seed = 0; seed < 40; ++seed) {
      const KvGeometry geo = Geo(/*layers=*/2, /*nkv=*/2, /*nh=*/2, /*hd=*/8, /*block=*/2);
      KvPolicyConfig pol = Policy(KvPolicyKind::kDms, w);
      auto idx_or = MakeKvIndex(geo, pol, 40 * 256, 256);  // 40 blocks
      ASSERT_TRUE(idx_or.ok()) << idx_or.status();
      KvIndex& idx = **idx_or;
      std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(w));
      std::vector<SeqId> live;
      auto bits_of = [&](std::vector<uint8_t>* b) {
        for (auto& x : *b) x = rng() % 3 != 0;  // mostly flagged: many slots recycled
      };
      {
        const SeqId s = *idx.Create();
        ASSERT_TRUE(idx.Reserve(s, 5).ok());
        std::vector<uint8_t> b(5 * geo.n_kv_heads);
        bits_of(&b);
        for (int32_t l = 0; l < geo.n_layers; ++l) ASSERT_TRUE(idx.CommitRows(s, l, 5, 0, b.data(), sink));
        live.push_back(s);
      }
      for (int step = 0; step < 60 && !live.empty(); ++step) {
        if (rng() % 4 == 0 && live.size() < 6) {
          auto f = idx.Fork(live[rng() % live.size()]);
          ASSERT_TRUE(f.ok()) << f.status();
          live.push_back(*f);
          ++forks;
        }
        // Mostly deferred decode steps; sometimes a step of chunks (committed with their bits).
        const bool chunks = rng() % 5 == 0;
        const int32_t n = chunks ? 1 + static_cast<int32_t>(rng() % 4) : 1;
        std::vector<SeqId> batch;
        for (SeqId s : live) {
          const absl::Status r = idx.Reserve(s, n);
          if (r.ok()) {
            batch.push_back(s);
          } else {
            ASSERT_EQ(r.code(), absl::StatusCode::kResourceExhausted) << r;
            ++exhausted;
          }
        }
        if (batch.size() < live.size() && rng() % 2 == 0) {  // preempt one that did not fit
          for (size_t i = 0; i < live.size(); ++i) {
            if (std::find(batch.begin(), batch.end(), live[i]) == batch.end()) {
              ASSERT_TRUE(idx.Free(live[i]).ok());
              live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
              break;
            }
          }
        }
        if (chunks) {
          std::vector<uint8_t> b(static_cast<size_t>(n) * geo.n_kv_heads);
          for (int32_t l = 0; l < geo.n_layers; ++l) {
            for (SeqId s : batch) {
              bits_of(&b);
              ASSERT_TRUE(idx.CommitRows(s, l, n, 0, b.data(), sink))
                  << "a reserved chunk ran out of blocks: w " << w << " seed " << seed;
              ++commits;
            }
          }
          continue;
        }
        for (int32_t l = 0; l < geo.n_layers; ++l) {
          for (size_t b = 0; b < batch.size(); ++b) {
            ASSERT_TRUE(idx.CommitDecodeDeferred(batch[b], l, static_cast<int32_t>(b), sink))
                << "a reserved deferred commit ran out of blocks: w " << w << " seed " << seed
                << " step " << step;
            ++commits;
          }
        }
        std::vector<uint8_t> bits(static_cast<size_t>(geo.n_layers) * batch.size() * geo.n_kv_heads);
        bits_of(&bits);
        const int64_t stride = static_cast<int64_t>(batch.size()) * geo.n_kv_heads;
        for (size_t b = 0; b < batch.size(); ++b) {
          ASSERT_TRUE(idx.SetDeferredBits(batch[b], bits.data() + b * geo.n_kv_heads, stride).ok());
        }
      }
      for (SeqId s : live) ASSERT_TRUE(idx.Free(s).ok());
      EXPECT_EQ(idx.free_blocks(), idx.total_blocks());
    }
  }
  EXPECT_GT(exhausted, 100) << "the pool was never full: the test checks nothing";
  EXPECT_GT(forks, 100);
  EXPECT_GT(commits, 10000);
}

// Misuse of deferred bits is refused, and leaves a sequence that says so.
TEST(PagedKvIndex, DeferredBitsMisuse) {
  NullSink sink;
  const KvGeometry geo = Geo(2, 1, 2, 8, 4);
  std::vector<uint8_t> bits(8, 1);
  {
    auto forced = MakeKvIndex(geo, Policy(KvPolicyKind::kForced, 3, 0.5), 1 << 20, 256);
    ASSERT_TRUE(forced.ok());
    const SeqId s = *(*forced)->Create();
    ASSERT_TRUE((*forced)->Reserve(s, 1).ok());
    EXPECT_FALSE((*forced)->CommitDecodeDeferred(s, 0, 0, sink)) << "only model bits are deferred";
  }
  auto idx_or = MakeKvIndex(geo, Policy(KvPolicyKind::kDms, 3), 1 << 20, 256);
  ASSERT_TRUE(idx_or.ok());
  KvIndex& idx = **idx_or;
  const SeqId s = *idx.Create();
  ASSERT_TRUE(idx.Reserve(s, 1).ok());
  ASSERT_TRUE(idx.CommitDecodeDeferred(s, 0, 0, sink));
  EXPECT_EQ(idx.SetDeferredBits(s, bits.data(), 1).code(), absl::StatusCode::kFailedPrecondition)
      << "layer 1 was not committed yet";
  ASSERT_TRUE(idx.CommitDecodeDeferred(s, 1, 0, sink));
  EXPECT_EQ(idx.Fork(s).status().code(), absl::StatusCode::kFailedPrecondition)
      << "a fork must not copy a ring whose flags are still unknown";
  const absl::Status r = idx.Reserve(s, 1);
  EXPECT_EQ(r.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.message().find("never supplied"), std::string::npos) << r;
  ASSERT_TRUE(idx.SetDeferredBits(s, bits.data(), 1).ok());
  EXPECT_EQ(idx.SetDeferredBits(s, bits.data(), 1).code(), absl::StatusCode::kFailedPrecondition)
      << "bits given twice";
  ASSERT_TRUE(idx.Reserve(s, 1).ok());
  EXPECT_TRUE(idx.Fork(s).ok());
}

// tova and h2o on an index: one token per step, the attention weights per slot handed over after
// each step (KvIndex::SetVictimWeights, as the CUDA backend does), against the CPU store that
// computes them itself. Forks that share blocks, a frozen sequence and a freed one.
class PagedKvVictimTest : public ::testing::TestWithParam<KvPolicyKind> {};

TEST_P(PagedKvVictimTest, MatchesCpuStoreTokenByToken) {
  const KvGeometry geo = Geo(/*layers=*/2, /*nkv=*/2, /*nh=*/4, /*hd=*/8, /*block=*/4);
  KvPolicyConfig pol;
  pol.kind = GetParam();
  pol.budget_tokens = 7;
  const int64_t block_bytes = 2 * 4 * 8 * sizeof(float);
  auto cpu_or = MakeCpuKvCache(geo, pol, 200 * block_bytes, /*dead_slots=*/false);
  auto idx_or = MakeKvIndex(geo, pol, 200 * block_bytes, block_bytes);
  ASSERT_TRUE(cpu_or.ok() && idx_or.ok()) << idx_or.status();
  KvCache& cpu = **cpu_or;
  KvIndex& idx = **idx_or;
  ASSERT_TRUE(idx.victim_weights());
  HostOps ops(geo, idx.total_blocks());
  ops.slot_ld = pol.budget_tokens;
  PagedKvLayer runner;
  const int32_t kT = 40;
  std::map<int, Stream> streams;
  for (int s = 0; s < 4; ++s) {
    streams[s] = MakeStream(kT, geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim, 50 + s, 0);
  }
  struct Seq { SeqId cpu, idx; int stream; };
  std::map<int, Seq> seqs;
  const int64_t qw = static_cast<int64_t>(geo.n_heads) * geo.head_dim;
  const int64_t kw = static_cast<int64_t>(geo.n_kv_heads) * geo.head_dim;
  int64_t victims_taken = 0;
  auto step = [&](const std::vector<int>& live) {
    const int32_t rows = static_cast<int32_t>(live.size());
    std::vector<PagedChunk> chunks;
    std::vector<int64_t> pos;
    for (int32_t r = 0; r < rows; ++r) {
      const Seq& s = seqs.at(live[r]);
      ASSERT_TRUE(cpu.Reserve(s.cpu, 1).ok());
      ASSERT_TRUE(idx.Reserve(s.idx, 1).ok());
      chunks.push_back(PagedChunk{s.idx, r, 1});
      pos.push_back(idx.Length(s.idx));
    }
    for (int32_t l = 0; l < geo.n_layers; ++l) {
      std::vector<float> q(rows * qw), k(rows * kw), v(rows * kw), out_ref(rows * qw),
          out(rows * qw, std::nanf(""));
      for (int32_t r = 0; r < rows; ++r) {
        const Stream& st = streams[seqs.at(live[r]).stream];
        const int32_t t = static_cast<int32_t>(pos[r]) % kT;
        std::copy_n(st.qt(l, t), qw, q.begin() + r * qw);
        std::copy_n(st.kt(l, t), kw, k.begin() + r * kw);
        std::copy_n(st.vt(l, t), kw, v.begin() + r * kw);
        cpu.AttendAndAppend(seqs.at(live[r]).cpu, l, 1, &q[r * qw], &k[r * kw], &v[r * kw],
                            nullptr, &out_ref[r * qw]);
      }
      ops.q = q.data();
      ops.k = k.data();
      ops.v = v.data();
      ops.out = out.data();
      ASSERT_TRUE(runner.Run(idx, l, chunks, rows, nullptr, ops).ok());
      for (int64_t i = 0; i < rows * qw; ++i) {
        ASSERT_NEAR(out[i], out_ref[i], 1e-4 * (1 + std::fabs(out_ref[i]))) << "layer " << l;
      }
    }
    // Before the weights: nothing more can be committed, reserved or forked.
    EXPECT_EQ(idx.Reserve(chunks[0].seq, 1).code(), absl::StatusCode::kFailedPrecondition);
    const int64_t layer_floats = static_cast<int64_t>(rows) * geo.n_kv_heads * ops.slot_ld;
    for (int32_t r = 0; r < rows; ++r) {
      ASSERT_TRUE(idx.SetVictimWeights(chunks[r].seq,
                                       ops.weights.data() + r * geo.n_kv_heads * ops.slot_ld,
                                       layer_floats, ops.slot_ld).ok());
    }
    EXPECT_EQ(idx.SetVictimWeights(chunks[0].seq, ops.weights.data(), layer_floats, ops.slot_ld)
                  .code(),
              absl::StatusCode::kFailedPrecondition)
        << "weights given twice";
    for (auto& [ls, s] : seqs) {
      for (int32_t l = 0; l < geo.n_layers; ++l) {
        for (int32_t j = 0; j < geo.n_kv_heads; ++j) {
          const auto resident = idx.ResidentPositions(s.idx, l, j);
          ASSERT_EQ(cpu.ResidentPositions(s.cpu, l, j), resident)
              << "seq " << ls << " layer " << l << " head " << j;
          victims_taken += static_cast<int64_t>(resident.size()) < idx.Length(s.idx);
        }
      }
    }
  };
  seqs[0] = Seq{*cpu.Create(), *idx.Create(), 0};
  for (int i = 0; i < 10; ++i) ASSERT_NO_FATAL_FAILURE(step({0}));
  seqs[1] = Seq{*cpu.Fork(seqs[0].cpu), *idx.Fork(seqs[0].idx), 1};
  seqs[2] = Seq{*cpu.Fork(seqs[0].cpu), *idx.Fork(seqs[0].idx), 2};
  seqs[3] = Seq{*cpu.Create(), *idx.Create(), 3};
  for (int i = 0; i < 8; ++i) ASSERT_NO_FATAL_FAILURE(step({0, 1, 2, 3}));
  ASSERT_TRUE(cpu.FreezeEviction(seqs[2].cpu).ok());
  ASSERT_TRUE(idx.FreezeEviction(seqs[2].idx).ok());
  ASSERT_TRUE(cpu.Free(seqs[1].cpu).ok());
  ASSERT_TRUE(idx.Free(seqs[1].idx).ok());
  seqs.erase(1);
  for (int i = 0; i < 6; ++i) ASSERT_NO_FATAL_FAILURE(step({3, 2, 0}));
  EXPECT_GT(victims_taken, 0) << "no head ever evicted";
  EXPECT_EQ(idx.ResidentPositions(seqs[2].idx, 0, 0).size(), 7u + 6u)
      << "a frozen sequence keeps every new token";
  EXPECT_EQ(cpu.total_blocks() - cpu.free_blocks(), idx.total_blocks() - idx.free_blocks());

  // A chunk of more than one token cannot run: its slots depend on weights not yet computed.
  ASSERT_TRUE(idx.Reserve(seqs[0].idx, 2).ok());
  const absl::Status chunk =
      runner.Run(idx, 0, {PagedChunk{seqs[0].idx, 0, 2}}, 0, nullptr, ops);
  EXPECT_EQ(chunk.code(), absl::StatusCode::kInvalidArgument) << chunk;
  EXPECT_NE(chunk.message().find("one token per sequence"), std::string::npos) << chunk;
}

INSTANTIATE_TEST_SUITE_P(Policies, PagedKvVictimTest,
                         ::testing::Values(KvPolicyKind::kTova, KvPolicyKind::kH2o),
                         [](const auto& info) { return std::string(KvPolicyName(info.param)); });

TEST(PagedKvIndex, RefusesKeyScoredPoliciesAndStorageCalls) {
  const KvGeometry geo = Geo(1, 1, 2, 8, 4);
  KvPolicyConfig threshold;
  threshold.kind = KvPolicyKind::kThreshold;
  threshold.window = 4;
  auto bad = MakeKvIndex(geo, threshold, 1 << 20, 256);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("CPU backend only"), std::string::npos) << bad.status();
  EXPECT_FALSE(MakeKvIndex(geo, {}, 100, 256).ok());  // smaller than a block

  auto idx = MakeKvIndex(geo, {}, 1 << 20, 256);
  ASSERT_TRUE(idx.ok());
  const SeqId s = *(*idx)->Create();
  ASSERT_TRUE((*idx)->Reserve(s, 1).ok());
  std::vector<float> q(16, 1.f), kv(8, 1.f), out(16, 0.f);
  (*idx)->AttendAndAppend(s, 0, 1, q.data(), kv.data(), kv.data(), nullptr, out.data());
  EXPECT_TRUE(std::isnan(out[0])) << "an index has no storage to attend over";
  EXPECT_EQ((*idx)->Reserve(s, 1).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace dmsrt
