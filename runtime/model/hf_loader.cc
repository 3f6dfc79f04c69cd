// LoadHf: a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) into the
// normalised Model. The weights stay in the memory-mapped safetensors files, which the Model owns.
//
// DMS fields: config.json keys `dms_window_size`, `dms_alpha_scale`, `dms_initial_alpha_offset`,
// `dms_separate_alpha`, `dms_alpha_per`, `dms_paged_attention_block_size`, `dms_cr`, and Variant-B
// tensors `model.layers.{i}.self_attn.dms_proj_alpha{,_norm}.weight` (+ `dms_proj_alpha.bias`).
#include <cmath>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "parallel/status_macros.h"
#include "runtime/model/loader_internal.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/tensor_names.h"
#include "runtime/model/tokenizer_json.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {
namespace loader {
namespace {

using Json = nlohmann::json;

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

// ---- config.json -----------------------------------------------------------------------------

absl::StatusOr<Json> ReadConfigJson(const std::string& dir, const std::string& cfg_path) {
  absl::StatusOr<std::string> text = ReadWholeFile(cfg_path);
  if (!text.ok()) {
    return absl::NotFoundError(absl::StrCat(dir, ": not a model directory (no config.json)"));
  }
  Json j = Json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": not a JSON object"));
  }
  return j;
}

// The architecture, sizes and constants; `tie` = tie_word_embeddings.
absl::Status ReadHfHyperParams(const std::string& dir, const std::string& cfg_path, const Json& j,
                               ModelConfig& c, bool& tie) {
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
  DMSRT_ASSIGN_OR_RETURN(tie, cfg.Bool("tie_word_embeddings", false));
  return absl::OkStatus();
}

// Refuses sliding-window layers: DMS needs every layer to use full attention.
absl::Status CheckHfFullAttention(const std::string& cfg_path, const Json& j) {
  JsonConfig cfg(j, cfg_path);
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
  return absl::OkStatus();
}

// The rope_scaling object: default, linear or llama3.
absl::Status ReadHfRopeScaling(const std::string& cfg_path, const Json& j, RopeScaling& rs) {
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return absl::OkStatus();
  const Json& r = j["rope_scaling"];
  if (!r.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": rope_scaling is not an object"));
  }
  JsonConfig rc(r, cfg_path + " rope_scaling");
  DMSRT_ASSIGN_OR_RETURN(std::string type, rc.String("rope_type", ""));
  if (type.empty()) {
    DMSRT_ASSIGN_OR_RETURN(type, rc.String("type", "default"));
  }
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
  return absl::OkStatus();
}

// ---- tensors ---------------------------------------------------------------------------------

// A required tensor; a missing one's error names the directory.
absl::StatusOr<WeightTensor> RequiredTensor(const SafetensorsSet& st, const std::string& dir,
                                            const std::string& name) {
  auto t = st.Tensor(name);
  if (!t.ok()) return absl::Status(t.status().code(), absl::StrCat(dir, ": ", t.status().message()));
  return t;
}

WeightTensor OptionalTensor(const SafetensorsSet& st, const std::string& name) {
  return st.Has(name) ? *st.Tensor(name) : WeightTensor{};
}

// Every weight, by its Hugging Face name (runtime/model/tensor_names.h). The output projection is
// the embedding when `tie` or when the checkpoint has no lm_head.
absl::Status ReadHfTensors(const SafetensorsSet& st, const std::string& dir, bool tie,
                           ModelConfig& c, ModelWeights& w) {
  DMSRT_ASSIGN_OR_RETURN(w.tok_embd, RequiredTensor(st, dir, kTokEmbdName.hf));
  DMSRT_ASSIGN_OR_RETURN(w.output_norm, RequiredTensor(st, dir, kOutputNormName.hf));
  if (tie || !st.Has(kOutputName.hf)) {
    c.tied_embeddings = true;
    w.output = w.tok_embd;
  } else {
    DMSRT_ASSIGN_OR_RETURN(w.output, RequiredTensor(st, dir, kOutputName.hf));
  }
  w.layers.resize(static_cast<size_t>(c.n_layers));
  for (int32_t i = 0; i < c.n_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    for (const LayerTensorName& t : kLayerTensorNames) {
      const std::string name = p + t.hf;
      if (t.need == TensorNeed::kRequired) {
        DMSRT_ASSIGN_OR_RETURN(l.*t.field, RequiredTensor(st, dir, name));
      } else if (t.need == TensorNeed::kOptional) {
        l.*t.field = OptionalTensor(st, name);
      } else if (st.Has(name)) {
        return absl::UnimplementedError(
            absl::StrCat(dir, ": ", t.what, " (", name, ") is not supported"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

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
  DMSRT_ASSIGN_OR_RETURN(d.sink_tokens, cfg.Int("dms_sink_tokens", 0));
  if (d.sink_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": dms_sink_tokens ", d.sink_tokens, " must be >= 0"));
  }
  if (cfg.Has("dms_cr")) {
    const Json& cr = j.at("dms_cr");
    d.cr_label = cr.is_string() ? cr.get<std::string>() : cr.dump();
  }
  return FinishDms(file, d, block_given);
}

absl::StatusOr<std::unique_ptr<Model>> LoadHf(const std::string& dir) {
  const std::string cfg_path = dir + "/config.json";
  DMSRT_ASSIGN_OR_RETURN(const Json j, ReadConfigJson(dir, cfg_path));
  auto m = std::make_unique<LoadedModel>();
  ModelConfig& c = m->config;
  bool tie = false;
  DMSRT_RETURN_IF_ERROR(ReadHfHyperParams(dir, cfg_path, j, c, tie));
  DMSRT_RETURN_IF_ERROR(CheckHfFullAttention(cfg_path, j));
  DMSRT_RETURN_IF_ERROR(ReadHfRopeScaling(cfg_path, j, c.rope_scaling));
  DMSRT_RETURN_IF_ERROR(ReadHfDms(cfg_path, j, c.dms));
  DMSRT_RETURN_IF_ERROR(CheckConfig(cfg_path, c));

  DMSRT_ASSIGN_OR_RETURN(m->hf, SafetensorsSet::Open(dir));
  DMSRT_RETURN_IF_ERROR(ReadHfTensors(*m->hf, dir, tie, c, m->weights));
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

}  // namespace loader
}  // namespace dmsrt
