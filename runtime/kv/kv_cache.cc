// The factories of the KV store (runtime/kv/kv_store.h) and the derived compression figures.
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_sizing.h"

#include <limits>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "parallel/status_macros.h"
#include "runtime/kv/kv_store.h"
#include "runtime/kv/policy.h"

namespace dmsrt {

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

absl::Status ValidateGeometry(const KvGeometry& g) {
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
  return absl::OkStatus();
}

absl::Status CheckBlockCount(int64_t budget_bytes, int64_t total_blocks) {
  if (total_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV budget of ", budget_bytes, " bytes needs more than 2^31 blocks; use larger blocks"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvIndex>> MakeKvIndex(const KvGeometry& g, const KvPolicyConfig& p,
                                                     int64_t budget_bytes, int64_t block_bytes,
                                                     bool dead_slots) {
  DMSRT_RETURN_IF_ERROR(ValidateGeometry(g));
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<KvPolicy> policy, MakeKvPolicy(p, g));
  DMSRT_RETURN_IF_ERROR(policy->IndexSupport());
  if (block_bytes <= 0 || budget_bytes < block_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV budget of %d bytes is smaller than one block (%d bytes); raise --kv-budget",
        budget_bytes, block_bytes));
  }
  const int64_t total_blocks = budget_bytes / block_bytes;
  DMSRT_RETURN_IF_ERROR(CheckBlockCount(budget_bytes, total_blocks));
  return std::unique_ptr<KvIndex>(
      std::make_unique<KvStore>(g, p, std::move(policy), total_blocks, block_bytes, dead_slots));
}

absl::StatusOr<std::unique_ptr<KvCache>> MakeCpuKvCache(const KvGeometry& g,
                                                        const KvPolicyConfig& p,
                                                        int64_t budget_bytes, bool dead_slots) {
  DMSRT_RETURN_IF_ERROR(ValidateGeometry(g));
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<KvPolicy> policy, MakeKvPolicy(p, g));
  const int64_t block_bytes = CpuKvBlockBytes(g.head_dim, g.block_tokens);
  if (budget_bytes < block_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV budget of %d bytes is smaller than one block (%d bytes: %d tokens x head_dim %d x K,V "
        "x float32); raise --kv-budget",
        budget_bytes, block_bytes, g.block_tokens, g.head_dim));
  }
  const int64_t total_blocks = budget_bytes / block_bytes;
  DMSRT_RETURN_IF_ERROR(CheckBlockCount(budget_bytes, total_blocks));
  auto cache = std::make_unique<KvStore>(g, p, std::move(policy), total_blocks,
                                         /*index_block_bytes=*/0, dead_slots);
  if (!cache->pool_ok()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "could not allocate the KV pool of %d bytes; lower --kv-budget", total_blocks * block_bytes));
  }
  return std::unique_ptr<KvCache>(std::move(cache));
}

}  // namespace dmsrt
