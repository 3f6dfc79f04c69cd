// A fixed pool of KV blocks with a free list and reference counts.
//
// Memory is allocated once, at construction, from a byte budget and never grows (on Linux an
// anonymous mapping advised for transparent huge pages: decode attention walks many 8 KB blocks
// scattered over the pool, and 4 KB pages would cost a TLB miss per block). Every block
// holds the keys and values of `block_tokens` slots of ONE KV head, float32:
//   block b: K [block_tokens, head_dim] followed by V [block_tokens, head_dim]
// Reference counts let forked sequences share blocks (copy-on-write is done by the owner of the
// block tables, runtime/kv/kv_store.cc). Not thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace dmsrt {

class BlockPool {
 public:
  // `total_blocks` blocks of `block_tokens` x `head_dim` floats for K and for V. The storage is
  // left uninitialised (pages are touched only when a block is first written).
  BlockPool(int64_t total_blocks, int32_t block_tokens, int32_t head_dim);
  // Index only: ids, reference counts and the free list, no storage (the rows live elsewhere,
  // e.g. on a device); `block_bytes` is what one block costs there. keys()/values() must not be
  // called.
  BlockPool(int64_t total_blocks, int64_t block_bytes);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // False when the storage could not be allocated (the pool is then unusable).
  bool ok() const { return data_ != nullptr || index_only_; }
  int64_t total_blocks() const { return total_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t floats_per_block() const { return floats_per_block_; }
  int64_t block_bytes() const {
    return index_only_ ? index_block_bytes_ : floats_per_block_ * static_cast<int64_t>(sizeof(float));
  }

  // Takes a free block with reference count 1; -1 when none is free.
  int32_t Allocate();
  void AddRef(int32_t block) { ++refcount_[block]; }
  // Drops one reference; the block returns to the free list when none is left.
  void Release(int32_t block);
  int32_t refcount(int32_t block) const { return refcount_[block]; }

  // [block_tokens, head_dim] keys and values of a block.
  float* keys(int32_t block) { return data_ + static_cast<int64_t>(block) * floats_per_block_; }
  float* values(int32_t block) { return keys(block) + half_; }
  const float* keys(int32_t block) const {
    return data_ + static_cast<int64_t>(block) * floats_per_block_;
  }
  const float* values(int32_t block) const { return keys(block) + half_; }

  // Sum of all reference counts (0 once every sequence is freed).
  int64_t TotalRefs() const;

 private:
  void InitFreeList();

  int64_t total_blocks_;
  int64_t half_;              // block_tokens * head_dim
  int64_t floats_per_block_;  // 2 * half_
  float* data_ = nullptr;      // [total_blocks, floats_per_block]
  size_t mapped_bytes_ = 0;    // > 0 when data_ is an anonymous mapping (else new[])
  bool index_only_ = false;
  int64_t index_block_bytes_ = 0;
  std::vector<int32_t> refcount_;  // [total_blocks]
  std::vector<int32_t> free_;      // stack of free block ids
};

}  // namespace dmsrt
