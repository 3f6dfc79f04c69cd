// The coordinator's admission and placement rules as plain functions: no gRPC, no protobuf, no
// clock. The gRPC coordinator (launch/service/coordinator.cc) converts its replica table into
// ReplicaCapacity values and calls these; the capacity planner (launch/plan/) calls the same
// functions on its simulated replicas, so both decide alike.
//
// Errors are absl::Status; launch/service/admission.h maps them to grpc::Status at the edge.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmsrt {

// What the coordinator knows about one live replica: its registration (policy, KV geometry) and
// its latest heartbeat (observed eviction rate), plus the threads it has been given and not
// finished.
struct ReplicaCapacity {
  int32_t id = 0;
  std::string kv_policy = "none";  // the replica's --kv-policy
  int32_t kv_window = 0;
  double kv_force_rate = 0.0;
  int64_t kv_blocks_total = 0;
  int32_t kv_block_tokens = 16;
  int64_t blocks_per_token_dense = 0;  // blocks per kv_block_tokens tokens (layers x KV heads)
  int64_t kv_block_bytes = 0;
  double eviction_rate = 0.0;          // policy dms: observed, else the adapter's calibrated rate
  bool dead_slots = false;             // KvCache::dead_slots: threads keep sharing the prompt
  int64_t assigned_open = 0;           // threads assigned and not finished
};

// Resident tokens a thread of `len` logical tokens is expected to hold under the replica's
// policy (docs/dms-semantics.md: a flagged token leaves after the window, so at most the window
// plus the unflagged share of the rest stays). `measured_rate` is the observed eviction rate
// (used for policy dms).
double ExpectedResident(const std::string& policy, int32_t window, double force_rate,
                        double measured_rate, double len);
double ExpectedResident(const ReplicaCapacity& r, double len);

// A validated job as admission sees it.
struct AdmissionRequest {
  int64_t prompt_tokens = 0;
  int32_t max_tokens = 0;
  int32_t n = 0;                // threads; 0 = budget mode (kv_budget_bytes decides)
  int64_t kv_budget_bytes = 0;  // budget mode only
  std::string policy;           // the policy the request asks for; empty = any
  int32_t max_n = 64;           // threads per job at most
};

// Decides whether the job can run on `alive` and with how many threads:
//   UNAVAILABLE         no replica
//   INVALID_ARGUMENT    the request asks for a policy a replica does not run
//   RESOURCE_EXHAUSTED  one thread at full length does not fit the largest replica, or the
//                       budget of budget mode holds no thread
// Returns N (the request's n, or in budget mode as many threads as the budget holds, at most
// max_n).
absl::StatusOr<int32_t> AdmitJob(const AdmissionRequest& req,
                                 const std::vector<ReplicaCapacity>& alive);

// Places thread `indices` one by one on the replica with the lowest open threads per KV block,
// counting each placement in `assigned_open`. Returns replica id -> thread indices. Empty when
// `alive` is empty.
std::map<int32_t, std::vector<int32_t>> PlaceThreads(const std::vector<int32_t>& indices,
                                                     std::vector<ReplicaCapacity>& alive);

}  // namespace dmsrt
