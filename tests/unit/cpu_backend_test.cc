// CPU backend on tiny generated models (tests/fixtures/make_tiny_model.py): logits against an
// independent float64 evaluation written here (weights decoded from the loaded model with the
// reference dequantizer, dense causal attention) for llama / qwen2 (bias) / qwen3 (q/k norm) in
// GGUF and HF form, float and quantized; prefill-as-one-chunk equals token-by-token decoding;
// batching several sequences equals running them alone; 1 and 2 threads give the same bits;
// Reserve errors come back untouched; DMS Variant A zeroes its query channel.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/reference/quant.h"
#include "parallel/comm.h"
#include "runtime/backend/backend.h"
#include "runtime/model/model.h"

namespace dmsrt {
namespace {

// ---- independent float64 reference -----------------------------------------------------------

std::vector<double> Deq(const WeightTensor& w) {
  std::vector<double> out;
  if (!w.present()) return out;
  std::vector<float> row(w.cols);
  out.reserve(w.numel());
  for (int64_t r = 0; r < w.rows; ++r) {
    EXPECT_TRUE(kernels::DequantizeRow(static_cast<int>(w.type), w.row(r), row.data(), w.cols))
        << w.name;
    out.insert(out.end(), row.begin(), row.end());
  }
  return out;
}

// y[out] = W[out, in] x[in] (+ b)
std::vector<double> Lin(const std::vector<double>& w, const std::vector<double>& x, int64_t out,
                        const std::vector<double>* b = nullptr) {
  const int64_t in = static_cast<int64_t>(x.size());
  std::vector<double> y(out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    double s = 0;
    for (int64_t i = 0; i < in; ++i) s += w[o * in + i] * x[i];
    y[o] = s + (b && !b->empty() ? (*b)[o] : 0.0);
  }
  return y;
}

void RmsNormD(double* x, int64_t n, const std::vector<double>& w, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const double s = 1.0 / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * s * w[i];
}

double InvFreq(const ModelConfig& c, int i) {
  const int rd = c.rope_dim > 0 ? c.rope_dim : c.head_dim;
  double f = 1.0 / std::pow(static_cast<double>(c.rope_theta), 2.0 * i / rd);
  const RopeScaling& s = c.rope_scaling;
  if (s.type == RopeScaling::Type::kLinear) return f / s.factor;
  if (s.type == RopeScaling::Type::kLlama3) {
    const double wavelen = 2 * M_PI / f;
    const double lo = s.original_max_positions / s.low_freq_factor;
    const double hi = s.original_max_positions / s.high_freq_factor;
    if (wavelen < hi) return f;
    if (wavelen > lo) return f / s.factor;
    const double smooth = (s.original_max_positions / wavelen - s.low_freq_factor) /
                          (s.high_freq_factor - s.low_freq_factor);
    return (1 - smooth) * f / s.factor + smooth * f;
  }
  return f;
}

// Logits [n, vocab] for every position of `tokens` (one sequence from position 0).
std::vector<std::vector<double>> Reference(const Model& m, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads, g = nh / nkv;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int rd = c.rope_dim > 0 ? c.rope_dim : c.head_dim;
  const bool variant_a = c.dms.enabled && !c.dms.separate_alpha;
  const std::vector<double> emb = Deq(m.weights.tok_embd);
  std::vector<std::vector<double>> x(n);
  for (int64_t t = 0; t < n; ++t) x[t].assign(emb.begin() + tokens[t] * H, emb.begin() + (tokens[t] + 1) * H);
  auto rope = [&](double* v, int64_t pos) {
    for (int i = 0; i < rd / 2; ++i) {
      const double a = pos * InvFreq(c, i);
      const double x0 = v[i], x1 = v[i + rd / 2];
      v[i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[i + rd / 2] = x1 * std::cos(a) + x0 * std::sin(a);
    }
  };
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = m.weights.layers[l];
    const auto wq = Deq(lw.wq), wk = Deq(lw.wk), wv = Deq(lw.wv), wo = Deq(lw.wo);
    const auto bq = Deq(lw.bq), bk = Deq(lw.bk), bv = Deq(lw.bv);
    const auto an = Deq(lw.attn_norm), fn = Deq(lw.ffn_norm), qn = Deq(lw.q_norm), kn = Deq(lw.k_norm);
    const auto wg = Deq(lw.w_gate), wu = Deq(lw.w_up), wd = Deq(lw.w_down);
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int64_t t = 0; t < n; ++t) {
      std::vector<double> h = x[t];
      RmsNormD(h.data(), H, an, c.rms_eps);
      q[t] = Lin(wq, h, nh * hd, &bq);
      k[t] = Lin(wk, h, nkv * hd, &bk);
      v[t] = Lin(wv, h, nkv * hd, &bv);
      if (c.qk_norm) {
        for (int64_t j = 0; j < nh; ++j) RmsNormD(&q[t][j * hd], hd, qn, c.rms_eps);
        for (int64_t j = 0; j < nkv; ++j) RmsNormD(&k[t][j * hd], hd, kn, c.rms_eps);
      }
      if (variant_a) {
        for (int64_t j = 0; j < nkv; ++j) q[t][j * g * hd + hd - 1] = 0;
      }
      for (int64_t j = 0; j < nh; ++j) rope(&q[t][j * hd], t);
      for (int64_t j = 0; j < nkv; ++j) rope(&k[t][j * hd], t);
      if (variant_a) {
        for (int64_t j = 0; j < nkv; ++j) q[t][j * g * hd + hd - 1] = 0;
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      std::vector<double> att(nh * hd, 0.0);
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t kh = h / g;
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int64_t u = 0; u <= t; ++u) {
          double d = 0;
          for (int64_t i = 0; i < hd; ++i) d += q[t][h * hd + i] * k[u][kh * hd + i];
          s[u] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[u]);
        }
        double z = 0;
        for (auto& e : s) z += e = std::exp(e - mx);
        for (int64_t u = 0; u <= t; ++u) {
          for (int64_t i = 0; i < hd; ++i) att[h * hd + i] += s[u] / z * v[u][kh * hd + i];
        }
      }
      const auto o = Lin(wo, att, H);
      for (int64_t i = 0; i < H; ++i) x[t][i] += o[i];
      std::vector<double> h = x[t];
      RmsNormD(h.data(), H, fn, c.rms_eps);
      const auto gg = Lin(wg, h, c.ffn), uu = Lin(wu, h, c.ffn);
      std::vector<double> a(c.ffn);
      for (int i = 0; i < c.ffn; ++i) a[i] = gg[i] / (1 + std::exp(-gg[i])) * uu[i];
      const auto d = Lin(wd, a, H);
      for (int64_t i = 0; i < H; ++i) x[t][i] += d[i];
    }
  }
  const auto on = Deq(m.weights.output_norm), out = Deq(m.weights.output);
  std::vector<std::vector<double>> logits(n);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> h = x[t];
    RmsNormD(h.data(), H, on, c.rms_eps);
    logits[t] = Lin(out, h, c.vocab);
  }
  return logits;
}

// ---- fixtures ---------------------------------------------------------------------------------

struct ModelCase {
  std::string name;     // test-name friendly
  std::string args;     // make_tiny_model.py arguments
  std::string file;     // model.gguf or "" (HF directory)
  double rel_tol;       // relative L2 error bound of logits against the float64 reference
};

class CpuBackendTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system("python3 -c 'import gguf, numpy, safetensors' >/dev/null 2>&1") != 0) {
      skip_reason_ = "python3 with gguf, numpy and safetensors is not available";
      return;
    }
    const std::string gen = std::string(DMSRT_SOURCE_DIR) + "/tests/fixtures/make_tiny_model.py";
    if (std::system(("test -f " + gen).c_str()) != 0) {
      skip_reason_ = "tests/fixtures/make_tiny_model.py is missing";
      return;
    }
    char tmpl[] = "/tmp/dmsrt_cpu_backend_XXXXXX";
    dir_ = new std::string(mkdtemp(tmpl));
  }
  static void TearDownTestSuite() {
    if (dir_) std::system(("rm -rf " + *dir_).c_str());
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }

  // Generates (once per name) and loads a model.
  std::unique_ptr<Model> Load(const ModelCase& mc) {
    const std::string out = *dir_ + "/" + mc.name;
    const std::string cmd = "python3 " + std::string(DMSRT_SOURCE_DIR) +
                            "/tests/fixtures/make_tiny_model.py --out " + out + " " + mc.args +
                            " >/dev/null";
    if (std::system(("test -d " + out).c_str()) != 0 && std::system(cmd.c_str()) != 0) {
      ADD_FAILURE() << "make_tiny_model.py failed: " << cmd;
      return nullptr;
    }
    auto m = LoadModel(mc.file.empty() ? out : out + "/" + mc.file);
    if (!m.ok()) {
      ADD_FAILURE() << "LoadModel(" << mc.name << "): " << m.status();
      return nullptr;
    }
    return std::move(*m);
  }

  static std::unique_ptr<Backend> MakeBackend(const Model& m, int threads,
                                              KvPolicyConfig policy = {},
                                              int64_t budget = 64ll << 20) {
    BackendOptions o;
    o.threads = threads;
    o.kv_policy = policy;
    o.kv_budget_bytes = budget;
    o.kv_block_tokens = 4;
    auto b = MakeCpuBackend(m, o);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : nullptr;
  }

  static std::string* dir_;
  static std::string skip_reason_;
};
std::string* CpuBackendTest::dir_ = nullptr;
std::string CpuBackendTest::skip_reason_;

std::vector<float> RunChunk(Backend& b, SeqId seq, const std::vector<int32_t>& toks) {
  SeqChunk c;
  c.seq = seq;
  c.tokens = toks;
  c.logits = SeqChunk::Logits::kAll;
  auto r = b.Forward({c});
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return {};
  EXPECT_EQ(r->row_chunk.size(), toks.size());
  return r->logits;
}

double RelL2(const float* a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

const std::vector<int32_t> kTokens = {5, 100, 37, 250, 7, 7, 191, 64, 3};

const ModelCase kCases[] = {
    {"llama_gguf_f32", "--arch llama --format gguf --seed 1", "model.gguf", 2e-5},
    {"llama_hf_f32_llama3rope", "--arch llama --format hf --seed 2 --rope-scaling llama3", "", 2e-5},
    {"qwen2_gguf_f32", "--arch qwen2 --format gguf --seed 3", "model.gguf", 2e-5},
    {"qwen2_hf_bf16", "--arch qwen2 --format hf --seed 4 --quant bf16", "", 2e-5},
    {"qwen3_hf_f32", "--arch qwen3 --format hf --seed 5 --head-dim 32", "", 2e-5},
    {"qwen3_gguf_f16", "--arch qwen3 --format gguf --seed 6 --quant f16", "model.gguf", 2e-5},
    // Quantized weights: activations go through 8-bit blocks, about 1% per matmul.
    {"llama_gguf_q4_1", "--arch llama --format gguf --seed 7 --quant q4_1", "model.gguf", 0.05},
    {"llama_gguf_q8_0", "--arch llama --format gguf --seed 8 --quant q8_0", "model.gguf", 0.05},
    {"qwen3_gguf_q4_0", "--arch qwen3 --format gguf --seed 9 --quant q4_0", "model.gguf", 0.05},
};

TEST_F(CpuBackendTest, LogitsMatchFloat64Reference) {
  for (const ModelCase& mc : kCases) {
    SCOPED_TRACE(mc.name);
    auto m = Load(mc);
    ASSERT_NE(m, nullptr);
    auto b = MakeBackend(*m, 2);
    ASSERT_NE(b, nullptr);
    const int32_t V = m->config.vocab;
    std::vector<int32_t> toks;
    for (int32_t t : kTokens) toks.push_back(t % V);
    const auto ref = Reference(*m, toks);
    auto seq = b->kv().Create();
    ASSERT_TRUE(seq.ok());
    const auto got = RunChunk(*b, *seq, toks);
    ASSERT_EQ(got.size(), toks.size() * V);
    for (size_t t = 0; t < toks.size(); ++t) {
      const double e = RelL2(&got[t * V], ref[t]);
      EXPECT_LT(e, mc.rel_tol) << "position " << t;
    }
    EXPECT_EQ(b->kv().Length(*seq), static_cast<int64_t>(toks.size()));
  }
}

TEST_F(CpuBackendTest, PrefillEqualsTokenByToken) {
  for (const ModelCase& mc : {kCases[0], kCases[2], kCases[4], kCases[6]}) {
    SCOPED_TRACE(mc.name);
    auto m = Load(mc);
    ASSERT_NE(m, nullptr);
    auto b = MakeBackend(*m, 2);
    ASSERT_NE(b, nullptr);
    const int32_t V = m->config.vocab;
    std::vector<int32_t> toks;
    for (int32_t t : kTokens) toks.push_back(t % V);
    const SeqId a = *b->kv().Create(), c = *b->kv().Create();
    const auto whole = RunChunk(*b, a, toks);
    // Token by token, with kLast (one row each).
    for (size_t i = 0; i < toks.size(); ++i) {
      SeqChunk ch;
      ch.seq = c;
      ch.tokens = {toks[i]};
      auto r = b->Forward({ch});
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->logits.size(), static_cast<size_t>(V));
      ASSERT_EQ(r->row_chunk, std::vector<int32_t>({0}));
      double num = 0, den = 0;
      for (int32_t j = 0; j < V; ++j) {
        const double d = r->logits[j] - whole[i * V + j];
        num += d * d;
        den += static_cast<double>(whole[i * V + j]) * whole[i * V + j];
      }
      EXPECT_LT(std::sqrt(num / den), 1e-5) << "position " << i;
    }
  }
}

TEST_F(CpuBackendTest, BatchedSequencesEqualSeparateRuns) {
  auto m = Load(kCases[6]);  // quantized: exercises the multi-token register tiles
  ASSERT_NE(m, nullptr);
  const int32_t V = m->config.vocab;
  auto b1 = MakeBackend(*m, 1);
  auto b2 = MakeBackend(*m, 2);
  ASSERT_TRUE(b1 && b2);
  const std::vector<int32_t> pa = {1, 2, 3, 4, 5}, pb = {9, 8, 7}, pc = {42};
  // Alone, one thread.
  std::vector<std::vector<float>> alone;
  for (const auto& p : {pa, pb, pc}) alone.push_back(RunChunk(*b1, *b1->kv().Create(), p));
  // Together, two threads: chunk a with kAll, b with kLast, c with kNone.
  const SeqId sa = *b2->kv().Create(), sb = *b2->kv().Create(), sc = *b2->kv().Create();
  std::vector<SeqChunk> batch(3);
  batch[0].seq = sa;
  batch[0].tokens = pa;
  batch[0].logits = SeqChunk::Logits::kAll;
  batch[1].seq = sb;
  batch[1].tokens = pb;
  batch[1].logits = SeqChunk::Logits::kLast;
  batch[2].seq = sc;
  batch[2].tokens = pc;
  batch[2].logits = SeqChunk::Logits::kNone;
  auto r = b2->Forward(batch);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->vocab, V);
  ASSERT_EQ(r->row_chunk, std::vector<int32_t>({0, 0, 0, 0, 0, 1}));
  ASSERT_EQ(r->logits.size(), 6u * V);
  // Bit-identical: matmul results do not depend on batching or threads, attention is per chunk.
  EXPECT_EQ(std::memcmp(r->logits.data(), alone[0].data(), 5 * V * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(&r->logits[5 * V], &alone[1][2 * V], V * sizeof(float)), 0);
  EXPECT_EQ(b2->kv().Length(sc), 1);
  // A decode step for all three afterwards still works.
  std::vector<SeqChunk> step(3);
  for (int i = 0; i < 3; ++i) {
    step[i].seq = std::vector<SeqId>{sa, sb, sc}[i];
    step[i].tokens = {11 + i};
  }
  auto r2 = b2->Forward(step);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->row_chunk, std::vector<int32_t>({0, 1, 2}));
  EXPECT_EQ(b2->kv().Length(sa), 6);
}

TEST_F(CpuBackendTest, BadInputAndReserveErrors) {
  auto m = Load(kCases[0]);
  ASSERT_NE(m, nullptr);
  auto b = MakeBackend(*m, 1);
  ASSERT_NE(b, nullptr);
  const SeqId s = *b->kv().Create();
  SeqChunk bad;
  bad.seq = s;
  bad.tokens = {m->config.vocab};
  EXPECT_EQ(b->Forward({bad}).status().code(), absl::StatusCode::kInvalidArgument);
  bad.tokens = {};
  EXPECT_EQ(b->Forward({bad}).status().code(), absl::StatusCode::kInvalidArgument);
  SeqChunk twice;
  twice.seq = s;
  twice.tokens = {1};
  EXPECT_EQ(b->Forward({twice, twice}).status().code(), absl::StatusCode::kInvalidArgument);
  SeqChunk unknown;
  unknown.seq = 12345;
  unknown.tokens = {1};
  const auto st = b->Forward({unknown}).status();
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(b->kv().Length(s), 0);
  // Empty batch: nothing to do.
  auto e = b->Forward({});
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->logits.empty());

  // A budget of a few blocks: a long prompt cannot be reserved; the cache error comes back as is
  // and the sequence is unchanged.
  auto small = MakeBackend(*m, 1, KvPolicyConfig{}, 64 * 1024);
  ASSERT_NE(small, nullptr);
  const SeqId t = *small->kv().Create();
  SeqChunk big;
  big.seq = t;
  big.tokens.assign(2000, 3);
  const auto rs = small->Forward({big}).status();
  EXPECT_EQ(rs.code(), absl::StatusCode::kResourceExhausted) << rs;
  EXPECT_EQ(small->kv().Length(t), 0);
  big.tokens.assign(2, 3);
  EXPECT_TRUE(small->Forward({big}).ok());
}

TEST_F(CpuBackendTest, DmsVariantAZeroesChannelAndEvicts) {
  ModelCase mc{"qwen3_dms_a", "--arch qwen3 --format hf --seed 12 --dms-window 2", "", 2e-5};
  auto m = Load(mc);
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->config.dms.enabled);
  const int32_t V = m->config.vocab;
  std::vector<int32_t> toks;
  for (int i = 0; i < 12; ++i) toks.push_back((i * 31 + 5) % V);
  const auto ref = Reference(*m, toks);  // dense attention with the channel zeroed
  // Policy none: the channel is still zeroed, nothing evicted -> matches the reference.
  auto dense = MakeBackend(*m, 2);
  ASSERT_NE(dense, nullptr);
  const auto got = RunChunk(*dense, *dense->kv().Create(), toks);
  for (size_t t = 0; t < toks.size(); ++t) EXPECT_LT(RelL2(&got[t * V], ref[t]), 2e-5) << t;
  // Policy dms: decisions reach the cache; the first w+1 positions see everything, so their
  // logits match the dense run; the cache reports what it flagged.
  KvPolicyConfig p;
  p.kind = KvPolicyKind::kDms;
  auto dms = MakeBackend(*m, 2, p);
  ASSERT_NE(dms, nullptr);
  const SeqId s = *dms->kv().Create();
  const auto gd = RunChunk(*dms, s, toks);
  for (size_t t = 0; t < 3; ++t) EXPECT_LT(RelL2(&gd[t * V], ref[t]), 2e-5) << t;
  const KvFigures f = dms->kv().Figures(s);
  EXPECT_EQ(f.logical_tokens, static_cast<int64_t>(toks.size()) * m->config.n_layers * m->config.n_kv_heads);
  EXPECT_GT(f.flagged_tokens, 0);  // seed 12 flags some tokens early enough to leave the window
  EXPECT_LT(f.resident_tokens, f.logical_tokens);
  // Policy dms on a model without DMS fields is refused with a reason.
  auto plain = Load(kCases[0]);
  ASSERT_NE(plain, nullptr);
  BackendOptions o;
  o.kv_policy = p;
  EXPECT_EQ(MakeCpuBackend(*plain, o).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- tensor parallelism without MPI: ranks as threads -------------------------------------------

// A Communicator whose ranks are threads of this process (shared memory, a cyclic barrier), so the
// sharded forward pass is tested by every unit run, with or without MPI. Sums run over ranks in
// rank order, so every rank gets bit-identical results (as MPI's reductions give).
class ThreadGroup {
 public:
  explicit ThreadGroup(int n) : n_(n), slots_(static_cast<size_t>(n)) {}
  int size() const { return n_; }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }
  std::vector<const void*>& slots() { return slots_; }

 private:
  const int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int64_t generation_ = 0;
  std::vector<const void*> slots_;
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(ThreadGroup* g, int rank) : g_(g), rank_(rank) {}
  int size() const override { return g_->size(); }
  int rank() const override { return rank_; }
  const char* kind() const override { return "threads"; }
  std::string Describe() const override { return "threads[" + std::to_string(size()) + "]"; }

  template <class T>
  absl::Status Reduce(const T* send, T* recv, int64_t count, ReduceOp op) {
    g_->slots()[rank_] = send;
    g_->Wait();
    std::vector<T> acc(static_cast<const T*>(g_->slots()[0]),
                       static_cast<const T*>(g_->slots()[0]) + count);
    for (int r = 1; r < size(); ++r) {
      const T* p = static_cast<const T*>(g_->slots()[r]);
      for (int64_t i = 0; i < count; ++i) {
        acc[i] = op == ReduceOp::kSum ? acc[i] + p[i]
                                      : (op == ReduceOp::kMin ? std::min(acc[i], p[i])
                                                              : std::max(acc[i], p[i]));
      }
    }
    g_->Wait();  // everyone has read every send buffer
    std::copy(acc.begin(), acc.end(), recv);
    return absl::OkStatus();
  }
  absl::Status AllReduce(const float* s, float* r, int64_t c, ReduceOp op) override {
    return Reduce(s, r, c, op);
  }
  absl::Status AllReduce(const int64_t* s, int64_t* r, int64_t c, ReduceOp op) override {
    return Reduce(s, r, c, op);
  }
  absl::Status AllGatherBytes(const void* send, int64_t bytes, void* recv) override {
    g_->slots()[rank_] = send;
    g_->Wait();
    std::vector<char> all(static_cast<size_t>(bytes * size()));
    for (int r = 0; r < size(); ++r) {
      std::memcpy(all.data() + r * bytes, g_->slots()[r], static_cast<size_t>(bytes));
    }
    g_->Wait();
    std::memcpy(recv, all.data(), all.size());
    return absl::OkStatus();
  }
  absl::Status Broadcast(void* buf, int64_t bytes, int root) override {
    g_->slots()[rank_] = buf;
    g_->Wait();
    if (rank_ != root) std::memcpy(buf, g_->slots()[root], static_cast<size_t>(bytes));
    g_->Wait();
    return absl::OkStatus();
  }
  absl::Status Barrier() override {
    g_->Wait();
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int, int) override {
    return absl::UnimplementedError("ThreadComm::Split");
  }
  absl::Status Abort(const std::string& reason) override { return absl::AbortedError(reason); }

 private:
  ThreadGroup* g_;
  int rank_;
};

// Runs `fn(rank, comm)` on `tp` threads and joins them.
void RunRanks(int tp, const std::function<void(int, Communicator*)>& fn) {
  ThreadGroup group(tp);
  std::vector<std::unique_ptr<ThreadComm>> comms;
  for (int r = 0; r < tp; ++r) comms.push_back(std::make_unique<ThreadComm>(&group, r));
  std::vector<std::thread> threads;
  for (int r = 0; r < tp; ++r) threads.emplace_back([&, r] { fn(r, comms[r].get()); });
  for (auto& t : threads) t.join();
}

struct TpCase {
  ModelCase model;
  int tp;
  double tol;  // max |delta logit| / max |logit| against one rank
};

// Sharded forward passes (head, FFN and vocabulary slices, all-reduce, all-gather) against one
// rank: f32 models agree to rounding; quantized ones within activation-quantization error (an
// unaligned o_proj slice is read through its zero-padded block cover, which changes the int8
// blocks of the activations). Forced eviction: every rank keeps exactly the single-rank
// residents of its global heads.
TEST_F(CpuBackendTest, TensorParallelMatchesOneRank) {
  const TpCase cases[] = {
      // Qwen2 biases sliced per rank; 2 KV heads over 2 ranks.
      {{"qwen2_gguf_f32", "--arch qwen2 --format gguf --seed 3", "model.gguf", 0}, 2, 1e-5},
      // 4 KV heads over 4 ranks, uneven vocabulary split (275 = 69+69+69+68).
      {{"llama_hf_tp4", "--arch llama --format hf --seed 11 --heads 8 --kv-heads 4 --hidden 64 "
                        "--vocab 275", "", 0}, 4, 1e-5},
      // Q4_1: o_proj slices of 32 values (whole blocks), FFN split in whole blocks.
      {{"llama_gguf_q4_1", "--arch llama --format gguf --seed 7 --quant q4_1", "model.gguf", 0},
       2, 1e-5},
      // Q8_0 with 16-value o_proj slices: the zero-padded block cover.
      {{"llama_gguf_q8_0_tp4", "--arch llama --format gguf --seed 12 --quant q8_0 --heads 4 "
                               "--kv-heads 4 --hidden 64", "model.gguf", 0}, 4, 0.05},
  };
  for (const TpCase& tc : cases) {
    SCOPED_TRACE(tc.model.name);
    std::unique_ptr<Model> m = Load(tc.model);
    ASSERT_NE(m, nullptr);
    KvPolicyConfig forced;
    forced.kind = KvPolicyKind::kForced;
    forced.force_rate = 0.7;
    forced.window = 3;
    forced.seed = 5;
    const std::vector<int32_t> prompt = {5, 100, 37, 250, 7, 7, 191, 64, 3, 12, 44, 90, 13};
    // One rank.
    auto ref = MakeBackend(*m, 1, forced);
    ASSERT_NE(ref, nullptr);
    SeqId rs = *ref->kv().Create();
    std::vector<float> want = RunChunk(*ref, rs, prompt);
    for (int32_t t : {9, 8, 7, 6, 5}) {
      std::vector<float> row = RunChunk(*ref, rs, {t});
      want.insert(want.end(), row.begin(), row.end());
    }
    // tp ranks.
    std::vector<std::vector<float>> got(tc.tp);
    std::vector<std::string> errors(tc.tp);
    std::vector<int64_t> mismatched(tc.tp, 0), compared(tc.tp, 0);
    RunRanks(tc.tp, [&](int rank, Communicator* comm) {
      BackendOptions o;
      o.threads = 1;
      o.kv_policy = forced;
      o.kv_budget_bytes = 64ll << 20;
      o.kv_block_tokens = 4;
      o.comm = comm;
      auto b = MakeCpuBackend(*m, o);
      if (!b.ok()) {
        errors[rank] = b.status().ToString();
        return;  // every rank fails alike (same model, same degree)
      }
      SeqId s = *(*b)->kv().Create();
      got[rank] = RunChunk(**b, s, prompt);
      for (int32_t t : {9, 8, 7, 6, 5}) {
        std::vector<float> row = RunChunk(**b, s, {t});
        got[rank].insert(got[rank].end(), row.begin(), row.end());
      }
      const KvGeometry& g = (*b)->kv().geometry();
      for (int32_t l = 0; l < g.n_layers; ++l) {
        for (int32_t j = 0; j < g.n_kv_heads; ++j) {
          ++compared[rank];
          if ((*b)->kv().ResidentPositions(s, l, j) !=
              ref->kv().ResidentPositions(rs, l, g.kv_head_offset + j)) {
            ++mismatched[rank];
          }
        }
      }
    });
    double max_ref = 0, max_d = 0;
    for (float v : want) max_ref = std::max(max_ref, std::fabs(static_cast<double>(v)));
    for (int r = 0; r < tc.tp; ++r) {
      ASSERT_TRUE(errors[r].empty()) << "rank " << r << ": " << errors[r];
      ASSERT_EQ(got[r].size(), want.size()) << "rank " << r;
      // Every rank returns the full logits, identical across ranks.
      EXPECT_EQ(got[r], got[0]) << "rank " << r;
      for (size_t i = 0; i < want.size(); ++i) {
        max_d = std::max(max_d, std::fabs(static_cast<double>(got[r][i]) - want[i]));
      }
      EXPECT_GT(compared[r], 0);
      EXPECT_EQ(mismatched[r], 0) << "rank " << r << ": resident sets differ from one rank";
    }
    std::printf("[tp %d] %s: max |delta logit| %.3g (max |logit| %.3g)\n", tc.tp,
                tc.model.name.c_str(), max_d, max_ref);
    EXPECT_LE(max_d, tc.tol * std::max(1.0, max_ref)) << "max |delta logit| " << max_d;
  }
}

TEST_F(CpuBackendTest, TensorParallelRefusesDegreeNotDividingKvHeads) {
  std::unique_ptr<Model> m =
      Load({"llama_gguf_f32", "--arch llama --format gguf --seed 1", "model.gguf", 0});
  ASSERT_NE(m, nullptr);  // 2 KV heads
  std::vector<absl::Status> st(3);
  RunRanks(3, [&](int rank, Communicator* comm) {
    BackendOptions o;
    o.threads = 1;
    o.kv_budget_bytes = 1 << 20;
    o.comm = comm;
    st[rank] = MakeCpuBackend(*m, o).status();
  });
  for (const absl::Status& s : st) {
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(s.message().find("does not divide the model's 2 KV heads"), std::string::npos) << s;
  }
}

}  // namespace
}  // namespace dmsrt
