// The CPU KV store: a block pool plus, per (sequence, layer, local KV head), a dense slot array
// with DMS delayed eviction (docs/dms-semantics.md §3-§5) or one of the baseline policies.
//
// Per head the store keeps the block table, the absolute position of every slot, and — for the
// "ring" policies (dms, forced, window) — the ring of the last w+1 tokens (token t's slot and
// flag live at ring[t % (w+1)]; only these tokens can be flagged and still resident). Metadata
// is per sequence; only K/V rows live in (shareable) blocks, so Fork copies metadata and shares
// blocks.
//
// How each policy maps onto the storage:
//   none    every token appends; visibility k <= q.
//   dms     §4 exactly: bits d[t] come from `evict`; flag(t-1) = d[t].
//   forced  the same machinery, d[t] = hash(seed, layer, global KV head, t) < force_rate.
//           Deterministic, so recomputing a preempted sequence rebuilds the same cache.
//   window  the same machinery with w = window-1 and d[t] = (t-1 >= sinks): sinks are never
//           flagged, every other token leaves after `window` queries, and its slot is recycled by
//           the next token. Visibility = sinks + the last `window` tokens.
//   tova    at most budget_tokens slots per head; once full, after attending, the slot with the
//           lowest attention weight of the current query (mean over the group's query heads) is
//           the victim the next token overwrites.
//   h2o     the same, with the victim taken among tokens outside the recent half of the budget,
//           by lowest accumulated attention (mean over group heads, summed over steps).
//
// Prefill. Ring policies and `none` are exact for any chunk size (§5): every query of the chunk
// attends first — old resident slots with the §3 rule (the first token's bit flags the previous
// chunk's last token) plus the chunk's own keys with a per-key last-visible-query bound — and only
// then are the chunk's tokens committed in order with the §4 bookkeeping, so no query loses a key
// to a slot recycled later in the same chunk. tova/h2o process a chunk token by token (each token
// is committed, attends, and picks the next victim): exactly what decoding would give, at
// O(chunk * budget) cost.
//
// Memory. Reserve computes, per head, an upper bound on the blocks a step can take: appended
// slots (a token appends unless the token leaving the window is known to be flagged; the flags a
// policy fixes in advance — window, forced — are used, model bits not yet seen count as "append
// and maybe recycle") plus copies of shared blocks the step may write (recycled slots and the
// partial last block). The bound is promised to the sequence (other sequences' Reserve cannot
// take it) and released when the step's last layer is done. A step that would exceed its promise
// (AttendAndAppend without Reserve) writes NaN and marks the sequence inconsistent instead of
// taking blocks promised to others.
//
// Attention is float32 with float accumulation and max subtraction (exp by a ~1 ulp polynomial
// on 8-wide vectors). No heap allocation in steady state: scratch buffers are members (one set,
// or one per head when heads run on workers) and only grow. Single-threaded unless SetThreadPool gives workers; then the heads
// of a layer are spread over them once the step has enough work, while bookkeeping and block
// allocation stay on the calling thread (decode commits first, a chunk attends first).
// Per-token costs of decode: the K rows are read once (g dot products each), the softmax runs
// per query head, and V is accumulated in tiles of 32 rows that stay in L1 while every query
// head of the group adds them into register accumulators.
#include "runtime/kv/kv_cache.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/thread_pool.h"
#include "parallel/status_macros.h"
#include "runtime/kv/block_pool.h"

namespace dmsrt {

// ---- names, parsing, figures ------------------------------------------------------------------

const char* KvPolicyName(KvPolicyKind k) {
  switch (k) {
    case KvPolicyKind::kNone: return "none";
    case KvPolicyKind::kDms: return "dms";
    case KvPolicyKind::kForced: return "forced";
    case KvPolicyKind::kWindow: return "window";
    case KvPolicyKind::kTova: return "tova";
    case KvPolicyKind::kH2o: return "h2o";
  }
  return "unknown";
}

absl::StatusOr<KvPolicyKind> ParseKvPolicy(const std::string& name) {
  const std::string n = absl::AsciiStrToLower(absl::StripAsciiWhitespace(name));
  for (KvPolicyKind k : {KvPolicyKind::kNone, KvPolicyKind::kDms, KvPolicyKind::kForced,
                         KvPolicyKind::kWindow, KvPolicyKind::kTova, KvPolicyKind::kH2o}) {
    if (n == KvPolicyName(k)) return k;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown KV policy '", name, "'; valid policies: none, dms, forced, window, tova, h2o"));
}

double KvFigures::cache_cr() const {
  return resident_tokens > 0 ? static_cast<double>(logical_tokens) / resident_tokens : 1.0;
}
double KvFigures::eviction_rate() const {
  return logical_tokens > 0 ? static_cast<double>(flagged_tokens) / logical_tokens : 0.0;
}
double KvFigures::asymptotic_cr() const {
  const double r = eviction_rate();
  return r < 1.0 ? 1.0 / (1.0 - r) : std::numeric_limits<double>::infinity();
}
double KvFigures::block_cr() const {
  return blocks_held > 0 ? static_cast<double>(dense_blocks) / blocks_held : 1.0;
}

namespace {

// ---- small numeric helpers --------------------------------------------------------------------

// 8-float vectors through GCC/Clang vector extensions: portable (the compiler lowers them to
// AVX/AVX-512/NEON or scalar code) and free of intrinsics headers.
typedef float V8 __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store8(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }
inline float Sum8(V8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float Dot(const float* a, const float* b, int32_t n) {
  V8 acc0 = {0, 0, 0, 0, 0, 0, 0, 0};
  V8 acc1 = acc0;
  int32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += Load8(a + i) * Load8(b + i);
    acc1 += Load8(a + i + 8) * Load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += Load8(a + i) * Load8(b + i);
  float s = Sum8(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float alpha, const float* x, float* y, int32_t n) {
  int32_t i = 0;
  const V8 va = {alpha, alpha, alpha, alpha, alpha, alpha, alpha, alpha};
  for (; i + 8 <= n; i += 8) Store8(y + i, Load8(y + i) + va * Load8(x + i));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Lane u = q . rows[u] for eight rows (n a multiple of 8).
inline V8 Dot8Keys(const float* q, const float* const* rows, int32_t n) {
  V8 a[8];
  for (int u = 0; u < 8; ++u) a[u] = V8{0, 0, 0, 0, 0, 0, 0, 0};
  for (int32_t i = 0; i < n; i += 8) {
    const V8 qv = Load8(q + i);
    for (int u = 0; u < 8; ++u) a[u] += qv * Load8(rows[u] + i);
  }
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  // Transpose-add: after three rounds lane u holds the sum of a[u]'s lanes.
  V8 b[4];
  for (int u = 0; u < 4; ++u) {
    b[u] = __builtin_shufflevector(a[2 * u], a[2 * u + 1], 0, 8, 1, 9, 4, 12, 5, 13) +
           __builtin_shufflevector(a[2 * u], a[2 * u + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  const V8 c0 = __builtin_shufflevector(b[0], b[1], 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(b[0], b[1], 2, 3, 10, 11, 6, 7, 14, 15);
  const V8 c1 = __builtin_shufflevector(b[2], b[3], 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(b[2], b[3], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
#else  // compilers without __builtin_shufflevector (GCC < 12)
  V8 r;
  for (int u = 0; u < 8; ++u) r[u] = Sum8(a[u]);
  return r;
#endif
}

// out[0 .. 8*NV) += Σ_{c in [c0, c1)} p[c] * rows[c][0 .. 8*NV), accumulating in registers.
template <int NV>
inline void AccumulateRows(const float* p, const float* const* rows, int32_t c0, int32_t c1,
                           float* out) {
  V8 acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = Load8(out + 8 * u);
  for (int32_t c = c0; c < c1; ++c) {
    const float a = p[c];
    const V8 va = {a, a, a, a, a, a, a, a};
    const float* r = rows[c];
    for (int u = 0; u < NV; ++u) acc[u] += va * Load8(r + 8 * u);
  }
  for (int u = 0; u < NV; ++u) Store8(out + 8 * u, acc[u]);
}

typedef int32_t V8i __attribute__((vector_size(32)));

// exp(x) for x <= 0 (Cephes-style: x = n ln2 + r, degree-5 polynomial for e^r, scale by 2^n);
// about 1 ulp, with inputs below -87 clamped (their weight is below 1e-38 of the maximum).
inline V8 ExpNonPositive(V8 x) {
  const V8 lo = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
  x = x < lo ? lo : x;
  const V8 fx = x * 1.44269504088896341f + 0.5f;
  V8i n = __builtin_convertvector(fx, V8i);                // truncates toward zero
  n += (V8i)(__builtin_convertvector(n, V8) > fx);          // -1 where that rounded up: floor
  const V8 nf = __builtin_convertvector(n, V8);
  x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  const V8 x2 = x * x;
  V8 y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x2 + x + 1.0f;
  const V8i e = (n + 127) << 23;
  return y * (V8)e;
}

// Numerically stable softmax of p[0..m) in place (max subtraction, float sum).
inline void SoftmaxInPlace(float* p, int32_t m) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int32_t c = 0; c < m; ++c) mx = std::max(mx, p[c]);
  const V8 vmx = {mx, mx, mx, mx, mx, mx, mx, mx};
  V8 vsum = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t c = 0;
  for (; c + 8 <= m; c += 8) {
    const V8 e = ExpNonPositive(Load8(p + c) - vmx);
    Store8(p + c, e);
    vsum += e;
  }
  float sum = Sum8(vsum);
  for (; c < m; ++c) {
    p[c] = std::exp(p[c] - mx);
    sum += p[c];
  }
  const float inv = 1.0f / sum;
  for (c = 0; c < m; ++c) p[c] *= inv;
}

inline void Prefetch(const float* p, int32_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int32_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// ---- per-head and per-sequence state ----------------------------------------------------------

struct HeadState {
  std::vector<int32_t> blocks;  // block table: slot s lives in blocks[s / block_tokens]
  std::vector<int32_t> pos;     // [n] absolute position of each slot
  std::vector<float> score;     // [n] h2o: accumulated attention
  // Ring policies: token t at ring[t % ring.size()] as RingEntry(slot, flag(t)); flag(t) is set
  // when token t+1 arrives. A flag matters only while its token is in the ring: a flagged token
  // leaves (its slot recycled) as it drops out, so every older resident token is unflagged.
  std::vector<int32_t> ring;
  int32_t n = 0;                // resident slots (never decreases)
  int32_t victim = -1;          // tova/h2o: slot the next token overwrites
  int64_t logical = 0;          // L: tokens seen
  int64_t flagged = 0;
  int64_t kv_reads = 0;
  int64_t dense_reads = 0;
};

enum : uint8_t { kDeferNone = 0, kDeferAwaiting = 1, kDeferKnown = 2 };

constexpr int32_t RingEntry(int32_t slot, bool flagged) { return slot * 2 + (flagged ? 1 : 0); }
constexpr int32_t RingSlot(int32_t entry) { return entry >> 1; }
constexpr bool RingFlagged(int32_t entry) { return (entry & 1) != 0; }

// Per-worker buffers of the attention of one KV head.
struct Scratch {
  std::vector<const float*> kp, vp;  // key/value row pointers of the keys one query sees
  std::vector<float> probs;          // [g, m] attention weights
  std::vector<uint8_t> chunk_flag;   // [n] flags of a chunk's tokens
};

// Blocks one head may take for the next single token (BlocksNeeded with n_new = 1), computed
// when the head's last commit leaves its state in cache, for the sequence length `at`.
struct NextTokenNeed {
  int64_t at = -1;  // -1: not known
  int32_t blocks = 0;
};

struct Sequence {
  std::vector<HeadState> heads;  // [n_layers * n_kv_heads]
  // [n_layers * n_kv_heads]: what a decode step's Reserve sums instead of revisiting every
  // head. Valid while no block of the sequence gains a reference (only Fork adds references;
  // blocks losing them make the figure an over-estimate, which a bound may be).
  std::vector<NextTokenNeed> next_need;
  // Decode commits whose decision bits come later (KvIndex::CommitDecodeDeferred), per layer:
  // kDeferNone, kDeferAwaiting (committed, bits not given yet) or kDeferKnown (bits given, in
  // deferred_bits, not yet applied to the ring: the layer's next commit applies them).
  std::vector<uint8_t> deferred_state;  // [n_layers]; empty until the first deferred commit
  std::vector<uint8_t> deferred_bits;   // [n_layers * n_kv_heads]: d[t] of the last token
  int32_t deferred_layers = 0;          // layers not in kDeferNone
  int64_t length = 0;            // tokens committed in every layer
  int64_t reserved = 0;          // blocks promised to this sequence by Reserve, not yet taken
  bool broken = false;           // AttendAndAppend was misused; see Reserve
};

class CpuKvCache final : public KvIndex {
 public:
  // index_block_bytes > 0: index only (no storage; see KvIndex).
  CpuKvCache(const KvGeometry& g, const KvPolicyConfig& p, int64_t total_blocks,
             int64_t index_block_bytes = 0)
      : geo_(g),
        pol_(p),
        pool_(index_block_bytes > 0
                  ? std::make_unique<BlockPool>(total_blocks, index_block_bytes)
                  : std::make_unique<BlockPool>(total_blocks, g.block_tokens, g.head_dim)),
        index_only_(index_block_bytes > 0) {
    group_ = g.n_heads / g.n_kv_heads;
    ring_policy_ = p.kind == KvPolicyKind::kDms || p.kind == KvPolicyKind::kForced ||
                   p.kind == KvPolicyKind::kWindow;
    if (p.kind == KvPolicyKind::kWindow) {
      w_ = p.window - 1;
    } else if (ring_policy_) {
      w_ = p.window;
    } else {
      w_ = std::numeric_limits<int32_t>::max();
    }
    scale_ = 1.0f / std::sqrt(static_cast<float>(g.head_dim));
    scratch_.resize(1);
  }

  void SetThreadPool(kernels::ThreadPool* pool) override {
    threads_ = pool;
    scratch_.resize(pool != nullptr ? std::max(1, geo_.n_kv_heads) : 1);
  }

  bool pool_ok() const { return pool_->ok(); }
  const KvGeometry& geometry() const override { return geo_; }
  const KvPolicyConfig& policy() const override { return pol_; }

  absl::StatusOr<SeqId> Create() override {
    auto seq = std::make_unique<Sequence>();
    seq->heads.resize(static_cast<size_t>(geo_.n_layers) * geo_.n_kv_heads);
    for (HeadState& h : seq->heads) {
      if (ring_policy_) h.ring.assign(static_cast<size_t>(w_) + 1, RingEntry(-1, false));
      // Room for a typical prompt without regrowth; longer sequences grow amortised.
      h.pos.reserve(256);
      h.blocks.reserve(256 / geo_.block_tokens + 1);
      if (pol_.kind == KvPolicyKind::kH2o) h.score.reserve(pol_.budget_tokens);
    }
    seq->next_need.resize(seq->heads.size());
    const SeqId id = next_id_++;
    seqs_.emplace(id, std::move(seq));
    return id;
  }

  absl::StatusOr<SeqId> Fork(SeqId parent) override {
    auto it = seqs_.find(parent);
    if (it == seqs_.end()) return NoSuchSequence(parent);
    Sequence& p = *it->second;
    if (p.broken || !ResolveDeferred(p)) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot fork sequence ", parent, ": its cache is inconsistent"));
    }
    auto seq = std::make_unique<Sequence>();
    seq->heads = p.heads;  // metadata is per sequence: copied
    seq->length = p.length;
    for (const HeadState& h : seq->heads) {
      for (int32_t b : h.blocks) pool_->AddRef(b);  // blocks are shared
    }
    // Shared blocks are copied before they are written: both needs change.
    p.next_need.assign(p.heads.size(), NextTokenNeed{});
    seq->next_need.assign(seq->heads.size(), NextTokenNeed{});
    const SeqId id = next_id_++;
    seqs_.emplace(id, std::move(seq));
    return id;
  }

  absl::Status Free(SeqId id) override {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return NoSuchSequence(id);
    Sequence& s = *it->second;
    for (const HeadState& h : s.heads) {
      for (int32_t b : h.blocks) pool_->Release(b);
    }
    total_reserved_ -= s.reserved;
    seqs_.erase(it);
    return absl::OkStatus();
  }

  int64_t Length(SeqId id) const override {
    auto it = seqs_.find(id);
    return it == seqs_.end() ? -1 : it->second->length;
  }

  absl::Status Reserve(SeqId id, int32_t n_new) override {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return NoSuchSequence(id);
    Sequence& s = *it->second;
    if (s.broken) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", id, " is inconsistent (AttendAndAppend without a successful Reserve, or "
          "layers out of order); free it and recompute"));
    }
    if (n_new < 0) return absl::InvalidArgumentError("Reserve: negative token count");
    if (AwaitingBits(s)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", id, " is inconsistent (the decision bits of its last decode step were "
          "never supplied); free it and recompute"));
    }
    int64_t need = 0;
    for (int32_t l = 0; l < geo_.n_layers; ++l) {
      for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
        const size_t idx = static_cast<size_t>(l) * geo_.n_kv_heads + j;
        if (n_new == 1 && s.next_need[idx].at == s.length) {
          need += s.next_need[idx].blocks;
        } else {
          if (j == 0) ResolveDeferred(s, l);  // the flags it reads must be in the ring
          need += BlocksNeeded(s.heads[idx], l, j, s.length, n_new);
        }
      }
    }
    const int64_t others = total_reserved_ - s.reserved;
    const int64_t available = pool_->free_blocks() - others;
    if (need > available) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "KV cache full: sequence %d needs %d more blocks for %d new tokens but only %d are "
          "available (%d free, %d promised to other sequences, %d in the pool of %d bytes each, "
          "%d bytes in all); raise --kv-budget, or run fewer or shorter sequences at once",
          id, need, n_new, std::max<int64_t>(available, 0), pool_->free_blocks(), others,
          pool_->total_blocks(), pool_->block_bytes(), pool_->total_blocks() * pool_->block_bytes()));
    }
    total_reserved_ += need - s.reserved;
    s.reserved = need;
    return absl::OkStatus();
  }

  void AttendAndAppend(SeqId id, int32_t layer, int32_t n, const float* q, const float* k,
                       const float* v, const uint8_t* evict, float* out) override;

  int64_t total_blocks() const override { return pool_->total_blocks(); }
  int64_t free_blocks() const override { return pool_->free_blocks(); }
  int64_t block_bytes() const override { return pool_->block_bytes(); }

  KvFigures Figures() const override {
    KvFigures f = EmptyFigures();
    for (const auto& [id, s] : seqs_) AddFigures(*s, f);
    f.blocks_held = pool_->total_blocks() - pool_->free_blocks();
    f.kv_bytes = f.blocks_held * pool_->block_bytes();
    return f;
  }

  KvFigures Figures(SeqId id) const override {
    KvFigures f = EmptyFigures();
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return f;
    AddFigures(*it->second, f);
    int64_t held = 0;
    for (const HeadState& h : it->second->heads) held += static_cast<int64_t>(h.blocks.size());
    f.blocks_held = held;
    f.kv_bytes = held * pool_->block_bytes();
    return f;
  }

  std::vector<int32_t> ResidentPositions(SeqId id, int32_t layer, int32_t head) const override {
    auto it = seqs_.find(id);
    if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers || head < 0 ||
        head >= geo_.n_kv_heads) {
      return {};
    }
    const HeadState& h = it->second->heads[static_cast<size_t>(layer) * geo_.n_kv_heads + head];
    return std::vector<int32_t>(h.pos.begin(), h.pos.begin() + h.n);
  }

  // ---- KvIndex ----------------------------------------------------------------------------

  bool CommitRows(SeqId id, int32_t layer, int32_t n, int32_t row0, const uint8_t* evict,
                  KvSlotSink& sink) override {
    return CommitChunk(id, layer, n, row0, evict, /*defer=*/false, sink);
  }

  bool CommitDecodeDeferred(SeqId id, int32_t layer, int32_t row, KvSlotSink& sink) override {
    return CommitChunk(id, layer, 1, row, nullptr, /*defer=*/true, sink);
  }

  absl::Status SetDeferredBits(SeqId id, const uint8_t* bits, int64_t layer_stride) override {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return NoSuchSequence(id);
    Sequence& s = *it->second;
    bool all_awaiting = s.deferred_layers == geo_.n_layers;
    for (int32_t l = 0; l < geo_.n_layers && all_awaiting; ++l) {
      all_awaiting = s.deferred_state[l] == kDeferAwaiting;
    }
    if (!all_awaiting) {
      return absl::FailedPreconditionError(absl::StrCat(
          "SetDeferredBits: sequence ", id,
          " has no decode step whose every layer was committed without its bits"));
    }
    const int32_t nkv = geo_.n_kv_heads;
    for (int32_t l = 0; l < geo_.n_layers; ++l) {
      std::copy_n(bits + l * layer_stride, nkv, s.deferred_bits.begin() + static_cast<int64_t>(l) * nkv);
      s.deferred_state[l] = kDeferKnown;
    }
    return absl::OkStatus();
  }

  void PrefetchCommit(SeqId id, int32_t layer) const override {
    auto it = seqs_.find(id);
    if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers) return;
    const Sequence& s = *it->second;
    const size_t base = static_cast<size_t>(layer) * geo_.n_kv_heads;
    const int64_t P = s.length;
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      const HeadState& h = s.heads[base + j];
      // The ring entries of the tokens flagged and leaving now, and the ends the appends grow.
      if (!h.ring.empty()) {
        const int64_t R = static_cast<int64_t>(h.ring.size());
        __builtin_prefetch(h.ring.data() + (P + R - 1) % R, 1);
        __builtin_prefetch(h.ring.data() + (P + R - w_ - 1) % R, 1);
      }
      if (h.n > 0) {
        __builtin_prefetch(h.pos.data() + h.n - 1, 1);
        __builtin_prefetch(h.blocks.data() + (h.n - 1) / geo_.block_tokens, 1);
      }
      __builtin_prefetch(&s.next_need[base + j], 1);
    }
  }

  void HeadViews(SeqId id, int32_t layer, KvHeadView* out) const override {
    auto it = seqs_.find(id);
    const bool known = it != seqs_.end() && layer >= 0 && layer < geo_.n_layers;
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      if (!known) {
        out[j] = KvHeadView{};
        continue;
      }
      const HeadState& h = it->second->heads[static_cast<size_t>(layer) * geo_.n_kv_heads + j];
      out[j] = KvHeadView{h.blocks.data(), static_cast<int32_t>(h.blocks.size()), h.n};
    }
  }

  int PolicyBit(int32_t layer, int32_t head, int64_t t) const override {
    if (pol_.kind == KvPolicyKind::kDms) return -1;
    return t >= 1 ? KnownFlag(layer, head, t - 1) : 0;
  }

  int32_t delay_window() const override { return ring_policy_ ? w_ : -1; }

  void FlaggedSlots(SeqId id, int32_t layer, int32_t head, uint8_t boundary_bit,
                    std::vector<std::pair<int32_t, int32_t>>* out) const override {
    out->clear();
    auto it = seqs_.find(id);
    if (!ring_policy_ || it == seqs_.end() || layer < 0 || layer >= geo_.n_layers || head < 0 ||
        head >= geo_.n_kv_heads) {
      return;
    }
    const Sequence& s = *it->second;
    const HeadState& h = s.heads[static_cast<size_t>(layer) * geo_.n_kv_heads + head];
    const int64_t P = s.length;
    const int64_t R = static_cast<int64_t>(h.ring.size());
    const int32_t bt = geo_.block_tokens;
    // Flagged tokens before P - w - 1 have left; the ring holds the last w + 1.
    for (int64_t k = std::max<int64_t>(0, P - w_ - 1); k < P; ++k) {
      const int32_t slot = RingSlot(h.ring[k % R]);
      const bool flagged = k == P - 1 ? boundary_bit != 0
                                      : RingFlagged(h.ring[k % R]) || PendingFlag(s, layer, head, k);
      if (!flagged) continue;
      out->emplace_back(h.blocks[slot / bt] * bt + slot % bt, static_cast<int32_t>(k + w_));
    }
  }

 private:
  // CommitRows and CommitDecodeDeferred. A deferred commit runs as one under policy dms with
  // evict == nullptr (d[t] = 0: flag(t-1) is left alone) and leaves the layer awaiting its bits.
  bool CommitChunk(SeqId id, int32_t layer, int32_t n, int32_t row0, const uint8_t* evict,
                   bool defer, KvSlotSink& sink) {
    if (n <= 0) return true;
    auto it = seqs_.find(id);
    if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers) return false;
    Sequence& s = *it->second;
    const int64_t P = s.length;
    HeadState* heads = &s.heads[static_cast<size_t>(layer) * geo_.n_kv_heads];
    const bool scored = pol_.kind == KvPolicyKind::kTova || pol_.kind == KvPolicyKind::kH2o;
    const bool defer_ok = !defer || (pol_.kind == KvPolicyKind::kDms && w_ >= 1 && n == 1);
    if (!index_only_ || scored || !defer_ok || s.broken || heads[0].logical != P ||
        !ResolveDeferred(s, layer)) {
      s.broken = true;
      return false;
    }
    const int32_t nkv = geo_.n_kv_heads;
    // Reads of the caller's prefill attention, before the commit (same counts as the CPU path:
    // per query, the visible old slots plus the visible keys of the chunk).
    if (n > 1) {
      for (int32_t j = 0; j < nkv; ++j) {
        HeadState& h = heads[j];
        int64_t reads = 0;
        for (int32_t i = 0; i < n; ++i) reads += static_cast<int64_t>(h.n) + i + 1;
        if (ring_policy_) {
          // A flagged key k is hidden from the queries after k + w.
          const int64_t last_q = P + n - 1;
          auto hidden = [&](int64_t k) { return std::clamp<int64_t>(last_q - (k + w_), 0, n); };
          const int64_t R = static_cast<int64_t>(h.ring.size());
          for (int64_t k = std::max<int64_t>(0, P - w_ - 1); k < P; ++k) {
            const bool flagged = k == P - 1 ? Decision(layer, j, P, evict, 0) != 0
                                            : RingFlagged(h.ring[k % R]);
            if (flagged) reads -= hidden(k);
          }
          for (int32_t c = 0; c + 1 < n; ++c) {
            if (Decision(layer, j, P + c + 1, evict, c + 1)) reads -= hidden(P + c);
          }
        }
        h.kv_reads += reads;
        for (int32_t i = 0; i < n; ++i) h.dense_reads += P + i + 1;
      }
    }
    sink_ = &sink;
    for (int32_t j = 0; j < nkv && !s.broken; ++j) {
      for (int32_t i = 0; i < n; ++i) {
        if (!Commit(s, heads[j], P + i, Decision(layer, j, P + i, evict, i), nullptr, nullptr,
                    row0 + i, j)) {
          s.broken = true;
          break;
        }
      }
      if (n == 1 && !s.broken) {
        heads[j].kv_reads += heads[j].n;
        heads[j].dense_reads += P + 1;
      }
    }
    sink_ = nullptr;
    if (s.broken) return false;
    EndLayer(s, layer, P + n, defer);
    if (defer) {
      if (s.deferred_state.empty()) {
        s.deferred_state.assign(geo_.n_layers, kDeferNone);
        s.deferred_bits.assign(s.heads.size(), 0);
      }
      s.deferred_state[layer] = kDeferAwaiting;
      ++s.deferred_layers;
    }
    return true;
  }

  // After each layer, while its heads are in cache: what each may take for the next token. After
  // the last layer the step is over: the sequence advances and gives back the part of its
  // reservation it did not use.
  // With `deferred`, flag(new_length - 2) is not in the ring yet.
  void EndLayer(Sequence& s, int32_t layer, int64_t new_length, bool deferred) {
    const size_t base = static_cast<size_t>(layer) * geo_.n_kv_heads;
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      const int64_t blocks = BlocksNeeded(s.heads[base + j], layer, j, new_length, 1, deferred);
      s.next_need[base + j] = NextTokenNeed{new_length, static_cast<int32_t>(blocks)};
    }
    if (layer != geo_.n_layers - 1) return;
    s.length = new_length;
    total_reserved_ -= s.reserved;
    s.reserved = 0;
  }

  // Sets flag(k) (k >= 0) in the ring of `h`.
  static void SetFlag(HeadState& h, int64_t k) {
    int32_t& e = h.ring[k % static_cast<int64_t>(h.ring.size())];
    if (!RingFlagged(e)) {
      e = RingEntry(RingSlot(e), true);
      ++h.flagged;
    }
  }

  // Deferred bits (see Sequence): applies a layer's given bits to the ring; false while they
  // are still awaited. The bit of layer l, head j is d[t] of the head's last token t, so it
  // flags token t - 1 = logical - 2.
  bool ResolveDeferred(Sequence& s, int32_t layer) {
    if (s.deferred_layers == 0 || s.deferred_state[layer] == kDeferNone) return true;
    if (s.deferred_state[layer] == kDeferAwaiting) return false;
    const size_t base = static_cast<size_t>(layer) * geo_.n_kv_heads;
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      HeadState& h = s.heads[base + j];
      if (s.deferred_bits[base + j] != 0 && h.logical >= 2) SetFlag(h, h.logical - 2);
    }
    s.deferred_state[layer] = kDeferNone;
    --s.deferred_layers;
    return true;
  }
  bool ResolveDeferred(Sequence& s) {
    for (int32_t l = 0; l < geo_.n_layers && s.deferred_layers > 0; ++l) {
      if (!ResolveDeferred(s, l)) return false;
    }
    return true;
  }
  bool AwaitingBits(const Sequence& s) const {
    for (int32_t l = 0; l < geo_.n_layers && s.deferred_layers > 0; ++l) {
      if (s.deferred_state[l] == kDeferAwaiting) return true;
    }
    return false;
  }
  // For readers that cannot apply them: 1 if a given, unapplied bit of (layer, j) flags token
  // `k`, else 0.
  int PendingFlag(const Sequence& s, int32_t layer, int32_t j, int64_t k) const {
    if (s.deferred_layers == 0 || s.deferred_state[layer] != kDeferKnown) return 0;
    const size_t idx = static_cast<size_t>(layer) * geo_.n_kv_heads + j;
    return s.deferred_bits[idx] != 0 && k >= 0 && k == s.heads[idx].logical - 2 ? 1 : 0;
  }

  static absl::Status NoSuchSequence(SeqId id) {
    return absl::NotFoundError(absl::StrCat("no KV sequence with id ", id));
  }

  KvFigures EmptyFigures() const {
    KvFigures f;
    f.per_layer.resize(geo_.n_layers);
    f.per_head.resize(static_cast<size_t>(geo_.n_layers) * geo_.n_kv_heads);
    return f;
  }

  void AddFigures(const Sequence& s, KvFigures& f) const {
    for (int32_t l = 0; l < geo_.n_layers; ++l) {
      for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
        const size_t idx = static_cast<size_t>(l) * geo_.n_kv_heads + j;
        const HeadState& h = s.heads[idx];
        const int64_t flagged = h.flagged + PendingFlag(s, l, j, h.logical - 2);
        for (KvHeadFigures* t : {&f.per_layer[l], &f.per_head[idx]}) {
          t->logical += h.logical;
          t->resident += h.n;
          t->flagged += flagged;
          t->kv_reads += h.kv_reads;
          t->dense_reads += h.dense_reads;
        }
        f.logical_tokens += h.logical;
        f.resident_tokens += h.n;
        f.flagged_tokens += flagged;
        f.kv_reads += h.kv_reads;
        f.dense_reads += h.dense_reads;
        f.dense_blocks += (h.logical + geo_.block_tokens - 1) / geo_.block_tokens;
      }
    }
  }

  // Flag of token k (= decision d[k+1]) when the policy fixes it in advance; -1 when it comes
  // from the model.
  int KnownFlag(int32_t layer, int32_t j, int64_t k) const {
    switch (pol_.kind) {
      case KvPolicyKind::kWindow: return k >= pol_.sinks ? 1 : 0;
      case KvPolicyKind::kForced: return ForcedBit(layer, j, k + 1);
      case KvPolicyKind::kDms: return -1;
      default: return 0;
    }
  }

  uint8_t ForcedBit(int32_t layer, int32_t j, int64_t t) const {
    uint64_t x = SplitMix64(pol_.seed);
    x = SplitMix64(x ^ (static_cast<uint64_t>(layer) + 1) * 0xD6E8FEB86659FD93ull);
    x = SplitMix64(x ^ (static_cast<uint64_t>(geo_.kv_head_offset + j) + 1) *
                           0xA0761D6478BD642Full);
    x = SplitMix64(x ^ static_cast<uint64_t>(t));
    const double u = static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0);
    return u < pol_.force_rate ? 1 : 0;
  }

  // Decision bit d[t] for token t (row i of the step's `evict`).
  uint8_t Decision(int32_t layer, int32_t j, int64_t t, const uint8_t* evict, int32_t i) const {
    switch (pol_.kind) {
      case KvPolicyKind::kDms: return evict != nullptr && evict[i * geo_.n_kv_heads + j] ? 1 : 0;
      case KvPolicyKind::kForced: return ForcedBit(layer, j, t);
      case KvPolicyKind::kWindow: return t - 1 >= pol_.sinks ? 1 : 0;
      default: return 0;
    }
  }

  // Upper bound on the blocks one head takes while appending n_new tokens at positions P..:
  // new blocks for appended slots plus copies of shared blocks that will be written.
  // `flag_pending`: flag(P - 2) is deferred (not in the ring yet), so it counts as unknown.
  int64_t BlocksNeeded(const HeadState& h, int32_t layer, int32_t j, int64_t P, int32_t n_new,
                       bool flag_pending = false) {
    const int64_t ring_known_to = P - 2 - (flag_pending ? 1 : 0);  // flags in the ring: k <= this
    const int32_t bt = geo_.block_tokens;
    int64_t appends = 0;
    cow_scratch_.clear();
    if (ring_policy_) {
      const int64_t R = static_cast<int64_t>(h.ring.size());
      const int64_t end = P + n_new;  // tokens P .. end-1 arrive; token t evicts kk = t - w - 1
      // kk < 0: nothing leaves, the token appends.
      const int64_t first_leaving = std::max<int64_t>(P, static_cast<int64_t>(w_) + 1);
      appends += std::min(end, first_leaving) - P;
      // 0 <= kk < P: an old token leaves (at most min(P, w+1) of them, all in the ring).
      const int64_t old_end = std::min<int64_t>(end, P + w_ + 1);
      for (int64_t t = first_leaving; t < old_end; ++t) {
        const int64_t kk = t - w_ - 1;
        const int32_t slot = RingSlot(h.ring[kk % R]);
        const int f = kk <= ring_known_to ? RingFlagged(h.ring[kk % R]) : KnownFlag(layer, j, kk);
        if (f != 0) cow_scratch_.push_back(h.blocks[slot / bt]);  // recycled (maybe)
        if (f != 1) ++appends;                                    // appended (maybe)
      }
      // kk >= P: a token of this step leaves; its slot is private by then, so only whether it
      // is recycled matters. Counted exactly where the policy fixes the flags.
      const int64_t lo = std::max(first_leaving, old_end);
      if (lo < end) {
        const int64_t k0 = lo - w_ - 1, k1 = end - w_ - 1;  // leaving tokens k0 .. k1-1
        if (pol_.kind == KvPolicyKind::kWindow) {
          appends += std::max<int64_t>(0, std::min<int64_t>(k1, pol_.sinks) - k0);
        } else if (pol_.kind == KvPolicyKind::kForced && k1 - k0 <= (1 << 16)) {
          for (int64_t kk = k0; kk < k1; ++kk) appends += KnownFlag(layer, j, kk) != 1;
        } else {
          appends += k1 - k0;  // model bits not seen yet (or a huge chunk): assume appends
        }
      }
    } else if (pol_.kind == KvPolicyKind::kNone) {
      appends = n_new;
    } else {
      appends = std::max<int64_t>(0, std::min<int64_t>(h.n + n_new, pol_.budget_tokens) - h.n);
      // Victims can be anywhere: every shared block may be written, one per token at most.
      int64_t shared = 0;
      for (int32_t b : h.blocks) shared += pool_->refcount(b) > 1;
      int64_t cow = std::min<int64_t>(shared, n_new);
      const int64_t new_blocks = (h.n + appends + bt - 1) / bt - static_cast<int64_t>(h.blocks.size());
      return new_blocks + cow;
    }
    if (appends > 0 && h.n % bt != 0) cow_scratch_.push_back(h.blocks.back());
    std::sort(cow_scratch_.begin(), cow_scratch_.end());
    cow_scratch_.erase(std::unique(cow_scratch_.begin(), cow_scratch_.end()), cow_scratch_.end());
    int64_t cow = 0;
    for (int32_t b : cow_scratch_) cow += pool_->refcount(b) > 1;
    const int64_t new_blocks =
        (h.n + appends + bt - 1) / bt - static_cast<int64_t>(h.blocks.size());
    return new_blocks + cow;
  }

  // A block for `s`, taken from its reservation; -1 if that would eat blocks promised to others.
  int32_t TakeBlock(Sequence& s) {
    if (s.reserved > 0) {
      --s.reserved;
      --total_reserved_;
    } else if (pool_->free_blocks() <= total_reserved_) {
      return -1;
    }
    return pool_->Allocate();
  }

  // Appends a slot (a new block on a block boundary); -1 when out of blocks.
  int32_t AppendSlot(Sequence& s, HeadState& h) {
    if (h.n % geo_.block_tokens == 0) {
      const int32_t b = TakeBlock(s);
      if (b < 0) return -1;
      h.blocks.push_back(b);
    }
    h.pos.push_back(0);
    if (pol_.kind == KvPolicyKind::kH2o) h.score.push_back(0.0f);
    return h.n++;
  }

  // Writes K/V of one token into `slot`, copying a shared block first.
  // Index only: nothing is stored; the sink gets the copy and the write (row, head, pos).
  bool WriteSlot(Sequence& s, HeadState& h, int32_t slot, const float* krow, const float* vrow,
                 int32_t row, int32_t head, int64_t pos) {
    const int32_t bt = geo_.block_tokens;
    const int32_t hd = geo_.head_dim;
    int32_t& b = h.blocks[slot / bt];
    if (pool_->refcount(b) > 1) {
      const int32_t nb = TakeBlock(s);
      if (nb < 0) return false;
      if (sink_ != nullptr) {
        sink_->CopyBlock(b, nb);
      } else {
        std::memcpy(pool_->keys(nb), pool_->keys(b), static_cast<size_t>(pool_->block_bytes()));
      }
      pool_->Release(b);
      b = nb;
    }
    if (sink_ != nullptr) {
      sink_->WriteSlot(row, head, b, slot % bt, static_cast<int32_t>(pos), slot / bt);
      return true;
    }
    const int64_t off = static_cast<int64_t>(slot % bt) * hd;
    std::memcpy(pool_->keys(b) + off, krow, sizeof(float) * hd);
    std::memcpy(pool_->values(b) + off, vrow, sizeof(float) * hd);
    return true;
  }

  // §4 bookkeeping (or the baseline's) for token t with decision bit d = d[t]; writes its K/V.
  bool Commit(Sequence& s, HeadState& h, int64_t t, uint8_t d, const float* krow,
              const float* vrow, int32_t row = 0, int32_t head = 0) {
    int32_t slot = -1;
    if (ring_policy_) {
      const int64_t R = static_cast<int64_t>(h.ring.size());
      // flag(t-1) = d[t] (set first so that w = 0 recycles t-1 at once).
      if (t >= 1 && d) SetFlag(h, t - 1);
      const int64_t leaving = t - w_ - 1;
      if (leaving >= 0) {
        const int32_t old = h.ring[leaving % R];
        if (RingFlagged(old)) slot = RingSlot(old);
      }
      if (slot < 0) slot = AppendSlot(s, h);
      if (slot < 0) return false;
      h.ring[t % R] = RingEntry(slot, false);
    } else if (h.victim >= 0) {
      slot = h.victim;
      h.victim = -1;
    } else {
      slot = AppendSlot(s, h);
      if (slot < 0) return false;
    }
    if (!WriteSlot(s, h, slot, krow, vrow, row, head, t)) return false;
    h.pos[slot] = static_cast<int32_t>(t);
    if (pol_.kind == KvPolicyKind::kH2o) h.score[slot] = 0.0f;
    ++h.logical;
    return true;
  }

  // Softmax attention of the g query heads of one group over m keys given by row pointers.
  //   qg [g, head_dim], outg [g, head_dim]; probabilities are left in probs_[h * m + c].
  void AttendGroup(Scratch& sc, const float* qg, int32_t m, float* outg) const {
    const int32_t g = group_;
    const int32_t hd = geo_.head_dim;
    if (sc.probs.size() < static_cast<size_t>(g) * m) sc.probs.resize(static_cast<size_t>(g) * m);
    float* p = sc.probs.data();
    const float* const* kp = sc.kp.data();
    const float* const* vp = sc.vp.data();
    // Rows of consecutive slots are contiguous only inside a block, so hardware prefetchers stall
    // at every block edge: fetch a few rows ahead explicitly.
    constexpr int32_t kAhead = 6;
    const int32_t row_bytes = hd * static_cast<int32_t>(sizeof(float));
    int32_t c = 0;
    if (hd % 8 == 0) {
      // Eight keys at a time: each query chunk is loaded once per eight keys and the eight dot
      // products are reduced together (a transpose-add instead of eight horizontal sums).
      for (; c + 8 <= m; c += 8) {
        for (int32_t u = 0; u < 8; ++u) {
          if (c + kAhead + u < m) Prefetch(kp[c + kAhead + u], row_bytes);
        }
        for (int32_t h = 0; h < g; ++h) {
          Store8(p + h * m + c, Dot8Keys(qg + h * hd, kp + c, hd) * scale_);
        }
      }
    }
    for (; c < m; ++c) {
      if (c + kAhead < m) Prefetch(kp[c + kAhead], row_bytes);
      const float* kr = kp[c];
      for (int32_t h = 0; h < g; ++h) p[h * m + c] = Dot(qg + h * hd, kr, hd) * scale_;
    }
    for (int32_t h = 0; h < g; ++h) SoftmaxInPlace(p + h * m, m);
    std::fill(outg, outg + static_cast<size_t>(g) * hd, 0.0f);
    // V in tiles of keys that stay in L1 while each query head of the group accumulates its
    // output in registers.
    constexpr int32_t kTile = 32;
    for (int32_t c0 = 0; c0 < m; c0 += kTile) {
      const int32_t c1 = std::min(m, c0 + kTile);
      for (int32_t c = c0; c < c1; ++c) Prefetch(vp[c], row_bytes);
      for (int32_t h = 0; h < g; ++h) {
        const float* ph = p + h * m;
        float* oh = outg + h * hd;
        if (hd == 64) {
          AccumulateRows<8>(ph, vp, c0, c1, oh);
        } else if (hd == 128) {
          AccumulateRows<16>(ph, vp, c0, c1, oh);
        } else {
          for (int32_t c = c0; c < c1; ++c) Axpy(ph[c], vp[c], oh, hd);
        }
      }
    }
  }

  static void EnsureKeyScratch(Scratch& sc, size_t m) {
    if (sc.kp.size() < m) {
      sc.kp.resize(m);
      sc.vp.resize(m);
    }
  }

  // Points the scratch key/value pointers at slots 0..n-1 of a head.
  void GatherAllSlots(Scratch& sc, const HeadState& h) const {
    EnsureKeyScratch(sc, static_cast<size_t>(h.n));
    const int32_t bt = geo_.block_tokens;
    const int32_t hd = geo_.head_dim;
    for (int32_t sl = 0; sl < h.n; ++sl) {
      const int32_t b = h.blocks[sl / bt];
      sc.kp[sl] = pool_->keys(b) + static_cast<int64_t>(sl % bt) * hd;
      sc.vp[sl] = pool_->values(b) + static_cast<int64_t>(sl % bt) * hd;
    }
  }

  // tova/h2o: after the query of token t attended over all slots, pick the next victim.
  void PickVictim(const Scratch& sc, HeadState& h, int64_t t) const {
    const int32_t g = group_;
    const int32_t m = h.n;
    const float* p = sc.probs.data();
    if (pol_.kind == KvPolicyKind::kH2o) {
      for (int32_t c = 0; c < m; ++c) {
        float a = 0.0f;
        for (int32_t hh = 0; hh < g; ++hh) a += p[hh * m + c];
        h.score[c] += a / g;
      }
    }
    if (m < pol_.budget_tokens) return;
    int32_t best = -1;
    float best_val = 0.0f;
    if (pol_.kind == KvPolicyKind::kTova) {
      for (int32_t c = 0; c < m; ++c) {
        float a = 0.0f;
        for (int32_t hh = 0; hh < g; ++hh) a += p[hh * m + c];
        a /= g;
        if (best < 0 || a < best_val || (a == best_val && h.pos[c] < h.pos[best])) {
          best = c;
          best_val = a;
        }
      }
    } else {
      const int64_t recent = pol_.budget_tokens / 2;  // includes the current token
      for (int32_t c = 0; c < m; ++c) {
        if (h.pos[c] > t - recent) continue;
        const float a = h.score[c];
        if (best < 0 || a < best_val || (a == best_val && h.pos[c] < h.pos[best])) {
          best = c;
          best_val = a;
        }
      }
    }
    h.victim = best;
  }

  // Runs fn(j, scratch) for every local KV head j: on the worker threads when a pool is set and
  // the step has enough work (`madds` multiply-adds) to pay for waking them, else inline.
  template <typename Fn>
  void ForEachHead(int64_t madds, const Fn& fn) {
    const int32_t nkv = geo_.n_kv_heads;
    if (threads_ == nullptr || threads_->size() < 2 || nkv < 2 || madds < (1 << 20)) {
      for (int32_t j = 0; j < nkv; ++j) fn(j, scratch_[0]);
      return;
    }
    // One chunk per head, each with its own scratch (a worker may run several heads).
    threads_->ParallelFor(nkv, [&](int64_t j) { fn(static_cast<int32_t>(j), scratch_[j]); });
  }

  void Poison(float* out, int32_t n) {
    if (out == nullptr) return;
    std::fill(out, out + static_cast<size_t>(n) * geo_.n_heads * geo_.head_dim,
              std::numeric_limits<float>::quiet_NaN());
  }

  KvGeometry geo_;
  KvPolicyConfig pol_;
  std::unique_ptr<BlockPool> pool_;
  bool index_only_ = false;
  KvSlotSink* sink_ = nullptr;  // index only: receives the data movement of CommitRows
  int32_t group_ = 1;
  bool ring_policy_ = false;
  int32_t w_ = 0;  // delay window of the ring policies (huge otherwise)
  float scale_ = 1.0f;
  absl::flat_hash_map<SeqId, std::unique_ptr<Sequence>> seqs_;
  SeqId next_id_ = 0;
  int64_t total_reserved_ = 0;
  // Scratch, grown on demand and reused: one set, or one per KV head with a thread pool.
  std::vector<Scratch> scratch_;
  std::vector<int32_t> cow_scratch_;
  kernels::ThreadPool* threads_ = nullptr;
};

void CpuKvCache::AttendAndAppend(SeqId id, int32_t layer, int32_t n, const float* q,
                                 const float* k, const float* v, const uint8_t* evict,
                                 float* out) {
  if (n <= 0) return;
  auto it = seqs_.find(id);
  if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers) {
    Poison(out, n);
    return;
  }
  if (index_only_) {  // no storage here: CommitRows is the way in
    it->second->broken = true;
    Poison(out, n);
    return;
  }
  Sequence& s = *it->second;
  const int64_t P = s.length;
  HeadState* heads = &s.heads[static_cast<size_t>(layer) * geo_.n_kv_heads];
  // Commit-only (q == out == nullptr): the tokens are stored without attention. Possible for the
  // policies whose cache does not depend on attention weights.
  const bool attend = q != nullptr && out != nullptr;
  const bool scored = pol_.kind == KvPolicyKind::kTova || pol_.kind == KvPolicyKind::kH2o;
  if (s.broken || heads[0].logical != P || (!attend && (scored || q != out))) {
    // Out of order, repeated, an earlier failure, or a commit-only call the policy cannot do.
    s.broken = true;
    Poison(out, n);
    return;
  }
  if (!attend) {
    for (int32_t j = 0; j < geo_.n_kv_heads && !s.broken; ++j) {
      for (int32_t i = 0; i < n; ++i) {
        const int64_t off = static_cast<int64_t>(i) * geo_.n_kv_heads * geo_.head_dim +
                            static_cast<int64_t>(j) * geo_.head_dim;
        if (!Commit(s, heads[j], P + i, Decision(layer, j, P + i, evict, i), k + off, v + off)) {
          s.broken = true;
          break;
        }
      }
    }
    if (!s.broken) EndLayer(s, layer, P + n, false);
    return;
  }
  const int32_t nkv = geo_.n_kv_heads;
  const int32_t nh = geo_.n_heads;
  const int32_t hd = geo_.head_dim;
  const int32_t g = group_;
  const int64_t qstride = static_cast<int64_t>(nh) * hd;   // per token in q/out
  const int64_t kstride = static_cast<int64_t>(nkv) * hd;  // per token in k/v
  auto qof = [&](int32_t i, int32_t j) { return q + i * qstride + static_cast<int64_t>(j) * g * hd; };
  auto oof = [&](int32_t i, int32_t j) { return out + i * qstride + static_cast<int64_t>(j) * g * hd; };
  auto kof = [&](const float* base, int32_t i, int32_t j) {
    return base + i * kstride + static_cast<int64_t>(j) * hd;
  };

  if (scored) {
    // tova/h2o: token by token (commit, attend over every slot, pick the next victim).
    Scratch& sc = scratch_[0];
    for (int32_t j = 0; j < nkv && !s.broken; ++j) {
      HeadState& h = heads[j];
      for (int32_t i = 0; i < n; ++i) {
        const int64_t t = P + i;
        if (!Commit(s, h, t, 0, kof(k, i, j), kof(v, i, j))) {
          s.broken = true;
          break;
        }
        GatherAllSlots(sc, h);
        AttendGroup(sc, qof(i, j), h.n, oof(i, j));
        h.kv_reads += h.n;
        h.dense_reads += t + 1;
        PickVictim(sc, h, t);
      }
    }
  } else if (n == 1) {
    // Decode (§4): bookkeeping for every head first (it allocates, so it stays on this thread),
    // then attention over slots 0..n-1 = R(t), one head per worker.
    int64_t work = 0;
    for (int32_t j = 0; j < nkv; ++j) {
      if (!Commit(s, heads[j], P, Decision(layer, j, P, evict, 0), kof(k, 0, j), kof(v, 0, j))) {
        s.broken = true;
        break;
      }
      work += heads[j].n;
    }
    if (!s.broken) {
      ForEachHead(work * g * hd, [&](int32_t j, Scratch& sc) {
        HeadState& h = heads[j];
        GatherAllSlots(sc, h);
        AttendGroup(sc, qof(0, j), h.n, oof(0, j));
        h.kv_reads += h.n;
        h.dense_reads += P + 1;
      });
    }
  } else {
    // Exact chunk (§5): every query attends (old slots with the §3 rule, the chunk's own keys
    // with their last-visible-query bound) before any token of the chunk is committed.
    const int32_t bt = geo_.block_tokens;
    int64_t work = 0;
    for (int32_t j = 0; j < nkv; ++j) work += (heads[j].n + n) * static_cast<int64_t>(n);
    ForEachHead(work * g * hd, [&](int32_t j, Scratch& sc) {
      HeadState& h = heads[j];
      // Flags inside the chunk: flag(P+c) = d[P+c+1]; the last one is still 0.
      if (sc.chunk_flag.size() < static_cast<size_t>(n)) sc.chunk_flag.resize(n);
      for (int32_t c = 0; c < n; ++c) {
        sc.chunk_flag[c] = c + 1 < n ? Decision(layer, j, P + c + 1, evict, c + 1) : 0;
      }
      const uint8_t first_bit = Decision(layer, j, P, evict, 0);  // flags token P-1
      const int32_t n_old = h.n;
      EnsureKeyScratch(sc, static_cast<size_t>(n_old) + n);
      for (int32_t i = 0; i < n; ++i) {
        const int64_t qpos = P + i;
        int32_t m = 0;
        for (int32_t sl = 0; sl < n_old; ++sl) {
          const int64_t kpos = h.pos[sl];
          // Only the ring's tokens can be flagged and still resident.
          const bool flagged =
              kpos == P - 1 ? first_bit != 0
                            : ring_policy_ && kpos >= P - w_ - 1 &&
                                  RingFlagged(h.ring[kpos % static_cast<int64_t>(h.ring.size())]);
          if (flagged && qpos - kpos > w_) continue;
          const int32_t b = h.blocks[sl / bt];
          sc.kp[m] = pool_->keys(b) + static_cast<int64_t>(sl % bt) * hd;
          sc.vp[m] = pool_->values(b) + static_cast<int64_t>(sl % bt) * hd;
          ++m;
        }
        for (int32_t c = 0; c <= i; ++c) {
          if (sc.chunk_flag[c] && i - c > w_) continue;
          sc.kp[m] = kof(k, c, j);
          sc.vp[m] = kof(v, c, j);
          ++m;
        }
        AttendGroup(sc, qof(i, j), m, oof(i, j));
        h.kv_reads += m;
        h.dense_reads += qpos + 1;
      }
    });
    for (int32_t j = 0; j < nkv && !s.broken; ++j) {
      for (int32_t i = 0; i < n; ++i) {
        if (!Commit(s, heads[j], P + i, Decision(layer, j, P + i, evict, i), kof(k, i, j),
                    kof(v, i, j))) {
          s.broken = true;
          break;
        }
      }
    }
  }
  if (s.broken) {
    Poison(out, n);
    return;
  }
  EndLayer(s, layer, P + n, false);
}

}  // namespace

namespace {

absl::Status ValidateKvConfig(const KvGeometry& g, const KvPolicyConfig& p) {
  if (g.n_layers <= 0 || g.n_kv_heads <= 0 || g.n_heads <= 0 || g.head_dim <= 0 ||
      g.block_tokens <= 0 || g.kv_head_offset < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bad KV geometry: layers %d, kv heads %d, heads %d, head_dim %d, block %d, offset %d "
        "(all must be positive, offset non-negative)",
        g.n_layers, g.n_kv_heads, g.n_heads, g.head_dim, g.block_tokens, g.kv_head_offset));
  }
  if (g.n_heads % g.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "query heads (%d) must be a multiple of KV heads (%d)", g.n_heads, g.n_kv_heads));
  }
  switch (p.kind) {
    case KvPolicyKind::kDms:
    case KvPolicyKind::kForced:
      if (p.window < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("DMS window must be >= 0 (got ", p.window, ")"));
      }
      if (p.kind == KvPolicyKind::kForced && !(p.force_rate >= 0.0 && p.force_rate <= 1.0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("forced eviction rate must be in [0, 1] (got ", p.force_rate, ")"));
      }
      break;
    case KvPolicyKind::kWindow:
      if (p.window < 1 || p.sinks < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "window policy needs window >= 1 and sinks >= 0 (got window ", p.window, ", sinks ",
            p.sinks, ")"));
      }
      break;
    case KvPolicyKind::kTova:
    case KvPolicyKind::kH2o: {
      const int32_t min_budget = p.kind == KvPolicyKind::kH2o ? 2 : 1;
      if (p.budget_tokens < min_budget) {
        return absl::InvalidArgumentError(absl::StrCat(
            KvPolicyName(p.kind), " needs budget_tokens >= ", min_budget, " (got ",
            p.budget_tokens, ")"));
      }
      break;
    }
    case KvPolicyKind::kNone:
      break;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvIndex>> MakeKvIndex(const KvGeometry& g, const KvPolicyConfig& p,
                                                     int64_t budget_bytes, int64_t block_bytes) {
  DMSRT_RETURN_IF_ERROR(ValidateKvConfig(g, p));
  if (p.kind == KvPolicyKind::kTova || p.kind == KvPolicyKind::kH2o) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV policy ", KvPolicyName(p.kind), " picks victims by attention weights and runs on the "
        "CPU backend only; use none, dms, forced or window"));
  }
  if (block_bytes <= 0 || budget_bytes < block_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV budget of %d bytes is smaller than one block (%d bytes); raise --kv-budget",
        budget_bytes, block_bytes));
  }
  const int64_t total_blocks = budget_bytes / block_bytes;
  if (total_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV budget of ", budget_bytes, " bytes needs more than 2^31 blocks; use larger blocks"));
  }
  return std::unique_ptr<KvIndex>(std::make_unique<CpuKvCache>(g, p, total_blocks, block_bytes));
}

absl::StatusOr<std::unique_ptr<KvCache>> MakeCpuKvCache(const KvGeometry& g,
                                                        const KvPolicyConfig& p,
                                                        int64_t budget_bytes) {
  DMSRT_RETURN_IF_ERROR(ValidateKvConfig(g, p));
  const int64_t block_bytes =
      2 * static_cast<int64_t>(g.block_tokens) * g.head_dim * static_cast<int64_t>(sizeof(float));
  if (budget_bytes < block_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV budget of %d bytes is smaller than one block (%d bytes: %d tokens x head_dim %d x K,V "
        "x float32); raise --kv-budget",
        budget_bytes, block_bytes, g.block_tokens, g.head_dim));
  }
  const int64_t total_blocks = budget_bytes / block_bytes;
  if (total_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV budget of ", budget_bytes, " bytes needs more than 2^31 blocks; use "
                     "larger blocks"));
  }
  auto cache = std::make_unique<CpuKvCache>(g, p, total_blocks);
  if (!cache->pool_ok()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "could not allocate the KV pool of %d bytes; lower --kv-budget", total_blocks * block_bytes));
  }
  return std::unique_ptr<KvCache>(std::move(cache));
}

}  // namespace dmsrt
