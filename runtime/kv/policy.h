// Eviction policies of the KV store, and the table they are registered in.
//
// The store (runtime/kv/kv_store.h) owns blocks, block tables, rings, flags, forks, reservations
// and figures, and implements three ways of reusing slots once each (KvSlotReuse). A policy is
// a small immutable object that picks one of them and makes the decisions it leaves open:
//   kAppend   nothing to decide (none)
//   kFlagged  the decision bits d[t] and the delay window w of docs/dms-semantics.md §4
//             (dms: the model's bits; forced: a seeded hash; window: a fixed rule;
//             threshold: a key-norm score against a threshold)
//   kVictim   the slot the next token overwrites, from the attention weights (tova, h2o)
// The store calls a policy once per (sequence, layer) commit for the bits of a whole chunk, and
// once per (token, head) for a victim; it never asks which policy it runs.
//
// Adding a policy: a file policy_<name>.cc that defines a KvPolicy subclass and its
// KvPolicyEntry (name, validation, factory), an enumerator in KvPolicyKind, any fields it needs
// in KvPolicyConfig, and one line in the table of policy_registry.cc.
//
// Threading: policies are immutable after construction; every method is const and thread-safe.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/kv/kv_cache.h"

namespace dmsrt {

// How the store reuses slots under a policy.
enum class KvSlotReuse : uint8_t {
  kAppend,   // every token takes a new slot; nothing leaves
  kFlagged,  // token t-1 is flagged by d[t]; a flagged token leaves w tokens later and the
             // token that pushes it out of the ring of the last w+1 tokens takes its slot
  kVictim,   // after each query the policy names the slot the next token overwrites
};

// What one commit of n tokens (positions t0 .. t0+n-1) of one layer hands to a policy.
struct KvStepInputs {
  const uint8_t* evict = nullptr;  // [n, n_kv_heads] the model's decision bits, or nullptr
  const float* k = nullptr;        // [n, n_kv_heads, head_dim] keys after RoPE; nullptr when the
                                   // rows live elsewhere (KvIndex)
  const float* k_prev = nullptr;   // [n_kv_heads, head_dim] key of token t0-1 after RoPE, given
                                   // only to a policy that asks (previous_key()) and only when
                                   // t0 >= 1 and `k` is given
};

// Victim choice of one KV head after the query of token t attended over its m resident slots.
struct KvVictimInputs {
  const float* probs = nullptr;  // [group, m] attention weights of the group's query heads
  int32_t group = 1;
  int32_t m = 0;
  const int32_t* pos = nullptr;  // [m] absolute position of each slot
  float* score = nullptr;        // [m] per-slot accumulator (slot_scores()); 0 when written
  int64_t t = 0;                 // position of the query token
};

class KvPolicy {
 public:
  KvPolicy(const KvPolicyConfig& config, const KvGeometry& geometry)
      : config_(config), geo_(geometry) {}
  virtual ~KvPolicy() = default;
  KvPolicy(const KvPolicy&) = delete;
  KvPolicy& operator=(const KvPolicy&) = delete;

  const KvPolicyConfig& config() const { return config_; }
  const KvGeometry& geometry() const { return geo_; }

  virtual KvSlotReuse reuse() const = 0;
  // OK when a store that never sees K/V rows (KvIndex, for backends whose rows live elsewhere;
  // it sees attention weights only as KvIndex::SetVictimWeights hands them over) can run the
  // policy; otherwise why not.
  virtual absl::Status IndexSupport() const { return absl::OkStatus(); }
  // Whether the decision bits come from the model (the step's `evict`), so nothing about them
  // is known before the step.
  virtual bool model_bits() const { return false; }
  // Whether Decisions needs the key of token t0-1 (KvStepInputs::k_prev): d[t0] flags token
  // t0-1, so a policy that judges a token by its own key reads it there.
  virtual bool previous_key() const { return false; }

  // ---- kFlagged ----
  // The delay window w >= 0 (-1 for the other mechanisms).
  virtual int32_t delay_window() const { return -1; }
  // Tokens 0 .. protected_prefix()-1 are never flagged, whatever bits a step hands in (dms with
  // dms_sinks; also applied to bits given after the step, SetDeferredBits).
  virtual int32_t protected_prefix() const { return 0; }
  // d[t0 + i] of every local KV head j into out[i * n_kv_heads + j], for i in [0, n).
  virtual void Decisions(int32_t layer, int64_t t0, int32_t n, const KvStepInputs& in,
                         uint8_t* out) const;
  // flag(k) = d[k + 1] of (layer, local head) when the policy fixes it in advance; -1 when the
  // model decides.
  virtual int KnownFlag(int32_t /*layer*/, int32_t /*head*/, int64_t /*k*/) const {
    return model_bits() ? -1 : 0;
  }
  // An upper bound on the number of unflagged tokens among k0 .. k1-1 (0 <= k0 <= k1): each one
  // that leaves the ring takes a new slot instead of recycling its own.
  virtual int64_t MaybeUnflagged(int32_t /*layer*/, int32_t /*head*/, int64_t k0,
                                 int64_t k1) const {
    return k1 - k0;
  }

  // ---- kVictim ----
  // Slots kept per head.
  virtual int32_t budget_tokens() const { return 0; }
  // Whether the store keeps a per-slot score (KvVictimInputs::score) for the policy.
  virtual bool slot_scores() const { return false; }
  // Updates the scores and returns the slot the next token overwrites (-1: it appends).
  virtual int32_t PickVictim(const KvVictimInputs& /*in*/) const { return -1; }

 private:
  KvPolicyConfig config_;
  KvGeometry geo_;
};

// One registered policy.
struct KvPolicyEntry {
  KvPolicyKind kind;
  const char* name;  // lower case, as parsed by ParseKvPolicy
  // The configuration fields the policy reads, checked (geometry is checked by the store).
  absl::Status (*validate)(const KvPolicyConfig& config);
  std::unique_ptr<KvPolicy> (*make)(const KvPolicyConfig& config, const KvGeometry& geometry);
};

// Every registered policy, in the order of the registry table.
absl::Span<const KvPolicyEntry* const> KvPolicies();
// The entry of `kind`, or nullptr when no policy of that kind is registered.
const KvPolicyEntry* FindKvPolicy(KvPolicyKind kind);
// Validates `config` (its kind registered, its fields) and builds the policy.
absl::StatusOr<std::unique_ptr<KvPolicy>> MakeKvPolicy(const KvPolicyConfig& config,
                                                       const KvGeometry& geometry);

}  // namespace dmsrt
