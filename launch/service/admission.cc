// The coordinator's request validation and its edge between absl::Status and grpc::Status.
#include "launch/service/admission.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/service/job_input.h"
#include "runtime/engine/sampler.h"

namespace dmsrt {

namespace {

absl::Status Invalid(const std::string& msg) { return absl::InvalidArgumentError(msg); }

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

ReplicaCapacity CapacityOf(int32_t id, const v1::ReplicaInfo& info, const v1::ReplicaStats& stats,
                           int64_t assigned_open) {
  ReplicaCapacity c;
  c.id = id;
  c.kv_policy = info.kv_policy();
  c.kv_window = info.kv_window();
  c.kv_force_rate = info.kv_force_rate();
  c.kv_blocks_total = info.kv_blocks_total();
  c.kv_block_tokens = info.kv_block_tokens();
  c.blocks_per_token_dense = info.blocks_per_token_dense();
  c.kv_block_bytes = info.kv_block_bytes();
  c.dead_slots = info.kv_dead_slots();
  // dms: the rate the replica observes over the threads it holds; while it holds none (a fresh
  // or idle replica reports 0), the rate its adapter was calibrated at.
  c.eviction_rate = stats.logical_tokens() > 0 ? stats.eviction_rate()
                                               : info.dms_expected_eviction_rate();
  c.assigned_open = assigned_open;
  return c;
}

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share their numbering (both follow google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())),
                      std::string(s.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.error_code())),
                      s.error_message());
}

absl::Status ValidateJobRequest(const v1::JobRequest& req, const TokenizerSpec& tokenizer,
                                const CoordinatorOptions& options, std::string* rendered,
                                int32_t* max_tokens, std::shared_ptr<const std::regex>* pattern) {
  if (grpc::Status s = RenderJobInput(req, tokenizer, options.max_prompt_bytes, rendered);
      !s.ok()) {
    return FromGrpcStatus(s);
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
  if (req.response().top_logprobs() < 0 || req.response().top_logprobs() > kMaxTopLogprobs) {
    return Invalid(absl::StrFormat("response.top_logprobs = %d is out of range: send 0 (none) to %d",
                                   req.response().top_logprobs(), kMaxTopLogprobs));
  }
  if (!std::isfinite(req.deadline_seconds()) || req.deadline_seconds() < 0) {
    return Invalid("deadline_seconds must be >= 0 (0 = none)");
  }
  return absl::OkStatus();
}

}  // namespace dmsrt
