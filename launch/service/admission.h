// Job validation and the per-thread KV estimate of the coordinator.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <regex>
#include <string>

#include "dmsrt/v1/dmsrt.pb.h"
#include "dmsrt/v1/replica.pb.h"
#include "launch/service/coordinator.h"
#include "runtime/model/model.h"

namespace dmsrt {

std::string PolicyNameOf(v1::KvPolicy p);

// Resident tokens a thread of `len` logical tokens is expected to hold under the replica's
// policy (docs/dms-semantics.md: a flagged token leaves after the window, so at most the window
// plus the unflagged share of the rest stays).
double ExpectedResident(const v1::ReplicaInfo& info, double measured_rate, double len);

// Checks every field of `req` that needs no replica; on success `rendered` is the prompt text,
// `max_tokens` the thread length and `pattern` the compiled answer regex (null for the default).
grpc::Status ValidateJobRequest(const v1::JobRequest& req, const TokenizerSpec& tokenizer,
                                const CoordinatorOptions& options, std::string* rendered,
                                int32_t* max_tokens, std::shared_ptr<const std::regex>* pattern);

}  // namespace dmsrt
