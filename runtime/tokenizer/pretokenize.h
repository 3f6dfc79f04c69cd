// Pre-tokenization (the "pre-split" before BPE) for the byte-level BPE families we support,
// hand-written instead of regular expressions (std::regex has no \p{L}) and matching llama.cpp
// split for split:
//
//   gpt2     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   smollm   first every single \p{N} is split off, then the gpt2 pattern inside each piece
//            (llama.cpp applies its expressions in sequence, each within the previous pieces)
//   llama3   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//            ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   qwen2    as llama3 but \p{N} (single digits); evaluated with backtracking-regex semantics
//            on llama.cpp's per-code-point classes (ASCII \s is [\t\n\v\f\r ])
//
// Pure functions of their input; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace dmsrt {

enum class PreTokenizer { kGpt2, kSmollm, kLlama3, kQwen2 };

// Maps a GGUF `tokenizer.ggml.pre` name (and the aliases llama.cpp accepts for these families:
// "gpt-2", "llama-bpe", "llama-v3", "deepseek-r1-qwen", "starcoder", ...) to a family.
// Unknown names are an InvalidArgument error that names the value.
absl::StatusOr<PreTokenizer> ParsePreTokenizer(std::string_view name);
const char* PreTokenizerName(PreTokenizer p);

// Splits code points into consecutive words; returns each word's length in code points (the
// lengths add up to cpts.size(); no zero lengths).
std::vector<size_t> PreTokenize(PreTokenizer p, absl::Span<const uint32_t> cpts);

// Convenience: UTF-8 in, UTF-8 words out (invalid bytes become U+FFFD, as in llama.cpp).
std::vector<std::string> PreTokenizeText(PreTokenizer p, std::string_view text);

}  // namespace dmsrt
