// Policy window (StreamingLLM): the first `sinks` tokens plus a sliding window of the last
// `window` tokens. Delayed eviction with w = window - 1 and d[t] = (t - 1 >= sinks): sinks are
// never flagged, every other token leaves after `window` queries, and the next token takes its
// slot.
#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

class WindowPolicy final : public KvPolicy {
 public:
  using KvPolicy::KvPolicy;
  KvSlotReuse reuse() const override { return KvSlotReuse::kFlagged; }
  int32_t delay_window() const override { return config().window - 1; }

  void Decisions(int32_t /*layer*/, int64_t t0, int32_t n, const KvStepInputs& /*in*/,
                 uint8_t* out) const override {
    const int32_t nkv = geometry().n_kv_heads;
    for (int32_t i = 0; i < n; ++i) {
      const uint8_t d = t0 + i - 1 >= config().sinks ? 1 : 0;
      std::fill_n(out + static_cast<int64_t>(i) * nkv, nkv, d);
    }
  }
  int KnownFlag(int32_t /*layer*/, int32_t /*head*/, int64_t k) const override {
    return k >= config().sinks ? 1 : 0;
  }
  int64_t MaybeUnflagged(int32_t /*layer*/, int32_t /*head*/, int64_t k0,
                         int64_t k1) const override {
    return std::max<int64_t>(0, std::min<int64_t>(k1, config().sinks) - k0);
  }
};

absl::Status Validate(const KvPolicyConfig& config) {
  if (config.window < 1 || config.sinks < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "window policy needs window >= 1 and sinks >= 0 (got window ", config.window, ", sinks ",
        config.sinks, ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<WindowPolicy>(config, geometry);
}

}  // namespace

extern const KvPolicyEntry kWindowKvPolicy = {KvPolicyKind::kWindow, "window", &Validate, &Make};

}  // namespace dmsrt
