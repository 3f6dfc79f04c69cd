// `dmsrt generate`: one prompt (or one chat turn) -> streamed text, then the figures.
//
//   dmsrt generate (--prompt TEXT | --chat TEXT) [options]     (dmsrt generate --help lists them)
//   mpirun -np N dmsrt generate --tp N ...                   (tensor parallel)
//
// The prompt is prefilled in chunks of --prefill-chunk tokens (exact DMS visibility inside and
// across chunks), then tokens are decoded one at a time. Text is streamed as whole UTF-8
// characters; a stop string ends generation and is not printed.
#include <chrono>
#include <cstdio>
#include <iostream>

#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

absl::Status Generate(const GenerateOptions& o, ProcessArgs& args, TpSession* tp) {
  if (o.prompt.has_value() == o.chat.has_value()) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT or --chat TEXT");
  }
  DMSRT_ASSIGN_OR_RETURN(*tp, StartTp(o.tp, "generate", o.run.backend, args));
  DMSRT_ASSIGN_OR_RETURN(RunContext ctx, LoadRunContext(o.run));
  const Model& model = *ctx.model;
  const Tokenizer& tok = *ctx.tokenizer;
  const int64_t max_tokens = o.max_tokens;

  SamplingParams sp;
  sp.temperature = static_cast<float>(o.temperature);
  sp.top_p = static_cast<float>(o.top_p);
  sp.min_p = static_cast<float>(o.min_p);
  sp.top_k = o.top_k;
  sp.seed = static_cast<uint64_t>(o.seed);

  std::string prompt_text;
  if (o.chat) {
    std::vector<ChatMessage> msgs;
    if (!o.system.empty()) msgs.push_back({"system", o.system});
    msgs.push_back({"user", *o.chat});
    DMSRT_ASSIGN_OR_RETURN(prompt_text, ApplyChatTemplate(model.tokenizer, msgs, true));
  } else {
    prompt_text = *o.prompt;
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

  const bool json = o.json;
  const bool stream = !json && !o.no_stream;

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
  StopMatcher stopper(o.stop);
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
      absl::StrCat(KvPolicyName(ctx.backend_options.kv_policy.kind), ctx.synthetic_eviction ? " (synthetic)" : "",
                   ctx.dms_adapter.empty() ? "" : absl::StrCat(", adapter ", ctx.dms_adapter));

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
                        {"dms_adapter", ctx.dms_adapter},
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

void SetupGenerate(CLI::App& app, GenerateOptions& o) {
  app.add_option("--prompt", o.prompt, "the prompt, as it is (special tokens parsed)");
  app.add_option("--chat", o.chat, "one user turn, rendered with the model's chat template");
  app.add_option("--system", o.system, "a system turn before --chat");
  app.add_option("--max-tokens", o.max_tokens, "tokens to generate at most")->transform(Integer(1));
  app.add_option("--temperature", o.temperature, "sampling temperature (0: greedy)")
      ->transform(Number(0.0));
  app.add_option("--top-p", o.top_p, "nucleus sampling: smallest set with this probability")
      ->transform(Number(0.0, 1.0, /*min_exclusive=*/true));
  app.add_option("--top-k", o.top_k, "sample among the k most likely tokens (0: off)")
      ->transform(Integer(0));
  app.add_option("--min-p", o.min_p, "drop tokens below this share of the most likely one's probability")
      ->transform(Number(0.0, 1.0));
  app.add_option("--seed", o.seed, "sampling seed")->transform(Integer());
  app.add_option("--stop", o.stop, "a string that ends generation (not printed); repeatable")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->allow_extra_args(false);
  app.add_flag("--json", o.json, "print one JSON object (text, ids, figures) instead of streaming");
  app.add_flag("--no-stream", o.no_stream, "print the text at the end instead of as it comes");
  AddRunOptions(app, &o.run);
  AddTpOptions(app, &o.tp, "tensor-parallel degree: mpirun -np N dmsrt generate --tp N (0: the number of ranks)");
  app.footer(
      "The prompt is prefilled in chunks of --prefill-chunk tokens, then tokens are decoded one at "
      "a time.\nText is streamed as whole UTF-8 characters; a stop string ends generation and is "
      "not printed.");
}

int RunGenerate(const GenerateOptions& o, ProcessArgs& args) {
  TpSession tp;
  absl::Status s = Generate(o, args, &tp);
  return CommandExit("generate", s, &tp);
}

}  // namespace dmsrt
