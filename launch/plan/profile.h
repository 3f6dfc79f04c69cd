// Step-time profiles for the capacity planner: how long one engine step takes as a function of
// what it holds, either measured (`dmsrt bench --out`, schema 2) or derived from a named datasheet
// (published peak bandwidth, FLOP/s and memory of a GPU).
//
// The step model is linear in what a step does:
//   step seconds = fixed + per_decode_row * decode rows + per_kv_token * resident KV tokens the
//                  decode rows read + per_prefill_token * prefill tokens
//                  + per_sampled_row * rows whose logits the engine samples
// with `fixed` the cost of reading the weights once (decode) or prefill_fixed when the step has
// no decode row. Sampling runs on the engine's thread after the forward pass returns (the next
// step's tokens depend on it), so it adds to the step on every backend; a measured profile times
// it apart from the forward pass (`step_model.sampling`), a datasheet profile leaves it 0. A measured profile fits these four numbers to its grid by least squares and
// keeps the grid and the fit's largest relative error; a datasheet profile computes them from
// peak figures and is marked unmeasured, as is every figure derived from it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "runtime/model/model.h"

namespace dmsrt {

inline constexpr int kProfileSchemaVersion = 2;

struct StepCosts {
  double fixed = 0.0;              // seconds per step with decode rows
  double per_decode_row = 0.0;     // seconds per decode row
  double per_kv_token = 0.0;       // seconds per resident KV token read by decode rows
  double prefill_fixed = 0.0;      // seconds per step with only prefill tokens
  double per_prefill_token = 0.0;  // seconds per prefill token
  double allreduce_per_step = 0.0; // TP > 1: seconds of all-reduce per decode step
  // Host floor of a step with decode rows (a GPU backend: the host's bookkeeping and enqueueing
  // overlap the device's work, so a step takes the larger of the two). 0: none.
  double host_fixed = 0.0;
  double host_per_decode_row = 0.0;
  // Host seconds per sampled row (temperature sampling over the vocabulary with the chosen
  // token's log-probability, as the engine does): serial after the forward pass.
  double per_sampled_row = 0.0;
  // A measured profile's prefill steps as measured, (tokens, seconds) by tokens: when not empty,
  // a step's prefill part is read off this curve (linear between points, the end segments'
  // slopes beyond) instead of prefill_fixed + per_prefill_token x tokens. On a CPU the cost per
  // token is not constant across chunk sizes (here 1.9 ms at 16 tokens, 3.1 ms at 256), and
  // one line through the grid was 25 % off at the prompt lengths that matter.
  std::vector<std::pair<int64_t, double>> prefill_curve;
  // The prefill part of a step of `tokens` prefill tokens; `with_decode`: the step also has
  // decode rows, whose fixed cost already reads the weights (the linear model's prefill_fixed
  // is then not added; the curve's intercept is).
  double PrefillSeconds(int64_t tokens, bool with_decode) const;
  double Seconds(int64_t decode_rows, int64_t kv_tokens, int64_t prefill_tokens,
                 int64_t sampled_rows) const;
  // The forward pass alone (Seconds without the host floor and without sampling).
  double DeviceSeconds(int64_t decode_rows, int64_t kv_tokens, int64_t prefill_tokens) const;
  // The forward pass's terms (fixed, per row, per KV token, prefill and its curve) times f.
  void ScaleForward(double f);
  // Every term times f: the forward pass, the all-reduce, the host floor and sampling.
  void ScaleAll(double f);
};

struct Profile {
  std::string name;        // file name or datasheet name
  bool measured = false;   // false: datasheet (every derived figure is unmeasured)
  std::string backend = "cpu";  // "cpu" or "cuda": how the planner sizes memory
  bool partly_derived = false;  // a file whose figures are not all measured (its provenance says which)
  std::string device;      // "cpu: <model>, N threads" or "NVIDIA H100 SXM (datasheet)"
  std::string model;       // the model the profile was measured on ("" for datasheets)
  int64_t weight_bytes = 0;    // of the measured model
  int64_t device_memory_bytes = 0;  // 0: unknown (CPU: the KV budget is given)
  double memory_bandwidth = 0.0;    // bytes/s (datasheet peak, or measured copy bandwidth)
  double matrix_flops = 0.0;        // FLOP/s (datasheet dense BF16 peak)
  double interconnect_bandwidth = 0.0;  // bytes/s per GPU (datasheet NVLink), 0 for CPU
  StepCosts costs;
  double fit_max_rel_error = 0.0;   // measured: the worst grid point against the fit
  nlohmann::json provenance;        // as written by bench (commit, cpu, date, ...)
  nlohmann::json grid;              // measured points
};

// Reads a profile written by `dmsrt bench --out` (schema 2). A missing field is an error naming
// the field and the command that writes it.
absl::StatusOr<Profile> LoadProfile(const std::string& path);
absl::StatusOr<Profile> ProfileFromJson(const nlohmann::json& j, const std::string& name);

// Named datasheet profiles: "h100-sxm", "h200".
std::vector<std::string> DatasheetNames();
// The costs of running `config` (weights in bf16) on one GPU of the datasheet with tensor
// parallelism `tp` (the model split over tp GPUs, two all-reduces per layer per step over the
// interconnect). Unmeasured.
absl::StatusOr<Profile> DatasheetProfile(const std::string& name, const ModelConfig& config,
                                         int32_t tp);

// Scales a measured profile taken on one model to another of different size: weight-bound terms
// by the weight bytes, the KV term by bytes per token. Used only when the planned model is not
// the profiled one; the result is marked unmeasured.
Profile ScaleProfile(const Profile& p, int64_t from_weight_bytes, int64_t to_weight_bytes,
                     double kv_ratio);

// Least-squares fit of the step model to measured points: decode points (batch, kv_tokens,
// seconds) and prefill points (tokens, seconds). Sets costs and fit_max_rel_error.
struct DecodePoint {
  int64_t batch = 0;
  int64_t kv_tokens = 0;  // resident tokens over the batch
  double seconds = 0.0;
};
struct PrefillPoint {
  int64_t tokens = 0;
  double seconds = 0.0;
};
void FitStepCosts(const std::vector<DecodePoint>& decode, const std::vector<PrefillPoint>& prefill,
                  StepCosts* costs, double* max_rel_error);
// Fits the host floor (host_fixed + host_per_decode_row x batch, both >= 0) to host-side step
// times (kv_tokens ignored). Returns the worst relative error.
double FitHostCosts(const std::vector<DecodePoint>& host, StepCosts* costs);

// Parameters per token of `c` (matrix weights used once per token), for FLOP counts.
double MatrixParams(const ModelConfig& c);
// KV bytes per token over all layers and KV heads, in bf16 (K and V).
int64_t KvBytesPerTokenBf16(const ModelConfig& c);

}  // namespace dmsrt
