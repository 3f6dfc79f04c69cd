// AttachDmsAdapter: adds Variant-B DMS adapter tensors (dms_proj_alpha*) from a .safetensors file
// to a model that has none, and the DMS config from the file's metadata when it carries one.
// Tensor names may be in Hugging Face form (`model.layers.{i}.self_attn.dms_proj_alpha*`, or
// without the `model.` prefix) or in GGUF form (`blk.{i}.dms_alpha*`).
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
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

// Reads layer i's adapter tensors, under the first naming the file uses; leaves the layer as it
// is when the file has none for it.
absl::Status ReadAdapterLayer(const SafetensorsFile& f, int32_t i, LayerWeights& l) {
  struct Prefix {
    std::string text;
    bool gguf;
  };
  for (const Prefix& prefix : {Prefix{absl::StrCat("model.layers.", i, "."), false},
                               Prefix{absl::StrCat("layers.", i, "."), false},
                               Prefix{absl::StrCat("blk.", i, "."), true}}) {
    auto name = [&](const LayerTensorName& t) {
      return prefix.text + (prefix.gguf ? t.gguf : t.hf);
    };
    if (!f.HasTensor(name(kDmsAlphaName))) continue;
    DMSRT_ASSIGN_OR_RETURN(l.dms_alpha, f.Tensor(name(kDmsAlphaName)));
    DMSRT_ASSIGN_OR_RETURN(l.dms_alpha_norm, f.Tensor(name(kDmsAlphaNormName)));
    if (f.HasTensor(name(kDmsAlphaBiasName))) {
      DMSRT_ASSIGN_OR_RETURN(l.dms_alpha_bias, f.Tensor(name(kDmsAlphaBiasName)));
    }
    break;
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
  cfg.dms.separate_alpha = false;  // CheckAdapters sets it once the tensors are verified
  for (int32_t i = 0; i < cfg.n_layers; ++i) {
    DMSRT_RETURN_IF_ERROR(loader::ReadAdapterLayer(*f, i, weights.layers[static_cast<size_t>(i)]));
  }
  Model probe;
  probe.config = cfg;
  probe.weights = std::move(weights);
  DMSRT_RETURN_IF_ERROR(loader::CheckAdapters(safetensors_path, probe));
  if (!probe.weights.layers.empty() && !probe.weights.layers[0].dms_alpha.present()) {
    return absl::InvalidArgumentError(
        absl::StrCat(safetensors_path,
                     ": no DMS adapter tensors (model.layers.{i}.self_attn.dms_proj_alpha.*)"));
  }
  m->config = probe.config;
  m->weights = std::move(probe.weights);
  m->adapters.push_back(std::move(f));
  m->weight_bytes = loader::CountWeightBytes(*m);
  return absl::OkStatus();
}

}  // namespace dmsrt
