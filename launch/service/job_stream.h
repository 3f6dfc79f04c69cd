// The seam between the coordinator and its front doors (the gRPC JobService and the
// OpenAI-compatible HTTP server): create a validated job, follow its event log, check a bearer
// token. Both front doors go through this interface, so admission, validation, cancellation on
// disconnect and the event order are the same for both.
//
// Threading: every method may be called from any number of handler threads at once.
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/sync_stream.h>

#include <cstdint>
#include <string>

#include "dmsrt/v1/dmsrt.pb.h"

namespace dmsrt {

// Where a follower's events go. Follow calls Write for each event in order and Gone while it
// waits for the next one (about every 200 ms), so a sink can notice a closed connection.
class JobEventSink {
 public:
  virtual ~JobEventSink() = default;
  // Delivers one event; false when the client is gone.
  virtual bool Write(const v1::JobEvent& event) = 0;
  // True when the client went away.
  virtual bool Gone() = 0;
};

class JobBroker {
 public:
  virtual ~JobBroker() = default;
  // Validates `req` (a non-OK status says what to change), admits it and starts its threads.
  virtual grpc::Status CreateJob(const v1::JobRequest& req, const std::string& traceparent,
                                 std::string* id, int32_t* n) = 0;
  // Replays job `id`'s events into `sink` from the start and follows it until it ends. When the
  // sink is gone and `cancel_on_disconnect`, the job is cancelled (its blocks are freed).
  virtual grpc::Status Follow(const std::string& id, JobEventSink& sink,
                              bool cancel_on_disconnect) = 0;
  // OK when no token is configured or `authorization` is "Bearer <token>"; else UNAUTHENTICATED.
  virtual grpc::Status CheckBearer(const std::string* authorization) const = 0;
  // The bytes of one token (for log-probability listings).
  virtual std::string TokenText(int32_t id) const = 0;
  // The served model's name (what /v1/models lists).
  virtual std::string ModelName() const = 0;
  // Prometheus text exposition.
  virtual std::string MetricsText() = 0;
};

// A gRPC server-streaming call as a sink.
class GrpcEventSink final : public JobEventSink {
 public:
  GrpcEventSink(grpc::ServerContext* ctx, grpc::ServerWriter<v1::JobEvent>* writer)
      : ctx_(ctx), writer_(writer) {}
  bool Write(const v1::JobEvent& event) override { return writer_->Write(event); }
  bool Gone() override { return ctx_->IsCancelled(); }

 private:
  grpc::ServerContext* ctx_;
  grpc::ServerWriter<v1::JobEvent>* writer_;
};

}  // namespace dmsrt
