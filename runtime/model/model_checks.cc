// The checks and normalisation both model sources share (runtime/model/loader_internal.h): the
// hyper-parameters, every weight's shape against them, the DMS config and adapter tensors, the
// weight byte count, and the end-of-generation token ids.
#include <cmath>
#include <set>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "parallel/status_macros.h"
#include "runtime/model/loader_internal.h"
#include "runtime/model/tensor_names.h"

namespace dmsrt {
namespace loader {
namespace {

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

}  // namespace

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
  for (const ModelTensorName& t : {kTokEmbdName, kOutputNormName, kOutputName}) {
    add(m.weights.*t.field);
  }
  for (const LayerWeights& l : m.weights.layers) {
    for (const LayerTensorName& t : kLayerTensorNames) {
      if (t.field != nullptr) add(l.*t.field);
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

}  // namespace loader
}  // namespace dmsrt
