#include "launch/eval/probes.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace dmsrt {

namespace {
constexpr const char* kIntro =
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the pass key.";
constexpr const char* kFiller =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
constexpr const char* kQuestion = "\nWhat is the pass key? The pass key is";

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

std::string PasskeyKey(uint64_t seed, int32_t length, double depth, int32_t digits) {
  uint64_t h = Mix(seed ^ Mix(static_cast<uint64_t>(length) ^
                              Mix(static_cast<uint64_t>(std::llround(depth * 1e6)))));
  std::string key;
  for (int32_t i = 0; i < digits; ++i) {
    h = Mix(h);
    int d = static_cast<int>(h % 10);
    if (i == 0 && d == 0) d = 1 + static_cast<int>((h >> 8) % 9);
    key.push_back(static_cast<char>('0' + d));
  }
  return key;
}

absl::StatusOr<PasskeyPrompt> MakePasskeyPrompt(const Tokenizer& tok, int32_t length,
                                                double depth, const std::string& key) {
  if (!(depth >= 0 && depth <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("passkey depth ", depth, " is not in [0, 1]"));
  }
  const std::vector<int32_t> intro = tok.Encode(kIntro, false, false);
  const std::vector<int32_t> filler = tok.Encode(kFiller, false, false);
  const std::vector<int32_t> needle = tok.Encode(
      absl::StrCat(" The pass key is ", key, ". Remember it. ", key, " is the pass key."), false,
      false);
  const std::vector<int32_t> question = tok.Encode(kQuestion, false, false);
  const int64_t fixed = static_cast<int64_t>(intro.size() + needle.size() + question.size());
  const int64_t hay = length - fixed;  // filler tokens
  if (filler.empty() || hay < static_cast<int64_t>(filler.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a passkey prompt of ", length, " tokens is too short: intro, needle and question take ",
        fixed, " tokens and one filler ", filler.size()));
  }
  // The needle goes after a whole number of fillers, the nearest to depth * hay.
  const int64_t unit = static_cast<int64_t>(filler.size());
  const int64_t units = hay / unit;
  const int64_t before = std::min<int64_t>(units, std::llround(depth * hay / unit));
  PasskeyPrompt p;
  p.key = key;
  p.tokens = intro;
  for (int64_t i = 0; i < before; ++i) p.tokens.insert(p.tokens.end(), filler.begin(), filler.end());
  p.needle_token = static_cast<int32_t>(p.tokens.size());
  p.tokens.insert(p.tokens.end(), needle.begin(), needle.end());
  int64_t left = hay - before * unit;
  while (left > 0) {
    const int64_t take = std::min(left, unit);
    p.tokens.insert(p.tokens.end(), filler.begin(), filler.begin() + take);
    left -= take;
  }
  p.question_token = static_cast<int32_t>(p.tokens.size());
  p.tokens.insert(p.tokens.end(), question.begin(), question.end());
  return p;
}

bool PasskeyCorrect(const std::string& answer, const std::string& key) {
  return !key.empty() && answer.find(key) != std::string::npos;
}

}  // namespace dmsrt
