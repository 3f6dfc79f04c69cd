// `dmsrt score`: teacher-forced evaluation of a text — perplexity, the top-1 prediction at
// every position, and optionally every logit (for comparison with another implementation).
//
//   dmsrt score (--text TEXT | --file F | --tokens "1 2 3") [options]   (dmsrt score --help)
//
// --dump-logits writes float32 little-endian [n_tokens, vocab]: row i is the distribution after
// tokens 0..i.
#include <cmath>
#include <cstdio>
#include <iostream>

#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/commands.h"
#include "launch/figures.h"
#include "launch/run_options.h"
#include "parallel/status_macros.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {
namespace {

absl::Status Score(const ScoreOptions& o, ProcessArgs& args, TpSession* tp) {
  DMSRT_ASSIGN_OR_RETURN(*tp, StartTp(o.tp, "score", o.run.backend, args));
  DMSRT_ASSIGN_OR_RETURN(RunContext ctx, LoadRunContext(o.run));
  std::vector<int32_t> ids;
  if (!o.tokens.empty()) {
    for (absl::string_view t : absl::StrSplit(o.tokens, ' ', absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(t, &id) || id < 0 || id >= ctx.model->config.vocab) {
        return absl::InvalidArgumentError(absl::StrCat("--tokens: '", t, "' is not a token id of this model"));
      }
      ids.push_back(id);
    }
  } else {
    std::string text = o.text;
    if (!o.file.empty()) {
      absl::StatusOr<std::string> file = ReadWholeFile(o.file);
      if (!file.ok()) return absl::NotFoundError(absl::StrCat("--file: ", file.status().message()));
      text = std::move(*file);
    }
    ids = ctx.tokenizer->Encode(text, /*parse_special=*/true, o.add_bos);
  }
  if (ids.size() < 2) return absl::InvalidArgumentError("score needs at least 2 tokens");

  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeRunBackend(ctx, *tp));
  if (backend == nullptr) return absl::OkStatus();  // a TP follower: the leader is done
  DMSRT_ASSIGN_OR_RETURN(SeqId seq, backend->kv().Create());
  std::ofstream dump;
  if (!o.dump_logits.empty()) {
    dump.open(o.dump_logits, std::ios::binary);
    if (!dump) return absl::InvalidArgumentError(absl::StrCat("cannot write ", o.dump_logits));
  }
  std::vector<int32_t> top1;
  double nll = 0;
  int64_t scored = 0;
  for (size_t at = 0; at < ids.size(); at += ctx.prefill_chunk) {
    size_t end = std::min(ids.size(), at + ctx.prefill_chunk);
    SeqChunk c;
    c.seq = seq;
    c.tokens.assign(ids.begin() + at, ids.begin() + end);
    c.logits = SeqChunk::Logits::kAll;
    DMSRT_ASSIGN_OR_RETURN(ForwardResult fr, backend->Forward({c}));
    const int32_t vocab = fr.vocab;
    for (size_t r = 0; r < c.tokens.size(); ++r) {
      const float* row = fr.logits.data() + r * vocab;
      if (dump) dump.write(reinterpret_cast<const char*>(row), sizeof(float) * vocab);
      int32_t best = 0;
      float mx = row[0];
      for (int32_t v = 1; v < vocab; ++v) {
        if (row[v] > mx) mx = row[v], best = v;
      }
      top1.push_back(best);
      size_t pos = at + r;
      if (pos + 1 < ids.size()) {
        double sum = 0;
        for (int32_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
        nll -= static_cast<double>(row[ids[pos + 1]]) - mx - std::log(sum);
        ++scored;
      }
    }
  }
  const double ppl = std::exp(nll / scored);
  KvFigures figs = backend->kv().Figures(seq);
  if (o.json) {
    nlohmann::json j = {{"token_ids", ids}, {"top1", top1}, {"tokens", ids.size()},
                        {"perplexity", ppl}, {"mean_nll", nll / scored}};
    j.update(FiguresJson(figs, backend->kv().geometry().n_kv_heads, false));
    std::cout << j.dump() << std::endl;
  } else {
    std::printf("%zu tokens, perplexity %.4f (mean NLL %.4f nats)\n%s\n", ids.size(), ppl,
                nll / scored, FiguresLine(figs, KvPolicyName(ctx.backend_options.kv_policy.kind)).c_str());
  }
  return backend->kv().Free(seq);
}

}  // namespace

void SetupScore(CLI::App& app, ScoreOptions& o) {
  app.add_option("--text", o.text, "the text to score");
  app.add_option("--file", o.file, "score this file's text instead")->type_name("FILE");
  app.add_option("--tokens", o.tokens, "score these token ids instead (\"1 2 3\")")->type_name("IDS");
  app.add_option("--dump-logits", o.dump_logits,
                 "write every logit: float32 little-endian [n_tokens, vocab]; row i follows tokens 0..i")
      ->type_name("FILE");
  app.add_flag("--json", o.json, "print one JSON object");
  app.add_flag("--add-bos", o.add_bos, "put the BOS token before the text");
  AddRunOptions(app, &o.run);
  AddTpOptions(app, &o.tp, "tensor-parallel degree: mpirun -np N dmsrt score --tp N (0: the number of ranks)");
}

int RunScore(const ScoreOptions& o, ProcessArgs& args) {
  TpSession tp;
  absl::Status s = Score(o, args, &tp);
  return CommandExit("score", s, &tp);
}

}  // namespace dmsrt
