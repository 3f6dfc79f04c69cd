// Policy h2o (Heavy-Hitter Oracle): `budget_tokens` slots per head, the recent half of the
// budget always kept. Each slot accumulates its attention weight (mean over the group's query
// heads, summed over queries); once the slots are full, the slot outside the recent half with
// the lowest accumulated weight (the older token on ties) is the one the next token overwrites.
#include <memory>

#include "absl/strings/str_cat.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

class H2oPolicy final : public KvPolicy {
 public:
  using KvPolicy::KvPolicy;
  KvSlotReuse reuse() const override { return KvSlotReuse::kVictim; }
  int32_t budget_tokens() const override { return config().budget_tokens; }
  bool slot_scores() const override { return true; }

  int32_t PickVictim(const KvVictimInputs& in) const override {
    const int32_t g = in.group;
    const int32_t m = in.m;
    for (int32_t c = 0; c < m; ++c) {
      float a = 0.0f;
      for (int32_t hh = 0; hh < g; ++hh) a += in.probs[hh * m + c];
      in.score[c] += a / g;
    }
    if (m < config().budget_tokens) return -1;
    const int64_t recent = config().budget_tokens / 2;  // includes the current token
    int32_t best = -1;
    float best_val = 0.0f;
    for (int32_t c = 0; c < m; ++c) {
      if (in.pos[c] > in.t - recent) continue;
      const float a = in.score[c];
      if (best < 0 || a < best_val || (a == best_val && in.pos[c] < in.pos[best])) {
        best = c;
        best_val = a;
      }
    }
    return best;
  }
};

absl::Status Validate(const KvPolicyConfig& config) {
  if (config.budget_tokens < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("h2o needs budget_tokens >= 2 (got ", config.budget_tokens, ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<H2oPolicy>(config, geometry);
}

}  // namespace

extern const KvPolicyEntry kH2oKvPolicy = {KvPolicyKind::kH2o, "h2o", &Validate, &Make};

}  // namespace dmsrt
