// The registry of KV policies: names, parsing, validation and construction all come from the
// table below. Each policy's file defines its entry; registering one is one line here.
#include <algorithm>
#include <memory>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/kv/policy.h"

// X(entry) for every registered policy, in the order names are listed.
#define DMSRT_KV_POLICIES(X) \
  X(kNoneKvPolicy)           \
  X(kDmsKvPolicy)            \
  X(kForcedKvPolicy)         \
  X(kWindowKvPolicy)         \
  X(kTovaKvPolicy)           \
  X(kH2oKvPolicy)            \
  X(kThresholdKvPolicy)

namespace dmsrt {

#define DMSRT_DECLARE_KV_POLICY(entry) extern const KvPolicyEntry entry;
DMSRT_KV_POLICIES(DMSRT_DECLARE_KV_POLICY)
#undef DMSRT_DECLARE_KV_POLICY

namespace {
#define DMSRT_KV_POLICY_ADDRESS(entry) &entry,
const KvPolicyEntry* const kRegistry[] = {DMSRT_KV_POLICIES(DMSRT_KV_POLICY_ADDRESS)};
#undef DMSRT_KV_POLICY_ADDRESS
}  // namespace

absl::Span<const KvPolicyEntry* const> KvPolicies() { return kRegistry; }

const KvPolicyEntry* FindKvPolicy(KvPolicyKind kind) {
  for (const KvPolicyEntry* e : kRegistry) {
    if (e->kind == kind) return e;
  }
  return nullptr;
}

const char* KvPolicyName(KvPolicyKind k) {
  const KvPolicyEntry* e = FindKvPolicy(k);
  return e != nullptr ? e->name : "unknown";
}

absl::StatusOr<KvPolicyKind> ParseKvPolicy(const std::string& name) {
  const std::string n = absl::AsciiStrToLower(absl::StripAsciiWhitespace(name));
  for (const KvPolicyEntry* e : kRegistry) {
    if (n == e->name) return e->kind;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown KV policy '", name, "'; valid policies: ",
      absl::StrJoin(kRegistry, ", ",
                    [](std::string* out, const KvPolicyEntry* e) { out->append(e->name); })));
}

absl::StatusOr<std::unique_ptr<KvPolicy>> MakeKvPolicy(const KvPolicyConfig& config,
                                                       const KvGeometry& geometry) {
  const KvPolicyEntry* e = FindKvPolicy(config.kind);
  if (e == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV policy kind ", static_cast<int>(config.kind), " is not registered"));
  }
  if (absl::Status s = e->validate(config); !s.ok()) return s;
  return e->make(config, geometry);
}

void KvPolicy::Decisions(int32_t /*layer*/, int64_t /*t0*/, int32_t n,
                         const KvStepInputs& /*in*/, uint8_t* out) const {
  std::fill_n(out, static_cast<int64_t>(n) * geo_.n_kv_heads, uint8_t{0});
}

}  // namespace dmsrt
