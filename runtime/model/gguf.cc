// GGUF reader (see gguf.h). Layout of a GGUF v2/v3 file, all little-endian:
//   magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//   n_kv x { string key | u32 type | value }         string = u64 length + bytes
//   n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//   padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
// An array value is { u32 elem_type | u64 count | count x value } (elements may be arrays).
#include "runtime/model/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/status_macros.h"  // header-only, abseil only

namespace dmsrt {

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as little-endian u32
constexpr int kMaxDims = 4;                  // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;            // nested arrays deeper than this are refused

// Smallest encoding of one value of type t (used to bound counts before allocating).
uint64_t MinValueBytes(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
      return 8;
    case GgufType::kString:
      return 8;
    case GgufType::kArray:
      return 12;
  }
  return 0;
}

bool ValidType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

bool IsInteger(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

template <typename T>
T LoadLE(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the project targets little-endian hosts only
  return v;
}

// Bounds-checked sequential reader over [data, data + size).
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, size_t pos, const std::string& path)
      : data_(data), size_(size), pos_(pos), path_(path) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

  absl::Status Need(uint64_t n, const std::string& what) const {
    if (n > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": GGUF truncated: ", what, " needs ",
                                                     n, " bytes at offset ", pos_, " but only ",
                                                     remaining(), " remain"));
    }
    return absl::OkStatus();
  }
  template <typename T>
  absl::StatusOr<T> Read(const std::string& what) {
    absl::Status s = Need(sizeof(T), what);
    if (!s.ok()) return s;
    T v = LoadLE<T>(data_ + pos_);
    pos_ += sizeof(T);
    return v;
  }
  absl::StatusOr<std::string_view> ReadString(const std::string& what) {
    absl::StatusOr<uint64_t> len = Read<uint64_t>(absl::StrCat(what, " length"));
    if (!len.ok()) return len.status();
    if (*len > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": GGUF ", what, ": string length ",
                                                     *len, " at offset ", pos_, " exceeds the ",
                                                     remaining(), " bytes left in the file"));
    }
    std::string_view s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(*len));
    pos_ += static_cast<size_t>(*len);
    return s;
  }
  const uint8_t* here() const { return data_ + pos_; }
  void Skip(size_t n) { pos_ += n; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_;
  const std::string& path_;
};

// Reads one number into the matching field of `out` (u64, i64 or f64).
template <typename T>
absl::Status ReadNumber(Cursor& c, const std::string& what, GgufValue* out) {
  absl::StatusOr<T> v = c.Read<T>(what);
  if (!v.ok()) return v.status();
  if (out == nullptr) return absl::OkStatus();
  if constexpr (std::is_floating_point_v<T>) {
    out->f64 = static_cast<double>(*v);
  } else if constexpr (std::is_signed_v<T>) {
    out->i64 = static_cast<int64_t>(*v);
  } else {
    out->u64 = static_cast<uint64_t>(*v);
  }
  return absl::OkStatus();
}

// Validates (and skips over) one value of type t; fills `out` for scalars, strings and arrays.
absl::Status ReadValue(Cursor& c, GgufType t, const std::string& what, int depth, GgufValue* out) {
  if (out) out->type = t;
  switch (t) {
    case GgufType::kUint8:
      return ReadNumber<uint8_t>(c, what, out);
    case GgufType::kInt8:
      return ReadNumber<int8_t>(c, what, out);
    case GgufType::kUint16:
      return ReadNumber<uint16_t>(c, what, out);
    case GgufType::kInt16:
      return ReadNumber<int16_t>(c, what, out);
    case GgufType::kUint32:
      return ReadNumber<uint32_t>(c, what, out);
    case GgufType::kInt32:
      return ReadNumber<int32_t>(c, what, out);
    case GgufType::kUint64:
      return ReadNumber<uint64_t>(c, what, out);
    case GgufType::kInt64:
      return ReadNumber<int64_t>(c, what, out);
    case GgufType::kFloat32:
      return ReadNumber<float>(c, what, out);
    case GgufType::kFloat64:
      return ReadNumber<double>(c, what, out);
    case GgufType::kBool: {
      auto v = c.Read<uint8_t>(what);
      if (!v.ok()) return v.status();
      if (out) out->u64 = *v != 0;
      return absl::OkStatus();
    }
    case GgufType::kString: {
      auto s = c.ReadString(what);
      if (!s.ok()) return s.status();
      if (out) out->str = *s;
      return absl::OkStatus();
    }
    case GgufType::kArray: {
      if (depth >= kMaxArrayDepth) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": arrays nested deeper than ", kMaxArrayDepth, " levels"));
      }
      auto et = c.Read<uint32_t>(absl::StrCat(what, " element type"));
      if (!et.ok()) return et.status();
      if (!ValidType(*et)) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": unknown array element type id ", *et));
      }
      GgufType elem = static_cast<GgufType>(*et);
      auto n = c.Read<uint64_t>(absl::StrCat(what, " element count"));
      if (!n.ok()) return n.status();
      uint64_t min_bytes = MinValueBytes(elem);
      if (*n > c.remaining() / min_bytes) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": array of ", *n, " ", GgufTypeName(elem),
                         " values cannot fit in the ", c.remaining(), " bytes left in the file"));
      }
      const uint8_t* begin = c.here();
      size_t start = c.pos();
      if (elem != GgufType::kString && elem != GgufType::kArray) {
        c.Skip(static_cast<size_t>(*n * min_bytes));
      } else {
        for (uint64_t i = 0; i < *n; ++i) {
          absl::Status s = ReadValue(c, elem, what, depth + 1, nullptr);
          if (!s.ok()) return s;
        }
      }
      if (out) {
        out->elem_type = elem;
        out->count = *n;
        out->begin = begin;
        out->bytes = c.pos() - start;
      }
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": unknown value type"));
}

absl::Status WithPath(const std::string& path, const absl::Status& s) {
  std::string msg(s.message());
  if (msg.rfind(path, 0) == 0) return s;
  return absl::Status(s.code(), absl::StrCat(path, ": ", msg));
}

}  // namespace

const char* GgufTypeName(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
      return "uint8";
    case GgufType::kInt8:
      return "int8";
    case GgufType::kUint16:
      return "uint16";
    case GgufType::kInt16:
      return "int16";
    case GgufType::kUint32:
      return "uint32";
    case GgufType::kInt32:
      return "int32";
    case GgufType::kFloat32:
      return "float32";
    case GgufType::kBool:
      return "bool";
    case GgufType::kString:
      return "string";
    case GgufType::kArray:
      return "array";
    case GgufType::kUint64:
      return "uint64";
    case GgufType::kInt64:
      return "int64";
    case GgufType::kFloat64:
      return "float64";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  auto f = MappedFile::Open(path);
  if (!f.ok()) return f.status();
  return Parse(std::move(*f));
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBytes(const uint8_t* data, size_t size,
                                                              const std::string& name) {
  return Parse(MappedFile::FromBytes(data, size, name));
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(std::unique_ptr<MappedFile> file) {
  std::unique_ptr<GgufFile> g(new GgufFile());
  g->file_ = std::move(file);
  absl::Status s = g->ParseAll();
  if (!s.ok()) return WithPath(g->file_->path(), s);
  return g;
}

namespace {

// The header after the magic: version and the two counts, bounded by the bytes left.
struct GgufHeader {
  uint32_t version = 0;
  uint64_t n_tensors = 0;
  uint64_t n_kv = 0;
};

absl::StatusOr<GgufHeader> ReadHeader(Cursor& c, const uint8_t* data, size_t size) {
  auto magic = c.Read<uint32_t>("magic");
  if (!magic.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a GGUF file: only ", size, " bytes, shorter than the magic"));
  }
  if (*magic != kGgufMagic) {
    char m[4];
    std::memcpy(m, data, 4);
    std::string shown;
    for (char ch : m) shown += (ch >= 32 && ch < 127) ? ch : '?';
    return absl::InvalidArgumentError(
        absl::StrCat("not a GGUF file: bad magic \"", shown, "\" (expected \"GGUF\")"));
  }
  GgufHeader h;
  DMSRT_ASSIGN_OR_RETURN(h.version, c.Read<uint32_t>("version"));
  if (h.version != 2 && h.version != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported GGUF version ", h.version, " (supported: 2 and 3)"));
  }
  DMSRT_ASSIGN_OR_RETURN(h.n_tensors, c.Read<uint64_t>("tensor count"));
  DMSRT_ASSIGN_OR_RETURN(h.n_kv, c.Read<uint64_t>("metadata key/value count"));
  // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
  // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
  if (h.n_kv > c.remaining() / 13) {
    return absl::InvalidArgumentError(absl::StrCat("metadata key/value count ", h.n_kv,
                                                   " cannot fit in a file of ", size, " bytes"));
  }
  if (h.n_tensors > c.remaining() / 24) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor count ", h.n_tensors, " cannot fit in a file of ", size, " bytes"));
  }
  return h;
}

// Metadata entry #i: its key and value.
absl::StatusOr<std::pair<std::string, GgufValue>> ReadMetadataEntry(Cursor& c, uint64_t i) {
  const std::string where = absl::StrCat("metadata entry #", i);
  DMSRT_ASSIGN_OR_RETURN(auto key_view, c.ReadString(absl::StrCat(where, " key")));
  std::string key(key_view);
  const std::string what = absl::StrCat("metadata '", key, "'");
  DMSRT_ASSIGN_OR_RETURN(auto type_id, c.Read<uint32_t>(absl::StrCat(what, " type")));
  if (!ValidType(type_id)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": unknown value type id ", type_id));
  }
  GgufValue v;
  absl::Status s = ReadValue(c, static_cast<GgufType>(type_id), what, 0, &v);
  if (!s.ok()) return s;
  return std::make_pair(std::move(key), std::move(v));
}

// general.alignment: an integer power of two in [1, 16M].
absl::StatusOr<uint64_t> ReadAlignment(const GgufValue& a) {
  if (!IsInteger(a.type)) {
    return absl::InvalidArgumentError(absl::StrCat("metadata 'general.alignment' has type ",
                                                   GgufTypeName(a.type), ", expected uint32"));
  }
  uint64_t al = a.type == GgufType::kInt8 || a.type == GgufType::kInt16 ||
                        a.type == GgufType::kInt32 || a.type == GgufType::kInt64
                    ? static_cast<uint64_t>(a.i64)
                    : a.u64;
  if (al == 0 || (al & (al - 1)) != 0 || al > (1u << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat("metadata 'general.alignment' = ", static_cast<int64_t>(al),
                     " is not a power of two in [1, 16M]"));
  }
  return al;
}

// Tensor info #i: name, dimensions, type and offset; its byte size from them.
absl::StatusOr<GgufTensorInfo> ReadTensorInfo(Cursor& c, uint64_t i) {
  const std::string where = absl::StrCat("tensor info #", i);
  DMSRT_ASSIGN_OR_RETURN(auto name_view, c.ReadString(absl::StrCat(where, " name")));
  std::string name(name_view);
  if (name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": empty tensor name"));
  }
  const std::string what = absl::StrCat("tensor '", name, "'");
  DMSRT_ASSIGN_OR_RETURN(auto n_dims, c.Read<uint32_t>(absl::StrCat(what, " n_dims")));
  if (n_dims < 1 || n_dims > kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": n_dims = ", n_dims, " (must be 1..", kMaxDims, ")"));
  }
  GgufTensorInfo t;
  t.name = name;
  uint64_t numel = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    DMSRT_ASSIGN_OR_RETURN(auto ne, c.Read<uint64_t>(absl::StrCat(what, " ne[", d, "]")));
    if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": dimension ne[", d, "] = ", ne, " is out of range"));
    }
    if (numel > std::numeric_limits<uint64_t>::max() / ne || numel * ne > (uint64_t{1} << 50)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": element count overflows (dimension ne[", d, "] = ", ne, ")"));
    }
    numel *= ne;
    t.ne.push_back(static_cast<int64_t>(ne));
  }
  DMSRT_ASSIGN_OR_RETURN(auto type_id, c.Read<uint32_t>(absl::StrCat(what, " type")));
  DType dt = static_cast<DType>(type_id);
  if (type_id > 1000 || BlockSize(dt) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": unknown tensor type id ", type_id));
  }
  t.type = dt;
  if (t.ne[0] % BlockSize(dt) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": row length ne[0] = ", t.ne[0],
                                                   " is not a multiple of the ", DTypeName(dt),
                                                   " block size ", BlockSize(dt)));
  }
  // numel <= 2^50 and block bytes <= 292, so this cannot overflow 64 bits.
  t.nbytes = static_cast<size_t>(numel / static_cast<uint64_t>(BlockSize(dt)) *
                                 static_cast<uint64_t>(BlockBytes(dt)));
  DMSRT_ASSIGN_OR_RETURN(auto offset, c.Read<uint64_t>(absl::StrCat(what, " offset")));
  t.offset = offset;
  return t;
}

// Every tensor's data lies inside the data section ([data_offset, size)), aligned, and no two
// overlap.
absl::Status CheckTensorExtents(const std::vector<GgufTensorInfo>& tensors, uint64_t alignment,
                                uint64_t data_offset, size_t size) {
  if (!tensors.empty() && data_offset > size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data section starts at ", data_offset, ", past the end of the file (", size, " bytes)"));
  }
  const uint64_t data_bytes = data_offset <= size ? size - data_offset : 0;
  std::vector<const GgufTensorInfo*> by_offset;
  by_offset.reserve(tensors.size());
  for (const GgufTensorInfo& t : tensors) {
    if (t.offset % alignment != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': data offset ",
                                                     t.offset, " is not a multiple of the ",
                                                     "alignment ", alignment));
    }
    if (t.offset > data_bytes || t.nbytes > data_bytes - t.offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "': data [", t.offset, ", +", t.nbytes,
          ") runs past the end of the file (data section holds ", data_bytes, " bytes)"));
    }
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo* a = by_offset[i - 1];
    const GgufTensorInfo* b = by_offset[i];
    if (a->offset + a->nbytes > b->offset) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", b->name, "' (offset ", b->offset,
                                                     ") overlaps tensor '", a->name, "' (offset ",
                                                     a->offset, ", ", a->nbytes, " bytes)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status GgufFile::ParseAll() {
  const std::string& path = file_->path();
  const uint8_t* data = file_->data();
  const size_t size = file_->size();
  Cursor c(data, size, 0, path);
  DMSRT_ASSIGN_OR_RETURN(const GgufHeader h, ReadHeader(c, data, size));
  version_ = h.version;

  // ---- metadata ----
  kv_.reserve(static_cast<size_t>(h.n_kv));
  key_order_.reserve(static_cast<size_t>(h.n_kv));
  for (uint64_t i = 0; i < h.n_kv; ++i) {
    DMSRT_ASSIGN_OR_RETURN(auto entry, ReadMetadataEntry(c, i));
    std::string& k = entry.first;
    if (kv_.count(k)) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate metadata key '", k, "'"));
    }
    kv_.emplace(k, entry.second);
    key_order_.push_back(std::move(k));
  }
  if (const GgufValue* a = Find("general.alignment")) {
    DMSRT_ASSIGN_OR_RETURN(alignment_, ReadAlignment(*a));
  }

  // ---- tensor infos ----
  tensors_.reserve(static_cast<size_t>(h.n_tensors));
  tensor_index_.reserve(static_cast<size_t>(h.n_tensors));
  for (uint64_t i = 0; i < h.n_tensors; ++i) {
    DMSRT_ASSIGN_OR_RETURN(GgufTensorInfo t, ReadTensorInfo(c, i));
    if (tensor_index_.count(t.name)) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name '", t.name, "'"));
    }
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // ---- data section ----
  uint64_t end_of_infos = c.pos();
  data_offset_ = (end_of_infos + alignment_ - 1) / alignment_ * alignment_;
  return CheckTensorExtents(tensors_, alignment_, data_offset_, size);
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

absl::Status GgufFile::TypeError(const std::string& key, const GgufValue& v,
                                 const char* want) const {
  std::string have = GgufTypeName(v.type);
  if (v.type == GgufType::kArray) have = absl::StrCat("array of ", GgufTypeName(v.elem_type));
  return absl::InvalidArgumentError(
      absl::StrCat(path(), ": metadata '", key, "' has type ", have, ", expected ", want));
}

namespace {
absl::Status Missing(const std::string& path, const std::string& key) {
  return absl::NotFoundError(absl::StrCat(path, ": metadata key '", key, "' is missing"));
}
bool IsSigned(GgufType t) {
  return t == GgufType::kInt8 || t == GgufType::kInt16 || t == GgufType::kInt32 ||
         t == GgufType::kInt64;
}
// Decodes element i of a fixed-size array (integer or float types) as int64 / double.
int64_t ArrayInt(GgufType t, const uint8_t* p, uint64_t i, bool* fits) {
  *fits = true;
  switch (t) {
    case GgufType::kUint8:
      return LoadLE<uint8_t>(p + i);
    case GgufType::kInt8:
      return LoadLE<int8_t>(p + i);
    case GgufType::kUint16:
      return LoadLE<uint16_t>(p + 2 * i);
    case GgufType::kInt16:
      return LoadLE<int16_t>(p + 2 * i);
    case GgufType::kUint32:
      return LoadLE<uint32_t>(p + 4 * i);
    case GgufType::kInt32:
      return LoadLE<int32_t>(p + 4 * i);
    case GgufType::kInt64:
      return LoadLE<int64_t>(p + 8 * i);
    case GgufType::kUint64: {
      uint64_t v = LoadLE<uint64_t>(p + 8 * i);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) *fits = false;
      return static_cast<int64_t>(v);
    }
    case GgufType::kBool:
      return LoadLE<uint8_t>(p + i) != 0;
    default:
      *fits = false;
      return 0;
  }
}
}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufType::kString) return TypeError(key, *v, "string");
  return std::string(v->str);
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type == GgufType::kBool) return static_cast<int64_t>(v->u64);
  if (!IsInteger(v->type)) return TypeError(key, *v, "an integer");
  if (IsSigned(v->type)) return v->i64;
  if (v->u64 > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat(path(), ": metadata '", key, "' = ", v->u64, " does not fit an int64"));
  }
  return static_cast<int64_t>(v->u64);
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type == GgufType::kFloat32 || v->type == GgufType::kFloat64) return v->f64;
  if (IsInteger(v->type)) {
    return IsSigned(v->type) ? static_cast<double>(v->i64) : static_cast<double>(v->u64);
  }
  return TypeError(key, *v, "a float");
}

absl::StatusOr<bool> GgufFile::GetBool(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufType::kBool) return TypeError(key, *v, "bool");
  return v->u64 != 0;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString) {
    return TypeError(key, *v, "array of string");
  }
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(v->count));
  // Validated in ParseAll: every element is a u64 length followed by that many bytes, in range.
  const uint8_t* p = v->begin;
  for (uint64_t i = 0; i < v->count; ++i) {
    uint64_t n = LoadLE<uint64_t>(p);
    out.emplace_back(reinterpret_cast<const char*>(p + 8), static_cast<size_t>(n));
    p += 8 + n;
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> GgufFile::GetInt32Array(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufType::kArray ||
      !(IsInteger(v->elem_type) || v->elem_type == GgufType::kBool)) {
    return TypeError(key, *v, "array of integers");
  }
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(v->count));
  for (uint64_t i = 0; i < v->count; ++i) {
    bool fits;
    int64_t x = ArrayInt(v->elem_type, v->begin, i, &fits);
    if (!fits || x < std::numeric_limits<int32_t>::min() ||
        x > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path(), ": metadata '", key, "'[", i, "] does not fit an int32"));
    }
    out.push_back(static_cast<int32_t>(x));
  }
  return out;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufType::kArray) return TypeError(key, *v, "array of numbers");
  std::vector<double> out;
  out.reserve(static_cast<size_t>(v->count));
  for (uint64_t i = 0; i < v->count; ++i) {
    if (v->elem_type == GgufType::kFloat32) {
      out.push_back(LoadLE<float>(v->begin + 4 * i));
    } else if (v->elem_type == GgufType::kFloat64) {
      out.push_back(LoadLE<double>(v->begin + 8 * i));
    } else {
      bool fits;
      int64_t x = ArrayInt(v->elem_type, v->begin, i, &fits);
      if (!fits) return TypeError(key, *v, "array of numbers");
      out.push_back(static_cast<double>(x));
    }
  }
  return out;
}

absl::StatusOr<std::optional<int64_t>> GgufFile::GetOptionalInt(const std::string& key) const {
  if (!Has(key)) return std::optional<int64_t>();
  auto v = GetInt(key);
  if (!v.ok()) return v.status();
  return std::optional<int64_t>(*v);
}
absl::StatusOr<std::optional<double>> GgufFile::GetOptionalFloat(const std::string& key) const {
  if (!Has(key)) return std::optional<double>();
  auto v = GetFloat(key);
  if (!v.ok()) return v.status();
  return std::optional<double>(*v);
}
absl::StatusOr<std::optional<bool>> GgufFile::GetOptionalBool(const std::string& key) const {
  if (!Has(key)) return std::optional<bool>();
  auto v = GetBool(key);
  if (!v.ok()) return v.status();
  return std::optional<bool>(*v);
}
absl::StatusOr<std::optional<std::string>> GgufFile::GetOptionalString(
    const std::string& key) const {
  if (!Has(key)) return std::optional<std::string>();
  auto v = GetString(key);
  if (!v.ok()) return v.status();
  return std::optional<std::string>(*v);
}

const GgufTensorInfo* GgufFile::FindTensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

WeightTensor GgufFile::View(const GgufTensorInfo& info) const {
  WeightTensor w;
  w.name = info.name;
  w.type = info.type;
  w.shape.assign(info.ne.rbegin(), info.ne.rend());
  w.cols = info.ne[0];
  w.rows = 1;
  for (size_t d = 1; d < info.ne.size(); ++d) w.rows *= info.ne[d];
  w.data = file_->data() + data_offset_ + info.offset;
  w.nbytes = info.nbytes;
  return w;
}

absl::StatusOr<WeightTensor> GgufFile::Tensor(const std::string& name) const {
  const GgufTensorInfo* t = FindTensor(name);
  if (!t) return absl::NotFoundError(absl::StrCat(path(), ": tensor '", name, "' is missing"));
  return View(*t);
}

}  // namespace dmsrt
