// DeviceKvOps: runtime/kv/paged_kv.h's operations (slot writes, block copies, last-visible
// updates, prefill and decode attention) on the CUDA backend's device pools. Index arrays go up
// through the backend's pinned staging arena; errors are noted and reported by status().
#include <cmath>
#include <limits>

#include "kernels/decode_attention.cuh"
#include "kernels/kv_store.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/slot_weights.cuh"
#include "runtime/backend/cuda/cuda_backend.h"

namespace dmsrt {
namespace cuda_backend {

template <typename... V>
bool DeviceKvOps::Stage(const char* what, std::array<const int32_t*, sizeof...(V)>* out,
                        const V&... v) {
  // One claim and one copy for all of them: each starts on a 16-byte boundary inside it.
  constexpr size_t kN = sizeof...(V);
  const std::array<size_t, kN> bytes = {Bytes(v)...};
  std::array<size_t, kN> offset{};
  size_t total = 0;
  for (size_t i = 0; i < kN; ++i) {
    offset[i] = total;
    total += (bytes[i] + 15) / 16 * 16;
  }
  Note(b_->stage_.Reserve(total));
  if (!status_.ok()) return false;
  char* host = static_cast<char*>(b_->stage_.Claim(total));
  const std::array<const void*, kN> src = {static_cast<const void*>(v.data())...};
  for (size_t i = 0; i < kN; ++i) {
    if (bytes[i] > 0) std::memcpy(host + offset[i], src[i], bytes[i]);
  }
  cudaError_t e = cudaSuccess;
  char* dev = static_cast<char*>(b_->stage_.Send(host, total, b_->stream_, &e));
  for (size_t i = 0; i < kN; ++i) (*out)[i] = reinterpret_cast<const int32_t*>(dev + offset[i]);
  Note(e, what);
  return status_.ok();
}

void DeviceKvOps::Scatter(const std::vector<std::pair<int32_t, int32_t>>& slots, bool reset) {
  std::array<const int32_t*, 1> d;
  if (!Stage("staging last-visible values", &d, slots)) return;
  Note(KvScatterInt32(d[0], static_cast<int32_t>(slots.size()), reset,
                      std::numeric_limits<int32_t>::max(), b_->last_vis_pool_, b_->stream_),
       "KvScatterInt32");
}

void DeviceKvOps::PrefillAttention(const PagedChunk& c, int32_t q_pos0,
                                   const std::vector<int32_t>& table, int32_t max_blocks,
                                   const std::vector<int32_t>& old_lengths,
                                   const std::vector<int32_t>& last_vis_new) {
  std::array<const int32_t*, 3> d;
  if (!Stage("staging a prefill block table", &d, table, old_lengths, last_vis_new)) return;
  const auto [dt, dl, dv] = d;
  PrefillAttentionParams p;
  p.n_queries = c.n;
  p.q_pos0 = q_pos0;
  p.n_heads = b_->nh_;
  p.n_kv_heads = b_->nkv_;
  p.head_dim = b_->hd_;
  p.block_tokens = b_->kv_->geometry().block_tokens;
  p.max_blocks_per_head = max_blocks;
  p.scale = 1.0f / std::sqrt(static_cast<float>(b_->hd_));
  const int64_t qrow = static_cast<int64_t>(c.row0) * b_->QW_;
  const int64_t krow = static_cast<int64_t>(c.row0) * b_->KW_;
  Note(::dmsrt::PrefillAttention(p, b_->q_.get() + qrow, b_->k_.get() + krow, b_->v_.get() + krow,
                                 dv, b_->k_pool_, b_->v_pool_, b_->pos_pool_, b_->last_vis_pool_,
                                 dt, dl, b_->attn_.get() + qrow, b_->stream_),
       "PrefillAttention");
}

void DeviceKvOps::CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& copies) {
  std::array<const int32_t*, 1> d;
  if (!Stage("staging block copies", &d, copies)) return;
  Note(KvCopyBlocks(d[0], static_cast<int32_t>(copies.size()), b_->kv_->geometry().block_tokens,
                    b_->hd_, b_->k_pool_, b_->v_pool_, b_->pos_pool_, b_->last_vis_pool_,
                    b_->stream_),
       "KvCopyBlocks");
}

void DeviceKvOps::WriteSlots(const std::vector<KvSlotWrite>& writes) {
  static_assert(sizeof(KvSlotWrite) == 4 * sizeof(int32_t), "KvSlotWrite is four int32");
  std::array<const int32_t*, 1> d;
  if (!Stage("staging slot writes", &d, writes)) return;
  Note(KvWriteSlots(d[0], static_cast<int32_t>(writes.size()), b_->k_.get(), b_->v_.get(), b_->nkv_,
                    b_->hd_, b_->k_pool_, b_->v_pool_, b_->pos_pool_, b_->stream_),
       "KvWriteSlots");
}

int32_t* DeviceKvOps::DecodeIndexBuffer(size_t n) {
  Note(b_->stage_.Reserve(n * sizeof(int32_t)));
  if (!status_.ok()) {  // the step fails; Run still needs somewhere to write
    decode_index_ = nullptr;
    return PagedKvOps::DecodeIndexBuffer(n);
  }
  decode_index_ = static_cast<int32_t*>(b_->stage_.Claim(n * sizeof(int32_t)));
  decode_index_n_ = n;
  return decode_index_;
}

DecodeAttentionParams DeviceKvOps::DecodeParams(const DecodeLaunch& d) const {
  DecodeAttentionParams p;
  p.batch = d.batch;
  p.n_heads = b_->nh_;
  p.n_kv_heads = b_->nkv_;
  p.head_dim = b_->hd_;
  p.block_tokens = b_->kv_->geometry().block_tokens;
  p.max_blocks_per_head = d.max_blocks;
  p.max_length = std::max(d.max_length, 1);
  p.scale = 1.0f / std::sqrt(static_cast<float>(b_->hd_));
  p.table_rows = d.table_rows;
  return p;
}

void DeviceKvOps::LaunchDecode(int32_t batch, const int32_t* tables, int32_t max_blocks,
                               const int32_t* table_rows, const int32_t* lengths,
                               int32_t max_length) {
  last_decode_ = DecodeLaunch{batch, max_blocks, max_length, tables, table_rows, lengths};
  const DecodeAttentionParams p = DecodeParams(last_decode_);
  const size_t ws = DecodeAttentionWorkspaceSize(p, b_->num_sms_);
  Note(b_->workspace_.Reserve(std::max<size_t>(ws, 1), b_->wait_));
  if (!status_.ok()) return;
  Note(::dmsrt::DecodeAttention(p, b_->q_.get(), b_->k_pool_, b_->v_pool_, tables, lengths,
                                b_->attn_.get(), b_->workspace_.get(), b_->workspace_.size(),
                                b_->num_sms_, b_->stream_),
       "DecodeAttention");
}

void DeviceKvOps::DecodeSlotWeights(int32_t layer) {
  if (!status_.ok()) return;
  const DecodeLaunch& d = last_decode_;
  const int64_t layer_floats = static_cast<int64_t>(d.batch) * b_->nkv_ * b_->victim_ld_;
  if (d.tables == nullptr || b_->victim_ld_ <= 0 ||
      static_cast<size_t>((layer + 1) * layer_floats) > b_->victim_w_.size()) {
    Note(absl::InternalError("slot weights asked for without a decode launch or room for them"));
    return;
  }
  Note(::dmsrt::DecodeSlotWeights(DecodeParams(d), b_->q_.get(), b_->k_pool_, d.tables, d.lengths,
                                  b_->victim_w_.get() + layer * layer_floats, b_->victim_ld_,
                                  b_->stream_),
       "DecodeSlotWeights");
}

void DeviceKvOps::DecodeAttention(int32_t batch, const int32_t* tables, int32_t max_blocks,
                                  const int32_t* lengths, int32_t max_length) {
  int32_t* const index = decode_index_;
  decode_index_ = nullptr;  // one use
  if (!status_.ok()) return;
  if (index == nullptr || tables != index ||
      lengths + static_cast<size_t>(batch) * b_->nkv_ > index + decode_index_n_) {
    Note(absl::InternalError("decode tables must be in the last DecodeIndexBuffer"));
    return;
  }
  cudaError_t e = cudaSuccess;
  const auto* dt = static_cast<const int32_t*>(
      b_->stage_.Send(index, decode_index_n_ * sizeof(int32_t), b_->stream_, &e));
  Note(e, "staging decode block tables");
  if (!status_.ok()) return;
  LaunchDecode(batch, dt, max_blocks, nullptr, dt + (lengths - tables), max_length);
}

bool DeviceKvOps::ResizeDecodeTables(int32_t rows, int32_t cap) {
  const int64_t per_layer = static_cast<int64_t>(rows) * b_->nkv_ * cap;
  if (per_layer > std::numeric_limits<int32_t>::max()) return false;  // scatter indices are int32
  // Growing waits for the stream before freeing the old tables; a failure leaves the step's
  // own tables as the way (PagedKvLayer stops asking).
  if (!b_->decode_tables_.Reserve(static_cast<size_t>(per_layer) * b_->cfg_.n_layers, b_->wait_).ok()) {
    return false;
  }
  table_layer_ints_ = per_layer;
  table_cap_ = cap;
  return true;
}

void DeviceKvOps::DecodeAttentionRows(int32_t layer,
                                      const std::vector<std::pair<int32_t, int32_t>>& entries,
                                      int32_t batch, const std::vector<int32_t>& table_rows,
                                      const std::vector<int32_t>& lengths, int32_t max_length) {
  std::array<const int32_t*, 3> d;
  if (!Stage("staging decode table entries, rows and lengths", &d, entries, table_rows, lengths)) {
    return;
  }
  int32_t* tables = b_->decode_tables_.get() + layer * table_layer_ints_;
  if (!entries.empty()) {
    Note(KvScatterInt32(d[0], static_cast<int32_t>(entries.size()), false, 0, tables, b_->stream_),
         "KvScatterInt32 (decode tables)");
  }
  LaunchDecode(batch, tables, table_cap_, d[1], d[2], max_length);
}

}  // namespace cuda_backend
}  // namespace dmsrt
