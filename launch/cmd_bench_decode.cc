// `dmsrt bench-decode`: end-to-end decode throughput at a given batch and context, for a real or
// synthetic model, one KV policy per run.
//
//   dmsrt bench-decode [--backend cpu|cuda] (--model PATH | --synthetic qwen3-8b)
//       [--batch 1,32,256] [--context 4096,32768] [--steps 32] [--kv-policy none] [options]
//   (dmsrt bench-decode --help lists them)
//
// Per (batch, context) cell: `batch` sequences get `context` tokens each without running the
// model (Backend::AppendUncomputed: the policy's bookkeeping runs, the slots keep arbitrary
// values; under policy dms their decisions are drawn at --dms-fill-rate, since no model ran),
// then `steps` decode steps run the whole model with greedy sampling on the backend
// (logits stay there). A cell whose caches do not fit the KV pool is reported as not fitting:
// that is the figure that separates a dense cache from a compressed one. Figures per cell:
// decode tokens/s, ms per step, KV bytes held (blocks in use x block bytes), the cache
// compression ratio, and the device memory the process holds.
//
// Under mpirun with --tp N (or without --tp: every rank) the ranks form one tensor-parallel
// group: each holds its shard (with --backend cuda on the GPU of its local rank, collectives
// through NCCL), TP rank 0 drives the cells and prints, and the KV figures are the group's.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/provenance.h"
#include "launch/run_options.h"
#include "parallel/status_macros.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/tp_replica.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace {

using Clock = std::chrono::steady_clock;

// "1,32,256" -> {1, 32, 256}; the validator of --batch and --context has checked the form.
std::vector<int64_t> IntList(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (absl::SimpleAtoi(part, &v)) out.push_back(v);
  }
  return out;
}

CLI::Validator PositiveIntList() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        for (absl::string_view part : absl::StrSplit(s, ',')) {
          int64_t v = 0;
          if (!absl::SimpleAtoi(part, &v) || v <= 0) {
            return absl::StrCat("takes positive integers separated by commas, got '", s, "'");
          }
        }
        return "";
      },
      "");
}

absl::Status BenchDecode(const BenchDecodeOptions& opt, ProcessArgs& args, TpSession* tp) {
  DMSRT_ASSIGN_OR_RETURN(*tp, StartTp(opt.tp, "bench-decode", opt.backend, args));
  const std::vector<int64_t> batches = IntList(opt.batch);
  const std::vector<int64_t> contexts = IntList(opt.context);
  const int64_t steps = opt.steps;
  const int64_t seed = opt.seed;
  const std::string& backend_name = opt.backend;

  std::unique_ptr<Model> model;
  if (opt.synthetic.empty() == opt.model.empty()) {
    return absl::InvalidArgumentError("give exactly one of --model PATH or --synthetic NAME");
  }
  if (!opt.synthetic.empty()) {
    DMSRT_ASSIGN_OR_RETURN(ModelConfig c, SyntheticConfig(opt.synthetic));
    // A device backend generates the weights itself; a host one needs them materialised.
    DMSRT_ASSIGN_OR_RETURN(model, MakeSyntheticModel(c, static_cast<uint64_t>(seed),
                                                     backend_name != "cuda"));
  } else {
    DMSRT_ASSIGN_OR_RETURN(model, LoadModel(opt.model));
  }

  BackendOptions o;
  o.threads = opt.threads;
  o.kv_block_tokens = opt.kv_block;
  o.device = opt.device;
  DMSRT_ASSIGN_OR_RETURN(o.kv_policy.kind, ParseKvPolicy(opt.kv_policy));
  o.kv_policy.force_rate = opt.dms_force_rate;
  int64_t window = opt.dms_window.value_or(16);
  const double fill_rate = opt.dms_fill_rate;
  o.kv_policy.seed = static_cast<uint64_t>(seed);
  if (o.kv_policy.kind == KvPolicyKind::kDms) {
    // The model decides while decoding; the window is the model's unless given.
    if (!model->config.dms.enabled) {
      return absl::InvalidArgumentError(
          "--kv-policy dms needs a model with DMS decisions (a DMS checkpoint, or a synthetic "
          "model with the dms option, e.g. --synthetic qwen3-8b:dms); --kv-policy forced evicts "
          "at a fixed rate on any model");
    }
    if (!opt.dms_window) window = model->config.dms.window;
  }
  o.kv_policy.window = static_cast<int32_t>(window);
  if (o.kv_policy.kind == KvPolicyKind::kWindow) {  // as for generate: the last tokens and sinks
    o.kv_policy.window = opt.kv_window;
    o.kv_policy.sinks = opt.kv_sinks;
    window = opt.kv_window;
  }
  o.kv_budget_bytes = opt.kv_budget_bytes.value_or(backend_name == "cuda" ? 0 : int64_t{4} << 30);
  o.comm = tp->comm();
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeBackend(backend_name, *model, o));
  if (tp->tp > 1) {
    if (!tp->leader()) return RunTpFollower(*backend, tp->comm());  // until the leader is done
    DMSRT_ASSIGN_OR_RETURN(backend, MakeTpLeaderBackend(std::move(backend), tp->comm()));
  }
  KvCache& kv = backend->kv();
  const int32_t vocab = model->config.vocab;
  std::string policy = KvPolicyName(o.kv_policy.kind);
  if (o.kv_policy.kind == KvPolicyKind::kForced) {
    policy = absl::StrCat("forced ", o.kv_policy.force_rate, " (synthetic), w ", window);
  } else if (o.kv_policy.kind == KvPolicyKind::kDms) {
    policy = absl::StrCat("dms (model decisions; context filled at rate ", fill_rate, "), w ", window);
  } else if (o.kv_policy.kind == KvPolicyKind::kWindow) {
    policy = absl::StrCat("window ", window, " + ", o.kv_policy.sinks, " sinks");
  }
  if (!opt.json) {
    std::printf("model %s, backend %s%s, KV policy %s, pool %.2f GiB (%lld blocks of %lld bytes)\n",
                model->source_path.c_str(), backend->name(),
                tp->tp > 1 ? absl::StrCat(", tp ", tp->tp, " (device figures per rank)").c_str() : "",
                policy.c_str(),
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
      if (!opt.json) {
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
  if (opt.json) {
    nlohmann::json j = {{"model", model->source_path},
                        {"backend", backend->name()},
                        {"tp", tp->tp},
                        {"kv_policy", policy},
                        {"kv_pool_bytes", kv.total_blocks() * kv.block_bytes()},
                        {"weight_bytes", model->weight_bytes},
                        {"cells", cells},
                        {"provenance", BenchProvenance(opt.threads > 0 ? opt.threads
                                                       : static_cast<int>(std::thread::hardware_concurrency()))}};
    std::cout << j.dump() << std::endl;
  }
  return absl::OkStatus();
}

}  // namespace

void SetupBenchDecode(CLI::App& app, BenchDecodeOptions& o) {
  AddBackendOption(app, &o.backend);
  app.add_option("--model", o.model, "model: a GGUF file or a Hugging Face directory")->type_name("PATH");
  app.add_option("--synthetic", o.synthetic,
                 "a synthetic model with random weights: NAME[:dms][:layers=N], e.g. qwen3-8b, "
                 "qwen3-8b:dms, tiny-llama")
      ->type_name("NAME");
  app.add_option("--batch", o.batch, "sequences per decode step, one cell each")
      ->type_name("N,N,...")
      ->transform(PositiveIntList());
  app.add_option("--context", o.context, "tokens already in each sequence's cache, one cell each")
      ->type_name("N,N,...")
      ->transform(PositiveIntList());
  app.add_option("--steps", o.steps, "timed decode steps per cell (after two warm-up steps)")
      ->transform(Integer(1));
  app.add_option("--kv-policy", o.kv_policy, "KV policy (dms: the model's own decisions)")
      ->transform(OneOf({"none", "dms", "forced", "window", "tova", "h2o"}));
  app.add_option("--dms-force-rate", o.dms_force_rate, "forced: share of tokens evicted after the window")
      ->transform(Number(0.0, 1.0));
  app.add_option("--dms-window", o.dms_window,
                 "tokens an evicted token stays visible (default: 16; dms: the model's window)")
      ->transform(Integer(1));
  app.add_option("--dms-fill-rate", o.dms_fill_rate,
                 "dms: rate of the eviction decisions drawn for the filled context")
      ->transform(Number(0.0, 1.0));
  AddKvWindowOptions(app, &o.kv_window, &o.kv_sinks);
  AddByteSizeOption(app, "--kv-budget", &o.kv_budget_bytes,
                    "memory for the KV pool (default: 4GiB on cpu; on cuda 0 = the device memory left)");
  AddKvBlockOption(app, &o.kv_block);
  app.add_option("--seed", o.seed, "seed of the synthetic weights and of the eviction draws")
      ->transform(Integer());
  AddThreadsOption(app, &o.threads);
  AddDeviceOption(app, &o.device);
  AddTpOptions(app, &o.tp, "tensor-parallel degree (under mpirun; 0: the number of ranks)");
  app.add_flag("--json", o.json, "print one JSON object instead of the table");
}

int RunBenchDecode(const BenchDecodeOptions& o, ProcessArgs& args) {
  TpSession tp;
  const absl::Status s = BenchDecode(o, args, &tp);
  return CommandExit("bench-decode", s, &tp);
}

}  // namespace dmsrt
