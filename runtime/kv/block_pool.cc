// BlockPool: one allocation for the whole KV budget, a LIFO free list (recently freed blocks are
// likely still in cache) and plain integer reference counts.
#include "runtime/kv/block_pool.h"

#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace dmsrt {

BlockPool::BlockPool(int64_t total_blocks, int32_t block_tokens, int32_t head_dim)
    : total_blocks_(total_blocks),
      half_(static_cast<int64_t>(block_tokens) * head_dim),
      floats_per_block_(2 * static_cast<int64_t>(block_tokens) * head_dim) {
  const size_t bytes = static_cast<size_t>(total_blocks * floats_per_block_) * sizeof(float);
#ifdef __linux__
  // Pages are only touched when first written; MAP_NORESERVE so an unused budget costs nothing.
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p != MAP_FAILED) {
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory; ignore failure
    data_ = static_cast<float*>(p);
    mapped_bytes_ = bytes;
  }
#else
  data_ = new (std::nothrow) float[bytes / sizeof(float)];
#endif
  if (data_ == nullptr) {
    total_blocks_ = 0;
    return;
  }
  InitFreeList();
}

BlockPool::BlockPool(int64_t total_blocks, int64_t block_bytes)
    : total_blocks_(total_blocks), half_(0), floats_per_block_(0) {
  index_only_ = true;
  index_block_bytes_ = block_bytes;
  InitFreeList();
}

void BlockPool::InitFreeList() {
  refcount_.assign(static_cast<size_t>(total_blocks_), 0);
  free_.reserve(static_cast<size_t>(total_blocks_));
  // Highest id at the bottom so that block 0 is handed out first.
  for (int64_t b = total_blocks_ - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

BlockPool::~BlockPool() {
#ifdef __linux__
  if (data_ != nullptr) munmap(data_, mapped_bytes_);
#else
  delete[] data_;
#endif
}

int32_t BlockPool::Allocate() {
  if (free_.empty()) return -1;
  const int32_t b = free_.back();
  free_.pop_back();
  refcount_[b] = 1;
  return b;
}

void BlockPool::Release(int32_t block) {
  if (--refcount_[block] == 0) free_.push_back(block);
}

int64_t BlockPool::TotalRefs() const {
  int64_t s = 0;
  for (int32_t r : refcount_) s += r;
  return s;
}

}  // namespace dmsrt
