// A loaded model: one normalised configuration, the weights, and the tokenizer description, from
// either a GGUF file or a Hugging Face directory.
//
// Conventions every backend relies on (the loader establishes them, whatever the source):
// - Linear weights are [out, in] (`WeightTensor::rows` = out). y = W x (+ b).
// - RoPE is always the rotate-half ("NeoX") layout: channel i pairs with i + head_dim/2. GGUF
//   Llama files store Q/K rows permuted for interleaved RoPE; the loader undoes that permutation
//   at load (rows are copied, blocks stay quantized), so no backend has a second RoPE layout.
// - Quantized tensors stay quantized; backends compute with them directly.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/tensor.h"

namespace dmsrt {

enum class Arch { kLlama, kQwen2, kQwen3 };
const char* ArchName(Arch a);

// RoPE frequency scaling read from the file. kNone, kLinear (positions / factor), kLlama3
// (Llama-3.1 frequency-dependent scaling), kYarn is refused at load for now.
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 } type = Type::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int32_t original_max_positions = 8192;
};

// DMS fields (docs/dms-semantics.md §7). `enabled` is true for a checkpoint with DMS fields.
struct DmsConfig {
  bool enabled = false;
  int32_t window = 0;                  // dms_window_size (w)
  float alpha_scale = 100.0f;          // dms_alpha_scale
  float initial_alpha_offset = 5.0f;   // dms_initial_alpha_offset
  bool separate_alpha = false;         // Variant B when true (adapter tensors present)
  bool alpha_per_layer = false;        // dms_alpha_per == "layer"
  int32_t paged_block_size = 256;      // dms_paged_attention_block_size
  std::string cr_label;                // dms_cr (label only)
  // dms_sink_tokens, a dmsrt extension (0, the reference behaviour, when absent): the first
  // sink_tokens tokens of a sequence are never flagged, whatever the decisions say. Attention
  // sinks cannot be recognised from the residual stream of layer 0 (it carries no position), so
  // a calibrated adapter states them instead of guessing them.
  int32_t sink_tokens = 0;
  // dms_eviction_rate of an adapter file: the share of tokens its decisions evicted when it was
  // calibrated, in [0, 1); 0 when the file does not say. Budget mode plans with it until the
  // replica has observed its own rate.
  double expected_eviction_rate = 0.0;
};

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string name;
  int32_t n_layers = 0;
  int32_t hidden = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t ffn = 0;
  int32_t vocab = 0;
  int32_t max_positions = 0;  // context length the model was trained for
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int32_t rope_dim = 0;       // channels rotated (== head_dim for all supported families)
  RopeScaling rope_scaling;
  bool tied_embeddings = false;
  bool attn_bias = false;     // Qwen2: q/k/v biases
  bool qk_norm = false;       // Qwen3: per-head RMSNorm on q and k before RoPE
  DmsConfig dms;

  int32_t gqa_group() const { return n_heads / n_kv_heads; }
};

struct LayerWeights {
  WeightTensor attn_norm;          // [hidden]
  WeightTensor wq, wk, wv, wo;     // [n_heads*hd, hidden], [n_kv*hd, hidden] x2, [hidden, n_heads*hd]
  WeightTensor bq, bk, bv;         // optional biases (Qwen2)
  WeightTensor q_norm, k_norm;     // optional [head_dim] (Qwen3)
  WeightTensor ffn_norm;           // [hidden]
  WeightTensor w_gate, w_up;       // [ffn, hidden]
  WeightTensor w_down;             // [hidden, ffn]
  // DMS Variant B adapter (optional): RMSNorm on the layer input, then a linear to n_kv_heads.
  WeightTensor dms_alpha_norm;     // [hidden]
  WeightTensor dms_alpha;          // [n_kv_heads, hidden]
  WeightTensor dms_alpha_bias;     // [n_kv_heads] (only with attention bias)
};

struct ModelWeights {
  WeightTensor tok_embd;           // [vocab, hidden]
  WeightTensor output_norm;        // [hidden]
  WeightTensor output;             // [vocab, hidden]; equals tok_embd when tied
  std::vector<LayerWeights> layers;
};

// What the tokenizer needs, from GGUF `tokenizer.ggml.*` or from tokenizer.json.
struct TokenizerSpec {
  std::string model;                    // "gpt2" (byte-level BPE) is the one supported
  std::string pre;                      // pre-tokenizer family: "smollm", "llama-bpe", "qwen2", "gpt2", ...
  std::vector<std::string> tokens;      // id -> token text (byte-level encoded)
  std::vector<int32_t> token_types;     // GGUF token types (1 normal, 3 control, 4 user-defined, ...)
  std::vector<std::string> merges;      // "a b", rank = index
  int32_t bos_id = -1, eos_id = -1, pad_id = -1, unk_id = -1;
  std::vector<int32_t> eos_ids;         // every id that ends generation (eos, <|im_end|>, <|eot_id|> ...)
  bool add_bos = false;
  std::string chat_template;            // Jinja source as stored in the file (used to pick a template)
};

// A loaded model. Owns the mapping of the file(s) and any buffers the loader created; the
// WeightTensor views stay valid for the Model's lifetime. Immutable after load, so it may be
// shared by threads.
class Model {
 public:
  virtual ~Model() = default;
  ModelConfig config;
  ModelWeights weights;
  TokenizerSpec tokenizer;
  std::string source_path;
  std::string source_format;  // "gguf" or "hf"
  // Bytes of weights as stored (quantized), for bandwidth figures.
  int64_t weight_bytes = 0;
  // Synthetic models (runtime/model/synthetic_model.h): random weights from this seed. Without host
  // weights (`weights` empty) a device backend generates them where they are used.
  bool synthetic = false;
  uint64_t synthetic_seed = 0;
};

// Loads a GGUF file (path ends in .gguf or starts with the GGUF magic) or a Hugging Face model
// directory (config.json + *.safetensors + tokenizer.json). Errors name the file and what is
// wrong: unsupported architecture or tensor type, truncated or corrupt file, mismatched shapes.
absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& path);

// Adds Variant-B DMS adapter tensors (dms_proj_alpha*, from a .safetensors file) to a model that
// has none; also sets config.dms from the adapter's metadata when present.
absl::Status AttachDmsAdapter(Model& model, const std::string& safetensors_path);

}  // namespace dmsrt
