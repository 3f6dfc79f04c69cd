// Policy threshold: score-threshold eviction with the DMS delay window (kvpress's DMSPress around
// KnormPress). Each KV head scores every token by its key after RoPE, score = -||k|| (higher =
// keep); a token whose score is below `threshold` is flagged, and a flagged token leaves after the
// window exactly as a DMS-flagged one (docs/dms-semantics.md §3, §4), so each head's budget
// follows the content.
//
// The store sets flag(t-1) = d[t]. With threshold_shift 0 (the default, as kvpress) token k is
// judged by its own key: d[t] = score(k[t-1]) < threshold, which reads the key of token t0-1 for
// the first token of a commit (KvStepInputs::k_prev). With threshold_shift 1 token k is judged by
// the key of token k+1 (d[t] = score(k[t]) < threshold), as a trained DMS head judges the
// previous token from the current one. d[0] is discarded either way.
#include "runtime/kv/policy_threshold.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "runtime/kv/policy.h"

namespace dmsrt {
namespace {

std::mutex g_observer_mu;
std::atomic<ThresholdScoreObserver*> g_observer{nullptr};

// DMSRT_THRESHOLD_DUMP=FILE: every decision as a line "layer head token score flag".
class FileObserver final : public ThresholdScoreObserver {
 public:
  explicit FileObserver(std::FILE* f) : f_(f) {}
  void Observe(int32_t layer, int32_t head, int64_t token, float score, bool flagged) override {
    std::fprintf(f_, "%d %d %lld %.9g %d\n", layer, head, static_cast<long long>(token), score,
                 flagged ? 1 : 0);
    std::fflush(f_);
  }

 private:
  std::FILE* f_;
};

ThresholdScoreObserver* EnvObserver() {
  static ThresholdScoreObserver* const obs = []() -> ThresholdScoreObserver* {
    const char* path = std::getenv("DMSRT_THRESHOLD_DUMP");
    if (path == nullptr || *path == 0) return nullptr;
    std::FILE* f = std::fopen(path, "w");
    if (f == nullptr) {
      std::fprintf(stderr, "dmsrt: cannot write DMSRT_THRESHOLD_DUMP=%s\n", path);
      return nullptr;
    }
    return new FileObserver(f);
  }();
  return obs;
}

class ThresholdPolicy final : public KvPolicy {
 public:
  using KvPolicy::KvPolicy;
  KvSlotReuse reuse() const override { return KvSlotReuse::kFlagged; }
  int32_t delay_window() const override { return config().window; }
  bool previous_key() const override { return config().threshold_shift == 0; }
  absl::Status IndexSupport() const override {
    return absl::InvalidArgumentError(
        "KV policy threshold scores the keys after RoPE, which an index-only store (the cuda "
        "backend) never sees; it runs on the CPU backend only");
  }
  // The bits depend on the keys: nothing is known in advance.
  int KnownFlag(int32_t /*layer*/, int32_t /*head*/, int64_t /*k*/) const override { return -1; }

  void Decisions(int32_t layer, int64_t t0, int32_t n, const KvStepInputs& in,
                 uint8_t* out) const override {
    const int32_t nkv = geometry().n_kv_heads;
    const int32_t hd = geometry().head_dim;
    const int32_t shift = config().threshold_shift;
    ThresholdScoreObserver* obs = g_observer.load(std::memory_order_acquire);
    if (obs == nullptr) obs = EnvObserver();
    std::unique_lock<std::mutex> lock(g_observer_mu, std::defer_lock);
    if (obs != nullptr) lock.lock();
    for (int32_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      for (int32_t j = 0; j < nkv; ++j) {
        uint8_t& d = out[static_cast<int64_t>(i) * nkv + j];
        d = 0;
        if (t == 0 || in.k == nullptr) continue;  // d[0] flags nothing
        // The key that judges token t-1.
        const float* key = nullptr;
        if (shift == 1) {
          key = in.k + (static_cast<int64_t>(i) * nkv + j) * hd;
        } else if (i >= 1) {
          key = in.k + (static_cast<int64_t>(i - 1) * nkv + j) * hd;
        } else if (in.k_prev != nullptr) {
          key = in.k_prev + static_cast<int64_t>(j) * hd;
        }
        if (key == nullptr) continue;
        const float score = KeyNormScore(key, hd);
        d = score < config().threshold ? 1 : 0;
        if (obs != nullptr) {
          obs->Observe(layer, geometry().kv_head_offset + j, t - 1, score, d != 0);
        }
      }
    }
  }
};

absl::Status Validate(const KvPolicyConfig& config) {
  if (config.window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DMS window must be >= 0 (got ", config.window, ")"));
  }
  if (std::isnan(config.threshold)) {
    return absl::InvalidArgumentError("threshold policy needs a threshold (got NaN)");
  }
  if (config.threshold_shift != 0 && config.threshold_shift != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("threshold shift must be 0 or 1 (got ", config.threshold_shift, ")"));
  }
  return absl::OkStatus();
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& config, const KvGeometry& geometry) {
  return std::make_unique<ThresholdPolicy>(config, geometry);
}

}  // namespace

float KeyNormScore(const float* k, int32_t head_dim) {
  double s = 0.0;
  for (int32_t c = 0; c < head_dim; ++c) s += static_cast<double>(k[c]) * k[c];
  return -static_cast<float>(std::sqrt(s));
}

void SetThresholdScoreObserver(ThresholdScoreObserver* observer) {
  std::lock_guard<std::mutex> lock(g_observer_mu);
  g_observer.store(observer, std::memory_order_release);
}

extern const KvPolicyEntry kThresholdKvPolicy = {KvPolicyKind::kThreshold, "threshold", &Validate,
                                                 &Make};

}  // namespace dmsrt
