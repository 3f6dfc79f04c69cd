// Policy forced: synthetic DMS for models without DMS weights. The same delayed eviction as dms,
// with d[t] = 1 drawn at `force_rate` from a seeded hash of (layer, global KV head, t): the same
// bits on every rank and every backend, and after a preemption, so recomputing a sequence
// rebuilds the same cache. Figures under it are labelled synthetic.
#include <algorithm>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/reference/random_hash.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

class ForcedPolicy final : public KvPolicy {
 public:
  ForcedPolicy(const KvPolicyConfig& config, const KvGeometry& geometry)
      : KvPolicy(config, geometry) {
    // The hash of (seed, layer, head) does not depend on t: computed once per head.
    using kernels::SplitMix64;
    const int32_t nkv = geometry.n_kv_heads;
    head_keys_.resize(static_cast<size_t>(std::max(0, geometry.n_layers)) * std::max(0, nkv));
    for (int32_t l = 0; l < geometry.n_layers; ++l) {
      for (int32_t j = 0; j < nkv; ++j) {
        uint64_t x = SplitMix64(config.seed);
        x = SplitMix64(x ^ (static_cast<uint64_t>(l) + 1) * 0xD6E8FEB86659FD93ull);
        x = SplitMix64(x ^ (static_cast<uint64_t>(geometry.kv_head_offset + j) + 1) *
                               0xA0761D6478BD642Full);
        head_keys_[static_cast<size_t>(l) * nkv + j] = x;
      }
    }
  }
  KvSlotReuse reuse() const override { return KvSlotReuse::kFlagged; }
  int32_t delay_window() const override { return config().window; }

  void Decisions(int32_t layer, int64_t t0, int32_t n, const KvStepInputs& /*in*/,
                 uint8_t* out) const override {
    const int32_t nkv = geometry().n_kv_heads;
    for (int32_t i = 0; i < n; ++i) {
      for (int32_t j = 0; j < nkv; ++j) out[static_cast<int64_t>(i) * nkv + j] = Bit(layer, j, t0 + i);
    }
  }
  int KnownFlag(int32_t layer, int32_t head, int64_t k) const override {
    return Bit(layer, head, k + 1);
  }
  // Counted exactly, unless the range is huge (then the bound assumes every token appends).
  int64_t MaybeUnflagged(int32_t layer, int32_t head, int64_t k0, int64_t k1) const override {
    if (k1 - k0 > (1 << 16)) return k1 - k0;
    int64_t unflagged = 0;
    for (int64_t k = k0; k < k1; ++k) unflagged += Bit(layer, head, k + 1) == 0;
    return unflagged;
  }

 private:
  // d[t] of local KV head j.
  uint8_t Bit(int32_t layer, int32_t j, int64_t t) const {
    const uint64_t x = kernels::SplitMix64(
        head_keys_[static_cast<size_t>(layer) * geometry().n_kv_heads + j] ^ static_cast<uint64_t>(t));
    const double u = static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0);
    return u < config().force_rate ? 1 : 0;
  }

  std::vector<uint64_t> head_keys_;  // [n_layers * n_kv_heads]
};

absl::Status Validate(const KvPolicyConfig& config) {
  if (config.window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DMS window must be >= 0 (got ", config.window, ")"));
  }
  if (!(config.force_rate >= 0.0 && config.force_rate <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("forced eviction rate must be in [0, 1] (got ", config.force_rate, ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<ForcedPolicy>(config, geometry);
}

}  // namespace

extern const KvPolicyEntry kForcedKvPolicy = {KvPolicyKind::kForced, "forced", &Validate, &Make};

}  // namespace dmsrt
