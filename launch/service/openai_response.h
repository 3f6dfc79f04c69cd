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
// Log-probabilities (request.logprobs): chat lists choices[].logprobs.content[] = {token, logprob,
// bytes, top_logprobs: [{token, logprob, bytes}] (request.top_logprobs entries, most likely
// first)}; completions list {tokens, token_logprobs, top_logprobs: [{text: logprob}] per token
// (the k most likely plus the chosen token when it is not among them, as OpenAI's legacy API
// does; null with logprobs 0), text_offset: null}.
//
// A non-streamed reply has the job's own status (Final): 200 for a job that ran to the end
// (JOB_SUCCEEDED, JOB_NO_ANSWER), an error object otherwise.
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

// A whole HTTP reply: its status and JSON body.
struct OpenAiReply {
  int status = 200;
  std::string body;
};

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
  // Non-streaming, once Follow returned: the completion object with status 200 when the job ran
  // to the end, else an OpenAI error object with the job's "dmsrt" extension beside it:
  //   JOB_FAILED: 503 (code "retryable") when an Error event said a retry can help (a replica was
  //     lost and no other could take its threads), 400 (code "kv_capacity_exceeded") when every
  //     thread failed for want of KV memory, else 500;
  //   JOB_DEADLINE_EXCEEDED: 504 (code "deadline_exceeded");
  //   JOB_CANCELLED (CancelJob from another client): 499 (code "cancelled"), gRPC CANCELLED's
  //     usual HTTP mapping;
  //   no JobFinished recorded: 500.
  OpenAiReply Final() const;
  bool finished() const { return finished_; }

 private:
  struct Choice {
    std::string text;
    std::vector<int32_t> token_ids;
    std::vector<float> logprobs;
    std::vector<v1::TopLogprobs> top;  // per token, when top_logprobs_ > 0
    bool started = false;
    bool done = false;
    v1::ThreadFinished result;
  };
  nlohmann::json Envelope(const char* object) const;
  nlohmann::json Logprobs(const std::vector<int32_t>& ids, const std::vector<float>& lps,
                          const std::vector<v1::TopLogprobs>& top) const;
  OpenAiReply Error(int status, const char* type, const char* code, const std::string& message) const;
  nlohmann::json Extension() const;
  nlohmann::json Usage() const;
  nlohmann::json FinishedChoice(int32_t index, const Choice& c) const;

  OpenAiEndpoint endpoint_;
  bool logprobs_;
  int32_t top_logprobs_;
  bool include_usage_;
  std::string model_;
  int64_t created_;
  std::string id_;
  std::map<int32_t, Choice> choices_;
  bool finished_ = false;
  v1::JobFinished result_;
  std::string error_;      // an Error event's message
  bool retryable_ = false;  // an Error event said a retry can help
  std::function<std::string(int32_t)> token_text_;
};

}  // namespace dmsrt
