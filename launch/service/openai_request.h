// Parsing and validation of OpenAI-compatible request bodies (`POST /v1/chat/completions`,
// `POST /v1/completions`) into the JobRequest the gRPC path takes. A pure function of the body:
// no I/O, no globals, never throws (tests/fuzz/openai_request_fuzz.cc calls it with arbitrary
// bytes).
//
// Fields: messages | prompt, max_tokens, max_completion_tokens, temperature, top_p, seed, stop,
// n, logprobs, top_logprobs, stream, stream_options.include_usage, user, model. Chat takes
// "logprobs": true and "top_logprobs": k (0..20, only with logprobs); completions take the legacy
// "logprobs": k (0..20). Both set JobRequest.response.top_logprobs.
// dmsrt's own options go in one extension object, "dmsrt", whose fields are those of the gRPC
// JobRequest in its JSON form: {"dms": {"policy": "KV_POLICY_DMS", "window": 64},
// "kv": {"kv_budget_bytes": "1000000"}, "answer": {"selection": "SELECTION_MAJORITY_VOTE",
// "early_stop": true, "extraction_regex": "..."}, "deadline_seconds": 30,
// "sampling": {"top_k": 40}, "stopping": {"ignore_eos": true}}. Unknown top-level fields are
// ignored; fields whose meaning dmsrt cannot honour (tools, functions, function_call,
// tool_choice, response_format other than text, echo, suffix) are a 400, as are extension fields
// the OpenAI ones set (the input, n, stream_tokens, response).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "dmsrt/v1/dmsrt.pb.h"

namespace dmsrt {

enum class OpenAiEndpoint { kChatCompletions, kCompletions };

struct OpenAiRequest {
  v1::JobRequest job;          // input, n, sampling, stopping and the "dmsrt" extension
  std::string model;           // echoed back; any value is accepted (one model is served)
  std::string user;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // list the chosen tokens' log-probabilities
  int32_t top_logprobs = 0;    // and this many most likely tokens per position
};

// An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct OpenAiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
};

struct OpenAiLimits {
  int32_t max_n = 64;
};

// True and `*out` filled when `body` is a valid request for `endpoint`; else false and `*err`
// says which field is wrong and what to send instead.
bool ParseOpenAiRequest(OpenAiEndpoint endpoint, std::string_view body, const OpenAiLimits& limits,
                        OpenAiRequest* out, OpenAiError* err);

// The JSON body of an error.
std::string OpenAiErrorJson(const OpenAiError& err);

}  // namespace dmsrt
