// `dmsrt eval`'s reports: JSON, merging reports of several runs or implementations, the table
// for people and the plot (launch/eval/report.h).
#include "launch/eval/report.h"

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/eval/svg_plot.h"

namespace dmsrt {

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
