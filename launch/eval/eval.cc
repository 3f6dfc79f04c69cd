#include "launch/eval/eval.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <map>
#include <optional>
#include <queue>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "launch/eval/probes.h"
#include "launch/eval/svg_plot.h"
#include "runtime/kv/policy_threshold.h"
#include "parallel/status_macros.h"

namespace dmsrt {

// ---- policies ------------------------------------------------------------------------------------

std::string PolicyLabel(const KvPolicyConfig& p) {
  switch (p.kind) {
    case KvPolicyKind::kNone: return "none";
    case KvPolicyKind::kDms: return absl::StrFormat("dms w=%d", p.window);
    case KvPolicyKind::kForced:
      return absl::StrFormat("forced r=%.3g w=%d", p.force_rate, p.window);
    case KvPolicyKind::kWindow: return absl::StrFormat("window w=%d s=%d", p.window, p.sinks);
    case KvPolicyKind::kTova: return absl::StrFormat("tova t=%d", p.budget_tokens);
    case KvPolicyKind::kH2o: return absl::StrFormat("h2o t=%d", p.budget_tokens);
    case KvPolicyKind::kThreshold:
      return absl::StrCat(absl::StrFormat("threshold t=%.4g w=%d", p.threshold, p.window),
                          p.threshold_shift != 0 ? absl::StrFormat(" shift=%d", p.threshold_shift)
                                                 : std::string());
  }
  return "?";
}

namespace {
// A threshold policy given as a rate, before its threshold is known.
std::string ThresholdRateLabel(const EvalPolicy& p) {
  return absl::StrFormat("threshold rate=%.3g w=%d", p.threshold_rate, p.config.window);
}
}  // namespace

void ResolveThresholdRate(EvalPolicy* p, double threshold) {
  p->config.threshold = threshold;
  p->threshold_pending = false;
  p->label = absl::StrCat(PolicyLabel(p->config), absl::StrFormat(" rate=%.3g", p->threshold_rate));
}

absl::StatusOr<EvalPolicy> ParsePolicySpec(const std::string& spec, int32_t dms_window) {
  std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits(':', 1));
  EvalPolicy out;
  DMSRT_ASSIGN_OR_RETURN(out.config.kind, ParseKvPolicy(parts[0]));
  std::map<std::string, double> kv;
  if (parts.size() > 1) {
    for (absl::string_view item : absl::StrSplit(parts[1], ',', absl::SkipEmpty())) {
      std::vector<std::string> nv = absl::StrSplit(item, absl::MaxSplits('=', 1));
      double v;
      if (nv.size() != 2 || !absl::SimpleAtod(nv[1], &v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("policy '", spec, "': '", item, "' is not NAME=NUMBER"));
      }
      kv[nv[0]] = v;
    }
  }
  std::set<std::string> allowed;
  KvPolicyConfig& c = out.config;
  auto take = [&](const std::string& name, double def) {
    allowed.insert(name);
    auto it = kv.find(name);
    return it == kv.end() ? def : it->second;
  };
  switch (c.kind) {
    case KvPolicyKind::kNone: break;
    case KvPolicyKind::kDms:
      if (dms_window < 1) {
        return absl::InvalidArgumentError(
            "policy dms needs a model with DMS decisions (or --dms-adapter)");
      }
      c.window = dms_window;
      break;
    case KvPolicyKind::kForced:
      c.force_rate = take("r", 0.875);
      c.window = static_cast<int32_t>(take("w", 512));
      c.seed = static_cast<uint64_t>(take("seed", 0));
      if (!(c.force_rate >= 0 && c.force_rate <= 1) || c.window < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("policy '", spec, "': forced needs r in [0, 1] and w >= 1"));
      }
      break;
    case KvPolicyKind::kWindow:
      c.window = static_cast<int32_t>(take("w", 512));
      c.sinks = static_cast<int32_t>(take("s", 4));
      if (c.window < 1 || c.sinks < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("policy '", spec, "': window needs w >= 1 and s >= 0"));
      }
      break;
    case KvPolicyKind::kTova:
    case KvPolicyKind::kH2o:
      c.budget_tokens = static_cast<int32_t>(take("t", 512));
      if (c.budget_tokens < 2) {
        return absl::InvalidArgumentError(absl::StrCat("policy '", spec, "': needs t >= 2"));
      }
      break;
    case KvPolicyKind::kThreshold: {
      c.window = static_cast<int32_t>(take("w", kThresholdDefaultWindow));
      c.threshold_shift = static_cast<int32_t>(take("shift", 0));
      const bool has_t = kv.count("t") > 0, has_rate = kv.count("rate") > 0;
      c.threshold = take("t", 0);
      out.threshold_rate = take("rate", -1);
      out.threshold_pending = has_rate;
      if (has_t == has_rate || c.window < 1 || (c.threshold_shift != 0 && c.threshold_shift != 1) ||
          (has_rate && !(out.threshold_rate >= 0 && out.threshold_rate <= 1))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "policy '", spec, "': threshold needs one of t=SCORE and rate=R (R in [0, 1]), w >= 1 "
            "and shift 0 or 1"));
      }
      break;
    }
  }
  for (const auto& [name, v] : kv) {
    if (!allowed.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "policy '", spec, "': unknown setting '", name,
          "' (window: w, s; tova/h2o: t; forced: r, w, seed; threshold: t or rate, w, shift; "
          "none/dms: nothing)"));
    }
  }
  out.label = out.threshold_rate >= 0 ? ThresholdRateLabel(out) : PolicyLabel(c);
  return out;
}

std::vector<EvalPolicy> PolicyGrid(const std::vector<double>& target_crs, int64_t length,
                                   int32_t forced_window, bool threshold) {
  std::vector<EvalPolicy> out;
  auto add = [&](KvPolicyConfig c) { out.push_back({PolicyLabel(c), c}); };
  for (double cr : target_crs) {
    if (!(cr > 1)) continue;
    const int64_t keep = static_cast<int64_t>(std::llround(length / cr));
    if (keep < 8) continue;
    KvPolicyConfig w;
    w.kind = KvPolicyKind::kWindow;
    w.sinks = 4;
    w.window = static_cast<int32_t>(keep - w.sinks);
    add(w);
    KvPolicyConfig t;
    t.kind = KvPolicyKind::kTova;
    t.budget_tokens = static_cast<int32_t>(keep);
    add(t);
    t.kind = KvPolicyKind::kH2o;
    add(t);
    // forced: resident ~ w + (L - w)(1 - r) (the window is always held).
    if (keep > forced_window && length > forced_window) {
      KvPolicyConfig f;
      f.kind = KvPolicyKind::kForced;
      f.window = forced_window;
      const double r = 1.0 - static_cast<double>(keep - forced_window) / (length - forced_window);
      f.force_rate = std::round(r * 1000) / 1000;
      add(f);
      if (threshold) {
        EvalPolicy th;
        th.config.kind = KvPolicyKind::kThreshold;
        th.config.window = forced_window;
        th.threshold_rate = f.force_rate;
        th.threshold_pending = true;
        th.label = ThresholdRateLabel(th);
        out.push_back(th);
      }
    }
  }
  return out;
}

// ---- passes --------------------------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// What the dense pass keeps per position: top-k ids and log-probs, the log of the mass outside.
struct DenseRef {
  int32_t k = 0;
  std::vector<int32_t> ids;   // [positions, k]
  std::vector<double> lp;     // [positions, k]
  std::vector<double> lp_rest;
  std::vector<int32_t> top1;
};

struct PassOut {
  std::vector<double> nll;      // per prediction pos (0 .. L-2)
  std::vector<double> kl;
  std::vector<uint8_t> agree;
  KvFigures at_context, at_end;
  double seconds = 0;
  double tail_mass = 0;  // dense only: mean p_rest
  // Protocol b's own continuation on a frozen fork (positions before the context copied from this
  // pass), or null when protocol b reads this pass.
  std::unique_ptr<PassOut> b;
};

// Indices of the k largest values of row[0..n) (ties: any), largest first.
void TopK(const float* row, int32_t n, int32_t k, std::vector<int32_t>& out) {
  using E = std::pair<float, int32_t>;
  std::priority_queue<E, std::vector<E>, std::greater<E>> heap;  // min-heap of the best k
  for (int32_t v = 0; v < n; ++v) {
    if (static_cast<int32_t>(heap.size()) < k) {
      heap.emplace(row[v], v);
    } else if (row[v] > heap.top().first) {
      heap.pop();
      heap.emplace(row[v], v);
    }
  }
  out.resize(heap.size());
  for (int32_t i = static_cast<int32_t>(heap.size()) - 1; i >= 0; --i) {
    out[i] = heap.top().second;
    heap.pop();
  }
}

// Scores the rows of one forward result (positions at .. at+rows-1) into `out`: the negative
// log-likelihood of the next token, and with `make_ref` the dense top-k reference, or with `ref`
// the KL and top-1 agreement against it. With `make_ref`, adds the dense tail mass to *tail_sum.
void ScoreRows(const ForwardResult& fr, const std::vector<int32_t>& tokens, int64_t at,
               int64_t rows, DenseRef* make_ref, const DenseRef* ref, PassOut& out,
               std::vector<int32_t>& top, double* tail_sum) {
  const int64_t L = static_cast<int64_t>(tokens.size());
  const int32_t vocab = fr.vocab;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = at + r;
    if (pos + 1 >= L) break;
    const float* row = fr.logits.data() + r * vocab;
    int32_t best = 0;
    float mx = row[0];
    for (int32_t v = 1; v < vocab; ++v) {
      if (row[v] > mx) mx = row[v], best = v;
    }
    double total = 0;
    for (int32_t v = 0; v < vocab; ++v) total += std::exp(static_cast<double>(row[v]) - mx);
    const double lse = mx + std::log(total);
    out.nll[pos] = lse - row[tokens[pos + 1]];
    if (make_ref != nullptr) {
      const int32_t k = make_ref->k;
      TopK(row, vocab, k, top);
      double top_sum = 0;
      for (int32_t i = 0; i < k; ++i) {
        make_ref->ids[pos * k + i] = top[i];
        make_ref->lp[pos * k + i] = row[top[i]] - lse;
        top_sum += std::exp(static_cast<double>(row[top[i]]) - mx);
      }
      const double rest = std::max(total - top_sum, total * 1e-300);
      make_ref->lp_rest[pos] = std::log(rest / total);
      make_ref->top1[pos] = best;
      *tail_sum += rest / total;
      out.agree[pos] = 1;
    }
    if (ref != nullptr) {
      const int32_t k = ref->k;
      double kl = 0, top_sum = 0;
      for (int32_t i = 0; i < k; ++i) {
        const int32_t id = ref->ids[pos * k + i];
        const double lq = row[id] - lse;
        const double lp = ref->lp[pos * k + i];
        top_sum += std::exp(static_cast<double>(row[id]) - mx);
        kl += std::exp(lp) * (lp - lq);
      }
      const double lq_rest = std::log(std::max(total - top_sum, total * 1e-300) / total);
      const double lp_rest = ref->lp_rest[pos];
      kl += std::exp(lp_rest) * (lp_rest - lq_rest);
      out.kl[pos] = kl;
      out.agree[pos] = best == ref->top1[pos];
    }
  }
}

// Runs `tokens` through `backend` in chunks, cut at `context`. With `make_ref` the top-k reference
// is recorded; with `ref` the KL and top-1 agreement against it are computed. With `frozen_b`
// protocol b gets its own continuation: the sequence is forked at `context`, the fork's eviction
// is frozen (KvCache::FreezeEviction: compress once, then continue) and the continuation runs on
// it into out.b; without it (or where the cache cannot freeze) protocol b reads the streaming
// pass, which keeps evicting during the continuation.
absl::StatusOr<PassOut> RunTextPass(Backend& backend, const std::vector<int32_t>& tokens,
                                    int64_t context, int32_t chunk, DenseRef* make_ref,
                                    const DenseRef* ref, bool frozen_b) {
  const int64_t L = static_cast<int64_t>(tokens.size());
  PassOut out;
  out.nll.assign(L - 1, 0.0);
  out.kl.assign(L - 1, 0.0);
  out.agree.assign(L - 1, 0);
  if (make_ref != nullptr) {
    make_ref->ids.assign((L - 1) * make_ref->k, 0);
    make_ref->lp.assign((L - 1) * make_ref->k, 0.0);
    make_ref->lp_rest.assign(L - 1, 0.0);
    make_ref->top1.assign(L - 1, 0);
  }
  const auto t0 = Clock::now();
  DMSRT_ASSIGN_OR_RETURN(SeqId seq, backend.kv().Create());
  std::vector<int32_t> top;
  double tail_sum = 0;
  absl::Status st;
  std::optional<SeqId> frozen;
  // Tokens [from, to) of `s` in chunks, scored into `dst`.
  auto run = [&](SeqId s, int64_t from, int64_t to, DenseRef* mk, PassOut& dst, double* tail) {
    for (int64_t at = from; at < to;) {
      const int64_t stop = at < context ? context : to;
      const int64_t end = std::min(stop, at + chunk);
      SeqChunk c = MakeChunk(s, std::vector<int32_t>(tokens.begin() + at, tokens.begin() + end),
                             SeqChunk::Logits::kAll);
      absl::StatusOr<ForwardResult> fr = backend.Forward({c});
      if (!fr.ok()) return fr.status();
      ScoreRows(*fr, tokens, at, end - at, mk, ref, dst, top, tail);
      at = end;
      if (&dst == &out && at == context) {
        out.at_context = backend.kv().Figures(s);
        if (frozen_b && context < L) {
          DMSRT_ASSIGN_OR_RETURN(SeqId f, backend.kv().Fork(s));
          const absl::Status fz = backend.kv().FreezeEviction(f);
          if (fz.ok()) {
            frozen = f;
          } else if (fz.code() == absl::StatusCode::kUnimplemented) {
            DMSRT_RETURN_IF_ERROR(backend.kv().Free(f));  // protocol b reads the streaming pass
          } else {
            return fz;
          }
        }
      }
    }
    return absl::OkStatus();
  };
  st = run(seq, 0, L, make_ref, out, &tail_sum);
  out.at_end = backend.kv().Figures(seq);
  absl::Status freed = backend.kv().Free(seq);
  if (frozen.has_value()) {  // freed whether or not the streaming pass got to the end
    if (st.ok()) {
      out.b = std::make_unique<PassOut>();
      out.b->nll = out.nll;
      out.b->kl = out.kl;
      out.b->agree = out.agree;
      st = run(*frozen, context, L, nullptr, *out.b, nullptr);  // no reference made: no tail
    }
    const absl::Status fb = backend.kv().Free(*frozen);
    if (st.ok()) st = fb;
  }
  DMSRT_RETURN_IF_ERROR(st);
  DMSRT_RETURN_IF_ERROR(freed);
  out.seconds = Since(t0);
  out.tail_mass = tail_sum / std::max<int64_t>(1, L - 1);
  return out;
}

TextRow MakeRow(const EvalPolicy& p, char protocol, const PassOut& pass, int64_t L, int64_t C) {
  TextRow row;
  row.policy = p.label;
  row.config = p.config;
  row.protocol = protocol;
  row.length = L;
  row.context = protocol == 'b' ? C : 0;
  // Predictions scored: a: 0..L-2 (tokens 1..L-1); b: C-1..L-2 (the continuation C..L-1).
  const int64_t first = protocol == 'b' ? C - 1 : 0;
  const PassOut& scored = protocol == 'b' && pass.b ? *pass.b : pass;
  row.frozen_continuation = protocol == 'b' && pass.b != nullptr;
  double nll = 0, kl = 0, agree = 0;
  for (int64_t i = first; i < L - 1; ++i) {
    nll += scored.nll[i];
    kl += scored.kl[i];
    agree += scored.agree[i];
  }
  row.scored = L - 1 - first;
  row.mean_nll = nll / row.scored;
  row.perplexity = std::exp(row.mean_nll);
  row.kl = kl / row.scored;
  row.top1_agreement = agree / row.scored;
  const KvFigures& f = protocol == 'b' ? pass.at_context : pass.at_end;
  row.cr_length = protocol == 'b' ? C : L;
  row.cache_cr = f.cache_cr();
  row.eviction_rate = f.eviction_rate();
  row.asymptotic_cr = f.asymptotic_cr();
  row.block_cr = f.block_cr();
  row.resident_tokens = f.resident_tokens;
  row.logical_tokens = f.logical_tokens;
  row.seconds = pass.seconds;
  return row;
}

// One greedy passkey trial on a fresh sequence.
absl::StatusOr<PasskeyRow> RunPasskey(Backend& backend, const Tokenizer& tok,
                                      const PasskeyPrompt& prompt, int32_t chunk,
                                      int32_t max_new) {
  PasskeyRow row;
  row.key = prompt.key;
  row.length = static_cast<int32_t>(prompt.tokens.size());
  DMSRT_ASSIGN_OR_RETURN(SeqId seq, backend.kv().Create());
  absl::Status st;
  std::vector<int32_t> answer;
  auto argmax = [](const ForwardResult& fr, size_t r) {
    const float* row = fr.logits.data() + r * fr.vocab;
    return static_cast<int32_t>(std::max_element(row, row + fr.vocab) - row);
  };
  const int64_t n = static_cast<int64_t>(prompt.tokens.size());
  int32_t next = -1;
  for (int64_t at = 0; at < n && st.ok(); at += chunk) {
    const int64_t end = std::min(n, at + chunk);
    SeqChunk c = MakeChunk(
        seq, std::vector<int32_t>(prompt.tokens.begin() + at, prompt.tokens.begin() + end),
        end == n ? SeqChunk::Logits::kLast : SeqChunk::Logits::kNone);
    absl::StatusOr<ForwardResult> fr = backend.Forward({c});
    if (!fr.ok()) {
      st = fr.status();
    } else if (end == n) {
      next = argmax(*fr, 0);
    }
  }
  if (st.ok()) row.cache_cr = backend.kv().Figures(seq).cache_cr();
  for (int32_t i = 0; i < max_new && st.ok(); ++i) {
    if (tok.IsEndOfGeneration(next)) break;
    answer.push_back(next);
    if (PasskeyCorrect(tok.Decode(answer), prompt.key)) break;
    absl::StatusOr<ForwardResult> fr = backend.Forward({MakeChunk(seq, {next})});
    if (!fr.ok()) {
      st = fr.status();
    } else {
      next = argmax(*fr, 0);
    }
  }
  absl::Status freed = backend.kv().Free(seq);
  DMSRT_RETURN_IF_ERROR(st);
  DMSRT_RETURN_IF_ERROR(freed);
  row.answer = tok.Decode(answer);
  row.correct = PasskeyCorrect(row.answer, prompt.key);
  return row;
}

}  // namespace

absl::StatusOr<std::vector<PasskeyPrompt>> MakePasskeyPrompts(const Tokenizer& tok,
                                                              const PasskeyOptions& o) {
  std::vector<PasskeyPrompt> prompts;
  for (int32_t len : o.lengths) {
    for (double d : o.depths) {
      DMSRT_ASSIGN_OR_RETURN(PasskeyPrompt p,
                             MakePasskeyPrompt(tok, len, d, PasskeyKey(o.seed, len, d, o.digits)));
      prompts.push_back(std::move(p));
    }
  }
  return prompts;
}

nlohmann::json PasskeyPromptsJson(const PasskeyOptions& o,
                                  const std::vector<PasskeyPrompt>& prompts) {
  nlohmann::json list = nlohmann::json::array();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const PasskeyPrompt& p = prompts[i];
    list.push_back({{"length", p.tokens.size()},
                    {"depth", o.depths[i % o.depths.size()]},
                    {"key", p.key},
                    {"needle_token", p.needle_token},
                    {"question_token", p.question_token},
                    {"tokens", p.tokens}});
  }
  return {{"max_new_tokens", o.max_new_tokens}, {"digits", o.digits}, {"seed", o.seed},
          {"prompts", list}};
}

absl::StatusOr<EvalReport> Evaluate(const EvalOptions& o, const BackendFactory& factory) {
  const int64_t L = static_cast<int64_t>(o.tokens.size());
  if (L < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("the evaluation text has ", L, " tokens; at least 2 are needed"));
  }
  if (o.max_positions > 0 && L > o.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the evaluation text has ", L, " tokens, longer than the model's context of ",
        o.max_positions, " tokens; cut it (--max-tokens)"));
  }
  for (int32_t len : o.passkey.lengths) {
    if (o.max_positions > 0 && len > o.max_positions) {
      return absl::InvalidArgumentError(absl::StrCat("passkey length ", len,
                                                     " is longer than the model's context of ",
                                                     o.max_positions, " tokens"));
    }
  }
  if (o.vocab < 1) return absl::InvalidArgumentError("the model's vocabulary size is not set");
  for (int32_t id : o.tokens) {
    if (id < 0 || id >= o.vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
    }
  }
  if (o.prefill_chunk < 1) return absl::InvalidArgumentError("prefill chunk must be >= 1");
  for (const EvalPolicy& p : o.policies) {
    if (p.threshold_pending) {
      return absl::InvalidArgumentError(absl::StrCat(
          "policy '", p.label, "': its threshold was not calibrated (ResolveThresholdRate)"));
    }
  }
  if (o.top_k < 1) return absl::InvalidArgumentError("top-k must be >= 1");
  int64_t C = o.context;
  if (C == 0) {
    C = L * 7 / 8;
    if (C >= o.prefill_chunk) C -= C % o.prefill_chunk;
    C = std::max<int64_t>(1, C);
  }
  if (C < 1 || C >= L) {
    return absl::InvalidArgumentError(absl::StrCat(
        "protocol b context ", C, " must be in 1..", L - 1, " (the text has ", L, " tokens)"));
  }
  if (!o.passkey.lengths.empty() && o.tokenizer == nullptr) {
    return absl::InvalidArgumentError("the passkey probe needs the model's tokenizer");
  }
  std::vector<PasskeyPrompt> prompts;
  if (!o.passkey.lengths.empty()) {
    DMSRT_ASSIGN_OR_RETURN(prompts, MakePasskeyPrompts(*o.tokenizer, o.passkey));
  }

  EvalReport rep;
  rep.length = L;
  rep.context = C;
  rep.top_k = o.top_k;
  rep.text_label = o.text_label;
  auto say = [&](const std::string& s) {
    if (o.progress) o.progress(s);
  };

  std::vector<EvalPolicy> policies;
  policies.push_back({"none", KvPolicyConfig{}});
  for (const EvalPolicy& p : o.policies) {
    if (p.config.kind != KvPolicyKind::kNone) policies.push_back(p);
  }
  DenseRef ref;
  ref.k = std::min<int32_t>(o.top_k, o.vocab);
  for (size_t i = 0; i < policies.size(); ++i) {
    const EvalPolicy& p = policies[i];
    DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, factory(p.config));
    DMSRT_ASSIGN_OR_RETURN(PassOut pass,
                           RunTextPass(*backend, o.tokens, C, o.prefill_chunk,
                                       i == 0 ? &ref : nullptr, i == 0 ? nullptr : &ref,
                                       /*frozen_b=*/i != 0));
    if (i == 0) {
      rep.dense_seconds = pass.seconds;
      rep.dense_tail_mass = pass.tail_mass;
    }
    rep.rows.push_back(MakeRow(p, 'a', pass, L, C));
    rep.rows.push_back(MakeRow(p, 'b', pass, L, C));
    say(absl::StrFormat("%-22s text pass: %lld tokens in %.1f s, cache CR %.2fx, ppl %.3f",
                        p.label, static_cast<long long>(L), pass.seconds,
                        rep.rows[rep.rows.size() - 2].cache_cr, rep.rows[rep.rows.size() - 2].perplexity));
    const auto t0 = Clock::now();
    int correct = 0;
    for (const PasskeyPrompt& pr : prompts) {
      DMSRT_ASSIGN_OR_RETURN(PasskeyRow row, RunPasskey(*backend, *o.tokenizer, pr,
                                                        o.prefill_chunk, o.passkey.max_new_tokens));
      row.policy = p.label;
      const size_t idx = &pr - prompts.data();
      row.depth = o.passkey.depths[idx % o.passkey.depths.size()];
      correct += row.correct;
      rep.passkey.push_back(std::move(row));
    }
    if (!prompts.empty()) {
      say(absl::StrFormat("%-22s passkey: %d/%zu correct in %.1f s", p.label, correct,
                          prompts.size(), Since(t0)));
    }
  }
  return rep;
}

// ---- reports -------------------------------------------------------------------------------------

std::string RowKind(const TextRow& t) {
  return t.external_kind.empty() ? std::string(KvPolicyName(t.config.kind)) : t.external_kind;
}

namespace {

// The dense kind of a row's implementation: "none", or "IMPL:none" for an external "IMPL:NAME".
std::string DenseKindOf(const std::string& kind) {
  const size_t colon = kind.find(':');
  return colon == std::string::npos ? "none" : kind.substr(0, colon) + ":none";
}

bool IsDenseKind(const std::string& kind) { return DenseKindOf(kind) == kind; }

}  // namespace

nlohmann::json ReportJson(const EvalReport& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const TextRow& t : r.rows) {
    rows.push_back({{"policy", t.policy},
                    {"kind", RowKind(t)},
                    {"protocol", std::string(1, t.protocol)},
                    {"protocol_name", t.protocol == 'a' ? "streaming" : "compress-then-continue"},
                    {"frozen_continuation", t.frozen_continuation},
                    {"length", t.length},
                    {"context", t.context},
                    {"scored", t.scored},
                    {"perplexity", t.perplexity},
                    {"mean_nll", t.mean_nll},
                    {"kl", t.kl},
                    {"top1_agreement", t.top1_agreement},
                    {"cr_length", t.cr_length},
                    {"cache_cr", t.cache_cr},
                    {"eviction_rate", t.eviction_rate},
                    {"asymptotic_cr", t.asymptotic_cr},
                    {"block_cr", t.block_cr},
                    {"resident_tokens", t.resident_tokens},
                    {"logical_tokens", t.logical_tokens},
                    {"seconds", t.seconds},
                    {"source", t.source}});
    for (const auto& [key, value] : t.extra.items()) {
      if (!rows.back().contains(key)) rows.back()[key] = value;
    }
  }
  nlohmann::json pk = nlohmann::json::array();
  for (const PasskeyRow& p : r.passkey) {
    pk.push_back({{"policy", p.policy}, {"length", p.length}, {"depth", p.depth},
                  {"key", p.key}, {"answer", p.answer}, {"correct", p.correct},
                  {"cache_cr", p.cache_cr}});
  }
  return {{"text", r.text_label},     {"length", r.length},
          {"context", r.context},     {"top_k", r.top_k},
          {"kl_definition", "top-k + remainder bucket (lower bound of the full KL)"},
          {"dense_seconds", r.dense_seconds}, {"dense_tail_mass", r.dense_tail_mass},
          {"rows", rows},             {"passkey", pk}};
}

absl::StatusOr<EvalReport> MergeReports(const std::vector<nlohmann::json>& reports) {
  EvalReport out;
  std::set<std::pair<std::string, std::string>> seen_rows;  // (policy, protocol)
  std::set<std::string> seen_passkey;                       // policy
  try {
    for (const nlohmann::json& j : reports) {
      if (out.length == 0) {
        out.length = j.at("length").get<int64_t>();
        out.context = j.at("context").get<int64_t>();
        out.top_k = j.at("top_k").get<int32_t>();
        out.text_label = j.at("text").get<std::string>();
        out.dense_seconds = j.value("dense_seconds", 0.0);
        out.dense_tail_mass = j.value("dense_tail_mass", 0.0);
      }
      // Text rows only from reports on the first report's text, length and context.
      const bool same_text = j.at("length").get<int64_t>() == out.length &&
                             j.at("context").get<int64_t>() == out.context &&
                             j.at("text").get<std::string>() == out.text_label;
      for (const nlohmann::json& x : j.at("rows")) {
        if (!same_text) break;
        TextRow t;
        t.policy = x.at("policy").get<std::string>();
        const std::string proto = x.at("protocol").get<std::string>();
        if (!seen_rows.insert({t.policy, proto}).second) continue;
        const std::string kind_name = x.at("kind").get<std::string>();
        if (kind_name.find(':') != std::string::npos) {
          t.external_kind = kind_name;  // another implementation's "IMPL:NAME"
        } else {
          auto kind = ParseKvPolicy(kind_name);
          if (!kind.ok()) return kind.status();
          t.config.kind = *kind;
        }
        t.source = x.value("source", std::string("dmsrt"));
        t.protocol = proto.empty() ? 'a' : proto[0];
        t.frozen_continuation = x.value("frozen_continuation", false);
        t.length = x.at("length").get<int64_t>();
        t.context = x.at("context").get<int64_t>();
        t.scored = x.at("scored").get<int64_t>();
        t.perplexity = x.at("perplexity").get<double>();
        t.mean_nll = x.at("mean_nll").get<double>();
        t.kl = x.at("kl").get<double>();
        t.top1_agreement = x.at("top1_agreement").get<double>();
        t.cr_length = x.at("cr_length").get<int64_t>();
        t.cache_cr = x.at("cache_cr").get<double>();
        t.eviction_rate = x.value("eviction_rate", 0.0);
        t.asymptotic_cr = x.value("asymptotic_cr", 0.0);
        t.block_cr = x.value("block_cr", 0.0);
        t.resident_tokens = x.value("resident_tokens", int64_t{0});
        t.logical_tokens = x.value("logical_tokens", int64_t{0});
        t.seconds = x.value("seconds", 0.0);
        static const std::set<std::string> kKnown = {
            "policy", "kind", "protocol", "protocol_name", "length", "context", "scored",
            "perplexity", "mean_nll", "kl", "top1_agreement", "cr_length", "cache_cr",
            "eviction_rate", "asymptotic_cr", "block_cr", "resident_tokens", "logical_tokens",
            "seconds", "source"};
        for (const auto& [key, value] : x.items()) {
          if (!kKnown.count(key)) t.extra[key] = value;
        }
        out.rows.push_back(std::move(t));
      }
      std::set<std::string> here;
      for (const nlohmann::json& x : j.at("passkey")) {
        PasskeyRow p;
        p.policy = x.at("policy").get<std::string>();
        if (seen_passkey.count(p.policy)) continue;
        here.insert(p.policy);
        p.length = x.at("length").get<int32_t>();
        p.depth = x.at("depth").get<double>();
        p.key = x.at("key").get<std::string>();
        p.answer = x.at("answer").get<std::string>();
        p.correct = x.at("correct").get<bool>();
        p.cache_cr = x.at("cache_cr").get<double>();
        out.passkey.push_back(std::move(p));
      }
      seen_passkey.insert(here.begin(), here.end());
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("not an eval report: ", e.what()));
  }
  if (reports.empty()) return absl::InvalidArgumentError("no reports to merge");
  return out;
}

std::string ReportTable(const EvalReport& r) {
  std::string s = absl::StrFormat(
      "text: %s, %lld tokens; protocol a = streaming (scored 1..L-1, CR at L=%lld); protocol b = "
      "compress-then-continue (context C=%lld, scored C..L-1, CR at C; the cache is frozen after C, "
      "nothing leaves; a row marked b~ kept evicting during the continuation)\nKL(dense || policy) per "
      "token over the dense top-%d + remainder (dense mass outside the top-%d: %.4f)\n\n",
      r.text_label, static_cast<long long>(r.length), static_cast<long long>(r.length),
      static_cast<long long>(r.context), r.top_k, r.top_k, r.dense_tail_mass);
  int w = 22;  // the policy column: as wide as the longest label
  for (const TextRow& t : r.rows) w = std::max(w, static_cast<int>(t.policy.size()));
  absl::StrAppend(&s, absl::StrFormat("%-*s %-2s %9s %7s %9s %9s %8s %7s\n", w, "policy", "p",
                                      "cache CR", "at", "ppl", "KL", "top1", "sec"));
  for (const TextRow& t : r.rows) {
    const bool streaming_b = t.protocol == 'b' && !t.frozen_continuation && t.external_kind.empty() &&
                             t.config.kind != KvPolicyKind::kNone;
    const std::string proto = streaming_b ? "b~" : std::string(1, t.protocol);
    absl::StrAppend(&s, absl::StrFormat("%-*s %-2s %8.2fx %7lld %9.3f %9.5f %8.4f %7.1f\n", w,
                                        t.policy, proto, t.cache_cr,
                                        static_cast<long long>(t.cr_length), t.perplexity, t.kl,
                                        t.top1_agreement, t.seconds));
  }
  if (!r.passkey.empty()) {
    // policy x length: correct / trials, mean CR.
    struct Cell {
      int correct = 0, trials = 0;
      double cr = 0;
    };
    std::vector<std::string> order;
    std::map<std::string, std::map<int32_t, Cell>> cells;
    std::set<int32_t> lengths;
    for (const PasskeyRow& p : r.passkey) {
      if (!cells.count(p.policy)) order.push_back(p.policy);
      Cell& c = cells[p.policy][p.length];
      c.correct += p.correct;
      ++c.trials;
      c.cr += p.cache_cr;
      lengths.insert(p.length);
    }
    int pw = 22;
    for (const std::string& pol : order) pw = std::max<int>(pw, static_cast<int>(pol.size()));
    absl::StrAppend(&s, "\npasskey retrieval (greedy; correct/trials over depths, cache CR after the prompt)\n");
    absl::StrAppend(&s, absl::StrFormat("%-*s", pw, "policy"));
    for (int32_t len : lengths) absl::StrAppend(&s, absl::StrFormat(" %18s", absl::StrCat("L=", len)));
    absl::StrAppend(&s, "\n");
    for (const std::string& pol : order) {
      absl::StrAppend(&s, absl::StrFormat("%-*s", pw, pol));
      for (int32_t len : lengths) {
        const Cell& c = cells[pol][len];
        absl::StrAppend(&s, absl::StrFormat(" %8s @ %6.2fx", absl::StrCat(c.correct, "/", c.trials),
                                            c.trials ? c.cr / c.trials : 0.0));
      }
      absl::StrAppend(&s, "\n");
    }
  }
  return s;
}

std::string ReportSvg(const EvalReport& r) {
  // Series: one per policy kind in row order; dense kinds ("none", "IMPL:none") are the start
  // points of their implementation's series, not series of their own.
  std::vector<std::string> kinds;
  for (const TextRow& t : r.rows) {
    const std::string k = RowKind(t);
    if (!IsDenseKind(k) && std::find(kinds.begin(), kinds.end(), k) == kinds.end()) {
      kinds.push_back(k);
    }
  }
  auto dense_for = [&](const std::string& kind, char protocol) -> const TextRow* {
    const std::string dk = DenseKindOf(kind);
    for (const TextRow& t : r.rows) {
      if (t.protocol == protocol && RowKind(t) == dk) return &t;
    }
    return nullptr;
  };
  auto panel = [&](const std::string& title, const std::string& y_label, char protocol,
                   auto value) {
    PlotPanel p;
    p.title = title;
    p.x_label = absl::StrFormat("cache CR at %s=%lld", protocol == 'a' ? "L" : "C",
                                static_cast<long long>(protocol == 'a' ? r.length : r.context));
    p.y_label = y_label;
    p.log2_x = true;
    for (const std::string& k : kinds) {
      PlotSeries s;
      s.name = k;
      if (const TextRow* dense = dense_for(k, protocol)) s.points.push_back({1.0, value(*dense)});
      for (const TextRow& t : r.rows) {
        if (t.protocol == protocol && RowKind(t) == k) s.points.push_back({t.cache_cr, value(t)});
      }
      if (s.points.size() > 1 || (!s.points.empty() && protocol == 'a')) {
        p.series.push_back(std::move(s));
      }
    }
    return p;
  };
  auto ppl = [](const TextRow& t) { return t.perplexity; };
  auto kl = [](const TextRow& t) { return t.kl; };
  auto top1 = [](const TextRow& t) { return t.top1_agreement; };
  std::vector<PlotPanel> panels = {
      panel("perplexity (streaming)", "perplexity", 'a', ppl),
      panel("KL(dense || policy) per token", "nats", 'a', kl),
      panel("top-1 agreement with dense", "fraction", 'a', top1)};
  bool has_b = false;
  for (const TextRow& t : r.rows) has_b |= t.protocol == 'b' && !IsDenseKind(RowKind(t));
  if (has_b) {
    panels.push_back(panel("perplexity (compress-then-continue)", "perplexity", 'b', ppl));
    panels.push_back(panel("KL per token (compress-then-continue)", "nats", 'b', kl));
    panels.push_back(panel("top-1 agreement (compress-then-continue)", "fraction", 'b', top1));
  }
  if (!r.passkey.empty()) {
    int32_t longest = 0;
    for (const PasskeyRow& p : r.passkey) longest = std::max(longest, p.length);
    PlotPanel p;
    p.title = absl::StrFormat("passkey accuracy, L=%d", longest);
    p.x_label = absl::StrFormat("cache CR at L=%d", longest);
    p.y_label = "fraction correct";
    p.log2_x = true;
    std::map<std::string, std::pair<int, int>> dense_acc;
    std::map<std::string, std::map<std::string, std::array<double, 3>>> by;  // kind -> policy -> cr,correct,n
    for (const PasskeyRow& q : r.passkey) {
      if (q.length != longest) continue;
      std::string kind;
      for (const TextRow& t : r.rows) {
        if (t.policy == q.policy) kind = RowKind(t);
      }
      auto& c = by[kind][q.policy];
      c[0] += q.cache_cr, c[1] += q.correct, c[2] += 1;
    }
    const auto dense_it = by.find("none");
    for (const std::string& k : kinds) {
      PlotSeries s;
      s.name = k;
      if (dense_it != by.end()) {
        for (const auto& [pol, c] : dense_it->second) s.points.push_back({c[0] / c[2], c[1] / c[2]});
      }
      for (const auto& [pol, c] : by[k]) s.points.push_back({c[0] / c[2], c[1] / c[2]});
      p.series.push_back(std::move(s));
    }
    panels.push_back(std::move(p));
  }
  return RenderSvg(absl::StrFormat("KV eviction quality: %s, %lld tokens (window/budget per policy)",
                                   r.text_label, static_cast<long long>(r.length)),
                   panels);
}

}  // namespace dmsrt
