// Unit tests of the tokenizer stack: byte map, UTF-8 and code point classes, the pre-tokenizers
// of each family, BPE on a small hand-made vocabulary, special-token handling, the streaming
// decoder, chat templates, tokenizer.json loading, and (when the default model is present) a
// few ids and the encoding speed on the real vocabulary. The exhaustive comparison with
// llama.cpp is tests/oracle/test_tokenizer.py.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/pretokenize.h"
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/model/tokenizer_json.h"
#include "runtime/tokenizer/unicode.h"

namespace dmsrt {
namespace {

using Words = std::vector<std::string>;

// ---- byte map, UTF-8, classes -----------------------------------------------------------------

TEST(ByteMap, RoundTripAll256) {
  std::vector<bool> seen(0x200, false);
  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = ByteToCodepoint(static_cast<uint8_t>(b));
    ASSERT_LT(cp, 0x200u);
    EXPECT_FALSE(seen[cp]) << "code point used twice: " << cp;
    seen[cp] = true;
    EXPECT_EQ(CodepointToByte(cp), b);
    std::string utf8;
    AppendUtf8(cp, &utf8);
    EXPECT_EQ(ByteToUtf8(static_cast<uint8_t>(b)), utf8);
  }
  EXPECT_EQ(ByteToCodepoint(' '), 0x120u);   // 'Ġ'
  EXPECT_EQ(ByteToCodepoint('\n'), 0x10Au);  // 'Ċ'
  EXPECT_EQ(ByteToCodepoint('A'), static_cast<uint32_t>('A'));
  EXPECT_EQ(ByteToCodepoint(0xAD), 0x143u);  // the last remapped byte
  EXPECT_EQ(CodepointToByte(0x4E00), -1);
}

TEST(Utf8, InvalidBytesBecomeReplacementCharacters) {
  EXPECT_EQ(DecodeUtf8("a\xC3\xA9"), (std::vector<uint32_t>{'a', 0xE9}));
  EXPECT_EQ(DecodeUtf8("\xC3"), (std::vector<uint32_t>{0xFFFD}));             // truncated
  EXPECT_EQ(DecodeUtf8("\x80z"), (std::vector<uint32_t>{0xFFFD, 'z'}));       // stray
  EXPECT_EQ(DecodeUtf8("\xE6\x97"), (std::vector<uint32_t>{0xFFFD, 0xFFFD}));  // 2 of 3
  EXPECT_EQ(DecodeUtf8("\xF0\x9F\x98\x80"), (std::vector<uint32_t>{0x1F600}));
  EXPECT_EQ(DecodeUtf8("\xFF"), (std::vector<uint32_t>{0xFFFD}));
}

TEST(CodepointFlags, ClassesMatchUnicode151) {
  EXPECT_TRUE(GetCodepointFlags('a').is_letter());
  EXPECT_TRUE(GetCodepointFlags('7').is_number());
  EXPECT_TRUE(GetCodepointFlags(' ').is_whitespace());
  EXPECT_TRUE(GetCodepointFlags(0x3000).is_whitespace());   // ideographic space
  EXPECT_TRUE(GetCodepointFlags(0x85).is_whitespace());
  EXPECT_FALSE(GetCodepointFlags(0x200B).is_whitespace());  // zero width space is Cf
  EXPECT_EQ(GetCodepointFlags(0x301).category, CodepointFlags::kMark);
  EXPECT_TRUE(GetCodepointFlags(0xBD).is_number());         // ½
  EXPECT_TRUE(GetCodepointFlags(0x4E00).is_letter());
  EXPECT_TRUE(GetCodepointFlags(0x31350).is_letter());      // CJK Ext. H (Unicode 15.0)
  EXPECT_TRUE(GetCodepointFlags(0x2EBF0).is_letter());      // CJK Ext. I (Unicode 15.1)
  EXPECT_EQ(GetCodepointFlags(0x1FAE9).category, CodepointFlags::kUndefined);  // Unicode 16
  EXPECT_EQ(GetCodepointFlags(0x110000).category, CodepointFlags::kUndefined);
  EXPECT_EQ(GetCodepointFlags('!').category, CodepointFlags::kPunctuation);
  EXPECT_EQ(GetCodepointFlags('$').category, CodepointFlags::kSymbol);
}

// ---- pre-tokenizers ---------------------------------------------------------------------------

Words Split(PreTokenizer p, const std::string& s) { return PreTokenizeText(p, s); }

TEST(PreTokenize, Gpt2TrickyStrings) {
  const auto p = PreTokenizer::kGpt2;
  EXPECT_EQ(Split(p, "Hello world"), (Words{"Hello", " world"}));
  EXPECT_EQ(Split(p, "a  1"), (Words{"a", " ", " 1"}));
  EXPECT_EQ(Split(p, "abc123"), (Words{"abc", "123"}));
  EXPECT_EQ(Split(p, "HELLO'S it's"), (Words{"HELLO", "'", "S", " it", "'s"}));
  EXPECT_EQ(Split(p, "x\n\ny"), (Words{"x", "\n", "\n", "y"}));
  EXPECT_EQ(Split(p, "\thello"), (Words{"\t", "hello"}));
  EXPECT_EQ(Split(p, "end   "), (Words{"end", "   "}));
  EXPECT_EQ(Split(p, "a != b"), (Words{"a", " !=", " b"}));
}

TEST(PreTokenize, SmollmSplitsEveryDigitFirst) {
  const auto p = PreTokenizer::kSmollm;
  EXPECT_EQ(Split(p, "abc123"), (Words{"abc", "1", "2", "3"}));
  // The digit split makes "a  " a piece of its own, so its trailing spaces stay together.
  EXPECT_EQ(Split(p, "a  1"), (Words{"a", "  ", "1"}));
  EXPECT_EQ(Split(p, "x 42"), (Words{"x", " ", "4", "2"}));
  EXPECT_EQ(Split(p, "\xC2\xBD!"), (Words{"\xC2\xBD", "!"}));  // ½ is \p{N}
  EXPECT_EQ(Split(p, "it's"), (Words{"it", "'s"}));
}

TEST(PreTokenize, Llama3TrickyStrings) {
  const auto p = PreTokenizer::kLlama3;
  EXPECT_EQ(Split(p, "12345"), (Words{"123", "45"}));
  EXPECT_EQ(Split(p, "HELLO'S"), (Words{"HELLO", "'S"}));
  EXPECT_EQ(Split(p, "x\n\ny"), (Words{"x", "\n\n", "y"}));
  EXPECT_EQ(Split(p, "\thello"), (Words{"\thello"}));
  EXPECT_EQ(Split(p, "!!!\n\nabc"), (Words{"!!!\n\n", "abc"}));
  EXPECT_EQ(Split(p, "a  b"), (Words{"a", " ", " b"}));
  EXPECT_EQ(Split(p, "x  \n  y"), (Words{"x", "  \n", " ", " y"}));
}

TEST(PreTokenize, Qwen2TrickyStrings) {
  const auto p = PreTokenizer::kQwen2;
  EXPECT_EQ(Split(p, "12345"), (Words{"1", "2", "3", "4", "5"}));
  EXPECT_EQ(Split(p, "WE'LL go"), (Words{"WE", "'LL", " go"}));
  EXPECT_EQ(Split(p, "x\r\n\r\ny"), (Words{"x", "\r\n\r\n", "y"}));
  EXPECT_EQ(Split(p, ".hidden"), (Words{".hidden"}));
  EXPECT_EQ(Split(p, "end  "), (Words{"end", "  "}));
}

TEST(PreTokenize, PiecesCoverTheInputForEveryFamily) {
  const std::string text = "Mixed 日本語 text, 123 numbers\t\n  and emoji \xF0\x9F\x98\x80!!";
  for (auto p : {PreTokenizer::kGpt2, PreTokenizer::kSmollm, PreTokenizer::kLlama3,
                 PreTokenizer::kQwen2}) {
    std::string joined;
    for (const auto& w : Split(p, text)) {
      EXPECT_FALSE(w.empty()) << PreTokenizerName(p);
      joined += w;
    }
    EXPECT_EQ(joined, text) << PreTokenizerName(p);
  }
}

TEST(PreTokenize, UnknownFamilyIsAnError) {
  auto p = ParsePreTokenizer("nonesuch");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("nonesuch"), std::string::npos);
  EXPECT_TRUE(ParsePreTokenizer("llama-bpe").ok());
  EXPECT_TRUE(ParsePreTokenizer("gpt-2").ok());
}

// ---- BPE on a small vocabulary ----------------------------------------------------------------

// All 256 byte characters, some merges, a control token and a user-defined token.
TokenizerSpec SmallSpec() {
  TokenizerSpec s;
  s.model = "gpt2";
  s.pre = "gpt2";
  for (int b = 0; b < 256; ++b) s.tokens.push_back(ByteToUtf8(static_cast<uint8_t>(b)));
  s.token_types.assign(256, 1);
  auto add = [&](const std::string& t, int type) {
    s.tokens.push_back(t);
    s.token_types.push_back(type);
    return static_cast<int32_t>(s.tokens.size() - 1);
  };
  add("he", 1);        // 256
  add("ll", 1);        // 257
  add("hell", 1);      // 258
  add("hello", 1);     // 259
  add("\xC4\xA0w", 1);  // 260 "Ġw"
  add("<|end|>", 3);   // 261
  add("<tool>", 4);    // 262
  add("<s>", 3);       // 263
  s.merges = {"h e", "l l", "he ll", "hell o", "\xC4\xA0 w"};
  s.bos_id = 263;
  s.eos_id = 261;
  return s;
}

TEST(Bpe, MergesByRank) {
  auto tok = Tokenizer::Create(SmallSpec());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("hello", true, false), (std::vector<int32_t>{259}));
  EXPECT_EQ((*tok)->Encode("hell", true, false), (std::vector<int32_t>{258}));
  EXPECT_EQ((*tok)->Encode("help", true, false), (std::vector<int32_t>{256, 'l', 'p'}));
  EXPECT_EQ((*tok)->Encode("hello world", true, false),
            (std::vector<int32_t>{259, 260, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("hello world", true, false)), "hello world");
}

TEST(Bpe, SpecialTokens) {
  auto tok = Tokenizer::Create(SmallSpec());
  ASSERT_TRUE(tok.ok());
  // Control tokens only with parse_special; user-defined tokens always.
  EXPECT_EQ((*tok)->Encode("a<|end|>b", true, false), (std::vector<int32_t>{'a', 261, 'b'}));
  const auto plain = (*tok)->Encode("a<|end|>b", false, false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 261), 0);
  EXPECT_EQ((*tok)->Decode(plain), "a<|end|>b");
  EXPECT_EQ((*tok)->Encode("x<tool>", false, false), (std::vector<int32_t>{'x', 262}));
  // BOS: prepended once, even when the text already starts with it.
  EXPECT_EQ((*tok)->Encode("a", true, true), (std::vector<int32_t>{263, 'a'}));
  EXPECT_EQ((*tok)->Encode("<s>a", true, true), (std::vector<int32_t>{263, 'a'}));
  EXPECT_EQ((*tok)->Decode({263, 'h', 261}), "<s>h<|end|>");
  EXPECT_TRUE((*tok)->IsEndOfGeneration(261));
  EXPECT_FALSE((*tok)->IsEndOfGeneration(259));
  EXPECT_EQ((*tok)->vocab_size(), 264);
}

TEST(Bpe, CreateRejectsBadSpecs) {
  auto spec = SmallSpec();
  spec.pre = "nonesuch";
  auto t = Tokenizer::Create(spec);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("nonesuch"), std::string::npos);
  spec = SmallSpec();
  spec.model = "llama";
  EXPECT_FALSE(Tokenizer::Create(spec).ok());
  spec = SmallSpec();
  spec.token_types.pop_back();
  EXPECT_FALSE(Tokenizer::Create(spec).ok());
  spec = SmallSpec();
  spec.tokens[260] = spec.tokens[0];  // the same text under two ids
  EXPECT_FALSE(Tokenizer::Create(spec).ok());
  spec = SmallSpec();
  spec.merges.push_back("nospace");
  EXPECT_FALSE(Tokenizer::Create(spec).ok());
}

// ---- streaming decoder ------------------------------------------------------------------------

TEST(StreamDecoder, MultiByteCharacterSplitAcrossTokens) {
  auto tok = Tokenizer::Create(SmallSpec());
  ASSERT_TRUE(tok.ok());
  StreamDecoder d(**tok);
  // "日" = E6 97 A5, one byte token each; then the 4-byte 😀 = F0 9F 98 80.
  EXPECT_EQ(d.Push(0xE6), "");
  EXPECT_EQ(d.Push(0x97), "");
  EXPECT_EQ(d.Push(0xA5), "\xE6\x97\xA5");
  EXPECT_EQ(d.Push('a'), "a");
  EXPECT_EQ(d.Push(0xF0), "");
  EXPECT_EQ(d.Push(0x9F), "");
  EXPECT_EQ(d.Push(0x98), "");
  EXPECT_EQ(d.Push(0x80), "\xF0\x9F\x98\x80");
  EXPECT_EQ(d.Flush(), "");
}

TEST(StreamDecoder, InvalidAndTruncatedBytesBecomeReplacement) {
  auto tok = Tokenizer::Create(SmallSpec());
  ASSERT_TRUE(tok.ok());
  StreamDecoder d(**tok);
  EXPECT_EQ(d.Push(0x80), "\xEF\xBF\xBD");        // stray continuation byte
  EXPECT_EQ(d.Push(0xE6), "");
  EXPECT_EQ(d.Push('x'), "\xEF\xBF\xBDx");        // lead byte cut short by ASCII
  EXPECT_EQ(d.Push(0xE6), "");
  EXPECT_EQ(d.Push(0x97), "");
  EXPECT_EQ(d.Flush(), "\xEF\xBF\xBD");           // incomplete at the end
  EXPECT_EQ(d.Flush(), "");
  EXPECT_EQ(d.Push(259), "hello");
}

// ---- chat templates ---------------------------------------------------------------------------

constexpr char kSmolTemplate[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}";

TEST(ChatTemplate, SmolLmAddsItsDefaultSystemPrompt) {
  TokenizerSpec spec;
  spec.chat_template = kSmolTemplate;
  auto r = ApplyChatTemplate(spec, {{"user", "Hi"}}, true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  r = ApplyChatTemplate(spec, {{"system", "Be brief."}, {"user", "Hi"}}, false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

TEST(ChatTemplate, DefaultSystemIsReadFromTheTemplate) {
  TokenizerSpec spec;
  // Escaped newlines, as a template stored with JSON-style escapes has them.
  spec.chat_template =
      "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
      "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are "
      "Qwen, a model.<|im_end|>\\n' }}{%- endif %}";
  auto r = ApplyChatTemplate(spec, {{"user", "x"}}, false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>system\nYou are Qwen, a model.<|im_end|>\n<|im_start|>user\nx"
                "<|im_end|>\n");
}

TEST(ChatTemplate, ChatMlWithoutDefaultSystem) {
  TokenizerSpec spec;
  spec.chat_template =
      "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content "
      "+ '<|im_end|>\\n' }}{%- endif %}{{- '<|im_start|>assistant\\n' }}";
  auto r = ApplyChatTemplate(spec, {{"user", "q"}, {"assistant", "a"}}, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
                "<|im_start|>assistant\n");
}

TEST(ChatTemplate, Llama3WithBosAndTrim) {
  TokenizerSpec spec;
  spec.tokens = {"<|begin_of_text|>", "x"};
  spec.bos_id = 0;
  spec.chat_template =
      "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
      "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}"
      "{% endfor %}";
  auto r = ApplyChatTemplate(spec, {{"system", "S"}, {"user", "  hi \n"}}, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplate, UnknownOrMissingTemplateIsAnError) {
  TokenizerSpec spec;
  auto r = ApplyChatTemplate(spec, {{"user", "x"}}, true);
  EXPECT_FALSE(r.ok());
  spec.chat_template = "[INST] {{ messages[0]['content'] }} [/INST]";
  r = ApplyChatTemplate(spec, {{"user", "x"}}, true);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("[INST]"), std::string::npos);
}

// ---- tokenizer.json ---------------------------------------------------------------------------

class TokenizerJsonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("dmsrt_tokjson_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }
  std::filesystem::path dir_;
};

TEST_F(TokenizerJsonTest, ReadsVocabMergesAddedTokensAndConfig) {
  Write("tokenizer.json", R"({
    "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true},
                     {"id": 6, "content": "<think>", "special": false}],
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]},
    "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "c": 4},
              "merges": ["a b", ["ab", "c"]]}
  })");
  Write("tokenizer_config.json", R"({"chat_template": "{{ '<|im_start|>' }}",
      "bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"},
      "add_bos_token": false})");
  auto spec = LoadTokenizerJson(dir_.string());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model, "gpt2");
  EXPECT_EQ(spec->pre, "smollm");
  ASSERT_EQ(spec->tokens.size(), 7u);
  EXPECT_EQ(spec->tokens[5], "[PAD5]");
  EXPECT_EQ(spec->token_types, (std::vector<int32_t>{3, 1, 1, 1, 1, 5, 4}));
  EXPECT_EQ(spec->merges, (std::vector<std::string>{"a b", "ab c"}));
  EXPECT_EQ(spec->bos_id, 0);
  EXPECT_EQ(spec->eos_id, 0);
  EXPECT_FALSE(spec->add_bos);
  EXPECT_EQ(spec->chat_template, "{{ '<|im_start|>' }}");
}

TEST_F(TokenizerJsonTest, RecognisesLlama3SplitPattern) {
  Write("tokenizer.json", R"({
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
    "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}]},
    "added_tokens": [{"id": 2, "content": "<|begin_of_text|>", "special": true}],
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}
  })");
  auto spec = LoadTokenizerJson(dir_.string());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->pre, "llama-bpe");
  EXPECT_EQ(spec->bos_id, 2);
  EXPECT_TRUE(spec->add_bos);
}

TEST_F(TokenizerJsonTest, UnsupportedPreTokenizerAndMissingFileAreErrors) {
  EXPECT_FALSE(LoadTokenizerJson(dir_.string()).ok());  // no tokenizer.json
  Write("tokenizer.json", R"({"pre_tokenizer": {"type": "Whitespace"},
      "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  auto spec = LoadTokenizerJson(dir_.string());
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("Whitespace"), std::string::npos);
}

// ---- the default model ------------------------------------------------------------------------

std::string DefaultModel() {
  if (const char* env = std::getenv("DMSRT_MODEL")) return env;
  return std::string(DMSRT_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

TEST(DefaultModel, KnownIdsAndEncodingSpeed) {
  const std::string path = DefaultModel();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not found at " << path;
  auto model = LoadModel(path);
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::Create((*model)->tokenizer);
  ASSERT_TRUE(tok.ok()) << tok.status();
  // Reference ids from llama.cpp for the same text.
  EXPECT_EQ((*tok)->Encode("Hello, world! It's <|im_end|>", true, false),
            (std::vector<int32_t>{19556, 28, 905, 17, 657, 506, 216, 2}));
  EXPECT_TRUE((*tok)->IsEndOfGeneration(2));  // <|im_end|>
  EXPECT_TRUE((*tok)->IsEndOfGeneration(0));  // <|endoftext|>

  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "The quick brown fox jumps over the lazy dog 1234567890 times; "
            "naïve café, 日本語, emoji \xF0\x9F\x98\x80.\n";
  }
  // Warm-up, then the median of 15 timed runs (the machine may be shared).
  std::vector<int32_t> ids = (*tok)->Encode(text, true, false);
  std::vector<double> times;
  for (int rep = 0; rep < 15; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    ids = (*tok)->Encode(text, true, false);
    times.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double ms = times[times.size() / 2];
  std::printf("encode: %zu bytes -> %zu tokens, median %.3f ms (min %.3f, max %.3f; %.1f MB/s)\n",
              text.size(), ids.size(), ms, times.front(), times.back(), text.size() / ms / 1e3);
  EXPECT_EQ((*tok)->Decode(ids), text);
  EXPECT_LT(ms, 250.0) << "encoding a few KB should take milliseconds";
}

}  // namespace
}  // namespace dmsrt
