// Hand-written pre-tokenizers. Each splitter walks one piece of text (code points [0, n)) and
// appends word lengths; positions outside the piece read as "no code point", exactly like the
// bounded lookups of llama.cpp's splitters, so a piece boundary behaves like the end of text.
#include "runtime/tokenizer/pretokenize.h"

#include "absl/strings/str_cat.h"
#include "runtime/tokenizer/unicode.h"

namespace dmsrt {
namespace {

constexpr uint32_t kOutOfRange = 0xFFFFFFFF;

// One piece of text and the output it appends to.
class Piece {
 public:
  Piece(const uint32_t* c, size_t n, std::vector<size_t>* out) : c_(c), n_(n), out_(out) {}

  size_t size() const { return n_; }
  uint32_t Cpt(size_t pos) const { return pos < n_ ? c_[pos] : kOutOfRange; }
  CodepointFlags Flags(size_t pos) const {
    return pos < n_ ? GetCodepointFlags(c_[pos]) : CodepointFlags{};
  }
  // Ends the current word at `end`; returns its length (0 adds nothing).
  size_t Add(size_t end) {
    const size_t len = end - prev_end_;
    if (len > 0) out_->push_back(len);
    prev_end_ = end;
    return len;
  }

 private:
  const uint32_t* c_;
  size_t n_;
  std::vector<size_t>* out_;
  size_t prev_end_ = 0;
};

inline uint32_t AsciiLower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }
inline bool IsCrLf(uint32_t c) { return c == '\r' || c == '\n'; }

// Length of an English contraction starting at pos ('s 't 'm 'd 're 've 'll), 0 if none.
// Case-insensitive when `any_case`. (No non-ASCII code point lower-cases to one of these
// letters, so ASCII folding equals the full Unicode folding llama.cpp uses.)
size_t Contraction(const Piece& p, size_t pos, bool any_case) {
  if (p.Cpt(pos) != '\'' || pos + 1 >= p.size()) return 0;
  auto fold = [&](uint32_t c) { return any_case ? AsciiLower(c) : c; };
  const uint32_t a = fold(p.Cpt(pos + 1));
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (pos + 2 < p.size()) {
    const uint32_t b = fold(p.Cpt(pos + 2));
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  return 0;
}

inline bool IsOther(const CodepointFlags& f) {
  return !(f.is_whitespace() || f.is_letter() || f.is_number()) && f.any();
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
void SplitGpt2(Piece& p) {
  const size_t n = p.size();
  size_t pos = 0;
  while (pos < n) {
    const uint32_t cpt = p.Cpt(pos);
    const CodepointFlags flags = p.Flags(pos);
    if (const size_t c = Contraction(p, pos, /*any_case=*/false)) {
      pos += p.Add(pos + c);
      continue;
    }
    const CodepointFlags f2 = cpt == ' ' ? p.Flags(pos + 1) : flags;
    if (f2.is_letter()) {
      pos += (cpt == ' ');
      while (p.Flags(pos).is_letter()) ++pos;
      p.Add(pos);
      continue;
    }
    if (f2.is_number()) {
      pos += (cpt == ' ');
      while (p.Flags(pos).is_number()) ++pos;
      p.Add(pos);
      continue;
    }
    if (IsOther(f2)) {
      pos += (cpt == ' ');
      while (IsOther(p.Flags(pos))) ++pos;
      p.Add(pos);
      continue;
    }
    size_t num_ws = 0;
    while (p.Flags(pos + num_ws).is_whitespace()) ++num_ws;
    if (num_ws > 1 && p.Cpt(pos + num_ws) != kOutOfRange) {  // \s+(?!\S)
      pos += num_ws - 1;
      p.Add(pos);
      continue;
    }
    if (num_ws > 0) {  // \s+
      pos += num_ws;
      p.Add(pos);
      continue;
    }
    p.Add(++pos);  // no alternative matches: the code point stands alone
  }
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+
void SplitLlama3(Piece& p) {
  const size_t n = p.size();
  size_t pos = 0;
  while (pos < n) {
    const uint32_t cpt = p.Cpt(pos);
    const CodepointFlags flags = p.Flags(pos);
    if (const size_t c = Contraction(p, pos, /*any_case=*/true)) {
      pos += p.Add(pos + c);
      continue;
    }
    if (!(IsCrLf(cpt) || flags.is_number())) {
      if (flags.is_letter() || p.Flags(pos + 1).is_letter()) {
        ++pos;
        while (p.Flags(pos).is_letter()) ++pos;
        p.Add(pos);
        continue;
      }
    }
    if (flags.is_number()) {
      size_t ini = pos;
      while (p.Flags(pos).is_number()) {
        if (++pos - ini >= 3) {
          p.Add(pos);
          ini = pos;
        }
      }
      p.Add(pos);
      continue;
    }
    CodepointFlags f2 = cpt == ' ' ? p.Flags(pos + 1) : flags;
    // The guard tests the first code point's own flags (a lone trailing space qualifies).
    if (!(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && flags.any()) {
      pos += (cpt == ' ');
      while (IsOther(f2)) f2 = p.Flags(++pos);
      while (IsCrLf(p.Cpt(pos))) ++pos;
      p.Add(pos);
      continue;
    }
    size_t num_ws = 0;
    size_t last_end_crlf = 0;
    while (p.Flags(pos + num_ws).is_whitespace()) {
      if (IsCrLf(p.Cpt(pos + num_ws))) last_end_crlf = pos + num_ws + 1;
      ++num_ws;
    }
    if (last_end_crlf > 0) {  // \s*[\r\n]+
      pos = last_end_crlf;
      p.Add(pos);
      continue;
    }
    if (num_ws > 1 && p.Cpt(pos + num_ws) != kOutOfRange) {  // \s+(?!\S)
      pos += num_ws - 1;
      p.Add(pos);
      continue;
    }
    if (num_ws > 0) {
      pos += num_ws;
      p.Add(pos);
      continue;
    }
    p.Add(++pos);
  }
}

// Classes as seen by std::regex on llama.cpp's "collapsed" text: ASCII code points keep their
// C-locale meaning; others become one byte per class (non-ASCII white space -> \v).
struct RegexClass {
  bool s, l, n;
};
inline RegexClass ClassOf(uint32_t c) {
  if (c < 128) {
    const bool s = (c >= 9 && c <= 13) || c == ' ';
    const bool l = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
    const bool n = c >= '0' && c <= '9';
    return {s, l, n};
  }
  const CodepointFlags f = GetCodepointFlags(c);
  if (f.is_whitespace()) return {true, false, false};
  return {false, f.is_letter(), f.is_number()};
}

// Qwen2: (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|
// \p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// Leftmost alternative wins, quantifiers greedy with backtracking; code points no alternative
// matches are gathered into one word per gap (as a regex iterator's unmatched stretches).
void SplitQwen2(const uint32_t* c, size_t n, std::vector<size_t>* out) {
  std::vector<RegexClass> cls(n);
  for (size_t i = 0; i < n; ++i) cls[i] = ClassOf(c[i]);
  auto is_other = [&](size_t i) { return i < n && !cls[i].s && !cls[i].l && !cls[i].n; };
  auto is_l = [&](size_t i) { return i < n && cls[i].l; };
  Piece p(c, n, out);  // for Contraction()
  size_t pos = 0;
  size_t gap_start = 0;
  auto emit = [&](size_t end) {
    if (pos > gap_start) out->push_back(pos - gap_start);  // unmatched stretch
    out->push_back(end - pos);
    pos = end;
    gap_start = end;
  };
  while (pos < n) {
    if (const size_t k = Contraction(p, pos, /*any_case=*/true)) {
      emit(pos + k);
      continue;
    }
    const uint32_t cpt = c[pos];
    if (!cls[pos].l && !cls[pos].n && !IsCrLf(cpt) && is_l(pos + 1)) {
      size_t e = pos + 1;
      while (is_l(e)) ++e;
      emit(e);
      continue;
    }
    if (cls[pos].l) {
      size_t e = pos;
      while (is_l(e)) ++e;
      emit(e);
      continue;
    }
    if (cls[pos].n) {
      emit(pos + 1);
      continue;
    }
    {
      size_t q = (cpt == ' ' && is_other(pos + 1)) ? pos + 1 : pos;
      if (is_other(q)) {
        while (is_other(q)) ++q;
        while (q < n && IsCrLf(c[q])) ++q;
        emit(q);
        continue;
      }
    }
    if (cls[pos].s) {
      size_t e = pos;
      size_t last_crlf_end = 0;
      while (e < n && cls[e].s) {
        if (IsCrLf(c[e])) last_crlf_end = e + 1;
        ++e;
      }
      if (last_crlf_end > 0) {  // \s*[\r\n]+
        emit(last_crlf_end);
      } else if (e == n) {      // \s+(?!\S) at the end of the piece
        emit(e);
      } else if (e - pos >= 2) {
        emit(e - 1);
      } else {                  // \s+
        emit(e);
      }
      continue;
    }
    ++pos;  // unmatched: joins the current gap
  }
  if (pos > gap_start) out->push_back(pos - gap_start);
}

}  // namespace

absl::StatusOr<PreTokenizer> ParsePreTokenizer(std::string_view name) {
  if (name == "gpt2" || name == "gpt-2" || name == "phi-2" || name == "mpt" || name == "olmo") {
    return PreTokenizer::kGpt2;
  }
  if (name == "smollm" || name == "starcoder" || name == "refact" || name == "codeshell" ||
      name == "command-r" || name == "exaone" || name == "minerva-7b") {
    return PreTokenizer::kSmollm;
  }
  if (name == "llama3" || name == "llama-v3" || name == "llama-bpe" || name == "falcon3" ||
      name == "dbrx" || name == "smaug-bpe") {
    return PreTokenizer::kLlama3;
  }
  if (name == "qwen2" || name == "deepseek-r1-qwen" || name == "stablelm2" || name == "megrez") {
    return PreTokenizer::kQwen2;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown pre-tokenizer '", absl::string_view(name.data(), name.size()),
      "' (supported: smollm, gpt2, llama-bpe/llama3, qwen2 and their aliases)"));
}

const char* PreTokenizerName(PreTokenizer p) {
  switch (p) {
    case PreTokenizer::kGpt2: return "gpt2";
    case PreTokenizer::kSmollm: return "smollm";
    case PreTokenizer::kLlama3: return "llama3";
    case PreTokenizer::kQwen2: return "qwen2";
  }
  return "?";
}

std::vector<size_t> PreTokenize(PreTokenizer kind, absl::Span<const uint32_t> cpts) {
  std::vector<size_t> out;
  out.reserve(cpts.size() / 3 + 1);
  const uint32_t* c = cpts.data();
  const size_t n = cpts.size();
  switch (kind) {
    case PreTokenizer::kGpt2: {
      Piece p(c, n, &out);
      SplitGpt2(p);
      break;
    }
    case PreTokenizer::kSmollm: {
      // \p{N} first: each number code point is a piece of its own; the gpt2 pattern then runs
      // inside every piece.
      size_t start = 0;
      while (start < n) {
        size_t end = start;
        if (GetCodepointFlags(c[start]).is_number()) {
          end = start + 1;
        } else {
          while (end < n && !GetCodepointFlags(c[end]).is_number()) ++end;
        }
        Piece p(c + start, end - start, &out);
        SplitGpt2(p);
        start = end;
      }
      break;
    }
    case PreTokenizer::kLlama3: {
      Piece p(c, n, &out);
      SplitLlama3(p);
      break;
    }
    case PreTokenizer::kQwen2:
      SplitQwen2(c, n, &out);
      break;
  }
  return out;
}

std::vector<std::string> PreTokenizeText(PreTokenizer kind, std::string_view text) {
  const std::vector<uint32_t> cpts = DecodeUtf8(text);
  const std::vector<size_t> lens = PreTokenize(kind, cpts);
  std::vector<std::string> words;
  words.reserve(lens.size());
  size_t pos = 0;
  for (size_t len : lens) {
    std::string w;
    for (size_t i = pos; i < pos + len; ++i) AppendUtf8(cpts[i], &w);
    words.push_back(std::move(w));
    pos += len;
  }
  return words;
}

}  // namespace dmsrt
