#include "launch/byte_size.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dmsrt {

absl::StatusOr<int64_t> ParseByteSize(const std::string& text) {
  const std::string s(absl::StripAsciiWhitespace(text));
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  const std::string number = s.substr(0, i);
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s.substr(i)));
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad byte size '", text, "': ", why,
        " (examples: 2GiB, 512MiB, 1.5GB, 100000000; units B, KB/MB/GB/TB = 10^3.., "
        "KiB/MiB/GiB/TiB or K/M/G/T = 2^10..)"));
  };
  if (number.empty()) return bad("expected a non-negative number");
  if (std::count(number.begin(), number.end(), '.') > 1) return bad("malformed number");
  double value = 0;
  if (!absl::SimpleAtod(number, &value) || !std::isfinite(value) || value < 0) {
    return bad("malformed number");
  }
  double mult = 0;
  if (unit.empty() || unit == "b") {
    mult = 1;
  } else if (unit == "kb") {
    mult = 1e3;
  } else if (unit == "mb") {
    mult = 1e6;
  } else if (unit == "gb") {
    mult = 1e9;
  } else if (unit == "tb") {
    mult = 1e12;
  } else if (unit == "k" || unit == "kib") {
    mult = 1024.0;
  } else if (unit == "m" || unit == "mib") {
    mult = 1024.0 * 1024;
  } else if (unit == "g" || unit == "gib") {
    mult = 1024.0 * 1024 * 1024;
  } else if (unit == "t" || unit == "tib") {
    mult = 1024.0 * 1024 * 1024 * 1024;
  } else {
    return bad(absl::StrCat("unknown unit '", unit, "'"));
  }
  if (mult == 1 && number.find('.') != std::string::npos) {
    return bad("a plain byte count must be a whole number (fractions of free memory are not "
               "accepted here)");
  }
  const double bytes = std::floor(value * mult);
  if (bytes >= 9.2e18) return bad("too large");
  return static_cast<int64_t>(bytes);
}

}  // namespace dmsrt
