// The KV store behind MakeCpuKvCache and MakeKvIndex: a block index plus a policy.
//
// Per (sequence, layer, local KV head) the store keeps the block table, the absolute position of
// every slot, and, under a kFlagged policy (dms, forced, window), the ring of the last w+1
// tokens (token t's slot and flag live at ring[t % (w+1)]; only these tokens can be flagged and
// still resident). Metadata is per sequence; only K/V rows live in (shareable) blocks, so Fork
// copies metadata and shares blocks. The store implements each slot-reuse mechanism of
// runtime/kv/policy.h once, for every policy that picks it:
//   kAppend   every token appends; visibility k <= q.
//   kFlagged  docs/dms-semantics.md §4 exactly: flag(t-1) = d[t], the bits of a whole commit
//             asked of the policy at once; a flagged token leaves after w more tokens and the
//             token that pushes it out of the ring takes its slot. With dead slots (the CPU
//             store; see below) a leaving token whose block other sequences share leaves its
//             slot dead instead, and the new token appends.
//   kVictim   at most budget_tokens slots per head; once full, after attending, the slot the
//             policy picks from the attention weights is the one the next token overwrites.
//             On an index the weights come from the caller after each one-token step
//             (SetVictimWeights), and the same policy code picks the victim.
//
// Prefill. kAppend and kFlagged are exact for any chunk size (§5): every query of the chunk
// attends first (old resident slots with the §3 rule, the first token's bit flagging the
// previous chunk's last token, plus the chunk's own keys with a per-key last-visible-query
// bound) and only then are the chunk's tokens committed in order with the §4 bookkeeping, so no
// query loses a key to a slot recycled later in the same chunk. kVictim processes a chunk token
// by token (commit, attend, pick the next victim): exactly what decoding would give, at
// O(chunk * budget) cost.
//
// Memory. Reserve computes, per head, an upper bound on the blocks a step can take: appended
// slots (a token appends unless the token leaving the window is known to be flagged; flags a
// policy fixes in advance are used, model bits not yet seen count as "append and maybe
// recycle") plus copies of shared blocks the step may write (recycled slots and the partial
// last block). The bound is promised to the sequence (other sequences' Reserve cannot take it)
// and released when the step's last layer is done. A step that would exceed its promise
// (AttendAndAppend without Reserve) writes NaN and marks the sequence inconsistent instead of
// taking blocks promised to others.
//
// Dead slots. A best-of-N job forks its threads from one prefilled prompt, whose blocks they
// share. Recycling the slot of an evicted prompt token would copy its whole block into the
// thread, and since ring recycling scatters a prompt's last tokens over all its blocks, every
// thread would soon hold a private copy of the whole resident prompt. With `dead_slots` the
// slot is left as it is, marked dead in this sequence's metadata (pos = kDeadSlot); readers skip
// dead slots (the CPU attention here; KvHeadView::live). Only while more than half of the block
// stays resident for the sequence once its flagged ring tokens there have left (LeavesDead): a
// block it keeps little of is copied as before, whose free slots then take its next tokens.
// Only an option because the CUDA decode kernels read every slot below the length: an index
// for them is made without it.
//
// Attention (CPU store only) is kernels/cpu/paged_attention.h over row pointers into the pool.
// No heap allocation in steady state: scratch buffers are members (one set, or one per head
// when heads run on workers) and only grow. Single-threaded unless SetThreadPool gives workers;
// then the heads of a layer are spread over them once the step has enough work, while
// bookkeeping and block allocation stay on the calling thread (decode commits first, a chunk
// attends first).
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/paged_attention.h"
#include "runtime/kv/block_pool.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/policy.h"

namespace dmsrt {

namespace kv_store_internal {

struct HeadState {
  std::vector<int32_t> blocks;  // block table: slot s lives in blocks[s / block_tokens]
  std::vector<int32_t> pos;     // [n] absolute position of each slot
  std::vector<float> score;     // [n] the policy's per-slot score (KvPolicy::slot_scores)
  // kFlagged: token t at ring[t % ring.size()] as RingEntry(slot, flag(t)); flag(t) is set when
  // token t+1 arrives. A flag matters only while its token is in the ring: a flagged token
  // leaves (its slot recycled) as it drops out, so every older resident token is unflagged.
  std::vector<int32_t> ring;
  int32_t n = 0;                // slots (never decreases): resident ones and `dead` ones
  int32_t dead = 0;             // slots whose token left but whose shared block was kept
  std::vector<uint16_t> dead_in_block;  // dead slots per block-table entry (grown on the first)
  int32_t victim = -1;          // kVictim: slot the next token overwrites
  int64_t logical = 0;          // L: tokens seen
  int64_t flagged = 0;
  int64_t kv_reads = 0;
  int64_t dense_reads = 0;
};

enum : uint8_t { kDeferNone = 0, kDeferAwaiting = 1, kDeferKnown = 2 };

// HeadState::pos of a dead slot (see KvStore: dead slots).
constexpr int32_t kDeadSlot = -1;

constexpr int32_t RingEntry(int32_t slot, bool flagged) { return slot * 2 + (flagged ? 1 : 0); }
constexpr int32_t RingSlot(int32_t entry) { return entry >> 1; }
constexpr bool RingFlagged(int32_t entry) { return (entry & 1) != 0; }

// Per-worker buffers of the attention of one KV head.
struct Scratch {
  std::vector<const float*> kp, vp;  // key/value row pointers of the keys one query sees
  std::vector<float> probs;          // [g, m] attention weights
  std::vector<uint8_t> chunk_flag;   // [n] flags of a chunk's tokens
  std::vector<float> parts;          // decode: one partial softmax per key chunk (KeyChunkFloats)
};

// Decode attention: one head's keys in chunks of this many (kernels::AttendKeyChunk), and the
// multiply-adds of a step from which they are spread over the thread pool (a waiting worker
// wakes in about a microsecond; a chunk of 128 keys is a few microseconds of work).
constexpr int32_t kDecodeKeyChunk = 128;
constexpr int64_t kDecodeParallelMadds = 1 << 16;

// One unit of a decode step's attention: key chunk `chunk` of `chunks` of a KV head.
struct DecodeUnit {
  int32_t head;
  int32_t chunk;
  int32_t chunks;
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
  // Victim policies on an index: the layers committed since the last SetVictimWeights (a
  // commit of every layer per step, so 0 or n_layers between steps).
  int32_t awaiting_weights = 0;
  int64_t length = 0;            // tokens committed in every layer
  int64_t reserved = 0;          // blocks promised to this sequence by Reserve, not yet taken
  bool broken = false;           // AttendAndAppend was misused; see Reserve
  bool frozen = false;           // FreezeEviction: nothing is flagged or leaves any more
};

}  // namespace kv_store_internal

class KvStore final : public KvIndex {
 public:
  // index_block_bytes > 0: index only (no storage; see KvIndex). `policy` must have been made
  // from `p` (MakeKvPolicy). `dead_slots`: see above.
  KvStore(const KvGeometry& g, const KvPolicyConfig& p, std::unique_ptr<KvPolicy> policy,
          int64_t total_blocks, int64_t index_block_bytes = 0, bool dead_slots = false);

  void SetThreadPool(kernels::ThreadPool* pool) override;
  bool pool_ok() const { return pool_->ok(); }
  const KvGeometry& geometry() const override { return geo_; }
  const KvPolicyConfig& policy() const override { return pol_; }
  bool dead_slots() const override { return dead_slots_; }

  absl::StatusOr<SeqId> Create() override;
  absl::StatusOr<SeqId> Fork(SeqId parent) override;
  absl::Status Free(SeqId id) override;
  absl::Status FreezeEviction(SeqId id) override;
  int64_t Length(SeqId id) const override;
  absl::Status Reserve(SeqId id, int32_t n_new) override;
  void AttendAndAppend(SeqId id, int32_t layer, int32_t n, const float* q, const float* k,
                       const float* v, const uint8_t* evict, float* out) override;

  int64_t total_blocks() const override { return pool_->total_blocks(); }
  int64_t free_blocks() const override { return pool_->free_blocks(); }
  int64_t block_bytes() const override { return pool_->block_bytes(); }
  KvFigures Figures() const override;
  KvFigures Figures(SeqId id) const override;
  std::vector<int32_t> ResidentPositions(SeqId id, int32_t layer, int32_t head) const override;

  // ---- KvIndex ----
  bool CommitRows(SeqId id, int32_t layer, int32_t n, int32_t row0, const uint8_t* evict,
                  KvSlotSink& sink) override {
    return CommitChunk(id, layer, n, row0, evict, /*defer=*/false, sink);
  }
  bool CommitDecodeRun(SeqId id, int32_t layer, int32_t n, int32_t row, KvSlotSink& sink) override {
    return CommitChunk(id, layer, n, row, nullptr, /*defer=*/false, sink, /*decode_run=*/true);
  }
  bool CommitDecodeDeferred(SeqId id, int32_t layer, int32_t row, KvSlotSink& sink) override {
    return CommitChunk(id, layer, 1, row, nullptr, /*defer=*/true, sink);
  }
  absl::Status SetDeferredBits(SeqId id, const uint8_t* bits, int64_t layer_stride) override;
  bool victim_weights() const override { return victim_; }
  absl::Status SetVictimWeights(SeqId id, const float* w, int64_t layer_stride,
                                int64_t head_stride) override;
  void PrefetchCommit(SeqId id, int32_t layer) const override;
  void HeadViews(SeqId id, int32_t layer, KvHeadView* out) const override;
  int PolicyBit(int32_t layer, int32_t head, int64_t t) const override {
    if (model_bits_) return -1;
    return t >= 1 ? policy_->KnownFlag(layer, head, t - 1) : 0;
  }
  bool model_bits() const override { return model_bits_; }
  int32_t delay_window() const override { return ring_ ? w_ : -1; }
  int64_t FirstFlaggable(SeqId id) const override;
  void FlaggedSlots(SeqId id, int32_t layer, int32_t head, uint8_t boundary_bit,
                    std::vector<std::pair<int32_t, int32_t>>* out) const override;

 private:
  using HeadState = kv_store_internal::HeadState;
  using Sequence = kv_store_internal::Sequence;
  using Scratch = kv_store_internal::Scratch;

  // ---- bookkeeping (kv_store.cc) ----
  // decode_run: the n tokens are n decode steps of one row (CommitDecodeRun), not a chunk.
  bool CommitChunk(SeqId id, int32_t layer, int32_t n, int32_t row0, const uint8_t* evict,
                   bool defer, KvSlotSink& sink, bool decode_run = false);
  void CountPrefillReads(HeadState* heads, int32_t n, int64_t P, const uint8_t* bits);
  // The decision bits d[P + i] [n, n_kv_heads] of a commit into bits_, or nullptr when the
  // policy has none (every bit 0).
  // `heads` are the layer's heads of the sequence (for the key of token P-1, k_prev).
  const uint8_t* StepBits(const Sequence& s, const HeadState* heads, int32_t layer, int64_t P,
                          int32_t n, const uint8_t* evict, const float* k);
  // The first token of `s` that may still be flagged (after the protected sinks; never once
  // frozen), and whether token k may.
  int64_t FirstFlaggable(const Sequence& s) const {
    return s.frozen ? std::numeric_limits<int64_t>::max() : policy_->protected_prefix();
  }
  bool MayFlag(const Sequence& s, int64_t k) const { return k >= FirstFlaggable(s); }
  static uint8_t BitAt(const uint8_t* bits, int32_t nkv, int32_t i, int32_t j) {
    return bits != nullptr ? bits[static_cast<int64_t>(i) * nkv + j] : 0;
  }
  void EndLayer(Sequence& s, int32_t layer, int64_t new_length, bool deferred);
  static void SetFlag(HeadState& h, int64_t k);
  bool ResolveDeferred(Sequence& s, int32_t layer);
  bool ResolveDeferred(Sequence& s);
  bool AwaitingBits(const Sequence& s) const;
  int PendingFlag(const Sequence& s, int32_t layer, int32_t j, int64_t k) const;
  static absl::Status NoSuchSequence(SeqId id);
  KvFigures EmptyFigures() const;
  void AddFigures(const Sequence& s, KvFigures& f) const;
  int64_t BlocksNeeded(const HeadState& h, int32_t layer, int32_t j, int64_t P, int32_t n_new,
                       bool flag_pending = false, bool frozen = false);
  int64_t RingAppends(const HeadState& h, int32_t layer, int32_t j, int64_t P, int32_t n_new,
                      bool flag_pending);
  int32_t TakeBlock(Sequence& s);
  int32_t AppendSlot(Sequence& s, HeadState& h);
  bool LeavesDead(const HeadState& h, int32_t slot, int64_t t) const;
  void KillSlot(HeadState& h, int32_t slot, int32_t head);
  bool WriteSlot(Sequence& s, HeadState& h, int32_t slot, const float* krow, const float* vrow,
                 int32_t row, int32_t head, int64_t pos);
  bool Commit(Sequence& s, HeadState& h, int64_t t, uint8_t d, const float* krow,
              const float* vrow, int32_t row = 0, int32_t head = 0);

  // ---- CPU attention (kv_store_attend.cc) ----
  void CommitOnly(Sequence& s, HeadState* heads, int32_t layer, int32_t n, const float* k,
                  const float* v, const uint8_t* bits);
  void AttendVictim(Sequence& s, HeadState* heads, int32_t n, const float* q, const float* k,
                    const float* v, float* out);
  void AttendDecode(Sequence& s, HeadState* heads, const float* q, const float* k,
                    const float* v, const uint8_t* bits, float* out);
  void AttendChunk(Sequence& s, HeadState* heads, int32_t n, const float* q, const float* k,
                   const float* v, const uint8_t* bits, float* out);
  void AttendRows(Scratch& sc, const float* qg, int32_t m, float* outg) const;
  void EnsureKeyScratch(Scratch& sc, size_t m) const;
  // Points the scratch rows at the head's resident slots (every slot but the dead ones).
  void GatherAllSlots(Scratch& sc, const HeadState& h) const;
  static int32_t Resident(const HeadState& h) { return h.n - h.dead; }
  // The policy's pick for the slot the next token of `h` overwrites, from the weights `probs`
  // [group, h.n] of the query of token t (the CPU attention's, or the caller's on an index).
  void PickVictim(HeadState& h, const float* probs, int32_t group, int64_t t) const;
  template <typename Fn>
  void ForEachHead(int64_t madds, const Fn& fn);
  void Poison(float* out, int32_t n);

  KvGeometry geo_;
  KvPolicyConfig pol_;
  std::unique_ptr<KvPolicy> policy_;
  std::unique_ptr<BlockPool> pool_;
  kernels::PagedKvPool rows_;  // the pool's storage as the attention kernels see it
  bool index_only_ = false;
  KvSlotSink* sink_ = nullptr;  // index only: receives the data movement of CommitRows
  int32_t group_ = 1;
  // The policy's mechanism and constants, read on every commit.
  KvSlotReuse reuse_ = KvSlotReuse::kAppend;
  bool ring_ = false;          // reuse_ == kFlagged
  bool victim_ = false;        // reuse_ == kVictim
  bool dead_slots_ = false;    // see above
  bool model_bits_ = false;
  bool slot_scores_ = false;
  int32_t budget_ = 0;         // kVictim: slots per head
  int32_t w_ = std::numeric_limits<int32_t>::max();  // delay window (huge unless kFlagged)
  float scale_ = 1.0f;
  absl::flat_hash_map<SeqId, std::unique_ptr<Sequence>> seqs_;
  SeqId next_id_ = 0;
  int64_t total_reserved_ = 0;
  // Scratch, grown on demand and reused: one set, or one per KV head with a thread pool.
  std::vector<Scratch> scratch_;
  std::vector<kv_store_internal::DecodeUnit> decode_units_;  // AttendDecode's work list, reused
  std::vector<int32_t> cow_scratch_;
  std::vector<uint8_t> bits_;  // [n, n_kv_heads] decision bits of the current commit
  std::vector<float> prev_key_;  // [n_kv_heads, head_dim] key of token P-1 (KvStepInputs::k_prev)
  kernels::ThreadPool* threads_ = nullptr;
};

}  // namespace dmsrt
