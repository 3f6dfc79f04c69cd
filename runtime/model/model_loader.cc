// LoadModel / AttachDmsAdapter / ArchName: turns a GGUF file or a Hugging Face directory into the
// one normalised Model the backends use (see runtime/model/model.h for the conventions).
//
// Both sources go through the same steps: read the hyper-parameters into ModelConfig, look up
// every tensor by its source-specific name, check its shape against the config, and collect the
// tokenizer description. Weights stay in the memory-mapped file(s), which the Model owns; the only
// copies are the Q/K projections of GGUF `llama` files, whose rows are re-ordered (see
// UnpermuteRopeRows below).
//
// DMS fields. Hugging Face: config.json keys `dms_window_size`, `dms_alpha_scale`,
// `dms_initial_alpha_offset`, `dms_separate_alpha`, `dms_alpha_per`,
// `dms_paged_attention_block_size`, `dms_cr`, and Variant-B tensors
// `model.layers.{i}.self_attn.dms_proj_alpha{,_norm}.weight` (+ `dms_proj_alpha.bias`). GGUF (our
// own keys, written by tests/fixtures/make_tiny_model.py and any converter that wants DMS):
//   dmsrt.dms.window_size           u32/i32   (required for DMS)
//   dmsrt.dms.alpha_scale           f32       (100)
//   dmsrt.dms.initial_alpha_offset  f32       (5)
//   dmsrt.dms.separate_alpha        bool      (false; true iff adapter tensors are present)
//   dmsrt.dms.alpha_per             string    "head" | "layer"
//   dmsrt.dms.paged_block_size      u32/i32   (256; must be below the window)
//   dmsrt.dms.cr                    string    (label only)
// and tensors `blk.{i}.dms_alpha.weight` [n_kv_heads, hidden], `blk.{i}.dms_alpha_norm.weight`
// [hidden], `blk.{i}.dms_alpha.bias` [n_kv_heads]. Adapter tensors present => Variant B.
#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "parallel/status_macros.h"
#include "runtime/model/gguf.h"
#include "runtime/model/model.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/tokenizer_json.h"

namespace dmsrt {

const char* ArchName(Arch a) {
  switch (a) {
    case Arch::kLlama:
      return "llama";
    case Arch::kQwen2:
      return "qwen2";
    case Arch::kQwen3:
      return "qwen3";
  }
  return "unknown";
}

namespace {

using Json = nlohmann::json;

// The Model the loader returns: it owns the mapped files and the buffers of re-ordered rows.
class LoadedModel : public Model {
 public:
  std::unique_ptr<GgufFile> gguf;
  std::unique_ptr<SafetensorsSet> hf;
  std::vector<std::unique_ptr<SafetensorsFile>> adapters;
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
};

bool IsDir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool IsFile(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool HasGgufMagic(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  char m[4] = {0, 0, 0, 0};
  in.read(m, 4);
  return in.gcount() == 4 && std::memcmp(m, "GGUF", 4) == 0;
}
bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// Checks type support and shape; `what` is the source's tensor name.
absl::Status CheckTensor(const std::string& file, const WeightTensor& w,
                         const std::vector<int64_t>& want) {
  if (!DTypeSupported(w.type)) {
    return absl::UnimplementedError(absl::StrCat(file, ": tensor '", w.name, "' has type ",
                                                 DTypeName(w.type),
                                                 ", which this runtime cannot compute with"));
  }
  if (w.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", w.name, "' has shape ",
                                                   ShapeStr(w.shape), ", expected ", ShapeStr(want),
                                                   " from the model config"));
  }
  return absl::OkStatus();
}

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

// ---- DMS -------------------------------------------------------------------------------------

absl::Status FinishDms(const std::string& file, DmsConfig& d, bool block_size_given) {
  if (!d.enabled) return absl::OkStatus();
  if (d.window < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": DMS window size ", d.window, " must be at least 1"));
  }
  if (block_size_given) {
    if (d.paged_block_size < 1 || d.paged_block_size >= d.window) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": dms_paged_attention_block_size ", d.paged_block_size,
                       " must be at least 1 and below dms_window_size ", d.window));
    }
  } else if (d.paged_block_size >= d.window) {
    // The default (256) only describes how the reference pages its cache; with a window that
    // small, take the largest power of two below it (1 for a window of 1).
    int32_t b = 1;
    while (b * 2 < d.window) b *= 2;
    d.paged_block_size = b;
  }
  if (!std::isfinite(d.alpha_scale) || !std::isfinite(d.initial_alpha_offset)) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": DMS alpha scale/offset not finite"));
  }
  return absl::OkStatus();
}

absl::Status ParseAlphaPer(const std::string& file, const std::string& v, DmsConfig& d) {
  if (v == "head") {
    d.alpha_per_layer = false;
  } else if (v == "layer") {
    d.alpha_per_layer = true;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": dms_alpha_per is '", v, "', expected \"head\" or \"layer\""));
  }
  return absl::OkStatus();
}

// Checks the Variant-B tensors of every layer: all layers have them or none does.
absl::Status CheckAdapters(const std::string& file, Model& m) {
  const ModelConfig& c = m.config;
  int with = 0;
  for (const LayerWeights& l : m.weights.layers) {
    if (l.dms_alpha.present() || l.dms_alpha_norm.present()) ++with;
  }
  if (with == 0) {
    if (c.dms.separate_alpha) {
      return absl::InvalidArgumentError(absl::StrCat(
          file,
          ": dms_separate_alpha is true but the DMS adapter tensors (dms_proj_alpha) are "
          "missing; attach them with an adapter file"));
    }
    return absl::OkStatus();
  }
  if (with != c.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": DMS adapter tensors present in ", with,
                                                   " of ", c.n_layers, " layers"));
  }
  if (!c.dms.enabled) {
    return absl::InvalidArgumentError(absl::StrCat(
        file, ": DMS adapter tensors are present but the config has no DMS window size"));
  }
  for (const LayerWeights& l : m.weights.layers) {
    if (!l.dms_alpha.present() || !l.dms_alpha_norm.present()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": a layer has only one of dms_proj_alpha / dms_proj_alpha_norm"));
    }
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.dms_alpha, {c.n_kv_heads, c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.dms_alpha_norm, {c.hidden}));
    if (l.dms_alpha_bias.present()) {
      DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.dms_alpha_bias, {c.n_kv_heads}));
    }
  }
  m.config.dms.separate_alpha = true;
  return absl::OkStatus();
}

// ---- shared checks ---------------------------------------------------------------------------

absl::Status CheckConfig(const std::string& file, const ModelConfig& c) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": ", what));
  };
  if (c.n_layers < 1 || c.n_layers > 4096) return bad(absl::StrCat("layer count ", c.n_layers));
  if (c.hidden < 1) return bad(absl::StrCat("hidden size ", c.hidden));
  if (c.n_heads < 1 || c.n_kv_heads < 1) {
    return bad(absl::StrCat("head counts ", c.n_heads, "/", c.n_kv_heads));
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return bad(absl::StrCat("attention heads (", c.n_heads, ") are not a multiple of KV heads (",
                            c.n_kv_heads, ")"));
  }
  if (c.head_dim < 2 || c.head_dim % 2 != 0) {
    return bad(absl::StrCat("head_dim ", c.head_dim, " must be even and at least 2"));
  }
  if (c.rope_dim != c.head_dim) {
    return absl::UnimplementedError(absl::StrCat(file, ": partial RoPE (", c.rope_dim, " of ",
                                                 c.head_dim, " channels) is not supported"));
  }
  if (c.ffn < 1) return bad(absl::StrCat("feed-forward size ", c.ffn));
  if (c.vocab < 1) return bad(absl::StrCat("vocabulary size ", c.vocab));
  if (!(c.rms_eps > 0) || !std::isfinite(c.rms_eps)) {
    return bad(absl::StrCat("RMSNorm epsilon ", c.rms_eps));
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return bad(absl::StrCat("RoPE theta ", c.rope_theta));
  }
  if (c.max_positions < 1) return bad(absl::StrCat("context length ", c.max_positions));
  return absl::OkStatus();
}

absl::Status CheckLayers(const std::string& file, Model& m) {
  const ModelConfig& c = m.config;
  const int64_t q_rows = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_rows = int64_t{c.n_kv_heads} * c.head_dim;
  DMSRT_RETURN_IF_ERROR(CheckTensor(file, m.weights.tok_embd, {c.vocab, c.hidden}));
  DMSRT_RETURN_IF_ERROR(CheckTensor(file, m.weights.output_norm, {c.hidden}));
  DMSRT_RETURN_IF_ERROR(CheckTensor(file, m.weights.output, {c.vocab, c.hidden}));
  int with_bias = 0, with_qk_norm = 0;
  for (const LayerWeights& l : m.weights.layers) {
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.attn_norm, {c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.wq, {q_rows, c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.wk, {kv_rows, c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.wv, {kv_rows, c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.wo, {c.hidden, q_rows}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.ffn_norm, {c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.w_gate, {c.ffn, c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.w_up, {c.ffn, c.hidden}));
    DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.w_down, {c.hidden, c.ffn}));
    const int nb = l.bq.present() + l.bk.present() + l.bv.present();
    if (nb != 0 && nb != 3) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": a layer has only some of the q/k/v biases"));
    }
    if (nb == 3) {
      ++with_bias;
      DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.bq, {q_rows}));
      DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.bk, {kv_rows}));
      DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.bv, {kv_rows}));
    }
    if (l.q_norm.present() != l.k_norm.present()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": a layer has only one of the q/k norms"));
    }
    if (l.q_norm.present()) {
      ++with_qk_norm;
      DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.q_norm, {c.head_dim}));
      DMSRT_RETURN_IF_ERROR(CheckTensor(file, l.k_norm, {c.head_dim}));
    }
  }
  if ((with_bias != 0 && with_bias != c.n_layers) ||
      (with_qk_norm != 0 && with_qk_norm != c.n_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": q/k/v biases or q/k norms are present in only some layers"));
  }
  m.config.attn_bias = with_bias > 0;
  m.config.qk_norm = with_qk_norm > 0;
  if (c.arch == Arch::kQwen3 && !m.config.qk_norm) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": qwen3 model without q_norm/k_norm tensors"));
  }
  return CheckAdapters(file, m);
}

int64_t CountWeightBytes(const Model& m) {
  std::unordered_set<const uint8_t*> seen;
  int64_t total = 0;
  auto add = [&](const WeightTensor& w) {
    if (w.present() && seen.insert(w.data).second) total += static_cast<int64_t>(w.nbytes);
  };
  add(m.weights.tok_embd);
  add(m.weights.output_norm);
  add(m.weights.output);
  for (const LayerWeights& l : m.weights.layers) {
    for (const WeightTensor* w : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv,
                                  &l.q_norm, &l.k_norm, &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down,
                                  &l.dms_alpha_norm, &l.dms_alpha, &l.dms_alpha_bias}) {
      add(*w);
    }
  }
  return total;
}

// eos_ids = eos plus every end-of-turn control token the vocabulary has.
void CollectEosIds(TokenizerSpec& t, const std::vector<int32_t>& extra) {
  std::set<int32_t> ids;
  if (t.eos_id >= 0) ids.insert(t.eos_id);
  for (int32_t e : extra) {
    if (e >= 0 && e < static_cast<int32_t>(t.tokens.size())) ids.insert(e);
  }
  static const char* const kEndTokens[] = {"<|im_end|>", "<|eot_id|>", "<|endoftext|>",
                                           "<|end_of_text|>", "<|eom_id|>"};
  for (size_t id = 0; id < t.tokens.size(); ++id) {
    for (const char* name : kEndTokens) {
      if (t.tokens[id] != name) continue;
      const bool control = id >= t.token_types.size() || t.token_types[id] == 3;
      if (control) ids.insert(static_cast<int32_t>(id));
    }
  }
  for (int32_t e : t.eos_ids) ids.insert(e);
  t.eos_ids.assign(ids.begin(), ids.end());
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

absl::StatusOr<std::unique_ptr<Model>> LoadGguf(const std::string& path) {
  auto m = std::make_unique<LoadedModel>();
  m->source_path = path;
  DMSRT_ASSIGN_OR_RETURN(m->gguf, GgufFile::Open(path));
  const GgufFile& g = *m->gguf;
  ModelConfig& c = m->config;

  DMSRT_ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  if (arch == "llama") {
    c.arch = Arch::kLlama;
  } else if (arch == "qwen2") {
    c.arch = Arch::kQwen2;
  } else if (arch == "qwen3") {
    c.arch = Arch::kQwen3;
  } else {
    return absl::UnimplementedError(absl::StrCat(path, ": unsupported architecture '", arch,
                                                 "' (supported: llama, qwen2, qwen3)"));
  }
  const std::string a = arch + ".";
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

  // RoPE scaling.
  DMSRT_ASSIGN_OR_RETURN(auto stype, g.GetOptionalString(a + "rope.scaling.type"));
  DMSRT_ASSIGN_OR_RETURN(auto sfactor, g.GetOptionalFloat(a + "rope.scaling.factor"));
  DMSRT_ASSIGN_OR_RETURN(auto sorig, g.GetOptionalInt(a + "rope.scaling.original_context_length"));
  DMSRT_ASSIGN_OR_RETURN(auto slow, g.GetOptionalFloat(a + "rope.scaling.low_freq_factor"));
  DMSRT_ASSIGN_OR_RETURN(auto shigh, g.GetOptionalFloat(a + "rope.scaling.high_freq_factor"));
  DMSRT_ASSIGN_OR_RETURN(auto old_linear, g.GetOptionalFloat(a + "rope.scale_linear"));
  RopeScaling& rs = c.rope_scaling;
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
  if (const GgufTensorInfo* rf = g.FindTensor("rope_freqs.weight")) {
    // Llama-3.1 files carry their scaling as per-frequency factors; recognise them.
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
  }

  // DMS keys.
  DmsConfig& d = c.dms;
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
  DMSRT_RETURN_IF_ERROR(FinishDms(path, d, dblock.has_value()));

  // Tensors.
  auto req = [&](const std::string& n) -> absl::StatusOr<WeightTensor> { return g.Tensor(n); };
  auto opt = [&](const std::string& n) -> WeightTensor {
    const GgufTensorInfo* t = g.FindTensor(n);
    return t ? g.View(*t) : WeightTensor{};
  };
  ModelWeights& w = m->weights;
  DMSRT_ASSIGN_OR_RETURN(w.tok_embd, req("token_embd.weight"));
  DMSRT_ASSIGN_OR_RETURN(w.output_norm, req("output_norm.weight"));
  w.output = opt("output.weight");
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
  DMSRT_RETURN_IF_ERROR(CheckConfig(path, c));
  w.layers.resize(static_cast<size_t>(c.n_layers));
  for (int32_t i = 0; i < c.n_layers; ++i) {
    const std::string p = absl::StrCat("blk.", i, ".");
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    DMSRT_ASSIGN_OR_RETURN(l.attn_norm, req(p + "attn_norm.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wq, req(p + "attn_q.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wk, req(p + "attn_k.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wv, req(p + "attn_v.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wo, req(p + "attn_output.weight"));
    l.bq = opt(p + "attn_q.bias");
    l.bk = opt(p + "attn_k.bias");
    l.bv = opt(p + "attn_v.bias");
    l.q_norm = opt(p + "attn_q_norm.weight");
    l.k_norm = opt(p + "attn_k_norm.weight");
    DMSRT_ASSIGN_OR_RETURN(l.ffn_norm, req(p + "ffn_norm.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.w_gate, req(p + "ffn_gate.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.w_up, req(p + "ffn_up.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.w_down, req(p + "ffn_down.weight"));
    l.dms_alpha = opt(p + "dms_alpha.weight");
    l.dms_alpha_norm = opt(p + "dms_alpha_norm.weight");
    l.dms_alpha_bias = opt(p + "dms_alpha.bias");
  }
  DMSRT_RETURN_IF_ERROR(CheckLayers(path, *m));
  if (c.arch == Arch::kLlama) {
    for (LayerWeights& l : w.layers) {
      DMSRT_ASSIGN_OR_RETURN(l.wq, UnpermuteRopeRows(*m, l.wq, c.n_heads, c.head_dim));
      DMSRT_ASSIGN_OR_RETURN(l.wk, UnpermuteRopeRows(*m, l.wk, c.n_kv_heads, c.head_dim));
      if (l.bq.present()) {
        DMSRT_ASSIGN_OR_RETURN(l.bq, UnpermuteRopeRows(*m, l.bq, c.n_heads, c.head_dim));
        DMSRT_ASSIGN_OR_RETURN(l.bk, UnpermuteRopeRows(*m, l.bk, c.n_kv_heads, c.head_dim));
      }
    }
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

// ---- Hugging Face ----------------------------------------------------------------------------

// Typed reads of config.json fields with messages naming the file and key.
class JsonConfig {
 public:
  JsonConfig(const Json& j, std::string file) : j_(j), file_(std::move(file)) {}
  bool Has(const char* k) const { return j_.contains(k) && !j_.at(k).is_null(); }
  absl::StatusOr<int32_t> Int(const char* k, std::optional<int32_t> def) const {
    if (!Has(k)) {
      if (def) return *def;
      return absl::InvalidArgumentError(absl::StrCat(file_, ": required key '", k, "' is missing"));
    }
    const Json& v = j_.at(k);
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": '", k, "' must be a non-negative integer, got ", v.dump()));
    }
    return static_cast<int32_t>(v.get<int64_t>());
  }
  absl::StatusOr<double> Float(const char* k, double def) const {
    if (!Has(k)) return def;
    const Json& v = j_.at(k);
    if (!v.is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": '", k, "' must be a number, got ", v.dump()));
    }
    return v.get<double>();
  }
  absl::StatusOr<bool> Bool(const char* k, bool def) const {
    if (!Has(k)) return def;
    const Json& v = j_.at(k);
    if (!v.is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": '", k, "' must be true or false, got ", v.dump()));
    }
    return v.get<bool>();
  }
  absl::StatusOr<std::string> String(const char* k, const std::string& def) const {
    if (!Has(k)) return def;
    const Json& v = j_.at(k);
    if (!v.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": '", k, "' must be a string, got ", v.dump()));
    }
    return v.get<std::string>();
  }

 private:
  const Json& j_;
  std::string file_;
};

absl::StatusOr<Arch> HfArch(const Json& j, const std::string& file) {
  std::string model_type = j.contains("model_type") && j["model_type"].is_string()
                               ? j["model_type"].get<std::string>()
                               : "";
  if (model_type == "llama") return Arch::kLlama;
  if (model_type == "qwen2") return Arch::kQwen2;
  if (model_type == "qwen3") return Arch::kQwen3;
  std::vector<std::string> archs;
  if (j.contains("architectures") && j["architectures"].is_array()) {
    for (const Json& a : j["architectures"]) {
      if (!a.is_string()) continue;
      std::string s = a.get<std::string>();
      archs.push_back(s);
      // DMS checkpoints may name a derived class (e.g. Qwen3ForCausalLM + a suffix).
      if (s.rfind("LlamaForCausalLM", 0) == 0) return Arch::kLlama;
      if (s.rfind("Qwen2ForCausalLM", 0) == 0) return Arch::kQwen2;
      if (s.rfind("Qwen3ForCausalLM", 0) == 0) return Arch::kQwen3;
    }
  }
  return absl::UnimplementedError(absl::StrCat(
      file, ": unsupported architecture (model_type '", model_type, "', architectures [",
      absl::StrJoin(archs, ", "), "]); supported: llama, qwen2, qwen3"));
}

absl::Status ReadHfDms(const std::string& file, const Json& j, DmsConfig& d) {
  JsonConfig cfg(j, file);
  if (!cfg.Has("dms_window_size")) return absl::OkStatus();
  d.enabled = true;
  DMSRT_ASSIGN_OR_RETURN(d.window, cfg.Int("dms_window_size", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(double scale, cfg.Float("dms_alpha_scale", d.alpha_scale));
  DMSRT_ASSIGN_OR_RETURN(double off, cfg.Float("dms_initial_alpha_offset", d.initial_alpha_offset));
  d.alpha_scale = static_cast<float>(scale);
  d.initial_alpha_offset = static_cast<float>(off);
  DMSRT_ASSIGN_OR_RETURN(d.separate_alpha, cfg.Bool("dms_separate_alpha", false));
  DMSRT_ASSIGN_OR_RETURN(std::string per, cfg.String("dms_alpha_per", "head"));
  DMSRT_RETURN_IF_ERROR(ParseAlphaPer(file, per, d));
  const bool block_given = cfg.Has("dms_paged_attention_block_size");
  DMSRT_ASSIGN_OR_RETURN(d.paged_block_size,
                         cfg.Int("dms_paged_attention_block_size", d.paged_block_size));
  if (cfg.Has("dms_cr")) {
    const Json& cr = j.at("dms_cr");
    d.cr_label = cr.is_string() ? cr.get<std::string>() : cr.dump();
  }
  return FinishDms(file, d, block_given);
}

absl::StatusOr<std::unique_ptr<Model>> LoadHf(const std::string& dir) {
  const std::string cfg_path = dir + "/config.json";
  std::ifstream in(cfg_path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(dir, ": not a model directory (no config.json)"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  Json j = Json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": not a JSON object"));
  }
  auto m = std::make_unique<LoadedModel>();
  ModelConfig& c = m->config;
  JsonConfig cfg(j, cfg_path);
  DMSRT_ASSIGN_OR_RETURN(c.arch, HfArch(j, cfg_path));
  DMSRT_ASSIGN_OR_RETURN(c.name, cfg.String("_name_or_path", ""));
  if (c.name.empty()) {
    std::string d = dir;
    while (d.size() > 1 && d.back() == '/') d.pop_back();
    c.name = d.substr(d.find_last_of('/') + 1);
  }
  DMSRT_ASSIGN_OR_RETURN(c.n_layers, cfg.Int("num_hidden_layers", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.hidden, cfg.Int("hidden_size", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.n_heads, cfg.Int("num_attention_heads", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.n_kv_heads, cfg.Int("num_key_value_heads", c.n_heads));
  if (c.n_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": num_attention_heads is 0"));
  }
  DMSRT_ASSIGN_OR_RETURN(c.head_dim, cfg.Int("head_dim", c.hidden / c.n_heads));
  c.rope_dim = c.head_dim;
  DMSRT_ASSIGN_OR_RETURN(c.ffn, cfg.Int("intermediate_size", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.vocab, cfg.Int("vocab_size", std::nullopt));
  DMSRT_ASSIGN_OR_RETURN(c.max_positions, cfg.Int("max_position_embeddings", 4096));
  DMSRT_ASSIGN_OR_RETURN(double eps, cfg.Float("rms_norm_eps", 1e-6));
  c.rms_eps = static_cast<float>(eps);
  DMSRT_ASSIGN_OR_RETURN(double theta, cfg.Float("rope_theta", 10000.0));
  c.rope_theta = static_cast<float>(theta);
  DMSRT_ASSIGN_OR_RETURN(bool tie, cfg.Bool("tie_word_embeddings", false));
  DMSRT_ASSIGN_OR_RETURN(bool sliding, cfg.Bool("use_sliding_window", false));
  if (sliding) {
    return absl::UnimplementedError(
        absl::StrCat(cfg_path,
                     ": use_sliding_window is true; sliding-window attention is not supported "
                     "(DMS needs every layer to use full attention)"));
  }
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    if (!j["layer_types"].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": layer_types is not a list"));
    }
    for (const Json& t : j["layer_types"]) {
      if (!t.is_string() || t.get<std::string>() != "full_attention") {
        return absl::UnimplementedError(absl::StrCat(cfg_path, ": layer_types contains ", t.dump(),
                                                     "; only full_attention layers are supported"));
      }
    }
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    const Json& r = j["rope_scaling"];
    if (!r.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": rope_scaling is not an object"));
    }
    JsonConfig rc(r, cfg_path + " rope_scaling");
    DMSRT_ASSIGN_OR_RETURN(std::string type, rc.String("rope_type", ""));
    if (type.empty()) {
      DMSRT_ASSIGN_OR_RETURN(type, rc.String("type", "default"));
    }
    RopeScaling& rs = c.rope_scaling;
    DMSRT_ASSIGN_OR_RETURN(double factor, rc.Float("factor", 1.0));
    if (type == "default") {
      rs.type = RopeScaling::Type::kNone;
    } else if (type == "linear") {
      rs.type = RopeScaling::Type::kLinear;
      rs.factor = static_cast<float>(factor);
    } else if (type == "llama3") {
      rs.type = RopeScaling::Type::kLlama3;
      rs.factor = static_cast<float>(factor);
      DMSRT_ASSIGN_OR_RETURN(double lo, rc.Float("low_freq_factor", rs.low_freq_factor));
      DMSRT_ASSIGN_OR_RETURN(double hi, rc.Float("high_freq_factor", rs.high_freq_factor));
      DMSRT_ASSIGN_OR_RETURN(rs.original_max_positions,
                             rc.Int("original_max_position_embeddings", rs.original_max_positions));
      rs.low_freq_factor = static_cast<float>(lo);
      rs.high_freq_factor = static_cast<float>(hi);
    } else {
      return absl::UnimplementedError(absl::StrCat(cfg_path, ": RoPE scaling type '", type,
                                                   "' is not supported (linear, llama3)"));
    }
    if (rs.type != RopeScaling::Type::kNone &&
        (!(rs.factor > 0) || !std::isfinite(rs.factor) || rs.original_max_positions < 1 ||
         !(rs.high_freq_factor > rs.low_freq_factor))) {
      return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": invalid rope_scaling values"));
    }
  }
  DMSRT_RETURN_IF_ERROR(ReadHfDms(cfg_path, j, c.dms));
  DMSRT_RETURN_IF_ERROR(CheckConfig(cfg_path, c));

  DMSRT_ASSIGN_OR_RETURN(m->hf, SafetensorsSet::Open(dir));
  const SafetensorsSet& st = *m->hf;
  auto req = [&](const std::string& n) -> absl::StatusOr<WeightTensor> {
    auto t = st.Tensor(n);
    if (!t.ok())
      return absl::Status(t.status().code(), absl::StrCat(dir, ": ", t.status().message()));
    return t;
  };
  auto opt = [&](const std::string& n) -> WeightTensor {
    return st.Has(n) ? *st.Tensor(n) : WeightTensor{};
  };
  ModelWeights& w = m->weights;
  DMSRT_ASSIGN_OR_RETURN(w.tok_embd, req("model.embed_tokens.weight"));
  DMSRT_ASSIGN_OR_RETURN(w.output_norm, req("model.norm.weight"));
  if (tie || !st.Has("lm_head.weight")) {
    c.tied_embeddings = true;
    w.output = w.tok_embd;
  } else {
    DMSRT_ASSIGN_OR_RETURN(w.output, req("lm_head.weight"));
  }
  w.layers.resize(static_cast<size_t>(c.n_layers));
  for (int32_t i = 0; i < c.n_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    DMSRT_ASSIGN_OR_RETURN(l.attn_norm, req(p + "input_layernorm.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wq, req(p + "self_attn.q_proj.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wk, req(p + "self_attn.k_proj.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wv, req(p + "self_attn.v_proj.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.wo, req(p + "self_attn.o_proj.weight"));
    l.bq = opt(p + "self_attn.q_proj.bias");
    l.bk = opt(p + "self_attn.k_proj.bias");
    l.bv = opt(p + "self_attn.v_proj.bias");
    if (st.Has(p + "self_attn.o_proj.bias")) {
      return absl::UnimplementedError(
          absl::StrCat(dir, ": o_proj bias (", p, "self_attn.o_proj.bias) is not supported"));
    }
    l.q_norm = opt(p + "self_attn.q_norm.weight");
    l.k_norm = opt(p + "self_attn.k_norm.weight");
    DMSRT_ASSIGN_OR_RETURN(l.ffn_norm, req(p + "post_attention_layernorm.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.w_gate, req(p + "mlp.gate_proj.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.w_up, req(p + "mlp.up_proj.weight"));
    DMSRT_ASSIGN_OR_RETURN(l.w_down, req(p + "mlp.down_proj.weight"));
    l.dms_alpha = opt(p + "self_attn.dms_proj_alpha.weight");
    l.dms_alpha_norm = opt(p + "self_attn.dms_proj_alpha_norm.weight");
    l.dms_alpha_bias = opt(p + "self_attn.dms_proj_alpha.bias");
  }
  DMSRT_RETURN_IF_ERROR(CheckLayers(dir, *m));
  DMSRT_ASSIGN_OR_RETURN(m->tokenizer, LoadTokenizerJson(dir));
  CollectEosIds(m->tokenizer, {});
  if (static_cast<int64_t>(m->tokenizer.tokens.size()) > c.vocab) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": the tokenizer has ",
                                                   m->tokenizer.tokens.size(),
                                                   " tokens but vocab_size is ", c.vocab));
  }
  m->source_path = dir;
  m->source_format = "hf";
  m->weight_bytes = CountWeightBytes(*m);
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& path) {
  if (IsDir(path)) return LoadHf(path);
  if (!IsFile(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  if (EndsWith(path, ".gguf") || HasGgufMagic(path)) return LoadGguf(path);
  if (EndsWith(path, "config.json")) {
    std::string dir = path.substr(0, path.size() - 11);
    if (dir.empty()) dir = ".";
    return LoadHf(dir);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": not a GGUF file (no GGUF magic) and not a Hugging Face model directory"));
}

absl::Status AttachDmsAdapter(Model& model, const std::string& safetensors_path) {
  auto* m = dynamic_cast<LoadedModel*>(&model);
  if (m == nullptr) {
    return absl::FailedPreconditionError("AttachDmsAdapter needs a model made by LoadModel");
  }
  for (const LayerWeights& l : m->weights.layers) {
    if (l.dms_alpha.present() || l.dms_alpha_norm.present()) {
      return absl::FailedPreconditionError(
          absl::StrCat(safetensors_path, ": the model already has DMS adapter tensors"));
    }
  }
  DMSRT_ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(safetensors_path));
  // Work on a copy so that a failure leaves the model untouched.
  ModelConfig cfg = m->config;
  ModelWeights weights = m->weights;
  const auto& meta = f->metadata();
  Json j = Json::object();
  for (const auto& [k, v] : meta) {
    if (k.rfind("dms_", 0) != 0) continue;
    // Metadata values are strings; numbers and booleans are parsed, dms_alpha_per/dms_cr kept.
    if (k == "dms_alpha_per" || k == "dms_cr") {
      j[k] = v;
      continue;
    }
    Json parsed = Json::parse(v, nullptr, false);
    if (parsed.is_discarded()) {
      if (v == "True" || v == "False") {
        parsed = (v == "True");
      } else {
        return absl::InvalidArgumentError(absl::StrCat(safetensors_path, ": metadata '", k, "' = '",
                                                       v, "' is not a number or boolean"));
      }
    }
    j[k] = parsed;
  }
  if (j.contains("dms_window_size")) {
    DmsConfig d;
    DMSRT_RETURN_IF_ERROR(ReadHfDms(safetensors_path, j, d));
    cfg.dms = d;
  } else if (!cfg.dms.enabled) {
    return absl::InvalidArgumentError(
        absl::StrCat(safetensors_path,
                     ": the model has no DMS config and the adapter's metadata has no "
                     "dms_window_size"));
  }
  cfg.dms.separate_alpha = false;  // CheckAdapters sets it once the tensors are verified
  for (int32_t i = 0; i < cfg.n_layers; ++i) {
    LayerWeights& l = weights.layers[static_cast<size_t>(i)];
    for (const std::string& prefix :
         {absl::StrCat("model.layers.", i, ".self_attn."),
          absl::StrCat("layers.", i, ".self_attn."), absl::StrCat("blk.", i, ".")}) {
      const bool gguf_style = prefix.rfind("blk.", 0) == 0;
      const std::string a = prefix + (gguf_style ? "dms_alpha" : "dms_proj_alpha");
      if (!f->HasTensor(a + ".weight")) continue;
      DMSRT_ASSIGN_OR_RETURN(l.dms_alpha, f->Tensor(a + ".weight"));
      DMSRT_ASSIGN_OR_RETURN(l.dms_alpha_norm, f->Tensor(a + "_norm.weight"));
      if (f->HasTensor(a + ".bias")) {
        DMSRT_ASSIGN_OR_RETURN(l.dms_alpha_bias, f->Tensor(a + ".bias"));
      }
      break;
    }
  }
  Model probe;
  probe.config = cfg;
  probe.weights = std::move(weights);
  DMSRT_RETURN_IF_ERROR(CheckAdapters(safetensors_path, probe));
  if (!probe.weights.layers.empty() && !probe.weights.layers[0].dms_alpha.present()) {
    return absl::InvalidArgumentError(
        absl::StrCat(safetensors_path,
                     ": no DMS adapter tensors (model.layers.{i}.self_attn.dms_proj_alpha.*)"));
  }
  m->config = probe.config;
  m->weights = std::move(probe.weights);
  m->adapters.push_back(std::move(f));
  m->weight_bytes = CountWeightBytes(*m);
  return absl::OkStatus();
}

}  // namespace dmsrt
