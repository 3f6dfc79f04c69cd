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

}  // namespace dmsrt
