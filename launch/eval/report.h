// `dmsrt eval`'s reports (launch/eval/eval.h runs the evaluation): JSON in and out, merging, a
// table and a plot.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "launch/eval/eval.h"

namespace dmsrt {

nlohmann::json ReportJson(const EvalReport& r);
// The kind a row is plotted and grouped under: the policy kind's name ("window", "none"), or an
// external row's "IMPL:NAME".
std::string RowKind(const TextRow& t);

// Reads reports written by ReportJson (several runs on the same text, e.g. one per target CR, or
// rows of another implementation in the same format, whose kind is "IMPL:NAME" with "IMPL:none"
// its own dense reference) into one: rows in file order, each
// (policy, protocol) row and each policy's passkey rows kept once. Text rows are taken only from
// reports on the first report's text, length and context (a passkey-only run contributes its
// passkey rows). INVALID_ARGUMENT for malformed input.
absl::StatusOr<EvalReport> MergeReports(const std::vector<nlohmann::json>& reports);
std::string ReportTable(const EvalReport& r);
// Quality against cache CR (protocol a: perplexity, KL, top-1 agreement at L; the same for
// protocol b at C; passkey accuracy at the longest probe length), one line per policy kind, each
// starting at its implementation's dense point (1x).
std::string ReportSvg(const EvalReport& r);

}  // namespace dmsrt
