// Step-time profiles (see profile.h).
#include "launch/plan/profile.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace dmsrt {

double StepCosts::PrefillSeconds(int64_t tokens, bool with_decode) const {
  if (tokens <= 0) return 0.0;
  const double t = static_cast<double>(tokens);
  const auto& c = prefill_curve;
  if (c.empty()) return (with_decode ? 0.0 : prefill_fixed) + per_prefill_token * t;
  // Below the smallest point: that point's cost per token.
  if (c.size() == 1 || tokens <= c[0].first) return c[0].second * t / static_cast<double>(c[0].first);
  // The segment that holds t, or the last one beyond the grid.
  size_t i = 1;
  while (i + 1 < c.size() && c[i].first < tokens) ++i;
  const double x0 = static_cast<double>(c[i - 1].first), x1 = static_cast<double>(c[i].first);
  const double slope = (c[i].second - c[i - 1].second) / (x1 - x0);
  return std::max(0.0, c[i - 1].second + slope * (t - x0));
}

double StepCosts::DeviceSeconds(int64_t decode_rows, int64_t kv_tokens,
                                int64_t prefill_tokens) const {
  if (decode_rows == 0 && prefill_tokens == 0) return 0.0;
  double s = decode_rows > 0 ? fixed + allreduce_per_step : 0.0;
  s += per_decode_row * static_cast<double>(decode_rows);
  s += per_kv_token * static_cast<double>(kv_tokens);
  s += PrefillSeconds(prefill_tokens, decode_rows > 0);
  return s;
}

void StepCosts::ScaleForward(double f) {
  fixed *= f;
  per_decode_row *= f;
  per_kv_token *= f;
  prefill_fixed *= f;
  per_prefill_token *= f;
  for (auto& point : prefill_curve) point.second *= f;
}

void StepCosts::ScaleAll(double f) {
  ScaleForward(f);
  allreduce_per_step *= f;
  host_fixed *= f;
  host_per_decode_row *= f;
  per_sampled_row *= f;
}

double StepCosts::Seconds(int64_t decode_rows, int64_t kv_tokens, int64_t prefill_tokens,
                          int64_t sampled_rows) const {
  double s = DeviceSeconds(decode_rows, kv_tokens, prefill_tokens);
  if (decode_rows > 0 && (host_fixed > 0.0 || host_per_decode_row > 0.0)) {
    s = std::max(s, host_fixed + host_per_decode_row * static_cast<double>(decode_rows));
  }
  return s + per_sampled_row * static_cast<double>(sampled_rows);
}

double MatrixParams(const ModelConfig& c) {
  double p = static_cast<double>(c.n_layers) *
             (2.0 * c.hidden * c.n_heads * c.head_dim + 2.0 * c.hidden * c.n_kv_heads * c.head_dim +
              3.0 * c.hidden * c.ffn);
  p += static_cast<double>(c.vocab) * c.hidden;
  return p;
}

int64_t KvBytesPerTokenBf16(const ModelConfig& c) {
  return static_cast<int64_t>(c.n_layers) * c.n_kv_heads * c.head_dim * 2 * 2;
}

namespace {

// Solves the n x n system a x = b (n <= 3) by Gaussian elimination with partial pivoting.
// False when singular.
bool Solve(std::vector<std::vector<double>> a, std::vector<double> b, std::vector<double>* x) {
  const size_t n = b.size();
  for (size_t c = 0; c < n; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < n; ++r) {
      if (std::fabs(a[r][c]) > std::fabs(a[p][c])) p = r;
    }
    if (std::fabs(a[p][c]) < 1e-300) return false;
    std::swap(a[p], a[c]);
    std::swap(b[p], b[c]);
    for (size_t r = c + 1; r < n; ++r) {
      const double f = a[r][c] / a[c][c];
      for (size_t k = c; k < n; ++k) a[r][k] -= f * a[c][k];
      b[r] -= f * b[c];
    }
  }
  x->assign(n, 0.0);
  for (size_t i = n; i-- > 0;) {
    double s = b[i];
    for (size_t k = i + 1; k < n; ++k) s -= a[i][k] * (*x)[k];
    (*x)[i] = s / a[i][i];
  }
  return true;
}

// Least squares of y against the columns of `rows` (each row: features), with the features
// listed in `use` (others fixed at 0). Relative weighting: each point counts by 1/y, so short
// and long steps are fitted to the same relative accuracy.
std::vector<double> LeastSquares(const std::vector<std::vector<double>>& rows,
                                 const std::vector<double>& y, const std::vector<bool>& use) {
  const size_t k = use.size();
  std::vector<size_t> idx;
  for (size_t i = 0; i < k; ++i) {
    if (use[i]) idx.push_back(i);
  }
  std::vector<std::vector<double>> a(idx.size(), std::vector<double>(idx.size(), 0.0));
  std::vector<double> b(idx.size(), 0.0);
  for (size_t r = 0; r < rows.size(); ++r) {
    const double w = y[r] > 0 ? 1.0 / (y[r] * y[r]) : 1.0;
    for (size_t i = 0; i < idx.size(); ++i) {
      for (size_t j = 0; j < idx.size(); ++j) a[i][j] += w * rows[r][idx[i]] * rows[r][idx[j]];
      b[i] += w * rows[r][idx[i]] * y[r];
    }
  }
  std::vector<double> sol, out(k, 0.0);
  if (!Solve(a, b, &sol)) return out;
  for (size_t i = 0; i < idx.size(); ++i) out[idx[i]] = sol[i];
  return out;
}

// Fits with every coefficient >= 0: a negative one is dropped and the rest refitted.
std::vector<double> NonNegativeFit(const std::vector<std::vector<double>>& rows,
                                   const std::vector<double>& y, size_t k) {
  std::vector<bool> use(k, true);
  for (size_t round = 0; round < k; ++round) {
    std::vector<double> c = LeastSquares(rows, y, use);
    bool neg = false;
    for (size_t i = 0; i < k; ++i) {
      if (use[i] && c[i] < 0) {
        use[i] = false;
        neg = true;
      }
    }
    if (!neg) return c;
  }
  return std::vector<double>(k, 0.0);
}

}  // namespace

void FitStepCosts(const std::vector<DecodePoint>& decode, const std::vector<PrefillPoint>& prefill,
                  StepCosts* costs, double* max_rel_error) {
  double worst = 0.0;
  if (!decode.empty()) {
    std::vector<std::vector<double>> rows;
    std::vector<double> y;
    for (const DecodePoint& p : decode) {
      rows.push_back({1.0, static_cast<double>(p.batch), static_cast<double>(p.kv_tokens)});
      y.push_back(p.seconds);
    }
    std::vector<double> c = NonNegativeFit(rows, y, 3);
    costs->fixed = c[0];
    costs->per_decode_row = c[1];
    costs->per_kv_token = c[2];
    for (const DecodePoint& p : decode) {
      const double f = costs->DeviceSeconds(p.batch, p.kv_tokens, 0);
      worst = std::max(worst, std::fabs(f - p.seconds) / p.seconds);
    }
  }
  if (!prefill.empty()) {
    std::vector<std::vector<double>> rows;
    std::vector<double> y;
    for (const PrefillPoint& p : prefill) {
      rows.push_back({1.0, static_cast<double>(p.tokens)});
      y.push_back(p.seconds);
    }
    std::vector<double> c = NonNegativeFit(rows, y, 2);
    costs->prefill_fixed = c[0];
    costs->per_prefill_token = c[1];
    for (const PrefillPoint& p : prefill) {
      const double f = costs->DeviceSeconds(0, 0, p.tokens);
      worst = std::max(worst, std::fabs(f - p.seconds) / p.seconds);
    }
  }
  if (max_rel_error != nullptr) *max_rel_error = worst;
}

double FitHostCosts(const std::vector<DecodePoint>& host, StepCosts* costs) {
  if (host.empty()) return 0.0;
  std::vector<std::vector<double>> rows;
  std::vector<double> y;
  for (const DecodePoint& p : host) {
    rows.push_back({1.0, static_cast<double>(p.batch)});
    y.push_back(p.seconds);
  }
  const std::vector<double> c = NonNegativeFit(rows, y, 2);
  costs->host_fixed = c[0];
  costs->host_per_decode_row = c[1];
  double worst = 0.0;
  for (const DecodePoint& p : host) {
    const double f = c[0] + c[1] * static_cast<double>(p.batch);
    worst = std::max(worst, std::fabs(f - p.seconds) / p.seconds);
  }
  return worst;
}

namespace {

absl::Status Missing(const std::string& name, const std::string& field) {
  return absl::InvalidArgumentError(absl::StrFormat(
      "profile %s has no field '%s': write the profile with `dmsrt bench --out FILE` of this "
      "version (schema %d)",
      name, field, kProfileSchemaVersion));
}

}  // namespace

absl::StatusOr<Profile> ProfileFromJson(const nlohmann::json& j, const std::string& name) {
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat("profile ", name, " is not a JSON object"));
  if (!j.contains("schema_version")) return Missing(name, "schema_version");
  if (!j["schema_version"].is_number_integer() || j["schema_version"].get<int>() != kProfileSchemaVersion) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "profile %s has schema_version %s; this planner reads schema %d: rewrite it with `dmsrt "
        "bench --out FILE`",
        name, j["schema_version"].dump(), kProfileSchemaVersion));
  }
  for (const char* f : {"step_model", "weight_bytes", "model", "provenance"}) {
    if (!j.contains(f)) return Missing(name, f);
  }
  const nlohmann::json& sm = j["step_model"];
  for (const char* f : {"decode", "prefill"}) {
    if (!sm.contains(f) || !sm[f].is_array() || sm[f].empty()) {
      return Missing(name, absl::StrCat("step_model.", f));
    }
  }
  Profile p;
  p.name = name;
  p.measured = true;
  p.model = j["model"].get<std::string>();
  p.weight_bytes = j["weight_bytes"].get<int64_t>();
  p.provenance = j["provenance"];
  p.grid = sm;
  p.memory_bandwidth = j.value("copy_bandwidth_gb_per_s", 0.0) * 1e9;
  if (!p.provenance.is_object()) p.provenance = nlohmann::json::object();
  const std::string cpu = p.provenance.value("cpu_model", std::string("unknown CPU"));
  p.device = absl::StrCat(j.value("backend", std::string("cpu")), ": ", cpu, ", ",
                          j.value("threads", 0), " threads");
  std::vector<DecodePoint> dec;
  std::vector<PrefillPoint> pre;
  try {
    // A point's mean where the profile has one: the planner adds step times up, and a sum
    // follows the mean, not the median (older profiles have only the median, "seconds").
    for (const auto& e : sm["decode"]) {
      dec.push_back({e.at("batch").get<int64_t>(), e.at("kv_tokens").get<int64_t>(),
                     e.value("mean", e.at("seconds").get<double>())});
    }
    for (const auto& e : sm["prefill"]) {
      pre.push_back({e.at("tokens").get<int64_t>(), e.value("mean", e.at("seconds").get<double>())});
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile ", name, ": a step_model point lacks a field (decode: batch, kv_tokens, seconds; "
        "prefill: tokens, seconds): ", e.what()));
  }
  for (const DecodePoint& d : dec) {
    if (!(d.seconds > 0) || d.batch < 1 || d.kv_tokens < 0) {
      return absl::InvalidArgumentError(absl::StrCat("profile ", name, ": a decode point has a non-positive time or batch"));
    }
  }
  for (const PrefillPoint& d : pre) {
    if (!(d.seconds > 0) || d.tokens < 1) {
      return absl::InvalidArgumentError(absl::StrCat("profile ", name, ": a prefill point has a non-positive time or size"));
    }
  }
  FitStepCosts(dec, pre, &p.costs, &p.fit_max_rel_error);
  // Prefill steps are read off the measured points (exact there); the fit's error is then the
  // decode points'.
  if (!pre.empty()) {
    std::sort(pre.begin(), pre.end(), [](const PrefillPoint& a, const PrefillPoint& b) { return a.tokens < b.tokens; });
    for (const PrefillPoint& q : pre) {
      if (!p.costs.prefill_curve.empty() && p.costs.prefill_curve.back().first == q.tokens) continue;
      p.costs.prefill_curve.emplace_back(q.tokens, q.seconds);
    }
    p.fit_max_rel_error = 0.0;
    for (const DecodePoint& d : dec) {
      p.fit_max_rel_error = std::max(
          p.fit_max_rel_error, std::fabs(p.costs.DeviceSeconds(d.batch, d.kv_tokens, 0) - d.seconds) / d.seconds);
    }
  }
  if (sm.contains("sampling")) {
    const nlohmann::json& s = sm["sampling"];
    if (!s.is_object() || !s.contains("row_seconds") || !s["row_seconds"].is_number() ||
        s["row_seconds"].get<double>() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "profile ", name, ": step_model.sampling needs row_seconds >= 0 (dmsrt bench --out writes it)"));
    }
    p.costs.per_sampled_row = s["row_seconds"].get<double>();
  }
  p.backend = j.value("backend", std::string("cpu"));
  p.partly_derived = j.value("partly_derived", false);
  if (p.backend != "cpu" && p.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("profile ", name, ": backend '", p.backend,
                                                   "' is neither cpu nor cuda"));
  }
  if (p.backend == "cuda") {
    // A GPU profile sizes memory like the CUDA backend: it must say how large the device is.
    if (!j.contains("device_memory_bytes") || !j["device_memory_bytes"].is_number() ||
        j["device_memory_bytes"].get<double>() <= 0) {
      return Missing(name, "device_memory_bytes");
    }
    p.device_memory_bytes = j["device_memory_bytes"].get<int64_t>();
    p.device = absl::StrCat("cuda: ", j.value("device", std::string("unnamed GPU")));
  }
  if (j.contains("host_step")) {
    std::vector<DecodePoint> host;
    try {
      for (const auto& e : j["host_step"].at("decode")) {
        host.push_back({e.at("batch").get<int64_t>(), e.value("kv_tokens", int64_t{0}),
                        e.at("seconds").get<double>()});
      }
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "profile ", name, ": host_step.decode needs points with batch and seconds: ", e.what()));
    }
    for (const DecodePoint& d : host) {
      if (!(d.seconds > 0) || d.batch < 1) {
        return absl::InvalidArgumentError(absl::StrCat("profile ", name, ": a host_step point has a non-positive time or batch"));
      }
    }
    p.fit_max_rel_error = std::max(p.fit_max_rel_error, FitHostCosts(host, &p.costs));
  }
  return p;
}

absl::StatusOr<Profile> LoadProfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read profile ", path));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat("profile ", path, " is not valid JSON"));
  return ProfileFromJson(j, path);
}

namespace {

struct Datasheet {
  const char* name;
  const char* device;
  double memory_bytes;
  double bandwidth;      // HBM, bytes/s
  double bf16_flops;     // dense tensor-core peak
  double nvlink;         // bytes/s per direction per GPU
  const char* source;
};

// Published peak figures (NVIDIA H100 and H200 product datasheets; SXM form factor).
constexpr Datasheet kDatasheets[] = {
    {"h100-sxm", "NVIDIA H100 SXM 80GB (datasheet)", 80e9, 3.35e12, 989.4e12, 450e9,
     "NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOP/s dense BF16, "
     "NVLink 900 GB/s"},
    {"h200", "NVIDIA H200 SXM 141GB (datasheet)", 141e9, 4.8e12, 989.4e12, 450e9,
     "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, 989 TFLOP/s dense BF16, "
     "NVLink 900 GB/s"},
};

// Latency of one small all-reduce over NVLink (an assumption, not a datasheet figure).
constexpr double kAllReduceLatency = 8e-6;

}  // namespace

std::vector<std::string> DatasheetNames() {
  std::vector<std::string> v;
  for (const Datasheet& d : kDatasheets) v.push_back(d.name);
  return v;
}

absl::StatusOr<Profile> DatasheetProfile(const std::string& name, const ModelConfig& c,
                                         int32_t tp) {
  const Datasheet* ds = nullptr;
  for (const Datasheet& d : kDatasheets) {
    if (name == d.name) ds = &d;
  }
  if (ds == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("no datasheet profile '", name, "'; known: ",
                                                   absl::StrJoin(DatasheetNames(), ", ")));
  }
  if (tp < 1) return absl::InvalidArgumentError("tp must be >= 1");
  Profile p;
  p.name = name;
  p.measured = false;
  p.device = ds->device;
  p.device_memory_bytes = static_cast<int64_t>(ds->memory_bytes);
  p.memory_bandwidth = ds->bandwidth;
  p.matrix_flops = ds->bf16_flops;
  p.interconnect_bandwidth = ds->nvlink;
  const double params = MatrixParams(c);
  p.weight_bytes = static_cast<int64_t>(2.0 * (params + static_cast<double>(c.vocab) * c.hidden));
  const double t = tp;
  // Decode reads every weight once per step, and each decode row's resident KV once; each row
  // costs 2 FLOPs per parameter. Peak figures, so these are lower bounds on step time.
  p.costs.fixed = 2.0 * params / t / ds->bandwidth;  // the embedding table is not read whole
  p.costs.per_kv_token = static_cast<double>(KvBytesPerTokenBf16(c)) / t / ds->bandwidth;
  p.costs.per_decode_row = 2.0 * params / t / ds->bf16_flops;
  p.costs.prefill_fixed = p.costs.fixed;
  p.costs.per_prefill_token = 2.0 * params / t / ds->bf16_flops;
  if (tp > 1) {
    // Two all-reduces per layer (after o_proj and down_proj); ring all-reduce moves
    // 2 (t-1)/t of the bf16 activations per GPU.
    const double per_row_bytes = 2.0 * (t - 1) / t * c.hidden * 2.0;
    p.costs.allreduce_per_step = 2.0 * c.n_layers * kAllReduceLatency;
    p.costs.per_decode_row += 2.0 * c.n_layers * per_row_bytes / ds->nvlink;
    p.costs.per_prefill_token += 2.0 * c.n_layers * per_row_bytes / ds->nvlink;
  }
  p.provenance = {{"source", ds->source},
                  {"derived", "step times from peak figures (bandwidth, FLOP/s); unmeasured"},
                  {"allreduce_latency_assumed_s", tp > 1 ? kAllReduceLatency : 0.0}};
  return p;
}

Profile ScaleProfile(const Profile& p, int64_t from_weight_bytes, int64_t to_weight_bytes,
                     double kv_ratio) {
  Profile q = p;
  const double w = from_weight_bytes > 0 ? static_cast<double>(to_weight_bytes) / from_weight_bytes : 1.0;
  q.costs.fixed *= w;
  q.costs.per_decode_row *= w;
  q.costs.prefill_fixed *= w;
  q.costs.per_prefill_token *= w;
  q.costs.per_kv_token *= kv_ratio;
  q.measured = false;
  q.name = absl::StrCat(p.name, " (scaled to another model)");
  return q;
}

}  // namespace dmsrt
