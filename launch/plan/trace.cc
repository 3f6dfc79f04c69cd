// Job and speed traces (see trace.h).
#include "launch/plan/trace.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {

namespace {

// Calls `fn(line_no, fields)` for every line of `text` with fields (blank-separated, after a '#'
// comment is cut off), stopping at the first error `fn` returns.
absl::Status ForEachFields(
    const std::string& text,
    const std::function<absl::Status(int64_t, const std::vector<absl::string_view>&)>& fn) {
  int64_t line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    const size_t hash = line.find('#');
    if (hash != absl::string_view::npos) line = line.substr(0, hash);
    std::vector<absl::string_view> f = absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (f.empty()) continue;
    absl::Status s = fn(line_no, f);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<JobTrace> ParseJobTrace(const std::string& text, const std::string& name) {
  JobTrace t;
  absl::Status parsed = ForEachFields(text, [&](int64_t line_no, const std::vector<absl::string_view>& f) {
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat("trace ", name, " line ", line_no, ": ", what,
                                                     " (expected ARRIVAL_SECONDS [PROMPT_TOKENS GENERATED_TOKENS])"));
    };
    if (f.size() != 1 && f.size() != 3) return bad(absl::StrCat(f.size(), " fields"));
    double at = 0.0;
    if (!absl::SimpleAtod(f[0], &at) || !std::isfinite(at) || at < 0) {
      return bad(absl::StrCat("arrival '", f[0], "' is not a time >= 0"));
    }
    if (!t.arrivals.empty() && at < t.arrivals.back()) return bad("arrival times must not decrease");
    const bool lengths = f.size() == 3;
    if (!t.arrivals.empty() && lengths != !t.prompt_tokens.empty()) {
      return bad("either every job has its two lengths or none has");
    }
    t.arrivals.push_back(at);
    if (!lengths) return absl::OkStatus();
    int64_t prompt = 0, generated = 0;
    if (!absl::SimpleAtoi(f[1], &prompt) || prompt < 1 || !absl::SimpleAtoi(f[2], &generated) ||
        generated < 1) {
      return bad("lengths must be whole numbers >= 1");
    }
    t.prompt_tokens.push_back(prompt);
    t.generated_tokens.push_back(generated);
    return absl::OkStatus();
  });
  if (!parsed.ok()) return parsed;
  if (t.arrivals.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("trace ", name, " has no job"));
  }
  return t;
}

absl::StatusOr<JobTrace> ReadJobTrace(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("trace: ", text.status().message()));
  return ParseJobTrace(*text, path);
}

double SpeedTrace::At(double seconds) const {
  if (from.empty()) return 1.0;
  const auto it = std::upper_bound(from.begin(), from.end(), seconds);
  return factor[it == from.begin() ? 0 : static_cast<size_t>(it - from.begin()) - 1];
}

double SpeedTrace::MaxFrom(double seconds) const {
  if (from.empty()) return 1.0;
  const auto it = std::upper_bound(from.begin(), from.end(), seconds);
  const size_t i = it == from.begin() ? 0 : static_cast<size_t>(it - from.begin()) - 1;
  return *std::max_element(factor.begin() + static_cast<std::ptrdiff_t>(i), factor.end());
}

absl::StatusOr<SpeedTrace> ParseSpeedTrace(const std::string& text, const std::string& name) {
  SpeedTrace t;
  absl::Status parsed = ForEachFields(text, [&](int64_t line_no, const std::vector<absl::string_view>& f) {
    double from = 0.0, factor = 0.0;
    if (f.size() != 2 || !absl::SimpleAtod(f[0], &from) || !std::isfinite(from) ||
        !absl::SimpleAtod(f[1], &factor) || !(factor > 0) || !std::isfinite(factor) ||
        (!t.from.empty() && from <= t.from.back())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "speed trace ", name, " line ", line_no,
          ": expected FROM_SECONDS FACTOR, times increasing, factor > 0"));
    }
    t.from.push_back(from);
    t.factor.push_back(factor);
    return absl::OkStatus();
  });
  if (!parsed.ok()) return parsed;
  if (t.from.empty()) return absl::InvalidArgumentError(absl::StrCat("speed trace ", name, " is empty"));
  return t;
}

absl::StatusOr<SpeedTrace> ReadSpeedTrace(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return absl::NotFoundError(absl::StrCat("speed trace: ", text.status().message()));
  return ParseSpeedTrace(*text, path);
}

}  // namespace dmsrt
