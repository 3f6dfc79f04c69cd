#include "launch/provenance.h"

#include <cstdio>
#include <ctime>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "kernels/cpu/matmul.h"

namespace dmsrt {
namespace {

// The source tree of this binary: where __FILE__ (launch/provenance.cc) says when the compiler
// was given an absolute path, else the directory two levels above the executable (a build
// folder inside the tree, build/bin/dmsrt). Empty when neither is known.
std::string SourceRoot() {
  auto up = [](std::string f, int levels) {
    for (int i = 0; i < levels; ++i) {
      const size_t slash = f.find_last_of('/');
      if (slash == std::string::npos) return std::string();
      f.resize(slash);
    }
    return f;
  };
  const std::string file = __FILE__;
  if (!file.empty() && file[0] == '/') return up(file, 2);
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return "";
  exe[n] = '\0';
  return up(exe, 3);
}

std::string RunLine(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return "";
  std::string out;
  char buf[256];
  while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
  if (pclose(p) != 0) return "";
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string GitCommit() {
  const std::string root = SourceRoot();
  if (root.empty()) return "unknown";
  const std::string q = absl::StrCat("git -C '", root, "' ");
  const std::string head = RunLine(q + "rev-parse --short=12 HEAD 2>/dev/null");
  if (head.empty()) return "unknown";
  const std::string dirty =
      RunLine(q + "status --porcelain --untracked-files=no 2>/dev/null | head -1");
  return dirty.empty() ? head : head + "-dirty";
}

}  // namespace

nlohmann::json BenchProvenance(int threads) {
  std::string model = "unknown";
  std::vector<std::string> flags;
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  bool have_flags = false;
  while (std::getline(in, line)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
    const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
    if (key == "model name" && model == "unknown") model = value;
    if (key == "flags" && !have_flags) {
      have_flags = true;
      static const std::set<std::string> kWanted = {
          "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
          "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
          "amx_bf16"};
      std::istringstream words(value);
      std::string w;
      while (words >> w) {
        if (kWanted.count(w) != 0) flags.push_back(w);
      }
    }
  }
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return {{"commit", GitCommit()},
          {"cpu_model", model},
          {"cpu_flags", flags},
          {"matmul_path", kernels::MatmulPath()},
          {"threads", threads},
          {"date", date}};
}

std::string ProvenanceLine(const nlohmann::json& p) {
  std::vector<std::string> flags = p.value("cpu_flags", std::vector<std::string>{});
  return absl::StrCat("commit ", p.value("commit", "?"), ", ", p.value("cpu_model", "?"), " (",
                      absl::StrJoin(flags, " "), "; matmul ", p.value("matmul_path", "?"), "), ",
                      p.value("threads", 0), " threads, ", p.value("date", "?"));
}

}  // namespace dmsrt
