// Where every weight of a Model lives in each source format: one table, one row per weight, with
// its GGUF name and its Hugging Face (safetensors) name. The loaders (gguf_loader.cc,
// hf_loader.cc), the DMS adapter reader (dms_adapter.cc) and the weight byte count read it; a
// weight added to ModelWeights or LayerWeights gets its row here.
//
// Internal to runtime/model/.
#pragma once

#include "runtime/model/model.h"
#include "runtime/model/tensor.h"

namespace dmsrt {
namespace loader {

// Whether a model file must, may or must not carry a tensor.
enum class TensorNeed { kRequired, kOptional, kRefused };

// A model-wide tensor: the full name in each format.
struct ModelTensorName {
  WeightTensor ModelWeights::*field;
  const char* gguf;
  const char* hf;
};

// The embedding, the final norm and the output projection. `output` is optional in both formats
// (absent means tied to the embedding).
inline constexpr ModelTensorName kTokEmbdName{&ModelWeights::tok_embd, "token_embd.weight",
                                              "model.embed_tokens.weight"};
inline constexpr ModelTensorName kOutputNormName{&ModelWeights::output_norm, "output_norm.weight",
                                                 "model.norm.weight"};
inline constexpr ModelTensorName kOutputName{&ModelWeights::output, "output.weight",
                                             "lm_head.weight"};

// A tensor of layer i: the name after the layer prefix ("blk.{i}." in GGUF, "model.layers.{i}."
// in Hugging Face checkpoints). A null `gguf` means GGUF files are not checked for it; a
// kRefused row has no field and names what is refused in `what`.
struct LayerTensorName {
  WeightTensor LayerWeights::*field;
  const char* gguf;
  const char* hf;
  TensorNeed need;
  const char* what = nullptr;
};

// The DMS Variant B adapter, also read from adapter files (dms_adapter.cc).
inline constexpr LayerTensorName kDmsAlphaName{&LayerWeights::dms_alpha, "dms_alpha.weight",
                                               "self_attn.dms_proj_alpha.weight",
                                               TensorNeed::kOptional};
inline constexpr LayerTensorName kDmsAlphaNormName{&LayerWeights::dms_alpha_norm,
                                                   "dms_alpha_norm.weight",
                                                   "self_attn.dms_proj_alpha_norm.weight",
                                                   TensorNeed::kOptional};
inline constexpr LayerTensorName kDmsAlphaBiasName{&LayerWeights::dms_alpha_bias,
                                                   "dms_alpha.bias",
                                                   "self_attn.dms_proj_alpha.bias",
                                                   TensorNeed::kOptional};

// In load order: the first missing required tensor is the one an error names.
inline constexpr LayerTensorName kLayerTensorNames[] = {
    {&LayerWeights::attn_norm, "attn_norm.weight", "input_layernorm.weight",
     TensorNeed::kRequired},
    {&LayerWeights::wq, "attn_q.weight", "self_attn.q_proj.weight", TensorNeed::kRequired},
    {&LayerWeights::wk, "attn_k.weight", "self_attn.k_proj.weight", TensorNeed::kRequired},
    {&LayerWeights::wv, "attn_v.weight", "self_attn.v_proj.weight", TensorNeed::kRequired},
    {&LayerWeights::wo, "attn_output.weight", "self_attn.o_proj.weight", TensorNeed::kRequired},
    {&LayerWeights::bq, "attn_q.bias", "self_attn.q_proj.bias", TensorNeed::kOptional},
    {&LayerWeights::bk, "attn_k.bias", "self_attn.k_proj.bias", TensorNeed::kOptional},
    {&LayerWeights::bv, "attn_v.bias", "self_attn.v_proj.bias", TensorNeed::kOptional},
    {nullptr, nullptr, "self_attn.o_proj.bias", TensorNeed::kRefused, "o_proj bias"},
    {&LayerWeights::q_norm, "attn_q_norm.weight", "self_attn.q_norm.weight",
     TensorNeed::kOptional},
    {&LayerWeights::k_norm, "attn_k_norm.weight", "self_attn.k_norm.weight",
     TensorNeed::kOptional},
    {&LayerWeights::ffn_norm, "ffn_norm.weight", "post_attention_layernorm.weight",
     TensorNeed::kRequired},
    {&LayerWeights::w_gate, "ffn_gate.weight", "mlp.gate_proj.weight", TensorNeed::kRequired},
    {&LayerWeights::w_up, "ffn_up.weight", "mlp.up_proj.weight", TensorNeed::kRequired},
    {&LayerWeights::w_down, "ffn_down.weight", "mlp.down_proj.weight", TensorNeed::kRequired},
    kDmsAlphaName,
    kDmsAlphaNormName,
    kDmsAlphaBiasName,
};

}  // namespace loader
}  // namespace dmsrt
