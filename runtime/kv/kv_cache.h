// The KV store interface the forward pass talks to, and the policies behind it.
//
// One KvCache per rank holds every sequence of that rank: a pool of fixed-size blocks sized by a
// byte budget, and per (sequence, layer, local KV head) a dense slot array in blocks with its own
// length and block table (docs/dms-semantics.md §4). Policies decide which slots are recycled:
//   none    dense cache, nothing evicted
//   dms     the model's own decisions (bits computed by the forward pass, runtime/backend/dms_decisions.h)
//   forced  synthetic DMS: bits drawn at a fixed rate from a seeded hash of (layer, head,
//           position) — for measuring memory and speed on models without DMS weights; labelled
//           as synthetic in every report
//   window  sliding window of `window` tokens plus `sinks` first tokens (StreamingLLM)
//   tova    keeps at most `budget_tokens` per head, evicting the lowest-attention token (TOVA)
//   h2o     keeps `budget_tokens` per head: recent half + heavy hitters by accumulated attention
//
// Threading: not thread-safe; the engine drives it from one thread (the attention of different
// heads may run on the backend's worker threads inside AttendAndAppend).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/status/statusor.h"

namespace dmsrt {

namespace kernels {
class ThreadPool;  // kernels/cpu/thread_pool.h
}

using SeqId = int32_t;

enum class KvPolicyKind { kNone, kDms, kForced, kWindow, kTova, kH2o, kThreshold };
const char* KvPolicyName(KvPolicyKind k);
absl::StatusOr<KvPolicyKind> ParseKvPolicy(const std::string& name);

struct KvPolicyConfig {
  KvPolicyKind kind = KvPolicyKind::kNone;
  int32_t window = 0;          // dms/forced/threshold: the delay window w; window: tokens kept
  int32_t sinks = 4;           // window policy: first tokens always kept
  int32_t dms_sinks = 0;       // dms: the first tokens are never flagged (the model's
                               // dms_sink_tokens; 0 = the reference rule)
  int32_t budget_tokens = 0;   // tova/h2o: tokens kept per head
  double force_rate = 0.0;     // forced: probability that a token is flagged
  uint64_t seed = 0;           // forced: hash seed
  double threshold = 0.0;      // threshold: a token whose score is below it is flagged
  int32_t threshold_shift = 0; // threshold: 0 = token k is judged by its own key (kvpress);
                               // 1 = by the key of token k+1 (the DMS one-token shift)
};

// Shapes of the part of the model this rank holds.
struct KvGeometry {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;      // KV heads on this rank
  int32_t n_heads = 0;         // query heads on this rank (n_kv_heads * group)
  int32_t head_dim = 0;
  int32_t block_tokens = 16;   // slots per block
  int32_t kv_head_offset = 0;  // global index of this rank's first KV head (for forced hashing)
};

// Compression figures of docs/dms-semantics.md §6, token-weighted.
struct KvHeadFigures {
  int64_t logical = 0;   // L: tokens the head has seen
  int64_t resident = 0;  // n: slots in use
  int64_t flagged = 0;   // tokens flagged for eviction
  int64_t kv_reads = 0;  // Σ over steps of resident slots read
  int64_t dense_reads = 0;  // Σ over steps of L
};
struct KvFigures {
  int64_t logical_tokens = 0;   // Σ L over sequences, layers, heads
  int64_t resident_tokens = 0;  // Σ n
  int64_t flagged_tokens = 0;
  int64_t kv_reads = 0;
  int64_t dense_reads = 0;
  int64_t blocks_held = 0;      // blocks actually held (shared blocks once)
  int64_t dense_blocks = 0;     // blocks a dense cache would hold
  int64_t kv_bytes = 0;         // bytes of the blocks held
  double cache_cr() const;      // Σ L / Σ n
  double eviction_rate() const; // flagged / Σ L
  double asymptotic_cr() const; // 1 / (1 - rate)
  double block_cr() const;      // dense_blocks / blocks_held
  // Per layer (summed over heads) and per (layer, head) (summed over sequences).
  std::vector<KvHeadFigures> per_layer;
  std::vector<KvHeadFigures> per_head;  // [layer * n_kv_heads + head]
};

class KvCache {
 public:
  virtual ~KvCache() = default;

  virtual const KvGeometry& geometry() const = 0;
  virtual const KvPolicyConfig& policy() const = 0;
  // Whether a token leaving a block other sequences share leaves its slot dead instead of
  // copying the block (runtime/kv/kv_store.h), so forked threads keep sharing their prompt under
  // eviction: what budget-mode admission counts as shared.
  virtual bool dead_slots() const { return false; }

  // Sequences. Fork shares every block of `parent` (reference counted); a block is copied the
  // first time a sequence writes into a shared one. Free returns unshared blocks at once.
  virtual absl::StatusOr<SeqId> Create() = 0;
  virtual absl::StatusOr<SeqId> Fork(SeqId parent) = 0;
  virtual absl::Status Free(SeqId seq) = 0;
  // Compress-then-continue: from the next token on, no token of `seq` is flagged or leaves, and
  // the tokens flagged before but still inside their delay window (or a victim policy's pick)
  // stay resident for good, so what was resident at this length is kept and every later token
  // adds to it. Forks of a frozen sequence are frozen. Without eviction it changes nothing.
  // UNIMPLEMENTED where the cache cannot do it (a tensor-parallel group, whose ranks each hold
  // an index of their own heads).
  virtual absl::Status FreezeEviction(SeqId seq) {
    return absl::UnimplementedError(
        absl::StrCat("this KV cache cannot freeze the eviction of sequence ", seq));
  }
  // Tokens the sequence has seen (its next position).
  virtual int64_t Length(SeqId seq) const = 0;

  // Makes sure that appending `n_new` tokens to `seq` cannot run out of blocks mid-step (new
  // blocks and copy-on-write copies included). RESOURCE_EXHAUSTED when the pool cannot provide
  // them; the cache is unchanged then, so the scheduler can preempt and retry.
  virtual absl::Status Reserve(SeqId seq, int32_t n_new) = 0;

  // One layer of one step for one sequence: attention of `n` new tokens (positions
  // Length(seq) .. Length(seq)+n-1) over what they may see, then their K/V are committed.
  // Visibility and the resulting cache follow docs/dms-semantics.md §3-§5 exactly.
  //   q     [n, n_heads, head_dim]     after RoPE
  //   k, v  [n, n_kv_heads, head_dim]  k after RoPE
  //   evict [n, n_kv_heads]            decision bits d[t, j] (dms only; nullptr otherwise)
  //   out   [n, n_heads, head_dim]     softmax(q k^T / sqrt(hd)) v
  // Must be called for layers 0..n_layers-1 in order; the sequence advances by n after the last.
  // Requires a successful Reserve(seq, n) for this step. With q == out == nullptr the tokens are
  // committed without attention (policies none/dms/forced/window; used to fill caches quickly).
  // Misuse (no reservation, layers out of order) fills `out` with NaN and marks the sequence
  // inconsistent: its next Reserve returns FAILED_PRECONDITION.
  virtual void AttendAndAppend(SeqId seq, int32_t layer, int32_t n, const float* q,
                               const float* k, const float* v, const uint8_t* evict,
                               float* out) = 0;

  // Optional: worker threads for the attention of different KV heads inside AttendAndAppend
  // (bookkeeping and block allocation stay on the calling thread). The pool must outlive the
  // cache or be reset to nullptr; AttendAndAppend then calls pool->ParallelFor and must not be
  // called while the pool runs something else. Default: single-threaded.
  virtual void SetThreadPool(kernels::ThreadPool* /*pool*/) {}

  // Pool state.
  virtual int64_t total_blocks() const = 0;
  virtual int64_t free_blocks() const = 0;
  virtual int64_t block_bytes() const = 0;  // bytes of one block (K and V, one head)

  // Figures over all live sequences, or one.
  virtual KvFigures Figures() const = 0;
  virtual KvFigures Figures(SeqId seq) const = 0;

  // Debug/test access: absolute positions resident in (seq, layer, head), ascending (slot order
  // is the store's own business: forks with dead slots place tokens differently).
  virtual std::vector<int32_t> ResidentPositions(SeqId seq, int32_t layer,
                                                 int32_t head) const = 0;
};

// ---- index-only store, for backends whose K/V rows live elsewhere (runtime/backend/cuda/) -------------
//
// The same bookkeeping as the CPU store (one implementation of docs/dms-semantics.md §4, so every
// backend keeps the same resident sets), without storage or attention: the caller runs attention
// with its own kernels over the block tables this index keeps, and the data movement the
// bookkeeping decides (copy-on-write copies, slot writes) is handed to a KvSlotSink in the order
// it must happen. Block ids are indices into the caller's pools of `total_blocks()` blocks.

class KvSlotSink {
 public:
  virtual ~KvSlotSink() = default;
  // Copy every slot of block `src` into the fresh block `dst` (copy-on-write). Every copy of a
  // step may run before every write of that step: a copy never reads a block written in the
  // same step.
  virtual void CopyBlock(int32_t src, int32_t dst) = 0;
  // K/V of the step's token row `row`, KV head `head`, go to slot `offset` of block `block`;
  // the token's absolute position is `pos`.
  // The block is entry `table_index` of the head's block table (KvHeadView::blocks) after the
  // write: a write is the only way a table entry changes (appends take new blocks, copy-on-write
  // replaces one), so a caller can mirror the tables from the writes alone.
  virtual void WriteSlot(int32_t row, int32_t head, int32_t block, int32_t offset, int32_t pos,
                         int32_t table_index) = 0;
  // Index with dead slots only: the token leaving KV head `head` left its slot dead (its block
  // is shared), just before the write of the token that pushed it out.
  virtual void DeadSlot(int32_t /*head*/) {}
};

struct KvHeadView {
  const int32_t* blocks = nullptr;  // block table: slot s is in blocks[s / block_tokens]
  int32_t n_blocks = 0;
  int32_t length = 0;               // slots: kernels read blocks for slots 0..length-1
  int32_t live = 0;                 // resident slots: length less the dead ones (kv_store.h)
};

class KvIndex : public KvCache {
 public:
  // Commits `n` tokens of `seq` in `layer` (the step's rows row0 .. row0+n-1; `evict` [n, n_kv]
  // holds the decision bits under policy dms, else nullptr) exactly as AttendAndAppend would,
  // and counts the attention reads the caller's kernels make for them (prefill: before the
  // commit, over the old slots with the §3 rule and the chunk; decode: over the slots after it).
  // Requires a successful Reserve(seq, n). False (and the sequence marked inconsistent) on
  // misuse.
  virtual bool CommitRows(SeqId seq, int32_t layer, int32_t n, int32_t row0, const uint8_t* evict,
                          KvSlotSink& sink) = 0;
  // `n` decode tokens of `seq` in `layer`, committed as `n` one-token CommitRows would be (the
  // same slots, flags, resident counts, figures and reads; block ids may differ when other
  // sequences commit in between in those steps), with every write reported at step row `row`.
  // Requires a successful Reserve(seq, n). Policies whose bits are fixed in advance only (none,
  // forced, window): under dms the model decides each token's bit, so it returns false (and
  // marks the sequence inconsistent). Used to advance simulated decode steps in bulk
  // (launch/plan/sim.cc).
  virtual bool CommitDecodeRun(SeqId seq, int32_t layer, int32_t n, int32_t row,
                               KvSlotSink& sink) = 0;
  // Deferred decision bits (policy dms with a delay window w >= 1). The bit d[t] of a decode
  // token only sets flag(t-1), and the first thing to read that flag is the next token's commit
  // (docs/dms-semantics.md §4 step 1 reads flag(t-w-1); w >= 1). So a backend that computes the
  // bits on a device may commit every layer of a decode step without them, one token at step
  // row `row`, and hand them over once the step is done: SetDeferredBits(seq, bits, stride)
  // with layer l's bits [n_kv] at bits + l * layer_stride. Every layer of the step must have
  // been committed this way. The bits are applied to the ring lazily, at the layer's next
  // commit, so that no head state is visited twice; everything that reads flags before that
  // (Reserve, Fork, FlaggedSlots, Figures) sees them. A sequence whose bits never arrive fails
  // its next Reserve (FAILED_PRECONDITION) and must be freed.
  virtual bool CommitDecodeDeferred(SeqId seq, int32_t layer, int32_t row, KvSlotSink& sink) = 0;
  virtual absl::Status SetDeferredBits(SeqId seq, const uint8_t* bits, int64_t layer_stride) = 0;
  // Victim policies (tova, h2o; victim_weights() true). The index picks the slot each head's next
  // token overwrites from the attention weights of the head's last query, which a backend whose
  // attention runs elsewhere hands over: such a sequence commits one token per step (CommitRows
  // with n == 1, every layer), and after the step SetVictimWeights(seq, w, layer_stride,
  // head_stride) gives the weights of layer l, head j at w + l * layer_stride + j * head_stride:
  // one per resident slot in the order of the head's view (slot s at entry s / block_tokens of
  // HeadViews' table), each the mean over the head's query heads of the softmax weight the slot
  // got (kernels/slot_weights.cuh). Until they arrive the sequence cannot commit again, Reserve
  // or Fork (FAILED_PRECONDITION). A frozen sequence (FreezeEviction) needs none.
  virtual bool victim_weights() const = 0;
  virtual absl::Status SetVictimWeights(SeqId seq, const float* w, int64_t layer_stride,
                                        int64_t head_stride) = 0;
  // The views of every KV head of (seq, layer): out[0 .. n_kv_heads). Empty views for an unknown
  // sequence or layer. Valid until the sequence changes.
  virtual void HeadViews(SeqId seq, int32_t layer, KvHeadView* out) const = 0;
  // A hint that CommitRows(seq, layer, ...) comes soon: starts loading the state it touches. A
  // step's commits visit a few cache lines of every (sequence, layer, head), none of them warm
  // at a large batch; issuing these loads a few sequences ahead overlaps their latencies.
  virtual void PrefetchCommit(SeqId /*seq*/, int32_t /*layer*/) const {}
  // d[t] when the policy fixes it in advance (forced, window; 0 for none), -1 when the model
  // decides (dms).
  virtual int PolicyBit(int32_t layer, int32_t head, int64_t t) const = 0;
  // Whether the decision bits come from the model (policy dms): the caller computes them and
  // hands them to CommitRows / SetDeferredBits.
  virtual bool model_bits() const = 0;
  // The delay window w of the flag-driven policies (window: window - 1), or -1 for none.
  virtual int32_t delay_window() const = 0;
  // The first position of `seq` whose token may still be flagged: the policy's sink count
  // (policy dms with sink tokens; 0 otherwise), or never (INT64_MAX) once the sequence is frozen
  // (FreezeEviction) or unknown. A bit that would flag an earlier token is ignored, also by
  // callers that read the step's bits themselves (the in-chunk visibility of PagedKvLayer).
  virtual int64_t FirstFlaggable(SeqId seq) const = 0;
  // The flagged tokens of (seq, layer, head) that are still resident before the next chunk, as
  // (pool slot index = block * block_tokens + offset, last visible query position = pos + w).
  // `boundary_bit` is d[Length(seq)], the first bit of the next chunk: it flags the last token.
  virtual void FlaggedSlots(SeqId seq, int32_t layer, int32_t head, uint8_t boundary_bit,
                            std::vector<std::pair<int32_t, int32_t>>* out) const = 0;
};

// An index over `budget_bytes / block_bytes` blocks of `block_bytes` each (what one block of
// one head costs in the caller's storage). Every policy but threshold (which scores the keys,
// and the index never sees them); tova and h2o take their attention weights through
// SetVictimWeights. `dead_slots`: a token leaving a block other sequences share leaves its
// slot dead (KvHeadView::live counts the rest) instead of copying the block; only for readers
// that skip dead slots (runtime/kv/kv_store.h).
absl::StatusOr<std::unique_ptr<KvIndex>> MakeKvIndex(const KvGeometry& geometry,
                                                     const KvPolicyConfig& policy,
                                                     int64_t budget_bytes, int64_t block_bytes,
                                                     bool dead_slots = false);

// CPU implementation (float32 slots), by default with dead slots (runtime/kv/kv_store.h):
// forked threads keep sharing their prompt's blocks under eviction. `budget_bytes` bounds the pool; the pool is
// allocated once.
absl::StatusOr<std::unique_ptr<KvCache>> MakeCpuKvCache(const KvGeometry& geometry,
                                                        const KvPolicyConfig& policy,
                                                        int64_t budget_bytes,
                                                        bool dead_slots = true);

}  // namespace dmsrt
