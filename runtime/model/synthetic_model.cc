#include "runtime/model/synthetic_model.h"

#include <cmath>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_join.h"
#include "kernels/reference/quant.h"
#include "kernels/reference/random_hash.h"

namespace dmsrt {
namespace {

struct Named {
  const char* name;
  ModelConfig config;
};

ModelConfig Shape(Arch arch, const char* name, int32_t layers, int32_t hidden, int32_t heads,
                  int32_t kv_heads, int32_t head_dim, int32_t ffn, int32_t vocab, float theta,
                  float eps, bool qk_norm) {
  ModelConfig c;
  c.arch = arch;
  c.name = name;
  c.n_layers = layers;
  c.hidden = hidden;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.ffn = ffn;
  c.vocab = vocab;
  c.max_positions = 131072;
  c.rope_theta = theta;
  c.rope_dim = head_dim;
  c.rms_eps = eps;
  c.qk_norm = qk_norm;
  return c;
}

// Llama 3.1's RoPE frequency scaling (rope_scaling of its config.json).
ModelConfig WithLlama31Rope(ModelConfig c) {
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0f;
  c.rope_scaling.low_freq_factor = 1.0f;
  c.rope_scaling.high_freq_factor = 4.0f;
  c.rope_scaling.original_max_positions = 8192;
  return c;
}

const std::vector<Named>& Catalog() {
  static const std::vector<Named> kNamed = {
      {"qwen3-8b", Shape(Arch::kQwen3, "qwen3-8b (synthetic)", 36, 4096, 32, 8, 128, 12288,
                         151936, 1e6f, 1e-6f, true)},
      {"qwen3-32b", Shape(Arch::kQwen3, "qwen3-32b (synthetic)", 64, 5120, 64, 8, 128, 25600,
                          151936, 1e6f, 1e-6f, true)},
      {"llama-3.1-8b", WithLlama31Rope(Shape(Arch::kLlama, "llama-3.1-8b (synthetic)", 32, 4096,
                                             32, 8, 128, 14336, 128256, 5e5f, 1e-5f, false))},
      {"llama-3.1-70b", WithLlama31Rope(Shape(Arch::kLlama, "llama-3.1-70b (synthetic)", 80, 8192,
                                              64, 8, 128, 28672, 128256, 5e5f, 1e-5f, false))},
      {"tiny-qwen3", Shape(Arch::kQwen3, "tiny-qwen3 (synthetic)", 2, 256, 8, 2, 64, 512, 512,
                           1e4f, 1e-6f, true)},
      {"tiny-llama", Shape(Arch::kLlama, "tiny-llama (synthetic)", 3, 256, 4, 2, 64, 512, 384,
                           1e4f, 1e-5f, false)},
  };
  return kNamed;
}

// Stable per-tensor stream ids.
int32_t TensorIndex(const std::string& which) {
  static const char* kLayer[] = {"attn_norm", "wq",  "wk",     "wv",   "wo",    "q_norm",
                                 "k_norm",    "ffn_norm", "w_gate", "w_up", "w_down"};
  if (which == "tok_embd") return 0;
  if (which == "output_norm") return 1;
  if (which == "output") return 2;
  for (int32_t i = 0; i < 11; ++i) {
    if (which == kLayer[i]) return 3 + i;
  }
  return 99;
}

class SyntheticModel : public Model {
 public:
  std::vector<std::unique_ptr<uint16_t[]>> buffers;
};

}  // namespace

std::vector<std::string> SyntheticModelNames() {
  std::vector<std::string> out;
  for (const Named& n : Catalog()) out.push_back(n.name);
  return out;
}

absl::StatusOr<ModelConfig> SyntheticConfig(const std::string& spec) {
  std::string name = spec;
  int32_t layers = -1;
  bool dms = false;
  const size_t colon = spec.find(':');
  if (colon != std::string::npos) {
    name = spec.substr(0, colon);
    const std::vector<std::string> opts = absl::StrSplit(spec.substr(colon + 1), ',');
    for (const std::string& opt : opts) {
      if (opt == "dms") {
        dms = true;
      } else if (opt.rfind("layers=", 0) != 0 || !absl::SimpleAtoi(opt.substr(7), &layers) ||
                 layers < 1) {
        return absl::InvalidArgumentError(absl::StrCat("bad synthetic model option '", opt,
                                                       "' in '", spec,
                                                       "': expected layers=N (N >= 1) or dms"));
      }
    }
  }
  for (const Named& n : Catalog()) {
    if (name != n.name) continue;
    ModelConfig c = n.config;
    if (layers > 0) {
      if (layers > c.n_layers) {
        return absl::InvalidArgumentError(absl::StrCat(name, " has ", c.n_layers,
                                                       " layers; layers=", layers, " is more"));
      }
      c.n_layers = layers;
      c.name = absl::StrCat(c.name, ", first ", layers, " layers");
    }
    if (dms) {
      // Variant A decisions from the last channel of each group's first query head, which on
      // these random weights is close to a standard normal z: d = 100 z + 115 > 0 flags about
      // 7/8 of tokens (P(z > -1.15) = 0.875), the rate of an 8x checkpoint. The window is the
      // release's.
      c.dms.enabled = true;
      c.dms.window = 512;
      c.dms.alpha_scale = 100.f;
      c.dms.initial_alpha_offset = -115.f;
      c.name = absl::StrCat(c.name, ", DMS Variant A decisions");
    }
    return c;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown synthetic model '", name,
                                                 "'; known: ",
                                                 absl::StrJoin(SyntheticModelNames(), ", ")));
}

SyntheticTensorSpec SyntheticTensor(const ModelConfig& c, uint64_t seed, const std::string& which,
                                    int32_t layer) {
  SyntheticTensorSpec s;
  s.seed = seed * 0x100000001B3ull + static_cast<uint64_t>(layer + 1) * 131 +
           static_cast<uint64_t>(TensorIndex(which));
  auto fan_in = [](int64_t in) { return std::sqrt(3.0f / static_cast<float>(in)); };
  if (which == "tok_embd") {
    s.scale = 1.0f;
  } else if (which == "output") {
    s.scale = 4.0f * fan_in(c.hidden);
  } else if (which.find("norm") != std::string::npos) {
    s.scale = 0.25f;
    s.offset = 1.0f;
  } else if (which == "wo") {
    s.scale = fan_in(static_cast<int64_t>(c.n_heads) * c.head_dim);
  } else if (which == "w_down") {
    s.scale = fan_in(c.ffn);
  } else {
    s.scale = fan_in(c.hidden);
  }
  return s;
}

float SyntheticValue(const SyntheticTensorSpec& s, uint64_t i) {
  return s.scale * kernels::HashUniformSigned(s.seed, i) + s.offset;
}

absl::StatusOr<std::unique_ptr<Model>> MakeSyntheticModel(const ModelConfig& c, uint64_t seed,
                                                          bool host_weights) {
  if (c.n_layers <= 0 || c.hidden <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
      c.head_dim <= 0 || c.ffn <= 0 || c.vocab <= 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError("bad synthetic model shape");
  }
  auto m = std::make_unique<SyntheticModel>();
  m->config = c;
  m->synthetic = true;
  m->synthetic_seed = seed;
  m->source_path = absl::StrCat("synthetic:", c.name);
  m->source_format = "synthetic";
  const int64_t H = c.hidden, QW = static_cast<int64_t>(c.n_heads) * c.head_dim,
                KW = static_cast<int64_t>(c.n_kv_heads) * c.head_dim, F = c.ffn;
  int64_t bytes = 2 * (2 * static_cast<int64_t>(c.vocab) * H + H);
  bytes += 2 * c.n_layers * (2 * H + QW * H * 2 + KW * H * 2 + 3 * F * H + (c.qk_norm ? 2 * c.head_dim : 0));
  m->weight_bytes = bytes;
  if (!host_weights) return std::unique_ptr<Model>(std::move(m));
  if (bytes > (8ll << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        c.name, " has ", bytes >> 20, " MiB of weights: too large to materialise on the host; "
        "use a device backend, which generates them on the device"));
  }
  auto make = [&](const std::string& which, int32_t layer, std::vector<int64_t> shape) {
    WeightTensor w;
    w.name = layer >= 0 ? absl::StrCat("blk.", layer, ".", which) : which;
    w.type = DType::kBF16;
    w.shape = shape;
    w.rows = shape.size() == 2 ? shape[0] : 1;
    w.cols = shape.back();
    const int64_t n = w.rows * w.cols;
    auto buf = std::make_unique<uint16_t[]>(static_cast<size_t>(n));
    const SyntheticTensorSpec s = SyntheticTensor(c, seed, which, layer);
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = kernels::Fp32ToBf16(SyntheticValue(s, static_cast<uint64_t>(i)));
    }
    w.data = reinterpret_cast<const uint8_t*>(buf.get());
    w.nbytes = static_cast<size_t>(n) * 2;
    m->buffers.push_back(std::move(buf));
    return w;
  };
  ModelWeights& W = m->weights;
  W.tok_embd = make("tok_embd", -1, {c.vocab, H});
  W.output_norm = make("output_norm", -1, {H});
  W.output = make("output", -1, {c.vocab, H});
  for (int32_t l = 0; l < c.n_layers; ++l) {
    LayerWeights L;
    L.attn_norm = make("attn_norm", l, {H});
    L.wq = make("wq", l, {QW, H});
    L.wk = make("wk", l, {KW, H});
    L.wv = make("wv", l, {KW, H});
    L.wo = make("wo", l, {H, QW});
    if (c.qk_norm) {
      L.q_norm = make("q_norm", l, {c.head_dim});
      L.k_norm = make("k_norm", l, {c.head_dim});
    }
    L.ffn_norm = make("ffn_norm", l, {H});
    L.w_gate = make("w_gate", l, {F, H});
    L.w_up = make("w_up", l, {F, H});
    L.w_down = make("w_down", l, {H, F});
    W.layers.push_back(std::move(L));
  }
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace dmsrt
