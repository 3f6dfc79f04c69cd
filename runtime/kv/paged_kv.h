// The KV half of one layer of a step, for a backend whose K/V rows live in paged pools on a
// device (runtime/backend/cuda/): the bookkeeping is KvIndex's (the CPU store's, so resident sets are the
// same on every backend), the data movement and attention go to a PagedKvOps implementation.
//
// The pools follow the kernels' data contracts (kernels/decode_attention.cuh,
// kernels/prefill_attention.cuh): k/v [num_blocks, block_tokens, head_dim], and per slot its
// absolute position (pos) and its last visible query position (last_vis). last_vis depends on
// the sequence's view (the same shared block may hold a token one fork has flagged and another
// has not), so it is not kept in the pool: it is INT32_MAX everywhere, except while a prefill
// chunk attends, when the chunk's own flagged resident tokens carry pos + w. Decode needs no
// visibility: every slot still resident when a decode token attends is visible to it
// (docs/dms-semantics.md §3, §4: a flagged token leaves exactly when it stops being visible).
//
// Order of one layer (PagedKvLayer::Run), which makes it exact for any mix of chunks:
//   1. each prefill chunk (n > 1): SetLastVisible, PrefillAttention over the slots before the
//      commit plus the chunk itself, ResetLastVisible;
//   2. every chunk commits (KvIndex::CommitRows): CopyBlocks (copy-on-write), then WriteSlots;
//   3. the decode rows attend over the slots after the commit (DecodeAttention);
//   4. under a victim policy (tova, h2o: KvIndex::victim_weights), the decode rows' attention
//      weights per slot (DecodeSlotWeights), which the caller hands to the index after the step
//      (KvIndex::SetVictimWeights). Such a step has one-token chunks only.
// Decode chunks (one token) must come first in the step's rows: rows 0 .. n_decode-1.
//
// Decode tables. Where the ops keep them between steps (ResizeDecodeTables), every decode
// sequence holds a table row for as long as it decodes, and a step sends only what changed: a
// commit changes a head's table only through its one write (a new block, or a block copied on
// write), and the writes say which entry (KvSlotSink::WriteSlot's table_index). A row is rebuilt
// from the index when it is new to its sequence, or when the sequence changed outside decode
// commits (its length is not the one the row was last brought to: a prefill chunk, an
// uncomputed append). Otherwise the tables are written whole for each layer of each step.
// Layers of a step run in order from 0 with the same chunks.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "runtime/kv/kv_cache.h"

namespace dmsrt {

struct PagedChunk {
  SeqId seq = -1;
  int32_t row0 = 0;  // first row of the step's q/k/v/out
  int32_t n = 0;     // tokens
};

struct KvSlotWrite {
  int32_t row = 0;
  int32_t head = 0;
  int32_t slot = 0;  // pool slot index: block * block_tokens + offset
  int32_t pos = 0;
};

// Where the data lives. Every argument is host memory the call may read only while it runs.
// Each call may run its elements in parallel, so the lists are race-free: slots of one
// SetLastVisible/ResetLastVisible or WriteSlots call are distinct (WriteSlots carries only the
// last write of each slot), and copy destinations are distinct and never sources.
class PagedKvOps {
 public:
  virtual ~PagedKvOps() = default;
  // (pool slot index, value) pairs for last_vis; Reset puts INT32_MAX back in the same slots.
  virtual void SetLastVisible(const std::vector<std::pair<int32_t, int32_t>>& slots) = 0;
  virtual void ResetLastVisible(const std::vector<std::pair<int32_t, int32_t>>& slots) = 0;
  // Rows c.row0 .. c.row0+c.n-1 at positions q_pos0.. over the old slots (table [n_kv, maxb],
  // old_lengths [n_kv]) and the chunk's keys (last_vis_new [n, n_kv]).
  virtual void PrefillAttention(const PagedChunk& c, int32_t q_pos0,
                                const std::vector<int32_t>& table, int32_t max_blocks,
                                const std::vector<int32_t>& old_lengths,
                                const std::vector<int32_t>& last_vis_new) = 0;
  // (src, dst) block pairs.
  virtual void CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& copies) = 0;
  virtual void WriteSlots(const std::vector<KvSlotWrite>& writes) = 0;
  // Host memory for `n` int32 of decode index (tables, then lengths), valid until the next
  // DecodeAttention returns. Run writes the tables there once; a device implementation hands
  // out its pinned staging memory so that they go up without another copy. The default is a
  // vector of its own.
  virtual int32_t* DecodeIndexBuffer(size_t n) {
    decode_index_.resize(n);
    return decode_index_.data();
  }
  // Rows 0 .. batch-1, one token each: tables [batch, n_kv, maxb], lengths [batch, n_kv], both
  // inside the last DecodeIndexBuffer.
  virtual void DecodeAttention(int32_t batch, const int32_t* tables, int32_t max_blocks,
                               const int32_t* lengths, int32_t max_length) = 0;

  // Resident decode tables (optional): block tables that stay where the kernels read them
  // between steps, so that a decode step sends only the entries its writes changed instead of
  // every table. An implementation that keeps them returns true from ResizeDecodeTables, which
  // makes room for `rows` table rows of n_kv tables of `cap` entries in every layer (contents
  // undefined afterwards). DecodeAttentionRows first sets `entries` of the layer's tables
  // ((index, block) pairs, index = (row * n_kv + head) * cap + entry; indices distinct), then
  // attends rows 0 .. batch-1, batch row b reading table row table_rows[b] (lengths
  // [batch, n_kv]).
  virtual bool ResizeDecodeTables(int32_t /*rows*/, int32_t /*cap*/) { return false; }
  // Victim policies: the attention weights of the decode rows of the layer's last
  // DecodeAttention or DecodeAttentionRows call, per resident slot in table order and averaged
  // over each KV head's query heads (kernels/slot_weights.cuh), kept by the implementation for
  // `layer` until the caller gives them to KvIndex::SetVictimWeights.
  virtual void DecodeSlotWeights(int32_t layer) = 0;
  virtual void DecodeAttentionRows(int32_t /*layer*/,
                                   const std::vector<std::pair<int32_t, int32_t>>& /*entries*/,
                                   int32_t /*batch*/, const std::vector<int32_t>& /*table_rows*/,
                                   const std::vector<int32_t>& /*lengths*/,
                                   int32_t /*max_length*/) {}

 private:
  std::vector<int32_t> decode_index_;
};

class PagedKvLayer {
 public:
  // chunks[0 .. n_decode) are one-token chunks at rows 0 .. n_decode-1; the rest have n >= 1
  // tokens each (a one-token chunk after them is run as a prefill chunk). `bits` [rows, n_kv]
  // holds the model's decision bits under policy dms (nullptr otherwise). Every chunk must have
  // been reserved (KvCache::Reserve) for this step.
  // With `defer_bits` (policy dms, delay window >= 1, decode chunks only) the layer commits
  // without the bits (KvIndex::CommitDecodeDeferred, `bits` unused): nothing of this layer
  // needs them, so the caller hands them over after the step (KvIndex::SetDeferredBits) and a
  // device runs the step without waiting for them layer by layer.
  absl::Status Run(KvIndex& kv, int32_t layer, const std::vector<PagedChunk>& chunks,
                   int32_t n_decode, const uint8_t* bits, PagedKvOps& ops,
                   bool defer_bits = false);
  // Whether a step of these chunks may run with `defer_bits`.
  static bool CanDeferBits(const KvIndex& kv, const std::vector<PagedChunk>& chunks,
                           int32_t n_decode);

 private:
  class Sink;
  // A write of a decode row: the head's slot `slot` is in use, in block `block`, which is
  // entry slot / block_tokens of its table.
  struct TableWrite {
    int32_t row, head, block, slot;
  };
  // Decode attention with tables built for this step (ops without resident tables).
  void DecodeWithStepTables(KvIndex& kv, int32_t layer, const std::vector<PagedChunk>& chunks,
                            int32_t n_decode, PagedKvOps& ops);
  // Decode attention over resident tables; false if the ops do not keep them.
  bool DecodeWithResidentTables(KvIndex& kv, int32_t layer, const std::vector<PagedChunk>& chunks,
                                int32_t n_decode, PagedKvOps& ops);
  void AssignTableRows(const KvIndex& kv, const std::vector<PagedChunk>& chunks, int32_t n_decode);
  bool ResizeResident(PagedKvOps& ops, const KvGeometry& geo, int32_t rows, int32_t cap);
  // Resident tables: which sequence each table row holds, and per layer up to which sequence
  // length a row's tables (and its mirrored lengths) are current.
  struct Resident {
    bool unsupported = false;
    int32_t rows = 0, cap = 0;              // room made; seq_of_row may be longer (room to make)
    int64_t step = 0;
    std::vector<SeqId> seq_of_row;          // [rows]
    std::vector<int64_t> last_step;         // [rows]: the last step that used the row
    std::vector<std::vector<int64_t>> valid_at;  // [layer][rows]: Length(seq) it is current for
    std::vector<std::vector<int32_t>> len;       // [layer][rows * n_kv]
    absl::flat_hash_map<SeqId, int32_t> row_of;
    std::vector<int32_t> step_rows;         // [n_decode] this step's table row per decode row
    std::vector<int64_t> step_length;       // [n_decode] Length(seq) before this step
  } res_;
  std::vector<TableWrite> table_writes_;
  std::vector<std::pair<int32_t, int32_t>> entries_;
  std::vector<uint8_t> rebuilt_;
  std::vector<std::pair<int32_t, int32_t>> flagged_, head_flagged_, copies_;
  std::vector<KvSlotWrite> writes_;
  absl::flat_hash_set<int32_t> slot_seen_;
  std::vector<int32_t> table_, lengths_, last_vis_new_;
  std::vector<KvHeadView> views_;
};

}  // namespace dmsrt
