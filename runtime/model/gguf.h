// GGUF (v2/v3) reader: header, metadata key/values, tensor infos, and tensor views into a
// read-only memory mapping of the file.
//
// The whole structure is validated once in Open(), treating the file as hostile: every count and
// length is bounded by the bytes left in the file before anything is allocated, tensor extents
// are checked for overflow, alignment, range and overlap, and unknown type ids are refused. After
// Open() succeeds, the getters cannot read out of bounds. Arrays are kept as byte spans into the
// mapping and decoded when asked for, so a 150k-entry vocabulary costs nothing until it is used.
// Errors name the file and the field. Immutable after Open(); safe to share between threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/mapped_file.h"
#include "runtime/model/tensor.h"

namespace dmsrt {

// GGUF metadata value type ids (as stored in the file).
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* GgufTypeName(GgufType t);

// One metadata value. Scalars are decoded; strings and arrays point into the mapping.
struct GgufValue {
  GgufType type = GgufType::kUint8;
  uint64_t u64 = 0;      // unsigned integers and bool
  int64_t i64 = 0;       // signed integers
  double f64 = 0;        // floats
  std::string_view str;  // kString
  // kArray: element type, element count, and the encoded elements [begin, begin + bytes).
  GgufType elem_type = GgufType::kUint8;
  uint64_t count = 0;
  const uint8_t* begin = nullptr;
  size_t bytes = 0;
};

struct GgufTensorInfo {
  std::string name;
  DType type = DType::kF32;
  std::vector<int64_t> ne;  // GGUF order: ne[0] is the innermost (contiguous) dimension
  uint64_t offset = 0;      // relative to the data section
  size_t nbytes = 0;
};

class GgufFile {
 public:
  // Maps and validates `path`.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Validates a file already in memory (copied); `name` is used in messages.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBytes(const uint8_t* data, size_t size,
                                                             const std::string& name);
  // Takes ownership of a mapping and validates it.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(std::unique_ptr<MappedFile> file);

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  const std::string& path() const { return file_->path(); }
  size_t file_size() const { return file_->size(); }

  // ---- metadata ----
  bool Has(const std::string& key) const { return kv_.count(key) != 0; }
  const GgufValue* Find(const std::string& key) const;
  const std::vector<std::string>& keys() const { return key_order_; }
  // Each getter: NotFound when the key is absent, InvalidArgument (naming the key, the stored
  // type and the wanted type) when the type does not fit.
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  // Any integer type (and bool); fails when the value does not fit an int64.
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  // float32/float64, or any integer type (converted).
  absl::StatusOr<double> GetFloat(const std::string& key) const;
  absl::StatusOr<bool> GetBool(const std::string& key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(const std::string& key) const;
  // Arrays of any integer type whose values fit an int32.
  absl::StatusOr<std::vector<int32_t>> GetInt32Array(const std::string& key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(const std::string& key) const;
  // The optional forms: nullopt when absent, an error only for a type mismatch.
  absl::StatusOr<std::optional<int64_t>> GetOptionalInt(const std::string& key) const;
  absl::StatusOr<std::optional<double>> GetOptionalFloat(const std::string& key) const;
  absl::StatusOr<std::optional<bool>> GetOptionalBool(const std::string& key) const;
  absl::StatusOr<std::optional<std::string>> GetOptionalString(const std::string& key) const;

  // ---- tensors ----
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(const std::string& name) const;
  bool HasTensor(const std::string& name) const { return FindTensor(name) != nullptr; }
  // A view into the mapping: shape outermost-first (reverse of ne), rows x cols the 2-D view.
  // NotFound when absent.
  absl::StatusOr<WeightTensor> Tensor(const std::string& name) const;
  WeightTensor View(const GgufTensorInfo& info) const;

 private:
  GgufFile() = default;
  absl::Status ParseAll();
  absl::Status TypeError(const std::string& key, const GgufValue& v, const char* want) const;

  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::unordered_map<std::string, GgufValue> kv_;
  std::vector<std::string> key_order_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace dmsrt
