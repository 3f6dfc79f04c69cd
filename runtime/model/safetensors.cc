// safetensors reader (see safetensors.h).
#include "runtime/model/safetensors.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "parallel/status_macros.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {

namespace {

using Json = nlohmann::json;
constexpr int kMaxJsonDepth = 64;

// Rejects JSON nested deeper than kMaxJsonDepth before it reaches the parser (bounded stack and
// memory whatever the input).
bool DepthWithinLimit(const char* p, size_t n) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    char ch = p[i];
    if (in_string) {
      if (ch == '\\')
        ++i;
      else if (ch == '"')
        in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > kMaxJsonDepth) return false;
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  return true;
}

absl::Status Bad(const std::string& path, const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": safetensors ", msg));
}

bool ParseDType(const std::string& s, DType* t) {
  if (s == "F32") {
    *t = DType::kF32;
    return true;
  }
  if (s == "F16") {
    *t = DType::kF16;
    return true;
  }
  if (s == "BF16") {
    *t = DType::kBF16;
    return true;
  }
  return false;
}

bool FileExists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto f = MappedFile::Open(path);
  if (!f.ok()) return f.status();
  return Parse(std::move(*f));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    const uint8_t* data, size_t size, const std::string& name) {
  return Parse(MappedFile::FromBytes(data, size, name));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(
    std::unique_ptr<MappedFile> file) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->file_ = std::move(file);
  absl::Status s = f->ParseAll();
  if (!s.ok()) return s;
  return f;
}

namespace {

// The __metadata__ entry: string values only.
absl::Status ReadMetadata(const std::string& path, const Json& e,
                          std::map<std::string, std::string>& metadata) {
  if (!e.is_object()) return Bad(path, "__metadata__ is not an object");
  for (auto m = e.begin(); m != e.end(); ++m) {
    if (!m.value().is_string()) {
      return Bad(path, absl::StrCat("__metadata__ value of '", m.key(), "' is not a string"));
    }
    metadata[m.key()] = m.value().get<std::string>();
  }
  return absl::OkStatus();
}

// One tensor's header entry: dtype, shape and data offsets, which must lie inside the data
// section of `data_bytes` and cover exactly what the shape and dtype need.
absl::StatusOr<SafetensorsTensorInfo> ReadTensorEntry(const std::string& path,
                                                      const std::string& name, const Json& e,
                                                      uint64_t data_bytes) {
  const std::string what = absl::StrCat("tensor '", name, "'");
  if (!e.is_object()) return Bad(path, absl::StrCat(what, ": entry is not an object"));
  auto dt = e.find("dtype");
  auto sh = e.find("shape");
  auto off = e.find("data_offsets");
  if (dt == e.end() || !dt->is_string()) {
    return Bad(path, absl::StrCat(what, ": missing or non-string 'dtype'"));
  }
  if (sh == e.end() || !sh->is_array()) {
    return Bad(path, absl::StrCat(what, ": missing or non-array 'shape'"));
  }
  if (off == e.end() || !off->is_array() || off->size() != 2) {
    return Bad(path, absl::StrCat(what, ": 'data_offsets' must be [begin, end]"));
  }
  SafetensorsTensorInfo t;
  t.name = name;
  const std::string dtype = dt->get<std::string>();
  if (!ParseDType(dtype, &t.type)) {
    return absl::UnimplementedError(absl::StrCat(path, ": ", what, " has dtype ", dtype,
                                                 ", which is not supported (F32, F16, BF16)"));
  }
  if (sh->size() > 8) return Bad(path, absl::StrCat(what, ": more than 8 dimensions"));
  uint64_t numel = 1;
  for (const Json& d : *sh) {
    if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
      return Bad(path, absl::StrCat(what, ": shape entries must be non-negative integers"));
    }
    uint64_t v = d.get<uint64_t>();
    if (v > (uint64_t{1} << 48) || (v != 0 && numel > (uint64_t{1} << 48) / v)) {
      return Bad(path, absl::StrCat(what, ": shape is too large (element count overflows)"));
    }
    numel *= v;
    t.shape.push_back(static_cast<int64_t>(v));
  }
  for (const Json& o : *off) {
    if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0)) {
      return Bad(path, absl::StrCat(what, ": data_offsets must be non-negative integers"));
    }
  }
  t.begin = (*off)[0].get<uint64_t>();
  t.end = (*off)[1].get<uint64_t>();
  if (t.begin > t.end || t.end > data_bytes) {
    return Bad(path, absl::StrCat(what, ": data_offsets [", t.begin, ", ", t.end,
                                  ") outside the data section of ", data_bytes, " bytes"));
  }
  const uint64_t want = numel * static_cast<uint64_t>(BlockBytes(t.type));
  if (t.end - t.begin != want) {
    return Bad(path, absl::StrCat(what, ": data_offsets cover ", t.end - t.begin,
                                  " bytes but shape and dtype ", dtype, " need ", want));
  }
  return t;
}

// No two tensors' data overlap (empty tensors aside).
absl::Status CheckNoOverlap(const std::string& path,
                            const std::vector<SafetensorsTensorInfo>& tensors) {
  std::vector<const SafetensorsTensorInfo*> by_begin;
  for (const auto& t : tensors) {
    if (t.end > t.begin) by_begin.push_back(&t);
  }
  std::sort(by_begin.begin(), by_begin.end(),
            [](const SafetensorsTensorInfo* a, const SafetensorsTensorInfo* b) {
              return a->begin < b->begin;
            });
  for (size_t i = 1; i < by_begin.size(); ++i) {
    if (by_begin[i - 1]->end > by_begin[i]->begin) {
      return Bad(path, absl::StrCat("tensor '", by_begin[i]->name, "' overlaps tensor '",
                                    by_begin[i - 1]->name, "'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SafetensorsFile::ParseAll() {
  const std::string& path = file_->path();
  const uint8_t* data = file_->data();
  const size_t size = file_->size();
  if (size < 8) return Bad(path, absl::StrCat("file too short (", size, " bytes) for a header"));
  uint64_t n;
  std::memcpy(&n, data, 8);
  if (n > size - 8) {
    return Bad(path, absl::StrCat("header length ", n, " exceeds the file (", size, " bytes)"));
  }
  if (n > kMaxHeaderBytes) {
    return Bad(path, absl::StrCat("header length ", n, " exceeds the limit of ", kMaxHeaderBytes,
                                  " bytes"));
  }
  if (n < 2) return Bad(path, "header is empty");
  data_offset_ = 8 + n;
  const uint64_t data_bytes = size - data_offset_;
  const char* hdr = reinterpret_cast<const char*>(data + 8);
  if (!DepthWithinLimit(hdr, static_cast<size_t>(n))) {
    return Bad(path, absl::StrCat("header JSON nests deeper than ", kMaxJsonDepth, " levels"));
  }
  Json j = Json::parse(hdr, hdr + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(path, "header is not valid JSON");
  if (!j.is_object()) return Bad(path, "header is not a JSON object");

  tensors_.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const Json& e = it.value();
    if (name == "__metadata__") {
      DMSRT_RETURN_IF_ERROR(ReadMetadata(path, e, metadata_));
      continue;
    }
    DMSRT_ASSIGN_OR_RETURN(SafetensorsTensorInfo t, ReadTensorEntry(path, name, e, data_bytes));
    index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
  return CheckNoOverlap(path, tensors_);
}

const SafetensorsTensorInfo* SafetensorsFile::FindTensor(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

WeightTensor SafetensorsFile::View(const SafetensorsTensorInfo& info) const {
  WeightTensor w;
  w.name = info.name;
  w.type = info.type;
  w.shape = info.shape;
  w.cols = info.shape.empty() ? 1 : info.shape.back();
  w.rows = 1;
  for (size_t d = 0; d + 1 < info.shape.size(); ++d) w.rows *= info.shape[d];
  w.data = file_->data() + data_offset_ + info.begin;
  w.nbytes = static_cast<size_t>(info.end - info.begin);
  return w;
}

absl::StatusOr<WeightTensor> SafetensorsFile::Tensor(const std::string& name) const {
  const SafetensorsTensorInfo* t = FindTensor(name);
  if (!t) return absl::NotFoundError(absl::StrCat(path(), ": tensor '", name, "' is missing"));
  return View(*t);
}

// ---- SafetensorsSet ----

absl::Status SafetensorsSet::Add(std::unique_ptr<SafetensorsFile> file) {
  const size_t idx = files_.size();
  for (const auto& t : file->tensors()) {
    if (where_.count(t.name)) {
      return absl::InvalidArgumentError(absl::StrCat(file->path(), ": tensor '", t.name,
                                                     "' also appears in ",
                                                     files_[where_[t.name]]->path()));
    }
  }
  for (const auto& t : file->tensors()) where_[t.name] = idx;
  files_.push_back(std::move(file));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SafetensorsSet>> SafetensorsSet::Open(const std::string& dir) {
  auto set = std::make_unique<SafetensorsSet>();
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> shard_files;
  if (FileExists(index_path)) {
    auto text = ReadWholeFile(index_path);
    if (!text.ok()) return text.status();
    Json j = Json::parse(*text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": not a JSON object"));
    }
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing 'weight_map' object"));
    }
    std::map<std::string, std::string> expected;  // tensor -> shard file
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry '", it.key(), "' is not a string"));
      }
      std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "..") {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map names an invalid file '", shard, "'"));
      }
      expected[it.key()] = shard;
      if (std::find(shard_files.begin(), shard_files.end(), shard) == shard_files.end()) {
        shard_files.push_back(shard);
      }
    }
    for (const std::string& s : shard_files) {
      auto f = SafetensorsFile::Open(dir + "/" + s);
      if (!f.ok()) return f.status();
      absl::Status st = set->Add(std::move(*f));
      if (!st.ok()) return st;
    }
    for (const auto& [name, shard] : expected) {
      auto it = set->where_.find(name);
      if (it == set->where_.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": tensor '", name, "' is listed in weight_map but missing from ", shard));
      }
    }
    return set;
  }
  if (FileExists(dir + "/model.safetensors")) {
    shard_files.push_back("model.safetensors");
  } else {
    DIR* d = ::opendir(dir.c_str());
    if (!d) return absl::NotFoundError(absl::StrCat(dir, ": cannot open directory"));
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) {
        shard_files.push_back(n);
      }
    }
    ::closedir(d);
    std::sort(shard_files.begin(), shard_files.end());
  }
  if (shard_files.empty()) {
    return absl::NotFoundError(absl::StrCat(dir, ": no *.safetensors files"));
  }
  for (const std::string& s : shard_files) {
    auto f = SafetensorsFile::Open(dir + "/" + s);
    if (!f.ok()) return f.status();
    absl::Status st = set->Add(std::move(*f));
    if (!st.ok()) return st;
  }
  return set;
}

absl::StatusOr<WeightTensor> SafetensorsSet::Tensor(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", name, "' is missing from the checkpoint"));
  }
  return files_[it->second]->Tensor(name);
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& kv : where_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace dmsrt
