// Leader-driven tensor-parallel replica: TP rank 0 decides every step, the other ranks follow.
//
// Each rank of a TP group holds a CPU backend over its own shard of the model (its KV heads,
// their query groups, its FFN and vocabulary slices) and its own KV cache, in which it applies
// the eviction policy to its own heads. The ranks must therefore run exactly the same sequence
// operations and forward steps in the same order. The leader (TP rank 0) wraps its backend:
// every Forward and every sequence operation (Create/Fork/Free/Reserve) first broadcasts a
// compact plan to the group, then runs locally; the followers sit in RunTpFollower, which
// receives plans and executes them until the leader's shutdown plan.
//
// Plan wire format (int32 vector, broadcast with Communicator::BroadcastVector):
//   [kForward, n_chunks, {seq, logits_mode, n_tokens, tokens...} * n_chunks]
//   [kCreate, expected_id]   [kFork, parent, expected_id]   [kFree, seq]
//   [kReserve, seq, n_new]   [kFigures, all, seq]   [kShutdown]
// Create/Fork carry the id the leader got; a follower that gets another id has diverged and
// fails (its ids are deterministic: same operations, same order).
//
// After every plan the ranks all-reduce (min) two numbers: "my part succeeded" and "my free KV
// blocks". Ranks evict different amounts (DMS decisions are per head), so their pools differ;
// the leader's kv().free_blocks() reports the agreed minimum, which is what the scheduler may
// rely on. A deterministic error (a bad token id, an unknown sequence, a full cache — the backend
// agrees on Reserve across ranks) happens on every rank alike: followers keep serving and the
// leader returns it to its caller. Any other error on a follower ends RunTpFollower with that
// error; the caller then calls ParallelContext::Fail, whose Abort stops the whole job with a
// line naming the rank, so no rank waits forever. The communicator's timeout bounds the waits.
//
// Test hook: with DMSRT_TEST_FAIL_RANK=r in the environment, TP rank r fails its first forward
// step with DATA_LOSS "injected failure" (used to check that a failing rank brings the job down
// with its name instead of hanging the group).
//
// The leader's KvCache view is the group's: geometry() counts every rank's heads, Figures() are
// gathered from all ranks (one more plan, [kFigures, all, seq]) with per-head figures at their
// global head index; ResidentPositions() answers for the leader's own heads (global KV heads
// [0, n_kv_heads / tp)) and is empty for heads held by other ranks.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/backend.h"

namespace dmsrt {

class Communicator;  // parallel/comm.h

// Wraps the leader's (TP rank 0) backend. `comm` is the TP group's communicator (rank 0 of it is
// this process) and must outlive the result. Destroying the result sends the shutdown plan.
absl::StatusOr<std::unique_ptr<Backend>> MakeTpLeaderBackend(std::unique_ptr<Backend> local,
                                                             Communicator* comm);

// Runs plans from the leader on `local` (this follower's shard) until the shutdown plan.
// Returns OK after the shutdown plan; an error when this rank cannot go on.
absl::Status RunTpFollower(Backend& local, Communicator* comm);

// Sends the shutdown plan now (idempotent; the destructor does it otherwise). For a backend made
// by MakeTpLeaderBackend; INVALID_ARGUMENT for any other backend.
absl::Status ShutdownTpFollowers(Backend& leader);

}  // namespace dmsrt
