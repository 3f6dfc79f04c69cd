// Unicode helpers: code point classes from the generated range table (with a flat table for the
// Basic Multilingual Plane, where almost all text lives), llama.cpp-compatible UTF-8 decoding,
// and the GPT-2 byte <-> code point map.
#include "runtime/tokenizer/unicode.h"

#include <algorithm>
#include <array>

namespace dmsrt {
namespace {

using unicode_internal::kCodepointRanges;
using unicode_internal::kNumCodepointRanges;

constexpr uint32_t kMaxCodepoint = 0x110000;
constexpr uint32_t kBmpSize = 0x10000;
constexpr uint8_t kWhitespaceBit = 0x01;  // in the flat table's second byte

uint8_t CategoryFromRanges(uint32_t cp) {
  if (cp >= kMaxCodepoint) return CodepointFlags::kUndefined;
  // Last range whose start is <= cp.
  const auto* end = kCodepointRanges + kNumCodepointRanges;
  const auto* it = std::upper_bound(
      kCodepointRanges, end, cp,
      [](uint32_t v, const unicode_internal::CodepointRange& r) { return v < r.start; });
  return (it - 1)->flags;
}

bool IsWhitespaceSlow(uint32_t cp) {
  for (int i = 0; i < unicode_internal::kNumWhitespace; ++i) {
    if (unicode_internal::kWhitespace[i] == cp) return true;
  }
  return false;
}

// [kBmpSize][2]: category, whitespace bit. Built once on first use.
struct BmpTable {
  std::vector<std::array<uint8_t, 2>> entries;
  BmpTable() : entries(kBmpSize) {
    int r = 0;
    for (uint32_t cp = 0; cp < kBmpSize; ++cp) {
      while (r + 1 < kNumCodepointRanges && kCodepointRanges[r + 1].start <= cp) ++r;
      entries[cp][0] = kCodepointRanges[r].flags;
      entries[cp][1] = 0;
    }
    for (int i = 0; i < unicode_internal::kNumWhitespace; ++i) {
      const uint32_t cp = unicode_internal::kWhitespace[i];
      if (cp < kBmpSize) entries[cp][1] = kWhitespaceBit;
    }
  }
};

const BmpTable& Bmp() {
  static const BmpTable* table = new BmpTable();
  return *table;
}

struct ByteMaps {
  std::array<uint32_t, 256> byte_to_cp;
  std::array<std::string, 256> byte_to_utf8;
  std::vector<int16_t> cp_to_byte;  // [0x200] (all mapped code points are below U+0144)
  ByteMaps() : cp_to_byte(0x200, -1) {
    // Printable Latin-1 bytes map to themselves; the others (controls, space, 0x7F-0xA0, 0xAD)
    // take the code points from U+0100 upwards, in byte order.
    std::array<bool, 256> direct{};
    for (int b = 0x21; b <= 0x7E; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    uint32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      byte_to_cp[b] = direct[b] ? static_cast<uint32_t>(b) : next++;
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
      AppendUtf8(byte_to_cp[b], &byte_to_utf8[b]);
    }
  }
};

const ByteMaps& Bytes() {
  static const ByteMaps* maps = new ByteMaps();
  return *maps;
}

inline bool IsContinuation(uint8_t b) { return (b & 0xC0) == 0x80; }

}  // namespace

CodepointFlags GetCodepointFlags(uint32_t cp) {
  CodepointFlags f;
  if (cp < kBmpSize) {
    const auto& e = Bmp().entries[cp];
    f.category = e[0];
    f.whitespace = e[1] & kWhitespaceBit;
    return f;
  }
  f.category = CategoryFromRanges(cp);
  f.whitespace = IsWhitespaceSlow(cp);
  return f;
}

std::vector<uint32_t> DecodeUtf8(std::string_view text) {
  std::vector<uint32_t> out;
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t b0 = s[i];
    if (!(b0 & 0x80)) {
      out.push_back(b0);
      i += 1;
      continue;
    }
    if ((b0 & 0x40) && !(b0 & 0x20)) {
      if (i + 1 < n && IsContinuation(s[i + 1])) {
        out.push_back(((b0 & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu));
        i += 2;
        continue;
      }
    } else if ((b0 & 0x40) && !(b0 & 0x10)) {
      if (i + 2 < n && IsContinuation(s[i + 1]) && IsContinuation(s[i + 2])) {
        out.push_back(((b0 & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu));
        i += 3;
        continue;
      }
    } else if ((b0 & 0x40) && !(b0 & 0x08)) {
      if (i + 3 < n && IsContinuation(s[i + 1]) && IsContinuation(s[i + 2]) &&
          IsContinuation(s[i + 3])) {
        out.push_back(((b0 & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) |
                      ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu));
        i += 4;
        continue;
      }
    }
    // Not a well-formed sequence start: one replacement character per offending byte.
    out.push_back(0xFFFD);
    i += 1;
  }
  return out;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp <= 0x7F) {
    out->push_back(static_cast<char>(cp));
  } else if (cp <= 0x7FF) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp <= 0xFFFF) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp <= 0x10FFFF) {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    AppendUtf8(0xFFFD, out);
  }
}

int Utf8SequenceLength(uint8_t lead) {
  static constexpr int kLengths[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLengths[lead >> 4];
}

uint32_t ByteToCodepoint(uint8_t b) { return Bytes().byte_to_cp[b]; }

int CodepointToByte(uint32_t cp) {
  const auto& m = Bytes().cp_to_byte;
  return cp < m.size() ? m[cp] : -1;
}

const std::string& ByteToUtf8(uint8_t b) { return Bytes().byte_to_utf8[b]; }

}  // namespace dmsrt
