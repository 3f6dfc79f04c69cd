// The backend interface: one forward pass over a batch of sequence chunks.
//
// A step is a list of chunks: each is some new tokens of one sequence (a prefill chunk, or one
// decode token). The backend embeds them, runs every layer (attention through the KvCache, which
// applies the eviction policy), and returns logits for the rows asked for. The engine and the
// scheduler see only this interface, so CPU and CUDA backends are interchangeable.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"

namespace dmsrt {

class Communicator;  // parallel/comm.h

struct SeqChunk {
  SeqId seq = -1;
  std::vector<int32_t> tokens;  // positions KvCache::Length(seq) ..
  enum class Logits { kNone, kLast, kAll } logits = Logits::kLast;
};

struct ForwardResult {
  int32_t vocab = 0;
  // Rows in chunk order; for each chunk, kLast gives one row and kAll one per token.
  std::vector<float> logits;       // [rows, vocab]
  std::vector<int32_t> row_chunk;  // chunk index of each row
};

struct BackendOptions {
  int32_t threads = 0;            // 0 = all cores
  KvPolicyConfig kv_policy;
  int64_t kv_budget_bytes = 256ll << 20;
  int32_t kv_block_tokens = 16;
  // Tensor parallelism (null = single rank).
  Communicator* comm = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Runs one step. Calls KvCache::Reserve for every chunk first, so RESOURCE_EXHAUSTED leaves
  // every sequence as it was.
  virtual absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) = 0;
  virtual KvCache& kv() = 0;
};

absl::StatusOr<std::unique_ptr<Backend>> MakeCpuBackend(const Model& model,
                                                        const BackendOptions& options);

}  // namespace dmsrt
