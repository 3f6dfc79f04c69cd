// The gRPC side of admission: request validation (it reads the protobuf request), the replica
// table's registration and heartbeat as the plain ReplicaCapacity of launch/admission.h, and the
// one mapping from absl::Status to grpc::Status at the edge.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <regex>
#include <string>

#include "absl/status/status.h"
#include "dmsrt/v1/dmsrt.pb.h"
#include "dmsrt/v1/replica.pb.h"
#include "launch/admission.h"
#include "launch/service/coordinator.h"
#include "runtime/model/model.h"

namespace dmsrt {

std::string PolicyNameOf(v1::KvPolicy p);

ReplicaCapacity CapacityOf(int32_t id, const v1::ReplicaInfo& info, const v1::ReplicaStats& stats,
                           int64_t assigned_open);

// The same code and message (the two enums share google.rpc.Code's numbering).
grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);

// Checks every field of `req` that needs no replica (INVALID_ARGUMENT naming the field and what
// to change); on success `rendered` is the prompt text, `max_tokens` the thread length and
// `pattern` the compiled answer regex (null for the default).
absl::Status ValidateJobRequest(const v1::JobRequest& req, const TokenizerSpec& tokenizer,
                                const CoordinatorOptions& options, std::string* rendered,
                                int32_t* max_tokens, std::shared_ptr<const std::regex>* pattern);

}  // namespace dmsrt
