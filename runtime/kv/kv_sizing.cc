#include "runtime/kv/kv_sizing.h"

#include <algorithm>

namespace dmsrt {

int64_t CpuKvBlockBytes(int32_t head_dim, int32_t block_tokens) {
  return 2 * static_cast<int64_t>(block_tokens) * head_dim * static_cast<int64_t>(sizeof(float));
}

int64_t CudaKvBlockBytes(int32_t head_dim, int32_t block_tokens) {
  // K and V as bf16 (2 bytes each), position and last-visible as int32.
  return static_cast<int64_t>(block_tokens) * (2ll * head_dim * 2 + 2 * static_cast<int64_t>(sizeof(int32_t)));
}

int64_t DeviceKvBudgetBytes(int64_t free_bytes, int64_t total_bytes) {
  const int64_t margin = std::max<int64_t>(2ll << 30, total_bytes / 20);
  return free_bytes - margin;
}

}  // namespace dmsrt
