// Policy tova (Token Omission Via Attention): at most `budget_tokens` slots per head. Once they
// are full, after each query the slot with the lowest attention weight (mean over the group's
// query heads; the older token on ties) is the one the next token overwrites.
#include <memory>

#include "absl/strings/str_cat.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

class TovaPolicy final : public KvPolicy {
 public:
  using KvPolicy::KvPolicy;
  KvSlotReuse reuse() const override { return KvSlotReuse::kVictim; }
  int32_t budget_tokens() const override { return config().budget_tokens; }

  int32_t PickVictim(const KvVictimInputs& in) const override {
    const int32_t g = in.group;
    const int32_t m = in.m;
    if (m < config().budget_tokens) return -1;
    int32_t best = -1;
    float best_val = 0.0f;
    for (int32_t c = 0; c < m; ++c) {
      float a = 0.0f;
      for (int32_t hh = 0; hh < g; ++hh) a += in.probs[hh * m + c];
      a /= g;
      if (best < 0 || a < best_val || (a == best_val && in.pos[c] < in.pos[best])) {
        best = c;
        best_val = a;
      }
    }
    return best;
  }
};

absl::Status Validate(const KvPolicyConfig& config) {
  if (config.budget_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tova needs budget_tokens >= 1 (got ", config.budget_tokens, ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<TovaPolicy>(config, geometry);
}

}  // namespace

extern const KvPolicyEntry kTovaKvPolicy = {KvPolicyKind::kTova, "tova", &Validate, &Make};

}  // namespace dmsrt
