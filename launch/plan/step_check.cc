// `dmsrt plan --check-steps` (see step_check.h).
#include "launch/plan/step_check.h"

#include <array>
#include <fstream>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace dmsrt {
namespace {

constexpr std::array<const char*, 7> kKinds = {"decode 1-4",  "decode 5-8",   "decode 9-16",
                                               "decode 17-32", "decode >32", "prefill only",
                                               "mixed"};

}  // namespace

std::string StepKind(int64_t decode_rows, int64_t prefill_tokens) {
  if (prefill_tokens > 0) return decode_rows == 0 ? "prefill only" : "mixed";
  if (decode_rows <= 4) return "decode 1-4";
  if (decode_rows <= 8) return "decode 5-8";
  if (decode_rows <= 16) return "decode 9-16";
  if (decode_rows <= 32) return "decode 17-32";
  return "decode >32";
}

absl::StatusOr<StepCheck> CheckSteps(const StepCosts& costs, const std::vector<std::string>& logs) {
  std::map<std::string, StepGroup> by_kind;
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
      double seconds = 0;
      bool ok = v.size() == 6;
      for (size_t i = 0; ok && i < n.size(); ++i) ok = absl::SimpleAtoi(v[i], &n[i]) && n[i] >= 0;
      ok = ok && absl::SimpleAtod(v[5], &seconds) && seconds >= 0;
      if (!ok) {
        if (f.peek() == EOF) break;  // the last line, still being written
        return absl::InvalidArgumentError(absl::StrCat(
            path, ":", no, ": expected decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,"
            "seconds as `dmsrt serve --step-log` writes them, got '", line, "'"));
      }
      StepGroup& g = by_kind[StepKind(n[0], n[1])];
      ++g.steps;
      g.measured_s += seconds;
      g.predicted_s += costs.Seconds(n[0], n[2], n[1], n[3]);
    }
  }
  StepCheck c;
  c.all.kind = "all";
  for (const char* k : kKinds) {
    auto it = by_kind.find(k);
    if (it == by_kind.end()) continue;
    it->second.kind = k;
    c.all.steps += it->second.steps;
    c.all.measured_s += it->second.measured_s;
    c.all.predicted_s += it->second.predicted_s;
    c.groups.push_back(it->second);
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
