#include "runtime/kv/paged_kv.h"

#include <algorithm>
#include <cstddef>
#include <limits>

#include "absl/strings/str_cat.h"

namespace dmsrt {

class PagedKvLayer::Sink final : public KvSlotSink {
 public:
  Sink(int32_t block_tokens, int32_t n_decode, std::vector<std::pair<int32_t, int32_t>>* copies,
       std::vector<KvSlotWrite>* writes, std::vector<TableWrite>* table_writes)
      : bt_(block_tokens),
        n_decode_(n_decode),
        copies_(copies),
        writes_(writes),
        table_writes_(table_writes) {}
  void CopyBlock(int32_t src, int32_t dst) override { copies_->emplace_back(src, dst); }
  void WriteSlot(int32_t row, int32_t head, int32_t block, int32_t offset, int32_t pos,
                 int32_t table_index) override {
    writes_->push_back(KvSlotWrite{row, head, block * bt_ + offset, pos});
    if (row < n_decode_) {
      table_writes_->push_back(TableWrite{row, head, block, table_index * bt_ + offset});
    }
  }

 private:
  int32_t bt_, n_decode_;
  std::vector<std::pair<int32_t, int32_t>>* copies_;
  std::vector<KvSlotWrite>* writes_;
  std::vector<TableWrite>* table_writes_;
};

bool PagedKvLayer::CanDeferBits(const KvIndex& kv, const std::vector<PagedChunk>& chunks,
                                int32_t n_decode) {
  return kv.model_bits() && kv.delay_window() >= 1 && n_decode > 0 &&
         n_decode == static_cast<int32_t>(chunks.size());
}

absl::Status PagedKvLayer::Run(KvIndex& kv, int32_t layer, const std::vector<PagedChunk>& chunks,
                               int32_t n_decode, const uint8_t* bits, PagedKvOps& ops,
                               bool defer_bits) {
  const KvGeometry& geo = kv.geometry();
  const int32_t nkv = geo.n_kv_heads;
  const int32_t w = kv.delay_window();
  const bool model_bits = kv.model_bits();
  if (defer_bits && !CanDeferBits(kv, chunks, n_decode)) {
    return absl::InternalError(
        "deferred decision bits need policy dms, a delay window of at least 1 and a step of "
        "decode tokens only");
  }
  if (model_bits && bits == nullptr && !defer_bits) {
    return absl::InternalError("KV policy dms needs the model's decision bits");
  }
  const bool victim = kv.victim_weights();
  if (victim && n_decode != static_cast<int32_t>(chunks.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV policy ", KvPolicyName(kv.policy().kind), " picks the slot of each token from the "
        "previous token's attention weights: a step takes one token per sequence"));
  }
  // d[t] of KV head j for the token at `row` (position t) of a sequence whose first flaggable
  // token is `first`: a bit that would flag a protected (sink) token t - 1, or any token of a
  // frozen sequence, is 0, as the index's own commits make it.
  auto bit = [&](int32_t row, int32_t j, int64_t t, int64_t first) -> bool {
    if (t - 1 < first) return false;
    if (model_bits) return bits[static_cast<int64_t>(row) * nkv + j] != 0;
    return kv.PolicyBit(layer, j, t) == 1;
  };
  constexpr int32_t kNever = std::numeric_limits<int32_t>::max();

  // 1. Prefill chunks attend before anything of this layer is committed.
  for (size_t ci = static_cast<size_t>(n_decode); ci < chunks.size(); ++ci) {
    const PagedChunk& c = chunks[ci];
    const int64_t P = kv.Length(c.seq);
    if (P < 0) return absl::NotFoundError(absl::StrCat("no KV sequence with id ", c.seq));
    views_.resize(nkv);
    kv.HeadViews(c.seq, layer, views_.data());
    int32_t max_blocks = 1;
    for (int32_t j = 0; j < nkv; ++j) max_blocks = std::max(max_blocks, views_[j].n_blocks);
    table_.assign(static_cast<size_t>(nkv) * max_blocks, 0);
    lengths_.assign(nkv, 0);
    last_vis_new_.assign(static_cast<size_t>(c.n) * nkv, kNever);
    flagged_.clear();
    const int64_t first = kv.FirstFlaggable(c.seq);
    for (int32_t j = 0; j < nkv; ++j) {
      const KvHeadView& v = views_[j];
      std::copy(v.blocks, v.blocks + v.n_blocks, table_.begin() + static_cast<int64_t>(j) * max_blocks);
      lengths_[j] = v.length;
      if (w < 0) continue;
      kv.FlaggedSlots(c.seq, layer, j, P > 0 && bit(c.row0, j, P, first) ? 1 : 0, &head_flagged_);
      flagged_.insert(flagged_.end(), head_flagged_.begin(), head_flagged_.end());
      for (int32_t i = 0; i + 1 < c.n; ++i) {  // flag(P+i) = d[P+i+1]
        if (bit(c.row0 + i + 1, j, P + i + 1, first)) {
          last_vis_new_[static_cast<size_t>(i) * nkv + j] = static_cast<int32_t>(P + i + w);
        }
      }
    }
    if (!flagged_.empty()) ops.SetLastVisible(flagged_);
    ops.PrefillAttention(c, static_cast<int32_t>(P), table_, max_blocks, lengths_, last_vis_new_);
    if (!flagged_.empty()) ops.ResetLastVisible(flagged_);
  }

  for (int32_t b = 0; b < n_decode; ++b) {
    if (chunks[b].n != 1 || chunks[b].row0 != b) {
      return absl::InternalError("decode chunks must be one token each, at rows 0 .. n_decode-1");
    }
  }
  if (layer == 0 && n_decode > 0) AssignTableRows(kv, chunks, n_decode);

  // 2. Commit every chunk: copies first, then writes.
  copies_.clear();
  writes_.clear();
  table_writes_.clear();
  Sink sink(geo.block_tokens, n_decode, &copies_, &writes_, &table_writes_);
  constexpr size_t kPrefetchAhead = 4;  // 4 and 8 measured the same at batch 256
  for (size_t ci = 0; ci < std::min(kPrefetchAhead, chunks.size()); ++ci) {
    kv.PrefetchCommit(chunks[ci].seq, layer);
  }
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const PagedChunk& c = chunks[ci];
    if (ci + kPrefetchAhead < chunks.size()) {
      kv.PrefetchCommit(chunks[ci + kPrefetchAhead].seq, layer);
    }
    const uint8_t* chunk_bits =
        model_bits && !defer_bits ? bits + static_cast<int64_t>(c.row0) * nkv : nullptr;
    const bool ok = defer_bits ? kv.CommitDecodeDeferred(c.seq, layer, c.row0, sink)
                               : kv.CommitRows(c.seq, layer, c.n, c.row0, chunk_bits, sink);
    if (!ok) {
      return absl::InternalError(absl::StrCat(
          "KV commit of sequence ", c.seq, " in layer ", layer,
          " failed (not reserved, or layers out of order); the sequence must be freed"));
    }
  }
  if (!copies_.empty()) ops.CopyBlocks(copies_);
  // A slot freed by an eviction may be taken again later in the same commit (a chunk longer
  // than the window, or another sequence taking a block such a chunk emptied). The store
  // applies writes in order, a device in parallel: keep only the last write of each slot. A step
  // of one-token chunks cannot write a slot twice (each writes one new token per head, into a
  // block it alone holds), so the usual decode step skips this.
  const bool reuse_possible = n_decode < static_cast<int32_t>(chunks.size());
  if (!writes_.empty() && reuse_possible) {
    slot_seen_.clear();
    size_t keep = writes_.size();
    for (size_t i = writes_.size(); i-- > 0;) {
      if (slot_seen_.insert(writes_[i].slot).second) writes_[--keep] = writes_[i];
    }
    writes_.erase(writes_.begin(), writes_.begin() + static_cast<std::ptrdiff_t>(keep));
  }
  if (!writes_.empty()) ops.WriteSlots(writes_);

  // 3. Decode rows attend over what is resident now.
  if (n_decode > 0 && !DecodeWithResidentTables(kv, layer, chunks, n_decode, ops)) {
    DecodeWithStepTables(kv, layer, chunks, n_decode, ops);
  }
  if (victim && n_decode > 0) ops.DecodeSlotWeights(layer);
  return absl::OkStatus();
}

// Tables built for this step. At a large batch this is the largest thing a step builds on the
// host (batch x heads x blocks), so it is written once, in place.
void PagedKvLayer::DecodeWithStepTables(KvIndex& kv, int32_t layer,
                                        const std::vector<PagedChunk>& chunks, int32_t n_decode,
                                        PagedKvOps& ops) {
  const int32_t nkv = kv.geometry().n_kv_heads;
  int32_t max_blocks = 1, max_length = 0;
  views_.resize(static_cast<size_t>(n_decode) * nkv);
  for (int32_t b = 0; b < n_decode; ++b) {
    KvHeadView* v = views_.data() + static_cast<size_t>(b) * nkv;
    kv.HeadViews(chunks[b].seq, layer, v);
    for (int32_t j = 0; j < nkv; ++j) {
      max_blocks = std::max(max_blocks, v[j].n_blocks);
      max_length = std::max(max_length, v[j].length);
    }
  }
  const size_t n_tables = views_.size();
  int32_t* tables = ops.DecodeIndexBuffer(n_tables * (static_cast<size_t>(max_blocks) + 1));
  int32_t* lengths = tables + n_tables * max_blocks;
  for (size_t i = 0; i < n_tables; ++i) {
    const KvHeadView& v = views_[i];
    int32_t* row = tables + i * max_blocks;
    std::copy(v.blocks, v.blocks + v.n_blocks, row);
    std::fill(row + v.n_blocks, row + max_blocks, 0);  // never read; kept defined
    lengths[i] = v.length;
  }
  ops.DecodeAttention(n_decode, tables, max_blocks, lengths, max_length);
}

bool PagedKvLayer::ResizeResident(PagedKvOps& ops, const KvGeometry& geo, int32_t rows,
                                  int32_t cap) {
  if (!ops.ResizeDecodeTables(rows, cap)) {
    res_ = Resident{};
    res_.unsupported = true;
    return false;
  }
  res_.rows = rows;
  res_.cap = cap;
  res_.seq_of_row.resize(rows, -1);
  res_.last_step.resize(rows, 0);
  res_.valid_at.assign(geo.n_layers, std::vector<int64_t>(rows, -1));
  res_.len.assign(geo.n_layers, std::vector<int32_t>(static_cast<size_t>(rows) * geo.n_kv_heads, 0));
  return true;
}

// Once per step, before layer 0 commits: a table row for every decode sequence. A sequence keeps
// its row while it decodes; a new one takes the row unused longest (or the row count grows).
void PagedKvLayer::AssignTableRows(const KvIndex& kv, const std::vector<PagedChunk>& chunks,
                                   int32_t n_decode) {
  if (res_.unsupported) return;
  ++res_.step;
  res_.step_rows.assign(n_decode, -1);
  res_.step_length.resize(n_decode);
  for (int32_t b = 0; b < n_decode; ++b) {
    res_.step_length[b] = kv.Length(chunks[b].seq);
    auto it = res_.row_of.find(chunks[b].seq);
    if (it == res_.row_of.end()) continue;
    res_.step_rows[b] = it->second;
    res_.last_step[it->second] = res_.step;
  }
  for (int32_t b = 0; b < n_decode; ++b) {
    if (res_.step_rows[b] >= 0) continue;
    const int32_t have = static_cast<int32_t>(res_.seq_of_row.size());
    int32_t r = -1;
    for (int32_t i = 0; i < have; ++i) {
      if (res_.last_step[i] != res_.step && (r < 0 || res_.last_step[i] < res_.last_step[r])) r = i;
    }
    if (r < 0) {  // every row is taken this step: more rows (the room is made before attention)
      r = have;
      const int32_t rows = std::max({2 * have, n_decode, 8});
      res_.seq_of_row.resize(rows, -1);
      res_.last_step.resize(rows, 0);
    }
    if (res_.seq_of_row[r] >= 0) res_.row_of.erase(res_.seq_of_row[r]);
    res_.seq_of_row[r] = chunks[b].seq;
    res_.row_of[chunks[b].seq] = r;
    res_.last_step[r] = res_.step;
    res_.step_rows[b] = r;
    for (auto& v : res_.valid_at) {
      if (r < static_cast<int32_t>(v.size())) v[r] = -1;
    }
  }
}

bool PagedKvLayer::DecodeWithResidentTables(KvIndex& kv, int32_t layer,
                                            const std::vector<PagedChunk>& chunks,
                                            int32_t n_decode, PagedKvOps& ops) {
  if (res_.unsupported) return false;
  const KvGeometry& geo = kv.geometry();
  const int32_t nkv = geo.n_kv_heads;
  // Rows whose tables are not current for this step's length are rebuilt from the index (after
  // this layer's commit); the others take this step's writes.
  rebuilt_.assign(n_decode, 0);
  int32_t cap = std::max(res_.cap, 1);
  views_.resize(static_cast<size_t>(n_decode) * nkv);
  for (int32_t b = 0; b < n_decode; ++b) {
    const int32_t r = res_.step_rows[b];
    const bool current = r < res_.rows && res_.valid_at[layer][r] == res_.step_length[b];
    if (current) continue;
    rebuilt_[b] = 1;
    KvHeadView* v = views_.data() + static_cast<size_t>(b) * nkv;
    kv.HeadViews(chunks[b].seq, layer, v);
    for (int32_t j = 0; j < nkv; ++j) cap = std::max(cap, v[j].n_blocks);
  }
  const int32_t bt = geo.block_tokens;
  for (const TableWrite& w : table_writes_) cap = std::max(cap, w.slot / bt + 1);
  const int32_t rows = static_cast<int32_t>(res_.seq_of_row.size());
  if (cap > res_.cap || rows > res_.rows) {
    // New room: every row of every layer is stale.
    if (!ResizeResident(ops, geo, rows, cap > res_.cap ? std::max(2 * res_.cap, cap) : res_.cap)) {
      return false;
    }
    for (int32_t b = 0; b < n_decode; ++b) {
      if (rebuilt_[b]) continue;
      rebuilt_[b] = 1;
      kv.HeadViews(chunks[b].seq, layer, views_.data() + static_cast<size_t>(b) * nkv);
    }
  }
  cap = res_.cap;
  std::vector<int32_t>& len = res_.len[layer];
  entries_.clear();
  lengths_.resize(static_cast<size_t>(n_decode) * nkv);
  for (int32_t b = 0; b < n_decode; ++b) {
    const int32_t r = res_.step_rows[b];
    res_.valid_at[layer][r] = res_.step_length[b] + 1;
    if (!rebuilt_[b]) continue;
    for (int32_t j = 0; j < nkv; ++j) {
      const KvHeadView& v = views_[static_cast<size_t>(b) * nkv + j];
      const int32_t base = (r * nkv + j) * cap;
      for (int32_t i = 0; i < v.n_blocks; ++i) entries_.emplace_back(base + i, v.blocks[i]);
      len[static_cast<size_t>(r) * nkv + j] = v.length;
    }
  }
  for (const TableWrite& w : table_writes_) {
    if (rebuilt_[w.row]) continue;  // its views were read after the commit
    const int32_t r = res_.step_rows[w.row];
    entries_.emplace_back((r * nkv + w.head) * cap + w.slot / bt, w.block);
    int32_t& l = len[static_cast<size_t>(r) * nkv + w.head];
    l = std::max(l, w.slot + 1);
  }
  int32_t max_length = 0;
  for (int32_t b = 0; b < n_decode; ++b) {
    const int32_t* src = len.data() + static_cast<size_t>(res_.step_rows[b]) * nkv;
    std::copy(src, src + nkv, lengths_.begin() + static_cast<size_t>(b) * nkv);
    for (int32_t j = 0; j < nkv; ++j) max_length = std::max(max_length, src[j]);
  }
  ops.DecodeAttentionRows(layer, entries_, n_decode, res_.step_rows, lengths_, max_length);
  return true;
}

}  // namespace dmsrt
