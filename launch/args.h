// A small command-line parser shared by the subcommands: `--name value`, `--name=value` and
// boolean `--flag`. Unknown options and missing values are errors that name the option, so a
// typo never silently falls back to a default.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmsrt {

class Args {
 public:
  // `value_options` take a value; `bool_options` do not. Both are given without the leading "--".
  static absl::StatusOr<Args> Parse(int argc, char** argv, const std::set<std::string>& value_options,
                                    const std::set<std::string>& bool_options);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& def = "") const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double def) const;
  bool Flag(const std::string& name) const { return values_.count(name) > 0; }
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

// The default model: $DMSRT_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf next to the
// source tree the binary was built from (found relative to the executable), else ./models/....
// NOT_FOUND with the setup command to run when none exists.
absl::StatusOr<std::string> DefaultModelPath();

}  // namespace dmsrt
