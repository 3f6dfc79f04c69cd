// OpenAI request parsing (see openai_request.h). Every field is checked for its JSON type before
// it is read, so no nlohmann exception escapes; the parse itself runs with exceptions off.
#include "launch/service/openai_request.h"

#include <google/protobuf/util/json_util.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "runtime/engine/sampler.h"

namespace dmsrt {

namespace {

using nlohmann::json;

struct Parser {
  const json& body;
  OpenAiError* err;

  bool Fail(const std::string& param, const std::string& message) {
    err->status = 400;
    err->type = "invalid_request_error";
    err->param = param;
    err->message = message;
    return false;
  }
  const json* Field(const char* name) const {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
  }
  // Integer field within [lo, hi]; absent leaves *v alone.
  bool Int(const char* name, int64_t lo, int64_t hi, int64_t* v) {
    const json* f = Field(name);
    if (f == nullptr) return true;
    if (!f->is_number_integer()) return Fail(name, absl::StrCat("'", name, "' must be an integer"));
    const bool above = f->is_number_unsigned() && f->get<uint64_t>() > static_cast<uint64_t>(hi);
    const int64_t x = above ? hi : f->get<int64_t>();
    if (above || x < lo || x > hi) {
      return Fail(name, absl::StrCat("'", name, "' = ", f->dump(), " is out of range: send an integer in [",
                                     lo, ", ", hi, "]"));
    }
    *v = x;
    return true;
  }
  bool Number(const char* name, double lo, double hi, double* v) {
    const json* f = Field(name);
    if (f == nullptr) return true;
    if (!f->is_number()) return Fail(name, absl::StrCat("'", name, "' must be a number"));
    const double x = f->get<double>();
    if (!std::isfinite(x) || x < lo || x > hi) {
      return Fail(name, absl::StrCat("'", name, "' = ", f->dump(), " is out of range: send a number in [",
                                     lo, ", ", hi, "]"));
    }
    *v = x;
    return true;
  }
  bool Bool(const char* name, bool* v) {
    const json* f = Field(name);
    if (f == nullptr) return true;
    if (!f->is_boolean()) return Fail(name, absl::StrCat("'", name, "' must be true or false"));
    *v = f->get<bool>();
    return true;
  }
  bool String(const char* name, std::string* v) {
    const json* f = Field(name);
    if (f == nullptr) return true;
    if (!f->is_string()) return Fail(name, absl::StrCat("'", name, "' must be a string"));
    *v = f->get<std::string>();
    return true;
  }
};

// Fields that would change what the answer means; dmsrt cannot honour them.
bool RejectUnsupported(Parser& p) {
  for (const char* name : {"tools", "functions", "function_call", "tool_choice"}) {
    if (p.Field(name) != nullptr) {
      return p.Fail(name, absl::StrCat("'", name, "' is not supported: dmsrt has no tool or function "
                                               "calling; remove the field"));
    }
  }
  if (const json* rf = p.Field("response_format")) {
    auto t = rf->is_object() ? rf->find("type") : rf->end();
    if (!rf->is_object() || t == rf->end() || !t->is_string() || *t != "text") {
      return p.Fail("response_format",
                    "only response_format {\"type\": \"text\"} is supported (no JSON mode or schemas)");
    }
  }
  if (const json* e = p.Field("echo"); e != nullptr && (!e->is_boolean() || e->get<bool>())) {
    return p.Fail("echo", "'echo' is not supported: remove it or send false");
  }
  if (p.Field("suffix") != nullptr) return p.Fail("suffix", "'suffix' is not supported: remove it");
  return true;
}

// The text of a message's content: a string, or an array of {"type": "text", "text": ...} parts.
bool ContentText(Parser& p, const json& content, const std::string& param, std::string* text) {
  if (content.is_string()) {
    *text = content.get<std::string>();
    return true;
  }
  if (!content.is_array()) return p.Fail(param, "a message's content must be a string or an array of text parts");
  for (const json& part : content) {
    auto t = part.is_object() ? part.find("type") : part.end();
    auto x = part.is_object() ? part.find("text") : part.end();
    if (t == part.end() || !t->is_string() || *t != "text" || x == part.end() || !x->is_string()) {
      return p.Fail(param, "only text content parts ({\"type\": \"text\", \"text\": \"...\"}) are supported");
    }
    text->append(x->get<std::string>());
  }
  return true;
}

bool ParseMessages(Parser& p, v1::JobRequest* job) {
  const json* m = p.Field("messages");
  if (m == nullptr) return p.Fail("messages", "'messages' is required: a list of {role, content} objects");
  if (!m->is_array() || m->empty()) return p.Fail("messages", "'messages' must be a non-empty array");
  v1::Conversation* conv = job->mutable_conversation();
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string param = absl::StrCat("messages[", i, "]");
    if (!msg.is_object()) return p.Fail(param, "each message must be an object with role and content");
    auto role = msg.find("role");
    if (role == msg.end() || !role->is_string()) return p.Fail(param + ".role", "a message needs a string 'role'");
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";
    if (r != "system" && r != "user" && r != "assistant") {
      return p.Fail(param + ".role", absl::StrCat("role '", r, "' is not supported: use system, user or assistant"));
    }
    auto content = msg.find("content");
    if (content == msg.end() || content->is_null()) {
      return p.Fail(param + ".content", "a message needs 'content'");
    }
    v1::ChatMessage* out = conv->add_messages();
    out->set_role(r);
    if (!ContentText(p, *content, param + ".content", out->mutable_content())) return false;
  }
  return true;
}

bool ParsePrompt(Parser& p, v1::JobRequest* job) {
  const json* pr = p.Field("prompt");
  if (pr == nullptr) return p.Fail("prompt", "'prompt' is required: a string");
  if (pr->is_array() && pr->size() == 1 && (*pr)[0].is_string()) pr = &(*pr)[0];
  if (!pr->is_string()) {
    return p.Fail("prompt", "'prompt' must be a string (or an array of one string); token arrays and "
                            "batches of prompts are not supported");
  }
  job->set_prompt(pr->get<std::string>());
  return true;
}

bool ParseStop(Parser& p, v1::StoppingCriteria* st) {
  const json* s = p.Field("stop");
  if (s == nullptr) return true;
  if (s->is_string()) {
    st->add_stop(s->get<std::string>());
    return true;
  }
  if (!s->is_array()) return p.Fail("stop", "'stop' must be a string or an array of strings");
  for (const json& x : *s) {
    if (!x.is_string()) return p.Fail("stop", "'stop' must be a string or an array of strings");
    st->add_stop(x.get<std::string>());
  }
  return true;
}

// The "dmsrt" extension: a JobRequest in its JSON form, minus the input and n.
bool ParseExtension(Parser& p, v1::JobRequest* job) {
  const json* ext = p.Field("dmsrt");
  if (ext == nullptr) return true;
  if (!ext->is_object()) return p.Fail("dmsrt", "'dmsrt' must be an object of JobRequest fields");
  for (const char* banned : {"prompt", "chat", "conversation", "n", "streamTokens", "stream_tokens",
                             "response"}) {
    if (ext->contains(banned)) {
      return p.Fail(absl::StrCat("dmsrt.", banned),
                    absl::StrCat("'dmsrt.", banned, "' is set by the OpenAI fields; remove it"));
    }
  }
  google::protobuf::util::JsonParseOptions opts;
  opts.ignore_unknown_fields = false;
  auto s = google::protobuf::util::JsonStringToMessage(ext->dump(), job, opts);
  if (!s.ok()) {
    return p.Fail("dmsrt", absl::StrCat("'dmsrt' is not a valid JobRequest extension: ",
                                        std::string(s.message())));
  }
  return true;
}

// Chat: "logprobs": true for the chosen tokens' log-probabilities, plus "top_logprobs": k (0..20,
// only with logprobs) for the k most likely tokens at each position. Completions (the legacy
// form): "logprobs": k (0..20) gives both at once; "top_logprobs" is not part of that API.
bool ParseLogprobs(Parser& p, OpenAiEndpoint endpoint, OpenAiRequest* out) {
  int64_t top = 0;
  if (endpoint == OpenAiEndpoint::kChatCompletions) {
    if (!p.Bool("logprobs", &out->logprobs)) return false;
    if (!p.Int("top_logprobs", 0, kMaxTopLogprobs, &top)) return false;
    if (top > 0 && !out->logprobs) {
      return p.Fail("top_logprobs", "'top_logprobs' needs 'logprobs': true; set both");
    }
  } else {
    if (!p.Int("logprobs", 0, kMaxTopLogprobs, &top)) return false;
    out->logprobs = p.Field("logprobs") != nullptr;
    int64_t unused = 0;
    if (!p.Int("top_logprobs", 0, kMaxTopLogprobs, &unused)) return false;
    if (unused > 0) {
      return p.Fail("top_logprobs", "/v1/completions takes the listing size as 'logprobs': k; "
                                    "remove 'top_logprobs'");
    }
  }
  out->top_logprobs = static_cast<int32_t>(top);
  out->job.mutable_response()->set_top_logprobs(out->top_logprobs);
  return true;
}

bool ParseSampling(Parser& p, OpenAiEndpoint endpoint, const OpenAiLimits& limits, OpenAiRequest* out) {
  v1::JobRequest* job = &out->job;
  // Budget mode (dmsrt.kv.kv_budget_bytes) picks n itself unless n is given.
  int64_t n = job->kv().kv_budget_bytes() > 0 ? 0 : 1;
  if (!p.Int("n", 1, limits.max_n, &n)) return false;
  job->set_n(static_cast<int32_t>(n));
  int64_t max_tokens = 0;
  if (!p.Int("max_tokens", 1, std::numeric_limits<int32_t>::max(), &max_tokens)) return false;
  if (!p.Int("max_completion_tokens", 1, std::numeric_limits<int32_t>::max(), &max_tokens)) return false;
  if (max_tokens > 0) job->mutable_stopping()->set_max_tokens(static_cast<int32_t>(max_tokens));
  double temperature = 1.0, top_p = 1.0;
  if (!p.Number("temperature", 0, 2, &temperature)) return false;
  if (!p.Number("top_p", 0, 1, &top_p)) return false;
  job->mutable_sampling()->set_temperature(static_cast<float>(temperature));
  job->mutable_sampling()->set_top_p(static_cast<float>(top_p));
  int64_t seed = 0;
  if (!p.Int("seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), &seed)) {
    return false;
  }
  job->mutable_sampling()->set_seed(static_cast<uint64_t>(seed));
  if (!ParseStop(p, job->mutable_stopping())) return false;
  return ParseLogprobs(p, endpoint, out);
}

bool ParseStreaming(Parser& p, OpenAiRequest* out) {
  if (!p.Bool("stream", &out->stream)) return false;
  if (const json* so = p.Field("stream_options")) {
    if (!so->is_object()) return p.Fail("stream_options", "'stream_options' must be an object");
    auto iu = so->find("include_usage");
    if (iu != so->end() && !iu->is_null()) {
      if (!iu->is_boolean()) return p.Fail("stream_options.include_usage", "must be true or false");
      out->include_usage = iu->get<bool>();
    }
  }
  return true;
}

// Deeper nesting than this is refused before parsing, so nothing recurses without bound on
// hostile input (a request needs depth 4).
constexpr int kMaxDepth = 32;

bool NestingWithin(std::string_view body, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return false;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}

}  // namespace

bool ParseOpenAiRequest(OpenAiEndpoint endpoint, std::string_view body, const OpenAiLimits& limits,
                        OpenAiRequest* out, OpenAiError* err) {
  *out = OpenAiRequest();
  if (!NestingWithin(body, kMaxDepth)) {
    *err = OpenAiError();
    err->message = absl::StrCat("the body nests JSON deeper than ", kMaxDepth, " levels");
    return false;
  }
  const json doc = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  Parser p{doc, err};
  if (doc.is_discarded()) {
    return p.Fail("", "the body is not valid JSON (check the syntax and that strings are UTF-8)");
  }
  if (!doc.is_object()) return p.Fail("", "the body must be a JSON object");
  if (!RejectUnsupported(p)) return false;
  if (!p.String("model", &out->model) || !p.String("user", &out->user)) return false;
  // The extension first, so the OpenAI fields below take precedence over it.
  if (!ParseExtension(p, &out->job)) return false;
  if (endpoint == OpenAiEndpoint::kChatCompletions ? !ParseMessages(p, &out->job)
                                                   : !ParsePrompt(p, &out->job)) {
    return false;
  }
  if (!ParseSampling(p, endpoint, limits, out)) return false;
  out->job.set_stream_tokens(true);  // choices are built from the token events
  return ParseStreaming(p, out);
}

std::string OpenAiErrorJson(const OpenAiError& err) {
  json e = {{"message", err.message},
            {"type", err.type},
            {"param", err.param.empty() ? json(nullptr) : json(err.param)},
            {"code", err.code.empty() ? json(nullptr) : json(err.code)}};
  return json{{"error", e}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace dmsrt
