// Synthetic models on the CPU backend, host sampling through SeqChunk::sample, step validation,
// AppendUncomputed, and the dms option (the model's own decisions at about the rate of an 8x
// checkpoint).
#include "runtime/model/synthetic_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "kernels/reference/kv_store_ref.h"
#include "kernels/reference/quant.h"
#include "runtime/backend/backend.h"

namespace dmsrt {
namespace {

TEST(SyntheticModel, NamedShapesAndErrors) {
  auto q = SyntheticConfig("qwen3-8b");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->n_layers, 36);
  EXPECT_EQ(q->n_heads, 32);
  EXPECT_EQ(q->n_kv_heads, 8);
  EXPECT_EQ(q->head_dim, 128);
  EXPECT_EQ(q->hidden, 4096);
  EXPECT_EQ(q->ffn, 12288);
  EXPECT_EQ(q->vocab, 151936);
  EXPECT_TRUE(q->qk_norm);
  auto q4 = SyntheticConfig("qwen3-8b:layers=4");
  ASSERT_TRUE(q4.ok());
  EXPECT_EQ(q4->n_layers, 4);
  EXPECT_FALSE(SyntheticConfig("qwen3-8b:layers=99").ok());
  EXPECT_FALSE(SyntheticConfig("qwen3-8b:heads=4").ok());
  EXPECT_FALSE(SyntheticConfig("qwen3-8b:dms,").ok());
  auto qd = SyntheticConfig("qwen3-8b:layers=2,dms");
  ASSERT_TRUE(qd.ok()) << qd.status();
  EXPECT_EQ(qd->n_layers, 2);
  EXPECT_TRUE(qd->dms.enabled);
  EXPECT_FALSE(qd->dms.separate_alpha);
  EXPECT_EQ(qd->dms.window, 512);
  EXPECT_FALSE(q->dms.enabled);
  auto bad = SyntheticConfig("gpt-9");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("qwen3-8b"), std::string::npos) << bad.status();
  // Too large to materialise on the host, but fine as a device-only description.
  EXPECT_FALSE(MakeSyntheticModel(*q, 1, true).ok());
  auto dev = MakeSyntheticModel(*q, 1, false);
  ASSERT_TRUE(dev.ok());
  EXPECT_TRUE((*dev)->synthetic);
  EXPECT_TRUE((*dev)->weights.layers.empty());
  EXPECT_GT((*dev)->weight_bytes, 15ll << 30);  // ~16 GB of bf16
}

// The shapes for tensor-parallel runs: Qwen3-32B and Llama-3.1-70B (with Llama 3.1's RoPE
// scaling), as their config.json files give them; both shard over 2, 4 or 8 GPUs (8 KV heads).
TEST(SyntheticModel, LargeShapesForTensorParallelism) {
  auto q = SyntheticConfig("qwen3-32b");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->n_layers, 64);
  EXPECT_EQ(q->hidden, 5120);
  EXPECT_EQ(q->n_heads, 64);
  EXPECT_EQ(q->n_kv_heads, 8);
  EXPECT_EQ(q->head_dim, 128);
  EXPECT_EQ(q->ffn, 25600);
  EXPECT_EQ(q->vocab, 151936);
  EXPECT_TRUE(q->qk_norm);
  EXPECT_EQ(q->rope_scaling.type, RopeScaling::Type::kNone);
  auto l = SyntheticConfig("llama-3.1-70b");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->n_layers, 80);
  EXPECT_EQ(l->hidden, 8192);
  EXPECT_EQ(l->n_heads, 64);
  EXPECT_EQ(l->n_kv_heads, 8);
  EXPECT_EQ(l->ffn, 28672);
  EXPECT_EQ(l->vocab, 128256);
  EXPECT_FLOAT_EQ(l->rope_theta, 5e5f);
  EXPECT_EQ(l->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FLOAT_EQ(l->rope_scaling.factor, 8.f);
  EXPECT_EQ(l->rope_scaling.original_max_positions, 8192);
  auto dq = MakeSyntheticModel(*q, 1, false);
  auto dl = MakeSyntheticModel(*l, 1, false);
  ASSERT_TRUE(dq.ok() && dl.ok());
  EXPECT_NEAR((*dq)->weight_bytes / double(1ll << 30), 61.0, 1.0);   // bf16
  EXPECT_NEAR((*dl)->weight_bytes / double(1ll << 30), 131.5, 1.0);
}

TEST(SyntheticModel, HostWeightsFollowTheSharedStream) {
  auto c = SyntheticConfig("tiny-qwen3");
  ASSERT_TRUE(c.ok());
  auto m = MakeSyntheticModel(*c, 5, true);
  ASSERT_TRUE(m.ok()) << m.status();
  const WeightTensor& wq = (*m)->weights.layers[1].wq;
  const SyntheticTensorSpec s = SyntheticTensor(*c, 5, "wq", 1);
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(wq.data);
  for (int64_t i = 0; i < 50; ++i) {
    EXPECT_EQ(raw[i], kernels::Fp32ToBf16(s.scale * kernels::RandomUniformSigned(s.seed, i)));
  }
  // Different tensors and layers draw different streams; norms sit around 1.
  EXPECT_NE(SyntheticTensor(*c, 5, "wq", 0).seed, s.seed);
  EXPECT_NE(SyntheticTensor(*c, 5, "wk", 1).seed, s.seed);
  const float n0 = kernels::Bf16ToFp32(reinterpret_cast<const uint16_t*>((*m)->weights.layers[0].attn_norm.data)[0]);
  EXPECT_GT(n0, 0.7f);
  EXPECT_LT(n0, 1.3f);
}

TEST(SyntheticModel, CpuBackendRunsAndSamplesOnHost) {
  auto c = SyntheticConfig("tiny-llama");
  ASSERT_TRUE(c.ok());
  auto m = MakeSyntheticModel(*c, 3, true);
  ASSERT_TRUE(m.ok());
  BackendOptions o;
  o.threads = 1;
  auto b = MakeCpuBackend(**m, o);
  ASSERT_TRUE(b.ok()) << b.status();
  const SeqId s = *(*b)->kv().Create();
  SeqChunk ch = MakeChunk(s, {1, 2, 3, 4}, SeqChunk::Logits::kNone);
  ch.sample = true;  // greedy
  auto r = (*b)->Forward({ch});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->sampled.size(), 1u);
  ASSERT_EQ(r->row_chunk.size(), 1u);  // host backends return the sampled row too
  const float* row = r->logits.data();
  const int32_t argmax = static_cast<int32_t>(std::max_element(row, row + r->vocab) - row);
  EXPECT_EQ(r->sampled[0], argmax);
  EXPECT_LT(r->sampled_logprob[0], 0.0f);
  float spread = *std::max_element(row, row + r->vocab) - *std::min_element(row, row + r->vocab);
  EXPECT_GT(spread, 1.0f) << "logits of a synthetic model should spread";

  // Validation and uncomputed appends.
  EXPECT_EQ((*b)->Forward({MakeChunk(s, {})}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*b)->Forward({MakeChunk(s, {1}), MakeChunk(s, {2})}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*b)->Forward({MakeChunk(s, {c->vocab})}).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*b)->AppendUncomputed(s, 100, 0.0).ok());
  EXPECT_EQ((*b)->kv().Length(s), 104);
  auto after = (*b)->Forward({MakeChunk(s, {7})});
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(std::isfinite(after->logits[0]));
}

// The dms option: the model's decisions on a prompt flag about 7/8 of tokens, and an uncomputed
// context under policy dms is flagged at the rate asked for.
TEST(SyntheticModel, DmsOptionDecidesAtAboutSevenEighths) {
  auto c = SyntheticConfig("tiny-qwen3:dms");
  ASSERT_TRUE(c.ok()) << c.status();
  auto m = MakeSyntheticModel(*c, 3, true);
  ASSERT_TRUE(m.ok()) << m.status();
  BackendOptions o;
  o.threads = 1;
  o.kv_policy.kind = KvPolicyKind::kDms;
  o.kv_policy.window = c->dms.window;
  auto b = MakeCpuBackend(**m, o);
  ASSERT_TRUE(b.ok()) << b.status();
  KvCache& kv = (*b)->kv();
  const SeqId s = *kv.Create();
  std::vector<int32_t> prompt(300);
  for (int32_t i = 0; i < 300; ++i) prompt[i] = (i * 7919 + 11) % c->vocab;
  ASSERT_TRUE((*b)->Forward({MakeChunk(s, prompt, SeqChunk::Logits::kNone)}).ok());
  const double model_rate = kv.Figures(s).eviction_rate();
  EXPECT_GT(model_rate, 0.78);
  EXPECT_LT(model_rate, 0.95);

  const SeqId u = *kv.Create();
  ASSERT_TRUE((*b)->AppendUncomputed(u, 4000, 0.5).ok());
  const double fill_rate = kv.Figures(u).eviction_rate();
  EXPECT_NEAR(fill_rate, 0.5, 0.02);
  std::printf("model decisions flag %.3f of prompt tokens; uncomputed fill at 0.5 flags %.3f\n",
              model_rate, fill_rate);
}

}  // namespace
}  // namespace dmsrt
