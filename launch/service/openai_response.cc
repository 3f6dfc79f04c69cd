// OpenAI responses from job events (see openai_response.h). Model text may end inside a UTF-8
// sequence at a token boundary, so every dump replaces invalid bytes instead of throwing.
#include "launch/service/openai_response.h"

#include "absl/strings/str_cat.h"

namespace dmsrt {

namespace {

using nlohmann::json;

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string Sse(const json& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

// A token's bytes as OpenAI lists them (its text may end inside a UTF-8 character).
json Bytes(const std::string& s) {
  json bytes = json::array();
  for (unsigned char c : s) bytes.push_back(static_cast<int>(c));
  return bytes;
}

const char* FinishReason(v1::FinishReason r) {
  switch (r) {
    case v1::STOP:
    case v1::STOP_STRING: return "stop";
    case v1::LENGTH: return "length";
    case v1::CANCELLED: return "cancelled";
    default: return "error";
  }
}

}  // namespace

OpenAiResponder::OpenAiResponder(OpenAiEndpoint endpoint, const OpenAiRequest& request,
                                 std::string model, int64_t created_unix,
                                 std::function<std::string(int32_t)> token_text)
    : endpoint_(endpoint),
      logprobs_(request.logprobs),
      top_logprobs_(request.top_logprobs),
      include_usage_(request.include_usage),
      model_(std::move(model)),
      created_(created_unix),
      token_text_(std::move(token_text)) {}

json OpenAiResponder::Envelope(const char* object) const {
  const bool chat = endpoint_ == OpenAiEndpoint::kChatCompletions;
  return json{{"id", absl::StrCat(chat ? "chatcmpl-" : "cmpl-", id_)},
              {"object", object},
              {"created", created_},
              {"model", model_}};
}

json OpenAiResponder::Logprobs(const std::vector<int32_t>& ids, const std::vector<float>& lps,
                               const std::vector<v1::TopLogprobs>& top) const {
  if (!logprobs_) return nullptr;
  const size_t k = std::min(ids.size(), lps.size());
  const bool listed = top_logprobs_ > 0;
  if (endpoint_ == OpenAiEndpoint::kChatCompletions) {
    json content = json::array();
    for (size_t i = 0; i < k; ++i) {
      json alternatives = json::array();
      if (listed && i < top.size()) {
        for (const v1::TopLogprob& e : top[i].entries()) {
          alternatives.push_back({{"token", e.text()}, {"logprob", e.logprob()}, {"bytes", Bytes(e.text())}});
        }
      }
      const std::string t = token_text_ ? token_text_(ids[i]) : "";
      content.push_back({{"token", t}, {"logprob", lps[i]}, {"bytes", Bytes(t)}, {"top_logprobs", alternatives}});
    }
    return json{{"content", content}};
  }
  json tokens = json::array(), token_lps = json::array();
  json top_lps = listed ? json::array() : json(nullptr);
  for (size_t i = 0; i < k; ++i) {
    const std::string t = token_text_ ? token_text_(ids[i]) : "";
    tokens.push_back(t);
    token_lps.push_back(lps[i]);
    if (!listed) continue;
    // {text: logprob}, most likely first; the chosen token is always there (k + 1 entries when
    // it is not among the k most likely). Two tokens with the same text keep the likelier one.
    json alternatives = json::object();
    if (i < top.size()) {
      for (const v1::TopLogprob& e : top[i].entries()) {
        if (!alternatives.contains(e.text())) alternatives[e.text()] = e.logprob();
      }
    }
    if (!alternatives.contains(t)) alternatives[t] = lps[i];
    top_lps.push_back(alternatives);
  }
  return json{{"tokens", tokens}, {"token_logprobs", token_lps}, {"top_logprobs", top_lps},
              {"text_offset", nullptr}};
}

json OpenAiResponder::Extension() const {
  json votes = json::object();
  for (const v1::Vote& v : result_.votes()) votes[v.answer()] = v.votes();
  return json{{"job_id", id_},
              {"n", result_.n()},
              {"outcome", v1::JobOutcome_Name(result_.outcome())},
              {"selected_answer", result_.has_answer() ? json(result_.selected_answer()) : json(nullptr)},
              {"votes", votes},
              {"early_stopped", result_.early_stopped()},
              {"message", result_.message()}};
}

json OpenAiResponder::Usage() const {
  const int64_t p = result_.usage().prompt_tokens(), g = result_.usage().generated_tokens();
  return json{{"prompt_tokens", p}, {"completion_tokens", g}, {"total_tokens", p + g}};
}

json OpenAiResponder::FinishedChoice(int32_t index, const Choice& c) const {
  const v1::ThreadFinished& r = c.result;
  json ext = {{"reason", v1::FinishReason_Name(r.reason())},
              {"answer", r.has_answer() ? json(r.answer()) : json(nullptr)},
              {"tokens", r.tokens()},
              {"cache_cr", r.cache_cr()}};
  json choice = {{"index", index}, {"finish_reason", FinishReason(r.reason())}, {"dmsrt", ext}};
  return choice;
}

std::string OpenAiResponder::StreamEvent(const v1::JobEvent& e) {
  id_ = e.job_id();
  const bool chat = endpoint_ == OpenAiEndpoint::kChatCompletions;
  const char* object = chat ? "chat.completion.chunk" : "text_completion";
  std::string out;
  if (e.has_token()) {
    const v1::TokenDelta& t = e.token();
    Choice& c = choices_[t.thread_index()];
    json choice = {{"index", t.thread_index()}, {"finish_reason", nullptr}};
    std::vector<int32_t> ids(t.token_ids().begin(), t.token_ids().end());
    std::vector<float> lps(t.logprobs().begin(), t.logprobs().end());
    std::vector<v1::TopLogprobs> top(t.top_logprobs().begin(), t.top_logprobs().end());
    choice["logprobs"] = Logprobs(ids, lps, top);
    if (chat) {
      json delta = {{"content", t.text()}};
      if (!c.started) delta["role"] = "assistant";
      choice["delta"] = delta;
    } else {
      choice["text"] = t.text();
    }
    c.started = true;
    json chunk = Envelope(object);
    chunk["choices"] = json::array({choice});
    out += Sse(chunk);
  } else if (e.has_thread_finished()) {
    Choice& c = choices_[e.thread_finished().thread_index()];
    c.result = e.thread_finished();
    c.done = true;
    json choice = FinishedChoice(c.result.thread_index(), c);
    if (chat) {
      choice["delta"] = c.started ? json::object() : json{{"role", "assistant"}, {"content", ""}};
    } else {
      choice["text"] = "";
    }
    choice["logprobs"] = nullptr;
    json chunk = Envelope(object);
    chunk["choices"] = json::array({choice});
    out += Sse(chunk);
  } else if (e.has_error()) {
    out += Sse(json{{"error", {{"message", e.error().message()}, {"type", "server_error"},
                               {"param", nullptr}, {"code", e.error().retryable() ? "retryable" : nullptr}}}});
  } else if (e.has_job_finished()) {
    result_ = e.job_finished();
    finished_ = true;
    // The vote (and usage when asked) in a last chunk with no choices, as OpenAI sends usage.
    json chunk = Envelope(object);
    chunk["choices"] = json::array();
    chunk["dmsrt"] = Extension();
    if (include_usage_) chunk["usage"] = Usage();
    out += Sse(chunk);
    out += "data: [DONE]\n\n";
  }
  return out;
}

void OpenAiResponder::Record(const v1::JobEvent& e) {
  id_ = e.job_id();
  if (e.has_token()) {
    Choice& c = choices_[e.token().thread_index()];
    c.text += e.token().text();
    c.token_ids.insert(c.token_ids.end(), e.token().token_ids().begin(), e.token().token_ids().end());
    c.logprobs.insert(c.logprobs.end(), e.token().logprobs().begin(), e.token().logprobs().end());
    c.top.insert(c.top.end(), e.token().top_logprobs().begin(), e.token().top_logprobs().end());
  } else if (e.has_thread_finished()) {
    Choice& c = choices_[e.thread_finished().thread_index()];
    c.result = e.thread_finished();
    c.done = true;
  } else if (e.has_error()) {
    error_ = e.error().message();
    retryable_ = retryable_ || e.error().retryable();
  } else if (e.has_job_finished()) {
    result_ = e.job_finished();
    finished_ = true;
    for (const v1::ThreadFinished& t : result_.threads()) {
      Choice& c = choices_[t.thread_index()];
      if (!c.done) {
        c.result = t;
        c.done = true;
      }
    }
  }
}

OpenAiReply OpenAiResponder::Error(int status, const char* type, const char* code,
                                   const std::string& message) const {
  json e = {{"message", message},
            {"type", type},
            {"param", nullptr},
            {"code", code != nullptr ? json(code) : json(nullptr)}};
  json body = {{"error", e}};
  if (finished_) body["dmsrt"] = Extension();
  return OpenAiReply{status, Dump(body)};
}

OpenAiReply OpenAiResponder::Final() const {
  if (!finished_) {
    return Error(500, "server_error", nullptr,
                 error_.empty() ? "the job ended without a result" : error_);
  }
  switch (result_.outcome()) {
    case v1::JOB_SUCCEEDED:
    case v1::JOB_NO_ANSWER:
      break;
    case v1::JOB_DEADLINE_EXCEEDED:
      return Error(504, "server_error", "deadline_exceeded",
                   absl::StrCat(result_.message(), ": raise dmsrt.deadline_seconds, or stream the "
                               "response to keep the tokens generated before it"));
    case v1::JOB_CANCELLED:
      return Error(499, "invalid_request_error", "cancelled",
                   "the job was cancelled (CancelJob) before it finished");
    default: {
      bool all_out_of_memory = !result_.threads().empty();
      for (const v1::ThreadFinished& t : result_.threads()) {
        all_out_of_memory = all_out_of_memory && t.reason() == v1::PREEMPTED_FAILED;
      }
      const std::string why = result_.message().empty() ? error_ : result_.message();
      if (retryable_) return Error(503, "server_error", "retryable", error_.empty() ? why : error_);
      if (all_out_of_memory) return Error(400, "invalid_request_error", "kv_capacity_exceeded", why);
      return Error(500, "server_error", nullptr, why.empty() ? "the job failed" : why);
    }
  }
  const bool chat = endpoint_ == OpenAiEndpoint::kChatCompletions;
  json resp = Envelope(chat ? "chat.completion" : "text_completion");
  json choices = json::array();
  for (const auto& [index, c] : choices_) {
    json choice = FinishedChoice(index, c);
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    choice["logprobs"] = Logprobs(c.token_ids, c.logprobs, c.top);
    choices.push_back(choice);
  }
  resp["choices"] = choices;
  resp["usage"] = Usage();
  resp["dmsrt"] = Extension();
  return OpenAiReply{200, Dump(resp)};
}

}  // namespace dmsrt
