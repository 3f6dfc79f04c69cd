// `dmsrt bench-decode`: end-to-end decode throughput at a given batch and context, for a real or
// synthetic model, one KV policy per run.
//
//   dmsrt bench-decode [--backend cpu|cuda] (--model PATH | --synthetic qwen3-8b)
//       [--batch 1,32,256] [--context 4096,32768] [--steps 32]
//       [--kv-policy none|forced|window|dms] [--dms-force-rate 0.875] [--dms-window 16]
//       [--kv-window 512 --kv-sinks 4 (window)]
//       [--dms-fill-rate 0.875 (dms)]
//       [--kv-budget BYTES (cuda: 0 = the device memory left)] [--kv-block 16] [--seed S]
//       [--device N (cuda; default: the launcher's local rank)] [--json]
//
// Per (batch, context) cell: `batch` sequences get `context` tokens each without running the
// model (Backend::AppendUncomputed: the policy's bookkeeping runs, the slots keep arbitrary
// values; under policy dms their decisions are drawn at --dms-fill-rate, since no model ran),
// then `steps` decode steps run the whole model with greedy sampling on the backend
// (logits stay there). A cell whose caches do not fit the KV pool is reported as not fitting:
// that is the figure that separates a dense cache from a compressed one. Figures per cell:
// decode tokens/s, ms per step, KV bytes held (blocks in use x block bytes), the cache
// compression ratio, and the device memory the process holds.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/args.h"
#include "launch/byte_size.h"
#include "launch/commands.h"
#include "launch/provenance.h"
#include "parallel/status_macros.h"
#include "runtime/backend/backend.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::vector<int64_t>> IntList(const Args& args, const std::string& name,
                                             const std::string& def) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(args.Get(name, def), ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " takes positive integers separated by commas (got '",
                       args.Get(name, def), "')"));
    }
    out.push_back(v);
  }
  return out;
}

absl::Status BenchDecode(int argc, char** argv) {
  DMSRT_ASSIGN_OR_RETURN(
      Args args,
      Args::Parse(argc, argv,
                  {"backend", "model", "synthetic", "batch", "context", "steps", "kv-policy",
                   "dms-force-rate", "dms-window", "dms-fill-rate", "kv-budget", "kv-block", "seed", "threads", "device",
                   "kv-window", "kv-sinks"},
                  {"json"}));
  DMSRT_ASSIGN_OR_RETURN(std::vector<int64_t> batches, IntList(args, "batch", "1,32,256"));
  DMSRT_ASSIGN_OR_RETURN(std::vector<int64_t> contexts, IntList(args, "context", "4096,32768"));
  DMSRT_ASSIGN_OR_RETURN(int64_t steps, args.GetInt("steps", 32));
  DMSRT_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 1));
  DMSRT_ASSIGN_OR_RETURN(int64_t block, args.GetInt("kv-block", 16));
  DMSRT_ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  if (steps < 1 || block < 1) return absl::InvalidArgumentError("--steps and --kv-block must be >= 1");
  const std::string backend_name = args.Get("backend", "cpu");

  std::unique_ptr<Model> model;
  if (args.Has("synthetic") == args.Has("model")) {
    return absl::InvalidArgumentError("give exactly one of --model PATH or --synthetic NAME");
  }
  if (args.Has("synthetic")) {
    DMSRT_ASSIGN_OR_RETURN(ModelConfig c, SyntheticConfig(args.Get("synthetic")));
    // A device backend generates the weights itself; a host one needs them materialised.
    DMSRT_ASSIGN_OR_RETURN(model, MakeSyntheticModel(c, static_cast<uint64_t>(seed),
                                                     backend_name != "cuda"));
  } else {
    DMSRT_ASSIGN_OR_RETURN(model, LoadModel(args.Get("model")));
  }

  BackendOptions o;
  o.threads = static_cast<int32_t>(threads);
  o.kv_block_tokens = static_cast<int32_t>(block);
  DMSRT_ASSIGN_OR_RETURN(int64_t device, args.GetInt("device", -1));
  o.device = static_cast<int32_t>(device);
  DMSRT_ASSIGN_OR_RETURN(o.kv_policy.kind, ParseKvPolicy(args.Get("kv-policy", "none")));
  DMSRT_ASSIGN_OR_RETURN(o.kv_policy.force_rate, args.GetDouble("dms-force-rate", 0.875));
  DMSRT_ASSIGN_OR_RETURN(int64_t window, args.GetInt("dms-window", 16));
  DMSRT_ASSIGN_OR_RETURN(const double fill_rate, args.GetDouble("dms-fill-rate", 0.875));
  if (fill_rate < 0 || fill_rate > 1) return absl::InvalidArgumentError("--dms-fill-rate must be in [0, 1]");
  o.kv_policy.seed = static_cast<uint64_t>(seed);
  if (o.kv_policy.kind == KvPolicyKind::kDms) {
    // The model decides while decoding; the window is the model's unless given.
    if (!model->config.dms.enabled) {
      return absl::InvalidArgumentError(
          "--kv-policy dms needs a model with DMS decisions (a DMS checkpoint, or a synthetic "
          "model with the dms option, e.g. --synthetic qwen3-8b:dms); --kv-policy forced evicts "
          "at a fixed rate on any model");
    }
    if (!args.Has("dms-window")) window = model->config.dms.window;
  }
  o.kv_policy.window = static_cast<int32_t>(window);
  if (o.kv_policy.kind == KvPolicyKind::kWindow) {  // as for generate: the last tokens and sinks
    DMSRT_ASSIGN_OR_RETURN(int64_t kept, args.GetInt("kv-window", 512));
    DMSRT_ASSIGN_OR_RETURN(int64_t sinks, args.GetInt("kv-sinks", 4));
    if (kept < 1 || sinks < 0) {
      return absl::InvalidArgumentError("--kv-window must be >= 1 and --kv-sinks >= 0");
    }
    o.kv_policy.window = static_cast<int32_t>(kept);
    o.kv_policy.sinks = static_cast<int32_t>(sinks);
    window = kept;
  }
  const std::string budget_text = args.Get("kv-budget", backend_name == "cuda" ? "0" : "4GiB");
  DMSRT_ASSIGN_OR_RETURN(o.kv_budget_bytes, ParseByteSize(budget_text));
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeBackend(backend_name, *model, o));
  KvCache& kv = backend->kv();
  const int32_t vocab = model->config.vocab;
  std::string policy = KvPolicyName(o.kv_policy.kind);
  if (o.kv_policy.kind == KvPolicyKind::kForced) {
    policy = absl::StrCat("forced ", o.kv_policy.force_rate, " (synthetic), w ", window);
  } else if (o.kv_policy.kind == KvPolicyKind::kWindow) {
    policy = absl::StrCat("window ", window, " + ", o.kv_policy.sinks, " sinks");
  } else if (o.kv_policy.kind == KvPolicyKind::kDms) {
    policy = absl::StrCat("dms (model decisions; context filled at rate ", fill_rate, "), w ", window);
  }
  if (!args.Flag("json")) {
    std::printf("model %s, backend %s, KV policy %s, pool %.2f GiB (%lld blocks of %lld bytes)\n",
                model->source_path.c_str(), backend->name(), policy.c_str(),
                kv.total_blocks() * static_cast<double>(kv.block_bytes()) / (1 << 30),
                static_cast<long long>(kv.total_blocks()), static_cast<long long>(kv.block_bytes()));
    std::printf("%6s %8s %5s %12s %10s %12s %8s %12s\n", "batch", "context", "fits", "tokens/s",
                "ms/step", "KV GiB", "cache CR", "device GiB");
  }
  nlohmann::json cells = nlohmann::json::array();
  for (int64_t ctx : contexts) {
    for (int64_t b : batches) {
      std::vector<SeqId> seqs;
      absl::Status fill;
      const auto f0 = Clock::now();
      for (int64_t i = 0; i < b && fill.ok(); ++i) {
        DMSRT_ASSIGN_OR_RETURN(SeqId s, kv.Create());
        seqs.push_back(s);
        fill = backend->AppendUncomputed(s, static_cast<int32_t>(ctx), fill_rate);
      }
      const double fill_s = std::chrono::duration<double>(Clock::now() - f0).count();
      nlohmann::json cell = {{"batch", b}, {"context", ctx}, {"fill_seconds", fill_s}};
      bool fits = fill.ok();
      if (!fill.ok() && fill.code() != absl::StatusCode::kResourceExhausted) return fill;
      double tps = 0, ms = 0;
      KvFigures figs;
      if (fits) {
        std::vector<SeqChunk> step;
        for (size_t i = 0; i < seqs.size(); ++i) {
          SeqChunk c = MakeChunk(seqs[i], {static_cast<int32_t>((i * 7919) % vocab)},
                                 SeqChunk::Logits::kNone);
          c.sample = true;  // greedy, on the backend
          step.push_back(std::move(c));
        }
        absl::Status run;
        Clock::time_point t0;
        for (int64_t s = -2; s < steps && run.ok(); ++s) {  // two warm-up steps
          if (s == 0) t0 = Clock::now();
          absl::StatusOr<ForwardResult> r = backend->Forward(step);
          if (!r.ok()) {
            run = r.status();
            break;
          }
          for (size_t i = 0; i < step.size(); ++i) {
            step[i].tokens[0] = r->sampled[i] >= 0 ? r->sampled[i] : 0;
            step[i].sampling.counter++;
          }
        }
        if (run.code() == absl::StatusCode::kResourceExhausted) {
          fits = false;
        } else {
          DMSRT_RETURN_IF_ERROR(run);
          const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
          tps = static_cast<double>(b * steps) / secs;
          ms = 1e3 * secs / static_cast<double>(steps);
          figs = kv.Figures();
        }
      }
      const double dev_gib = backend->DeviceBytesInUse() / static_cast<double>(1 << 30);
      cell["fits"] = fits;
      if (fits) {
        cell["decode_tokens_per_s"] = tps;
        cell["ms_per_step"] = ms;
        cell["kv_bytes_held"] = figs.kv_bytes;
        cell["cache_cr"] = figs.cache_cr();
      } else {
        cell["reason"] = std::string(fill.ok() ? "decode ran out of KV blocks" : fill.message());
      }
      cell["device_bytes_in_use"] = backend->DeviceBytesInUse();
      if (!args.Flag("json")) {
        if (fits) {
          std::printf("%6lld %8lld %5s %12.1f %10.2f %12.2f %8.2f %12.2f\n", (long long)b,
                      (long long)ctx, "yes", tps, ms, figs.kv_bytes / double(1 << 30),
                      figs.cache_cr(), dev_gib);
        } else {
          std::printf("%6lld %8lld %5s %12s %10s %12s %8s %12.2f\n", (long long)b, (long long)ctx,
                      "no", "-", "-", "-", "-", dev_gib);
        }
        std::fflush(stdout);
      }
      cells.push_back(cell);
      for (SeqId s : seqs) DMSRT_RETURN_IF_ERROR(kv.Free(s));
    }
  }
  if (args.Flag("json")) {
    nlohmann::json j = {{"model", model->source_path},
                        {"backend", backend->name()},
                        {"kv_policy", policy},
                        {"kv_pool_bytes", kv.total_blocks() * kv.block_bytes()},
                        {"weight_bytes", model->weight_bytes},
                        {"cells", cells},
                        {"provenance", BenchProvenance(threads > 0 ? static_cast<int>(threads)
                                                                   : static_cast<int>(std::thread::hardware_concurrency()))}};
    std::cout << j.dump() << std::endl;
  }
  return absl::OkStatus();
}

}  // namespace

int RunBenchDecode(int argc, char** argv) {
  const absl::Status s = BenchDecode(argc, argv);
  if (!s.ok()) {
    std::cerr << "dmsrt bench-decode: " << s << std::endl;
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

}  // namespace dmsrt
