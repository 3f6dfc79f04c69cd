// Validation of a job request and the per-thread KV estimate, moved out of coordinator.cc.
#include "launch/service/admission.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/service/job_input.h"

namespace dmsrt {

namespace {

grpc::Status Invalid(const std::string& msg) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, msg);
}

}  // namespace

std::string PolicyNameOf(v1::KvPolicy p) {
  switch (p) {
    case v1::KV_POLICY_NONE: return "none";
    case v1::KV_POLICY_DMS: return "dms";
    case v1::KV_POLICY_FORCED: return "forced";
    case v1::KV_POLICY_WINDOW: return "window";
    case v1::KV_POLICY_TOVA: return "tova";
    case v1::KV_POLICY_H2O: return "h2o";
    default: return "";
  }
}

// Resident tokens a thread of `len` logical tokens is expected to hold under the replica's
// policy (docs/dms-semantics.md: a flagged token leaves after the window, so at most the window
// plus the unflagged share of the rest stays).
double ExpectedResident(const v1::ReplicaInfo& info, double measured_rate, double len) {
  const std::string& p = info.kv_policy();
  double rate = 0.0;
  if (p == "forced") rate = info.kv_force_rate();
  if (p == "dms") rate = measured_rate;
  if (p == "window") return std::min(len, static_cast<double>(info.kv_window()) + 4.0);
  if (rate <= 0.0) return len;
  const double w = std::max(0, info.kv_window());
  if (len <= w) return len;
  return w + (1.0 - rate) * (len - w);
}

grpc::Status ValidateJobRequest(const v1::JobRequest& req, const TokenizerSpec& tokenizer,
                                const CoordinatorOptions& options, std::string* rendered,
                                int32_t* max_tokens, std::shared_ptr<const std::regex>* pattern) {
  if (grpc::Status s = RenderJobInput(req, tokenizer, options.max_prompt_bytes, rendered);
      !s.ok()) {
    return s;
  }
  const int64_t budget = req.kv().kv_budget_bytes();
  if (req.n() < 0) return Invalid(absl::StrCat("n = ", req.n(), " is negative: set n >= 1"));
  if (budget < 0) {
    return Invalid(absl::StrCat("kv.kv_budget_bytes = ", budget, " is negative: set a positive byte count or 0"));
  }
  if (req.n() == 0 && budget == 0) {
    return Invalid("n = 0: set n >= 1 threads, or leave n at 0 and set kv.kv_budget_bytes (budget mode)");
  }
  if (req.n() > 0 && budget > 0) {
    return Invalid("set either n or kv.kv_budget_bytes, not both");
  }
  if (req.n() > options.max_n) {
    return Invalid(absl::StrFormat("n = %d exceeds the limit of %d threads per job: lower n", req.n(),
                                   options.max_n));
  }
  const v1::SamplingParams& sp = req.sampling();
  if (!std::isfinite(sp.temperature()) || sp.temperature() < 0) {
    return Invalid("sampling.temperature must be a finite number >= 0 (0 = greedy)");
  }
  if (!std::isfinite(sp.top_p()) || sp.top_p() < 0 || sp.top_p() > 1) {
    return Invalid("sampling.top_p must be in [0, 1] (0 or 1 = off)");
  }
  if (sp.top_k() < 0) return Invalid("sampling.top_k must be >= 0 (0 = off)");
  if (!std::isfinite(sp.min_p()) || sp.min_p() < 0 || sp.min_p() > 1) {
    return Invalid("sampling.min_p must be in [0, 1] (0 = off)");
  }
  const v1::StoppingCriteria& st = req.stopping();
  if (st.max_tokens() < 0) return Invalid("stopping.max_tokens must be >= 0 (0 = the server default)");
  if (st.max_tokens() > options.max_tokens_limit) {
    return Invalid(absl::StrFormat("stopping.max_tokens = %d exceeds the limit of %d: lower it",
                                   st.max_tokens(), options.max_tokens_limit));
  }
  *max_tokens = st.max_tokens() > 0 ? st.max_tokens() : options.default_max_tokens;
  if (st.stop_size() > options.max_stop_strings) {
    return Invalid(absl::StrFormat("%d stop strings; the limit is %d: send fewer", st.stop_size(),
                                   options.max_stop_strings));
  }
  for (const std::string& s : st.stop()) {
    if (s.empty()) return Invalid("stopping.stop contains an empty string: remove it");
    if (static_cast<int32_t>(s.size()) > options.max_stop_length) {
      return Invalid(absl::StrFormat("a stop string is %d bytes; the limit is %d", s.size(),
                                     options.max_stop_length));
    }
  }
  if (!v1::KvPolicy_IsValid(req.dms().policy())) {
    return Invalid(absl::StrCat("dms.policy = ", static_cast<int>(req.dms().policy()),
                                " is not a known KvPolicy value"));
  }
  if (req.dms().window() < 0) return Invalid("dms.window must be >= 0");
  if (!std::isfinite(req.dms().force_rate()) || req.dms().force_rate() < 0 ||
      req.dms().force_rate() >= 1) {
    return Invalid("dms.force_rate must be in [0, 1)");
  }
  if (!v1::Selection_IsValid(req.answer().selection())) {
    return Invalid(absl::StrCat("answer.selection = ", static_cast<int>(req.answer().selection()),
                                " is not a known Selection value"));
  }
  if (!req.answer().extraction_regex().empty()) {
    absl::StatusOr<std::shared_ptr<const std::regex>> re =
        CompileAnswerRegex(req.answer().extraction_regex());
    if (!re.ok()) return Invalid(std::string(re.status().message()));
    *pattern = *re;
  }
  if (!std::isfinite(req.deadline_seconds()) || req.deadline_seconds() < 0) {
    return Invalid("deadline_seconds must be >= 0 (0 = none)");
  }
  return grpc::Status::OK;
}

}  // namespace dmsrt
