// The coordinator: the public JobService (submit/watch/run/get/cancel/list/cluster status) and the
// internal ReplicaService that replica leaders dial.
//
// It validates each request (every field, with a message that says what to change), tokenizes the
// prompt, decides N (given, or from a KV byte budget), splits the N threads over live replicas,
// collects their progress, extracts answers, votes, stops early when the majority cannot change,
// and keeps an event log per job that any number of watchers replay. A replica whose stream
// breaks is marked lost and its unfinished threads are reassigned to the others (thread i keeps
// seed + i, so the result does not depend on placement). Each job's bookkeeping (threads, answers
// and votes, events, usage) is a JobRecord (job_record.h); this class places, cancels and reruns
// threads and keeps the replica table and the metrics.
//
// Threading: gRPC handler threads call in; one monitor thread enforces deadlines. All state is
// under one mutex; writes to a replica stream are under that replica's own mutex.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "dmsrt/v1/dmsrt.grpc.pb.h"
#include "dmsrt/v1/replica.grpc.pb.h"
#include "launch/admission.h"
#include "launch/service/job_record.h"
#include "launch/service/job_stream.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

struct CoordinatorOptions {
  int32_t max_n = 64;                   // threads per job at most
  int32_t default_max_tokens = 256;
  int32_t max_tokens_limit = 4096;
  int32_t keep_finished_jobs = 1000;    // finished jobs kept for GetJob/WatchJob (then the oldest go)
  int32_t max_stop_strings = 16;
  int32_t max_stop_length = 256;
  int64_t max_prompt_bytes = 1 << 20;
  std::string auth_token;               // empty: no authentication
  double replica_timeout_seconds = 10;  // no heartbeat for this long: lost
};

class Coordinator final : public v1::JobService::Service,
                          public v1::ReplicaService::Service,
                          public JobBroker {
 public:
  // `model` supplies the tokenizer spec and context length; both must outlive the coordinator.
  Coordinator(const Model& model, const Tokenizer& tokenizer, CoordinatorOptions options);
  ~Coordinator() override;

  grpc::Status SubmitJob(grpc::ServerContext* ctx, const v1::JobRequest* req,
                         v1::SubmitJobResponse* resp) override;
  grpc::Status WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                        grpc::ServerWriter<v1::JobEvent>* writer) override;
  grpc::Status RunJob(grpc::ServerContext* ctx, const v1::JobRequest* req,
                      grpc::ServerWriter<v1::JobEvent>* writer) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                      v1::JobStatus* resp) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                         v1::CancelJobResponse* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                        v1::ListJobsResponse* resp) override;
  grpc::Status GetClusterStatus(grpc::ServerContext* ctx, const v1::GetClusterStatusRequest* req,
                                v1::ClusterStatus* resp) override;
  grpc::Status Connect(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::ReplicaMessage>* stream) override;

  // JobBroker (job_stream.h): what the HTTP front door uses, and the gRPC handlers too.
  grpc::Status CreateJob(const v1::JobRequest& req, const std::string& traceparent, std::string* id,
                         int32_t* n) override;
  grpc::Status Follow(const std::string& id, JobEventSink& sink, bool cancel_on_disconnect) override;
  grpc::Status CheckBearer(const std::string* authorization) const override;
  std::string ModelName() const override { return model_.config.name; }
  std::string TokenText(int32_t id) const override { return tok_.TokenBytes(id); }
  // Prometheus text exposition of the coordinator's and replicas' figures.
  std::string MetricsText() override;
  // Stops the monitor thread and ends every watcher.
  void Shutdown();

 private:
  struct Replica {
    int32_t id = 0;
    v1::ReplicaInfo info;
    v1::ReplicaStats stats;
    bool alive = true;
    std::chrono::steady_clock::time_point last_heartbeat;
    std::chrono::steady_clock::time_point stats_at;  // when `stats` arrived
    int64_t assigned_open = 0;  // threads assigned and not finished
    // The stream; valid while `open` (guarded by write_mu).
    absl::Mutex write_mu;
    grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::ReplicaMessage>* stream = nullptr;
    bool open = false;
  };

  grpc::Status CheckAuth(grpc::ServerContext* ctx) const;
  // The W3C `traceparent` metadata of a call when it is well formed, else empty.
  static std::string TraceParent(grpc::ServerContext* ctx);
  // Sends thread indices to replicas. Requires mu_. Collects messages to send after unlocking.
  struct Outgoing {
    std::shared_ptr<Replica> replica;
    v1::CoordinatorMessage msg;
  };
  bool AssignThreads(JobRecord& job, const std::vector<int32_t>& indices, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CancelRemaining(JobRecord& job, std::vector<Outgoing>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A thread ended (reported by its replica, or ended here): frees its replica slot, records it,
  // cancels the rest on an early stop, and finishes the job after its last thread.
  void OnThreadFinished(JobRecord& job, const v1::ThreadFinished& tf, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishJob(JobRecord& job, v1::JobOutcome outcome, const std::string& message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A progress event of a replica: tokens or a finished thread of one of its threads.
  void OnProgress(int32_t replica, const v1::JobEvent& ev, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks the replica lost (once; `reason` goes to the log line) and reassigns its threads.
  void ReplicaLost(int32_t replica_id, const char* reason);
  void Send(std::vector<Outgoing>& out);
  void MonitorLoop();
  // The live replicas as the admission rules see them (launch/admission.h).
  std::vector<ReplicaCapacity> AliveCapacities() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Model& model_;
  const Tokenizer& tok_;
  CoordinatorOptions options_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<JobRecord>> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<int32_t, std::shared_ptr<Replica>> replicas_ ABSL_GUARDED_BY(mu_);
  int64_t next_job_ ABSL_GUARDED_BY(mu_) = 1;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  // Counters for /metrics.
  std::map<std::string, int64_t> outcomes_ ABSL_GUARDED_BY(mu_);
  struct Histogram {
    std::vector<double> bounds;    // upper bounds, seconds
    std::vector<int64_t> counts;   // per bucket (not cumulative), + the +Inf bucket
    double sum = 0;
    int64_t count = 0;
    void Observe(double v);
  };
  Histogram ttft_ ABSL_GUARDED_BY(mu_);
  Histogram e2e_ ABSL_GUARDED_BY(mu_);
  Histogram itl_ ABSL_GUARDED_BY(mu_);
  int64_t lost_replica_preemptions_ ABSL_GUARDED_BY(mu_) = 0;  // threads reassigned

  std::thread monitor_;
};

}  // namespace dmsrt
