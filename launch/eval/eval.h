// Eviction quality, measured: every KV policy against the dense cache on the same tokens.
//
// Text rows (teacher-forced, one pass per policy over the same token ids):
//   protocol a (streaming)   every position attends only to what the policy leaves resident at
//                            that time (the runtime's chunked prefill, exact for every policy);
//                            every prediction 0..L-2 is scored; cache CR at length L.
//   protocol b (compress-then-continue)
//                            the first C tokens are prefilled under the policy, then the
//                            continuation C..L-1 is teacher-forced and only its tokens are
//                            scored; cache CR at length C (the compressed context). The policy
//                            keeps running during the continuation (the KV store has no switch
//                            that stops eviction after a prefill). Because chunked prefill is
//                            exact, both protocols come from one pass that is cut at C.
// Figures per row: perplexity of the reference tokens, KL(dense || policy) per scored token and
// top-1 agreement with the dense run.
//
// KL over top-k plus a remainder bucket: the dense pass keeps, per position, its top-k token ids
// with their log-probabilities and the log of the probability mass outside them. A policy pass
// computes its own log-probabilities of those k ids and the log of its own mass outside them, and
//   KL_k = sum_{i in topk} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest).
// Merging the tail into one bucket can only lower the divergence (data-processing inequality), so
// KL_k <= the full-vocabulary KL; with k = 64 the dense tail mass is small on natural text.
//
// Retrieval rows (passkey, greedy): see launch/eval/probes.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "launch/eval/probes.h"
#include "runtime/backend/backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

struct EvalPolicy {
  std::string label;  // e.g. "window w=1020 s=4"
  KvPolicyConfig config;
  // threshold given as a rate ("threshold:rate=0.9,w=64"): config.threshold is still to be set
  // to the rate-quantile of a calibration text's scores (ResolveThresholdRate) before the policy
  // runs; -1 otherwise.
  double threshold_rate = -1;
  bool threshold_pending = false;  // a rate not yet resolved: Evaluate refuses to run it
};

// One policy from a spec: "none", "dms", "window:w=1020,s=4", "tova:t=1024", "h2o:t=1024",
// "forced:r=0.875,w=64[,seed=0]", "threshold:t=-17,w=64[,shift=0]" or
// "threshold:rate=0.9,w=64[,shift=0]". `dms_window` is the model's own window (policy dms).
absl::StatusOr<EvalPolicy> ParsePolicySpec(const std::string& spec, int32_t dms_window);
// Sets a rate-given threshold policy's threshold (the rate-quantile of a calibration text's
// scores) and its label ("threshold t=-16.87 w=64 rate=0.889").
void ResolveThresholdRate(EvalPolicy* p, double threshold);
// The label of a policy config, in the spec's terms.
std::string PolicyLabel(const KvPolicyConfig& p);

// The standard grid: for each target cache CR at `length` tokens, one setting each of window
// (4 sinks), tova, h2o and forced (window `forced_window`; rate chosen so that
// w + (L - w)(1 - r) = L / CR), and with `threshold` a threshold (key-norm) row with the same
// window whose threshold flags the same rate r of a calibration text (threshold_rate, resolved
// by the caller; its cache CR on the evaluated text is measured, not set). Settings whose CR
// cannot be reached are left out.
std::vector<EvalPolicy> PolicyGrid(const std::vector<double>& target_crs, int64_t length,
                                   int32_t forced_window, bool threshold = false);

// Builds a backend whose KV store runs `policy` (everything else as the caller configured).
using BackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<Backend>>(const KvPolicyConfig& policy)>;

struct PasskeyOptions {
  std::vector<int32_t> lengths;  // prompt lengths in tokens; empty: no retrieval rows
  std::vector<double> depths = {0.1, 0.5, 0.9};
  int32_t digits = 5;
  int32_t max_new_tokens = 10;
  uint64_t seed = 1;
};

// The probe prompts of `o`, lengths outer, depths inner (the order of Evaluate's passkey rows).
absl::StatusOr<std::vector<PasskeyPrompt>> MakePasskeyPrompts(const Tokenizer& tok,
                                                              const PasskeyOptions& o);
// The prompts as JSON (token ids, key, needle and question positions), for another
// implementation to run the same probe: {"max_new_tokens", "digits", "seed", "prompts": [...]}.
nlohmann::json PasskeyPromptsJson(const PasskeyOptions& o, const std::vector<PasskeyPrompt>& prompts);

struct EvalOptions {
  std::vector<int32_t> tokens;  // held-out token ids (L = tokens.size(), >= 2)
  std::string text_label;       // where they came from (shown in reports)
  int64_t context = 0;          // protocol b: C (0: 7/8 of L, rounded down to the chunk)
  std::vector<EvalPolicy> policies;  // the dense reference is always run first
  int32_t top_k = 64;
  int32_t prefill_chunk = 512;
  int32_t max_positions = 0;    // the model's context; longer inputs are refused (0: no check)
  int32_t vocab = 0;            // the model's vocabulary (required; token ids are checked)
  PasskeyOptions passkey;
  const Tokenizer* tokenizer = nullptr;  // needed for the passkey probe
  // Progress lines (policy, seconds) go here when set.
  std::function<void(const std::string&)> progress;
};

struct TextRow {
  std::string policy;  // label
  KvPolicyConfig config;
  // Rows of another implementation read by MergeReports: its kind as written ("IMPL:NAME", e.g.
  // "kvpress:snapkv"; config.kind is then kNone and means nothing), the source that wrote the
  // row, and its fields that this struct has no member for (written back as they were).
  std::string external_kind;
  std::string source = "dmsrt";
  nlohmann::json extra = nlohmann::json::object();
  char protocol = 'a';
  int64_t length = 0;   // tokens processed
  int64_t context = 0;  // protocol b: C
  int64_t scored = 0;   // predictions scored
  double perplexity = 0, mean_nll = 0, kl = 0, top1_agreement = 0;
  // §6 figures at the stated length (L for a, C for b).
  int64_t cr_length = 0;
  double cache_cr = 0, eviction_rate = 0, asymptotic_cr = 0, block_cr = 0;
  int64_t resident_tokens = 0, logical_tokens = 0;
  double seconds = 0;  // the pass (both protocols share it)
  // Protocol b: true when the continuation ran on a frozen fork (compressed once at C, nothing
  // leaves after it); false when it read the streaming pass (the cache kept evicting).
  bool frozen_continuation = false;
};

struct PasskeyRow {
  std::string policy;
  int32_t length = 0;   // prompt tokens
  double depth = 0;     // needle position / haystack
  std::string key;
  std::string answer;   // greedy continuation
  bool correct = false;
  double cache_cr = 0;  // §6 cache CR after the prompt (at `length`)
};

struct EvalReport {
  int64_t length = 0, context = 0;
  int32_t top_k = 0;
  std::string text_label;
  double dense_seconds = 0;
  double dense_tail_mass = 0;  // mean dense probability outside the top-k
  std::vector<TextRow> rows;
  std::vector<PasskeyRow> passkey;
};

// Runs the dense reference and every policy. INVALID_ARGUMENT for inputs it cannot run (fewer
// than 2 tokens, ids outside the vocabulary, longer than the model's context, C outside 1..L-1).
absl::StatusOr<EvalReport> Evaluate(const EvalOptions& options, const BackendFactory& factory);

}  // namespace dmsrt
