#include "launch/run_options.h"

#include "absl/strings/str_cat.h"
#include "parallel/status_macros.h"

namespace dmsrt {

const std::set<std::string>& RunValueOptions() {
  static const std::set<std::string> kOptions = {
      "model",      "dms-adapter", "threads",   "kv-budget", "kv-block",  "kv-policy",
      "dms-window", "dms-force-rate", "dms-seed", "kv-window", "kv-sinks", "kv-tokens",
      "prefill-chunk"};
  return kOptions;
}

absl::StatusOr<RunContext> LoadRunContext(const Args& args) {
  RunContext ctx;
  std::string path = args.Get("model");
  if (path.empty()) {
    DMSRT_ASSIGN_OR_RETURN(path, DefaultModelPath());
  }
  DMSRT_ASSIGN_OR_RETURN(ctx.model, LoadModel(path));
  if (args.Has("dms-adapter")) {
    DMSRT_RETURN_IF_ERROR(AttachDmsAdapter(*ctx.model, args.Get("dms-adapter")));
  }
  DMSRT_ASSIGN_OR_RETURN(ctx.tokenizer, Tokenizer::Create(ctx.model->tokenizer));

  BackendOptions& bo = ctx.backend_options;
  DMSRT_ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0 (0 = all cores)");
  bo.threads = static_cast<int32_t>(threads);
  DMSRT_ASSIGN_OR_RETURN(bo.kv_budget_bytes, ParseByteSize(args.Get("kv-budget", "1GiB")));
  DMSRT_ASSIGN_OR_RETURN(int64_t block, args.GetInt("kv-block", 16));
  if (block < 1 || block > 4096) return absl::InvalidArgumentError("--kv-block must be in 1..4096 slots");
  bo.kv_block_tokens = static_cast<int32_t>(block);
  DMSRT_ASSIGN_OR_RETURN(int64_t chunk, args.GetInt("prefill-chunk", 512));
  if (chunk < 1) return absl::InvalidArgumentError("--prefill-chunk must be >= 1");
  ctx.prefill_chunk = static_cast<int32_t>(chunk);

  const DmsConfig& dms = ctx.model->config.dms;
  KvPolicyConfig& pol = bo.kv_policy;
  DMSRT_ASSIGN_OR_RETURN(double force_rate, args.GetDouble("dms-force-rate", -1.0));
  std::string policy = args.Get("kv-policy");
  if (policy.empty()) policy = force_rate >= 0 ? "forced" : (dms.enabled ? "dms" : "none");
  DMSRT_ASSIGN_OR_RETURN(pol.kind, ParseKvPolicy(policy));
  DMSRT_ASSIGN_OR_RETURN(int64_t window, args.GetInt("dms-window", dms.enabled ? dms.window : 512));
  DMSRT_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("dms-seed", 0));
  switch (pol.kind) {
    case KvPolicyKind::kNone:
      break;
    case KvPolicyKind::kDms:
      if (!dms.enabled) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--kv-policy dms needs a model with DMS decisions; ", path,
            " has none. Use --dms-adapter FILE.safetensors, or --dms-force-rate R for synthetic "
            "eviction (measurement only)"));
      }
      pol.window = dms.window;
      break;
    case KvPolicyKind::kForced:
      if (force_rate < 0) force_rate = 0.875;
      if (force_rate > 1) return absl::InvalidArgumentError("--dms-force-rate must be in [0, 1]");
      if (window < 1) return absl::InvalidArgumentError("--dms-window must be >= 1");
      pol.force_rate = force_rate;
      pol.window = static_cast<int32_t>(window);
      pol.seed = static_cast<uint64_t>(seed);
      ctx.synthetic_eviction = true;
      break;
    case KvPolicyKind::kWindow: {
      DMSRT_ASSIGN_OR_RETURN(int64_t w, args.GetInt("kv-window", 512));
      DMSRT_ASSIGN_OR_RETURN(int64_t sinks, args.GetInt("kv-sinks", 4));
      if (w < 1 || sinks < 0) return absl::InvalidArgumentError("--kv-window must be >= 1 and --kv-sinks >= 0");
      pol.window = static_cast<int32_t>(w);
      pol.sinks = static_cast<int32_t>(sinks);
      break;
    }
    case KvPolicyKind::kTova:
    case KvPolicyKind::kH2o: {
      DMSRT_ASSIGN_OR_RETURN(int64_t t, args.GetInt("kv-tokens", 512));
      if (t < 2) return absl::InvalidArgumentError("--kv-tokens must be >= 2");
      pol.budget_tokens = static_cast<int32_t>(t);
      break;
    }
  }
  if (force_rate >= 0 && pol.kind != KvPolicyKind::kForced) {
    return absl::InvalidArgumentError("--dms-force-rate only goes with --kv-policy forced");
  }
  return ctx;
}

}  // namespace dmsrt
