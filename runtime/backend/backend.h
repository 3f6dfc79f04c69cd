// The backend interface: one forward pass over a batch of sequence chunks.
//
// A step is a list of chunks: each is some new tokens of one sequence (a prefill chunk, or one
// decode token). The backend embeds them, runs every layer (attention through the KvCache, which
// applies the eviction policy), and returns logits for the rows asked for. The engine and the
// scheduler see only this interface, so CPU and CUDA backends are interchangeable.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/reference/rope_freq.h"
#include "kernels/reference/sampling_ref.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/model.h"

namespace dmsrt {

class Communicator;  // parallel/comm.h

struct SeqChunk {
  SeqId seq = -1;
  std::vector<int32_t> tokens;  // positions KvCache::Length(seq) ..
  enum class Logits { kNone, kLast, kAll } logits = Logits::kLast;
  // Sample the next token from the last row where the logits are (on the device for a device
  // backend, so logits need not travel): ForwardResult::sampled gets it. Same rule and draws as
  // kernels/reference/sampling_ref.h on every backend.
  bool sample = false;
  kernels::SamplingRowParams sampling;
};

inline SeqChunk MakeChunk(SeqId seq, std::vector<int32_t> tokens,
                          SeqChunk::Logits logits = SeqChunk::Logits::kLast) {
  SeqChunk c;
  c.seq = seq;
  c.tokens = std::move(tokens);
  c.logits = logits;
  return c;
}

struct ForwardResult {
  int32_t vocab = 0;
  // Rows in chunk order; for each chunk, kLast gives one row and kAll one per token.
  std::vector<float> logits;       // [rows, vocab]
  std::vector<int32_t> row_chunk;  // chunk index of each row
  // Per chunk: the sampled token and its log-probability (-1 and 0 where `sample` was false).
  std::vector<int32_t> sampled;
  std::vector<float> sampled_logprob;
};

struct BackendOptions {
  int32_t threads = 0;            // 0 = all cores
  KvPolicyConfig kv_policy;
  int64_t kv_budget_bytes = 256ll << 20;
  int32_t kv_block_tokens = 16;
  // CPU: evicted slots of shared blocks are left dead instead of copied (KvCache::dead_slots).
  // false gives the CUDA backend's copy-on-write layout, for tests that compare the two.
  bool kv_dead_slots = true;
  // CUDA device; -1 = the launcher's local rank modulo the visible devices (0 outside mpirun or
  // srun), so the ranks of a node spread over its GPUs.
  int32_t device = -1;
  // Tensor parallelism (null = single rank).
  Communicator* comm = nullptr;
};

// Decision bits d[t] [n, n_kv] of layer `layer` for uncomputed tokens at positions pos0 ..
// pos0+n-1: 1 with probability `rate`, from a hash of (layer, global KV head, position), so
// every rank and backend draws the same bits.
void UncomputedDmsBits(int32_t layer, int32_t n_kv, int32_t kv_head_offset, int64_t pos0,
                       int32_t n, double rate, uint8_t* out);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Runs one step. Calls KvCache::Reserve for every chunk first, so RESOURCE_EXHAUSTED leaves
  // every sequence as it was.
  virtual absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) = 0;
  virtual KvCache& kv() = 0;
  // Appends `n` tokens to `seq`'s cache without running the model (their keys and values are
  // whatever the storage holds), applying the eviction policy as usual: long contexts for
  // benchmarks in seconds. Policies whose cache depends on attention (tova, h2o) cannot. Under
  // policy dms the decisions are not computed either: each token's bits are drawn with
  // probability `dms_flag_rate` (UncomputedDmsBits), so that the cache is the one a model with
  // that eviction rate would hold; steps after it use the model's own decisions.
  virtual absl::Status AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate);
  // Device memory this process holds (0 for host backends).
  virtual int64_t DeviceBytesInUse() const { return 0; }
  // Whether SeqChunk::sample runs where the logits are, on a device: then the engine asks for
  // the sampled token instead of the logits row (a row of a 150K vocabulary is 600 KB to copy and
  // a millisecond of host time to sample, per thread per step). Host backends sample the host
  // rows (SampleOnHost) and say false: the engine samples those itself.
  virtual bool samples_on_device() const { return false; }

  // Decode spans (optional; the capacity planner's simulated backend, launch/plan/sim.cc). A span
  // is `steps` consecutive decode steps of the same one-token chunks, one per sequence of `seqs`
  // in that order, run as one call. DecodeSpanLimit says how many such steps (at most
  // `max_steps`) the backend can run as one and the logits row [vocab] it gives every chunk of
  // every one of them: 0 when it cannot (the default). It may hold KV reservations for them, so
  // it must be followed by ForwardDecodeSpan(seqs, steps) with steps <= that limit (0 gives
  // them back). ForwardDecodeSpan leaves the sequences and the KV pool as `steps` calls of
  // Forward with those chunks would (KvIndex::CommitDecodeRun), each returning `row` for every
  // chunk.
  virtual int64_t DecodeSpanLimit(const std::vector<SeqId>& /*seqs*/, int64_t /*max_steps*/,
                                  std::vector<float>* /*row*/) {
    return 0;
  }
  virtual absl::Status ForwardDecodeSpan(const std::vector<SeqId>& /*seqs*/, int64_t steps) {
    if (steps == 0) return absl::OkStatus();
    return absl::UnimplementedError("this backend does not run decode spans");
  }
};

// The model's RoPE scaling as the kernels take it (kernels/reference/rope_freq.h).
inline kernels::RopeScalingParams RopeParams(const RopeScaling& r) {
  kernels::RopeScalingParams p;
  p.type = r.type == RopeScaling::Type::kLinear   ? kernels::RopeScalingParams::kLinear
           : r.type == RopeScaling::Type::kLlama3 ? kernels::RopeScalingParams::kLlama3
                                                  : kernels::RopeScalingParams::kNone;
  p.factor = r.factor;
  p.low_freq_factor = r.low_freq_factor;
  p.high_freq_factor = r.high_freq_factor;
  p.original_max_positions = r.original_max_positions;
  return p;
}

// Checks a step before it touches anything: chunks not empty, a sequence at most once, token
// ids inside the vocabulary. Returns the number of tokens.
absl::StatusOr<int64_t> ValidateStep(const std::vector<SeqChunk>& batch, int32_t vocab);

// Checks a KV policy against the model, the same on every backend: policy dms needs the model's
// own decisions (INVALID_ARGUMENT otherwise).
absl::Status CheckKvPolicy(const ModelConfig& config, const KvPolicyConfig& policy);

// Fills ForwardResult::sampled/sampled_logprob from host logits rows (the host backends' side of
// SeqChunk::sample): for each sampled chunk, its last row must be among `result.logits`.
void SampleOnHost(const std::vector<SeqChunk>& batch, ForwardResult& result);

absl::StatusOr<std::unique_ptr<Backend>> MakeCpuBackend(const Model& model,
                                                        const BackendOptions& options);

// The CUDA backend (runtime/backend/cuda/): weights in bf16 on the device (GGUF blocks dequantized at
// load; synthetic models generated there), the KV pools on the device behind a KvIndex, sampling
// on the device. FAILED_PRECONDITION when this build has no CUDA or there is no device.
// BackendOptions::kv_budget_bytes <= 0 takes the device memory left after weights and
// workspace, less a margin.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const Model& model,
                                                         const BackendOptions& options);

// "cpu" or "cuda".
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name, const Model& model,
                                                     const BackendOptions& options);

}  // namespace dmsrt
