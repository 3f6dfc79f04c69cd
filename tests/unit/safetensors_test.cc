// safetensors reader tests: valid files (F32/F16/BF16, metadata, scalars), sharded directories
// with model.safetensors.index.json, and hostile headers (lengths, JSON, dtypes, extents,
// overlap, nesting), plus truncation at every offset and seeded byte flips.
#include "runtime/model/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace dmsrt {
namespace {

using Json = nlohmann::json;

std::vector<uint8_t> Build(const std::string& header, const std::vector<uint8_t>& data,
                           int64_t length_override = -1) {
  std::vector<uint8_t> out(8);
  uint64_t n = length_override >= 0 ? static_cast<uint64_t>(length_override) : header.size();
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<uint8_t> FloatBytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// A valid file: "w" F32 [2, 3], "h" F16 [4], "s" BF16 scalar [], metadata {format: pt}.
std::vector<uint8_t> ValidFile() {
  Json h;
  h["__metadata__"] = {{"format", "pt"}, {"dms_window_size", "16"}};
  h["w"] = {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}};
  h["h"] = {{"dtype", "F16"}, {"shape", {4}}, {"data_offsets", {24, 32}}};
  h["s"] = {{"dtype", "BF16"}, {"shape", Json::array()}, {"data_offsets", {32, 34}}};
  std::vector<uint8_t> data = FloatBytes({0, 1, 2, 3, 4, 5});
  data.resize(34, 0x3c);
  return Build(h.dump(), data);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(const std::vector<uint8_t>& b) {
  return SafetensorsFile::FromBytes(b.data(), b.size(), "test.safetensors");
}

void ExpectError(const std::vector<uint8_t>& b, const std::string& needle) {
  auto f = Parse(b);
  ASSERT_FALSE(f.ok()) << "expected an error containing: " << needle;
  EXPECT_NE(f.status().message().find(needle), std::string::npos) << f.status();
  EXPECT_NE(f.status().message().find("test.safetensors"), std::string::npos) << f.status();
}

TEST(Safetensors, ParsesValidFile) {
  auto f = Parse(ValidFile());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->metadata().at("dms_window_size"), "16");
  EXPECT_EQ((*f)->tensors().size(), 3u);
  auto w = (*f)->Tensor("w");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->type, DType::kF32);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w->rows, 2);
  EXPECT_EQ(w->cols, 3);
  EXPECT_EQ(reinterpret_cast<const float*>(w->row(1))[2], 5.0f);
  auto h = (*f)->Tensor("h");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->type, DType::kF16);
  EXPECT_EQ(h->rows, 1);
  EXPECT_EQ(h->cols, 4);
  auto s = (*f)->Tensor("s");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->type, DType::kBF16);
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->numel(), 1);
  EXPECT_EQ(s->nbytes, 2u);
  EXPECT_TRUE(absl::IsNotFound((*f)->Tensor("x").status()));
}

TEST(SafetensorsHostile, Lengths) {
  ExpectError({1, 2, 3}, "too short");
  ExpectError(Build("{}", {}, 1000), "exceeds the file");
  std::vector<uint8_t> big =
      Build("{}", {}, static_cast<int64_t>(SafetensorsFile::kMaxHeaderBytes + 1));
  big.resize(SafetensorsFile::kMaxHeaderBytes + 64, ' ');
  ExpectError(big, "exceeds the limit");
  ExpectError(Build("{\"a\"", {}), "not valid JSON");
  ExpectError(Build("{", {}), "header is empty");
  ExpectError(Build("[1,2]", {}), "not a JSON object");
  ExpectError(Build(std::string(1000, '[') + std::string(1000, ']'), {}), "nests deeper");
}

TEST(SafetensorsHostile, Entries) {
  auto one = [](Json entry, size_t data_bytes = 16) {
    Json h;
    h["t"] = entry;
    return Build(h.dump(), std::vector<uint8_t>(data_bytes, 1));
  };
  {
    auto f = Parse(one({{"dtype", "I8"}, {"shape", {4}}, {"data_offsets", {0, 4}}}));
    ASSERT_FALSE(f.ok());
    EXPECT_TRUE(absl::IsUnimplemented(f.status()));
    EXPECT_NE(f.status().message().find("dtype I8"), std::string::npos) << f.status();
  }
  ExpectError(one({{"shape", {4}}, {"data_offsets", {0, 16}}}), "'dtype'");
  ExpectError(one({{"dtype", "F32"}, {"data_offsets", {0, 16}}}), "'shape'");
  ExpectError(one({{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0}}}), "data_offsets");
  ExpectError(one({{"dtype", "F32"}, {"shape", {-4}}, {"data_offsets", {0, 16}}}), "non-negative");
  ExpectError(one({{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 17}}}), "outside");
  ExpectError(one({{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {8, 4}}}), "outside");
  ExpectError(one({{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {0, 16}}}), "need 12");
  ExpectError(
      one({{"dtype", "F32"}, {"shape", {1ull << 40, 1ull << 40}}, {"data_offsets", {0, 16}}}),
      "too large");
  ExpectError(one("x"), "not an object");
  Json h;
  h["a"] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}};
  h["b"] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {8, 24}}};
  ExpectError(Build(h.dump(), std::vector<uint8_t>(24, 0)), "overlaps");
  Json m;
  m["__metadata__"] = {{"k", 5}};
  ExpectError(Build(m.dump(), {}), "__metadata__ value of 'k'");
}

TEST(SafetensorsRobustness, TruncationAtEveryOffset) {
  const std::vector<uint8_t> full = ValidFile();
  for (size_t n = 0; n < full.size(); ++n) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + n);
    EXPECT_FALSE(Parse(cut).ok()) << "prefix of " << n << " bytes parsed";
  }
  EXPECT_TRUE(Parse(full).ok());
}

TEST(SafetensorsRobustness, RandomByteFlipsSeed99) {
  const std::vector<uint8_t> full = ValidFile();
  std::mt19937_64 rng(99);
  for (int iter = 0; iter < 5000; ++iter) {
    std::vector<uint8_t> b = full;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) b[rng() % b.size()] = static_cast<uint8_t>(rng());
    auto f = Parse(b);
    if (!f.ok()) continue;
    for (const auto& t : (*f)->tensors()) {
      WeightTensor w = (*f)->View(t);
      volatile uint8_t sink = 0;
      for (size_t i = 0; i < w.nbytes; ++i) sink = sink + w.data[i];
      (void)sink;
    }
  }
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/dmsrt_st_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  void Write(const std::string& name, const std::vector<uint8_t>& b) const {
    std::ofstream(path_ + "/" + name, std::ios::binary)
        .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  }
  void WriteText(const std::string& name, const std::string& s) const {
    std::ofstream(path_ + "/" + name) << s;
  }

 private:
  std::string path_;
};

std::vector<uint8_t> Shard(const std::string& name, float value) {
  Json h;
  h[name] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}};
  return Build(h.dump(), FloatBytes({value, value}));
}

TEST(SafetensorsSet, ShardedIndex) {
  TempDir d;
  d.Write("a.safetensors", Shard("x", 1));
  d.Write("b.safetensors", Shard("y", 2));
  d.Write("unrelated.safetensors", Shard("z", 3));  // not in the index: ignored
  d.WriteText("model.safetensors.index.json",
              R"({"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  auto s = SafetensorsSet::Open(d.path());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->files().size(), 2u);
  EXPECT_TRUE((*s)->Has("x"));
  EXPECT_TRUE((*s)->Has("y"));
  EXPECT_FALSE((*s)->Has("z"));
  EXPECT_EQ(reinterpret_cast<const float*>((*s)->Tensor("y")->data)[0], 2.0f);
  EXPECT_EQ((*s)->names(), (std::vector<std::string>{"x", "y"}));

  d.WriteText("model.safetensors.index.json",
              R"({"weight_map": {"x": "a.safetensors", "w": "b.safetensors"}})");
  auto bad = SafetensorsSet::Open(d.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'w' is listed in weight_map"), std::string::npos)
      << bad.status();
  d.WriteText("model.safetensors.index.json", R"({"weight_map": {"x": "../etc/passwd"}})");
  bad = SafetensorsSet::Open(d.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("invalid file"), std::string::npos) << bad.status();
  d.WriteText("model.safetensors.index.json", R"({"weight_map": {"x": "missing.safetensors"}})");
  bad = SafetensorsSet::Open(d.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("missing.safetensors"), std::string::npos);
}

TEST(SafetensorsSet, GlobWithoutIndexRefusesDuplicates) {
  TempDir d;
  d.Write("p1.safetensors", Shard("x", 1));
  d.Write("p2.safetensors", Shard("y", 2));
  auto s = SafetensorsSet::Open(d.path());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->names().size(), 2u);
  d.Write("p3.safetensors", Shard("x", 3));
  auto dup = SafetensorsSet::Open(d.path());
  ASSERT_FALSE(dup.ok());
  EXPECT_NE(dup.status().message().find("'x' also appears"), std::string::npos) << dup.status();
  TempDir empty;
  EXPECT_TRUE(absl::IsNotFound(SafetensorsSet::Open(empty.path()).status()));
}

}  // namespace
}  // namespace dmsrt
