// Byte sizes on the command line (--kv-budget and friends).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace dmsrt {

// Parses "2GiB", "512MiB", "1.5GB", "100000000" into bytes: B, KB/MB/GB/TB = 10^3.., and
// KiB/MiB/GiB/TiB or K/M/G/T = 2^10.., case-insensitive; INVALID_ARGUMENT with the accepted forms
// otherwise.
absl::StatusOr<int64_t> ParseByteSize(const std::string& text);

}  // namespace dmsrt
