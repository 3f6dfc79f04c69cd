// Byte sizes on the command line (launch/byte_size.h).
#include "launch/byte_size.h"

#include <gtest/gtest.h>

namespace dmsrt {
namespace {

TEST(ByteSize, ParsesUnitsAndRefusesMalformed) {
  EXPECT_EQ(*ParseByteSize("2GiB"), 2ll << 30);
  EXPECT_EQ(*ParseByteSize("512MiB"), 512ll << 20);
  EXPECT_EQ(*ParseByteSize("1.5GB"), 1500000000ll);
  EXPECT_EQ(*ParseByteSize("100000"), 100000);
  EXPECT_EQ(*ParseByteSize("100000000"), 100000000);
  EXPECT_EQ(*ParseByteSize("64 KiB"), 65536);
  EXPECT_EQ(*ParseByteSize("8G"), 8ll << 30);
  EXPECT_EQ(*ParseByteSize("3kb"), 3000);
  EXPECT_EQ(*ParseByteSize("7B"), 7);
  for (const char* bad : {"0.5", "-1", "", "GiB", "abc", "1.2.3GB", "12XB", "-2GiB", "1e3",
                          "99999999999999999999999"}) {
    EXPECT_EQ(ParseByteSize(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace dmsrt
