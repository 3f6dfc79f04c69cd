// LoadModel / AttachDmsAdapter tests: the default model's config and tokenizer, the RoPE row
// un-permutation of GGUF llama files (compared byte for byte with the raw file), tiny generated
// models of every architecture in both formats (GGUF f32 and HF f32 of one seed must give
// identical tensors), quantized and BF16/sharded variants, DMS fields and adapters, and refused
// configurations with clear messages.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/model/gguf.h"
#include "runtime/model/model.h"
#include "runtime/model/safetensors.h"

namespace dmsrt {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

const std::string kDefaultModel =
    std::string(DMSRT_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

bool HasSubstr(const absl::Status& s, const std::string& needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

// Every weight tensor of a model with a readable name.
std::vector<std::pair<std::string, const WeightTensor*>> AllTensors(const Model& m) {
  std::vector<std::pair<std::string, const WeightTensor*>> out = {
      {"tok_embd", &m.weights.tok_embd},
      {"output_norm", &m.weights.output_norm},
      {"output", &m.weights.output}};
  for (size_t i = 0; i < m.weights.layers.size(); ++i) {
    const LayerWeights& l = m.weights.layers[i];
    const std::string p = "layer" + std::to_string(i) + ".";
    const std::pair<const char*, const WeightTensor*> ts[] = {
        {"attn_norm", &l.attn_norm},
        {"wq", &l.wq},
        {"wk", &l.wk},
        {"wv", &l.wv},
        {"wo", &l.wo},
        {"bq", &l.bq},
        {"bk", &l.bk},
        {"bv", &l.bv},
        {"q_norm", &l.q_norm},
        {"k_norm", &l.k_norm},
        {"ffn_norm", &l.ffn_norm},
        {"w_gate", &l.w_gate},
        {"w_up", &l.w_up},
        {"w_down", &l.w_down},
        {"dms_alpha_norm", &l.dms_alpha_norm},
        {"dms_alpha", &l.dms_alpha},
        {"dms_alpha_bias", &l.dms_alpha_bias}};
    for (const auto& [n, t] : ts) out.emplace_back(p + n, t);
  }
  return out;
}

// ---- default model ---------------------------------------------------------------------------

class DefaultModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!fs::exists(kDefaultModel)) return;
    auto m = LoadModel(kDefaultModel);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  void SetUp() override {
    if (model_ == nullptr) GTEST_SKIP() << "default model not present: " << kDefaultModel;
  }
  static Model* model_;
};
Model* DefaultModel::model_ = nullptr;

TEST_F(DefaultModel, Config) {
  const ModelConfig& c = model_->config;
  EXPECT_EQ(c.arch, Arch::kLlama);
  EXPECT_STREQ(ArchName(c.arch), "llama");
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.gqa_group(), 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.rope_dim, 64);
  EXPECT_EQ(c.ffn, 1536);
  EXPECT_EQ(c.vocab, 49152);
  EXPECT_EQ(c.max_positions, 8192);
  EXPECT_NEAR(c.rms_eps, 1e-5f, 1e-9f);
  EXPECT_FLOAT_EQ(c.rope_theta, 100000.0f);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_FALSE(c.attn_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_FALSE(c.dms.enabled);
  EXPECT_EQ(model_->source_format, "gguf");
  EXPECT_EQ(model_->weights.layers.size(), 30u);
  EXPECT_EQ(model_->weights.output.data, model_->weights.tok_embd.data);
  EXPECT_EQ(model_->weights.tok_embd.type, DType::kQ8_0);
  EXPECT_EQ(model_->weights.layers[0].wq.type, DType::kQ4_1);
  EXPECT_EQ(model_->weights.layers[0].attn_norm.type, DType::kF32);
  // Every tensor of the file is used exactly once (the output is tied to the embedding).
  auto g = GgufFile::Open(kDefaultModel);
  ASSERT_TRUE(g.ok());
  int64_t total = 0;
  for (const auto& t : (*g)->tensors()) total += static_cast<int64_t>(t.nbytes);
  EXPECT_EQ(model_->weight_bytes, total);
}

TEST_F(DefaultModel, Tokenizer) {
  const TokenizerSpec& t = model_->tokenizer;
  EXPECT_EQ(t.model, "gpt2");
  EXPECT_EQ(t.pre, "smollm");
  EXPECT_EQ(t.tokens.size(), 49152u);
  EXPECT_EQ(t.token_types.size(), 49152u);
  EXPECT_EQ(t.merges.size(), 48900u);
  EXPECT_EQ(t.bos_id, 1);
  EXPECT_EQ(t.eos_id, 2);
  EXPECT_EQ(t.pad_id, 2);
  EXPECT_EQ(t.unk_id, 0);
  EXPECT_FALSE(t.add_bos);
  EXPECT_EQ(t.tokens[2], "<|im_end|>");
  EXPECT_EQ(t.tokens[0], "<|endoftext|>");
  // eos (2 = <|im_end|>) and <|endoftext|> (0, a control token).
  EXPECT_EQ(t.eos_ids, (std::vector<int32_t>{0, 2}));
  EXPECT_NE(t.chat_template.find("<|im_start|>"), std::string::npos);
}

// Row r of the loaded (rotate-half) Q/K equals GGUF row perm(r), byte for byte; V is untouched.
TEST_F(DefaultModel, UnpermutesQueryAndKeyRows) {
  auto g = GgufFile::Open(kDefaultModel);
  ASSERT_TRUE(g.ok());
  const int hd = model_->config.head_dim;
  for (int layer : {0, 17, 29}) {
    const LayerWeights& l = model_->weights.layers[static_cast<size_t>(layer)];
    for (const char* which : {"attn_q", "attn_k"}) {
      const WeightTensor& loaded = which[5] == 'q' ? l.wq : l.wk;
      auto raw = (*g)->Tensor("blk." + std::to_string(layer) + "." + which + ".weight");
      ASSERT_TRUE(raw.ok());
      ASSERT_EQ(raw->rows, loaded.rows);
      ASSERT_NE(raw->data, loaded.data);  // a re-ordered copy
      const size_t rb = static_cast<size_t>(RowBytes(loaded.type, loaded.cols));
      for (int64_t r = 0; r < loaded.rows; ++r) {
        const int64_t head = r / hd, within = r % hd;
        const int64_t h = within / (hd / 2), i = within % (hd / 2);
        const int64_t src = head * hd + 2 * i + h;
        ASSERT_EQ(std::memcmp(loaded.row(r), raw->row(src), rb), 0)
            << which << " layer " << layer << " row " << r;
      }
    }
    auto v = (*g)->Tensor("blk." + std::to_string(layer) + ".attn_v.weight");
    ASSERT_EQ(v->nbytes, l.wv.nbytes);
    EXPECT_EQ(std::memcmp(v->data, l.wv.data, v->nbytes), 0);
  }
}

// ---- tiny generated models -------------------------------------------------------------------

class TinyModels : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system("python3 -c 'import gguf, numpy' >/dev/null 2>&1") != 0) {
      skip_reason_ = "python3 with the gguf and numpy packages is not available";
      return;
    }
    char tmpl[] = "/tmp/dmsrt_loader_XXXXXX";
    dir_ = mkdtemp(tmpl);
    const std::string script = std::string(DMSRT_SOURCE_DIR) + "/tests/fixtures/make_tiny_model.py";
    const std::vector<std::pair<std::string, std::string>> models = {
        {"llama-gguf", "--arch llama --format gguf"},
        {"llama-hf", "--arch llama --format hf"},
        {"qwen2-gguf", "--arch qwen2 --format gguf"},
        {"qwen2-hf", "--arch qwen2 --format hf"},
        {"qwen3-gguf", "--arch qwen3 --format gguf --head-dim 32"},
        {"qwen3-hf", "--arch qwen3 --format hf --head-dim 32"},
        {"llama-q4_1", "--arch llama --format gguf --quant q4_1 --seed 3"},
        {"llama-q8_0", "--arch llama --format gguf --quant q8_0 --kv-heads 4 --seed 4"},
        {"qwen2-dmsB-gguf", "--arch qwen2 --format gguf --dms-window 8 --dms-variant B"},
        {"qwen3-dmsB-hf-bf16",
         "--arch qwen3 --format hf --quant bf16 --shards 3 "
         "--dms-window 8 --dms-variant B --dms-per layer"},
        {"qwen3-dmsA-gguf", "--arch qwen3 --format gguf --dms-window 16 --dms-per layer"},
        {"qwen3-adapter",
         "--arch qwen3 --format hf --dms-window 12 --dms-variant B "
         "--dms-adapter-file"},
        {"llama-rope-llama3", "--arch llama --format hf --rope-scaling llama3 --rope-factor 8"},
        {"llama-rope-llama3-gguf",
         "--arch llama --format gguf --rope-scaling llama3 --rope-factor 8"},
        {"qwen2-rope-linear-gguf", "--arch qwen2 --format gguf --rope-scaling linear"},
        {"qwen2-rope-yarn-gguf", "--arch qwen2 --format gguf --rope-scaling yarn"},
    };
    std::string cmd = "set -e;";
    for (const auto& [name, args] : models) {
      cmd += " python3 " + script + " --out " + dir_ + "/" + name + " " + args + ";";
    }
    if (std::system(("sh -c '" + cmd + "'").c_str()) != 0) {
      skip_reason_ = "make_tiny_model.py failed";
      FAIL() << "make_tiny_model.py failed: " << cmd;
    }
  }
  static void TearDownTestSuite() {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }
  static std::string Path(const std::string& name) {
    const std::string d = dir_ + "/" + name;
    return fs::exists(d + "/model.gguf") ? d + "/model.gguf" : d;
  }
  static std::unique_ptr<Model> Load(const std::string& name) {
    auto m = LoadModel(Path(name));
    EXPECT_TRUE(m.ok()) << name << ": " << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }
  // A copy of an HF model directory whose config.json is edited by `edit`.
  static std::string EditedCopy(const std::string& name, const std::string& copy,
                                const std::function<void(Json&)>& edit) {
    const std::string dst = dir_ + "/" + copy;
    fs::remove_all(dst);
    fs::copy(dir_ + "/" + name, dst, fs::copy_options::recursive);
    std::ifstream in(dst + "/config.json");
    Json j = Json::parse(in);
    edit(j);
    std::ofstream(dst + "/config.json") << j.dump(1);
    return dst;
  }
  static std::string dir_;
  static std::string skip_reason_;
};
std::string TinyModels::dir_;
std::string TinyModels::skip_reason_;

void ExpectSameModel(const Model& a, const Model& b) {
  const ModelConfig& x = a.config;
  const ModelConfig& y = b.config;
  EXPECT_EQ(x.arch, y.arch);
  EXPECT_EQ(x.n_layers, y.n_layers);
  EXPECT_EQ(x.hidden, y.hidden);
  EXPECT_EQ(x.n_heads, y.n_heads);
  EXPECT_EQ(x.n_kv_heads, y.n_kv_heads);
  EXPECT_EQ(x.head_dim, y.head_dim);
  EXPECT_EQ(x.ffn, y.ffn);
  EXPECT_EQ(x.vocab, y.vocab);
  EXPECT_EQ(x.max_positions, y.max_positions);
  EXPECT_FLOAT_EQ(x.rms_eps, y.rms_eps);
  EXPECT_FLOAT_EQ(x.rope_theta, y.rope_theta);
  EXPECT_EQ(x.rope_scaling.type, y.rope_scaling.type);
  EXPECT_FLOAT_EQ(x.rope_scaling.factor, y.rope_scaling.factor);
  EXPECT_EQ(x.tied_embeddings, y.tied_embeddings);
  EXPECT_EQ(x.attn_bias, y.attn_bias);
  EXPECT_EQ(x.qk_norm, y.qk_norm);
  EXPECT_EQ(x.dms.enabled, y.dms.enabled);
  EXPECT_EQ(x.dms.window, y.dms.window);
  EXPECT_EQ(x.dms.separate_alpha, y.dms.separate_alpha);
  EXPECT_EQ(x.dms.alpha_per_layer, y.dms.alpha_per_layer);
  auto ta = AllTensors(a);
  auto tb = AllTensors(b);
  ASSERT_EQ(ta.size(), tb.size());
  for (size_t i = 0; i < ta.size(); ++i) {
    const WeightTensor& p = *ta[i].second;
    const WeightTensor& q = *tb[i].second;
    ASSERT_EQ(p.present(), q.present()) << ta[i].first;
    if (!p.present()) continue;
    EXPECT_EQ(p.type, q.type) << ta[i].first;
    EXPECT_EQ(p.shape, q.shape) << ta[i].first;
    ASSERT_EQ(p.nbytes, q.nbytes) << ta[i].first;
    EXPECT_EQ(std::memcmp(p.data, q.data, p.nbytes), 0) << ta[i].first << " differs";
  }
  EXPECT_EQ(a.weight_bytes, b.weight_bytes);
}

TEST_F(TinyModels, GgufAndHfOfOneSeedAreIdentical) {
  for (const char* arch : {"llama", "qwen2", "qwen3"}) {
    SCOPED_TRACE(arch);
    auto g = Load(std::string(arch) + "-gguf");
    auto h = Load(std::string(arch) + "-hf");
    ASSERT_TRUE(g && h);
    EXPECT_EQ(g->source_format, "gguf");
    EXPECT_EQ(h->source_format, "hf");
    ExpectSameModel(*g, *h);
    EXPECT_EQ(g->config.n_layers, 2);
    EXPECT_EQ(g->config.hidden, 64);
    EXPECT_EQ(g->config.n_heads, 4);
    EXPECT_EQ(g->config.n_kv_heads, 2);
    EXPECT_EQ(g->config.ffn, 128);
    EXPECT_EQ(g->config.vocab, 272);
    EXPECT_EQ(g->config.max_positions, 2048);
    // The tokenizer description agrees between GGUF metadata and tokenizer.json.
    EXPECT_EQ(g->tokenizer.tokens, h->tokenizer.tokens);
    EXPECT_EQ(g->tokenizer.eos_id, h->tokenizer.eos_id);
    EXPECT_EQ(g->tokenizer.eos_ids, h->tokenizer.eos_ids);
    EXPECT_EQ(g->tokenizer.merges, h->tokenizer.merges);
  }
}

TEST_F(TinyModels, ArchitectureSpecifics) {
  auto llama = Load("llama-gguf");
  auto qwen2 = Load("qwen2-gguf");
  auto qwen3 = Load("qwen3-hf");
  ASSERT_TRUE(llama && qwen2 && qwen3);
  EXPECT_EQ(llama->config.arch, Arch::kLlama);
  EXPECT_TRUE(llama->config.tied_embeddings);
  EXPECT_FLOAT_EQ(llama->config.rope_theta, 10000.0f);
  EXPECT_EQ(qwen2->config.arch, Arch::kQwen2);
  EXPECT_TRUE(qwen2->config.attn_bias);
  EXPECT_FALSE(qwen2->config.tied_embeddings);
  EXPECT_EQ(qwen2->weights.layers[1].bk.shape, (std::vector<int64_t>{32}));
  EXPECT_EQ(qwen3->config.arch, Arch::kQwen3);
  EXPECT_TRUE(qwen3->config.qk_norm);
  EXPECT_EQ(qwen3->config.head_dim, 32);  // != hidden / heads
  EXPECT_EQ(qwen3->weights.layers[0].wq.shape, (std::vector<int64_t>{128, 64}));
  EXPECT_EQ(qwen3->weights.layers[0].wo.shape, (std::vector<int64_t>{64, 128}));
  EXPECT_EQ(qwen3->weights.layers[0].q_norm.shape, (std::vector<int64_t>{32}));
  // Tokenizer: the end-of-turn control tokens of the tiny vocabulary.
  const TokenizerSpec& t = llama->tokenizer;
  EXPECT_EQ(t.model, "gpt2");
  EXPECT_EQ(t.tokens.size(), 272u);
  const int32_t im_end = t.eos_id;
  EXPECT_EQ(t.tokens[static_cast<size_t>(im_end)], "<|im_end|>");
  const int32_t eot = 256 + 10;  // bytes + merges, then <|endoftext|>
  EXPECT_EQ(t.tokens[static_cast<size_t>(eot)], "<|endoftext|>");
  EXPECT_EQ(t.eos_ids, (std::vector<int32_t>{eot, im_end}));
}

TEST_F(TinyModels, QuantizedGgufKeepsBlocksAndUnpermutesRows) {
  for (const char* name : {"llama-q4_1", "llama-q8_0"}) {
    SCOPED_TRACE(name);
    auto m = Load(name);
    ASSERT_TRUE(m);
    const DType want = std::string(name) == "llama-q4_1" ? DType::kQ4_1 : DType::kQ8_0;
    EXPECT_EQ(m->weights.layers[0].wq.type, want);
    EXPECT_EQ(m->weights.tok_embd.type, want);
    EXPECT_EQ(m->weights.layers[0].attn_norm.type, DType::kF32);
    auto g = GgufFile::Open(Path(name));
    ASSERT_TRUE(g.ok());
    const int hd = m->config.head_dim;
    const WeightTensor& wk = m->weights.layers[1].wk;
    auto raw = (*g)->Tensor("blk.1.attn_k.weight");
    ASSERT_TRUE(raw.ok());
    for (int64_t r = 0; r < wk.rows; ++r) {
      const int64_t head = r / hd, within = r % hd;
      const int64_t src = head * hd + 2 * (within % (hd / 2)) + within / (hd / 2);
      ASSERT_EQ(std::memcmp(wk.row(r), raw->row(src), RowBytes(wk.type, wk.cols)), 0) << r;
    }
  }
}

TEST_F(TinyModels, DmsVariantBInGgufAndShardedBf16Hf) {
  auto g = Load("qwen2-dmsB-gguf");
  ASSERT_TRUE(g);
  EXPECT_TRUE(g->config.dms.enabled);
  EXPECT_EQ(g->config.dms.window, 8);
  EXPECT_TRUE(g->config.dms.separate_alpha);
  EXPECT_FALSE(g->config.dms.alpha_per_layer);
  EXPECT_EQ(g->config.dms.paged_block_size, 4);
  EXPECT_FLOAT_EQ(g->config.dms.alpha_scale, 100.0f);
  EXPECT_FLOAT_EQ(g->config.dms.initial_alpha_offset, 5.0f);
  EXPECT_EQ(g->config.dms.cr_label, "8x");
  EXPECT_EQ(g->weights.layers[1].dms_alpha.shape, (std::vector<int64_t>{2, 64}));
  EXPECT_EQ(g->weights.layers[1].dms_alpha_norm.shape, (std::vector<int64_t>{64}));
  EXPECT_EQ(g->weights.layers[1].dms_alpha_bias.shape, (std::vector<int64_t>{2}));

  auto h = Load("qwen3-dmsB-hf-bf16");
  ASSERT_TRUE(h);
  EXPECT_TRUE(h->config.dms.separate_alpha);
  EXPECT_TRUE(h->config.dms.alpha_per_layer);
  EXPECT_EQ(h->weights.layers[0].wq.type, DType::kBF16);
  EXPECT_EQ(h->weights.layers[0].q_norm.type, DType::kF32);  // 1-D tensors stay F32
  EXPECT_EQ(h->weights.layers[1].dms_alpha.type, DType::kBF16);
  EXPECT_FALSE(h->weights.layers[1].dms_alpha_bias.present());
}

TEST_F(TinyModels, DmsVariantA) {
  auto m = Load("qwen3-dmsA-gguf");
  ASSERT_TRUE(m);
  EXPECT_TRUE(m->config.dms.enabled);
  EXPECT_EQ(m->config.dms.window, 16);
  EXPECT_FALSE(m->config.dms.separate_alpha);
  EXPECT_TRUE(m->config.dms.alpha_per_layer);
  EXPECT_EQ(m->config.dms.paged_block_size, 8);
  EXPECT_FALSE(m->weights.layers[0].dms_alpha.present());
}

TEST_F(TinyModels, AttachDmsAdapter) {
  auto m = Load("qwen3-adapter");
  ASSERT_TRUE(m);
  EXPECT_FALSE(m->config.dms.enabled);
  const int64_t before = m->weight_bytes;
  const std::string adapter = dir_ + "/qwen3-adapter/dms_adapter.safetensors";
  absl::Status s = AttachDmsAdapter(*m, adapter);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(m->config.dms.enabled);
  EXPECT_EQ(m->config.dms.window, 12);
  EXPECT_TRUE(m->config.dms.separate_alpha);
  EXPECT_EQ(m->config.dms.paged_block_size, 8);
  EXPECT_EQ(m->weights.layers[1].dms_alpha.shape, (std::vector<int64_t>{2, 64}));
  EXPECT_GT(m->weight_bytes, before);
  s = AttachDmsAdapter(*m, adapter);
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  // An adapter whose shapes do not fit the model (4 KV heads, not 2) is refused and leaves the
  // model as it was.
  auto other = Load("llama-q8_0");
  ASSERT_TRUE(other);
  s = AttachDmsAdapter(*other, adapter);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(HasSubstr(s, "expected [4, 64]")) << s;
  EXPECT_FALSE(other->config.dms.enabled);
  EXPECT_FALSE(other->weights.layers[0].dms_alpha.present());
  EXPECT_TRUE(absl::IsNotFound(AttachDmsAdapter(*other, dir_ + "/nope.safetensors")));
  // The same adapter fits another model with 2 KV heads and hidden 64 that has no DMS config:
  // the adapter's metadata supplies it.
  auto llama = Load("llama-hf");
  ASSERT_TRUE(llama);
  s = AttachDmsAdapter(*llama, adapter);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(llama->config.dms.window, 12);
}

// Writes a safetensors file of F32 tensors with the given metadata.
void WriteF32Safetensors(const std::string& path,
                         const std::map<std::string, std::pair<std::vector<int64_t>,
                                                               std::vector<float>>>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  nlohmann::json h = nlohmann::json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::string data;
  for (const auto& [name, t] : tensors) {
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(t.second.data()), t.second.size() * sizeof(float));
    h[name] = {{"dtype", "F32"}, {"shape", t.first}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string header = h.dump();
  const uint64_t n = header.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
}

// A malformed adapter file is refused with a message that names the tensor at fault, and the
// model is left as it was.
TEST_F(TinyModels, MalformedDmsAdapters) {
  auto base = SafetensorsFile::Open(dir_ + "/qwen3-adapter/dms_adapter.safetensors");
  ASSERT_TRUE(base.ok()) << base.status();
  using Tensors = std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>;
  Tensors good;
  for (const SafetensorsTensorInfo& t : (*base)->tensors()) {
    ASSERT_EQ(t.type, DType::kF32) << t.name;
    WeightTensor w = (*base)->View(t);
    std::vector<float> v(static_cast<size_t>(w.numel()));
    std::memcpy(v.data(), w.data, v.size() * sizeof(float));
    good[t.name] = {t.shape, v};
  }
  const std::map<std::string, std::string> meta = (*base)->metadata();
  const std::string a0 = "model.layers.0.self_attn.dms_proj_alpha.weight";
  const std::string n1 = "model.layers.1.self_attn.dms_proj_alpha_norm.weight";
  ASSERT_TRUE(good.count(a0) && good.count(n1));
  struct Case {
    std::string name;
    std::function<void(Tensors&)> edit;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"missing_norm", [&](Tensors& t) { t.erase(n1); }, "'" + n1 + "' is missing"},
      {"missing_layer",
       [&](Tensors& t) {
         for (auto it = t.begin(); it != t.end();) {
           it = it->first.rfind("model.layers.1.", 0) == 0 ? t.erase(it) : std::next(it);
         }
       },
       "'model.layers.1.self_attn.dms_proj_alpha.weight' is missing"},
      {"nan", [&](Tensors& t) { t[a0].second[3] = std::nanf(""); },
       "'" + a0 + "' has the value nan at element 3"},
      {"inf", [&](Tensors& t) { t[n1].second[0] = INFINITY; }, "'" + n1 + "' has the value inf"},
      {"shape", [&](Tensors& t) { t[a0] = {{3, 64}, std::vector<float>(3 * 64, 0.f)}; },
       "'" + a0 + "' has shape [3, 64], expected [2, 64]"},
      {"extra_layer",
       [&](Tensors& t) {
         t["model.layers.2.self_attn.dms_proj_alpha.weight"] = t[a0];
       },
       "'model.layers.2.self_attn.dms_proj_alpha.weight' is for layer 2, but the model has 2 "
       "layers"},
      {"stranger", [&](Tensors& t) { t["lm_head.weight"] = t[a0]; },
       "'lm_head.weight' is not a DMS adapter tensor"},
      {"empty", [&](Tensors& t) { t.clear(); }, "no DMS adapter tensors"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Tensors t = good;
    c.edit(t);
    const std::string path = dir_ + "/bad-adapter-" + c.name + ".safetensors";
    WriteF32Safetensors(path, t, meta);
    auto m = Load("qwen3-adapter");
    ASSERT_TRUE(m);
    absl::Status s = AttachDmsAdapter(*m, path);
    ASSERT_FALSE(s.ok());
    EXPECT_TRUE(HasSubstr(s, c.needle)) << s;
    EXPECT_TRUE(HasSubstr(s, path)) << s;
    EXPECT_FALSE(m->config.dms.enabled);
    EXPECT_FALSE(m->weights.layers[0].dms_alpha.present());
  }
  // The unedited tensors, written the same way, load.
  const std::string ok_path = dir_ + "/rewritten-adapter.safetensors";
  WriteF32Safetensors(ok_path, good, meta);
  auto m = Load("qwen3-adapter");
  ASSERT_TRUE(m);
  absl::Status s = AttachDmsAdapter(*m, ok_path);
  EXPECT_TRUE(s.ok()) << s;
}

TEST_F(TinyModels, RopeScaling) {
  auto h = Load("llama-rope-llama3");
  auto g = Load("llama-rope-llama3-gguf");
  auto lin = Load("qwen2-rope-linear-gguf");
  ASSERT_TRUE(h && g && lin);
  for (const Model* m : {h.get(), g.get()}) {
    EXPECT_EQ(m->config.rope_scaling.type, RopeScaling::Type::kLlama3);
    EXPECT_FLOAT_EQ(m->config.rope_scaling.factor, 8.0f);
    EXPECT_FLOAT_EQ(m->config.rope_scaling.low_freq_factor, 1.0f);
    EXPECT_FLOAT_EQ(m->config.rope_scaling.high_freq_factor, 4.0f);
    EXPECT_EQ(m->config.rope_scaling.original_max_positions, 512);
  }
  EXPECT_EQ(lin->config.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_FLOAT_EQ(lin->config.rope_scaling.factor, 4.0f);
  auto yarn = LoadModel(Path("qwen2-rope-yarn-gguf"));
  ASSERT_FALSE(yarn.ok());
  EXPECT_TRUE(absl::IsUnimplemented(yarn.status())) << yarn.status();
  EXPECT_TRUE(HasSubstr(yarn.status(), "YaRN")) << yarn.status();
}

TEST_F(TinyModels, RefusedConfigurations) {
  struct Case {
    const char* name;
    std::function<void(Json&)> edit;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"arch",
       [](Json& j) {
         j["model_type"] = "mistral";
         j["architectures"] = {"MistralForCausalLM"};
       },
       "mistral"},
      {"sliding", [](Json& j) { j["use_sliding_window"] = true; }, "use_sliding_window"},
      {"layer_types",
       [](Json& j) {
         j["layer_types"] = {"full_attention", "sliding_attention"};
       },
       "sliding_attention"},
      {"yarn",
       [](Json& j) {
         j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
       },
       "'yarn'"},
      {"ffn", [](Json& j) { j["intermediate_size"] = 96; }, "expected [96, 64]"},
      {"heads", [](Json& j) { j["num_key_value_heads"] = 3; }, "not a multiple of KV heads"},
      {"dms_block",
       [](Json& j) {
         j["dms_window_size"] = 8;
         j["dms_paged_attention_block_size"] = 8;
       },
       "must be at least 1 and below dms_window_size 8"},
      {"dms_per",
       [](Json& j) {
         j["dms_window_size"] = 8;
         j["dms_alpha_per"] = "token";
       },
       "dms_alpha_per"},
      {"dms_sep",
       [](Json& j) {
         j["dms_window_size"] = 8;
         j["dms_separate_alpha"] = true;
       },
       "adapter tensors"},
      {"qwen3_no_norm", [](Json& j) { j["model_type"] = "qwen3"; }, "q_norm"},
      {"missing_key", [](Json& j) { j.erase("hidden_size"); }, "'hidden_size'"},
      {"bad_type", [](Json& j) { j["num_hidden_layers"] = "two"; }, "'num_hidden_layers'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string d = EditedCopy("llama-hf", std::string("bad-") + c.name, c.edit);
    auto m = LoadModel(d);
    ASSERT_FALSE(m.ok());
    EXPECT_TRUE(HasSubstr(m.status(), c.needle)) << m.status();
    EXPECT_TRUE(HasSubstr(m.status(), d)) << m.status();
  }
  auto missing = LoadModel(dir_ + "/does-not-exist");
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  // A directory without the weights named by the config.
  const std::string d =
      EditedCopy("llama-hf", "bad-layers", [](Json& j) { j["num_hidden_layers"] = 3; });
  auto m = LoadModel(d);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(HasSubstr(m.status(), "model.layers.2.input_layernorm.weight")) << m.status();
}

std::vector<uint8_t> ReadBytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}
void WriteBytes(const std::string& p, const std::vector<uint8_t>& b) {
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

TEST_F(TinyModels, RefusedGgufFiles) {
  const std::vector<uint8_t> good = ReadBytes(Path("llama-gguf"));
  // general.architecture "llama" -> "gemma" (same length).
  std::vector<uint8_t> b = good;
  const std::string key = "general.architecture";
  auto it = std::search(b.begin(), b.end(), key.begin(), key.end());
  ASSERT_NE(it, b.end());
  auto val = std::search(it, b.end(), std::begin("llama"), std::begin("llama") + 5);
  std::memcpy(&*val, "gemma", 5);
  const std::string p1 = dir_ + "/gemma.gguf";
  WriteBytes(p1, b);
  auto m = LoadModel(p1);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(absl::IsUnimplemented(m.status())) << m.status();
  EXPECT_TRUE(HasSubstr(m.status(), "unsupported architecture 'gemma'")) << m.status();
  EXPECT_TRUE(HasSubstr(m.status(), p1));
  // Truncated file.
  const std::string p2 = dir_ + "/cut.gguf";
  WriteBytes(p2, std::vector<uint8_t>(good.begin(), good.begin() + good.size() / 2));
  m = LoadModel(p2);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(HasSubstr(m.status(), "runs past the end of the file")) << m.status();
  EXPECT_TRUE(HasSubstr(m.status(), p2));
  // GGUF recognised by its magic whatever the file is called.
  const std::string noext = dir_ + "/model_without_extension";
  WriteBytes(noext, good);
  auto by_magic = LoadModel(noext);
  ASSERT_TRUE(by_magic.ok()) << by_magic.status();
  EXPECT_EQ((*by_magic)->source_format, "gguf");
  // Not a model at all.
  const std::string p3 = dir_ + "/notes.txt";
  WriteBytes(p3, {'h', 'e', 'l', 'l', 'o'});
  m = LoadModel(p3);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(HasSubstr(m.status(), "not a GGUF file")) << m.status();
  // A shape that does not match the config: embedding_length patched 64 -> 65.
  b = good;
  const std::string emb = "llama.embedding_length";
  it = std::search(b.begin(), b.end(), emb.begin(), emb.end());
  ASSERT_NE(it, b.end());
  uint8_t* v = &*(it + static_cast<std::ptrdiff_t>(emb.size()) + 4);  // after the type id
  uint32_t hidden;
  std::memcpy(&hidden, v, 4);
  ASSERT_EQ(hidden, 64u);
  hidden = 96;
  std::memcpy(v, &hidden, 4);
  const std::string p4 = dir_ + "/hidden.gguf";
  WriteBytes(p4, b);
  m = LoadModel(p4);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(HasSubstr(m.status(), "has shape [272, 64], expected [272, 96]")) << m.status();
}

// Seeded byte flips in the metadata and tensor-info region of a tiny GGUF: LoadModel must
// return a model or an error for every variant, never crash.
TEST_F(TinyModels, RandomHeaderFlipsSeed7NeverCrash) {
  const std::vector<uint8_t> good = ReadBytes(Path("qwen2-gguf"));
  auto g = GgufFile::Open(Path("qwen2-gguf"));
  ASSERT_TRUE(g.ok());
  const size_t header = static_cast<size_t>((*g)->data_offset());
  std::mt19937_64 rng(7);
  const std::string p = dir_ + "/flipped.gguf";
  int loaded = 0, refused = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::vector<uint8_t> b = good;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) b[rng() % header] = static_cast<uint8_t>(rng());
    WriteBytes(p, b);
    auto m = LoadModel(p);
    if (m.ok()) {
      ++loaded;
    } else {
      ++refused;
      EXPECT_TRUE(HasSubstr(m.status(), p)) << m.status();
    }
  }
  EXPECT_EQ(loaded + refused, 300);
}

}  // namespace
}  // namespace dmsrt
