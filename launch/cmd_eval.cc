// `dmsrt eval`: eviction quality against the dense cache (launch/eval/eval.h).
//
//   dmsrt eval [--model PATH] [--file F | --text TEXT | --tokens "1 2 3"] [--max-tokens N] [--context C]
//       [--target-cr 2,4,8] [--forced-window 64] [--policies "SPEC;SPEC..."] [--top-k 64]
//       [--passkey-lengths 1024,2048,4096] [--passkey-depths 0.1,0.5,0.9] [--no-passkey]
//       [--json] [--json-out FILE] [--svg FILE] [--quiet]
//   dmsrt eval --merge A.json,B.json [--json] [--json-out FILE] [--svg FILE]   (no model run)
//       [--backend cpu|cuda --threads N --kv-budget B --prefill-chunk N ...]
//
// Policies: --kv-policy (with --kv-window/--kv-sinks/--kv-tokens/--dms-force-rate/--dms-window)
// evaluates that one policy; --policies takes specs as in ParsePolicySpec ("window:w=1020,s=4",
// "tova:t=1024", "h2o:t=512", "forced:r=0.9,w=64", "threshold:rate=0.9,w=64", "dms"); otherwise
// the grid of PolicyGrid for --target-cr at the text's length (with threshold rows on the CPU
// backend). A threshold given as a rate is calibrated on --calibration (default: the corpus's
// calibration part). The dense reference always runs first.
// --write-passkey-prompts FILE writes the probe's prompts for another implementation and exits.
// Without --file/--text the held-out corpus tests/data/eval/heldout.txt is used.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>

#include <CLI/CLI.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/eval/eval.h"
#include "launch/eval/report.h"
#include "launch/run_options.h"
#include "launch/threshold_calibration.h"
#include "parallel/status_macros.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {
namespace {

constexpr const char* kDefaultCorpus = "tests/data/eval/heldout.txt";
constexpr const char* kDefaultCalibration = "tests/data/eval/calibration.txt";

// Sets the threshold of every policy given as a rate ("threshold:rate=R"): the R-quantile of the
// key-norm scores of the calibration text (--calibration, else the corpus's calibration part,
// never the held-out text), printed on stderr. The scores are collected once per shift.
absl::Status ResolveThresholdRates(const EvalCommandOptions& args, const RunContext& ctx,
                                   std::vector<EvalPolicy>& policies) {
  std::optional<std::string> text;
  std::string source;
  std::map<int32_t, CalibrationScores> by_shift;
  for (EvalPolicy& p : policies) {
    if (!p.threshold_pending) continue;
    if (!text) {
      source = args.calibration;
      if (source.empty()) {
        std::optional<std::string> found = FindBesideSourceTree(kDefaultCalibration);
        if (!found) {
          return absl::NotFoundError(absl::StrCat("the calibration text ", kDefaultCalibration,
                                                  " was not found; pass --calibration F"));
        }
        source = *found;
      }
      DMSRT_ASSIGN_OR_RETURN(text, ReadWholeFile(source));
    }
    auto it = by_shift.find(p.config.threshold_shift);
    if (it == by_shift.end()) {
      BackendOptions bo = ctx.backend_options;
      bo.kv_policy = p.config;
      DMSRT_ASSIGN_OR_RETURN(CalibrationScores scores,
                             CollectCalibrationScores(*ctx.model, *ctx.tokenizer, bo, *text));
      it = by_shift.emplace(p.config.threshold_shift, std::move(scores)).first;
    }
    DMSRT_ASSIGN_OR_RETURN(ThresholdCalibration cal, ThresholdAtRate(it->second, p.threshold_rate));
    ResolveThresholdRate(&p, cal.threshold);
    std::fprintf(stderr, "dmsrt eval: %s (quantile of %lld key-norm scores over %lld tokens of %s)\n",
                 p.label.c_str(), static_cast<long long>(cal.scores),
                 static_cast<long long>(cal.tokens), source.c_str());
  }
  return absl::OkStatus();
}

// The default corpus next to the source tree the binary was built from, else ./tests/data/...
absl::StatusOr<std::string> DefaultCorpusPath() {
  if (std::optional<std::string> found = FindBesideSourceTree(kDefaultCorpus)) return *found;
  return absl::NotFoundError(
      absl::StrCat("the held-out corpus ", kDefaultCorpus, " was not found; pass --file F"));
}

// What the command line asks for beyond the model run options, checked.
struct EvalFlags {
  std::string file;  // empty: --text or the default corpus
  std::string text;
  bool has_text = false;
  std::string token_ids;  // --tokens

  int64_t max_tokens = 0;
  int64_t context = 0;
  std::vector<double> target_crs = {2, 4, 8};
  int32_t forced_window = 64;
  std::string policies;  // specs separated by ';'
  int32_t top_k = 64;
  PasskeyOptions passkey;
  bool json = false, quiet = false, add_bos = false;
  std::string json_out, svg;
  std::vector<std::string> merge;  // --merge: reports to combine instead of a run
};

// Maps the parsed command line to EvalFlags (the model run options are read by LoadRunContext).
absl::StatusOr<EvalFlags> ParseEvalFlags(const EvalCommandOptions& a) {
  EvalFlags f;
  f.file = a.file;
  f.has_text = a.text.has_value();
  f.text = a.text.value_or("");
  f.token_ids = a.tokens.value_or("");
  if (static_cast<int>(f.has_text) + static_cast<int>(!f.file.empty()) +
          static_cast<int>(a.tokens.has_value()) > 1) {
    return absl::InvalidArgumentError("give one of --file, --text and --tokens");
  }
  f.max_tokens = a.max_tokens;
  f.context = a.context;
  f.target_crs = a.target_cr;
  f.forced_window = a.forced_window;
  f.policies = a.policies;
  f.top_k = a.top_k;
  if (!a.no_passkey) {
    f.passkey.lengths = a.passkey_lengths;
    f.passkey.lengths.erase(std::remove(f.passkey.lengths.begin(), f.passkey.lengths.end(), 0),
                            f.passkey.lengths.end());
  }
  f.passkey.depths = a.passkey_depths;
  if (f.passkey.depths.empty()) return absl::InvalidArgumentError("--passkey-depths is empty");
  f.passkey.digits = a.passkey_digits;
  f.passkey.seed = static_cast<uint64_t>(a.passkey_seed);
  f.passkey.max_new_tokens = f.passkey.digits + 5;
  f.json = a.json;
  f.quiet = a.quiet;
  f.add_bos = a.add_bos;
  f.json_out = a.json_out;
  f.svg = a.svg;
  if (!a.merge.empty()) f.merge = absl::StrSplit(a.merge, ',', absl::SkipEmpty());
  return f;
}

absl::Status Output(const EvalFlags& flags, const EvalReport& report) {
  const nlohmann::json j = ReportJson(report);
  if (!flags.json_out.empty()) {
    std::ofstream out(flags.json_out);
    if (!out) return absl::InvalidArgumentError(absl::StrCat("cannot write ", flags.json_out));
    out << j.dump(1) << "\n";
  }
  if (!flags.svg.empty()) {
    std::ofstream out(flags.svg);
    if (!out) return absl::InvalidArgumentError(absl::StrCat("cannot write ", flags.svg));
    out << ReportSvg(report);
  }
  if (flags.json) {
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << ReportTable(report);
  }
  return absl::OkStatus();
}

absl::Status Eval(const EvalCommandOptions& args) {
  DMSRT_ASSIGN_OR_RETURN(EvalFlags flags, ParseEvalFlags(args));
  if (!flags.merge.empty()) {
    std::vector<nlohmann::json> reports;
    for (const std::string& path : flags.merge) {
      std::ifstream in(path);
      if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
      nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON"));
      reports.push_back(std::move(j));
    }
    DMSRT_ASSIGN_OR_RETURN(EvalReport merged, MergeReports(reports));
    return Output(flags, merged);
  }
  DMSRT_ASSIGN_OR_RETURN(RunContext ctx, LoadRunContext(args.run));
  if (!args.write_passkey_prompts.empty()) {
    DMSRT_ASSIGN_OR_RETURN(std::vector<PasskeyPrompt> prompts,
                           MakePasskeyPrompts(*ctx.tokenizer, flags.passkey));
    std::ofstream out(args.write_passkey_prompts);
    if (!out) return absl::InvalidArgumentError(absl::StrCat("cannot write ", args.write_passkey_prompts));
    out << PasskeyPromptsJson(flags.passkey, prompts).dump() << "\n";
    return absl::OkStatus();
  }

  std::string text = flags.text, label = "--text";
  std::vector<int32_t> ids;
  if (!flags.token_ids.empty()) {
    label = "--tokens";
    for (absl::string_view t : absl::StrSplit(flags.token_ids, ' ', absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(t, &id) || id < 0 || id >= ctx.model->config.vocab) {
        return absl::InvalidArgumentError(absl::StrCat("--tokens: '", t, "' is not a token id of this model"));
      }
      ids.push_back(id);
    }
  } else if (!flags.has_text) {
    std::string path = flags.file;
    if (path.empty()) {
      DMSRT_ASSIGN_OR_RETURN(path, DefaultCorpusPath());
    }
    DMSRT_ASSIGN_OR_RETURN(text, ReadWholeFile(path));
    label = std::filesystem::path(path).filename().string();
  }
  if (flags.token_ids.empty()) ids = ctx.tokenizer->Encode(text, /*parse_special=*/false, flags.add_bos);
  if (ids.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the evaluation text (", label, ") has ", ids.size(), " tokens; at least 2 are needed"));
  }
  if (flags.max_tokens > 0 && static_cast<int64_t>(ids.size()) > flags.max_tokens) {
    ids.resize(flags.max_tokens);
  }

  EvalOptions o;
  o.tokens = std::move(ids);
  o.text_label = label;
  o.context = flags.context;
  o.top_k = flags.top_k;
  o.prefill_chunk = ctx.prefill_chunk;
  o.max_positions = ctx.model->config.max_positions;
  o.vocab = ctx.model->config.vocab;
  o.passkey = flags.passkey;
  o.tokenizer = ctx.tokenizer.get();
  if (!flags.quiet) o.progress = [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  const int32_t dms_window = ctx.model->config.dms.enabled ? ctx.model->config.dms.window : 0;
  if (args.run.kv_policy.has_value() || args.run.dms_force_rate.has_value()) {
    const KvPolicyConfig& p = ctx.backend_options.kv_policy;
    o.policies.push_back({PolicyLabel(p), p});
  } else if (!flags.policies.empty()) {
    for (absl::string_view spec : absl::StrSplit(flags.policies, absl::ByAnyChar("; "), absl::SkipEmpty())) {
      DMSRT_ASSIGN_OR_RETURN(EvalPolicy p, ParsePolicySpec(std::string(spec), dms_window));
      o.policies.push_back(std::move(p));
    }
  } else {
    // The key-norm scorer needs the keys, which only the CPU store sees.
    o.policies = PolicyGrid(flags.target_crs, static_cast<int64_t>(o.tokens.size()),
                            flags.forced_window, /*threshold=*/ctx.backend == "cpu");
  }
  DMSRT_RETURN_IF_ERROR(ResolveThresholdRates(args, ctx, o.policies));
  // Rows of learned decisions name the adapter that made them, so merged reports keep them apart.
  for (EvalPolicy& p : o.policies) {
    if (p.config.kind == KvPolicyKind::kDms && !ctx.dms_adapter.empty()) {
      absl::StrAppend(&p.label, " ", std::filesystem::path(ctx.dms_adapter).stem().string());
    }
  }

  BackendFactory factory = [&ctx](const KvPolicyConfig& policy) {
    BackendOptions bo = ctx.backend_options;
    bo.kv_policy = policy;
    return MakeBackend(ctx.backend, *ctx.model, bo);
  };
  DMSRT_ASSIGN_OR_RETURN(EvalReport report, Evaluate(o, factory));

  return Output(flags, report);
}

}  // namespace

void SetupEval(CLI::App& app, EvalCommandOptions& o) {
  app.add_option("--file", o.file, "the evaluation text (default: tests/data/eval/heldout.txt)")
      ->type_name("FILE");
  app.add_option("--text", o.text, "evaluate this text instead");
  app.add_option("--tokens", o.tokens, "evaluate these token ids instead (\"1 2 3\")")->type_name("IDS");
  app.add_option("--max-tokens", o.max_tokens, "use at most this many tokens of the text (0: all)")
      ->transform(Integer(0));
  app.add_option("--context", o.context,
                 "protocol b: the context C compressed once (0: 7/8 of the text, whole chunks)")
      ->transform(Integer(0));
  app.add_option("--target-cr", o.target_cr,
                 "cache compression ratios of the default policy grid (window, tova, h2o, forced)")
      ->delimiter(',')
      ->type_name("X,X,...")
      ->transform(Number(1.0));
  app.add_option("--forced-window", o.forced_window, "the delay window of the grid's forced rows")
      ->transform(Integer(1));
  app.add_option("--policies", o.policies,
                 "policy specs instead of the grid: \"window:w=1020,s=4;tova:t=1024;h2o:t=512;"
                 "forced:r=0.9,w=64;dms\"")
      ->type_name("SPEC;...");
  app.add_option("--top-k", o.top_k, "dense log-probabilities kept per position for the KL")
      ->transform(Integer(1, 4096));
  app.add_option("--passkey-lengths", o.passkey_lengths, "passkey prompt lengths in tokens")
      ->delimiter(',')
      ->type_name("N,N,...")
      ->transform(Integer(0));
  app.add_option("--passkey-depths", o.passkey_depths, "needle depths (0 = start, 1 = end)")
      ->delimiter(',')
      ->type_name("X,X,...")
      ->transform(Number(0.0, 1.0));
  app.add_option("--passkey-digits", o.passkey_digits, "digits of the passkey")->transform(Integer(1, 18));
  app.add_option("--passkey-seed", o.passkey_seed, "seed of the haystacks and keys")->transform(Integer());
  app.add_flag("--no-passkey", o.no_passkey, "skip the passkey probe");
  app.add_flag("--json", o.json, "print one JSON object instead of the table");
  app.add_option("--json-out", o.json_out, "also write the JSON report here")->type_name("FILE");
  app.add_option("--svg", o.svg, "write the plot (quality against cache CR) here")->type_name("FILE");
  app.add_option("--merge", o.merge, "combine these reports instead of running a model")
      ->type_name("A.json,B.json");
  app.add_option("--calibration", o.calibration,
                 "calibration text of threshold rate specs (default: tests/data/eval/calibration.txt)")
      ->type_name("FILE");
  app.add_option("--write-passkey-prompts", o.write_passkey_prompts,
                 "write the passkey probe's prompts (token ids, keys) as JSON here and run nothing")
      ->type_name("FILE");
  app.add_flag("--quiet", o.quiet, "no progress lines on stderr");
  app.add_flag("--add-bos", o.add_bos, "put the BOS token before the text");
  AddRunOptions(app, &o.run);
}

int RunEval(const EvalCommandOptions& o, ProcessArgs&) {
  return CommandExit("eval", Eval(o), nullptr);
}

}  // namespace dmsrt
