// The replica side of the coordinator protocol (proto/dmsrt/v1/replica.proto).
//
// A replica leader dials the coordinator, registers, and keeps one bidirectional stream: thread
// assignments and cancellations come down it and are handed to the Engine; the engine's token and
// thread-finished events, and a heartbeat with the engine's figures every 250 ms, go up it. One
// thread writes (events are queued by the engine's sink), one thread reads. If the stream breaks
// the agent cancels what it was running (the coordinator reassigns it) and dials again.
#pragma once

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include <grpcpp/security/credentials.h>

#include "dmsrt/v1/replica.grpc.pb.h"
#include "runtime/engine/engine.h"

namespace dmsrt {

class ReplicaAgent {
 public:
  ReplicaAgent(Engine& engine, v1::ReplicaInfo info, std::string address,
               std::shared_ptr<grpc::ChannelCredentials> credentials, std::string auth_token);
  // Blocks until *stop turns true, reconnecting as needed.
  void Run(const std::atomic<bool>* stop);

 private:
  void Push(v1::ReplicaMessage m);
  void HandleAssign(const v1::ThreadAssignment& a);
  void HandleCancel(const v1::ThreadCancel& c);
  void CancelAll();
  v1::ReplicaStats Heartbeat() const;

  Engine& engine_;
  v1::ReplicaInfo info_;
  std::string address_;
  std::shared_ptr<grpc::ChannelCredentials> credentials_;
  std::string auth_token_;

  absl::Mutex mu_;
  std::deque<v1::ReplicaMessage> outbox_ ABSL_GUARDED_BY(mu_);
  std::multimap<std::string, JobId> jobs_ ABSL_GUARDED_BY(mu_);  // coordinator id -> engine id
};

}  // namespace dmsrt
