// Turns a job's event log into OpenAI-compatible responses: server-sent-event chunks while it runs
// (`stream: true`) or one completion object at the end.
//
// Choices are the job's threads (choice i = thread i). Each response carries an extension field
// "dmsrt": {"job_id", "outcome", "selected_answer" (null when none), "votes": {answer: count},
// "early_stopped", "n"} and each finished choice {"dmsrt": {"reason", "answer", "tokens",
// "cache_cr"}}. usage.prompt_tokens counts the prompt once (it is prefilled once and shared);
// usage.completion_tokens counts every thread's generated tokens. finish_reason is "stop" (EOS or
// a stop string), "length", or "cancelled" / "error" for threads that did not run to the end.
//
// Not thread-safe: one per request, used by the thread that serves it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dmsrt/v1/dmsrt.pb.h"
#include "launch/service/openai_request.h"

namespace dmsrt {

class OpenAiResponder {
 public:
  // `token_text` gives a token's bytes for log-probability listings.
  OpenAiResponder(OpenAiEndpoint endpoint, const OpenAiRequest& request, std::string model,
                  int64_t created_unix, std::function<std::string(int32_t)> token_text);

  // Streaming: the SSE text ("data: {...}\n\n", possibly several) for one event; may be empty.
  // The JobFinished event also yields the usage chunk (with include_usage) and "data: [DONE]".
  std::string StreamEvent(const v1::JobEvent& event);
  // Non-streaming: records the event.
  void Record(const v1::JobEvent& event);
  // Non-streaming: the completion object once JobFinished was recorded (or an error object).
  std::string Final() const;
  bool finished() const { return finished_; }

 private:
  struct Choice {
    std::string text;
    std::vector<int32_t> token_ids;
    std::vector<float> logprobs;
    bool started = false;
    bool done = false;
    v1::ThreadFinished result;
  };
  nlohmann::json Envelope(const char* object) const;
  nlohmann::json Logprobs(const std::vector<int32_t>& ids, const std::vector<float>& lps) const;
  nlohmann::json Extension() const;
  nlohmann::json Usage() const;
  nlohmann::json FinishedChoice(int32_t index, const Choice& c) const;

  OpenAiEndpoint endpoint_;
  bool logprobs_;
  bool include_usage_;
  std::string model_;
  int64_t created_;
  std::string id_;
  std::map<int32_t, Choice> choices_;
  bool finished_ = false;
  v1::JobFinished result_;
  std::string error_;  // an Error event's message
  std::function<std::string(int32_t)> token_text_;
};

}  // namespace dmsrt
