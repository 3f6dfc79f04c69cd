// Answer extraction from a reasoning thread's final text, and selection among N threads.
//
// Extraction (default): the content of the last `\boxed{...}` (braces balanced, so
// `\boxed{\frac{1}{2}}` gives `\frac{1}{2}`), else the last number in the text. Numbers are
// normalised so that "1,000", "1000" and "1000.0" vote together. A caller-supplied regular
// expression (ECMAScript syntax, std::regex; RE2 is not available) replaces the default: the last
// match wins, its first capture group when it has one. Selection: majority vote (ties go to the
// answer whose first vote came earliest), highest mean log-probability, or first to finish.
// Early stop: once the leader's count exceeds the runner-up's plus every thread still running,
// nothing can change the majority.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmsrt {

// Compiles an extraction pattern; INVALID_ARGUMENT with the regex error when it is malformed.
absl::StatusOr<std::shared_ptr<const std::regex>> CompileAnswerRegex(const std::string& pattern);

// "1,000" -> "1000", "1000.50" -> "1000.5", "+3" -> "3", "-0.0" -> "0". Non-numbers unchanged
// (surrounding whitespace and a trailing period trimmed).
std::string NormalizeAnswer(const std::string& s);

// The answer of one thread's text, normalised; nullopt when nothing was found.
std::optional<std::string> ExtractAnswer(const std::string& text, const std::regex* pattern);

enum class Selection { kMajorityVote, kMaxMeanLogprob, kFirstFinished };

struct VoteEntry {
  std::string answer;
  int32_t votes = 0;
  int64_t first_finish_order = 0;  // finish order of its first voter (0-based)
  double best_mean_logprob = -1e300;
};

// Collects finished threads and answers the selection questions. Not thread-safe.
class VoteTable {
 public:
  // Records one finished thread (answer nullopt: it voted for nothing).
  void Add(const std::optional<std::string>& answer, double mean_logprob);
  // Entries, most votes first (ties: earliest first vote).
  std::vector<VoteEntry> Sorted() const;
  // The selected answer, or nullopt when no thread produced one.
  std::optional<std::string> Select(Selection how) const;
  // True when `still_running` more votes cannot change the majority winner.
  bool Decided(int64_t still_running) const;
  int64_t finished() const { return finished_; }
  int64_t abstained() const { return abstained_; }

 private:
  std::vector<VoteEntry> entries_;
  int64_t finished_ = 0;
  int64_t abstained_ = 0;
  std::optional<std::string> first_answer_;
};

}  // namespace dmsrt
