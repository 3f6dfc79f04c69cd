// The CPU KV store: a block pool plus, per (sequence, layer, local KV head), a dense slot array
// with DMS delayed eviction (docs/dms-semantics.md §3-§5) or one of the baseline policies.
//
// Per head the store keeps the block table, the absolute position and the flag of every slot,
// and — for the "ring" policies (dms, forced, window) — the ring of the last w+1 tokens (the slot
// of token t lives at ring[t % (w+1)]; its flag lives with the slot). Metadata is per sequence;
// only K/V rows live in (shareable) blocks, so Fork copies metadata and shares blocks.
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
// Attention is float32 with float accumulation and max subtraction; single-threaded, no heap
// allocation in steady state (scratch buffers are members and only grow).
#include "runtime/kv_cache.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/block_pool.h"

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

absl::StatusOr<int64_t> ParseByteSize(const std::string& text) {
  const std::string s(absl::StripAsciiWhitespace(text));
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  const std::string number = s.substr(0, i);
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s.substr(i)));
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad byte size '", text, "': ", why,
        " (examples: 2GiB, 512MiB, 1.5GB, 100000000; units B, KB/MB/GB/TB = 10^3.., "
        "KiB/MiB/GiB/TiB or K/M/G/T = 2^10..)"));
  };
  if (number.empty()) return bad("expected a non-negative number");
  if (std::count(number.begin(), number.end(), '.') > 1) return bad("malformed number");
  double value = 0;
  if (!absl::SimpleAtod(number, &value) || !std::isfinite(value) || value < 0) {
    return bad("malformed number");
  }
  double mult = 0;
  if (unit.empty() || unit == "b") {
    mult = 1;
  } else if (unit == "kb") {
    mult = 1e3;
  } else if (unit == "mb") {
    mult = 1e6;
  } else if (unit == "gb") {
    mult = 1e9;
  } else if (unit == "tb") {
    mult = 1e12;
  } else if (unit == "k" || unit == "kib") {
    mult = 1024.0;
  } else if (unit == "m" || unit == "mib") {
    mult = 1024.0 * 1024;
  } else if (unit == "g" || unit == "gib") {
    mult = 1024.0 * 1024 * 1024;
  } else if (unit == "t" || unit == "tib") {
    mult = 1024.0 * 1024 * 1024 * 1024;
  } else {
    return bad(absl::StrCat("unknown unit '", unit, "'"));
  }
  if (mult == 1 && number.find('.') != std::string::npos) {
    return bad("a plain byte count must be a whole number (fractions of free memory are not "
               "accepted here)");
  }
  const double bytes = std::floor(value * mult);
  if (bytes >= 9.2e18) return bad("too large");
  return static_cast<int64_t>(bytes);
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
  std::vector<uint8_t> flag;    // [n] flag(pos) once known (set when the next token arrives)
  std::vector<float> score;     // [n] h2o: accumulated attention
  std::vector<int32_t> ring;    // ring policies: slot of token t at ring[t % ring.size()]
  int32_t n = 0;                // resident slots (never decreases)
  int32_t victim = -1;          // tova/h2o: slot the next token overwrites
  int64_t logical = 0;          // L: tokens seen
  int64_t flagged = 0;
  int64_t kv_reads = 0;
  int64_t dense_reads = 0;
};

struct Sequence {
  std::vector<HeadState> heads;  // [n_layers * n_kv_heads]
  int64_t length = 0;            // tokens committed in every layer
  int64_t reserved = 0;          // blocks promised to this sequence by Reserve, not yet taken
  bool broken = false;           // AttendAndAppend was misused; see Reserve
};

class CpuKvCache final : public KvCache {
 public:
  CpuKvCache(const KvGeometry& g, const KvPolicyConfig& p, int64_t total_blocks)
      : geo_(g), pol_(p), pool_(total_blocks, g.block_tokens, g.head_dim) {
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
  }

  bool pool_ok() const { return pool_.ok(); }
  const KvGeometry& geometry() const override { return geo_; }
  const KvPolicyConfig& policy() const override { return pol_; }

  absl::StatusOr<SeqId> Create() override {
    auto seq = std::make_unique<Sequence>();
    seq->heads.resize(static_cast<size_t>(geo_.n_layers) * geo_.n_kv_heads);
    for (HeadState& h : seq->heads) {
      if (ring_policy_) h.ring.assign(static_cast<size_t>(w_) + 1, -1);
      // Room for a typical prompt without regrowth; longer sequences grow amortised.
      h.pos.reserve(256);
      h.flag.reserve(256);
      h.blocks.reserve(256 / geo_.block_tokens + 1);
      if (pol_.kind == KvPolicyKind::kH2o) h.score.reserve(pol_.budget_tokens);
    }
    const SeqId id = next_id_++;
    seqs_.emplace(id, std::move(seq));
    return id;
  }

  absl::StatusOr<SeqId> Fork(SeqId parent) override {
    auto it = seqs_.find(parent);
    if (it == seqs_.end()) return NoSuchSequence(parent);
    const Sequence& p = *it->second;
    if (p.broken) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot fork sequence ", parent, ": its cache is inconsistent"));
    }
    auto seq = std::make_unique<Sequence>();
    seq->heads = p.heads;  // metadata is per sequence: copied
    seq->length = p.length;
    for (const HeadState& h : seq->heads) {
      for (int32_t b : h.blocks) pool_.AddRef(b);  // blocks are shared
    }
    const SeqId id = next_id_++;
    seqs_.emplace(id, std::move(seq));
    return id;
  }

  absl::Status Free(SeqId id) override {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return NoSuchSequence(id);
    Sequence& s = *it->second;
    for (const HeadState& h : s.heads) {
      for (int32_t b : h.blocks) pool_.Release(b);
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
    int64_t need = 0;
    for (int32_t l = 0; l < geo_.n_layers; ++l) {
      for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
        need += BlocksNeeded(s.heads[static_cast<size_t>(l) * geo_.n_kv_heads + j], l, j,
                             s.length, n_new);
      }
    }
    const int64_t others = total_reserved_ - s.reserved;
    const int64_t available = pool_.free_blocks() - others;
    if (need > available) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "KV cache full: sequence %d needs %d more blocks for %d new tokens but only %d are "
          "available (%d free, %d promised to other sequences, %d in the pool of %d bytes each, "
          "%d bytes in all); raise --kv-budget, or run fewer or shorter sequences at once",
          id, need, n_new, std::max<int64_t>(available, 0), pool_.free_blocks(), others,
          pool_.total_blocks(), pool_.block_bytes(), pool_.total_blocks() * pool_.block_bytes()));
    }
    total_reserved_ += need - s.reserved;
    s.reserved = need;
    return absl::OkStatus();
  }

  void AttendAndAppend(SeqId id, int32_t layer, int32_t n, const float* q, const float* k,
                       const float* v, const uint8_t* evict, float* out) override;

  int64_t total_blocks() const override { return pool_.total_blocks(); }
  int64_t free_blocks() const override { return pool_.free_blocks(); }
  int64_t block_bytes() const override { return pool_.block_bytes(); }

  KvFigures Figures() const override {
    KvFigures f = EmptyFigures();
    for (const auto& [id, s] : seqs_) AddFigures(*s, f);
    f.blocks_held = pool_.total_blocks() - pool_.free_blocks();
    f.kv_bytes = f.blocks_held * pool_.block_bytes();
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
    f.kv_bytes = held * pool_.block_bytes();
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

 private:
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
        for (KvHeadFigures* t : {&f.per_layer[l], &f.per_head[idx]}) {
          t->logical += h.logical;
          t->resident += h.n;
          t->flagged += h.flagged;
          t->kv_reads += h.kv_reads;
          t->dense_reads += h.dense_reads;
        }
        f.logical_tokens += h.logical;
        f.resident_tokens += h.n;
        f.flagged_tokens += h.flagged;
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
  int64_t BlocksNeeded(const HeadState& h, int32_t layer, int32_t j, int64_t P, int32_t n_new) {
    const int32_t bt = geo_.block_tokens;
    int64_t appends = 0;
    cow_scratch_.clear();
    if (ring_policy_) {
      const int64_t R = static_cast<int64_t>(h.ring.size());
      for (int64_t t = P; t < P + n_new; ++t) {
        const int64_t kk = t - w_ - 1;  // the token leaving the window
        if (kk < 0) {
          ++appends;
        } else if (kk < P) {
          const int32_t slot = h.ring[kk % R];
          int f = kk <= P - 2 ? h.flag[slot] : KnownFlag(layer, j, kk);
          if (f != 0) cow_scratch_.push_back(h.blocks[slot / bt]);  // recycled (maybe)
          if (f != 1) ++appends;                                    // appended (maybe)
        } else {
          // A token of this step: its slot is private by then; only whether it is recycled
          // matters.
          if (KnownFlag(layer, j, kk) != 1) ++appends;
        }
      }
    } else if (pol_.kind == KvPolicyKind::kNone) {
      appends = n_new;
    } else {
      appends = std::max<int64_t>(0, std::min<int64_t>(h.n + n_new, pol_.budget_tokens) - h.n);
      // Victims can be anywhere: every shared block may be written, one per token at most.
      int64_t shared = 0;
      for (int32_t b : h.blocks) shared += pool_.refcount(b) > 1;
      int64_t cow = std::min<int64_t>(shared, n_new);
      const int64_t new_blocks = (h.n + appends + bt - 1) / bt - static_cast<int64_t>(h.blocks.size());
      return new_blocks + cow;
    }
    if (appends > 0 && h.n % bt != 0) cow_scratch_.push_back(h.blocks.back());
    std::sort(cow_scratch_.begin(), cow_scratch_.end());
    cow_scratch_.erase(std::unique(cow_scratch_.begin(), cow_scratch_.end()), cow_scratch_.end());
    int64_t cow = 0;
    for (int32_t b : cow_scratch_) cow += pool_.refcount(b) > 1;
    const int64_t new_blocks =
        (h.n + appends + bt - 1) / bt - static_cast<int64_t>(h.blocks.size());
    return new_blocks + cow;
  }

  // A block for `s`, taken from its reservation; -1 if that would eat blocks promised to others.
  int32_t TakeBlock(Sequence& s) {
    if (s.reserved > 0) {
      --s.reserved;
      --total_reserved_;
    } else if (pool_.free_blocks() <= total_reserved_) {
      return -1;
    }
    return pool_.Allocate();
  }

  // Appends a slot (a new block on a block boundary); -1 when out of blocks.
  int32_t AppendSlot(Sequence& s, HeadState& h) {
    if (h.n % geo_.block_tokens == 0) {
      const int32_t b = TakeBlock(s);
      if (b < 0) return -1;
      h.blocks.push_back(b);
    }
    h.pos.push_back(0);
    h.flag.push_back(0);
    if (pol_.kind == KvPolicyKind::kH2o) h.score.push_back(0.0f);
    return h.n++;
  }

  // Writes K/V of one token into `slot`, copying a shared block first.
  bool WriteSlot(Sequence& s, HeadState& h, int32_t slot, const float* krow, const float* vrow) {
    const int32_t bt = geo_.block_tokens;
    const int32_t hd = geo_.head_dim;
    int32_t& b = h.blocks[slot / bt];
    if (pool_.refcount(b) > 1) {
      const int32_t nb = TakeBlock(s);
      if (nb < 0) return false;
      std::memcpy(pool_.keys(nb), pool_.keys(b), static_cast<size_t>(pool_.block_bytes()));
      pool_.Release(b);
      b = nb;
    }
    const int64_t off = static_cast<int64_t>(slot % bt) * hd;
    std::memcpy(pool_.keys(b) + off, krow, sizeof(float) * hd);
    std::memcpy(pool_.values(b) + off, vrow, sizeof(float) * hd);
    return true;
  }

  // §4 bookkeeping (or the baseline's) for token t with decision bit d = d[t]; writes its K/V.
  bool Commit(Sequence& s, HeadState& h, int64_t t, uint8_t d, const float* krow,
              const float* vrow) {
    int32_t slot = -1;
    if (ring_policy_) {
      const int64_t R = static_cast<int64_t>(h.ring.size());
      if (t >= 1 && d) {
        // flag(t-1) = d[t] (set first so that w = 0 recycles t-1 at once).
        uint8_t& f = h.flag[h.ring[(t - 1) % R]];
        if (!f) {
          f = 1;
          ++h.flagged;
        }
      }
      const int64_t leaving = t - w_ - 1;
      if (leaving >= 0) {
        const int32_t old = h.ring[leaving % R];
        if (h.flag[old]) slot = old;
      }
      if (slot < 0) slot = AppendSlot(s, h);
      if (slot < 0) return false;
      h.ring[t % R] = slot;
    } else if (h.victim >= 0) {
      slot = h.victim;
      h.victim = -1;
    } else {
      slot = AppendSlot(s, h);
      if (slot < 0) return false;
    }
    if (!WriteSlot(s, h, slot, krow, vrow)) return false;
    h.pos[slot] = static_cast<int32_t>(t);
    h.flag[slot] = 0;
    if (pol_.kind == KvPolicyKind::kH2o) h.score[slot] = 0.0f;
    ++h.logical;
    return true;
  }

  // Softmax attention of the g query heads of one group over m keys given by row pointers.
  //   qg [g, head_dim], outg [g, head_dim]; probabilities are left in probs_[h * m + c].
  void AttendGroup(const float* qg, int32_t m, float* outg) {
    const int32_t g = group_;
    const int32_t hd = geo_.head_dim;
    if (probs_.size() < static_cast<size_t>(g) * m) probs_.resize(static_cast<size_t>(g) * m);
    float* p = probs_.data();
    // Rows of consecutive slots are contiguous only inside a block, so hardware prefetchers stall
    // at every block edge: fetch a few rows ahead explicitly.
    constexpr int32_t kAhead = 6;
    const int32_t row_bytes = hd * static_cast<int32_t>(sizeof(float));
    for (int32_t c = 0; c < m; ++c) {
      if (c + kAhead < m) Prefetch(kp_[c + kAhead], row_bytes);
      const float* kr = kp_[c];
      for (int32_t h = 0; h < g; ++h) p[h * m + c] = Dot(qg + h * hd, kr, hd) * scale_;
    }
    for (int32_t h = 0; h < g; ++h) {
      float* ph = p + h * m;
      float mx = -std::numeric_limits<float>::infinity();
      for (int32_t c = 0; c < m; ++c) mx = std::max(mx, ph[c]);
      float sum = 0.0f;
      for (int32_t c = 0; c < m; ++c) {
        ph[c] = std::exp(ph[c] - mx);
        sum += ph[c];
      }
      const float inv = 1.0f / sum;
      for (int32_t c = 0; c < m; ++c) ph[c] *= inv;
    }
    std::fill(outg, outg + static_cast<size_t>(g) * hd, 0.0f);
    for (int32_t c = 0; c < m; ++c) {
      if (c + kAhead < m) Prefetch(vp_[c + kAhead], row_bytes);
      const float* vr = vp_[c];
      for (int32_t h = 0; h < g; ++h) Axpy(p[h * m + c], vr, outg + h * hd, hd);
    }
  }

  void EnsureKeyScratch(size_t m) {
    if (kp_.size() < m) {
      kp_.resize(m);
      vp_.resize(m);
    }
  }

  // Points kp_/vp_ at slots 0..n-1 of a head.
  void GatherAllSlots(const HeadState& h) {
    EnsureKeyScratch(static_cast<size_t>(h.n));
    const int32_t bt = geo_.block_tokens;
    const int32_t hd = geo_.head_dim;
    for (int32_t sl = 0; sl < h.n; ++sl) {
      const int32_t b = h.blocks[sl / bt];
      kp_[sl] = pool_.keys(b) + static_cast<int64_t>(sl % bt) * hd;
      vp_[sl] = pool_.values(b) + static_cast<int64_t>(sl % bt) * hd;
    }
  }

  // tova/h2o: after the query of token t attended over all slots, pick the next victim.
  void PickVictim(HeadState& h, int64_t t) {
    const int32_t g = group_;
    const int32_t m = h.n;
    const float* p = probs_.data();
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

  void Poison(float* out, int32_t n) {
    if (out == nullptr) return;
    std::fill(out, out + static_cast<size_t>(n) * geo_.n_heads * geo_.head_dim,
              std::numeric_limits<float>::quiet_NaN());
  }

  KvGeometry geo_;
  KvPolicyConfig pol_;
  BlockPool pool_;
  int32_t group_ = 1;
  bool ring_policy_ = false;
  int32_t w_ = 0;  // delay window of the ring policies (huge otherwise)
  float scale_ = 1.0f;
  absl::flat_hash_map<SeqId, std::unique_ptr<Sequence>> seqs_;
  SeqId next_id_ = 0;
  int64_t total_reserved_ = 0;
  // Scratch, grown on demand and reused.
  std::vector<const float*> kp_, vp_;  // key/value row pointers of the keys one query sees
  std::vector<float> probs_;           // [g, m]
  std::vector<int32_t> cow_scratch_;
  std::vector<uint8_t> chunk_flag_;    // [n] flags of a chunk's tokens
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
    if (!s.broken && layer == geo_.n_layers - 1) {
      s.length = P + n;
      total_reserved_ -= s.reserved;
      s.reserved = 0;
    }
    return;
  }
  const int32_t nkv = geo_.n_kv_heads;
  const int32_t nh = geo_.n_heads;
  const int32_t hd = geo_.head_dim;
  const int32_t g = group_;
  const int64_t qstride = static_cast<int64_t>(nh) * hd;   // per token in q/out
  const int64_t kstride = static_cast<int64_t>(nkv) * hd;  // per token in k/v
  const bool token_by_token =
      n == 1 || pol_.kind == KvPolicyKind::kTova || pol_.kind == KvPolicyKind::kH2o;

  for (int32_t j = 0; j < nkv && !s.broken; ++j) {
    HeadState& h = heads[j];
    if (token_by_token) {
      // Decode order (§4): bookkeeping first, then attention over slots 0..n-1 = R(t).
      for (int32_t i = 0; i < n; ++i) {
        const int64_t t = P + i;
        const float* krow = k + i * kstride + static_cast<int64_t>(j) * hd;
        const float* vrow = v + i * kstride + static_cast<int64_t>(j) * hd;
        if (!Commit(s, h, t, Decision(layer, j, t, evict, i), krow, vrow)) {
          s.broken = true;
          break;
        }
        GatherAllSlots(h);
        AttendGroup(q + i * qstride + static_cast<int64_t>(j) * g * hd, h.n,
                    out + i * qstride + static_cast<int64_t>(j) * g * hd);
        h.kv_reads += h.n;
        h.dense_reads += t + 1;
        if (pol_.kind == KvPolicyKind::kTova || pol_.kind == KvPolicyKind::kH2o) PickVictim(h, t);
      }
      continue;
    }

    // Exact chunk (§5). Flags inside the chunk: flag(P+c) = d[P+c+1], the last one still 0.
    const int32_t bt = geo_.block_tokens;
    if (chunk_flag_.size() < static_cast<size_t>(n)) chunk_flag_.resize(n);
    for (int32_t c = 0; c < n; ++c) {
      chunk_flag_[c] = c + 1 < n ? Decision(layer, j, P + c + 1, evict, c + 1) : 0;
    }
    const uint8_t first_bit = Decision(layer, j, P, evict, 0);  // flags token P-1
    const int32_t n_old = h.n;
    EnsureKeyScratch(static_cast<size_t>(n_old) + n);
    for (int32_t i = 0; i < n; ++i) {
      const int64_t qpos = P + i;
      int32_t m = 0;
      for (int32_t sl = 0; sl < n_old; ++sl) {
        const int64_t kpos = h.pos[sl];
        const bool flagged = kpos == P - 1 ? first_bit != 0 : h.flag[sl] != 0;
        if (flagged && qpos - kpos > w_) continue;
        const int32_t b = h.blocks[sl / bt];
        kp_[m] = pool_.keys(b) + static_cast<int64_t>(sl % bt) * hd;
        vp_[m] = pool_.values(b) + static_cast<int64_t>(sl % bt) * hd;
        ++m;
      }
      for (int32_t c = 0; c <= i; ++c) {
        if (chunk_flag_[c] && i - c > w_) continue;
        kp_[m] = k + c * kstride + static_cast<int64_t>(j) * hd;
        vp_[m] = v + c * kstride + static_cast<int64_t>(j) * hd;
        ++m;
      }
      AttendGroup(q + i * qstride + static_cast<int64_t>(j) * g * hd, m,
                  out + i * qstride + static_cast<int64_t>(j) * g * hd);
      h.kv_reads += m;
      h.dense_reads += qpos + 1;
    }
    for (int32_t i = 0; i < n; ++i) {
      const uint8_t d = i == 0 ? first_bit : chunk_flag_[i - 1];
      if (!Commit(s, h, P + i, d, k + i * kstride + static_cast<int64_t>(j) * hd,
                  v + i * kstride + static_cast<int64_t>(j) * hd)) {
        s.broken = true;
        break;
      }
    }
  }
  if (s.broken) {
    Poison(out, n);
    return;
  }
  if (layer == geo_.n_layers - 1) {
    s.length = P + n;
    total_reserved_ -= s.reserved;  // the step is over: give back what it did not use
    s.reserved = 0;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvCache>> MakeCpuKvCache(const KvGeometry& g,
                                                        const KvPolicyConfig& p,
                                                        int64_t budget_bytes) {
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
