// Retrieval probes for `dmsrt eval`: a passkey hidden in a haystack of filler text.
//
// The prompt (after Mohtashami & Jaggi, "Landmark Attention", 2023) is
//   <intro> <filler x n, with the needle inserted at `depth`> <question>
// intro:    "There is an important pass key hidden inside a lot of irrelevant text. Find it and
//            memorize it. I will quiz you about the pass key."
// filler:   " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
//            again."  (repeated; the last repeat is cut at the token level to hit the length)
// needle:   " The pass key is KEY. Remember it. KEY is the pass key."
// question: "\nWhat is the pass key? The pass key is"
// Every piece is tokenized on its own and the ids are concatenated, so the prompt has exactly
// `length` tokens and the needle sits at a filler boundary. The answer is the greedy continuation;
// it is correct when it contains KEY.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

struct PasskeyPrompt {
  std::vector<int32_t> tokens;
  std::string key;
  int32_t needle_token = 0;    // index of the needle's first token
  int32_t question_token = 0;  // index of the question's first token (the haystack ends before it)
};

// A key of `digits` decimal digits (first digit nonzero), a deterministic function of its inputs.
std::string PasskeyKey(uint64_t seed, int32_t length, double depth, int32_t digits);

// INVALID_ARGUMENT when `length` cannot hold the intro, needle and question with one filler.
absl::StatusOr<PasskeyPrompt> MakePasskeyPrompt(const Tokenizer& tok, int32_t length,
                                                double depth, const std::string& key);

// Whether the decoded greedy answer contains the key.
bool PasskeyCorrect(const std::string& answer, const std::string& key);

}  // namespace dmsrt
