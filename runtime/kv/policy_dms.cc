// Policy dms: Dynamic Memory Sparsification with the model's own decisions. The forward pass
// computes the bits d[t] (runtime/backend/dms_decisions.h, Variant A or B alike) and hands them
// to the step as `evict`; d[t] = 1 flags token t-1, which leaves after the delay window w
// (docs/dms-semantics.md §4). A step without bits decides d = 0.
#include <memory>

#include "absl/strings/str_cat.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

class DmsPolicy final : public KvPolicy {
 public:
  using KvPolicy::KvPolicy;
  KvSlotReuse reuse() const override { return KvSlotReuse::kFlagged; }
  bool model_bits() const override { return true; }
  int32_t delay_window() const override { return config().window; }
  int32_t protected_prefix() const override { return config().dms_sinks; }

  // Row r is token t0 + r, whose bit flags token t0 + r - 1: protected while that is a sink.
  void Decisions(int32_t /*layer*/, int64_t t0, int32_t n, const KvStepInputs& in,
                 uint8_t* out) const override {
    const int32_t nkv = geometry().n_kv_heads;
    for (int32_t r = 0; r < n; ++r) {
      const bool sink = config().dms_sinks > 0 && t0 + r - 1 < config().dms_sinks;
      for (int32_t j = 0; j < nkv; ++j) {
        const int64_t i = static_cast<int64_t>(r) * nkv + j;
        out[i] = !sink && in.evict != nullptr && in.evict[i] ? 1 : 0;
      }
    }
  }
};

absl::Status Validate(const KvPolicyConfig& config) {
  if (config.dms_sinks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DMS sink tokens must be >= 0 (got ", config.dms_sinks, ")"));
  }
  if (config.window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DMS window must be >= 0 (got ", config.window, ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<DmsPolicy>(config, geometry);
}

}  // namespace

extern const KvPolicyEntry kDmsKvPolicy = {KvPolicyKind::kDms, "dms", &Validate, &Make};

}  // namespace dmsrt
