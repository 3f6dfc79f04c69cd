// OpenAI responses from job events (launch/service/openai_response.h): the log-probability
// listings of chat and legacy completions, streamed and whole, and the HTTP status of a whole
// reply for each way a job can end. gRPC build only (the responder reads JobEvents).
#include <gtest/gtest.h>

#ifdef DMSRT_HAVE_GRPC
#include <nlohmann/json.hpp>

#include "launch/service/openai_response.h"

namespace dmsrt {
namespace {

using nlohmann::json;

// Token i's text is "t<i>"; token 7 is half of a UTF-8 character.
std::string TokenText(int32_t id) { return id == 7 ? std::string("\xc3") : "t" + std::to_string(id); }

OpenAiRequest Request(bool logprobs, int32_t top) {
  OpenAiRequest r;
  r.logprobs = logprobs;
  r.top_logprobs = top;
  return r;
}

OpenAiResponder Responder(OpenAiEndpoint ep, const OpenAiRequest& r) {
  return OpenAiResponder(ep, r, "m", 1, TokenText);
}

// A token event of thread 0: `id` chosen with `lp`, and a listing of `top` (id, logprob) pairs.
v1::JobEvent Token(int32_t id, float lp, const std::vector<std::pair<int32_t, float>>& top) {
  v1::JobEvent e;
  e.set_job_id("job-1");
  v1::TokenDelta* t = e.mutable_token();
  t->set_thread_index(0);
  t->set_text(TokenText(id));
  t->add_token_ids(id);
  t->add_logprobs(lp);
  if (!top.empty()) {
    v1::TopLogprobs* l = t->add_top_logprobs();
    for (const auto& [tid, tlp] : top) {
      v1::TopLogprob* x = l->add_entries();
      x->set_token_id(tid);
      x->set_text(TokenText(tid));
      x->set_logprob(tlp);
    }
  }
  return e;
}

v1::JobEvent Finished(v1::JobOutcome outcome, v1::FinishReason reason, const std::string& message = "") {
  v1::JobEvent e;
  e.set_job_id("job-1");
  v1::JobFinished* f = e.mutable_job_finished();
  f->set_outcome(outcome);
  f->set_n(1);
  f->set_message(message);
  v1::ThreadFinished* t = f->add_threads();
  t->set_thread_index(0);
  t->set_reason(reason);
  t->set_message(message);
  return e;
}

json Body(const OpenAiReply& r) { return json::parse(r.body); }

TEST(OpenAiResponse, ChatListsTopLogprobsPerToken_k3) {
  OpenAiResponder r = Responder(OpenAiEndpoint::kChatCompletions, Request(true, 3));
  r.Record(Token(4, -0.5f, {{4, -0.5f}, {7, -1.25f}, {2, -3.0f}}));
  r.Record(Token(9, -2.0f, {{1, -0.25f}, {3, -1.5f}, {9, -2.0f}}));
  r.Record(Finished(v1::JOB_NO_ANSWER, v1::LENGTH));
  const OpenAiReply reply = r.Final();
  ASSERT_EQ(reply.status, 200) << reply.body;
  const json content = Body(reply)["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 2u);
  EXPECT_EQ(content[0]["token"], "t4");
  EXPECT_FLOAT_EQ(content[0]["logprob"].get<float>(), -0.5f);
  const json& top = content[0]["top_logprobs"];
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0]["token"], "t4");
  EXPECT_EQ(top[1]["bytes"], json::array({0xc3}));  // half a character: the bytes are exact
  EXPECT_EQ(top[1]["token"], "\xef\xbf\xbd");         // and the text says so
  EXPECT_FLOAT_EQ(top[2]["logprob"].get<float>(), -3.0f);
  EXPECT_EQ(content[1]["top_logprobs"][0]["token"], "t1");  // the chosen token need not be first
}

TEST(OpenAiResponse, ChatWithoutTopLogprobsHasEmptyListings) {
  OpenAiResponder r = Responder(OpenAiEndpoint::kChatCompletions, Request(true, 0));
  r.Record(Token(4, -0.5f, {}));
  r.Record(Finished(v1::JOB_SUCCEEDED, v1::STOP));
  const json content = Body(r.Final())["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 1u);
  EXPECT_EQ(content[0]["top_logprobs"], json::array());
  OpenAiResponder none = Responder(OpenAiEndpoint::kChatCompletions, Request(false, 0));
  none.Record(Token(4, -0.5f, {}));
  none.Record(Finished(v1::JOB_SUCCEEDED, v1::STOP));
  EXPECT_TRUE(Body(none.Final())["choices"][0]["logprobs"].is_null());
}

TEST(OpenAiResponse, CompletionsLegacyDictsAddTheChosenToken_k2) {
  OpenAiResponder r = Responder(OpenAiEndpoint::kCompletions, Request(true, 2));
  r.Record(Token(4, -0.5f, {{4, -0.5f}, {2, -1.0f}}));
  r.Record(Token(9, -2.0f, {{1, -0.25f}, {3, -1.5f}}));  // 9 is not among the 2 most likely
  r.Record(Finished(v1::JOB_NO_ANSWER, v1::LENGTH));
  const json lp = Body(r.Final())["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json::array({"t4", "t9"}));
  ASSERT_EQ(lp["top_logprobs"].size(), 2u);
  EXPECT_EQ(lp["top_logprobs"][0].size(), 2u);
  EXPECT_FLOAT_EQ(lp["top_logprobs"][0]["t2"].get<float>(), -1.0f);
  EXPECT_EQ(lp["top_logprobs"][1].size(), 3u);
  EXPECT_FLOAT_EQ(lp["top_logprobs"][1]["t9"].get<float>(), -2.0f);
  // logprobs 0: the chosen tokens only.
  OpenAiResponder zero = Responder(OpenAiEndpoint::kCompletions, Request(true, 0));
  zero.Record(Token(4, -0.5f, {}));
  zero.Record(Finished(v1::JOB_NO_ANSWER, v1::LENGTH));
  EXPECT_TRUE(Body(zero.Final())["choices"][0]["logprobs"]["top_logprobs"].is_null());
}

TEST(OpenAiResponse, StreamedChunksCarryTheListing) {
  OpenAiResponder chat = Responder(OpenAiEndpoint::kChatCompletions, Request(true, 2));
  std::string sse = chat.StreamEvent(Token(4, -0.5f, {{4, -0.5f}, {2, -1.0f}}));
  ASSERT_EQ(sse.rfind("data: ", 0), 0u);
  json chunk = json::parse(sse.substr(6));
  EXPECT_EQ(chunk["choices"][0]["logprobs"]["content"][0]["top_logprobs"].size(), 2u);
  OpenAiResponder legacy = Responder(OpenAiEndpoint::kCompletions, Request(true, 2));
  sse = legacy.StreamEvent(Token(9, -2.0f, {{1, -0.25f}, {3, -1.5f}}));
  chunk = json::parse(sse.substr(6));
  EXPECT_EQ(chunk["choices"][0]["logprobs"]["top_logprobs"][0].size(), 3u);
}

TEST(OpenAiResponse, WholeReplyStatusIsTheJobs) {
  struct Case {
    const char* name;
    v1::JobOutcome outcome;
    v1::FinishReason reason;
    bool retryable_error;
    int status;
    const char* code;  // null: none
  };
  const std::vector<Case> cases = {
      {"succeeded", v1::JOB_SUCCEEDED, v1::STOP, false, 200, nullptr},
      {"no_answer", v1::JOB_NO_ANSWER, v1::LENGTH, false, 200, nullptr},
      {"replica_lost", v1::JOB_FAILED, v1::ERROR, true, 503, "retryable"},
      {"out_of_kv", v1::JOB_FAILED, v1::PREEMPTED_FAILED, false, 400, "kv_capacity_exceeded"},
      {"engine_error", v1::JOB_FAILED, v1::ERROR, false, 500, nullptr},
      {"deadline", v1::JOB_DEADLINE_EXCEEDED, v1::CANCELLED, false, 504, "deadline_exceeded"},
      {"cancelled", v1::JOB_CANCELLED, v1::CANCELLED, false, 499, "cancelled"},
  };
  for (const Case& c : cases) {
    OpenAiResponder r = Responder(OpenAiEndpoint::kChatCompletions, Request(false, 0));
    r.Record(Token(4, -0.5f, {}));
    if (c.retryable_error) {
      v1::JobEvent e;
      e.set_job_id("job-1");
      e.mutable_error()->set_message("replica 0 was lost and no other replica can take its 1 threads");
      e.mutable_error()->set_retryable(true);
      r.Record(e);
    }
    r.Record(Finished(c.outcome, c.reason, "why it ended"));
    const OpenAiReply reply = r.Final();
    EXPECT_EQ(reply.status, c.status) << c.name << ": " << reply.body;
    const json body = Body(reply);
    if (c.status == 200) {
      EXPECT_TRUE(body.contains("choices")) << c.name;
      continue;
    }
    ASSERT_TRUE(body.contains("error")) << c.name;
    EXPECT_FALSE(body["error"]["message"].get<std::string>().empty()) << c.name;
    EXPECT_EQ(body["error"]["code"], c.code ? json(c.code) : json(nullptr)) << c.name;
    EXPECT_EQ(body["dmsrt"]["job_id"], "job-1") << c.name;
    EXPECT_EQ(body["dmsrt"]["outcome"], v1::JobOutcome_Name(c.outcome)) << c.name;
  }
  // No JobFinished at all.
  OpenAiResponder r = Responder(OpenAiEndpoint::kCompletions, Request(false, 0));
  r.Record(Token(4, -0.5f, {}));
  EXPECT_EQ(r.Final().status, 500);
}

}  // namespace
}  // namespace dmsrt
#else
TEST(OpenAiResponse, NeedsGrpc) { GTEST_SKIP() << "built without gRPC: no coordinator, no HTTP API"; }
#endif
