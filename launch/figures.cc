#include "launch/figures.h"

#include "absl/strings/str_format.h"

namespace dmsrt {

std::string HumanBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? absl::StrFormat("%d B", bytes) : absl::StrFormat("%.2f %s", v, units[u]);
}

namespace {
nlohmann::json HeadJson(const KvHeadFigures& h) {
  double cr = h.resident > 0 ? static_cast<double>(h.logical) / h.resident : 0.0;
  return {{"logical", h.logical},   {"resident", h.resident},       {"flagged", h.flagged},
          {"kv_reads", h.kv_reads}, {"dense_kv_reads", h.dense_reads}, {"cache_cr", cr}};
}
}  // namespace

nlohmann::json FiguresJson(const KvFigures& f, int32_t n_kv_heads, bool detail) {
  nlohmann::json j = {{"cache_cr", f.cache_cr()},
                      {"eviction_rate", f.eviction_rate()},
                      {"asymptotic_cr", f.asymptotic_cr()},
                      {"block_cr", f.block_cr()},
                      {"kv_reads", f.kv_reads},
                      {"dense_kv_reads", f.dense_reads},
                      {"kv_bytes", f.kv_bytes},
                      {"logical_tokens", f.logical_tokens},
                      {"resident_tokens", f.resident_tokens},
                      {"blocks_held", f.blocks_held},
                      {"dense_blocks", f.dense_blocks}};
  if (detail) {
    nlohmann::json layers = nlohmann::json::array();
    for (const auto& l : f.per_layer) layers.push_back(HeadJson(l));
    nlohmann::json heads = nlohmann::json::array();
    for (size_t i = 0; i < f.per_head.size(); ++i) {
      nlohmann::json h = HeadJson(f.per_head[i]);
      h["layer"] = n_kv_heads > 0 ? static_cast<int64_t>(i) / n_kv_heads : 0;
      h["head"] = n_kv_heads > 0 ? static_cast<int64_t>(i) % n_kv_heads : 0;
      heads.push_back(std::move(h));
    }
    j["kv_detail"] = {{"per_layer", std::move(layers)}, {"per_head", std::move(heads)}};
  }
  return j;
}

std::string FiguresLine(const KvFigures& f, const std::string& policy_label) {
  return absl::StrFormat(
      "KV [%s]: %s held, %d resident / %d logical tokens; cache CR %.2fx, eviction rate %.3f "
      "(asymptotic CR %.2fx), block CR %.2fx, KV reads %d of %d dense",
      policy_label, HumanBytes(f.kv_bytes), f.resident_tokens, f.logical_tokens, f.cache_cr(),
      f.eviction_rate(), f.asymptotic_cr(), f.block_cr(), f.kv_reads, f.dense_reads);
}

}  // namespace dmsrt
