// Hugging Face tokenizer files -> TokenizerSpec, the same description a GGUF file gives, so one
// tokenizer serves both model formats.
//
// tokenizer.json gives the vocabulary, merges, added tokens and the pre-tokenizer; the family
// ("smollm", "gpt2", "llama-bpe", "qwen2") is recognised from the pre-tokenizer's structure and
// split pattern, the way GGUF converters name it. Token types follow the converters too:
// special added tokens are control (3), other added tokens user-defined (4), holes in the id
// range are filled with "[PADn]" unused (5) entries. tokenizer_config.json (optional) gives the
// chat template, BOS/EOS and add_bos; generation_config.json (optional) extra EOS ids.
#include "runtime/model/tokenizer_json.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {
namespace {

using nlohmann::json;

constexpr char kLlama3Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr char kQwen2Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

bool ReadFile(const std::string& path, std::string* out) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return false;
  *out = std::move(*text);
  return true;
}

absl::StatusOr<json> ReadJson(const std::string& path) {
  std::string text;
  if (!ReadFile(path, &text)) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  }
  return j;
}

std::string Brief(const json& j) {
  std::string s = j.dump();
  if (s.size() > 200) s = s.substr(0, 200) + "...";
  return s;
}

bool IsByteLevel(const json& j, bool use_regex) {
  return j.is_object() && j.value("type", "") == "ByteLevel" &&
         j.value("use_regex", true) == use_regex;
}

// Names the pre-tokenizer family of a tokenizer.json "pre_tokenizer" entry.
absl::StatusOr<std::string> PreTokenizerFamily(const json& pre, const std::string& path) {
  if (IsByteLevel(pre, true)) return std::string("gpt2");
  if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") &&
      pre["pretokenizers"].is_array()) {
    const json& seq = pre["pretokenizers"];
    if (seq.size() == 2 && seq[0].value("type", "") == "Digits" &&
        seq[0].value("individual_digits", false) && IsByteLevel(seq[1], true)) {
      return std::string("smollm");
    }
    if (seq.size() == 2 && seq[0].value("type", "") == "Split" && IsByteLevel(seq[1], false) &&
        seq[0].contains("pattern") && seq[0]["pattern"].is_object() &&
        seq[0]["pattern"].contains("Regex") && seq[0]["pattern"]["Regex"].is_string()) {
      const std::string re = seq[0]["pattern"]["Regex"].get<std::string>();
      if (re == kLlama3Pattern) return std::string("llama-bpe");
      if (re == kQwen2Pattern) return std::string("qwen2");
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": unsupported pre_tokenizer (known: GPT-2 ByteLevel, SmolLM digits+ByteLevel, "
            "Llama-3 and Qwen2 split patterns): ",
      Brief(pre)));
}

// A token given either as a string or as {"content": ...}.
std::string TokenText(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) {
    return j["content"].get<std::string>();
  }
  return "";
}

bool LooksSpecial(const std::string& t) {
  return t.size() >= 4 && t.compare(0, 2, "<|") == 0 && t.compare(t.size() - 2, 2, "|>") == 0;
}

// The tokenizer model: byte-level BPE with a vocabulary.
absl::Status CheckBpeModel(const json& root, const std::string& path) {
  if (!root.is_object() || !root.contains("model") || !root["model"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no \"model\" object"));
  }
  const json& model = root["model"];
  if (model.value("type", "") != "BPE") {
    return absl::InvalidArgumentError(absl::StrCat(path, ": model type '",
                                                   model.value("type", "?"),
                                                   "' is not byte-level BPE"));
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": model.vocab is missing"));
  }
  return absl::OkStatus();
}

// Vocabulary: ids from model.vocab and added_tokens; holes become unused "[PADn]".
absl::Status ReadVocabulary(const json& root, const std::string& path, TokenizerSpec& spec) {
  const json& model = root["model"];
  std::vector<std::pair<int64_t, std::string>> entries;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": vocab entry '", it.key(),
                                                     "' has a non-integer id"));
    }
    entries.emplace_back(it.value().get<int64_t>(), it.key());
  }
  struct Added {
    int64_t id;
    std::string text;
    bool special;
  };
  std::vector<Added> added;
  if (root.contains("added_tokens") && root["added_tokens"].is_array()) {
    for (const json& a : root["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": malformed added_tokens entry ", Brief(a)));
      }
      added.push_back({a["id"].get<int64_t>(), a["content"].get<std::string>(),
                       a.value("special", false)});
    }
  }
  int64_t n = 0;
  for (const auto& e : entries) n = std::max(n, e.first + 1);
  for (const auto& a : added) n = std::max(n, a.id + 1);
  constexpr int64_t kMaxVocab = 1 << 24;
  if (n <= 0 || n > kMaxVocab) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": vocabulary size ", n,
                                                   " is out of range"));
  }
  spec.tokens.assign(n, "");
  spec.token_types.assign(n, 0);
  for (const auto& e : entries) {
    if (e.first < 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": negative id for '", e.second, "'"));
    }
    spec.tokens[e.first] = e.second;
    spec.token_types[e.first] = 1;
  }
  for (const auto& a : added) {
    if (a.id < 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": negative id for '", a.text, "'"));
    }
    spec.tokens[a.id] = a.text;
    spec.token_types[a.id] = (a.special || LooksSpecial(a.text)) ? 3 : 4;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (spec.token_types[i] == 0) {
      spec.tokens[i] = absl::StrCat("[PAD", i, "]");
      spec.token_types[i] = 5;
    }
  }
  return absl::OkStatus();
}

// Merges: "a b" strings, or [a, b] pairs in newer files.
absl::Status ReadMerges(const json& model, const std::string& path, TokenizerSpec& spec) {
  if (!model.contains("merges") || !model["merges"].is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": model.merges is missing"));
  }
  spec.merges.reserve(model["merges"].size());
  for (const json& m : model["merges"]) {
    if (m.is_string()) {
      spec.merges.push_back(m.get<std::string>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      spec.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    } else {
      return absl::InvalidArgumentError(absl::StrCat(path, ": malformed merge ", Brief(m)));
    }
  }
  return absl::OkStatus();
}

// The id of a token's text, or -1.
int32_t FindId(const TokenizerSpec& spec, const std::string& text) {
  if (text.empty()) return -1;
  const int64_t n = static_cast<int64_t>(spec.tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    if (spec.tokens[i] == text) return static_cast<int32_t>(i);
  }
  return -1;
}

// A BOS added by the post-processor (Llama-3 style TemplateProcessing), and its text.
struct PostProcessorBos {
  bool adds = false;
  std::string text;
};

PostProcessorBos ReadPostProcessorBos(const json& root) {
  PostProcessorBos bos;
  std::vector<json> procs;
  if (root.contains("post_processor") && root["post_processor"].is_object()) {
    const json& pp = root["post_processor"];
    if (pp.value("type", "") == "Sequence" && pp.contains("processors") &&
        pp["processors"].is_array()) {
      for (const json& p : pp["processors"]) procs.push_back(p);
    } else {
      procs.push_back(pp);
    }
  }
  for (const json& p : procs) {
    if (p.is_object() && p.value("type", "") == "TemplateProcessing" && p.contains("single") &&
        p["single"].is_array() && !p["single"].empty() && p["single"][0].is_object() &&
        p["single"][0].contains("SpecialToken")) {
      bos.adds = true;
      bos.text = p["single"][0]["SpecialToken"].value("id", "");
    }
  }
  return bos;
}

// tokenizer_config.json's chat_template: a string, or a list of named templates ("default", or
// else the first).
void ReadChatTemplate(const json& ct, TokenizerSpec& spec) {
  if (ct.is_string()) {
    spec.chat_template = ct.get<std::string>();
  } else if (ct.is_array()) {
    for (const json& e : ct) {
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template")) {
        spec.chat_template = TokenText(e["template"]);
      }
    }
    if (spec.chat_template.empty() && !ct.empty() && ct[0].is_object() &&
        ct[0].contains("template")) {
      spec.chat_template = TokenText(ct[0]["template"]);
    }
  }
}

// tokenizer_config.json (optional): chat template, BOS/EOS/PAD/UNK, add_bos. `add_bos_set` tells
// whether the file set add_bos.
absl::Status ReadTokenizerConfig(const std::string& dir, TokenizerSpec& spec, bool* add_bos_set) {
  const std::string cfg_path = dir + "/tokenizer_config.json";
  std::string cfg_text;
  *add_bos_set = false;
  if (!ReadFile(cfg_path, &cfg_text)) return absl::OkStatus();
  json cfg = json::parse(cfg_text, nullptr, false);
  if (cfg.is_discarded() || !cfg.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": not a JSON object"));
  }
  if (cfg.contains("chat_template")) ReadChatTemplate(cfg["chat_template"], spec);
  if (cfg.contains("bos_token")) spec.bos_id = FindId(spec, TokenText(cfg["bos_token"]));
  if (cfg.contains("eos_token")) spec.eos_id = FindId(spec, TokenText(cfg["eos_token"]));
  if (cfg.contains("pad_token")) spec.pad_id = FindId(spec, TokenText(cfg["pad_token"]));
  if (cfg.contains("unk_token")) spec.unk_id = FindId(spec, TokenText(cfg["unk_token"]));
  if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean()) {
    spec.add_bos = cfg["add_bos_token"].get<bool>();
    *add_bos_set = true;
  }
  return absl::OkStatus();
}

// generation_config.json (optional): eos_token_id, one id or a list, adds to eos_ids (and is the
// eos id when none was given).
void ReadGenerationEos(const std::string& dir, TokenizerSpec& spec) {
  std::string gen_text;
  if (!ReadFile(dir + "/generation_config.json", &gen_text)) return;
  json gen = json::parse(gen_text, nullptr, false);
  if (!gen.is_object() || !gen.contains("eos_token_id")) return;
  std::vector<json> ids;
  if (gen["eos_token_id"].is_array()) {
    for (const json& e : gen["eos_token_id"]) ids.push_back(e);
  } else {
    ids.push_back(gen["eos_token_id"]);
  }
  const int64_t n = static_cast<int64_t>(spec.tokens.size());
  for (const json& e : ids) {
    if (!e.is_number_integer()) continue;
    const int64_t id = e.get<int64_t>();
    if (id < 0 || id >= n) continue;
    if (std::find(spec.eos_ids.begin(), spec.eos_ids.end(), id) == spec.eos_ids.end()) {
      spec.eos_ids.push_back(static_cast<int32_t>(id));
    }
    if (spec.eos_id < 0) spec.eos_id = static_cast<int32_t>(id);
  }
}

}  // namespace

absl::StatusOr<TokenizerSpec> LoadTokenizerJson(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  auto tj = ReadJson(path);
  if (!tj.ok()) return tj.status();
  const json& root = *tj;
  if (absl::Status s = CheckBpeModel(root, path); !s.ok()) return s;

  TokenizerSpec spec;
  spec.model = "gpt2";
  {
    auto fam = PreTokenizerFamily(root.contains("pre_tokenizer") ? root["pre_tokenizer"] : json(),
                                  path);
    if (!fam.ok()) return fam.status();
    spec.pre = *fam;
  }
  if (absl::Status s = ReadVocabulary(root, path, spec); !s.ok()) return s;
  if (absl::Status s = ReadMerges(root["model"], path, spec); !s.ok()) return s;
  const PostProcessorBos post_bos = ReadPostProcessorBos(root);
  bool add_bos_set = false;
  if (absl::Status s = ReadTokenizerConfig(dir, spec, &add_bos_set); !s.ok()) return s;
  if (spec.chat_template.empty()) {
    std::string jinja;
    if (ReadFile(dir + "/chat_template.jinja", &jinja)) spec.chat_template = jinja;
  }
  if (spec.bos_id < 0 && !post_bos.text.empty()) spec.bos_id = FindId(spec, post_bos.text);
  if (!add_bos_set) spec.add_bos = post_bos.adds && spec.bos_id >= 0;

  if (spec.eos_id >= 0) spec.eos_ids.push_back(spec.eos_id);
  ReadGenerationEos(dir, spec);
  return spec;
}

}  // namespace dmsrt
