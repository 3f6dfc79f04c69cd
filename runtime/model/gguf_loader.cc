// LoadGguf: a GGUF file (v2/v3, runtime/model/gguf.h) into the normalised Model. The weights stay
// in the memory-mapped file, which the Model owns; the only copies are the Q/K projections of
// `llama` files, whose rows are re-ordered (UnpermuteRopeRows below).
//
// DMS fields (our own keys, written by tests/fixtures/make_tiny_model.py and any converter that
// wants DMS):
//   dmsrt.dms.window_size           u32/i32   (required for DMS)
//   dmsrt.dms.alpha_scale           f32       (100)
//   dmsrt.dms.initial_alpha_offset  f32       (5)
//   dmsrt.dms.separate_alpha        bool      (false; true iff adapter tensors are present)
//   dmsrt.dms.alpha_per             string    "head" | "layer"
//   dmsrt.dms.paged_block_size      u32/i32   (256; must be below the window)
//   dmsrt.dms.cr                    string    (label only)
// and tensors `blk.{i}.dms_alpha.weight` [n_kv_heads, hidden], `blk.{i}.dms_alpha_norm.weight`
// [hidden], `blk.{i}.dms_alpha.bias` [n_kv_heads]. Adapter tensors present => Variant B.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "parallel/status_macros.h"
#include "runtime/model/gguf.h"
#include "runtime/model/loader_internal.h"
#include "runtime/model/tensor_names.h"

namespace dmsrt {
namespace loader {
namespace {

// ---- RoPE row order --------------------------------------------------------------------------
// llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) stores the Q and K
// projections of `llama`-architecture files with their rows re-ordered for GGML's interleaved
// ("normal") RoPE, which rotates channel pairs (2i, 2i+1): per head of head_dim rows it applies
// reshape(n_head, 2, head_dim/2, ...).swapaxes(1, 2), i.e.
//     GGUF row 2*i + h  <-  original row h*head_dim/2 + i      (h in {0, 1}, i < head_dim/2).
// The runtime uses rotate-half RoPE everywhere (channel i pairs with i + head_dim/2), which is the
// original Hugging Face order, so we invert the permutation here: whole rows are copied (quantized
// blocks included; a row is never split), and 1-D biases get the same treatment element-wise.
// Qwen2/Qwen3 GGUF files and all Hugging Face checkpoints are already in rotate-half order.
absl::StatusOr<WeightTensor> UnpermuteRopeRows(LoadedModel& m, const WeightTensor& w,
                                               int32_t n_heads, int32_t head_dim) {
  const std::string& file = m.source_path;
  WeightTensor out = w;
  const bool is_bias = w.shape.size() == 1;
  const int64_t total_rows = is_bias ? w.cols : w.rows;
  if (total_rows != int64_t{n_heads} * head_dim || head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": tensor '", w.name, "' has ", total_rows,
                     " rows, expected n_heads*head_dim = ", int64_t{n_heads} * head_dim));
  }
  if (is_bias && BlockSize(w.type) != 1) {
    return absl::UnimplementedError(
        absl::StrCat(file, ": bias '", w.name, "' is quantized (", DTypeName(w.type), ")"));
  }
  const size_t row_bytes = is_bias ? static_cast<size_t>(BlockBytes(w.type))
                                   : static_cast<size_t>(RowBytes(w.type, w.cols));
  std::unique_ptr<uint8_t[]> buf(new uint8_t[w.nbytes]);
  const int64_t half = head_dim / 2;
  for (int64_t head = 0; head < n_heads; ++head) {
    const int64_t base = head * head_dim;
    for (int64_t h = 0; h < 2; ++h) {
      for (int64_t i = 0; i < half; ++i) {
        const int64_t dst = base + h * half + i;  // rotate-half (original) order
        const int64_t src = base + 2 * i + h;     // interleaved (GGUF) order
        std::memcpy(buf.get() + dst * row_bytes, w.data + src * row_bytes, row_bytes);
      }
    }
  }
  out.data = buf.get();
  m.buffers.push_back(std::move(buf));
  return out;
}

// ---- Llama-3 RoPE factors --------------------------------------------------------------------

// Per-frequency factors of Llama-3.1 RoPE scaling (as llama.cpp's converter stores them in the
// `rope_freqs.weight` tensor): 1 for short wavelengths, `factor` for long ones, smooth between.
std::vector<double> Llama3Factors(const RopeScaling& s, double theta, int head_dim) {
  std::vector<double> f;
  const double low_wavelen = s.original_max_positions / s.low_freq_factor;
  const double high_wavelen = s.original_max_positions / s.high_freq_factor;
  for (int i = 0; i < head_dim / 2; ++i) {
    const double freq = 1.0 / std::pow(theta, 2.0 * i / head_dim);
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      f.push_back(1.0);
    } else if (wavelen > low_wavelen) {
      f.push_back(s.factor);
    } else {
      const double smooth = (s.original_max_positions / wavelen - s.low_freq_factor) /
                            (s.high_freq_factor - s.low_freq_factor);
      f.push_back(1.0 / ((1 - smooth) / s.factor + smooth));
    }
  }
  return f;
}

// ---- GGUF ------------------------------------------------------------------------------------

absl::StatusOr<int32_t> GgufI32(const GgufFile& g, const std::string& key,
                                std::optional<int32_t> def) {
  if (!g.Has(key)) {
    if (def) return *def;
    return absl::InvalidArgumentError(
        absl::StrCat(g.path(), ": required key '", key, "' is missing"));
  }
  DMSRT_ASSIGN_OR_RETURN(int64_t v, g.GetInt(key));
  if (v < 0 || v > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(g.path(), ": '", key, "' = ", v, " is out of range"));
  }
  return static_cast<int32_t>(v);
}

absl::StatusOr<TokenizerSpec> GgufTokenizer(const GgufFile& g) {
  TokenizerSpec t;
  if (!g.Has("tokenizer.ggml.model")) {
    return absl::InvalidArgumentError(
        absl::StrCat(g.path(), ": no tokenizer (key 'tokenizer.ggml.model' is missing)"));
  }
  DMSRT_ASSIGN_OR_RETURN(t.model, g.GetString("tokenizer.ggml.model"));
  DMSRT_ASSIGN_OR_RETURN(auto pre, g.GetOptionalString("tokenizer.ggml.pre"));
  t.pre = pre.value_or("default");
  DMSRT_ASSIGN_OR_RETURN(t.tokens, g.GetStringArray("tokenizer.ggml.tokens"));
  if (g.Has("tokenizer.ggml.token_type")) {
    DMSRT_ASSIGN_OR_RETURN(t.token_types, g.GetInt32Array("tokenizer.ggml.token_type"));
    if (t.token_types.size() != t.tokens.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(g.path(), ": tokenizer.ggml.token_type has ", t.token_types.size(),
                       " entries but there are ", t.tokens.size(), " tokens"));
    }
  }
  if (g.Has("tokenizer.ggml.merges")) {
    DMSRT_ASSIGN_OR_RETURN(t.merges, g.GetStringArray("tokenizer.ggml.merges"));
  }
  const int64_t n = static_cast<int64_t>(t.tokens.size());
  auto id = [&](const char* key, int32_t* out) -> absl::Status {
    DMSRT_ASSIGN_OR_RETURN(auto v, g.GetOptionalInt(key));
    if (!v) return absl::OkStatus();
    if (*v < 0 || *v >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat(g.path(), ": '", key, "' = ", *v, " is outside the vocabulary of ", n));
    }
    *out = static_cast<int32_t>(*v);
    return absl::OkStatus();
  };
  DMSRT_RETURN_IF_ERROR(id("tokenizer.ggml.bos_token_id", &t.bos_id));
  DMSRT_RETURN_IF_ERROR(id("tokenizer.ggml.eos_token_id", &t.eos_id));
  DMSRT_RETURN_IF_ERROR(id("tokenizer.ggml.padding_token_id", &t.pad_id));
  DMSRT_RETURN_IF_ERROR(id("tokenizer.ggml.unknown_token_id", &t.unk_id));
  std::vector<int32_t> extra;
  for (const char* key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    int32_t v = -1;
    DMSRT_RETURN_IF_ERROR(id(key, &v));
    if (v >= 0) extra.push_back(v);
  }
  if (g.Has("tokenizer.ggml.eos_token_ids")) {
    DMSRT_ASSIGN_OR_RETURN(auto ids, g.GetInt32Array("tokenizer.ggml.eos_token_ids"));
    for (int32_t e : ids) {
      if (e < 0 || e >= n) {
        return absl::InvalidArgumentError(absl::StrCat(
            g.path(), ": tokenizer.ggml.eos_token_ids holds ", e, ", outside the vocabulary"));
      }
      extra.push_back(e);
    }
  }
  DMSRT_ASSIGN_OR_RETURN(auto add_bos, g.GetOptionalBool("tokenizer.ggml.add_bos_token"));
  t.add_bos = add_bos.value_or(false);
  DMSRT_ASSIGN_OR_RETURN(auto tmpl, g.GetOptionalString("tokenizer.chat_template"));
  t.chat_template = tmpl.value_or("");
  CollectEosIds(t, extra);
  return t;
}

// ---- hyper-parameters ------------------------------------------------------------------------

absl::StatusOr<Arch> GgufArch(const std::string& path, const std::string& arch) {
  if (arch == "llama") return Arch::kLlama;
  if (arch == "qwen2") return Arch::kQwen2;
  if (arch == "qwen3") return Arch::kQwen3;
  return absl::UnimplementedError(absl::StrCat(path, ": unsupported architecture '", arch,
                                               "' (supported: llama, qwen2, qwen3)"));
}

// The sizes and constants under `a` ("<arch>."); the vocabulary size comes from the embedding.
absl::Status ReadGgufHyperParams(const GgufFile& g, const std::string& a, ModelConfig& c) {
  const std::string& path = g.path();
  DMSRT_ASSIGN_OR_RETURN(auto name, g.GetOptionalString("general.name"));
  c.name = name.value_or("");
  DMSRT_ASSIGN_OR_RETURN(c.n_layers, GgufI32(g, a + "block_count", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.hidden, GgufI32(g, a + "embedding_length", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.n_heads, GgufI32(g, a + "attention.head_count", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.n_kv_heads, GgufI32(g, a + "attention.head_count_kv", c.n_heads));
  if (c.n_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": attention.head_count is 0"));
  }
  DMSRT_ASSIGN_OR_RETURN(c.head_dim, GgufI32(g, a + "attention.key_length", c.hidden / c.n_heads));
  DMSRT_ASSIGN_OR_RETURN(int32_t v_len, GgufI32(g, a + "attention.value_length", c.head_dim));
  if (v_len != c.head_dim) {
    return absl::UnimplementedError(
        absl::StrCat(path, ": value_length ", v_len, " differs from key_length ", c.head_dim));
  }
  DMSRT_ASSIGN_OR_RETURN(c.ffn, GgufI32(g, a + "feed_forward_length", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.max_positions, GgufI32(g, a + "context_length", 4096));
  DMSRT_ASSIGN_OR_RETURN(c.rope_dim, GgufI32(g, a + "rope.dimension_count", c.head_dim));
  DMSRT_ASSIGN_OR_RETURN(auto eps, g.GetOptionalFloat(a + "attention.layer_norm_rms_epsilon"));
  c.rms_eps = static_cast<float>(eps.value_or(1e-5));
  DMSRT_ASSIGN_OR_RETURN(auto theta, g.GetOptionalFloat(a + "rope.freq_base"));
  c.rope_theta = static_cast<float>(theta.value_or(10000.0));
  for (const char* k : {"attention.sliding_window", "attention.sliding_window_pattern"}) {
    if (g.Has(a + k)) {
      return absl::UnimplementedError(
          absl::StrCat(path, ": sliding-window attention ('", a + k,
                       "') is not supported; DMS needs every layer to use full attention"));
    }
  }
  return absl::OkStatus();
}

// The rope.scaling.* keys (and the older rope.scale_linear).
absl::Status ReadGgufRopeScaling(const GgufFile& g, const std::string& a, RopeScaling& rs) {
  const std::string& path = g.path();
  DMSRT_ASSIGN_OR_RETURN(auto stype, g.GetOptionalString(a + "rope.scaling.type"));
  DMSRT_ASSIGN_OR_RETURN(auto sfactor, g.GetOptionalFloat(a + "rope.scaling.factor"));
  DMSRT_ASSIGN_OR_RETURN(auto sorig, g.GetOptionalInt(a + "rope.scaling.original_context_length"));
  DMSRT_ASSIGN_OR_RETURN(auto slow, g.GetOptionalFloat(a + "rope.scaling.low_freq_factor"));
  DMSRT_ASSIGN_OR_RETURN(auto shigh, g.GetOptionalFloat(a + "rope.scaling.high_freq_factor"));
  DMSRT_ASSIGN_OR_RETURN(auto old_linear, g.GetOptionalFloat(a + "rope.scale_linear"));
  if (sorig) rs.original_max_positions = static_cast<int32_t>(*sorig);
  if (slow) rs.low_freq_factor = static_cast<float>(*slow);
  if (shigh) rs.high_freq_factor = static_cast<float>(*shigh);
  if (stype && *stype == "yarn") {
    return absl::UnimplementedError(absl::StrCat(path, ": YaRN RoPE scaling is not supported"));
  } else if (stype && *stype == "linear") {
    rs.type = RopeScaling::Type::kLinear;
    rs.factor = static_cast<float>(sfactor.value_or(1.0));
  } else if (stype && *stype == "llama3") {
    rs.type = RopeScaling::Type::kLlama3;
    rs.factor = static_cast<float>(sfactor.value_or(8.0));
  } else if (stype && *stype != "none") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": RoPE scaling type '", *stype, "' is not supported"));
  } else if (!stype && old_linear && *old_linear != 1.0) {
    rs.type = RopeScaling::Type::kLinear;
    rs.factor = static_cast<float>(*old_linear);
  }
  if (rs.type != RopeScaling::Type::kNone &&
      (!(rs.factor > 0) || !std::isfinite(rs.factor) || rs.original_max_positions < 1 ||
       !(rs.high_freq_factor > rs.low_freq_factor))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid RoPE scaling parameters"));
  }
  return absl::OkStatus();
}

// Llama-3.1 files carry their scaling as per-frequency factors (`rope_freqs.weight`); recognises
// them as Llama-3 scaling with the file's parameters, or refuses them.
absl::Status ReadGgufRopeFreqs(const GgufFile& g, ModelConfig& c) {
  const GgufTensorInfo* rf = g.FindTensor("rope_freqs.weight");
  if (rf == nullptr) return absl::OkStatus();
  const std::string& path = g.path();
  RopeScaling& rs = c.rope_scaling;
  WeightTensor w = g.View(*rf);
  if (w.type != DType::kF32 || w.numel() != c.head_dim / 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rope_freqs.weight must be F32 [head_dim/2]"));
  }
  std::vector<float> f(static_cast<size_t>(w.numel()));
  std::memcpy(f.data(), w.data, f.size() * sizeof(float));
  float mx = 0;
  for (float x : f) mx = std::max(mx, x);
  RopeScaling cand = rs;
  cand.type = RopeScaling::Type::kLlama3;
  cand.factor = mx;
  std::vector<double> want = Llama3Factors(cand, c.rope_theta, c.head_dim);
  bool match = true;
  for (size_t i = 0; i < f.size(); ++i) {
    if (std::fabs(f[i] - want[i]) > 1e-3 * std::max(1.0, want[i])) match = false;
  }
  if (mx == 1.0f) {
    // all ones: no scaling
  } else if (match) {
    rs = cand;
  } else {
    return absl::UnimplementedError(absl::StrCat(
        path,
        ": rope_freqs.weight holds per-frequency factors that are not Llama-3 scaling "
        "with the file's parameters"));
  }
  return absl::OkStatus();
}

// The dmsrt.dms.* keys (see the top of this file).
absl::Status ReadGgufDms(const GgufFile& g, DmsConfig& d) {
  const std::string& path = g.path();
  DMSRT_ASSIGN_OR_RETURN(auto dwin, g.GetOptionalInt("dmsrt.dms.window_size"));
  DMSRT_ASSIGN_OR_RETURN(auto dscale, g.GetOptionalFloat("dmsrt.dms.alpha_scale"));
  DMSRT_ASSIGN_OR_RETURN(auto doff, g.GetOptionalFloat("dmsrt.dms.initial_alpha_offset"));
  DMSRT_ASSIGN_OR_RETURN(auto dsep, g.GetOptionalBool("dmsrt.dms.separate_alpha"));
  DMSRT_ASSIGN_OR_RETURN(auto dper, g.GetOptionalString("dmsrt.dms.alpha_per"));
  DMSRT_ASSIGN_OR_RETURN(auto dblock, g.GetOptionalInt("dmsrt.dms.paged_block_size"));
  DMSRT_ASSIGN_OR_RETURN(auto dcr, g.GetOptionalString("dmsrt.dms.cr"));
  if (dwin) {
    if (*dwin < 1 || *dwin > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": dmsrt.dms.window_size = ", *dwin, " is out of range"));
    }
    d.enabled = true;
    d.window = static_cast<int32_t>(*dwin);
  }
  if (dscale) d.alpha_scale = static_cast<float>(*dscale);
  if (doff) d.initial_alpha_offset = static_cast<float>(*doff);
  if (dsep) d.separate_alpha = *dsep;
  if (dper) {
    DMSRT_RETURN_IF_ERROR(ParseAlphaPer(path, *dper, d));
  }
  if (dblock) {
    if (*dblock < 1 || *dblock > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": dmsrt.dms.paged_block_size = ", *dblock, " is out of range"));
    }
    d.paged_block_size = static_cast<int32_t>(*dblock);
  }
  if (dcr) d.cr_label = *dcr;
  return FinishDms(path, d, dblock.has_value());
}

// ---- tensors ---------------------------------------------------------------------------------

WeightTensor OptionalTensor(const GgufFile& g, const std::string& name) {
  const GgufTensorInfo* t = g.FindTensor(name);
  return t ? g.View(*t) : WeightTensor{};
}

// The embedding, final norm and output (tied when absent); the vocabulary size is the
// embedding's row count, checked against `<arch>.vocab_size` when the file has it.
absl::Status ReadGgufModelTensors(const GgufFile& g, const std::string& a, ModelConfig& c,
                                  ModelWeights& w) {
  const std::string& path = g.path();
  DMSRT_ASSIGN_OR_RETURN(w.tok_embd, g.Tensor(kTokEmbdName.gguf));
  DMSRT_ASSIGN_OR_RETURN(w.output_norm, g.Tensor(kOutputNormName.gguf));
  w.output = OptionalTensor(g, kOutputName.gguf);
  c.tied_embeddings = !w.output.present();
  if (c.tied_embeddings) w.output = w.tok_embd;
  if (w.tok_embd.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": token_embd.weight is not 2-D"));
  }
  c.vocab = static_cast<int32_t>(w.tok_embd.rows);
  DMSRT_ASSIGN_OR_RETURN(auto vocab_key, g.GetOptionalInt(a + "vocab_size"));
  if (vocab_key && *vocab_key != c.vocab) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", a, "vocab_size = ", *vocab_key,
                                                   " but token_embd.weight has ", c.vocab,
                                                   " rows"));
  }
  return absl::OkStatus();
}

// Every layer's tensors, by their GGUF names (runtime/model/tensor_names.h).
absl::Status ReadGgufLayerTensors(const GgufFile& g, int32_t n_layers, ModelWeights& w) {
  w.layers.resize(static_cast<size_t>(n_layers));
  for (int32_t i = 0; i < n_layers; ++i) {
    const std::string p = absl::StrCat("blk.", i, ".");
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    for (const LayerTensorName& t : kLayerTensorNames) {
      if (t.gguf == nullptr) continue;
      const std::string name = p + t.gguf;
      if (t.need == TensorNeed::kRequired) {
        DMSRT_ASSIGN_OR_RETURN(l.*t.field, g.Tensor(name));
      } else if (t.need == TensorNeed::kOptional) {
        l.*t.field = OptionalTensor(g, name);
      } else if (g.FindTensor(name) != nullptr) {
        return absl::UnimplementedError(
            absl::StrCat(g.path(), ": ", t.what, " (", name, ") is not supported"));
      }
    }
  }
  return absl::OkStatus();
}

// `llama` files store Q/K (and their biases) in interleaved-RoPE row order; restores rotate-half.
absl::Status UnpermuteLlamaQk(LoadedModel& m) {
  const ModelConfig& c = m.config;
  for (LayerWeights& l : m.weights.layers) {
    DMSRT_ASSIGN_OR_RETURN(l.wq, UnpermuteRopeRows(m, l.wq, c.n_heads, c.head_dim));
    DMSRT_ASSIGN_OR_RETURN(l.wk, UnpermuteRopeRows(m, l.wk, c.n_kv_heads, c.head_dim));
    if (l.bq.present()) {
      DMSRT_ASSIGN_OR_RETURN(l.bq, UnpermuteRopeRows(m, l.bq, c.n_heads, c.head_dim));
      DMSRT_ASSIGN_OR_RETURN(l.bk, UnpermuteRopeRows(m, l.bk, c.n_kv_heads, c.head_dim));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadGguf(const std::string& path) {
  auto m = std::make_unique<LoadedModel>();
  m->source_path = path;
  DMSRT_ASSIGN_OR_RETURN(m->gguf, GgufFile::Open(path));
  const GgufFile& g = *m->gguf;
  ModelConfig& c = m->config;

  DMSRT_ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  DMSRT_ASSIGN_OR_RETURN(c.arch, GgufArch(path, arch));
  const std::string a = arch + ".";
  DMSRT_RETURN_IF_ERROR(ReadGgufHyperParams(g, a, c));
  DMSRT_RETURN_IF_ERROR(ReadGgufRopeScaling(g, a, c.rope_scaling));
  DMSRT_RETURN_IF_ERROR(ReadGgufRopeFreqs(g, c));
  DMSRT_RETURN_IF_ERROR(ReadGgufDms(g, c.dms));

  DMSRT_RETURN_IF_ERROR(ReadGgufModelTensors(g, a, c, m->weights));
  DMSRT_RETURN_IF_ERROR(CheckConfig(path, c));
  DMSRT_RETURN_IF_ERROR(ReadGgufLayerTensors(g, c.n_layers, m->weights));
  DMSRT_RETURN_IF_ERROR(CheckLayers(path, *m));
  if (c.arch == Arch::kLlama) {
    DMSRT_RETURN_IF_ERROR(UnpermuteLlamaQk(*m));
  }
  DMSRT_ASSIGN_OR_RETURN(m->tokenizer, GgufTokenizer(g));
  if (static_cast<int64_t>(m->tokenizer.tokens.size()) > c.vocab) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the tokenizer has ",
                                                   m->tokenizer.tokens.size(),
                                                   " tokens but the embedding only ", c.vocab));
  }
  m->source_path = path;
  m->source_format = "gguf";
  m->weight_bytes = CountWeightBytes(*m);
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace loader
}  // namespace dmsrt
