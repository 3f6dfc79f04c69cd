// The OpenAI request parser (launch/service/openai_request.h): field mapping onto JobRequest and
// the 400s for what dmsrt cannot honour. gRPC build only (the parser fills a JobRequest).
#include <gtest/gtest.h>

#ifdef DMSRT_HAVE_GRPC
#include "launch/service/openai_request.h"

namespace dmsrt {
namespace {

bool Parse(OpenAiEndpoint ep, const std::string& body, OpenAiRequest* r, OpenAiError* e) {
  OpenAiLimits limits;
  limits.max_n = 16;
  return ParseOpenAiRequest(ep, body, limits, r, e);
}

TEST(OpenAiRequest, ChatFieldsMapOntoJobRequest) {
  OpenAiRequest r;
  OpenAiError e;
  ASSERT_TRUE(Parse(OpenAiEndpoint::kChatCompletions,
                    R"({"model":"x","messages":[{"role":"developer","content":"Be brief."},
                        {"role":"user","content":[{"type":"text","text":"2+"},{"type":"text","text":"3?"}]}],
                        "max_completion_tokens":19,"n":4,"temperature":0.5,"top_p":0.9,"seed":-1,
                        "stop":["\n","##"],"logprobs":true,"stream":true,
                        "stream_options":{"include_usage":true},"user":"u","unknown_field":[1]})",
                    &r, &e))
      << e.message;
  const v1::JobRequest& j = r.job;
  ASSERT_EQ(j.conversation().messages_size(), 2);
  EXPECT_EQ(j.conversation().messages(0).role(), "system");
  EXPECT_EQ(j.conversation().messages(1).content(), "2+3?");
  EXPECT_EQ(j.n(), 4);
  EXPECT_EQ(j.stopping().max_tokens(), 19);
  EXPECT_EQ(j.stopping().stop_size(), 2);
  EXPECT_FLOAT_EQ(j.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(j.sampling().top_p(), 0.9f);
  EXPECT_EQ(j.sampling().seed(), ~uint64_t{0});
  EXPECT_TRUE(j.stream_tokens());
  EXPECT_TRUE(r.stream && r.include_usage && r.logprobs);
  EXPECT_EQ(r.user, "u");
}

TEST(OpenAiRequest, ExtensionUsesJobRequestFieldNames) {
  OpenAiRequest r;
  OpenAiError e;
  ASSERT_TRUE(Parse(OpenAiEndpoint::kCompletions,
                    R"({"prompt":["one"],"dmsrt":{"dms":{"policy":"KV_POLICY_DMS","window":64},
                        "answer":{"selection":"SELECTION_MAX_MEAN_LOGPROB","early_stop":true},
                        "deadline_seconds":30,"kv":{"kv_budget_bytes":"1000000"}}})",
                    &r, &e))
      << e.message;
  EXPECT_EQ(r.job.prompt(), "one");
  EXPECT_EQ(r.job.dms().policy(), v1::KV_POLICY_DMS);
  EXPECT_EQ(r.job.dms().window(), 64);
  EXPECT_EQ(r.job.answer().selection(), v1::SELECTION_MAX_MEAN_LOGPROB);
  EXPECT_TRUE(r.job.answer().early_stop());
  EXPECT_DOUBLE_EQ(r.job.deadline_seconds(), 30);
  EXPECT_EQ(r.job.n(), 0);  // budget mode: the coordinator picks n
}

TEST(OpenAiRequest, TopLogprobsSetTheResponseOptions) {
  OpenAiRequest r;
  OpenAiError e;
  ASSERT_TRUE(Parse(OpenAiEndpoint::kChatCompletions,
                    R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":20})",
                    &r, &e))
      << e.message;
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 20);
  EXPECT_EQ(r.job.response().top_logprobs(), 20);
  ASSERT_TRUE(Parse(OpenAiEndpoint::kChatCompletions,
                    R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":0})",
                    &r, &e));
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.job.response().top_logprobs(), 0);
  // The legacy form: logprobs is the listing size; 0 lists the chosen tokens only.
  ASSERT_TRUE(Parse(OpenAiEndpoint::kCompletions, R"({"prompt":"x","logprobs":3})", &r, &e)) << e.message;
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 3);
  EXPECT_EQ(r.job.response().top_logprobs(), 3);
  ASSERT_TRUE(Parse(OpenAiEndpoint::kCompletions, R"({"prompt":"x","logprobs":0})", &r, &e));
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.job.response().top_logprobs(), 0);
  ASSERT_TRUE(Parse(OpenAiEndpoint::kCompletions, R"({"prompt":"x"})", &r, &e));
  EXPECT_FALSE(r.logprobs);
  EXPECT_EQ(r.job.response().top_logprobs(), 0);
}

TEST(OpenAiRequest, RefusalsNameTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"prompt":"x","n":0})", "n"},
      {R"({"prompt":"x","n":17})", "n"},
      {R"({"prompt":"x","max_tokens":-1})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":1.5})", "max_tokens"},
      {R"({"prompt":"x","temperature":"hot"})", "temperature"},
      {R"({"prompt":"x","tools":[]})", "tools"},
      {R"({"prompt":"x","function_call":"auto"})", "function_call"},
      {R"({"prompt":"x","response_format":{"type":"json_object"}})", "response_format"},
      {R"({"prompt":"x","top_logprobs":2})", "top_logprobs"},  // completions: logprobs: k
      {R"({"prompt":"x","logprobs":21})", "logprobs"},
      {R"({"prompt":"x","logprobs":true})", "logprobs"},
      {R"({"prompt":"x","dmsrt":{"response":{"top_logprobs":3}}})", "dmsrt.response"},
      {R"({"prompt":"x","dmsrt":{"n":3}})", "dmsrt.n"},
      {R"({"prompt":"x","dmsrt":{"dms":{"policy":"KV_POLICY_NOPE"}}})", "dmsrt"},
      {R"({"prompt":[1,2]})", "prompt"},
      {R"({"prompt":"x","stop":[1]})", "stop"},
      {R"({"prompt":"x","seed":18446744073709551615})", "seed"},
      {R"({"prompt":"x","n":9223372036854775808})", "n"},
  };
  for (const auto& [body, param] : cases) {
    OpenAiRequest r;
    OpenAiError e;
    EXPECT_FALSE(Parse(OpenAiEndpoint::kCompletions, body, &r, &e)) << body;
    EXPECT_EQ(e.status, 400) << body;
    EXPECT_EQ(e.param, param) << body;
    EXPECT_FALSE(e.message.empty()) << body;
  }
  OpenAiRequest r;
  OpenAiError e;
  EXPECT_FALSE(Parse(OpenAiEndpoint::kChatCompletions, R"({"messages":[{"role":"tool","content":"x"}]})", &r, &e));
  EXPECT_EQ(e.param, "messages[0].role");
  EXPECT_FALSE(Parse(OpenAiEndpoint::kChatCompletions, std::string(100, '[') , &r, &e));
  const std::string chat = R"({"messages":[{"role":"user","content":"x"}],)";
  EXPECT_FALSE(Parse(OpenAiEndpoint::kChatCompletions, chat + R"("top_logprobs":3})", &r, &e));
  EXPECT_EQ(e.param, "top_logprobs");
  EXPECT_NE(e.message.find("logprobs"), std::string::npos) << e.message;
  EXPECT_FALSE(Parse(OpenAiEndpoint::kChatCompletions, chat + R"("logprobs":true,"top_logprobs":21})", &r, &e));
  EXPECT_EQ(e.param, "top_logprobs");
  EXPECT_FALSE(Parse(OpenAiEndpoint::kCompletions, "{\"prompt\":\"\xff\"}", &r, &e));
}

TEST(OpenAiRequest, ErrorJsonHasTheFourFields) {
  OpenAiError e;
  e.message = "m";
  e.param = "n";
  EXPECT_EQ(OpenAiErrorJson(e),
            R"({"error":{"code":null,"message":"m","param":"n","type":"invalid_request_error"}})");
}

}  // namespace
}  // namespace dmsrt
#else
TEST(OpenAiRequest, NeedsGrpc) { GTEST_SKIP() << "built without gRPC: no coordinator, no HTTP API"; }
#endif
