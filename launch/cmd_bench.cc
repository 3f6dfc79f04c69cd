// `dmsrt bench`: prefill and decode speed on a model, next to the measured memory-bandwidth
// floor, written as a table and as a JSON profile.
//
//   dmsrt bench [--prefill 512] [--decode 128] [--reps 3] [--out profile.json] [options]
//   (dmsrt bench --help lists them)
//
// Prefill: one sequence, the whole prompt in chunks of --prefill-chunk. Decode: --decode greedy
// steps of one token after the prompt, EOS ignored (the count is fixed). Each figure is the median
// of --reps repetitions with min and max. Floor: decode must read every weight once per token,
// so tokens/s <= copy bandwidth / weight bytes; the copy bandwidth is measured here, with the same
// thread count, as (read + write bytes) / time of a large memcpy split across threads.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>

#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/figures.h"
#include "launch/plan/profile.h"
#include "launch/provenance.h"
#include "launch/run_options.h"
#include "parallel/status_macros.h"
#include "runtime/engine/sampler.h"
#include "runtime/engine/tp_replica.h"

namespace dmsrt {
namespace {

using Clock = std::chrono::steady_clock;

struct Stat {
  double median = 0, min = 0, max = 0, mean = 0;
};
Stat Summarise(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  return {v[v.size() / 2], v.front(), v.back(), sum / static_cast<double>(v.size())};
}

// A grid point's times: the median and the spread, and the mean, which the planner fits (it adds
// step times up, and a sum follows the mean).
nlohmann::json TimesJson(const std::vector<double>& times) {
  const Stat s = Summarise(times);
  return {{"seconds", s.median}, {"mean", s.mean}, {"min", s.min}, {"max", s.max}};
}

// The temperature the sampling cost is timed at: the engine's path for best-of-N threads
// (temperature > 0, no top-k/top-p, with the chosen token's log-probability).
constexpr double kGridSampleTemperature = 0.7;

// Host seconds of one engine sampling call on a real row of logits, mean of `calls`.
nlohmann::json SamplingCost(const ForwardResult& fr, int64_t calls) {
  SamplingParams params;
  params.temperature = static_cast<float>(kGridSampleTemperature);
  params.seed = 7;
  Sampler sampler(params);
  float logprob = 0.0f;
  int64_t sink = 0;
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < calls; ++i) sink += sampler.Sample(fr.logits.data(), fr.vocab, &logprob);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  return {{"row_seconds", secs / static_cast<double>(calls)},
          {"temperature", kGridSampleTemperature},
          {"vocab", fr.vocab},
          {"calls", calls},
          {"checksum", sink}};
}

// (read + write) bytes per second of a parallel memcpy of `bytes`, best of several runs.
double CopyBandwidth(int threads, size_t bytes) {
  std::vector<char> a(bytes), b(bytes);
  std::memset(a.data(), 1, bytes);
  std::memset(b.data(), 2, bytes);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = Clock::now();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        size_t lo = bytes * t / threads, hi = bytes * (t + 1) / threads;
        std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
      });
    }
    for (auto& t : ts) t.join();
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * bytes / s);
  }
  return best;
}

int32_t Argmax(const float* x, int32_t n) {
  return static_cast<int32_t>(std::max_element(x, x + n) - x);
}

// The step-time grid of a schema-2 profile (launch/plan/profile.h): decode steps of `batch`
// sequences that each hold `context` tokens, and prefill chunks of `chunk` tokens on a fresh
// sequence. Each point is the median of `reps` timed steps after one warm-up step.
absl::StatusOr<nlohmann::json> StepGrid(Backend& backend, const Model& model, int32_t tp,
                                        const std::vector<int32_t>& batches,
                                        const std::vector<int32_t>& contexts,
                                        const std::vector<int32_t>& chunks, int64_t reps,
                                        std::vector<std::string>* skipped) {
  KvCache& kv = backend.kv();
  const KvGeometry& g = kv.geometry();
  const double heads = static_cast<double>(g.n_layers) * g.n_kv_heads;
  std::mt19937 rng(99);
  std::uniform_int_distribution<int32_t> pick(100, model.config.vocab - 1);
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = pick(rng);
    return t;
  };
  nlohmann::json decode = nlohmann::json::array(), prefill = nlohmann::json::array();
  nlohmann::json sampling;
  for (int32_t b : batches) {
    for (int32_t ctx_len : contexts) {
      std::vector<SeqId> seqs;
      absl::Status fill;
      for (int32_t i = 0; i < b && fill.ok(); ++i) {
        absl::StatusOr<SeqId> s = kv.Create();
        if (!s.ok()) {
          fill = s.status();
          break;
        }
        seqs.push_back(*s);
        if (tp == 1) {
          fill = backend.AppendUncomputed(*s, ctx_len, 0.0);
        } else {
          for (int32_t at = 0; at < ctx_len && fill.ok(); at += 256) {
            fill = backend.Forward({MakeChunk(*s, random_tokens(std::min(256, ctx_len - at)),
                                              SeqChunk::Logits::kNone)})
                       .status();
          }
        }
      }
      std::vector<double> times;
      int64_t resident = 0;
      for (int64_t rep = 0; rep < reps + 1 && fill.ok(); ++rep) {
        std::vector<SeqChunk> batch;
        for (SeqId s : seqs) {
          SeqChunk c = MakeChunk(s, random_tokens(1), SeqChunk::Logits::kLast);
          if (backend.samples_on_device()) {  // as the engine asks it: the token, not the row
            c.logits = SeqChunk::Logits::kNone;
            c.sample = true;
            c.sampling.temperature = static_cast<float>(kGridSampleTemperature);
            c.sampling.seed = 7;
            c.sampling.counter = static_cast<uint64_t>(rep);
          }
          batch.push_back(std::move(c));
        }
        const auto t0 = Clock::now();
        absl::StatusOr<ForwardResult> fr = backend.Forward(batch);
        if (!fr.ok()) {
          fill = fr.status();
          break;
        }
        if (rep > 0) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        if (sampling.is_null() && backend.samples_on_device()) {
          // The device samples inside the timed steps; the engine adds nothing on the host.
          sampling = {{"row_seconds", 0.0}, {"on_device", true}, {"temperature", kGridSampleTemperature}};
        } else if (sampling.is_null() && !fr->logits.empty()) {
          sampling = SamplingCost(*fr, 200);
        }
      }
      if (fill.ok()) {
        for (SeqId s : seqs) resident += kv.Figures(s).resident_tokens;
        nlohmann::json point = {{"batch", b},
                                {"context", ctx_len},
                                {"kv_tokens", static_cast<int64_t>(resident / heads)}};
        point.update(TimesJson(times));
        decode.push_back(point);
      } else {
        skipped->push_back(absl::StrCat("decode batch ", b, " x context ", ctx_len, ": ",
                                        fill.message()));
      }
      for (SeqId s : seqs) DMSRT_RETURN_IF_ERROR(kv.Free(s));
    }
  }
  for (int32_t c : chunks) {
    std::vector<double> times;
    absl::Status st;
    for (int64_t rep = 0; rep < reps + 1 && st.ok(); ++rep) {
      absl::StatusOr<SeqId> s = kv.Create();
      if (!s.ok()) {
        st = s.status();
        break;
      }
      const auto t0 = Clock::now();
      st = backend.Forward({MakeChunk(*s, random_tokens(c), SeqChunk::Logits::kLast)}).status();
      if (rep > 0) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      DMSRT_RETURN_IF_ERROR(kv.Free(*s));
    }
    if (st.ok()) {
      nlohmann::json point = {{"tokens", c}};
      point.update(TimesJson(times));
      prefill.push_back(point);
    } else {
      skipped->push_back(absl::StrCat("prefill chunk ", c, ": ", st.message()));
    }
  }
  nlohmann::json out = {{"decode", decode}, {"prefill", prefill}};
  if (!sampling.is_null()) out["sampling"] = sampling;
  return absl::StatusOr<nlohmann::json>(absl::in_place, std::move(out));
}

absl::Status Bench(const BenchOptions& o, ProcessArgs& args, TpSession* tp) {
  DMSRT_ASSIGN_OR_RETURN(*tp, StartTp(o.tp, "bench", o.run.backend, args));
  DMSRT_ASSIGN_OR_RETURN(RunContext ctx, LoadRunContext(o.run));
  const int64_t n_prefill = o.prefill, n_decode = o.decode, reps = o.reps;
  const Model& model = *ctx.model;
  std::vector<int32_t> prompt;
  if (!o.tokens_file.empty()) {
    std::ifstream in(o.tokens_file);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", o.tokens_file));
    int64_t id;
    while (in >> id) {
      if (id < 0 || id >= model.config.vocab) return absl::InvalidArgumentError("token id out of range in --tokens-file");
      prompt.push_back(static_cast<int32_t>(id));
    }
    if (static_cast<int64_t>(prompt.size()) < n_prefill) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens-file has ", prompt.size(), " ids, fewer than --prefill"));
    }
    prompt.resize(n_prefill);
  } else {
    std::mt19937 rng(1234);
    std::uniform_int_distribution<int32_t> pick(100, model.config.vocab - 1);
    for (int64_t i = 0; i < n_prefill; ++i) prompt.push_back(pick(rng));
  }
  const int threads = ctx.backend_options.threads > 0 ? ctx.backend_options.threads
                                                      : static_cast<int>(std::thread::hardware_concurrency());
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeRunBackend(ctx, *tp));
  if (backend == nullptr) return absl::OkStatus();  // a TP follower: the leader is done
  KvCache& kv = backend->kv();

  std::vector<double> prefill_tps, decode_tps;
  std::vector<int32_t> decoded;
  KvFigures figs;
  for (int64_t rep = 0; rep < reps + 1; ++rep) {  // rep 0 warms up
    DMSRT_ASSIGN_OR_RETURN(SeqId seq, kv.Create());
    auto t0 = Clock::now();
    ForwardResult fr;
    for (size_t at = 0; at < prompt.size(); at += ctx.prefill_chunk) {
      size_t end = std::min(prompt.size(), at + ctx.prefill_chunk);
      SeqChunk c = MakeChunk(seq, std::vector<int32_t>(prompt.begin() + at, prompt.begin() + end),
                 end == prompt.size() ? SeqChunk::Logits::kLast : SeqChunk::Logits::kNone);
      DMSRT_ASSIGN_OR_RETURN(fr, backend->Forward({c}));
    }
    auto t1 = Clock::now();
    decoded.clear();
    int32_t next = Argmax(fr.logits.data(), fr.vocab);
    for (int64_t i = 0; i < n_decode; ++i) {
      decoded.push_back(next);
      DMSRT_ASSIGN_OR_RETURN(fr, backend->Forward({MakeChunk(seq, {next}, SeqChunk::Logits::kLast)}));
      next = Argmax(fr.logits.data(), fr.vocab);
    }
    auto t2 = Clock::now();
    if (rep > 0) {
      prefill_tps.push_back(prompt.size() / std::chrono::duration<double>(t1 - t0).count());
      if (n_decode > 0) decode_tps.push_back(n_decode / std::chrono::duration<double>(t2 - t1).count());
    }
    figs = kv.Figures(seq);
    DMSRT_RETURN_IF_ERROR(kv.Free(seq));
  }
  std::vector<std::string> skipped;
  nlohmann::json grid;
  if (!o.no_grid) {
    DMSRT_ASSIGN_OR_RETURN(grid, StepGrid(*backend, model, tp->tp, o.grid_batch, o.grid_context,
                                          o.grid_chunk, reps, &skipped));
  }
  if (tp->tp > 1) DMSRT_RETURN_IF_ERROR(ShutdownTpFollowers(*backend));  // they are done
  const double bw = CopyBandwidth(threads, size_t{512} << 20);
  const double floor_tps = bw / static_cast<double>(model.weight_bytes);
  Stat pf = Summarise(prefill_tps);
  Stat dc = n_decode > 0 ? Summarise(decode_tps) : Stat{};
  // Matrix FLOPs per token: 2 * (weights used per token); attention is excluded (small at 512).
  double params = 0;
  const ModelConfig& c = model.config;
  params += static_cast<double>(c.n_layers) *
            (2.0 * c.hidden * c.n_heads * c.head_dim + 2.0 * c.hidden * c.n_kv_heads * c.head_dim +
             3.0 * c.hidden * c.ffn);
  params += static_cast<double>(c.vocab) * c.hidden;
  nlohmann::json j = {{"schema_version", 2},
                      {"model", model.source_path},
                      {"backend", backend->name()},
                      {"threads", threads},
                      {"kv_policy", KvPolicyName(ctx.backend_options.kv_policy.kind)},
                      {"kv_synthetic", ctx.synthetic_eviction},
                      {"prefill_tokens", n_prefill},
                      {"decode_tokens", n_decode},
                      {"reps", reps},
                      {"prefill_tokens_per_s", {{"median", pf.median}, {"min", pf.min}, {"max", pf.max}}},
                      {"decode_tokens_per_s", {{"median", dc.median}, {"min", dc.min}, {"max", dc.max}}},
                      {"prefill_gflops", pf.median * 2.0 * params / 1e9},
                      {"weight_bytes", model.weight_bytes},
                      {"copy_bandwidth_gb_per_s", bw / 1e9},
                      {"decode_floor_tokens_per_s", floor_tps},
                      {"decode_fraction_of_floor", floor_tps > 0 ? dc.median / floor_tps : 0.0},
                      {"decoded_token_ids", decoded},
                      {"provenance", BenchProvenance(threads)}};
  if (tp->tp > 1) j["tp"] = tp->tp;  // KV figures are the whole group's
  if (!o.no_grid) {
    // The step model the planner fits (launch/plan/profile.h), with the fit beside the grid.
    std::vector<DecodePoint> dec;
    std::vector<PrefillPoint> pre;
    for (const auto& e : grid["decode"]) {
      dec.push_back({e["batch"].get<int64_t>(), e["kv_tokens"].get<int64_t>(), e["mean"].get<double>()});
    }
    for (const auto& e : grid["prefill"]) pre.push_back({e["tokens"].get<int64_t>(), e["mean"].get<double>()});
    StepCosts costs;
    double worst = 0;
    FitStepCosts(dec, pre, &costs, &worst);
    grid["fit"] = {{"fixed_s", costs.fixed},
                   {"per_decode_row_s", costs.per_decode_row},
                   {"per_kv_token_s", costs.per_kv_token},
                   {"prefill_fixed_s", costs.prefill_fixed},
                   {"per_prefill_token_s", costs.per_prefill_token},
                   {"per_sampled_row_s", grid.contains("sampling") ? grid["sampling"]["row_seconds"].get<double>() : 0.0},
                   {"max_rel_error", worst}};
    grid["skipped"] = skipped;
    j["step_model"] = grid;
  }
  j.update(FiguresJson(figs, kv.geometry().n_kv_heads, false));
  if (!o.out.empty()) {
    std::ofstream out(o.out);
    if (!out) return absl::InvalidArgumentError(absl::StrCat("cannot write --out ", o.out));
    out << j.dump(2) << "\n";
  }
  if (o.json) {
    std::cout << j.dump() << std::endl;
  } else {
    std::printf("%s\n", ProvenanceLine(j["provenance"]).c_str());
    std::printf("%-28s %12s %12s %12s\n", "figure", "median", "min", "max");
    std::printf("%-28s %12.1f %12.1f %12.1f\n", "prefill tokens/s", pf.median, pf.min, pf.max);
    std::printf("%-28s %12.1f %12.1f %12.1f\n", "decode tokens/s", dc.median, dc.min, dc.max);
    std::printf("prefill %.1f GFLOP/s (matrix FLOPs); decode floor %.1f tokens/s = %.1f GB/s copy "
                "bandwidth / %s of weights; decode at %.0f%% of the floor\n",
                pf.median * 2.0 * params / 1e9, floor_tps, bw / 1e9,
                HumanBytes(model.weight_bytes).c_str(), floor_tps > 0 ? 100.0 * dc.median / floor_tps : 0.0);
    std::printf("%s\n", FiguresLine(figs, KvPolicyName(ctx.backend_options.kv_policy.kind)).c_str());
  }
  return absl::OkStatus();
}

}  // namespace

void SetupBench(CLI::App& app, BenchOptions& o) {
  app.add_option("--prefill", o.prefill, "prompt tokens (random ids unless --tokens-file)")
      ->transform(Integer(1));
  app.add_option("--decode", o.decode, "greedy decode steps after the prompt (EOS ignored)")
      ->transform(Integer(0));
  app.add_option("--reps", o.reps, "timed repetitions after one warm-up; figures are their median")
      ->transform(Integer(1));
  app.add_option("--tokens-file", o.tokens_file, "the prompt's token ids, whitespace-separated")
      ->type_name("FILE");
  app.add_option("--out", o.out, "also write the JSON profile to this file")->type_name("FILE");
  app.add_flag("--json", o.json, "print the JSON profile instead of the table");
  app.add_option("--grid-batch", o.grid_batch, "step grid: decode batch sizes")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  app.add_option("--grid-context", o.grid_context, "step grid: tokens each decoding sequence holds")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--grid-chunk", o.grid_chunk, "step grid: prefill chunk sizes")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 16));
  app.add_flag("--no-grid", o.no_grid, "skip the step grid (the profile then cannot drive `dmsrt plan`)");
  AddRunOptions(app, &o.run);
  AddTpOptions(app, &o.tp, "tensor-parallel degree: mpirun -np N dmsrt bench --tp N (0: the number of ranks)");
}

int RunBench(const BenchOptions& o, ProcessArgs& args) {
  TpSession tp;
  absl::Status s = Bench(o, args, &tp);
  return CommandExit("bench", s, &tp);
}

}  // namespace dmsrt
