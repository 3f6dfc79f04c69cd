// Shared by the parts of the model loader (runtime/model/model.h: LoadModel, AttachDmsAdapter):
//   model_loader.cc   LoadModel (which source), ArchName
//   gguf_loader.cc    LoadGguf: a GGUF file
//   hf_loader.cc      LoadHf: a Hugging Face directory; ReadHfDms (config.json DMS keys)
//   model_checks.cc   the checks and normalisation both sources share (config, shapes, DMS, EOS)
//   dms_adapter.cc    AttachDmsAdapter
//   tensor_names.h    the GGUF and Hugging Face name of every weight
//
// Internal to runtime/model/.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/model/gguf.h"
#include "runtime/model/model.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/tensor.h"

namespace dmsrt {
namespace loader {

// The Model the loader returns: it owns the mapped files and the buffers of re-ordered rows.
class LoadedModel : public Model {
 public:
  std::unique_ptr<GgufFile> gguf;
  std::unique_ptr<SafetensorsSet> hf;
  std::vector<std::unique_ptr<SafetensorsFile>> adapters;
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
};

absl::StatusOr<std::unique_ptr<Model>> LoadGguf(const std::string& path);
absl::StatusOr<std::unique_ptr<Model>> LoadHf(const std::string& dir);

// Reads the DMS keys of a config.json object (or of an adapter's metadata in that form) into `d`;
// no `dms_window_size` means no DMS and leaves `d` as it is.
absl::Status ReadHfDms(const std::string& file, const nlohmann::json& j, DmsConfig& d);

// ---- model_checks.cc ---------------------------------------------------------------------------

// Checks type support and shape; errors name `file` and the tensor.
absl::Status CheckTensor(const std::string& file, const WeightTensor& w,
                         const std::vector<int64_t>& want);
// The hyper-parameters every backend relies on.
absl::Status CheckConfig(const std::string& file, const ModelConfig& c);
// Every weight's shape against the config; sets config.attn_bias and config.qk_norm from the
// tensors present, then checks the DMS adapter (CheckAdapters).
absl::Status CheckLayers(const std::string& file, Model& m);
// The Variant-B tensors of every layer: all layers have them or none does. Sets
// config.dms.separate_alpha when they are present and valid.
absl::Status CheckAdapters(const std::string& file, Model& m);
// Validates a DMS config once its keys are read; picks a paged block size below a small window
// when none was given.
absl::Status FinishDms(const std::string& file, DmsConfig& d, bool block_size_given);
// dms_alpha_per: "head" or "layer".
absl::Status ParseAlphaPer(const std::string& file, const std::string& v, DmsConfig& d);
// Bytes of weights as stored, each buffer once (a tied output counts once).
int64_t CountWeightBytes(const Model& m);
// eos_ids = eos, `extra`, and every end-of-turn control token the vocabulary has.
void CollectEosIds(TokenizerSpec& t, const std::vector<int32_t>& extra);

}  // namespace loader
}  // namespace dmsrt
