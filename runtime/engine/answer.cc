// Answer extraction and voting (see answer.h). Plain string scanning for \boxed{} and numbers, so
// the default path needs no regex engine; std::regex only for caller patterns.
#include "runtime/engine/answer.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"

namespace dmsrt {

absl::StatusOr<std::shared_ptr<const std::regex>> CompileAnswerRegex(const std::string& pattern) {
  if (pattern.size() > 1024) {
    return absl::InvalidArgumentError("answer regex is longer than 1024 characters: shorten it");
  }
  try {
    return std::make_shared<const std::regex>(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("answer regex '", pattern, "' does not compile (", e.what(),
                     "): use ECMAScript syntax, e.g. 'answer is (\\d+)'"));
  }
}

namespace {

std::string Trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

// True if `s` is [+-]digits[,digits...][.digits].
bool LooksNumeric(const std::string& s) {
  if (s.empty()) return false;
  size_t i = 0;
  if (s[i] == '+' || s[i] == '-') ++i;
  bool digit = false, dot = false;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (std::isdigit(static_cast<unsigned char>(c))) {
      digit = true;
    } else if (c == ',' && !dot) {
    } else if (c == '.' && !dot) {
      dot = true;
    } else {
      return false;
    }
  }
  return digit;
}

}  // namespace

std::string NormalizeAnswer(const std::string& raw) {
  std::string s = Trim(raw);
  while (!s.empty() && (s.back() == '.' || s.back() == '$')) s.pop_back();
  while (!s.empty() && s.front() == '$') s.erase(s.begin());
  s = Trim(s);
  if (!LooksNumeric(s)) return s;
  bool neg = false;
  size_t i = 0;
  if (s[0] == '+' || s[0] == '-') {
    neg = s[0] == '-';
    i = 1;
  }
  std::string digits;
  for (; i < s.size(); ++i) {
    if (s[i] != ',') digits += s[i];
  }
  std::string ip = digits, fp;
  size_t dot = digits.find('.');
  if (dot != std::string::npos) {
    ip = digits.substr(0, dot);
    fp = digits.substr(dot + 1);
  }
  while (!fp.empty() && fp.back() == '0') fp.pop_back();
  size_t nz = ip.find_first_not_of('0');
  ip = nz == std::string::npos ? "0" : ip.substr(nz);
  std::string out = fp.empty() ? ip : ip + "." + fp;
  if (neg && out != "0") out = "-" + out;
  return out;
}

std::optional<std::string> ExtractAnswer(const std::string& text, const std::regex* pattern) {
  if (pattern != nullptr) {
    std::optional<std::string> last;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), *pattern);
         it != std::sregex_iterator(); ++it) {
      const std::smatch& m = *it;
      last = m.size() > 1 && m[1].matched ? m[1].str() : m[0].str();
    }
    if (!last) return std::nullopt;
    std::string a = NormalizeAnswer(*last);
    if (a.empty()) return std::nullopt;
    return a;
  }
  // Last \boxed{...} with balanced braces.
  static const std::string kBoxed = "\\boxed{";
  size_t at = text.rfind(kBoxed);
  while (at != std::string::npos) {
    size_t i = at + kBoxed.size();
    int depth = 1;
    size_t j = i;
    for (; j < text.size() && depth > 0; ++j) {
      if (text[j] == '{') ++depth;
      if (text[j] == '}') --depth;
    }
    if (depth == 0) {
      std::string a = NormalizeAnswer(text.substr(i, j - 1 - i));
      if (!a.empty()) return a;  // an empty \boxed{} (a template echo) is no answer
    }
    if (at == 0) break;
    at = text.rfind(kBoxed, at - 1);
  }
  // Last number: digits with optional thousands separators and decimals.
  std::optional<std::string> last;
  size_t i = 0;
  while (i < text.size()) {
    if (std::isdigit(static_cast<unsigned char>(text[i]))) {
      size_t b = i;
      if (b > 0 && text[b - 1] == '-') --b;
      size_t e = i;
      while (e < text.size()) {
        char c = text[e];
        if (std::isdigit(static_cast<unsigned char>(c))) {
          ++e;
        } else if ((c == ',' || c == '.') && e + 1 < text.size() &&
                   std::isdigit(static_cast<unsigned char>(text[e + 1]))) {
          ++e;
        } else {
          break;
        }
      }
      last = text.substr(b, e - b);
      i = e;
    } else {
      ++i;
    }
  }
  if (!last) return std::nullopt;
  return NormalizeAnswer(*last);
}

void VoteTable::Add(const std::optional<std::string>& answer, double mean_logprob) {
  const int64_t order = finished_++;
  if (!answer) {
    ++abstained_;
    return;
  }
  if (!first_answer_) first_answer_ = *answer;
  for (VoteEntry& e : entries_) {
    if (e.answer == *answer) {
      ++e.votes;
      e.best_mean_logprob = std::max(e.best_mean_logprob, mean_logprob);
      return;
    }
  }
  VoteEntry e;
  e.answer = *answer;
  e.votes = 1;
  e.first_finish_order = order;
  e.best_mean_logprob = mean_logprob;
  entries_.push_back(e);
}

std::vector<VoteEntry> VoteTable::Sorted() const {
  std::vector<VoteEntry> v = entries_;
  std::stable_sort(v.begin(), v.end(), [](const VoteEntry& a, const VoteEntry& b) {
    if (a.votes != b.votes) return a.votes > b.votes;
    return a.first_finish_order < b.first_finish_order;
  });
  return v;
}

std::optional<std::string> VoteTable::Select(Selection how) const {
  if (entries_.empty()) return std::nullopt;
  switch (how) {
    case Selection::kMajorityVote:
      return Sorted().front().answer;
    case Selection::kMaxMeanLogprob: {
      const VoteEntry* best = &entries_.front();
      for (const VoteEntry& e : entries_) {
        if (e.best_mean_logprob > best->best_mean_logprob) best = &e;
      }
      return best->answer;
    }
    case Selection::kFirstFinished:
      return first_answer_;
  }
  return std::nullopt;
}

bool VoteTable::Decided(int64_t still_running) const {
  if (entries_.empty()) return false;
  std::vector<VoteEntry> v = Sorted();
  const int64_t runner_up = v.size() > 1 ? v[1].votes : 0;
  return v[0].votes > runner_up + still_running;
}

}  // namespace dmsrt
