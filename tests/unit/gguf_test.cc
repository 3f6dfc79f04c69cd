// GGUF reader tests: every metadata type, tensor views, the default model's header, and hostile
// files (bad magic/version, truncation at every offset, absurd counts and lengths, bad tensor
// extents, seeded random byte flips) which must all end in a clear error, never a crash.
#include "runtime/model/gguf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace dmsrt {
namespace {

// Builds GGUF bytes field by field, so tests can write both valid and broken files.
class GgufBuilder {
 public:
  std::vector<uint8_t> out;

  template <typename T>
  GgufBuilder& Raw(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    out.insert(out.end(), b, b + sizeof(T));
    return *this;
  }
  GgufBuilder& Str(const std::string& s) {
    Raw<uint64_t>(s.size());
    out.insert(out.end(), s.begin(), s.end());
    return *this;
  }
  GgufBuilder& Header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    Raw<uint32_t>(0x46554747);
    Raw<uint32_t>(version);
    Raw<uint64_t>(n_tensors);
    Raw<uint64_t>(n_kv);
    return *this;
  }
  GgufBuilder& Key(const std::string& k, GgufType t) {
    Str(k);
    Raw<uint32_t>(static_cast<uint32_t>(t));
    return *this;
  }
  GgufBuilder& TensorInfo(const std::string& name, std::vector<uint64_t> ne, DType type,
                          uint64_t offset) {
    Str(name);
    Raw<uint32_t>(static_cast<uint32_t>(ne.size()));
    for (uint64_t n : ne) Raw<uint64_t>(n);
    Raw<uint32_t>(static_cast<uint32_t>(type));
    Raw<uint64_t>(offset);
    return *this;
  }
  GgufBuilder& Align(size_t a) {
    while (out.size() % a) out.push_back(0);
    return *this;
  }
};

// A small valid file: every scalar type, a string array, a nested array, and two F32 tensors
// ([2, 3] and [4]) after 32-byte alignment. Returns the bytes.
std::vector<uint8_t> ValidFile() {
  GgufBuilder b;
  b.Header(2, 16);
  b.Key("general.architecture", GgufType::kString).Str("llama");
  b.Key("u8", GgufType::kUint8).Raw<uint8_t>(200);
  b.Key("i8", GgufType::kInt8).Raw<int8_t>(-5);
  b.Key("u16", GgufType::kUint16).Raw<uint16_t>(60000);
  b.Key("i16", GgufType::kInt16).Raw<int16_t>(-30000);
  b.Key("u32", GgufType::kUint32).Raw<uint32_t>(4000000000u);
  b.Key("i32", GgufType::kInt32).Raw<int32_t>(-2000000000);
  b.Key("u64", GgufType::kUint64).Raw<uint64_t>(1ull << 40);
  b.Key("i64", GgufType::kInt64).Raw<int64_t>(-(1ll << 40));
  b.Key("f32", GgufType::kFloat32).Raw<float>(1.5f);
  b.Key("f64", GgufType::kFloat64).Raw<double>(-2.25);
  b.Key("flag", GgufType::kBool).Raw<uint8_t>(1);
  b.Key("words", GgufType::kArray).Raw<uint32_t>(8).Raw<uint64_t>(3).Str("a").Str("").Str("ccc");
  b.Key("ints", GgufType::kArray)
      .Raw<uint32_t>(5)
      .Raw<uint64_t>(3)
      .Raw<int32_t>(1)
      .Raw<int32_t>(-2)
      .Raw<int32_t>(3);
  b.Key("nested", GgufType::kArray)
      .Raw<uint32_t>(9)
      .Raw<uint64_t>(2)
      .Raw<uint32_t>(0)
      .Raw<uint64_t>(2)
      .Raw<uint8_t>(7)
      .Raw<uint8_t>(8)
      .Raw<uint32_t>(8)
      .Raw<uint64_t>(1)
      .Str("x");
  b.Key("big_u64s", GgufType::kArray).Raw<uint32_t>(10).Raw<uint64_t>(1).Raw<uint64_t>(~0ull);
  b.TensorInfo("w", {3, 2}, DType::kF32, 0);
  b.TensorInfo("v", {4}, DType::kF32, 32);
  b.Align(32);
  for (int i = 0; i < 6; ++i) b.Raw<float>(static_cast<float>(i));
  b.Align(32);
  for (int i = 0; i < 4; ++i) b.Raw<float>(10.0f + i);
  return b.out;
}

absl::StatusOr<std::unique_ptr<GgufFile>> Parse(const std::vector<uint8_t>& bytes) {
  return GgufFile::FromBytes(bytes.data(), bytes.size(), "test.gguf");
}

TEST(Gguf, ParsesEveryMetadataType) {
  auto f = Parse(ValidFile());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("u8"), 200);
  EXPECT_EQ(*g.GetInt("i8"), -5);
  EXPECT_EQ(*g.GetInt("u16"), 60000);
  EXPECT_EQ(*g.GetInt("i16"), -30000);
  EXPECT_EQ(*g.GetInt("u32"), 4000000000ll);
  EXPECT_EQ(*g.GetInt("i32"), -2000000000);
  EXPECT_EQ(*g.GetInt("u64"), 1ll << 40);
  EXPECT_EQ(*g.GetInt("i64"), -(1ll << 40));
  EXPECT_DOUBLE_EQ(*g.GetFloat("f32"), 1.5);
  EXPECT_DOUBLE_EQ(*g.GetFloat("f64"), -2.25);
  EXPECT_DOUBLE_EQ(*g.GetFloat("u32"), 4e9);  // integers convert to float
  EXPECT_TRUE(*g.GetBool("flag"));
  EXPECT_EQ(*g.GetStringArray("words"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(*g.GetInt32Array("ints"), (std::vector<int32_t>{1, -2, 3}));
  const GgufValue* nested = g.Find("nested");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->type, GgufType::kArray);
  EXPECT_EQ(nested->elem_type, GgufType::kArray);
  EXPECT_EQ(nested->count, 2u);
  EXPECT_EQ(g.keys().size(), 16u);
  EXPECT_EQ(g.keys().front(), "general.architecture");
}

TEST(Gguf, TypeMismatchAndMissingKeysAreClear) {
  auto f = Parse(ValidFile());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  auto s = g.GetInt("general.architecture");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("'general.architecture' has type string"), std::string::npos)
      << s.status();
  EXPECT_NE(s.status().message().find("test.gguf"), std::string::npos);
  EXPECT_FALSE(g.GetString("u8").ok());
  EXPECT_FALSE(g.GetBool("u8").ok());
  EXPECT_FALSE(g.GetFloat("words").ok());
  auto arr = g.GetStringArray("ints");
  ASSERT_FALSE(arr.ok());
  EXPECT_NE(arr.status().message().find("array of int32"), std::string::npos) << arr.status();
  auto big = g.GetInt32Array("big_u64s");
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("does not fit an int32"), std::string::npos);
  auto missing = g.GetInt("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  EXPECT_NE(missing.status().message().find("'nope'"), std::string::npos);
  auto opt = g.GetOptionalInt("nope");
  ASSERT_TRUE(opt.ok());
  EXPECT_FALSE(opt->has_value());
  EXPECT_FALSE(g.GetOptionalInt("words").ok());
}

TEST(Gguf, TensorViewsReverseShapeAndPointIntoTheFile) {
  auto f = Parse(ValidFile());
  ASSERT_TRUE(f.ok()) << f.status();
  auto w = (*f)->Tensor("w");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w->rows, 2);
  EXPECT_EQ(w->cols, 3);
  EXPECT_EQ(w->nbytes, 24u);
  const float* wd = reinterpret_cast<const float*>(w->data);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(wd[i], static_cast<float>(i));
  EXPECT_EQ(reinterpret_cast<const float*>(w->row(1))[0], 3.0f);
  auto v = (*f)->Tensor("v");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(v->rows, 1);
  EXPECT_EQ(reinterpret_cast<const float*>(v->data)[3], 13.0f);
  EXPECT_EQ((reinterpret_cast<uintptr_t>(v->data) - reinterpret_cast<uintptr_t>(w->data)) % 32, 0u);
  auto missing = (*f)->Tensor("nope");
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
}

// Expects a parse error whose message contains `needle`.
void ExpectError(const std::vector<uint8_t>& bytes, const std::string& needle) {
  auto f = Parse(bytes);
  ASSERT_FALSE(f.ok()) << "expected an error containing: " << needle;
  EXPECT_NE(f.status().message().find(needle), std::string::npos) << f.status();
  EXPECT_NE(f.status().message().find("test.gguf"), std::string::npos) << f.status();
}

TEST(GgufHostile, BadMagicAndVersion) {
  std::vector<uint8_t> b = ValidFile();
  b[0] = 'X';
  ExpectError(b, "bad magic");
  ExpectError({}, "shorter than the magic");
  b = ValidFile();
  b[4] = 1;
  ExpectError(b, "unsupported GGUF version 1");
  b[4] = 4;
  ExpectError(b, "unsupported GGUF version 4");
}

TEST(GgufHostile, AbsurdCounts) {
  GgufBuilder b;
  b.Header(0, 1ull << 60);
  ExpectError(b.out, "metadata key/value count");
  GgufBuilder c;
  c.Header(~0ull, 0);
  ExpectError(c.out, "tensor count");
  GgufBuilder d;
  d.Header(0, 1).Raw<uint64_t>(1ull << 62);  // key length
  d.out.resize(d.out.size() + 64, 0);
  ExpectError(d.out, "string length 4611686018427387904");
  GgufBuilder e;
  e.Header(0, 1).Key("arr", GgufType::kArray).Raw<uint32_t>(6).Raw<uint64_t>(1ull << 61);
  ExpectError(e.out, "array of 2305843009213693952 float32");
  GgufBuilder s;
  s.Header(0, 1).Key("arr", GgufType::kArray).Raw<uint32_t>(8).Raw<uint64_t>(3).Str("a");
  ExpectError(s.out, "array of 3 string values cannot fit");
  GgufBuilder t;
  t.Header(0, 1).Key("arr", GgufType::kArray).Raw<uint32_t>(8).Raw<uint64_t>(2).Str("a");
  t.Raw<uint64_t>(100).Raw<uint64_t>(0);
  ExpectError(t.out, "string length 100");
}

TEST(GgufHostile, BadTypesAndNesting) {
  GgufBuilder b;
  b.Header(0, 1).Key("k", static_cast<GgufType>(13)).Raw<uint32_t>(0);
  ExpectError(b.out, "unknown value type id 13");
  GgufBuilder e;
  e.Header(0, 1).Key("k", GgufType::kArray).Raw<uint32_t>(99).Raw<uint64_t>(0);
  ExpectError(e.out, "unknown array element type id 99");
  GgufBuilder n;
  n.Header(0, 1).Key("deep", GgufType::kArray);
  for (int i = 0; i < 20; ++i) n.Raw<uint32_t>(9).Raw<uint64_t>(1);
  n.Raw<uint32_t>(0).Raw<uint64_t>(0);
  ExpectError(n.out, "nested deeper");
  GgufBuilder d;
  d.Header(0, 2)
      .Key("k", GgufType::kUint8)
      .Raw<uint8_t>(1)
      .Key("k", GgufType::kUint8)
      .Raw<uint8_t>(2);
  ExpectError(d.out, "duplicate metadata key 'k'");
  GgufBuilder a;
  a.Header(0, 1).Key("general.alignment", GgufType::kUint32).Raw<uint32_t>(24);
  ExpectError(a.out, "general.alignment");
}

std::vector<uint8_t> OneTensor(std::vector<uint64_t> ne, DType type, uint64_t offset,
                               size_t data_bytes, uint32_t n_dims_override = 0) {
  GgufBuilder b;
  b.Header(1, 0);
  b.Str("t");
  b.Raw<uint32_t>(n_dims_override ? n_dims_override : static_cast<uint32_t>(ne.size()));
  for (uint64_t n : ne) b.Raw<uint64_t>(n);
  b.Raw<uint32_t>(static_cast<uint32_t>(type));
  b.Raw<uint64_t>(offset);
  b.Align(32);
  b.out.resize(b.out.size() + data_bytes, 0x5a);
  return b.out;
}

TEST(GgufHostile, BadTensorInfos) {
  EXPECT_TRUE(Parse(OneTensor({32, 2}, DType::kQ8_0, 0, 68)).ok());
  ExpectError(OneTensor({32, 2}, DType::kQ8_0, 0, 67), "runs past the end");
  ExpectError(OneTensor({32, 2}, DType::kQ8_0, 32, 68), "runs past the end");
  ExpectError(OneTensor({32, 2}, DType::kQ8_0, 16, 200), "not a multiple of the alignment");
  ExpectError(OneTensor({31, 2}, DType::kQ8_0, 0, 68), "not a multiple of the Q8_0 block size");
  ExpectError(OneTensor({4}, static_cast<DType>(77), 0, 64), "unknown tensor type id 77");
  ExpectError(OneTensor({4, 0}, DType::kF32, 0, 64), "ne[1] = 0");
  ExpectError(OneTensor({1ull << 40, 1ull << 40}, DType::kF32, 0, 64), "overflows");
  ExpectError(OneTensor({~0ull}, DType::kF32, 0, 64), "out of range");
  ExpectError(OneTensor({}, DType::kF32, 0, 64), "n_dims = 0");
  ExpectError(OneTensor({1, 1, 1, 1, 1}, DType::kF32, 0, 64), "n_dims = 5");
  ExpectError(OneTensor({4}, DType::kF32, 1ull << 63, 64), "runs past the end");
  // Two tensors sharing bytes.
  GgufBuilder b;
  b.Header(2, 0);
  b.TensorInfo("a", {16}, DType::kF32, 0);
  b.TensorInfo("b", {16}, DType::kF32, 32);
  b.Align(32);
  b.out.resize(b.out.size() + 128, 0);
  ExpectError(b.out, "overlaps");
  GgufBuilder d;
  d.Header(2, 0);
  d.TensorInfo("a", {4}, DType::kF32, 0);
  d.TensorInfo("a", {4}, DType::kF32, 32);
  d.Align(32);
  d.out.resize(d.out.size() + 64, 0);
  ExpectError(d.out, "duplicate tensor name 'a'");
}

TEST(Gguf, CustomAlignment64) {
  auto make = [](uint64_t second_offset) {
    GgufBuilder b;
    b.Header(2, 1);
    b.Key("general.alignment", GgufType::kUint32).Raw<uint32_t>(64);
    b.TensorInfo("a", {4}, DType::kF32, 0);
    b.TensorInfo("b", {4}, DType::kF32, second_offset);
    b.Align(64);
    b.out.resize(b.out.size() + 128, 0x11);
    return b.out;
  };
  auto f = Parse(make(64));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->data_offset() % 64, 0u);
  ExpectError(make(32), "not a multiple of the alignment 64");
}

// Every prefix of a valid file must fail cleanly (only the full file is valid).
TEST(GgufRobustness, TruncationAtEveryOffset) {
  const std::vector<uint8_t> full = ValidFile();
  for (size_t n = 0; n < full.size(); ++n) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + n);
    auto f = Parse(cut);
    EXPECT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
  }
  EXPECT_TRUE(Parse(full).ok());
}

// Seeded random byte flips: each result is either an error or a file whose every getter and
// tensor view stays within the buffer (run under ASan by the fuzz target; here: no crash).
TEST(GgufRobustness, RandomByteFlipsSeed1234) {
  const std::vector<uint8_t> full = ValidFile();
  std::mt19937_64 rng(1234);
  int ok = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> b = full;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) b[rng() % b.size()] = static_cast<uint8_t>(rng());
    auto f = Parse(b);
    if (!f.ok()) {
      EXPECT_FALSE(f.status().message().empty());
      continue;
    }
    ++ok;
    const GgufFile& g = **f;
    for (const std::string& k : g.keys()) {
      (void)g.GetString(k);
      (void)g.GetInt(k);
      (void)g.GetFloat(k);
      (void)g.GetStringArray(k);
      (void)g.GetInt32Array(k);
      (void)g.GetFloatArray(k);
    }
    for (const GgufTensorInfo& t : g.tensors()) {
      ASSERT_LE(g.data_offset() + t.offset + t.nbytes, g.file_size()) << t.name;
      WeightTensor w = g.View(t);
      volatile uint8_t sink = 0;
      for (size_t i = 0; i < w.nbytes; ++i) sink = sink + w.data[i];
      (void)sink;
    }
  }
  EXPECT_GT(ok, 0);  // flips inside values leave valid files; they must still parse
}

TEST(GgufDefaultModel, Header) {
  const std::string path =
      std::string(DMSRT_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  auto f = GgufFile::Open(path);
  if (absl::IsNotFound(f.status())) GTEST_SKIP() << "default model not present: " << path;
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("llama.block_count"), 30);
  EXPECT_EQ(*g.GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(*g.GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_NEAR(*g.GetFloat("llama.rope.freq_base"), 100000.0, 1e-3);
  EXPECT_EQ(g.GetStringArray("tokenizer.ggml.tokens")->size(), 49152u);
  EXPECT_EQ(g.GetInt32Array("tokenizer.ggml.token_type")->size(), 49152u);
  EXPECT_EQ(g.GetStringArray("tokenizer.ggml.merges")->size(), 48900u);
  EXPECT_EQ(g.tensors().size(), 272u);
  auto e = g.Tensor("token_embd.weight");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->type, DType::kQ8_0);
  EXPECT_EQ(e->shape, (std::vector<int64_t>{49152, 576}));
  EXPECT_EQ(e->nbytes, 49152u * 576 / 32 * 34);
  auto q = g.Tensor("blk.0.attn_q.weight");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->type, DType::kQ4_1);
  EXPECT_EQ(q->shape, (std::vector<int64_t>{576, 576}));
}

}  // namespace
}  // namespace dmsrt
