// AttachDmsAdapter: adds Variant-B DMS adapter tensors (dms_proj_alpha*) from a .safetensors file
// to a model that has none, and the DMS config from the file's metadata when it carries one.
// The metadata key `dms_eviction_rate` (the rate measured at calibration) becomes
// DmsConfig::expected_eviction_rate. Tensor names may be in Hugging Face form
// (`model.layers.{i}.self_attn.dms_proj_alpha*`, or without the `model.` prefix) or in GGUF form
// (`blk.{i}.dms_alpha*`).
#include <cmath>
#include <regex>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "kernels/reference/quant.h"
#include "parallel/status_macros.h"
#include "runtime/model/loader_internal.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/tensor_names.h"

namespace dmsrt {
namespace loader {
namespace {

using Json = nlohmann::json;

// The file's `dms_*` metadata as a config.json-like object. Metadata values are strings; numbers
// and booleans are parsed, dms_alpha_per/dms_cr kept.
absl::StatusOr<Json> AdapterDmsMetadata(const SafetensorsFile& f, const std::string& path) {
  Json j = Json::object();
  for (const auto& [k, v] : f.metadata()) {
    if (k.rfind("dms_", 0) != 0) continue;
    if (k == "dms_alpha_per" || k == "dms_cr") {
      j[k] = v;
      continue;
    }
    Json parsed = Json::parse(v, nullptr, false);
    if (parsed.is_discarded()) {
      if (v == "True" || v == "False") {
        parsed = (v == "True");
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": metadata '", k, "' = '", v, "' is not a number or boolean"));
      }
    }
    j[k] = parsed;
  }
  return j;
}

// The three naming schemes an adapter file may use for layer i's tensors.
struct AdapterPrefix {
  std::string text;
  bool gguf;
};
std::vector<AdapterPrefix> AdapterPrefixes(int32_t i) {
  return {AdapterPrefix{absl::StrCat("model.layers.", i, "."), false},
          AdapterPrefix{absl::StrCat("layers.", i, "."), false},
          AdapterPrefix{absl::StrCat("blk.", i, "."), true}};
}

// Every tensor of the file must be an adapter tensor of a layer the model has: a tensor for
// layer 30 of a 30-layer model means the file was made for another model.
absl::Status CheckAdapterNames(const SafetensorsFile& f, const std::string& path,
                               int32_t n_layers) {
  static const std::regex kName(
      R"(^(?:model\.layers\.|layers\.|blk\.)(\d+)\.(self_attn\.dms_proj_alpha(?:_norm)?\.(?:weight|bias)|dms_alpha(?:_norm)?\.(?:weight|bias))$)");
  for (const SafetensorsTensorInfo& t : f.tensors()) {
    std::smatch m;
    if (!std::regex_match(t.name, m, kName)) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", t.name,
          "' is not a DMS adapter tensor (model.layers.{i}.self_attn.dms_proj_alpha.weight, "
          "dms_proj_alpha_norm.weight, dms_proj_alpha.bias)"));
    }
    const std::string layer = m[1].str();
    if (layer.size() > 6 || std::stoi(layer) >= n_layers) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "' is for layer ",
                                                     layer, ", but the model has ", n_layers,
                                                     " layers (0..", n_layers - 1, ")"));
    }
  }
  return absl::OkStatus();
}

// A NaN or infinite adapter weight would flag (or keep) tokens arbitrarily: refuse it by name.
// Rows are converted to float by the same dequantizer the backends use.
absl::Status CheckFinite(const std::string& path, const WeightTensor& w) {
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    if (!kernels::DequantizeRow(static_cast<int>(w.type), w.row(r), row.data(), w.cols)) {
      return absl::UnimplementedError(
          absl::StrCat(path, ": tensor '", w.name, "' has type ", DTypeName(w.type)));
    }
    for (int64_t c = 0; c < w.cols; ++c) {
      if (!std::isfinite(row[static_cast<size_t>(c)])) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", w.name, "' has the value ",
                                                       row[static_cast<size_t>(c)], " at element ",
                                                       r * w.cols + c));
      }
    }
  }
  return absl::OkStatus();
}

// Reads layer i's adapter tensors, under the first naming the file uses. Every layer needs its
// projection and its norm; the error names the tensor that is missing.
absl::Status ReadAdapterLayer(const SafetensorsFile& f, const std::string& path, int32_t i,
                              LayerWeights& l) {
  for (const AdapterPrefix& prefix : AdapterPrefixes(i)) {
    auto name = [&](const LayerTensorName& t) {
      return prefix.text + (prefix.gguf ? t.gguf : t.hf);
    };
    const bool any = f.HasTensor(name(kDmsAlphaName)) || f.HasTensor(name(kDmsAlphaNormName)) ||
                     f.HasTensor(name(kDmsAlphaBiasName));
    if (!any) continue;
    for (const LayerTensorName* t : {&kDmsAlphaName, &kDmsAlphaNormName}) {
      if (!f.HasTensor(name(*t))) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor '", name(*t), "' is missing (layer ", i, " has ",
                         name(t == &kDmsAlphaName ? kDmsAlphaNormName : kDmsAlphaName), ")"));
      }
    }
    DMSRT_ASSIGN_OR_RETURN(l.dms_alpha, f.Tensor(name(kDmsAlphaName)));
    DMSRT_ASSIGN_OR_RETURN(l.dms_alpha_norm, f.Tensor(name(kDmsAlphaNormName)));
    if (f.HasTensor(name(kDmsAlphaBiasName))) {
      DMSRT_ASSIGN_OR_RETURN(l.dms_alpha_bias, f.Tensor(name(kDmsAlphaBiasName)));
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": tensor 'model.layers.", i,
                   ".self_attn.dms_proj_alpha.weight' is missing: an adapter needs one for every "
                   "layer"));
}

// Shapes (named by CheckAdapters) first, then values.
absl::Status CheckAdapterValues(const std::string& path, const Model& m) {
  for (const LayerWeights& l : m.weights.layers) {
    for (const WeightTensor* w : {&l.dms_alpha, &l.dms_alpha_norm, &l.dms_alpha_bias}) {
      if (w->present()) DMSRT_RETURN_IF_ERROR(CheckFinite(path, *w));
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace loader

absl::Status AttachDmsAdapter(Model& model, const std::string& safetensors_path) {
  using loader::LoadedModel;
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
  DMSRT_ASSIGN_OR_RETURN(const loader::Json j, loader::AdapterDmsMetadata(*f, safetensors_path));
  if (j.contains("dms_window_size")) {
    DmsConfig d;
    DMSRT_RETURN_IF_ERROR(loader::ReadHfDms(safetensors_path, j, d));
    cfg.dms = d;
  } else if (!cfg.dms.enabled) {
    return absl::InvalidArgumentError(
        absl::StrCat(safetensors_path,
                     ": the model has no DMS config and the adapter's metadata has no "
                     "dms_window_size"));
  }
  if (j.contains("dms_eviction_rate")) {
    const loader::Json& r = j.at("dms_eviction_rate");
    if (!r.is_number() || !(r.get<double>() >= 0.0 && r.get<double>() < 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(safetensors_path, ": metadata 'dms_eviction_rate' = ", r.dump(),
                       " is not a share in [0, 1)"));
    }
    cfg.dms.expected_eviction_rate = r.get<double>();
  }
  cfg.dms.separate_alpha = false;  // CheckAdapters sets it once the tensors are verified
  if (f->tensors().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(safetensors_path,
                     ": no DMS adapter tensors (model.layers.{i}.self_attn.dms_proj_alpha.*)"));
  }
  DMSRT_RETURN_IF_ERROR(loader::CheckAdapterNames(*f, safetensors_path, cfg.n_layers));
  for (int32_t i = 0; i < cfg.n_layers; ++i) {
    DMSRT_RETURN_IF_ERROR(
        loader::ReadAdapterLayer(*f, safetensors_path, i, weights.layers[static_cast<size_t>(i)]));
  }
  Model probe;
  probe.config = cfg;
  probe.weights = std::move(weights);
  DMSRT_RETURN_IF_ERROR(loader::CheckAdapters(safetensors_path, probe));
  DMSRT_RETURN_IF_ERROR(loader::CheckAdapterValues(safetensors_path, probe));
  m->config = probe.config;
  m->weights = std::move(probe.weights);
  m->adapters.push_back(std::move(f));
  m->weight_bytes = loader::CountWeightBytes(*m);
  return absl::OkStatus();
}

}  // namespace dmsrt
