// Synthetic models: the shapes of a named real model with seeded random bf16 weights, for
// benchmarks (nothing large has to travel: a device backend generates the weights on the device)
// and for comparing backends on small models.
//
// Every tensor is a stream of the counter hash of kernels/reference/random_hash.h, so host
// weights (MakeSyntheticModel with host_weights) and device-generated ones
// (SyntheticTensorSpec + FillRandomBf16) are the same bf16 values:
//   matrices   uniform in [-a, a), a = sqrt(3 / inputs) (unit-variance outputs); the output
//              projection 4x that (logits with a wide spread); embeddings a = 1
//   norms      1 + 0.25 u (generated on the host in both cases: they are small)
// There is no tokenizer: synthetic models take token ids.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/model.h"

namespace dmsrt {

// Known names: qwen3-8b, qwen3-32b, llama-3.1-8b and llama-3.1-70b (with Llama 3.1's RoPE
// frequency scaling), tiny-qwen3, tiny-llama. The large ones are for tensor-parallel runs
// (qwen3-32b: about 61 GiB of bf16 weights; llama-3.1-70b: about 131 GiB). A name
// may end in ":" and comma-separated options: "layers=N" keeps the first N layers (for quick
// runs); "dms" turns on DMS Variant A decisions (window 512) with an offset that flags about 7/8
// of tokens on these random weights, so that policy dms runs the model's own decision path.
absl::StatusOr<ModelConfig> SyntheticConfig(const std::string& name);
std::vector<std::string> SyntheticModelNames();

// How one tensor is generated: value i = scale * HashUniformSigned(seed, i) + offset.
struct SyntheticTensorSpec {
  uint64_t seed = 0;
  float scale = 0.f;
  float offset = 0.f;
};
// `which` names a tensor of ModelWeights: "tok_embd", "output_norm", "output", or a layer tensor
// ("attn_norm", "wq", "wk", "wv", "wo", "q_norm", "k_norm", "ffn_norm", "w_gate", "w_up",
// "w_down") with its layer index.
SyntheticTensorSpec SyntheticTensor(const ModelConfig& c, uint64_t seed, const std::string& which,
                                    int32_t layer = -1);
// Value i of a tensor (before rounding to bf16).
float SyntheticValue(const SyntheticTensorSpec& s, uint64_t i);

// A Model with `synthetic` set. With host_weights, every tensor is materialised in BF16 on the
// host (only sensible for small models); otherwise `weights` stays empty.
absl::StatusOr<std::unique_ptr<Model>> MakeSyntheticModel(const ModelConfig& c, uint64_t seed,
                                                          bool host_weights);

}  // namespace dmsrt
