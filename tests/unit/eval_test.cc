// `dmsrt eval`'s computation (launch/eval/): on a tiny synthetic model, the dense reference
// against itself, a real eviction, the top-k KL against a full-vocabulary KL computed here, the
// measured cache CR, the errors, the policy specs, the passkey prompt and the SVG writer.
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "launch/eval/eval.h"
#include "launch/eval/report.h"
#include "launch/eval/probes.h"
#include "launch/eval/svg_plot.h"
#include "launch/run_options.h"
#include "runtime/kv/policy_threshold.h"
#include "runtime/model/model.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace {

struct Tiny {
  std::unique_ptr<Model> model;
  BackendFactory factory;
};

Tiny MakeTiny() {
  Tiny t;
  auto cfg = SyntheticConfig("tiny-llama");
  EXPECT_TRUE(cfg.ok());
  auto m = MakeSyntheticModel(*cfg, 7, /*host_weights=*/true);
  EXPECT_TRUE(m.ok()) << m.status();
  t.model = std::move(*m);
  const Model* model = t.model.get();
  t.factory = [model](const KvPolicyConfig& p) {
    BackendOptions o;
    o.threads = 1;
    o.kv_policy = p;
    o.kv_budget_bytes = 64 << 20;
    return MakeCpuBackend(*model, o);
  };
  return t;
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % vocab);
  return ids;
}

EvalOptions BaseOptions(const Model& m, int n) {
  EvalOptions o;
  o.tokens = RandomTokens(n, m.config.vocab, 3);
  o.text_label = "random";
  o.vocab = m.config.vocab;
  o.prefill_chunk = 16;
  o.context = 64;
  return o;
}

KvPolicyConfig Window(int w, int s) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kWindow;
  c.window = w;
  c.sinks = s;
  return c;
}

// Full-vocabulary mean KL(dense || policy) over predictions [first, n-1), computed directly.
// Full-vocabulary KL(dense || policy) over predictions first..n-2, each pass one chunk; with
// freeze_at > 0 the policy pass is two chunks with the sequence's eviction frozen between them
// (protocol b).
double FullKl(const Tiny& t, const std::vector<int32_t>& ids, const KvPolicyConfig& pol, int first,
              int freeze_at = 0) {
  auto logits = [&](const KvPolicyConfig& p, int cut) {
    auto b = t.factory(p);
    EXPECT_TRUE(b.ok());
    SeqId s = *(*b)->kv().Create();
    if (cut <= 0) {
      auto fr = (*b)->Forward({MakeChunk(s, ids, SeqChunk::Logits::kAll)});
      EXPECT_TRUE(fr.ok()) << fr.status();
      return fr->logits;
    }
    auto head = (*b)->Forward({MakeChunk(s, {ids.begin(), ids.begin() + cut}, SeqChunk::Logits::kAll)});
    EXPECT_TRUE(head.ok()) << head.status();
    EXPECT_TRUE((*b)->kv().FreezeEviction(s).ok());
    auto tail = (*b)->Forward({MakeChunk(s, {ids.begin() + cut, ids.end()}, SeqChunk::Logits::kAll)});
    EXPECT_TRUE(tail.ok()) << tail.status();
    std::vector<float> all = head->logits;
    all.insert(all.end(), tail->logits.begin(), tail->logits.end());
    return all;
  };
  const std::vector<float> p = logits(KvPolicyConfig{}, 0), q = logits(pol, freeze_at);
  const int V = t.model->config.vocab;
  const int n = static_cast<int>(ids.size());
  double sum = 0;
  for (int i = first; i < n - 1; ++i) {
    auto lse = [&](const std::vector<float>& x) {
      double mx = -1e30, acc = 0;
      for (int v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(x[i * V + v]));
      for (int v = 0; v < V; ++v) acc += std::exp(x[i * V + v] - mx);
      return mx + std::log(acc);
    };
    const double lp0 = lse(p), lq0 = lse(q);
    for (int v = 0; v < V; ++v) {
      const double lp = p[i * V + v] - lp0, lq = q[i * V + v] - lq0;
      sum += std::exp(lp) * (lp - lq);
    }
  }
  return sum / (n - 1 - first);
}

TEST(Eval, DenseAgainstItselfAndAnEviction) {
  Tiny t = MakeTiny();
  EvalOptions o = BaseOptions(*t.model, 96);
  o.policies = {{"window big", Window(1000, 4)}, {"window small", Window(12, 4)}};
  auto r = Evaluate(o, t.factory);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->rows.size(), 6u);  // (dense, big, small) x (a, b)
  for (const TextRow& row : r->rows) {
    EXPECT_EQ(row.scored, row.protocol == 'a' ? 95 : 96 - 64);
    EXPECT_TRUE(std::isfinite(row.perplexity));
  }
  // Dense and a window that evicts nothing: identical logits.
  for (int i : {0, 1, 2, 3}) {
    EXPECT_NEAR(r->rows[i].kl, 0.0, 1e-9) << r->rows[i].policy;
    EXPECT_DOUBLE_EQ(r->rows[i].top1_agreement, 1.0);
    EXPECT_NEAR(r->rows[i].cache_cr, 1.0, 1e-12);
  }
  EXPECT_DOUBLE_EQ(r->rows[0].perplexity, r->rows[2].perplexity);
  // The small window: cache CR = L / (w + s) at L (a) and at C (b), measured by the store.
  const TextRow& a = r->rows[4];
  const TextRow& b = r->rows[5];
  EXPECT_NEAR(a.cache_cr, 96.0 / 16, 1e-9);
  EXPECT_NEAR(b.cache_cr, 64.0 / 16, 1e-9);
  EXPECT_EQ(a.cr_length, 96);
  EXPECT_EQ(b.cr_length, 64);
  EXPECT_GT(a.kl, 0.0);
  EXPECT_LT(a.top1_agreement, 1.0);
  // JSON and table carry every row.
  EXPECT_EQ(ReportJson(*r)["rows"].size(), 6u);
  EXPECT_NE(ReportTable(*r).find("window small"), std::string::npos);
  EXPECT_NE(ReportSvg(*r).find("</svg>"), std::string::npos);
  // A report read back (and merged with itself) prints the same table.
  auto back = MergeReports({ReportJson(*r), ReportJson(*r)});
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->rows.size(), 6u);
  EXPECT_EQ(ReportTable(*back), ReportTable(*r));
  EXPECT_FALSE(MergeReports({nlohmann::json{{"rows", 1}}}).ok());
}

TEST(Eval, TopKPlusRemainderKl) {
  Tiny t = MakeTiny();
  EvalOptions o = BaseOptions(*t.model, 80);
  o.policies = {{"window", Window(10, 2)}};
  const double full_a = FullKl(t, o.tokens, Window(10, 2), 0);
  const double full_b = FullKl(t, o.tokens, Window(10, 2), 63, /*freeze_at=*/64);
  const double streaming_b = FullKl(t, o.tokens, Window(10, 2), 63);
  o.top_k = t.model->config.vocab;  // no remainder: the full KL
  auto all = Evaluate(o, t.factory);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_NEAR(all->rows[2].kl, full_a, 1e-5 * full_a + 1e-7);
  EXPECT_NEAR(all->rows[3].kl, full_b, 1e-5 * full_b + 1e-7);
  EXPECT_TRUE(all->rows[3].frozen_continuation);
  // Freezing keeps what a streaming continuation would evict: closer to dense.
  EXPECT_LT(full_b, streaming_b);
  o.top_k = 8;  // a coarser partition: never above the full KL
  auto k8 = Evaluate(o, t.factory);
  ASSERT_TRUE(k8.ok()) << k8.status();
  EXPECT_LE(k8->rows[2].kl, full_a + 1e-7);
  EXPECT_GT(k8->rows[2].kl, 0.0);
}

TEST(Eval, RefusesWhatItCannotRun) {
  Tiny t = MakeTiny();
  EvalOptions o = BaseOptions(*t.model, 96);
  o.tokens.resize(1);
  EXPECT_EQ(Evaluate(o, t.factory).status().code(), absl::StatusCode::kInvalidArgument);
  o = BaseOptions(*t.model, 96);
  o.max_positions = 50;
  auto r = Evaluate(o, t.factory);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("longer than the model's context"), std::string::npos);
  o = BaseOptions(*t.model, 96);
  o.context = 96;
  EXPECT_EQ(Evaluate(o, t.factory).status().code(), absl::StatusCode::kInvalidArgument);
  o = BaseOptions(*t.model, 96);
  o.tokens[5] = t.model->config.vocab;
  EXPECT_EQ(Evaluate(o, t.factory).status().code(), absl::StatusCode::kInvalidArgument);
  o = BaseOptions(*t.model, 96);
  o.passkey.lengths = {256};  // no tokenizer
  EXPECT_EQ(Evaluate(o, t.factory).status().code(), absl::StatusCode::kInvalidArgument);
  o = BaseOptions(*t.model, 96);
  auto pending = ParsePolicySpec("threshold:rate=0.5,w=8", 0);  // never calibrated
  ASSERT_TRUE(pending.ok());
  o.policies = {*pending};
  r = Evaluate(o, t.factory);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("not calibrated"), std::string::npos);
}

TEST(Eval, PolicySpecsAndGrid) {
  auto w = ParsePolicySpec("window:w=1020,s=4", 0);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->config.kind, KvPolicyKind::kWindow);
  EXPECT_EQ(w->config.window, 1020);
  EXPECT_EQ(w->label, "window w=1020 s=4");
  auto f = ParsePolicySpec("forced:r=0.9,w=64", 0);
  ASSERT_TRUE(f.ok());
  EXPECT_DOUBLE_EQ(f->config.force_rate, 0.9);
  EXPECT_EQ(ParsePolicySpec("tova:t=1", 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParsePolicySpec("tova:w=10", 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParsePolicySpec("lru", 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParsePolicySpec("dms", 0).status().code(), absl::StatusCode::kInvalidArgument);
  auto grid = PolicyGrid({2, 4, 8}, 4096, 64);
  ASSERT_EQ(grid.size(), 12u);
  EXPECT_EQ(grid[0].config.window + grid[0].config.sinks, 2048);
  EXPECT_EQ(grid[10].config.budget_tokens, 512);
  // forced at 8x: 64 + 4032 (1 - r) ~ 512
  EXPECT_NEAR(64 + 4032 * (1 - grid[11].config.force_rate), 512, 4);
  for (const EvalPolicy& p : grid) EXPECT_NE(p.config.kind, KvPolicyKind::kThreshold);

  // Threshold: a fixed score, or a rate still to be calibrated.
  auto t = ParsePolicySpec("threshold:t=-16.5,w=32", 0);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->config.kind, KvPolicyKind::kThreshold);
  EXPECT_DOUBLE_EQ(t->config.threshold, -16.5);
  EXPECT_EQ(t->config.window, 32);
  EXPECT_FALSE(t->threshold_pending);
  EXPECT_EQ(t->label, "threshold t=-16.5 w=32");
  auto tr = ParsePolicySpec("threshold:rate=0.75,w=64,shift=1", 0);
  ASSERT_TRUE(tr.ok()) << tr.status();
  EXPECT_TRUE(tr->threshold_pending);
  EXPECT_DOUBLE_EQ(tr->threshold_rate, 0.75);
  EXPECT_EQ(tr->config.threshold_shift, 1);
  EXPECT_EQ(tr->label, "threshold rate=0.75 w=64");
  ResolveThresholdRate(&*tr, -17.25);
  EXPECT_FALSE(tr->threshold_pending);
  EXPECT_DOUBLE_EQ(tr->config.threshold, -17.25);
  EXPECT_EQ(tr->label, "threshold t=-17.25 w=64 shift=1 rate=0.75");
  auto td = ParsePolicySpec("threshold:t=-15", 0);  // the measured default window
  ASSERT_TRUE(td.ok()) << td.status();
  EXPECT_EQ(td->config.window, kThresholdDefaultWindow);
  EXPECT_EQ(kThresholdDefaultWindow, 256);
  for (const char* bad : {"threshold", "threshold:t=-1,rate=0.5", "threshold:rate=1.5",
                          "threshold:t=-1,w=0", "threshold:t=-1,shift=2", "threshold:t=-1,s=4"}) {
    EXPECT_EQ(ParsePolicySpec(bad, 0).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  auto with_t = PolicyGrid({2, 4, 8}, 4096, 64, /*threshold=*/true);
  ASSERT_EQ(with_t.size(), 15u);
  const EvalPolicy& th8 = with_t.back();
  EXPECT_EQ(th8.config.kind, KvPolicyKind::kThreshold);
  EXPECT_TRUE(th8.threshold_pending);
  EXPECT_EQ(th8.config.window, 64);
  EXPECT_DOUBLE_EQ(th8.threshold_rate, with_t[with_t.size() - 2].config.force_rate);
}

TEST(Eval, PasskeyPrompt) {
  auto path = DefaultModelPath();
  if (!path.ok()) GTEST_SKIP() << "default model not installed";
  auto m = LoadModel(*path);
  ASSERT_TRUE(m.ok()) << m.status();
  auto tok = Tokenizer::Create((*m)->tokenizer);
  ASSERT_TRUE(tok.ok());
  const std::string key = PasskeyKey(1, 512, 0.5, 5);
  EXPECT_EQ(key.size(), 5u);
  EXPECT_NE(key[0], '0');
  EXPECT_NE(key, PasskeyKey(1, 512, 0.1, 5));
  for (double d : {0.0, 0.5, 1.0}) {
    auto p = MakePasskeyPrompt(**tok, 512, d, key);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->tokens.size(), 512u);
    const std::string text = (*tok)->Decode(p->tokens);
    EXPECT_NE(text.find("The pass key is " + key + "."), std::string::npos);
    EXPECT_EQ(text.substr(text.size() - 15), "The pass key is");
    EXPECT_NEAR(static_cast<double>(p->needle_token) / 512, d, 0.12);
  }
  EXPECT_FALSE(MakePasskeyPrompt(**tok, 40, 0.5, key).ok());
  EXPECT_TRUE(PasskeyCorrect(" 12345. Remember", "12345"));
  EXPECT_FALSE(PasskeyCorrect(" 1234", "12345"));
}

TEST(Eval, SvgEscapesAndDrawsEverySeries) {
  PlotPanel p;
  p.title = "a < b & c";
  p.log2_x = true;
  p.series = {{"tova", {{1, 2}, {4, 3}}}, {"h2o", {{1, 2}, {8, 5}}}};
  const std::string svg = RenderSvg("t", {p});
  EXPECT_NE(svg.find("a &lt; b &amp; c"), std::string::npos);
  EXPECT_NE(svg.find(">tova<"), std::string::npos);
  EXPECT_NE(svg.find(">h2o<"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
}


// Rows of another implementation ("IMPL:NAME" kinds, e.g. kvpress's presses) merge beside
// dmsrt's: kept with their kind, source and extra fields, tabled, and plotted on the protocol b
// panels from their own dense row.
TEST(Eval, MergesExternalRows) {
  auto row = [](const std::string& policy, const std::string& kind, double cr,
                const std::string& source) {
    return nlohmann::json{{"policy", policy}, {"kind", kind}, {"protocol", "b"}, {"length", 96},
                          {"context", 64}, {"scored", 31}, {"perplexity", 10.0},
                          {"mean_nll", std::log(10.0)}, {"kl", 0.01}, {"top1_agreement", 0.9},
                          {"cr_length", 64}, {"cache_cr", cr}, {"source", source}};
  };
  auto report = [](nlohmann::json rows) {
    return nlohmann::json{{"text", "t.txt"}, {"length", 96}, {"context", 64}, {"top_k", 8},
                          {"rows", rows}, {"passkey", nlohmann::json::array()}};
  };
  nlohmann::json ours = report({row("none", "none", 1, "dmsrt"), row("window w=28 s=4", "window", 2, "dmsrt")});
  nlohmann::json press = row("kvpress:snapkv r=0.5", "kvpress:snapkv", 2, "kvpress");
  press["settings"] = "window_size=64";
  nlohmann::json theirs = report({row("kvpress:none", "kvpress:none", 1, "kvpress"), press});
  auto m = MergeReports({ours, theirs});
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->rows.size(), 4u);
  EXPECT_EQ(RowKind(m->rows[1]), "window");
  EXPECT_EQ(RowKind(m->rows[3]), "kvpress:snapkv");
  EXPECT_EQ(m->rows[3].source, "kvpress");
  const nlohmann::json back = ReportJson(*m);
  EXPECT_EQ(back["rows"][3]["kind"], "kvpress:snapkv");
  EXPECT_EQ(back["rows"][3]["settings"], "window_size=64");
  EXPECT_EQ(back["rows"][3]["source"], "kvpress");
  EXPECT_NE(ReportTable(*m).find("kvpress:snapkv r=0.5"), std::string::npos);
  const std::string svg = ReportSvg(*m);
  EXPECT_NE(svg.find("compress-then-continue"), std::string::npos);
  EXPECT_NE(svg.find(">kvpress:snapkv<"), std::string::npos);
  EXPECT_EQ(svg.find(">kvpress:none<"), std::string::npos);  // a start point, not a series
  // A kind without "IMPL:" must still be one of dmsrt's.
  nlohmann::json bad = report({row("x", "snapkv", 2, "kvpress")});
  EXPECT_FALSE(MergeReports({bad}).ok());
}

}  // namespace
}  // namespace dmsrt
