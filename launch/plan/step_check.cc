// `dmsrt plan --check-steps` (see step_check.h).
#include "launch/plan/step_check.h"

#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace dmsrt {
namespace {

// The kinds of step, in the table's order; KindIndex picks one.
constexpr std::array<const char*, 7> kKinds = {"decode 1-4",  "decode 5-8",   "decode 9-16",
                                               "decode 17-32", "decode >32", "prefill only",
                                               "mixed"};

size_t KindIndex(int64_t decode_rows, int64_t prefill_tokens) {
  if (prefill_tokens > 0) return decode_rows == 0 ? 5 : 6;
  const int64_t top[] = {4, 8, 16, 32};
  size_t i = 0;
  while (i < 4 && decode_rows > top[i]) ++i;
  return i;
}

}  // namespace

void WriteStepLogLine(std::FILE* f, const StepShape& s, double seconds, double end_s) {
  std::fprintf(f, "%lld,%lld,%lld,%lld,%lld,%.6f,%.6f\n", static_cast<long long>(s.decode_rows),
               static_cast<long long>(s.prefill_tokens), static_cast<long long>(s.kv_tokens),
               static_cast<long long>(s.sampled_rows), static_cast<long long>(s.retries), seconds,
               end_s);
}

absl::StatusOr<StepLogFile> OpenStepLog(const std::string& path, const char* mode) {
  StepLogFile f(std::fopen(path.c_str(), mode), &std::fclose);
  if (f == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--step-log ", path, ": ", std::strerror(errno)));
  }
  std::fputs(kStepLogHeader, f.get());
  return f;
}

absl::StatusOr<StepCheck> CheckSteps(const StepCosts& costs, const std::vector<std::string>& logs) {
  std::array<StepGroup, kKinds.size()> by_kind;
  for (const std::string& path : logs) {
    std::ifstream f(path);
    if (!f) return absl::NotFoundError(absl::StrCat("cannot read step log ", path));
    std::string line;
    int64_t no = 0;
    while (std::getline(f, line)) {
      ++no;
      if (line.empty() || line.rfind("decode_rows", 0) == 0) continue;  // a header
      std::vector<std::string> v = absl::StrSplit(line, ',');
      std::array<int64_t, 5> n{};
      double seconds = 0, end_s = 0;
      bool ok = v.size() == 6 || v.size() == 7;  // logs before end_s have 6 columns
      for (size_t i = 0; ok && i < n.size(); ++i) ok = absl::SimpleAtoi(v[i], &n[i]) && n[i] >= 0;
      ok = ok && absl::SimpleAtod(v[5], &seconds) && seconds >= 0;
      ok = ok && (v.size() == 6 || (absl::SimpleAtod(v[6], &end_s) && end_s >= 0));
      if (!ok) {
        if (f.peek() == EOF) break;  // the last line, still being written
        return absl::InvalidArgumentError(absl::StrCat(
            path, ":", no, ": expected decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,"
            "seconds[,end_s] as `dmsrt serve --step-log` writes them, got '", line, "'"));
      }
      StepGroup& g = by_kind[KindIndex(n[0], n[1])];
      ++g.steps;
      g.measured_s += seconds;
      g.predicted_s += costs.Seconds(n[0], n[2], n[1], n[3]);
    }
  }
  StepCheck c;
  c.all.kind = "all";
  for (size_t k = 0; k < kKinds.size(); ++k) {
    StepGroup& g = by_kind[k];
    if (g.steps == 0) continue;
    g.kind = kKinds[k];
    c.all.steps += g.steps;
    c.all.measured_s += g.measured_s;
    c.all.predicted_s += g.predicted_s;
    c.groups.push_back(g);
  }
  if (c.all.steps == 0) {
    return absl::InvalidArgumentError("no steps in the step logs (serve --step-log FILE writes them)");
  }
  return c;
}

std::string StepCheckTable(const StepCheck& c) {
  std::string s = absl::StrFormat("%-14s %6s %11s %12s %19s\n", "steps", "count", "measured s",
                                  "predicted s", "measured/predicted");
  std::vector<StepGroup> rows = c.groups;
  rows.push_back(c.all);
  for (const StepGroup& g : rows) {
    absl::StrAppendFormat(&s, "%-14s %6d %11.2f %12.2f %19.3f\n", g.kind, g.steps, g.measured_s,
                          g.predicted_s, g.predicted_s > 0 ? g.measured_s / g.predicted_s : 0.0);
  }
  return s;
}

nlohmann::json StepCheckJson(const StepCheck& c) {
  auto group = [](const StepGroup& g) {
    return nlohmann::json{{"steps", g.steps}, {"measured_s", g.measured_s},
                          {"predicted_s", g.predicted_s}};
  };
  nlohmann::json groups = nlohmann::json::object();
  for (const StepGroup& g : c.groups) groups[g.kind] = group(g);
  return {{"groups", groups}, {"all", group(c.all)}};
}

}  // namespace dmsrt
