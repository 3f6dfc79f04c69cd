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
//   [kForward, n_chunks, {seq, logits_mode | sample << 2, n_tokens, tokens...} * n_chunks]
//   [kCreate, expected_id]   [kFork, parent, expected_id]   [kFree, seq]
//   [kReserve, seq, n_new]   [kFigures, all, seq]   [kPing]   [kShutdown]
//   [kAppendUncomputed, seq, n, rate (a double in two words)]
// A sampled chunk is marked so that every rank computes the same logits rows; only the leader
// samples (its backend's samples are the group's).
// Create/Fork carry the id the leader got; a follower that gets another id has diverged and
// fails (its ids are deterministic: same operations, same order).
//
// After every plan the ranks all-reduce (min) two numbers: "my part succeeded" and "my free KV
// blocks". Ranks evict different amounts (DMS decisions are per head), so their pools differ;
// the leader's kv().free_blocks() is built from the agreed minimum, which is what the scheduler
// may rely on. A deterministic error (a bad token id, an unknown sequence, a full cache — the
// backend agrees on Reserve across ranks) happens on every rank alike: followers keep serving and
// the leader returns it to its caller. Any other error on a follower ends RunTpFollower with that
// error; the caller then calls ParallelContext::Fail, whose Abort stops the whole job with a
// line naming the rank, so no rank waits forever. The communicator's timeout bounds the waits,
// including a follower's wait for the next plan: a leader that may sit idle for longer than the
// timeout (a server waiting for work) sends keepalive plans with PingTpFollowers. When one of the
// leader's collectives fails (timeout, transport error) the group is broken: every later call
// fails at once and TpGroupHealth says why, so the caller can stop the job. The same holds when
// the leader's own part of a plan fails in a way the followers need not share (any error but the
// deterministic ones above): the leader does not agree on that plan, since the followers may be
// inside collectives of the step that the leader never joined.
//
// Test hook: with DMSRT_TEST_FAIL_RANK=r in the environment, TP rank r fails its first forward
// step with DATA_LOSS "injected failure" (used to check that a failing rank brings the job down
// with its name instead of hanging the group). DMSRT_TEST_FAIL_HOW=kill makes it kill itself
// (SIGKILL) instead, and DMSRT_TEST_FAIL_HOW=stall makes it stop responding, so that the others
// meet the communicator's timeout.
//
// The leader's KvCache view is the group's: geometry() counts every rank's heads, and block counts
// are in the same unit (a block holds block_tokens slots of one KV head, on whichever rank holds
// that head): total_blocks() = tp x the smallest pool, free_blocks() = tp x the smallest free
// count over the ranks (what the group can still take when growth spreads over the heads evenly,
// as dense growth does: a lower bound of the true sum), block_bytes() is one block's bytes, so
// total_blocks() * block_bytes() is the group's KV budget (each rank holds its own --kv-budget).
// Figures() are gathered from all ranks (one more plan, [kFigures, all, seq]) with per-head
// figures at their global head index; ResidentPositions() answers for the leader's own heads
// (global KV heads [0, n_kv_heads / tp)) and is empty for heads held by other ranks.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/backend/backend.h"

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

// Sends a keepalive plan ([kPing]) and agrees with the followers, so a follower waiting for the
// next plan is not stopped by the communicator's timeout while the leader has nothing to do. Call
// it from the thread that drives the leader, more often than the timeout. Synchronises the group.
// INVALID_ARGUMENT for a backend not made by MakeTpLeaderBackend.
absl::Status PingTpFollowers(Backend& leader);

// OK while the group works; otherwise the error that broke it (a collective that timed out or
// failed; later calls on the leader fail at once). Does not communicate. INVALID_ARGUMENT for a
// backend not made by MakeTpLeaderBackend.
absl::Status TpGroupHealth(Backend& leader);

}  // namespace dmsrt
