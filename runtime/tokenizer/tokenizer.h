// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama-3, Qwen2/3), chat templates, and a
// streaming detokenizer that never emits half a UTF-8 character.
//
// Built from a TokenizerSpec (GGUF `tokenizer.ggml.*` or tokenizer.json). Immutable after
// creation and safe to share between threads; StreamDecoder is per sequence.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/model/model.h"

namespace dmsrt {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Fails with a message naming the problem (unknown model or pre-tokenizer, bad merges ...).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(const TokenizerSpec& spec);

  // parse_special: text such as "<|im_start|>" becomes its special token (as llama.cpp's
  // `parse_special=true`); otherwise it is tokenized as plain text. add_bos: prepend BOS when the
  // model has one.
  virtual std::vector<int32_t> Encode(std::string_view text, bool parse_special,
                                      bool add_bos) const = 0;
  // The raw bytes of a token sequence (special tokens rendered as their text).
  virtual std::string Decode(absl::Span<const int32_t> ids) const = 0;
  // The raw bytes of one token.
  virtual std::string TokenBytes(int32_t id) const = 0;
  // True for end-of-generation tokens (EOS and the template's end-of-turn tokens).
  virtual bool IsEndOfGeneration(int32_t id) const = 0;
  virtual int32_t vocab_size() const = 0;
};

// Turns a token stream into text pieces that are always whole UTF-8 characters: bytes of an
// incomplete character are held back until the next token completes it (or Flush()).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
  std::string Push(int32_t id);
  std::string Flush();  // whatever is pending (invalid trailing bytes become U+FFFD)

 private:
  const Tokenizer& tok_;
  std::string pending_;
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

// Renders messages with the model's template family: ChatML (SmolLM2, Qwen2/3; including
// SmolLM2's default system prompt when the conversation has none) or Llama-3. The family is
// recognised from the Jinja source in the spec; an unrecognised template is an error naming it.
absl::StatusOr<std::string> ApplyChatTemplate(const TokenizerSpec& spec,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt);

}  // namespace dmsrt
