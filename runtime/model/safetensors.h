// safetensors reader: single files and sharded checkpoints (model.safetensors.index.json), as
// read-only memory mappings with tensor views, plus the header's `__metadata__` strings.
//
// File layout: u64 little-endian header length N | N bytes of JSON | data. The JSON maps each
// tensor name to {dtype, shape, data_offsets: [begin, end)} relative to the data section. The
// header is treated as hostile: its length is bounded (by the file and by kMaxHeaderBytes), its
// nesting depth is bounded before parsing, and every extent is checked against the data section,
// the dtype's element size and the other tensors. Only F32, F16 and BF16 are accepted (the dtypes
// of the model families we load); others are refused naming the dtype.
// Immutable after Open(); safe to share between threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/mapped_file.h"
#include "runtime/model/tensor.h"

namespace dmsrt {

struct SafetensorsTensorInfo {
  std::string name;
  DType type = DType::kF32;
  std::vector<int64_t> shape;   // outermost first
  uint64_t begin = 0, end = 0;  // byte range within the data section
};

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(const uint8_t* data,
                                                                    size_t size,
                                                                    const std::string& name);
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::unique_ptr<MappedFile> file);

  const std::string& path() const { return file_->path(); }
  // `__metadata__` (string -> string); empty when the header has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }
  const SafetensorsTensorInfo* FindTensor(const std::string& name) const;
  bool HasTensor(const std::string& name) const { return FindTensor(name) != nullptr; }
  // A view into the mapping (rows x cols = the 2-D view; a scalar is 1 x 1). NotFound if absent.
  absl::StatusOr<WeightTensor> Tensor(const std::string& name) const;
  WeightTensor View(const SafetensorsTensorInfo& info) const;

 private:
  SafetensorsFile() = default;
  absl::Status ParseAll();

  std::unique_ptr<MappedFile> file_;
  uint64_t data_offset_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

// All safetensors files of a Hugging Face model directory, with one name -> tensor lookup:
// `model.safetensors.index.json` (its weight_map) when present, else `model.safetensors`, else
// every `*.safetensors` file in the directory (names must not repeat across files).
class SafetensorsSet {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsSet>> Open(const std::string& dir);

  bool Has(const std::string& name) const { return where_.count(name) != 0; }
  absl::StatusOr<WeightTensor> Tensor(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  // Adds one more file (e.g. a DMS adapter); its names must not repeat existing ones.
  absl::Status Add(std::unique_ptr<SafetensorsFile> file);

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, size_t> where_;  // tensor name -> index into files_
};

}  // namespace dmsrt
