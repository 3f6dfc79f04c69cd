// Backend pieces every implementation shares: step validation, host-side sampling, the default
// AppendUncomputed, and backend selection by name.
#include "runtime/backend/backend.h"

#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "kernels/reference/random_hash.h"

namespace dmsrt {

void UncomputedDmsBits(int32_t layer, int32_t n_kv, int32_t kv_head_offset, int64_t pos0,
                       int32_t n, double rate, uint8_t* out) {
  const uint64_t seed = 0x444d5362697473ull ^ (static_cast<uint64_t>(layer) << 40);
  for (int32_t i = 0; i < n; ++i) {
    for (int32_t j = 0; j < n_kv; ++j) {
      const uint64_t idx = static_cast<uint64_t>(pos0 + i) * 4096u + static_cast<uint64_t>(kv_head_offset + j);
      const double u = 0.5 * (static_cast<double>(kernels::HashUniformSigned(seed, idx)) + 1.0);
      out[static_cast<int64_t>(i) * n_kv + j] = u < rate ? 1 : 0;
    }
  }
}

absl::Status Backend::AppendUncomputed(SeqId /*seq*/, int32_t /*n*/, double /*dms_flag_rate*/) {
  return absl::UnimplementedError(
      absl::StrCat("backend ", name(), " cannot append tokens without running the model"));
}

absl::Status CheckKvPolicy(const ModelConfig& config, const KvPolicyConfig& policy) {
  if (policy.kind == KvPolicyKind::kDms && !config.dms.enabled) {
    return absl::InvalidArgumentError(
        "KV policy 'dms' needs a model with DMS decisions (dms_* config fields or an attached "
        "adapter); use policy 'forced' for synthetic eviction on other models");
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ValidateStep(const std::vector<SeqChunk>& batch, int32_t vocab) {
  absl::flat_hash_set<SeqId> seen;
  int64_t n = 0;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    const SeqChunk& ch = batch[ci];
    if (ch.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk ", ci, " (sequence ", ch.seq,
                                                     ") has no tokens"));
    }
    if (!seen.insert(ch.seq).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", ch.seq, " appears in more than one chunk of the same step"));
    }
    for (int32_t t : ch.tokens) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " in chunk ", ci,
                                                       " is outside the vocabulary [0, ", vocab,
                                                       ")"));
      }
    }
    n += static_cast<int64_t>(ch.tokens.size());
  }
  return n;
}

void SampleOnHost(const std::vector<SeqChunk>& batch, ForwardResult& result) {
  result.sampled.assign(batch.size(), -1);
  result.sampled_logprob.assign(batch.size(), 0.0f);
  // The last row of each chunk among the returned rows.
  std::vector<int64_t> last_row(batch.size(), -1);
  for (size_t r = 0; r < result.row_chunk.size(); ++r) last_row[result.row_chunk[r]] = r;
  for (size_t ci = 0; ci < batch.size(); ++ci) {
    if (!batch[ci].sample || last_row[ci] < 0) continue;
    const float* row = result.logits.data() + last_row[ci] * result.vocab;
    const int32_t tok = kernels::SampleRowRef(row, result.vocab, batch[ci].sampling);
    result.sampled[ci] = tok;
    result.sampled_logprob[ci] = kernels::LogProbRef(row, result.vocab, tok);
  }
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name, const Model& model,
                                                     const BackendOptions& options) {
  if (name == "cpu") return MakeCpuBackend(model, options);
  if (name == "cuda") return MakeCudaBackend(model, options);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", name, "'; valid backends: cpu, cuda"));
}

#if !defined(DMSRT_HAVE_CUDA)
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const Model& /*model*/,
                                                         const BackendOptions& /*options*/) {
  return absl::FailedPreconditionError(
      "this build of dmsrt has no CUDA backend (configure with a CUDA toolkit, "
      "-DDMSRT_WITH_CUDA=ON); use --backend cpu");
}
#endif

}  // namespace dmsrt
