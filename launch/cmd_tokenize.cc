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

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/args.h"
#include "launch/commands.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/model/tokenizer_json.h"

namespace dmsrt {
namespace {

using nlohmann::json;

constexpr char kUsage[] =
    "usage: dmsrt tokenize [--model PATH] (--text TEXT | --file F) [--no-special] [--add-bos]\n"
    "                      [--json] [--stats]\n"
    "       dmsrt tokenize [--model PATH] --decode \"ID ID ...\"\n"
    "       dmsrt tokenize [--model PATH] --jsonl F|-          one JSON string per line in,\n"
    "                                                         one JSON id array per line out\n"
    "       dmsrt tokenize [--model PATH] --decode-jsonl F|-   JSON id arrays in, strings out\n"
    "       dmsrt tokenize [--model PATH] --chat F [--template F] [--render]\n"
    "                      [--no-generation-prompt]           F: [{\"role\":..,\"content\":..}]\n"
    "  --model PATH          GGUF file or Hugging Face directory (default: the bundled model)\n"
    "  --tokenizer-dir DIR   read only DIR/tokenizer.json (+ tokenizer_config.json), no weights\n"
    "  --pre NAME            pre-tokenize as family NAME (smollm, gpt2, llama-bpe, qwen2)\n"
    "                        instead of the model's own\n";

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
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
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

int RunTokenize(int argc, char** argv) {
  auto args = Args::Parse(argc, argv,
                          {"model", "text", "file", "decode", "jsonl", "decode-jsonl", "chat",
                           "template", "pre", "tokenizer-dir"},
                          {"no-special", "add-bos", "json", "stats", "render",
                           "no-generation-prompt", "help"});
  if (!args.ok()) {
    std::cerr << "dmsrt tokenize: " << args.status().message() << "\n" << kUsage;
    return 2;
  }
  if (args->Flag("help")) {
    std::cout << kUsage;
    return 0;
  }
  if (!args->positional().empty()) {
    std::cerr << "dmsrt tokenize: unexpected argument '" << args->positional()[0] << "'\n"
              << kUsage;
    return 2;
  }
  int modes = 0;
  for (const char* m : {"text", "file", "decode", "jsonl", "decode-jsonl", "chat"}) {
    modes += args->Has(m);
  }
  if (modes != 1) {
    std::cerr << "dmsrt tokenize: give exactly one of --text, --file, --decode, --jsonl, "
                 "--decode-jsonl, --chat\n"
              << kUsage;
    return 2;
  }

  const auto t_load = std::chrono::steady_clock::now();
  TokenizerSpec spec;
  if (args->Has("tokenizer-dir")) {
    auto loaded = LoadTokenizerJson(args->Get("tokenizer-dir"));
    if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
    spec = *std::move(loaded);
  } else {
    std::string model_path = args->Get("model");
    if (model_path.empty()) {
      auto def = DefaultModelPath();
      if (!def.ok()) return Fail(std::string(def.status().message()));
      model_path = *def;
    }
    auto model = LoadModel(model_path);
    if (!model.ok()) return Fail(std::string(model.status().message()));
    spec = (*model)->tokenizer;
  }
  if (args->Has("pre")) spec.pre = args->Get("pre");
  auto tok = Tokenizer::Create(spec);
  if (!tok.ok()) return Fail(std::string(tok.status().message()));
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();

  const bool parse_special = !args->Flag("no-special");
  const bool add_bos = args->Flag("add-bos");

  if (args->Has("decode")) {
    std::vector<int32_t> ids;
    for (absl::string_view s :
         absl::StrSplit(args->Get("decode"), absl::ByAnyChar(" ,\t\n"), absl::SkipEmpty())) {
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

  if (args->Has("jsonl")) {
    std::string out;
    const int rc = ForEachLine(args->Get("jsonl"), [&](const json& j) -> std::string {
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

  if (args->Has("decode-jsonl")) {
    std::string out;
    const int rc = ForEachLine(args->Get("decode-jsonl"), [&](const json& j) -> std::string {
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

  if (args->Has("chat")) {
    std::string text;
    if (!ReadAll(args->Get("chat"), &text)) return Fail("cannot read " + args->Get("chat"));
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
    if (args->Has("template")) {
      if (!ReadAll(args->Get("template"), &spec.chat_template)) {
        return Fail("cannot read " + args->Get("template"));
      }
    }
    auto prompt = ApplyChatTemplate(spec, messages, !args->Flag("no-generation-prompt"));
    if (!prompt.ok()) return Fail(std::string(prompt.status().message()));
    if (args->Flag("render")) {
      std::cout << *prompt;
      std::cout.flush();
      return 0;
    }
    PrintIds((*tok)->Encode(*prompt, /*parse_special=*/true, add_bos), args->Flag("json"));
    return 0;
  }

  std::string text;
  if (args->Has("text")) {
    text = args->Get("text");
  } else if (!ReadAll(args->Get("file"), &text)) {
    return Fail("cannot read " + args->Get("file"));
  }
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = (*tok)->Encode(text, parse_special, add_bos);
  const double enc_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  PrintIds(ids, args->Flag("json"));
  if (args->Flag("stats")) {
    std::fprintf(stderr,
                 "model+tokenizer load %.1f ms; encode %zu bytes -> %zu tokens in %.3f ms "
                 "(%.2f MB/s)\n",
                 load_ms, text.size(), ids.size(), enc_ms,
                 enc_ms > 0 ? text.size() / enc_ms / 1e3 : 0.0);
  }
  return 0;
}

}  // namespace dmsrt
