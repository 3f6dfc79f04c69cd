#include "launch/run_options.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "parallel/status_macros.h"
#include "parallel/world.h"
#include "runtime/engine/tp_replica.h"

namespace dmsrt {

const std::set<std::string>& RunValueOptions() {
  static const std::set<std::string> kOptions = {
      "model",      "dms-adapter", "threads",   "kv-budget", "kv-block",  "kv-policy",
      "dms-window", "dms-force-rate", "dms-seed", "kv-window", "kv-sinks", "kv-tokens",
      "prefill-chunk", "backend", "device"};
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

  ctx.backend = args.Get("backend", "cpu");
  if (ctx.backend != "cpu" && ctx.backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend takes cpu or cuda (got '", ctx.backend, "')"));
  }
  BackendOptions& bo = ctx.backend_options;
  DMSRT_ASSIGN_OR_RETURN(int64_t device, args.GetInt("device", -1));
  if (device < -1) return absl::InvalidArgumentError("--device must be >= 0 (or -1: by local rank)");
  bo.device = static_cast<int32_t>(device);
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

const std::set<std::string>& TpValueOptions() {
  static const std::set<std::string> kOptions = {"tp", "tp-timeout"};
  return kOptions;
}

absl::StatusOr<TpSession> StartTp(const Args& args, int* argc, char*** argv) {
  TpSession session;
  DMSRT_ASSIGN_OR_RETURN(int64_t tp, args.GetInt("tp", 0));
  DMSRT_ASSIGN_OR_RETURN(double timeout_s, args.GetDouble("tp-timeout", 300.0));
  if (tp < 0) return absl::InvalidArgumentError("--tp must be >= 1 (or 0 = the number of ranks)");
  if (!(timeout_s > 0)) return absl::InvalidArgumentError("--tp-timeout must be > 0 seconds");
  if (!InsideMpirun()) {
    if (tp > 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--tp %d needs %d processes: launch with mpirun -np %d dmsrt %s ... --tp %d", tp, tp, tp,
          (*argv)[0], tp));
    }
    return session;  // one process, no MPI: exactly as without tensor parallelism
  }
  const LauncherEnv env = ReadLauncherEnv();
  const int world = env.world_size.value_or(1);
  if (tp == 0) tp = world;
  if (tp != world) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--tp %d under mpirun with %d ranks: this subcommand runs one tensor-parallel group, so "
        "launch with mpirun -np %d (replicas x tp is for serve)",
        tp, world, tp));
  }
  ParallelOptions opts;
  opts.tp = static_cast<int>(tp);
  opts.timeout = absl::Seconds(timeout_s);
  DMSRT_ASSIGN_OR_RETURN(ParallelContext par, InitParallel(argc, argv, opts));
  session.par = std::make_unique<ParallelContext>(std::move(par));
  session.tp = session.par->world.tp();
  return session;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeRunBackend(RunContext& ctx, TpSession& tp) {
  ctx.backend_options.comm = tp.comm();
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> local,
                         MakeBackend(ctx.backend, *ctx.model, ctx.backend_options));
  if (tp.tp <= 1) return local;
  if (tp.leader()) return MakeTpLeaderBackend(std::move(local), tp.comm());
  DMSRT_RETURN_IF_ERROR(RunTpFollower(*local, tp.comm()));
  return std::unique_ptr<Backend>();
}

int CommandExit(const char* command, const absl::Status& s, TpSession* tp) {
  if (s.ok()) return 0;
  if (tp != nullptr && tp->par != nullptr && tp->par->world.world_size() > 1) {
    return tp->par->Fail(absl::Status(s.code(), absl::StrCat(command, ": ", s.message())));
  }
  std::fprintf(stderr, "dmsrt %s: %s\n", command, std::string(s.message()).c_str());
  return absl::IsInvalidArgument(s) || absl::IsNotFound(s) ? 2 : 1;
}

}  // namespace dmsrt
