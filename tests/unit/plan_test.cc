// The capacity planner (launch/plan/): length distributions, the step-model fit, profiles, the
// discrete-event simulation over the real engine and admission code (exact latencies on hand-made
// step costs, memory pressure, determinism, a pinned scenario), and the capacity search with its
// answers for bad input. Deterministic; each case runs in well under a second.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "launch/plan/plan.h"
#include "launch/plan/profile.h"
#include "launch/plan/sim.h"
#include "launch/plan/step_check.h"
#include "launch/plan/trace.h"
#include "runtime/kv/kv_sizing.h"
#include "runtime/model/synthetic_model.h"

namespace dmsrt {
namespace {

ModelConfig Tiny() {
  absl::StatusOr<ModelConfig> c = SyntheticConfig("tiny-qwen3");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

// 10 ms per step whatever it holds.
StepCosts FlatCosts() {
  StepCosts c;
  c.fixed = 0.01;
  c.prefill_fixed = 0.01;
  return c;
}

SimReplicaConfig TinyReplica(int64_t kv_budget_bytes) {
  SimReplicaConfig r;
  r.model = Tiny();
  r.kv_budget_bytes = kv_budget_bytes;
  r.kv_block_bytes = CpuKvBlockBytes(r.model.head_dim, 16);
  r.costs = FlatCosts();
  return r;
}

Workload OneShape(int32_t n, int64_t prompt, int64_t gen, int64_t jobs, double rate) {
  Workload w;
  w.n = n;
  w.prompt = *ParseLengthDist(absl::StrCat("fixed:", prompt), 100000);
  w.reasoning = *ParseLengthDist(absl::StrCat("fixed:", gen), 100000);
  w.jobs = jobs;
  w.jobs_per_hour = rate;
  w.warmup_fraction = 0.0;
  return w;
}

TEST(PlanLengthTest, ParsesAndRefusesForms) {
  EXPECT_TRUE(ParseLengthDist("fixed:19", 100).ok());
  EXPECT_TRUE(ParseLengthDist("uniform:1:111", 100).ok());
  EXPECT_TRUE(ParseLengthDist("lognormal:8192:0.5", 32768).ok());
  for (const char* bad : {"", "fixed", "fixed:0", "uniform:5:5", "lognormal:100:0", "gamma:1:2",
                          "fixed:abc", "fixed:nan"}) {
    EXPECT_FALSE(ParseLengthDist(bad, 100).ok()) << bad;
  }
}

// Drawing lengths through the hazard (what the simulated backend does, token by token) gives
// the distribution Sample() draws from: same mean within sampling error, same clipping.
TEST(PlanLengthTest, HazardMatchesSampling_lognormal_median111_sigma08_max1000) {
  const LengthDist d = *ParseLengthDist("lognormal:111:0.8", 1000);
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(0, 1);
  double by_hazard = 0, by_sample = 0;
  const int kN = 4000;
  for (int i = 0; i < kN; ++i) {
    int64_t k = 1;
    while (u(rng) >= d.Hazard(k)) ++k;
    EXPECT_LE(k, 1000);
    by_hazard += static_cast<double>(k);
    by_sample += static_cast<double>(d.Sample(rng));
  }
  by_hazard /= kN;
  by_sample /= kN;
  EXPECT_NEAR(by_hazard / d.Mean(), 1.0, 0.05);
  EXPECT_NEAR(by_sample / d.Mean(), 1.0, 0.05);
  const LengthDist f = *ParseLengthDist("fixed:19", 100);
  EXPECT_EQ(f.Hazard(18), 0.0);
  EXPECT_EQ(f.Hazard(19), 1.0);
  EXPECT_EQ(f.Mean(), 19.0);
}

TEST(PlanProfileTest, FitRecoversTheStepModel) {
  StepCosts truth;
  truth.fixed = 0.02;
  truth.per_decode_row = 0.001;
  truth.per_kv_token = 2e-7;
  truth.prefill_fixed = 0.015;
  truth.per_prefill_token = 3e-4;
  std::vector<DecodePoint> dec;
  for (int64_t b : {1, 4, 19}) {
    for (int64_t ctx : {64, 1111}) dec.push_back({b, b * ctx, truth.Seconds(b, b * ctx, 0, 0)});
  }
  std::vector<PrefillPoint> pre;
  for (int64_t c : {16, 111, 256}) pre.push_back({c, truth.Seconds(0, 0, c, 0)});
  StepCosts fit;
  double err = 1;
  FitStepCosts(dec, pre, &fit, &err);
  EXPECT_NEAR(fit.fixed, truth.fixed, 1e-9);
  EXPECT_NEAR(fit.per_decode_row, truth.per_decode_row, 1e-10);
  EXPECT_NEAR(fit.per_kv_token, truth.per_kv_token, 1e-12);
  EXPECT_NEAR(fit.prefill_fixed, truth.prefill_fixed, 1e-9);
  EXPECT_NEAR(fit.per_prefill_token, truth.per_prefill_token, 1e-10);
  EXPECT_LT(err, 1e-6);
}

TEST(PlanProfileTest, MissingFieldIsNamed) {
  nlohmann::json j = {{"schema_version", 2}, {"model", "m"}, {"weight_bytes", 1}, {"provenance", {}}};
  absl::StatusOr<Profile> p = ProfileFromJson(j, "x.json");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("'step_model'"), std::string::npos) << p.status();
  j["step_model"] = {{"decode", {{{"batch", 1}, {"kv_tokens", 10}, {"seconds", 0.1}}}}};
  p = ProfileFromJson(j, "x.json");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("step_model.prefill"), std::string::npos) << p.status();
  j["schema_version"] = 1;
  EXPECT_NE(ProfileFromJson(j, "x.json").status().message().find("schema_version 1"),
            std::string::npos);
}

// A GPU profile: the host floor is fitted from its own points and a step takes the larger of
// device and host time; it must say how large the device is.
TEST(PlanProfileTest, GpuProfileHostFloorAndDeviceMemory) {
  nlohmann::json j = {
      {"schema_version", 2}, {"model", "qwen3-8b"}, {"weight_bytes", 1}, {"provenance", {}},
      {"backend", "cuda"},
      {"step_model",
       // 5 ms + 10 us per row + 2 ns per KV token.
       {{"decode", {{{"batch", 1}, {"kv_tokens", 4096}, {"seconds", 0.0050182}},
                    {{"batch", 64}, {"kv_tokens", 262144}, {"seconds", 0.006164288}},
                    {{"batch", 19}, {"kv_tokens", 155648}, {"seconds", 0.005501296}}}},
        {"prefill", {{{"tokens", 256}, {"seconds", 0.01}}, {{"tokens", 2048}, {"seconds", 0.03}}}}}},
      {"host_step", {{"decode", {{{"batch", 32}, {"seconds", 0.002}}, {{"batch", 256}, {"seconds", 0.016}}}}}}};
  absl::StatusOr<Profile> p = ProfileFromJson(j, "gpu.json");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("device_memory_bytes"), std::string::npos) << p.status();
  j["device_memory_bytes"] = 80e9;
  p = ProfileFromJson(j, "gpu.json");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->backend, "cuda");
  EXPECT_EQ(p->device_memory_bytes, 80000000000);
  EXPECT_NEAR(p->costs.host_per_decode_row, 0.014 / 224, 1e-12);
  EXPECT_NEAR(p->costs.host_fixed, 0.002 - 32 * 0.014 / 224, 1e-12);
  const StepCosts& c = p->costs;
  // Small batch: the device binds; large batch: the host.
  EXPECT_EQ(c.Seconds(1, 4096, 0, 0), c.DeviceSeconds(1, 4096, 0));
  EXPECT_GT(c.Seconds(256, 256 * 1000, 0, 0), c.DeviceSeconds(256, 256 * 1000, 0));
  EXPECT_NEAR(c.Seconds(256, 256 * 1000, 0, 0), c.host_fixed + 256 * c.host_per_decode_row, 1e-12);
  EXPECT_EQ(c.Seconds(0, 0, 256, 0), c.DeviceSeconds(0, 0, 256)) << "prefill-only steps have no host floor";
  j["backend"] = "tpu";
  EXPECT_FALSE(ProfileFromJson(j, "gpu.json").ok());
}

// The engine samples on its own thread after the forward pass: a profile's sampling cost adds to
// every step per sampled row, beyond the host floor; the fit uses a point's mean where it has one.
TEST(PlanProfileTest, SamplingAddsPerSampledRowAndMeansAreFitted) {
  nlohmann::json j = {
      {"schema_version", 2}, {"model", "m"}, {"weight_bytes", 1}, {"provenance", {}},
      {"step_model",
       // means: 10 ms + 1 ms per row + 1 us per KV token; the medians say otherwise.
       {{"decode", {{{"batch", 1}, {"kv_tokens", 64}, {"seconds", 0.001}, {"mean", 0.011064}},
                    {{"batch", 4}, {"kv_tokens", 1000}, {"seconds", 0.002}, {"mean", 0.015}},
                    {{"batch", 4}, {"kv_tokens", 4000}, {"seconds", 0.002}, {"mean", 0.018}},
                    {{"batch", 16}, {"kv_tokens", 256}, {"seconds", 0.003}, {"mean", 0.026256}}}},
        {"prefill", {{{"tokens", 16}, {"seconds", 0.01}}, {{"tokens", 64}, {"seconds", 0.04}}}},
        {"sampling", {{"row_seconds", 0.0008}, {"temperature", 0.7}}}}}};
  absl::StatusOr<Profile> p = ProfileFromJson(j, "s.json");
  ASSERT_TRUE(p.ok()) << p.status();
  const StepCosts& c = p->costs;
  EXPECT_NEAR(c.DeviceSeconds(4, 1000, 0), 0.015, 1e-9) << "fitted to the means";
  EXPECT_EQ(c.per_sampled_row, 0.0008);
  EXPECT_NEAR(c.Seconds(4, 1000, 0, 4), 0.015 + 4 * 0.0008, 1e-9);
  EXPECT_NEAR(c.Seconds(0, 0, 64, 1), c.DeviceSeconds(0, 0, 64) + 0.0008, 1e-12);
  EXPECT_EQ(c.Seconds(4, 256, 0, 0), c.DeviceSeconds(4, 256, 0));
  j["step_model"]["sampling"] = {{"temperature", 0.7}};
  p = ProfileFromJson(j, "s.json");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("row_seconds"), std::string::npos) << p.status();
}

// A measured profile's prefill steps are read off its grid points: exact at the points, linear
// between them, the smallest point's cost per token below it, the last segment's slope above.
TEST(PlanProfileTest, PrefillFollowsTheMeasuredPoints) {
  nlohmann::json j = {
      {"schema_version", 2}, {"model", "m"}, {"weight_bytes", 1}, {"provenance", {}},
      {"step_model",
       {{"decode", {{{"batch", 1}, {"kv_tokens", 64}, {"seconds", 0.01}},
                    {{"batch", 4}, {"kv_tokens", 1000}, {"seconds", 0.02}},
                    {{"batch", 16}, {"kv_tokens", 256}, {"seconds", 0.05}}}},
        // 2 ms per token at 16, 2.5 at 64, 3 at 256: no one line goes through these.
        {"prefill", {{{"tokens", 256}, {"seconds", 0.768}}, {{"tokens", 16}, {"seconds", 0.032}},
                     {{"tokens", 64}, {"seconds", 0.16}}}}}}};
  absl::StatusOr<Profile> p = ProfileFromJson(j, "p.json");
  ASSERT_TRUE(p.ok()) << p.status();
  const StepCosts& c = p->costs;
  ASSERT_EQ(c.prefill_curve.size(), 3u);
  EXPECT_NEAR(c.DeviceSeconds(0, 0, 16), 0.032, 1e-12);
  EXPECT_NEAR(c.DeviceSeconds(0, 0, 64), 0.16, 1e-12);
  EXPECT_NEAR(c.DeviceSeconds(0, 0, 256), 0.768, 1e-12);
  EXPECT_NEAR(c.DeviceSeconds(0, 0, 160), 0.16 + 96 * (0.608 / 192), 1e-12);
  EXPECT_NEAR(c.DeviceSeconds(0, 0, 8), 0.016, 1e-12);
  EXPECT_NEAR(c.DeviceSeconds(0, 0, 384), 0.768 + 128 * (0.608 / 192), 1e-12);
  // A step with decode rows adds the prefill tokens' time off the same curve.
  EXPECT_NEAR(c.DeviceSeconds(4, 1000, 64), c.DeviceSeconds(4, 1000, 0) + 0.16, 1e-12);
}

TEST(PlanProfileTest, DatasheetIsUnmeasuredAndFromPeaks) {
  const ModelConfig q = *SyntheticConfig("qwen3-8b");
  absl::StatusOr<Profile> h100 = DatasheetProfile("h100-sxm", q, 1);
  ASSERT_TRUE(h100.ok()) << h100.status();
  EXPECT_FALSE(h100->measured);
  EXPECT_NEAR(h100->costs.fixed, 2 * MatrixParams(q) / 3.35e12, 1e-12);
  EXPECT_NEAR(h100->costs.per_kv_token, 36.0 * 8 * 128 * 4 / 3.35e12, 1e-15);
  absl::StatusOr<Profile> h200 = DatasheetProfile("h200", q, 2);
  ASSERT_TRUE(h200.ok());
  EXPECT_GT(h200->costs.allreduce_per_step, 0);
  EXPECT_LT(h200->costs.fixed, h100->costs.fixed);
  EXPECT_FALSE(DatasheetProfile("b300", q, 1).ok());
}

// One job alone on flat 10 ms steps: step 1 prefills the prompt and samples every thread's first
// token, steps 2..10 the other nine: 100 ms, and the first thread finishes with the job.
// `dmsrt plan --check-steps`: each logged step predicted with StepCosts::Seconds and summed by
// kind; headers repeated by a later serve and a torn last line are skipped, a bad line is named.
TEST(PlanStepCheckTest, SumsMeasuredAndPredictedByKind) {
  StepCosts c;
  c.fixed = 0.01;
  c.per_decode_row = 0.001;
  c.per_kv_token = 1e-6;
  c.prefill_fixed = 0.02;
  c.per_prefill_token = 0.0001;
  c.per_sampled_row = 0.0005;
  const std::string path = ::testing::TempDir() + "/steps.csv";
  {
    std::ofstream f(path);
    f << "decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,seconds\n"
      << "3,0,300,3,0,0.020\n"
      << "12,0,1200,12,0,0.040\n"
      << "decode_rows,prefill_tokens,kv_tokens,sampled_rows,retries,seconds,end_s\n"
      << "0,64,0,1,0,0.030,0.031\n"
      << "2,16,200,2,1,0.025,0.070\n"
      << "5,0,5";  // still being written
  }
  absl::StatusOr<StepCheck> r = CheckSteps(c, {path});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->groups.size(), 4u);
  EXPECT_EQ(r->groups[0].kind, "decode 1-4");
  EXPECT_EQ(r->groups[1].kind, "decode 9-16");
  EXPECT_EQ(r->groups[2].kind, "prefill only");
  EXPECT_EQ(r->groups[3].kind, "mixed");
  EXPECT_DOUBLE_EQ(r->groups[0].predicted_s, c.Seconds(3, 300, 0, 3));
  EXPECT_DOUBLE_EQ(r->groups[3].predicted_s, c.Seconds(2, 200, 16, 2));
  EXPECT_EQ(r->all.steps, 4);
  EXPECT_NEAR(r->all.measured_s, 0.115, 1e-12);
  EXPECT_NE(StepCheckTable(*r).find("prefill only"), std::string::npos);
  EXPECT_EQ(StepCheckJson(*r)["groups"]["mixed"]["steps"], 1);
  {
    std::ofstream f(path);
    f << "3,0,300,3,0,0.020\nthree,0,300,3,0,0.020\n1,0,10,1,0,0.01\n";
  }
  r = CheckSteps(c, {path});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("steps.csv:2"), std::string::npos) << r.status();
  {
    std::ofstream f(path);
    f << "3,0,300,3,0,0.020,0.5\n1,0,10,1,0,0.01,later\n1,0,10,1,0,0.01,0.6\n";
  }
  r = CheckSteps(c, {path});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("steps.csv:2"), std::string::npos) << r.status();
  EXPECT_FALSE(CheckSteps(c, {path + ".missing"}).ok());
  std::remove(path.c_str());
}

TEST(PlanSimTest, LoneJobTakesItsStepsExactly_n4_prompt32_gen10) {
  absl::StatusOr<SimResult> r = Simulate(TinyReplica(64 << 20), 1, OneShape(4, 32, 10, 1, 1), 1e6);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->latency.size(), 1u);
  EXPECT_NEAR(r->latency[0], 0.10, 1e-9);
  EXPECT_NEAR(r->first_thread[0], 0.10, 1e-9);
  EXPECT_EQ(r->steps, 10);
  EXPECT_EQ(r->jobs_finished, 1);
  EXPECT_TRUE(r->complete);
  EXPECT_EQ(r->peak_running_threads, 4);
}

// A prompt longer than the prefill chunk takes ceil(prompt / chunk) steps before the fork.
TEST(PlanSimTest, LongPromptIsChunked_prompt600_chunk256) {
  SimReplicaConfig c = TinyReplica(64 << 20);
  absl::StatusOr<SimResult> r = Simulate(c, 1, OneShape(2, 600, 5, 1, 1), 1e6);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->latency[0], (3 + 4) * 0.01, 1e-9);
}

// A pool that holds about two threads runs eight by preempting and recomputing: the job takes several times as long as with room for all.
TEST(PlanSimTest, SmallPoolSerialisesThreads_n8) {
  const SimReplicaConfig roomy = TinyReplica(64 << 20);
  SimReplicaConfig tight = roomy;
  // tiny-qwen3: 2 layers x 2 KV heads; 16-token blocks of 8 KiB (fp32): a row is 32 KiB.
  // 200 + 311 tokens = 32 blocks per thread; 80 rows hold two threads and a half.
  tight.kv_budget_bytes = 80 * 4 * tight.kv_block_bytes;
  const Workload w = OneShape(8, 200, 311, 1, 1);
  absl::StatusOr<SimResult> a = Simulate(roomy, 1, w, 1e6);
  absl::StatusOr<SimResult> b = Simulate(tight, 1, w, 1e6);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_GT(b->preemptions, 0);
  EXPECT_GT(b->latency[0], 2.0 * a->latency[0]);
  EXPECT_EQ(b->jobs_failed, 0);
  // Eviction at 7/8 after a 16-token window fits them all again.
  tight.eviction_rate = 0.875;
  tight.window = 16;
  absl::StatusOr<SimResult> e = Simulate(tight, 1, w, 1e6);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->peak_running_threads, 8);
  EXPECT_LT(e->latency[0], 1.3 * a->latency[0]);
}

// Threads spread over replicas by the coordinator's placement: two replicas take four threads
// each and finish a job in the time of one.
TEST(PlanSimTest, PlacementSpreadsThreads_n8_two_replicas) {
  absl::StatusOr<SimResult> r = Simulate(TinyReplica(64 << 20), 2, OneShape(8, 32, 10, 1, 1), 1e6);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->peak_running_threads, 4);
  EXPECT_NEAR(r->latency[0], 0.10, 1e-9);
}

StepCosts CpuLikeCosts() {
  StepCosts c;
  c.fixed = 0.02;
  c.per_decode_row = 0.0005;
  c.per_kv_token = 1e-6;
  c.prefill_fixed = 0.02;
  c.per_prefill_token = 2e-4;
  return c;
}

// Pinned by the run that introduced the scenario; re-pinned when the simulated index went from
// one representative KV head to up to 16 heads with their own flags (4 for this model: 2 layers x
// 2 KV heads; p50 +0.32 %, p90 +0.23 %, 3 more steps).
constexpr double kPinnedP50 = 4.770223767928691;
constexpr double kPinnedP90 = 7.9695947705506711;
constexpr int64_t kPinnedSteps = 4727;

// A fixed scenario's prediction, pinned: per-thread lognormal lengths, Poisson arrivals. A
// change of these numbers means the scheduler, admission, the KV index or the simulator changed
// behaviour; check why before updating them.
TEST(PlanSimTest, PinnedScenario_n4_lognormal_poisson) {
  SimReplicaConfig c = TinyReplica(8 << 20);
  c.costs = CpuLikeCosts();
  c.eviction_rate = 0.5;
  c.window = 16;
  Workload w;
  w.n = 4;
  w.prompt = *ParseLengthDist("uniform:20:120", 512);
  w.reasoning = *ParseLengthDist("lognormal:100:0.6", 400);
  w.per_thread_lengths = true;
  w.jobs = 60;
  w.jobs_per_hour = 1800;
  w.seed = 3;
  absl::StatusOr<SimResult> a = Simulate(c, 1, w, 600);
  absl::StatusOr<SimResult> b = Simulate(c, 1, w, 600);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status();
  // Deterministic.
  EXPECT_EQ(a->latency, b->latency);
  EXPECT_EQ(a->steps, b->steps);
  EXPECT_TRUE(a->complete);
  const double p50 = Percentile(a->latency, 50), p90 = Percentile(a->latency, 90);
  RecordProperty("p50", std::to_string(p50));
  RecordProperty("p90", std::to_string(p90));
  RecordProperty("steps", std::to_string(a->steps));
  EXPECT_NEAR(p50, kPinnedP50, 1e-6) << "p50 " << p50 << " p90 " << p90 << " steps " << a->steps;
  EXPECT_NEAR(p90, kPinnedP90, 1e-6) << "p50 " << p50 << " p90 " << p90 << " steps " << a->steps;
  EXPECT_EQ(a->steps, kPinnedSteps);
}

// One best-of-16 job forking in a tight pool under the forced rule, with the default model's KV
// shapes (30 layers x 3 KV heads, CPU blocks of 16 tokens with dead slots, 16 MiB): `dmsrt serve`
// preempted 5 of its threads (a one-job trace, prompt 32, 48 tokens, --dms-force-rate 0.875
// --dms-window 16, measured 2026-12-07). Right after the fork each thread's ring leaves the
// shared prompt block, and the real store copies it head by head, in the (layer, head) pairs
// whose leaving token is flagged; one simulated head needs the whole row at once and preempted 6.
TEST(PlanSimTest, ForkPreemptsAsServeWithHeadsOfTheirOwn) {
  SimReplicaConfig c = TinyReplica(16 << 20);
  c.model.n_layers = 30;
  c.model.n_kv_heads = 3;
  c.model.n_heads = 9;
  c.model.head_dim = 64;
  c.kv_block_bytes = CpuKvBlockBytes(64, 16);
  c.dead_slots = true;
  c.eviction_rate = 0.875;
  c.window = 16;
  c.prefill_chunk = 512;
  const Workload w = OneShape(16, 32, 48, 1, 3600);
  auto preemptions = [&](int32_t max_heads) -> int64_t {
    c.max_sim_heads = max_heads;
    absl::StatusOr<SimResult> r = Simulate(c, 1, w, 600);
    EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r.ok() && r->complete);
    return r.ok() ? r->preemptions : -1;
  };
  EXPECT_EQ(preemptions(16), 5);  // the default: 15 heads, each for 6 (layer, head) pairs
  EXPECT_EQ(preemptions(90), 5);  // as many as the grain asks for: 30
  EXPECT_EQ(preemptions(1), 6);   // a whole row at once
}

// Decode spans (Engine::StepMany: runs of pure decode steps advanced as one) against one step
// at a time on the same scenario: every figure must be the same to the bit (same decisions in the
// same order; the clock and the tallies advance step by step with the same arithmetic), with far
// fewer engine calls where threads decode long between events.
SimResult ExpectSpansChangeNothing(SimReplicaConfig c, int32_t replicas, const Workload& w,
                                   double cutoff, double max_call_share) {
  c.decode_spans = false;
  absl::StatusOr<SimResult> one = Simulate(c, replicas, w, cutoff);
  c.decode_spans = true;
  absl::StatusOr<SimResult> span = Simulate(c, replicas, w, cutoff);
  EXPECT_TRUE(one.ok() && span.ok()) << one.status() << span.status();
  if (!one.ok() || !span.ok()) return SimResult{};
  EXPECT_EQ(one->latency, span->latency);
  EXPECT_EQ(one->first_thread, span->first_thread);
  EXPECT_EQ(one->steps, span->steps);
  EXPECT_EQ(one->preemptions, span->preemptions);
  EXPECT_EQ(one->jobs_finished, span->jobs_finished);
  EXPECT_EQ(one->jobs_failed, span->jobs_failed);
  EXPECT_EQ(one->complete, span->complete);
  EXPECT_EQ(one->peak_running_threads, span->peak_running_threads);
  EXPECT_EQ(one->peak_kv_fraction, span->peak_kv_fraction);
  EXPECT_EQ(one->sim_seconds, span->sim_seconds);
  EXPECT_EQ(one->last_finish, span->last_finish);
  EXPECT_EQ(one->busy_seconds, span->busy_seconds);
  EXPECT_EQ(one->seconds_fixed, span->seconds_fixed);
  EXPECT_EQ(one->seconds_rows, span->seconds_rows);
  EXPECT_EQ(one->seconds_kv, span->seconds_kv);
  EXPECT_EQ(one->seconds_prefill, span->seconds_prefill);
  EXPECT_EQ(one->mean_batch, span->mean_batch);
  EXPECT_EQ(one->jobs_per_hour, span->jobs_per_hour);
  EXPECT_EQ(one->tokens_per_second, span->tokens_per_second);
  EXPECT_EQ(one->step_calls, one->steps);
  EXPECT_LE(span->step_calls, max_call_share * static_cast<double>(span->steps))
      << span->step_calls << " calls for " << span->steps << " steps";
  return *span;
}

Workload Stream(int32_t n, const char* prompt, const char* reasoning, int64_t jobs, double rate,
                bool per_thread) {
  Workload w;
  w.n = n;
  w.prompt = *ParseLengthDist(prompt, 512);
  w.reasoning = *ParseLengthDist(reasoning, 1000);
  w.per_thread_lengths = per_thread;
  w.jobs = jobs;
  w.jobs_per_hour = rate;
  w.seed = 11;
  return w;
}

// Dense, a pool of about six threads at full length, two replicas: preemption and recompute,
// admission held back, placement over replicas.
TEST(PlanSpanTest, SameAsSingleSteps_dense_tight_two_replicas) {
  SimReplicaConfig c = TinyReplica(6 << 20);
  c.costs = CpuLikeCosts();
  const Workload w = Stream(4, "uniform:20:120", "uniform:200:700", 40, 2400, false);
  const SimResult r = ExpectSpansChangeNothing(c, 2, w, 600, 0.5);
  EXPECT_GT(r.preemptions, 0);
  EXPECT_TRUE(r.complete);
}

// Forced eviction 7/8 after a 16-token window, one replica, a short cut-off: unfinished jobs.
TEST(PlanSpanTest, SameAsSingleSteps_forced875_w16_cutoff) {
  SimReplicaConfig c = TinyReplica(3 << 20);
  c.costs = CpuLikeCosts();
  c.eviction_rate = 0.875;
  c.window = 16;
  const Workload w = Stream(8, "fixed:111", "uniform:300:900", 30, 3000, false);
  const SimResult r = ExpectSpansChangeNothing(c, 1, w, 5, 0.5);
  EXPECT_FALSE(r.complete);
  EXPECT_GT(r.jobs_finished, 0);
}

// A speed trace that changes every few seconds: spans bound their steps by the slowest factor
// still ahead and give what single steps give.
TEST(PlanSpanTest, SameAsSingleSteps_speed_trace_forced875) {
  SimReplicaConfig c = TinyReplica(6 << 20);
  c.costs = CpuLikeCosts();
  c.eviction_rate = 0.875;
  c.window = 16;
  for (int i = 0; i < 40; ++i) {
    c.speed.from.push_back(3.0 * i);
    c.speed.factor.push_back(i % 3 == 0 ? 1.6 : (i % 3 == 1 ? 0.7 : 1.0));
  }
  const Workload w = Stream(4, "uniform:20:120", "uniform:200:700", 25, 2400, false);
  const SimResult r = ExpectSpansChangeNothing(c, 1, w, 600, 0.5);
  EXPECT_TRUE(r.complete);
}

// Per-thread lengths: the first 199 tokens cannot end a thread (spans), the rest can (single
// steps).
TEST(PlanSpanTest, SameAsSingleSteps_per_thread_uniform200_forced5) {
  SimReplicaConfig c = TinyReplica(4 << 20);
  c.costs = CpuLikeCosts();
  c.eviction_rate = 0.5;
  c.window = 8;
  const Workload w = Stream(4, "uniform:20:60", "uniform:200:260", 30, 2000, true);
  const SimResult r = ExpectSpansChangeNothing(c, 1, w, 600, 0.8);
  EXPECT_TRUE(r.complete);
}

// With an SLO to judge, a run stops as soon as the miss is certain, and a run that meets the
// SLO is not touched.
TEST(PlanSimTest, StopsOnceTheSloIsCertainlyMissed_overloaded_n4) {
  SimReplicaConfig c = TinyReplica(4 << 20);
  c.costs = CpuLikeCosts();
  const Workload w = Stream(4, "fixed:64", "uniform:200:400", 60, 20000, false);
  absl::StatusOr<SimResult> full = Simulate(c, 1, w, 600);
  ASSERT_TRUE(full.ok()) << full.status();
  const double p90 = Percentile(full->latency, 90);
  ASSERT_GT(p90, 30.0) << "the scenario must be overloaded";
  SloStop miss{90, 10.0};
  absl::StatusOr<SimResult> early = Simulate(c, 1, w, 600, &miss);
  ASSERT_TRUE(early.ok());
  EXPECT_TRUE(early->stopped_at_miss);
  EXPECT_FALSE(early->complete);
  EXPECT_LT(early->steps, full->steps / 2);
  EXPECT_GT(Percentile(early->latency, 90), miss.seconds);
  SloStop met{90, 2 * Percentile(full->latency, 100)};
  absl::StatusOr<SimResult> same = Simulate(c, 1, w, 600, &met);
  ASSERT_TRUE(same.ok());
  EXPECT_FALSE(same->stopped_at_miss);
  EXPECT_EQ(same->latency, full->latency);
  EXPECT_EQ(same->steps, full->steps);
}

TEST(PlanTraceTest, ParsesAndRefuses) {
  absl::StatusOr<JobTrace> t = ParseJobTrace("# header\n0.5 19 111\n\n1.25 20 7  # c\n1.25 1 1\n", "t");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->arrivals, (std::vector<double>{0.5, 1.25, 1.25}));
  EXPECT_EQ(t->prompt_tokens, (std::vector<int64_t>{19, 20, 1}));
  EXPECT_EQ(t->generated_tokens, (std::vector<int64_t>{111, 7, 1}));
  absl::StatusOr<JobTrace> times = ParseJobTrace("1\n2\n", "t");
  ASSERT_TRUE(times.ok());
  EXPECT_TRUE(times->prompt_tokens.empty());
  for (const char* bad : {"", "# only\n", "2\n1\n", "1 2\n", "1 2 0\n", "-1 2 3\n", "x 2 3\n",
                          "1 2 3\n2\n", "1 2 3 4\n", "nan 2 3\n"}) {
    absl::StatusOr<JobTrace> b = ParseJobTrace(bad, "bad.trace");
    EXPECT_FALSE(b.ok()) << "'" << bad << "'";
    if (!b.ok()) {
      EXPECT_NE(b.status().message().find("bad.trace"), std::string::npos);
    }
  }
}

// A trace of the very jobs the generator draws gives the same prediction as drawing them.
TEST(PlanTraceTest, TraceOfTheDrawnJobsSimulatesAlike) {
  SimReplicaConfig c = TinyReplica(6 << 20);
  c.costs = CpuLikeCosts();
  Workload w = Stream(4, "uniform:20:120", "uniform:200:700", 25, 2400, false);
  absl::StatusOr<SimResult> drawn = Simulate(c, 1, w, 600);
  ASSERT_TRUE(drawn.ok());
  // The generator: arrivals, then prompt and generated length per job, from one stream.
  std::mt19937_64 rng(w.seed);
  std::exponential_distribution<double> gap(w.jobs_per_hour / 3600.0);
  Workload t = w;
  double at = 0.0;
  for (int64_t i = 0; i < w.jobs; ++i) t.arrivals.push_back(at += gap(rng));
  for (int64_t i = 0; i < w.jobs; ++i) {
    t.prompt_tokens.push_back(w.prompt.Sample(rng));
    t.generated_tokens.push_back(w.reasoning.Sample(rng));
  }
  absl::StatusOr<SimResult> traced = Simulate(c, 1, t, 600);
  ASSERT_TRUE(traced.ok()) << traced.status();
  EXPECT_EQ(traced->latency, drawn->latency);
  EXPECT_EQ(traced->steps, drawn->steps);
  t.generated_tokens.pop_back();
  EXPECT_FALSE(Simulate(c, 1, t, 600).ok()) << "lengths must match the arrivals";
}

TEST(PlanTraceTest, SpeedTraceParsesAndLooksUp) {
  absl::StatusOr<SpeedTrace> t = ParseSpeedTrace("# from factor\n0 1.5\n10 0.8  # faster\n\n25 1\n", "s");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->from, (std::vector<double>{0, 10, 25}));
  EXPECT_DOUBLE_EQ(t->At(-1.0), 1.5);  // before the first line: the first factor
  EXPECT_DOUBLE_EQ(t->At(0.0), 1.5);
  EXPECT_DOUBLE_EQ(t->At(9.99), 1.5);
  EXPECT_DOUBLE_EQ(t->At(10.0), 0.8);
  EXPECT_DOUBLE_EQ(t->At(1e9), 1.0);
  EXPECT_DOUBLE_EQ(t->MaxFrom(-1.0), 1.5);
  EXPECT_DOUBLE_EQ(t->MaxFrom(12.0), 1.0);
  EXPECT_DOUBLE_EQ(t->MaxFrom(30.0), 1.0);
  for (const char* bad : {"", "# only\n", "1\n", "1 2 3\n", "1 0\n", "1 -2\n", "2 1\n1 1\n",
                          "1 1\n1 2\n", "x 1\n", "1 nan\n"}) {
    absl::StatusOr<SpeedTrace> b = ParseSpeedTrace(bad, "bad.speed");
    EXPECT_FALSE(b.ok()) << "'" << bad << "'";
    if (!b.ok()) {
      EXPECT_NE(b.status().message().find("bad.speed"), std::string::npos);
    }
  }
}

// A constant factor is --step-scale (every term scaled alike); a factor that changes mid-run
// changes only the steps after it.
TEST(PlanSimTest, SpeedTraceScalesStepsByTime_dense_n4) {
  SimReplicaConfig c = TinyReplica(6 << 20);
  c.costs = CpuLikeCosts();
  const Workload w = Stream(4, "uniform:20:120", "uniform:200:700", 25, 2400, false);
  SimReplicaConfig scaled = c;
  scaled.costs.ScaleAll(1.5);
  scaled.decode_spans = false;
  absl::StatusOr<SimResult> want = Simulate(scaled, 1, w, 600);
  ASSERT_TRUE(want.ok()) << want.status();
  SimReplicaConfig traced = c;
  traced.speed.from = {0.0};
  traced.speed.factor = {1.5};
  absl::StatusOr<SimResult> got = Simulate(traced, 1, w, 600);
  ASSERT_TRUE(got.ok()) << got.status();
  // The clock counts whole nanoseconds (clock.h): each step's time rounds down there, so the
  // two may differ by a nanosecond per step.
  const double ns_per_step = 1e-9 * static_cast<double>(want->steps);
  ASSERT_EQ(got->latency.size(), want->latency.size());
  for (size_t i = 0; i < got->latency.size(); ++i) {
    EXPECT_NEAR(got->latency[i], want->latency[i], ns_per_step) << i;
  }
  EXPECT_EQ(got->steps, want->steps);
  EXPECT_NEAR(got->seconds_rows, want->seconds_rows, 1e-9 * want->seconds_rows);
  EXPECT_NEAR(got->seconds_sampling, want->seconds_sampling, 1e-9 * want->seconds_sampling);
  // Slower from the middle of the run on: the jobs done before are as at factor 1, the last is
  // later than at factor 1.
  absl::StatusOr<SimResult> base = Simulate(c, 1, w, 600);
  ASSERT_TRUE(base.ok());
  const double mid = base->job_done[base->job_done.size() / 2];
  traced.speed.from = {0.0, mid};
  traced.speed.factor = {1.0, 2.0};
  got = Simulate(traced, 1, w, 600);
  ASSERT_TRUE(got.ok());
  for (size_t i = 0; i < base->job_done.size(); ++i) {
    if (base->job_done[i] < mid) EXPECT_DOUBLE_EQ(got->job_done[i], base->job_done[i]) << i;
  }
  EXPECT_GT(got->job_done.back(), base->job_done.back());
}

// The steps the simulator reports (SimReplicaConfig::on_step) are its clock: their seconds add
// up to the busy time, each ends where the clock stands, and the last job is done at the last.
TEST(PlanSimTest, OnStepReportsEveryStepOnTheClock_forced875) {
  SimReplicaConfig c = TinyReplica(6 << 20);
  c.costs = CpuLikeCosts();
  c.eviction_rate = 0.875;
  c.window = 16;
  const Workload w = Stream(4, "uniform:20:120", "uniform:100:300", 20, 2400, false);
  int64_t steps = 0, rows = 0;
  double busy = 0.0, last_end = 0.0;
  bool ordered = true;
  c.on_step = [&](int32_t replica, const StepShape& s, double seconds, double end_s) {
    EXPECT_EQ(replica, 0);
    ++steps;
    rows += s.decode_rows;
    busy += seconds;
    ordered = ordered && end_s >= last_end + seconds - 1e-9;
    last_end = end_s;
  };
  absl::StatusOr<SimResult> r = Simulate(c, 1, w, 600);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(steps, r->steps);
  EXPECT_NEAR(busy, r->busy_seconds, 1e-9 * static_cast<double>(steps));  // whole ns per step
  EXPECT_TRUE(ordered);
  EXPECT_DOUBLE_EQ(last_end, *std::max_element(r->job_done.begin(), r->job_done.end()));
  EXPECT_NEAR(static_cast<double>(rows) / static_cast<double>(steps), r->mean_batch, 1e-9);
}

PlanInputs TinyPlan() {
  PlanInputs in;
  in.model = Tiny();
  in.model_name = "tiny-qwen3";
  in.profile_spec = "test";
  in.measured.costs = CpuLikeCosts();
  in.measured.measured = true;
  in.measured.weight_bytes = 1 << 20;
  in.nodes = 1;
  in.gpus_per_node = 4;
  in.tp_options = {1};
  in.eviction_rates = {0.0, 0.875};
  in.dms_window = 16;
  in.workload = OneShape(4, 64, 300, 40, 0);
  in.workload.warmup_fraction = 0.1;
  in.slo_percentile = 90;
  in.slo_seconds = 20;
  in.cpu_kv_budget_bytes = 6 << 20;
  in.search_steps = 4;
  return in;
}

// Capacity search: deterministic, every reported capacity met its SLO in the search, eviction
// buys capacity when the pool binds, and a target rate is met by enough replicas.
TEST(PlanSearchTest, CapacityWithinSloAndEvictionHelps) {
  PlanInputs in = TinyPlan();
  in.target_jobs_per_hour = 0;
  absl::StatusOr<PlanResult> a = RunPlan(in);
  absl::StatusOr<PlanResult> b = RunPlan(in);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->deployments.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(a->deployments[i].capacity_jobs_per_hour, b->deployments[i].capacity_jobs_per_hour);
    EXPECT_GT(a->deployments[i].capacity_jobs_per_hour, 0);
    EXPECT_LE(Percentile(a->deployments[i].at_capacity.latency, 90), in.slo_seconds);
  }
  const DeploymentPlan* dense = nullptr;
  const DeploymentPlan* dms = nullptr;
  for (const DeploymentPlan& d : a->deployments) (d.eviction_rate > 0 ? dms : dense) = &d;
  EXPECT_EQ(dense->binding, "memory");
  EXPECT_GT(dms->capacity_jobs_per_hour, 1.5 * dense->capacity_jobs_per_hour);
  EXPECT_GE(a->winner, 0);

  in.target_jobs_per_hour = 2.5 * dense->capacity_jobs_per_hour;
  absl::StatusOr<PlanResult> t = RunPlan(in);
  ASSERT_TRUE(t.ok()) << t.status();
  for (const DeploymentPlan& d : t->deployments) {
    if (d.eviction_rate == 0) {
      EXPECT_GE(d.replicas, 3);
      EXPECT_TRUE(d.meets_target);
    }
  }
  EXPECT_NE(PlanTable(in, *t).find("launch: mpirun -np"), std::string::npos);
  EXPECT_NE(PlanSvg(in, *t).find("<svg"), std::string::npos);
}

TEST(PlanSearchTest, BadInputGetsAnAnswer) {
  PlanInputs in = TinyPlan();
  in.target_jobs_per_hour = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(RunPlan(in).status()));
  // An SLO below one job's own duration: no deployment, and the answer names the closest miss.
  in = TinyPlan();
  in.slo_seconds = 0.5;
  absl::StatusOr<PlanResult> r = RunPlan(in);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->winner, -1);
  EXPECT_NE(r->answer.find("closest miss"), std::string::npos) << r->answer;
  // A thread larger than the whole pool: the model and workload fit nowhere.
  in = TinyPlan();
  in.cpu_kv_budget_bytes = 64 << 10;
  absl::StatusOr<PlanResult> nofit = RunPlan(in);
  ASSERT_TRUE(absl::IsResourceExhausted(nofit.status())) << nofit.status();
  EXPECT_NE(nofit.status().message().find("fit no deployment"), std::string::npos);
  // GPU TP > 1 is planned but marked not runnable, with no launch line.
  in = TinyPlan();
  in.datasheet = true;
  in.profile_spec = "h100-sxm";
  in.model = *SyntheticConfig("qwen3-8b");
  in.model.max_positions = 131072;
  in.tp_options = {2};
  in.eviction_rates = {0.875};
  in.dms_window = 256;
  in.workload = OneShape(4, 64, 200, 20, 0);
  in.slo_seconds = 60;
  in.search_steps = 2;
  absl::StatusOr<PlanResult> g = RunPlan(in);
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_EQ(g->deployments.size(), 1u);
  EXPECT_FALSE(g->deployments[0].runnable);
  const std::string table = PlanTable(in, *g);
  EXPECT_EQ(table.find("mpirun"), std::string::npos) << table;
  EXPECT_NE(table.find("UNMEASURED"), std::string::npos);
}

}  // namespace
}  // namespace dmsrt
