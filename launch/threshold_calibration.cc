#include "launch/threshold_calibration.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/status_macros.h"
#include "runtime/kv/policy_threshold.h"

namespace dmsrt {
namespace {

class Collector final : public ThresholdScoreObserver {
 public:
  void Observe(int32_t, int32_t, int64_t, float score, bool) override { scores.push_back(score); }
  std::vector<float> scores;
};

// Removes the observer however the calibration ends.
struct ObserverGuard {
  explicit ObserverGuard(ThresholdScoreObserver* o) { SetThresholdScoreObserver(o); }
  ~ObserverGuard() { SetThresholdScoreObserver(nullptr); }
};

}  // namespace

const char* DefaultCalibrationText() {
  return "Four score and seven years ago our fathers brought forth on this continent, a new "
         "nation, conceived in Liberty, and dedicated to the proposition that all men are created "
         "equal.\n\nNow we are engaged in a great civil war, testing whether that nation, or any "
         "nation so conceived and so dedicated, can long endure. We are met on a great "
         "battle-field of that war. We have come to dedicate a portion of that field, as a final "
         "resting place for those who here gave their lives that that nation might live. It is "
         "altogether fitting and proper that we should do this.\n\nBut, in a larger sense, we can "
         "not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave "
         "men, living and dead, who struggled here, have consecrated it, far above our poor power "
         "to add or detract. The world will little note, nor long remember what we say here, but "
         "it can never forget what they did here. It is for us the living, rather, to be "
         "dedicated here to the unfinished work which they who fought here have thus far so nobly "
         "advanced. It is rather for us to be here dedicated to the great task remaining before "
         "us -- that from these honored dead we take increased devotion to that cause for which "
         "they gave the last full measure of devotion -- that we here highly resolve that these "
         "dead shall not have died in vain -- that this nation, under God, shall have a new birth "
         "of freedom -- and that government of the people, by the people, for the people, shall "
         "not perish from the earth.\n";
}

absl::StatusOr<CalibrationScores> CollectCalibrationScores(const Model& model,
                                                           const Tokenizer& tokenizer,
                                                           const BackendOptions& options,
                                                           const std::string& text) {
  const std::vector<int32_t> ids = tokenizer.Encode(text, /*parse_special=*/false, /*add_bos=*/true);
  if (ids.size() < 2) return absl::InvalidArgumentError("the calibration text has under 2 tokens");
  BackendOptions bo = options;
  bo.kv_policy.kind = KvPolicyKind::kThreshold;
  bo.kv_policy.threshold = -std::numeric_limits<double>::infinity();  // flags nothing
  bo.comm = nullptr;
  Collector collector;
  ObserverGuard guard(&collector);
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeBackend("cpu", model, bo));
  DMSRT_ASSIGN_OR_RETURN(SeqId seq, backend->kv().Create());
  constexpr size_t kChunk = 256;
  for (size_t at = 0; at < ids.size(); at += kChunk) {
    const size_t end = std::min(ids.size(), at + kChunk);
    DMSRT_ASSIGN_OR_RETURN(
        ForwardResult fr,
        backend->Forward({MakeChunk(seq, std::vector<int32_t>(ids.begin() + at, ids.begin() + end),
                                    SeqChunk::Logits::kLast)}));
    (void)fr;
  }
  DMSRT_RETURN_IF_ERROR(backend->kv().Free(seq));
  if (collector.scores.empty()) return absl::InternalError("threshold calibration observed no scores");
  CalibrationScores c;
  c.tokens = static_cast<int64_t>(ids.size());
  c.sorted = std::move(collector.scores);
  std::sort(c.sorted.begin(), c.sorted.end());
  return c;
}

namespace {

absl::Status CheckRate(double rate) {
  if (!(rate >= 0.0 && rate <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--threshold-rate must be in [0, 1] (got ", rate, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ThresholdCalibration> ThresholdAtRate(const CalibrationScores& scores, double rate) {
  DMSRT_RETURN_IF_ERROR(CheckRate(rate));
  const std::vector<float>& s = scores.sorted;
  if (s.empty()) return absl::InvalidArgumentError("no calibration scores");
  ThresholdCalibration c;
  c.tokens = scores.tokens;
  c.scores = static_cast<int64_t>(s.size());
  // The share `rate` of scores lies strictly below the threshold: the midpoint between the
  // k-th and (k+1)-th smallest, k = round(rate * count).
  const size_t k = static_cast<size_t>(std::llround(rate * static_cast<double>(s.size())));
  if (k == 0) {
    c.threshold = std::nextafter(static_cast<double>(s.front()), -INFINITY);
  } else if (k >= s.size()) {
    c.threshold = std::nextafter(static_cast<double>(s.back()), INFINITY);
  } else {
    c.threshold = 0.5 * (static_cast<double>(s[k - 1]) + static_cast<double>(s[k]));
  }
  return c;
}

absl::StatusOr<ThresholdCalibration> CalibrateThreshold(const Model& model,
                                                        const Tokenizer& tokenizer,
                                                        const BackendOptions& options,
                                                        double rate, const std::string& text) {
  DMSRT_RETURN_IF_ERROR(CheckRate(rate));  // before the model runs
  DMSRT_ASSIGN_OR_RETURN(CalibrationScores scores,
                         CollectCalibrationScores(model, tokenizer, options, text));
  return ThresholdAtRate(scores, rate);
}

}  // namespace dmsrt
