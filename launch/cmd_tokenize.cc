// `dmsrt tokenize`: text -> token ids, ids -> text, and chat-template rendering, with the model's
// own tokenizer. Batch modes (--jsonl, --decode-jsonl) read one JSON value per line and write
// one per line, so a test can compare thousands of strings with one model load.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/run_options.h"
#include "launch/commands.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/model/tokenizer_json.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {
namespace {

using nlohmann::json;

std::string Dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

bool ReadAll(const std::string& path, std::string* out) {
  if (path == "-") {
    std::ostringstream ss;
    ss << std::cin.rdbuf();
    *out = ss.str();
    return true;
  }
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return false;
  *out = std::move(*text);
  return true;
}

void PrintIds(const std::vector<int32_t>& ids, bool as_json) {
  if (as_json) {
    json j;
    j["ids"] = ids;
    j["count"] = ids.size();
    std::cout << Dump(j) << "\n";
    return;
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) absl::StrAppend(&line, i ? " " : "", ids[i]);
  std::cout << line << "\n";
}

int Fail(const std::string& msg) {
  std::cerr << "dmsrt tokenize: " << msg << "\n";
  return 1;
}

// Runs `fn` on each non-empty line of `path`; stops at the first error.
template <typename Fn>
int ForEachLine(const std::string& path, Fn fn) {
  std::string all;
  if (!ReadAll(path, &all)) return Fail(absl::StrCat("cannot read ", path));
  std::istringstream in(all);
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded()) return Fail(absl::StrCat(path, ":", lineno, ": not valid JSON"));
    std::string err = fn(j);
    if (!err.empty()) return Fail(absl::StrCat(path, ":", lineno, ": ", err));
  }
  return 0;
}

}  // namespace

void SetupTokenize(CLI::App& app, TokenizeOptions& o) {
  AddModelOption(app, &o.model);
  app.add_option("--tokenizer-dir", o.tokenizer_dir,
                 "read only DIR/tokenizer.json (+ tokenizer_config.json), no weights")
      ->type_name("DIR");
  app.add_option("--pre", o.pre,
                 "pre-tokenize as family NAME (smollm, gpt2, llama-bpe, qwen2) instead of the model's own")
      ->type_name("NAME");
  app.add_option("--text", o.text, "encode TEXT");
  app.add_option("--file", o.file, "encode the file's bytes")->type_name("FILE");
  app.add_option("--decode", o.decode, "decode token ids (\"ID ID ...\")")->type_name("IDS");
  app.add_option("--jsonl", o.jsonl, "one JSON string per line in (- : stdin), one JSON id array per line out")
      ->type_name("FILE");
  app.add_option("--decode-jsonl", o.decode_jsonl, "JSON id arrays in, JSON strings out")->type_name("FILE");
  app.add_option("--chat", o.chat, "render and encode a conversation: [{\"role\": .., \"content\": ..}]")
      ->type_name("FILE");
  app.add_option("--template", o.chat_template, "--chat: this chat template instead of the model's")
      ->type_name("FILE");
  app.add_flag("--render", o.render, "--chat: print the rendered text instead of its ids");
  app.add_flag("--no-generation-prompt", o.no_generation_prompt,
               "--chat: no assistant prompt after the last turn");
  app.add_flag("--no-special", o.no_special, "encode special-token text as plain text");
  app.add_flag("--add-bos", o.add_bos, "put the BOS token first");
  app.add_flag("--json", o.json, "print {\"ids\": [...], \"count\": N}");
  app.add_flag("--stats", o.stats, "print load and encode times to stderr");
  app.footer("Give exactly one of --text, --file, --decode, --jsonl, --decode-jsonl, --chat.");
}

int RunTokenize(const TokenizeOptions& o, ProcessArgs&) {
  int modes = 0;
  for (const std::optional<std::string>* m : {&o.text, &o.file, &o.decode, &o.jsonl, &o.decode_jsonl, &o.chat}) {
    modes += m->has_value();
  }
  if (modes != 1) {
    std::cerr << "dmsrt tokenize: give exactly one of --text, --file, --decode, --jsonl, "
                 "--decode-jsonl, --chat\nRun 'dmsrt tokenize --help' for the options.\n";
    return 2;
  }

  const auto t_load = std::chrono::steady_clock::now();
  TokenizerSpec spec;
  if (!o.tokenizer_dir.empty()) {
    auto loaded = LoadTokenizerJson(o.tokenizer_dir);
    if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
    spec = *std::move(loaded);
  } else {
    std::string model_path = o.model;
    if (model_path.empty()) {
      auto def = DefaultModelPath();
      if (!def.ok()) return Fail(std::string(def.status().message()));
      model_path = *def;
    }
    auto model = LoadModel(model_path);
    if (!model.ok()) return Fail(std::string(model.status().message()));
    spec = (*model)->tokenizer;
  }
  if (!o.pre.empty()) spec.pre = o.pre;
  auto tok = Tokenizer::Create(spec);
  if (!tok.ok()) return Fail(std::string(tok.status().message()));
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();

  const bool parse_special = !o.no_special;
  const bool add_bos = o.add_bos;

  if (o.decode) {
    std::vector<int32_t> ids;
    for (absl::string_view s :
         absl::StrSplit(*o.decode, absl::ByAnyChar(" ,\t\n"), absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(s, &id) || id < 0 || id >= (*tok)->vocab_size()) {
        return Fail(absl::StrCat("--decode: '", s, "' is not a token id below ",
                                 (*tok)->vocab_size()));
      }
      ids.push_back(id);
    }
    std::cout << (*tok)->Decode(ids);
    std::cout.flush();
    return 0;
  }

  if (o.jsonl) {
    std::string out;
    const int rc = ForEachLine(*o.jsonl, [&](const json& j) -> std::string {
      if (!j.is_string()) return "expected a JSON string";
      const std::vector<int32_t> ids =
          (*tok)->Encode(j.get_ref<const std::string&>(), parse_special, add_bos);
      out += Dump(json(ids));
      out += '\n';
      return "";
    });
    std::cout << out;
    return rc;
  }

  if (o.decode_jsonl) {
    std::string out;
    const int rc = ForEachLine(*o.decode_jsonl, [&](const json& j) -> std::string {
      if (!j.is_array()) return "expected a JSON array of token ids";
      std::vector<int32_t> ids;
      for (const json& e : j) {
        if (!e.is_number_integer() || e.get<int64_t>() < 0 ||
            e.get<int64_t>() >= (*tok)->vocab_size()) {
          return absl::StrCat("bad token id ", e.dump());
        }
        ids.push_back(e.get<int32_t>());
      }
      out += Dump(json((*tok)->Decode(ids)));
      out += '\n';
      return "";
    });
    std::cout << out;
    return rc;
  }

  if (o.chat) {
    std::string text;
    if (!ReadAll(*o.chat, &text)) return Fail("cannot read " + *o.chat);
    json j = json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_array()) {
      return Fail("--chat: expected a JSON array of {\"role\", \"content\"} objects");
    }
    std::vector<ChatMessage> messages;
    for (const json& m : j) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string() ||
          !m.contains("content") || !m["content"].is_string()) {
        return Fail("--chat: each message needs string \"role\" and \"content\"");
      }
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    if (!o.chat_template.empty()) {
      if (!ReadAll(o.chat_template, &spec.chat_template)) {
        return Fail("cannot read " + o.chat_template);
      }
    }
    auto prompt = ApplyChatTemplate(spec, messages, !o.no_generation_prompt);
    if (!prompt.ok()) return Fail(std::string(prompt.status().message()));
    if (o.render) {
      std::cout << *prompt;
      std::cout.flush();
      return 0;
    }
    PrintIds((*tok)->Encode(*prompt, /*parse_special=*/true, add_bos), o.json);
    return 0;
  }

  std::string text;
  if (o.text) {
    text = *o.text;
  } else if (!ReadAll(*o.file, &text)) {
    return Fail("cannot read " + *o.file);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = (*tok)->Encode(text, parse_special, add_bos);
  const double enc_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  PrintIds(ids, o.json);
  if (o.stats) {
    std::fprintf(stderr,
                 "model+tokenizer load %.1f ms; encode %zu bytes -> %zu tokens in %.3f ms "
                 "(%.2f MB/s)\n",
                 load_ms, text.size(), ids.size(), enc_ms,
                 enc_ms > 0 ? text.size() / enc_ms / 1e3 : 0.0);
  }
  return 0;
}

}  // namespace dmsrt
