// Policy none: a dense cache; every token takes a new slot and nothing is evicted.
#include <memory>

#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

class NonePolicy final : public KvPolicy {
 public:
  using KvPolicy::KvPolicy;
  KvSlotReuse reuse() const override { return KvSlotReuse::kAppend; }
};

absl::Status Validate(const KvPolicyConfig& /*config*/) { return absl::OkStatus(); }

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<NonePolicy>(config, geometry);
}

}  // namespace

extern const KvPolicyEntry kNoneKvPolicy = {KvPolicyKind::kNone, "none", &Validate, &Make};

}  // namespace dmsrt
