// Fuzz target for the OpenAI request parser (launch/service/openai_request.h): any byte string,
// for either endpoint, must give either a request within the limits or a 4xx error whose JSON
// has exactly message/type/param/code, and never crash, throw or hang.
//
// Built two ways: with clang -fsanitize=fuzzer (define DMSRT_LIBFUZZER) it is a libFuzzer target;
// in the normal build it carries its own bounded driver (main below) that mutates seed requests
// for a fixed time, so CI runs it without clang (ctest -L fuzz).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "launch/service/openai_request.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto endpoint = (data[0] & 1) ? dmsrt::OpenAiEndpoint::kChatCompletions
                                      : dmsrt::OpenAiEndpoint::kCompletions;
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  dmsrt::OpenAiLimits limits;
  limits.max_n = 16;
  dmsrt::OpenAiRequest req;
  dmsrt::OpenAiError err;
  if (dmsrt::ParseOpenAiRequest(endpoint, body, limits, &req, &err)) {
    Check(req.job.n() >= 0 && req.job.n() <= limits.max_n, "n within [0, max_n]");
    Check(req.job.stopping().max_tokens() >= 0, "max_tokens >= 0");
    Check(req.job.input_case() != dmsrt::v1::JobRequest::INPUT_NOT_SET, "an input is set");
    Check(req.job.stream_tokens(), "token events are requested");
  } else {
    Check(err.status >= 400 && err.status < 500, "a 4xx status");
    Check(!err.message.empty(), "an error message");
    const auto j = nlohmann::json::parse(dmsrt::OpenAiErrorJson(err), nullptr, false);
    Check(!j.is_discarded() && j.is_object() && j.size() == 1, "the error body is one object");
    const auto& e = j["error"];
    Check(e.is_object() && e.size() == 4 && e.contains("message") && e.contains("type") &&
              e.contains("param") && e.contains("code"),
          "error has message, type, param, code");
  }
  return 0;
}

#ifndef DMSRT_LIBFUZZER
// usage: openai_request_fuzz [SECONDS]  (default 10). Exit 0 when no invariant failed.
int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 10.0;
  const std::vector<std::string> seeds = {
      R"({"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"2+3?"}],"max_tokens":16,"n":4,"temperature":0.7,"top_p":0.9,"seed":1,"stop":["\n"],"logprobs":true,"stream":true,"stream_options":{"include_usage":true},"user":"u"})",
      R"({"prompt":"The capital of France is","max_completion_tokens":5,"logprobs":0,"stop":"x","dmsrt":{"dms":{"policy":"KV_POLICY_DMS","window":64},"answer":{"selection":"SELECTION_MAJORITY_VOTE","early_stop":true},"deadline_seconds":30}})",
      R"({"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"dmsrt":{"kv":{"kv_budget_bytes":"1000000"}}})",
      R"({"prompt":["one"],"n":2,"tools":[],"response_format":{"type":"text"}})",
      R"([1,2,{"a":null,"b":true,"c":-1e308,"d":"\u00e9\ud83d\ude00"}])",
  };
  const std::vector<std::string> tokens = {"{", "}", "[", "]", ",", ":", "\"", "null", "true", "-1",
                                           "1e999", "0", "\"n\"", "\"messages\"", "\"prompt\"",
                                           "\"dmsrt\"", "\\u0000", "\xff", "\xc3", "9223372036854775808"};
  std::mt19937_64 rng(12345);
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int64_t runs = 0;
  while (std::chrono::steady_clock::now() < end) {
    for (int k = 0; k < 256; ++k, ++runs) {
      std::string s = std::string(1, static_cast<char>(rng() & 1)) + seeds[rng() % seeds.size()];
      const int edits = 1 + static_cast<int>(rng() % 8);
      for (int e = 0; e < edits && !s.empty(); ++e) {
        const size_t pos = rng() % s.size();
        switch (rng() % 5) {
          case 0: s[pos] = static_cast<char>(rng()); break;
          case 1: s.erase(pos, 1 + rng() % 8); break;
          case 2: s.insert(pos, tokens[rng() % tokens.size()]); break;
          case 3: s.insert(pos, seeds[rng() % seeds.size()].substr(0, rng() % 64)); break;
          default: s.insert(pos, std::string(1 + rng() % 40, "[{"[rng() % 2])); break;
        }
      }
      LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    }
  }
  std::printf("openai_request_fuzz: %lld inputs, no invariant failed\n", static_cast<long long>(runs));
  return 0;
}
#endif
