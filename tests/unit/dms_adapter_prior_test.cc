// The calibrated eviction rate of a DMS adapter file: AttachDmsAdapter reads the metadata key
// `dms_eviction_rate` into DmsConfig::expected_eviction_rate (budget mode's prior for a replica
// that has not yet observed its own rate), leaves it at 0 when the key is absent, and refuses a
// value that is not a share in [0, 1) without touching the model.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/model/model.h"

namespace dmsrt {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

class AdapterPrior : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system("python3 -c 'import gguf, numpy' >/dev/null 2>&1") != 0) {
      skip_reason_ = "python3 with the gguf and numpy packages is not available";
      return;
    }
    char tmpl[] = "/tmp/dmsrt_adapter_prior_XXXXXX";
    dir_ = mkdtemp(tmpl);
    const std::string cmd = "python3 " + std::string(DMSRT_SOURCE_DIR) +
                            "/tests/fixtures/make_tiny_model.py --out " + dir_ +
                            "/m --arch qwen3 --format hf --dms-window 12 --dms-variant B "
                            "--dms-adapter-file >/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      skip_reason_ = "make_tiny_model.py failed";
      FAIL() << "make_tiny_model.py failed: " << cmd;
    }
  }
  static void TearDownTestSuite() {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }

  // A copy of the fixture's adapter whose metadata has `dms_eviction_rate` = `rate` (a string, as
  // safetensors metadata values are), or no such key when `rate` is empty.
  static std::string AdapterWithRate(const std::string& name, const std::string& rate) {
    std::ifstream in(dir_ + "/m/dms_adapter.safetensors", std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    Json h = Json::parse(std::string(bytes.data() + 8, n));
    if (rate.empty()) {
      h["__metadata__"].erase("dms_eviction_rate");
    } else {
      h["__metadata__"]["dms_eviction_rate"] = rate;
    }
    std::string header = h.dump();
    header.append((8 - header.size() % 8) % 8, ' ');
    const uint64_t m = header.size();
    const std::string path = dir_ + "/" + name + ".safetensors";
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(&m), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(bytes.data() + 8 + n, static_cast<std::streamsize>(bytes.size() - 8 - n));
    return path;
  }

  static std::unique_ptr<Model> Load() {
    auto m = LoadModel(dir_ + "/m");
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }

  static inline std::string dir_;
  static inline std::string skip_reason_;
};

TEST_F(AdapterPrior, ReadsTheCalibratedRate) {
  auto m = Load();
  ASSERT_TRUE(m);
  absl::Status s = AttachDmsAdapter(*m, AdapterWithRate("rated", "0.87"));
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(m->config.dms.enabled);
  EXPECT_EQ(m->config.dms.window, 12);
  EXPECT_DOUBLE_EQ(m->config.dms.expected_eviction_rate, 0.87);
}

TEST_F(AdapterPrior, AbsentKeyLeavesZero) {
  auto m = Load();
  ASSERT_TRUE(m);
  absl::Status s = AttachDmsAdapter(*m, AdapterWithRate("unrated", ""));
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(m->config.dms.enabled);
  EXPECT_DOUBLE_EQ(m->config.dms.expected_eviction_rate, 0.0);
}

TEST_F(AdapterPrior, RefusesARateOutsideZeroToOne) {
  for (const std::string& bad : {"1.0", "1.5", "-0.1", "high"}) {
    auto m = Load();
    ASSERT_TRUE(m);
    absl::Status s = AttachDmsAdapter(*m, AdapterWithRate("bad", bad));
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(std::string(s.message()).find("dms_eviction_rate"), std::string::npos) << s;
    EXPECT_FALSE(m->config.dms.enabled) << bad;
    EXPECT_FALSE(m->weights.layers[0].dms_alpha.present()) << bad;
  }
}

}  // namespace
}  // namespace dmsrt
