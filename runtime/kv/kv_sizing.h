// How the backends size their KV pools, as plain functions: the backends call them, and so does
// the capacity planner (launch/plan/), so a plan's memory figures are the runtime's own.
#pragma once

#include <cstdint>

namespace dmsrt {

// Bytes of one block (block_tokens slots of one layer and KV head) in the CPU store: K and V in
// float32.
int64_t CpuKvBlockBytes(int32_t head_dim, int32_t block_tokens);
// Bytes of one block in the CUDA backend's pools: K and V in bf16, plus each slot's position and
// last visible query position (int32).
int64_t CudaKvBlockBytes(int32_t head_dim, int32_t block_tokens);
// The CUDA backend's KV budget when none is given (--kv-budget 0): the device memory free after
// the weights and workspace were allocated, less a margin for activations and cuBLAS of
// max(2 GiB, 5 % of the device). May be negative (nothing fits).
int64_t DeviceKvBudgetBytes(int64_t free_bytes, int64_t total_bytes);

}  // namespace dmsrt
