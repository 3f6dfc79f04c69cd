// One job's bookkeeping on the coordinator (launch/service/job_record.h): the event log's order,
// votes and early stop, the outcome of each way a job ends, token timings, and the status figures.
// gRPC build only (the record holds JobEvents).
#include <gtest/gtest.h>

#ifdef DMSRT_HAVE_GRPC
#include "launch/service/job_record.h"

namespace dmsrt {
namespace {

using Clock = JobRecord::Clock;

v1::JobRequest Request(bool early_stop, bool stream_tokens) {
  v1::JobRequest r;
  r.set_chat("What is 2+2?");
  r.mutable_answer()->set_early_stop(early_stop);
  r.set_stream_tokens(stream_tokens);
  return r;
}

v1::ThreadFinished Ended(int32_t index, v1::FinishReason reason, const std::string& text,
                         const std::string& message = "") {
  v1::ThreadFinished tf;
  tf.set_thread_index(index);
  tf.set_reason(reason);
  tf.set_text(text);
  tf.set_message(message);
  tf.set_tokens(3);
  return tf;
}

std::vector<v1::JobEvent::EventCase> Kinds(const JobRecord& job) {
  std::vector<v1::JobEvent::EventCase> k;
  for (const v1::JobEvent& e : job.events()) k.push_back(e.event_case());
  return k;
}

TEST(JobRecord, VotesStopEarlyAndFinish_n3) {
  const Clock::time_point t0 = Clock::now();
  JobRecord job("job-1", Request(/*early_stop=*/true, false), "tp", {1, 2, 3, 4}, 3, 16, nullptr, t0);
  for (int i = 0; i < 3; ++i) job.threads()[i].replica = i % 2;
  ASSERT_EQ(job.events().size(), 1u);
  EXPECT_EQ(job.events()[0].accepted().n(), 3);
  EXPECT_EQ(job.events()[0].accepted().prompt_tokens(), 4);

  EXPECT_TRUE(job.RecordThreadFinished(Ended(0, v1::STOP, "so \\boxed{4}")));
  EXPECT_FALSE(job.StopEarly()) << "one vote, two threads running";
  EXPECT_FALSE(job.RecordThreadFinished(Ended(0, v1::STOP, "again"))) << "a thread ends once";
  EXPECT_FALSE(job.RecordThreadFinished(Ended(3, v1::STOP, "x"))) << "no thread 3";
  EXPECT_TRUE(job.RecordThreadFinished(Ended(1, v1::LENGTH, "4")));
  EXPECT_TRUE(job.StopEarly()) << "2 votes for 4 against 1 running";
  EXPECT_FALSE(job.StopEarly()) << "true once";
  EXPECT_TRUE(job.early_stopped());
  EXPECT_FALSE(job.AllFinished());
  EXPECT_TRUE(job.RecordThreadFinished(Ended(2, v1::CANCELLED, "")));
  ASSERT_TRUE(job.AllFinished());
  std::string msg;
  EXPECT_EQ(job.Outcome(&msg), v1::JOB_SUCCEEDED);
  double secs = -1;
  ASSERT_TRUE(job.Finish(v1::JOB_SUCCEEDED, msg, t0 + std::chrono::seconds(2), &secs));
  EXPECT_DOUBLE_EQ(secs, 2.0);
  EXPECT_FALSE(job.Finish(v1::JOB_FAILED, "late", t0, &secs)) << "a job ends once";
  EXPECT_TRUE(job.done());
  EXPECT_EQ(job.outcome(), v1::JOB_SUCCEEDED);

  using E = v1::JobEvent;
  EXPECT_EQ(Kinds(job), (std::vector<E::EventCase>{E::kAccepted, E::kThreadFinished, E::kVoteUpdate,
                                                    E::kThreadFinished, E::kVoteUpdate,
                                                    E::kThreadFinished, E::kVoteUpdate,
                                                    E::kJobFinished}));
  const v1::ThreadFinished& first = job.events()[1].thread_finished();
  EXPECT_TRUE(first.has_answer());
  EXPECT_EQ(first.answer(), "4");
  EXPECT_EQ(first.replica(), 0);
  EXPECT_EQ(job.events()[3].thread_finished().replica(), 1);
  EXPECT_FALSE(job.events()[5].thread_finished().has_answer()) << "a cancelled thread does not vote";
  EXPECT_EQ(job.events()[4].vote_update().finished(), 2);
  EXPECT_EQ(job.events()[4].vote_update().running(), 1);
  const v1::JobFinished& jf = job.events().back().job_finished();
  EXPECT_EQ(jf.selected_answer(), "4");
  EXPECT_TRUE(jf.early_stopped());
  ASSERT_EQ(jf.votes_size(), 1);
  EXPECT_EQ(jf.votes(0).votes(), 2);
  EXPECT_EQ(jf.threads_size(), 3);
  EXPECT_EQ(jf.usage().prompt_tokens(), 4);
  EXPECT_FALSE(job.RecordThreadFinished(Ended(2, v1::STOP, "4"))) << "nothing is recorded after the end";
}

TEST(JobRecord, OutcomeOfEachEnding) {
  const Clock::time_point t0 = Clock::now();
  std::string msg;
  {
    JobRecord job("j", Request(false, false), "", {1}, 2, 8, nullptr, t0);
    job.RecordThreadFinished(Ended(0, v1::ERROR, "", "replica 0 was lost"));
    job.RecordThreadFinished(Ended(1, v1::PREEMPTED_FAILED, "", "no room"));
    EXPECT_EQ(job.Outcome(&msg), v1::JOB_FAILED);
    EXPECT_EQ(msg, "replica 0 was lost");
  }
  {
    JobRecord job("j", Request(false, false), "", {1}, 2, 8, nullptr, t0);
    job.RecordThreadFinished(Ended(0, v1::STOP, "no number here"));
    job.RecordThreadFinished(Ended(1, v1::ERROR, "", "x"));
    EXPECT_EQ(job.Outcome(&msg), v1::JOB_NO_ANSWER);
  }
  {
    JobRecord job("j", Request(false, false), "", {1}, 1, 8, nullptr, t0);
    job.deadline_hit = true;
    job.RecordThreadFinished(Ended(0, v1::CANCELLED, ""));
    EXPECT_EQ(job.Outcome(&msg), v1::JOB_DEADLINE_EXCEEDED);
    EXPECT_NE(msg.find("deadline"), std::string::npos);
  }
  {
    JobRecord job("j", Request(false, false), "", {1}, 1, 8, nullptr, t0);
    job.cancel_requested = true;
    job.RecordThreadFinished(Ended(0, v1::STOP, "7"));
    EXPECT_EQ(job.Outcome(&msg), v1::JOB_CANCELLED);
  }
}

TEST(JobRecord, TokensTimingsLogAndStatus) {
  const Clock::time_point t0 = Clock::now();
  v1::JobRequest req = Request(false, /*stream_tokens=*/true);
  req.set_deadline_seconds(1.5);
  JobRecord job("job-7", req, "00-trace", {1, 2}, 2, 8, nullptr, t0);
  ASSERT_TRUE(job.deadline().has_value());
  EXPECT_EQ(*job.deadline() - t0, std::chrono::milliseconds(1500));
  v1::JobEvent tok;
  tok.set_job_id("job-7");
  tok.mutable_token()->set_thread_index(1);
  tok.mutable_token()->add_token_ids(5);
  tok.mutable_token()->add_token_ids(6);
  JobRecord::TokenTimes a = job.RecordTokens(tok, t0 + std::chrono::milliseconds(250));
  EXPECT_DOUBLE_EQ(a.time_to_first_token, 0.25);
  EXPECT_LT(a.inter_token, 0);
  JobRecord::TokenTimes b = job.RecordTokens(tok, t0 + std::chrono::milliseconds(300));
  EXPECT_LT(b.time_to_first_token, 0) << "the job's first token only";
  EXPECT_NEAR(b.inter_token, 0.05, 1e-9);
  tok.mutable_token()->set_thread_index(0);
  EXPECT_LT(job.RecordTokens(tok, t0 + std::chrono::milliseconds(310)).inter_token, 0)
      << "thread 0's first token";
  EXPECT_EQ(job.generated(), 6);
  EXPECT_EQ(job.events().size(), 4u) << "streamed tokens are logged";
  job.RecordError("replica 1 was lost", true);
  EXPECT_TRUE(job.events().back().error().retryable());
  job.RecordThreadFinished(Ended(1, v1::STOP, "\\boxed{12}"));
  v1::JobStatus s;
  job.FillStatus(&s, t0 + std::chrono::seconds(1));
  EXPECT_EQ(s.job_id(), "job-7");
  EXPECT_EQ(s.traceparent(), "00-trace");
  EXPECT_EQ(s.outcome(), v1::JOB_RUNNING);
  EXPECT_EQ(s.threads_finished(), 1);
  EXPECT_EQ(s.threads_running(), 1);
  EXPECT_EQ(s.selected_answer(), "12");
  EXPECT_EQ(s.threads_size(), 1) << "finished threads only";
  EXPECT_EQ(s.usage().generated_tokens(), 6);
  EXPECT_DOUBLE_EQ(s.usage().seconds(), 1.0);
  EXPECT_DOUBLE_EQ(s.usage().time_to_first_token_seconds(), 0.25);

  JobRecord quiet("job-8", Request(false, /*stream_tokens=*/false), "", {1}, 1, 8, nullptr, t0);
  tok.mutable_token()->set_thread_index(0);
  quiet.RecordTokens(tok, t0);
  EXPECT_EQ(quiet.events().size(), 1u) << "tokens are counted, not logged, unless streamed";
  EXPECT_EQ(quiet.generated(), 2);
}

}  // namespace
}  // namespace dmsrt
#else
TEST(JobRecord, NeedsGrpc) { GTEST_SKIP() << "built without gRPC: no coordinator"; }
#endif
