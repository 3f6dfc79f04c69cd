// LoadModel / ArchName: turns a GGUF file or a Hugging Face directory into the one normalised
// Model the backends use (see runtime/model/model.h for the conventions).
//
// Both sources go through the same steps: read the hyper-parameters into ModelConfig, look up
// every tensor by its source-specific name (runtime/model/tensor_names.h), check its shape against
// the config, and collect the tokenizer description. Weights stay in the memory-mapped file(s),
// which the Model owns; the only copies are the Q/K projections of GGUF `llama` files, whose rows
// are re-ordered. The parts: gguf_loader.cc, hf_loader.cc, model_checks.cc (shared checks and
// normalisation), dms_adapter.cc (AttachDmsAdapter); runtime/model/loader_internal.h lists them.
#include <sys/stat.h>

#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "runtime/model/loader_internal.h"
#include "runtime/model/model.h"

namespace dmsrt {

const char* ArchName(Arch a) {
  switch (a) {
    case Arch::kLlama:
      return "llama";
    case Arch::kQwen2:
      return "qwen2";
    case Arch::kQwen3:
      return "qwen3";
  }
  return "unknown";
}

namespace {

bool IsDir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool IsFile(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool HasGgufMagic(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  char m[4] = {0, 0, 0, 0};
  in.read(m, 4);
  return in.gcount() == 4 && std::memcmp(m, "GGUF", 4) == 0;
}
bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& path) {
  if (IsDir(path)) return loader::LoadHf(path);
  if (!IsFile(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  if (EndsWith(path, ".gguf") || HasGgufMagic(path)) return loader::LoadGguf(path);
  if (EndsWith(path, "config.json")) {
    std::string dir = path.substr(0, path.size() - 11);
    if (dir.empty()) dir = ".";
    return loader::LoadHf(dir);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": not a GGUF file (no GGUF magic) and not a Hugging Face model directory"));
}

}  // namespace dmsrt
