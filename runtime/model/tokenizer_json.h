// Reads a Hugging Face tokenizer description (tokenizer.json, plus tokenizer_config.json for the
// chat template, BOS/EOS and add_bos) into the same TokenizerSpec a GGUF file produces, so one
// tokenizer implementation serves both model formats.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "runtime/model/model.h"

namespace dmsrt {

// `dir` is a model directory holding tokenizer.json (required) and tokenizer_config.json
// (optional). Errors name the file and what is wrong (missing, not JSON, not byte-level BPE ...).
absl::StatusOr<TokenizerSpec> LoadTokenizerJson(const std::string& dir);

}  // namespace dmsrt
