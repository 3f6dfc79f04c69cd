// Byte-level BPE (GPT-2 family) with llama.cpp's exact behaviour, the streaming detokenizer, and
// chat-template rendering.
//
// Encoding = (1) split the text at special tokens (longest first, as llama.cpp's partition
// does), (2) pre-tokenize each raw piece into words (runtime/tokenizer/pretokenize.h), (3) run BPE merges
// on each word's bytes. Merging works on interned symbol ids: every string that occurs in a merge
// rule gets an id, and a rule is a (left id, right id) -> (rank, result id) hash lookup, so the
// inner loop never builds strings. The lowest rank merges first, ties to the leftmost pair, with
// a priority queue and lazy invalidation (llama.cpp's algorithm; same results on every input).
#include "runtime/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "runtime/tokenizer/pretokenize.h"
#include "runtime/tokenizer/unicode.h"

namespace dmsrt {
namespace {

constexpr int32_t kTypeNormal = 1;
constexpr int32_t kTypeUnknown = 2;
constexpr int32_t kTypeControl = 3;
constexpr int32_t kTypeUserDefined = 4;

// Texts llama.cpp treats as end of generation whatever the metadata says.
constexpr const char* kEndOfGenerationTexts[] = {
    "<|eot_id|>", "<|im_end|>",     "<|end|>",         "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_utterance>",
};

// Encoded text of raw bytes in the GPT-2 byte alphabet.
std::string ByteEncode(std::string_view raw) {
  std::string out;
  out.reserve(raw.size() * 2);
  for (unsigned char b : raw) out += ByteToUtf8(b);
  return out;
}

class BpeTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(const TokenizerSpec& spec);

  std::vector<int32_t> Encode(std::string_view text, bool parse_special,
                              bool add_bos) const override;
  std::string Decode(absl::Span<const int32_t> ids) const override;
  std::string TokenBytes(int32_t id) const override {
    return (id >= 0 && id < vocab_size()) ? decoded_[id] : std::string();
  }
  bool IsEndOfGeneration(int32_t id) const override { return eog_.contains(id); }
  int32_t vocab_size() const override { return static_cast<int32_t>(tokens_.size()); }

 private:
  struct Merge {
    int32_t rank;
    int32_t result;  // symbol id of left+right
  };
  struct Fragment {
    size_t offset, length;  // raw text, when token < 0
    int32_t token;
  };

  int32_t Intern(const std::string& s) {
    auto [it, inserted] = symbol_ids_.emplace(s, static_cast<int32_t>(symbol_token_.size()));
    if (inserted) symbol_token_.push_back(-1);
    return it->second;
  }
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  int32_t LookupToken(std::string_view text) const {
    auto it = token_to_id_.find(absl::string_view(text.data(), text.size()));
    return it == token_to_id_.end() ? -1 : it->second;
  }

  // Build's parts, in order.
  static absl::StatusOr<PreTokenizer> CheckSpec(const TokenizerSpec& spec);
  absl::Status SetVocabulary(const TokenizerSpec& spec);
  absl::Status SetMerges(const std::vector<std::string>& merges);
  void SetDecodedBytes();
  void SetEndOfGeneration(const TokenizerSpec& spec);

  std::vector<Fragment> Partition(std::string_view text, bool parse_special) const;
  void EncodeRaw(std::string_view raw, std::vector<int32_t>* out) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

  PreTokenizer pre_ = PreTokenizer::kGpt2;
  bool ignore_merges_ = false;  // a whole word that is a token is taken as is (llama3)
  std::vector<std::string> tokens_;
  std::vector<int32_t> types_;
  std::vector<std::string> decoded_;  // id -> raw bytes
  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  absl::flat_hash_map<std::string, int32_t> symbol_ids_;
  std::vector<int32_t> symbol_token_;    // symbol id -> token id or -1
  std::array<int32_t, 256> byte_symbol_;  // raw byte -> symbol id of its encoded char, or -1
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::vector<int32_t> specials_;  // matched before BPE, longest text first
  absl::flat_hash_set<int32_t> eog_;
  int32_t bos_id_ = -1;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> BpeTokenizer::Build(const TokenizerSpec& spec) {
  auto pre = CheckSpec(spec);
  if (!pre.ok()) return pre.status();
  auto t = std::make_unique<BpeTokenizer>();
  t->pre_ = *pre;
  t->ignore_merges_ = (*pre == PreTokenizer::kLlama3);
  t->bos_id_ = spec.bos_id;
  if (absl::Status s = t->SetVocabulary(spec); !s.ok()) return s;
  if (absl::Status s = t->SetMerges(spec.merges); !s.ok()) return s;
  t->SetDecodedBytes();
  t->SetEndOfGeneration(spec);
  return std::unique_ptr<Tokenizer>(std::move(t));
}

absl::StatusOr<PreTokenizer> BpeTokenizer::CheckSpec(const TokenizerSpec& spec) {
  if (spec.model != "gpt2") {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported tokenizer model '", spec.model, "' (only byte-level BPE, 'gpt2', is)"));
  }
  auto pre = ParsePreTokenizer(spec.pre);
  if (!pre.ok()) return pre.status();
  if (spec.tokens.empty()) return absl::InvalidArgumentError("tokenizer has an empty vocabulary");
  if (!spec.token_types.empty() && spec.token_types.size() != spec.tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", spec.tokens.size(),
                                                   " tokens but ", spec.token_types.size(),
                                                   " token types"));
  }
  if (spec.merges.empty()) return absl::InvalidArgumentError("tokenizer has no BPE merges");
  const int32_t n = static_cast<int32_t>(spec.tokens.size());
  for (int32_t id : {spec.bos_id, spec.eos_id}) {
    if (id < -1 || id >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("special token id ", id, " is outside the vocabulary of ", n));
    }
  }
  return *pre;
}

// Tokens, their types and the text -> id map.
absl::Status BpeTokenizer::SetVocabulary(const TokenizerSpec& spec) {
  const int32_t n = static_cast<int32_t>(spec.tokens.size());
  tokens_ = spec.tokens;
  types_ = spec.token_types;
  if (types_.empty()) types_.assign(n, kTypeNormal);
  token_to_id_.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    if (tokens_[i].empty()) tokens_[i] = absl::StrCat("[EMPTY_", i, "]");
    auto [it, inserted] = token_to_id_.emplace(tokens_[i], i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate token '", tokens_[i],
                                                     "' in the vocabulary: ids ", it->second,
                                                     " and ", i));
    }
  }

  // End-of-turn markers are control tokens whatever the file says (llama.cpp overrides a
  // mislabelled type the same way), so they render verbatim and parse only as specials.
  for (const char* text : kEndOfGenerationTexts) {
    const int32_t id = LookupToken(text);
    if (id >= 0) types_[id] = kTypeControl;
  }
  return absl::OkStatus();
}

// Merge rules "left right" (the separator is the first space after the first byte); the
// first occurrence of a pair sets its rank.
absl::Status BpeTokenizer::SetMerges(const std::vector<std::string>& merges) {
  merges_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string& m = merges[r];
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("BPE merge ", r, " ('", m, "') has no space between its two parts"));
    }
    const std::string left = m.substr(0, sp), right = m.substr(sp + 1);
    const int32_t a = Intern(left), b = Intern(right);
    const int32_t c = Intern(left + right);
    merges_.emplace(PairKey(a, b), Merge{static_cast<int32_t>(r), c});
  }
  for (const auto& [text, sym] : symbol_ids_) symbol_token_[sym] = LookupToken(text);
  for (int b = 0; b < 256; ++b) {
    auto it = symbol_ids_.find(ByteToUtf8(static_cast<uint8_t>(b)));
    byte_symbol_[b] = it == symbol_ids_.end() ? -1 : it->second;
  }
  return absl::OkStatus();
}

// Raw bytes of every token: control/user-defined/unknown tokens are their text; the others
// are GPT-2 byte-alphabet text mapped back to bytes. The former are the specials, longest first.
void BpeTokenizer::SetDecodedBytes() {
  const int32_t n = vocab_size();
  decoded_.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t type = types_[i];
    if (type == kTypeControl || type == kTypeUserDefined || type == kTypeUnknown) {
      decoded_[i] = tokens_[i];
      specials_.push_back(i);
      continue;
    }
    std::string& out = decoded_[i];
    for (uint32_t cp : DecodeUtf8(tokens_[i])) {
      const int b = CodepointToByte(cp);
      if (b >= 0) {
        out.push_back(static_cast<char>(b));
      } else {
        AppendUtf8(cp, &out);
      }
    }
  }
  std::stable_sort(specials_.begin(), specials_.end(), [&](int32_t a, int32_t b) {
    return tokens_[a].size() > tokens_[b].size();
  });
}

// eos, every listed end id, and the texts llama.cpp always treats as end of generation.
void BpeTokenizer::SetEndOfGeneration(const TokenizerSpec& spec) {
  const int32_t n = vocab_size();
  if (spec.eos_id >= 0) eog_.insert(spec.eos_id);
  for (int32_t id : spec.eos_ids) {
    if (id >= 0 && id < n) eog_.insert(id);
  }
  for (const char* text : kEndOfGenerationTexts) {
    const int32_t id = LookupToken(text);
    if (id >= 0) eog_.insert(id);
  }
}

// Splits text at special tokens: for each special token, longest first, every occurrence in
// every still-raw fragment becomes a token fragment. Control and unknown tokens only count when
// parse_special; user-defined tokens always do (llama.cpp and HF tokenizers agree on this).
std::vector<BpeTokenizer::Fragment> BpeTokenizer::Partition(std::string_view text,
                                                            bool parse_special) const {
  std::vector<Fragment> frags;
  if (text.empty()) return frags;
  frags.push_back({0, text.size(), -1});
  std::vector<Fragment> next;
  for (int32_t id : specials_) {
    const int32_t type = types_[id];
    if (!parse_special && (type == kTypeControl || type == kTypeUnknown)) continue;
    const std::string& tok = tokens_[id];
    bool any = false;
    next.clear();
    for (const Fragment& f : frags) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      size_t start = f.offset;
      const size_t end = f.offset + f.length;
      while (start < end) {
        const size_t m = text.substr(0, end).find(tok, start);
        if (m == std::string_view::npos) break;
        any = true;
        if (m > start) next.push_back({start, m - start, -1});
        next.push_back({0, 0, id});
        start = m + tok.size();
      }
      if (start < end) next.push_back({start, end - start, -1});
    }
    if (any) frags.swap(next);
  }
  return frags;
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool parse_special,
                                          bool add_bos) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && bos_id_ >= 0) out.push_back(bos_id_);
  for (const Fragment& f : Partition(text, parse_special)) {
    if (f.token >= 0) {
      // A prompt that already starts with BOS (a rendered chat template) keeps just one.
      if (!(add_bos && out.size() == 1 && f.token == bos_id_ && out[0] == bos_id_)) {
        out.push_back(f.token);
      }
      continue;
    }
    EncodeRaw(text.substr(f.offset, f.length), &out);
  }
  return out;
}

void BpeTokenizer::EncodeRaw(std::string_view raw, std::vector<int32_t>* out) const {
  const std::vector<uint32_t> cpts = DecodeUtf8(raw);
  const std::vector<size_t> lens = PreTokenize(pre_, cpts);
  std::string word;
  size_t pos = 0;
  for (size_t len : lens) {
    word.clear();
    for (size_t i = pos; i < pos + len; ++i) AppendUtf8(cpts[i], &word);
    pos += len;
    EncodeWord(word, out);
  }
}

void BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (ignore_merges_) {
    const int32_t id = LookupToken(ByteEncode(word));
    if (id >= 0) {
      out->push_back(id);
      return;
    }
  }
  // One symbol per byte (each byte is one character of the encoded word).
  struct Symbol {
    int32_t sym;     // symbol id, -1 when it takes part in no merge rule
    int32_t prev, next;
    uint32_t start, len;  // raw bytes [start, start + len); len 0 once merged away
  };
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> syms(n);
  for (int32_t i = 0; i < n; ++i) {
    syms[i] = {byte_symbol_[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1,
               static_cast<uint32_t>(i), 1};
  }
  struct Bigram {
    int32_t rank, left, right, left_sym, right_sym, result;
  };
  auto worse = [](const Bigram& a, const Bigram& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(worse)> queue(worse);
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0 || syms[l].sym < 0 || syms[r].sym < 0) return;
    auto it = merges_.find(PairKey(syms[l].sym, syms[r].sym));
    if (it == merges_.end()) return;
    queue.push({it->second.rank, l, r, syms[l].sym, syms[r].sym, it->second.result});
  };
  for (int32_t i = 1; i < n; ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Bigram bg = queue.top();
    queue.pop();
    Symbol& l = syms[bg.left];
    Symbol& r = syms[bg.right];
    // Stale entries: either side merged since the pair was queued.
    if (l.len == 0 || r.len == 0 || l.sym != bg.left_sym || r.sym != bg.right_sym) continue;
    l.sym = bg.result;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = bg.left;
    try_add(l.prev, bg.left);
    try_add(bg.left, l.next);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = syms[i].next) {
    const Symbol& s = syms[i];
    int32_t id = s.sym >= 0 ? symbol_token_[s.sym] : -1;
    if (id < 0) {
      const std::string enc = ByteEncode(word.substr(s.start, s.len));
      id = LookupToken(enc);
      if (id < 0) {
        // llama.cpp's last resort: single bytes of the encoded text that are tokens.
        for (char c : enc) {
          const int32_t b = LookupToken(std::string_view(&c, 1));
          if (b >= 0) out->push_back(b);
        }
        continue;
      }
    }
    out->push_back(id);
  }
}

std::string BpeTokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && id < vocab_size()) out += decoded_[id];
  }
  return out;
}

// ---- chat templates -------------------------------------------------------------------------

// Reads the constant default system prompt of a ChatML template: a string literal
// '<|im_start|>system\n' + TEXT + '<|im_end|>' where TEXT has no expression in it. Returns
// false when the template has none (the system turn is then built from a message).
bool FindDefaultSystem(const std::string& tmpl, std::string* text) {
  static const std::string kHead = "<|im_start|>system";
  static const std::string kEnd = "<|im_end|>";
  for (size_t at = tmpl.find(kHead); at != std::string::npos; at = tmpl.find(kHead, at + 1)) {
    size_t p = at + kHead.size();
    if (tmpl.compare(p, 1, "\n") == 0) {
      p += 1;
    } else if (tmpl.compare(p, 2, "\\n") == 0) {
      p += 2;
    } else {
      continue;
    }
    std::string body;
    bool ok = false;
    while (p < tmpl.size()) {
      if (tmpl.compare(p, kEnd.size(), kEnd) == 0) {
        ok = !body.empty();
        break;
      }
      const char c = tmpl[p];
      if (c == '\'' || c == '"' || tmpl.compare(p, 2, "{{") == 0 ||
          tmpl.compare(p, 2, "{%") == 0) {
        break;  // the literal ends: the system text is an expression
      }
      if (c == '\\' && p + 1 < tmpl.size()) {
        const char e = tmpl[p + 1];
        body.push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e);
        p += 2;
        continue;
      }
      body.push_back(c);
      ++p;
    }
    if (ok) {
      *text = body;
      return true;
    }
  }
  return false;
}

// Jinja's `trim`: strips leading and trailing white space (Python's str.strip()).
std::string Trim(const std::string& s) {
  const std::vector<uint32_t> cpts = DecodeUtf8(s);
  auto is_space = [](uint32_t c) {
    return GetCodepointFlags(c).is_whitespace() || (c >= 0x1C && c <= 0x1F);
  };
  size_t b = 0, e = cpts.size();
  while (b < e && is_space(cpts[b])) ++b;
  while (e > b && is_space(cpts[e - 1])) --e;
  std::string out;
  for (size_t i = b; i < e; ++i) AppendUtf8(cpts[i], &out);
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Create(const TokenizerSpec& spec) {
  return BpeTokenizer::Build(spec);
}

// ---- StreamDecoder --------------------------------------------------------------------------

namespace {

// Moves the complete UTF-8 characters at the front of `pending` to the result; invalid bytes
// become U+FFFD. With `flush`, an incomplete tail becomes one U+FFFD too; otherwise it stays.
std::string TakeComplete(std::string* pending, bool flush) {
  std::string out;
  const auto* s = reinterpret_cast<const uint8_t*>(pending->data());
  const size_t n = pending->size();
  size_t i = 0;
  static const char kReplacement[] = "\xEF\xBF\xBD";
  while (i < n) {
    const uint8_t b = s[i];
    int len = 0;
    if (b < 0x80) len = 1;
    else if (b >= 0xC2 && b <= 0xDF) len = 2;
    else if (b >= 0xE0 && b <= 0xEF) len = 3;
    else if (b >= 0xF0 && b <= 0xF4) len = 4;
    if (len == 0) {  // stray continuation byte or impossible lead
      out += kReplacement;
      ++i;
      continue;
    }
    size_t have = 1;
    while (have < static_cast<size_t>(len) && i + have < n && (s[i + have] & 0xC0) == 0x80) {
      ++have;
    }
    if (have == static_cast<size_t>(len)) {
      out.append(pending->data() + i, len);
      i += len;
    } else if (i + have == n && !flush) {
      break;  // incomplete character at the end: wait for more bytes
    } else {
      out += kReplacement;  // truncated sequence
      i += have;
    }
  }
  pending->erase(0, i);
  return out;
}

}  // namespace

std::string StreamDecoder::Push(int32_t id) {
  pending_ += tok_.TokenBytes(id);
  return TakeComplete(&pending_, /*flush=*/false);
}

std::string StreamDecoder::Flush() { return TakeComplete(&pending_, /*flush=*/true); }

// ---- ApplyChatTemplate ----------------------------------------------------------------------

absl::StatusOr<std::string> ApplyChatTemplate(const TokenizerSpec& spec,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt) {
  const std::string& tmpl = spec.chat_template;
  if (tmpl.empty()) {
    return absl::FailedPreconditionError("the model has no chat template");
  }
  if (tmpl.find("<|im_start|>") != std::string::npos) {
    // ChatML (SmolLM2, Qwen2/2.5/3).
    std::string out;
    std::string default_system;
    bool has_default = FindDefaultSystem(tmpl, &default_system);
    if (!has_default && tmpl.find("named SmolLM") != std::string::npos) {
      // Fallback for a SmolLM template whose literal could not be read.
      default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
      has_default = true;
    }
    if (has_default && !messages.empty() && messages[0].role != "system") {
      absl::StrAppend(&out, "<|im_start|>system\n", default_system, "<|im_end|>\n");
    }
    for (const ChatMessage& m : messages) {
      absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
    }
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  if (tmpl.find("<|start_header_id|>") != std::string::npos &&
      tmpl.find("<|end_header_id|>") != std::string::npos) {
    // Llama-3: BOS, then header-delimited turns, each closed by <|eot_id|>.
    const bool trim = tmpl.find("trim") != std::string::npos;
    // BOS opens the first turn (the template adds it with the first message).
    std::string out;
    if (!messages.empty()) {
      if (spec.bos_id >= 0 && spec.bos_id < static_cast<int32_t>(spec.tokens.size())) {
        out = spec.tokens[spec.bos_id];
      } else {
        out = "<|begin_of_text|>";
      }
    }
    for (const ChatMessage& m : messages) {
      absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n",
                      trim ? Trim(m.content) : m.content, "<|eot_id|>");
    }
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
    return out;
  }
  std::string head = tmpl.substr(0, 120);
  for (char& c : head) {
    if (c == '\n') c = ' ';
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unrecognised chat template (expected ChatML '<|im_start|>' or Llama-3 "
      "'<|start_header_id|>' turns); it begins: ",
      head, tmpl.size() > head.size() ? "..." : ""));
}

}  // namespace dmsrt
