// `dmsrt generate`: one prompt (or one chat turn) -> streamed text, then the figures.
//
//   dmsrt generate [--model PATH] (--prompt TEXT | --chat TEXT) [--max-tokens N]
//       [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]...
//       [--threads N] [--kv-policy none|dms|forced|window|tova|h2o] [--kv-budget 1GiB]
//       [--dms-force-rate R] [--dms-window W] [--prefill-chunk N] [--json]
//       [--tp N] [--tp-timeout S]      (tensor parallel: mpirun -np N dmsrt generate --tp N ...)
//
// The prompt is prefilled in chunks of --prefill-chunk tokens (exact DMS visibility inside and
// across chunks), then tokens are decoded one at a time. Text is streamed as whole UTF-8
// characters; a stop string ends generation and is not printed.
#include <chrono>
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/args.h"
#include "launch/commands.h"
#include "launch/figures.h"
#include "launch/run_options.h"
#include "parallel/status_macros.h"
#include "runtime/engine/sampler.h"
#include "runtime/engine/stop_matcher.h"

namespace dmsrt {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

absl::Status Generate(int argc, char** argv, TpSession* tp) {
  std::set<std::string> value_opts = RunValueOptions();
  value_opts.insert(TpValueOptions().begin(), TpValueOptions().end());
  value_opts.insert({"prompt", "chat", "system", "max-tokens", "temperature", "top-p", "top-k",
                     "min-p", "seed", "stop"});
  // --stop may repeat: collect every occurrence before the generic parser keeps the last.
  std::vector<std::string> stops;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--stop") stops.push_back(argv[i + 1]);
  }
  DMSRT_ASSIGN_OR_RETURN(Args args, Args::Parse(argc, argv, value_opts, {"json", "no-stream"}));
  if (args.Has("prompt") == args.Has("chat")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT or --chat TEXT");
  }
  DMSRT_ASSIGN_OR_RETURN(*tp, StartTp(args, &argc, &argv));
  DMSRT_ASSIGN_OR_RETURN(RunContext ctx, LoadRunContext(args));
  const Model& model = *ctx.model;
  const Tokenizer& tok = *ctx.tokenizer;

  SamplingParams sp;
  DMSRT_ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 0.0));
  DMSRT_ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  DMSRT_ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.0));
  DMSRT_ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 0));
  DMSRT_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  DMSRT_ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens", 128));
  if (temperature < 0) return absl::InvalidArgumentError("--temperature must be >= 0 (0 = greedy)");
  if (top_p <= 0 || top_p > 1) return absl::InvalidArgumentError("--top-p must be in (0, 1]");
  if (min_p < 0 || min_p > 1) return absl::InvalidArgumentError("--min-p must be in [0, 1]");
  if (top_k < 0) return absl::InvalidArgumentError("--top-k must be >= 0 (0 = off)");
  if (max_tokens < 1) return absl::InvalidArgumentError("--max-tokens must be >= 1");
  sp.temperature = static_cast<float>(temperature);
  sp.top_p = static_cast<float>(top_p);
  sp.min_p = static_cast<float>(min_p);
  sp.top_k = static_cast<int32_t>(top_k);
  sp.seed = static_cast<uint64_t>(seed);

  std::string prompt_text;
  if (args.Has("chat")) {
    std::vector<ChatMessage> msgs;
    if (args.Has("system")) msgs.push_back({"system", args.Get("system")});
    msgs.push_back({"user", args.Get("chat")});
    DMSRT_ASSIGN_OR_RETURN(prompt_text, ApplyChatTemplate(model.tokenizer, msgs, true));
  } else {
    prompt_text = args.Get("prompt");
  }
  std::vector<int32_t> prompt = tok.Encode(prompt_text, /*parse_special=*/true, model.tokenizer.add_bos);
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt encodes to no tokens");
  if (model.config.max_positions > 0 && static_cast<int64_t>(prompt.size()) + max_tokens > model.config.max_positions) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prompt (%d tokens) + --max-tokens (%d) exceeds the model's context of %d positions",
        prompt.size(), max_tokens, model.config.max_positions));
  }

  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeRunBackend(ctx, *tp));
  if (backend == nullptr) return absl::OkStatus();  // a TP follower: the leader is done
  KvCache& kv = backend->kv();
  DMSRT_ASSIGN_OR_RETURN(SeqId seq, kv.Create());

  const bool json = args.Flag("json");
  const bool stream = !json && !args.Flag("no-stream");

  // Prefill in chunks; logits of the last prompt token only.
  auto t0 = Clock::now();
  ForwardResult fr;
  for (size_t at = 0; at < prompt.size(); at += ctx.prefill_chunk) {
    size_t end = std::min(prompt.size(), at + ctx.prefill_chunk);
    SeqChunk c;
    c.seq = seq;
    c.tokens.assign(prompt.begin() + at, prompt.begin() + end);
    c.logits = end == prompt.size() ? SeqChunk::Logits::kLast : SeqChunk::Logits::kNone;
    DMSRT_ASSIGN_OR_RETURN(fr, backend->Forward({c}));
  }
  auto t1 = Clock::now();

  Sampler sampler(sp);
  StreamDecoder decoder(tok);
  StopMatcher stopper(stops);
  std::vector<int32_t> out_ids;
  std::string text;
  std::string finish = "length";
  int64_t decode_steps = 0;
  auto emit = [&](const std::string& piece) {
    text += piece;
    if (stream && !piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  auto t_decode = Clock::now();
  while (true) {
    int32_t next = sampler.Sample(fr.logits.data(), fr.vocab);
    if (tok.IsEndOfGeneration(next)) {
      finish = "stop";
      break;
    }
    out_ids.push_back(next);
    emit(stopper.Push(decoder.Push(next)));
    if (stopper.matched()) {
      finish = "stop_string";
      break;
    }
    if (static_cast<int64_t>(out_ids.size()) >= max_tokens) break;
    if (decode_steps == 0) t_decode = Clock::now();
    SeqChunk c;
    c.seq = seq;
    c.tokens = {next};
    absl::StatusOr<ForwardResult> step = backend->Forward({c});
    if (!step.ok()) {
      if (absl::IsResourceExhausted(step.status())) {
        finish = "kv_budget";
        std::cerr << "\ndmsrt: stopped early: " << step.status().message() << "\n";
        break;
      }
      return step.status();
    }
    fr = *std::move(step);
    ++decode_steps;
  }
  if (!stopper.matched()) emit(stopper.Push(decoder.Flush()) + stopper.Flush());
  auto t2 = Clock::now();

  const double prefill_s = Seconds(t0, t1);
  const double decode_s = decode_steps > 0 ? Seconds(t_decode, t2) : 0.0;
  const double prefill_tps = prefill_s > 0 ? prompt.size() / prefill_s : 0.0;
  const double decode_tps = decode_s > 0 ? decode_steps / decode_s : 0.0;
  KvFigures figs = kv.Figures(seq);
  const std::string policy_label =
      absl::StrCat(KvPolicyName(ctx.backend_options.kv_policy.kind), ctx.synthetic_eviction ? " (synthetic)" : "");

  if (json) {
    nlohmann::json j = {{"text", text},
                        {"token_ids", out_ids},
                        {"prompt_tokens", prompt.size()},
                        {"generated_tokens", out_ids.size()},
                        {"finish_reason", finish},
                        {"prefill_seconds", prefill_s},
                        {"decode_seconds", decode_s},
                        {"decode_steps", decode_steps},
                        {"prefill_tokens_per_s", prefill_tps},
                        {"decode_tokens_per_s", decode_tps},
                        {"kv_policy", KvPolicyName(ctx.backend_options.kv_policy.kind)},
                        {"kv_synthetic", ctx.synthetic_eviction},
                        {"backend", backend->name()},
                        {"model", model.source_path}};
    j.update(FiguresJson(figs, kv.geometry().n_kv_heads, /*detail=*/true));
    if (tp->tp > 1) j["tp"] = tp->tp;  // KV figures are the whole group's
    std::cout << j.dump() << std::endl;
  } else {
    std::printf("\n\n[%s] prompt %zu tokens, generated %zu tokens (%s); prefill %.1f tokens/s, "
                "decode %.1f tokens/s; %s\n",
                backend->name(), prompt.size(), out_ids.size(), finish.c_str(), prefill_tps,
                decode_tps, FiguresLine(figs, policy_label).c_str());
  }
  return kv.Free(seq);
}

}  // namespace

int RunGenerate(int argc, char** argv) {
  TpSession tp;
  absl::Status s = Generate(argc, argv, &tp);
  return CommandExit("generate", s, &tp);
}

}  // namespace dmsrt
