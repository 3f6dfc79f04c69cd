// Communicator: the collectives tensor parallelism needs, behind one interface.
//
// Three implementations:
//   LocalComm  (this file)                  one rank; every collective is a copy or a no-op.
//   MpiComm    (parallel/mpi/mpi_comm.h)    CPU ranks under mpirun; host buffers.
//   NcclComm   (parallel/nccl/nccl_comm.h)  one GPU per rank; device buffers, a CUDA stream.
// parallel/comm_factory.h picks one from how the process was started.
//
// Semantics shared by all of them:
//   * Every member of a communicator must call the same collectives, in the same order, with the
//     same count and root. Collectives are matched by call order, nothing else.
//   * Blocking: when a call returns OK, `recv` holds the result and `send` may be reused. (NcclComm
//     can be told to return once the work is enqueued on its stream instead; see nccl_comm.h.)
//   * In place: `send == recv` is allowed for AllReduce. For AllGather, `recv` must not overlap
//     `send` unless `send == recv + rank * bytes` (the rank's own slot).
//   * Errors come back as absl::Status (never exit/abort): INVALID_ARGUMENT for bad arguments,
//     DEADLINE_EXCEEDED when a watchdog timeout fires, INTERNAL for a transport error (with the
//     file, line and the library's error string). After DEADLINE_EXCEEDED or INTERNAL the
//     communicator is broken: later calls fail with FAILED_PRECONDITION, and the caller should
//     call Abort() so the other ranks do not wait forever.
//   * Threading: a communicator is used by one thread at a time. Different communicators (the
//     world and a TP group) may be used from different threads only if MPI was initialised with
//     MPI_THREAD_MULTIPLE (see MpiRuntime).
//
// Example: the two all-reduces of a TP decoder layer and the free-block agreement.
//
//   ParallelOptions opts;
//   opts.tp = 2;
//   DMSRT_ASSIGN_OR_RETURN(ParallelContext par, InitParallel(&argc, &argv, opts));
//   Communicator& tp = *par.tp_comm;                 // this rank's replica, size tp
//   ShardPlan plan = ...MakeShardPlan(dims, tp.size(), tp.rank());
//   ... attn_out = o_proj(local heads)                // [n_tokens, hidden], partial sums
//   DMSRT_RETURN_IF_ERROR(tp.AllReduceSum(attn_out.data(), attn_out.size()));
//   ... mlp_out = down(local ffn slice)               // [n_tokens, hidden], partial sums
//   DMSRT_RETURN_IF_ERROR(tp.AllReduceSum(mlp_out.data(), mlp_out.size()));
//   DMSRT_ASSIGN_OR_RETURN(int64_t free_blocks, tp.host()->AgreeMin(kv.FreeBlocks()));
//   if (tp.rank() == 0) plan_bytes = step_plan.SerializeAsString();
//   DMSRT_RETURN_IF_ERROR(tp.host()->BroadcastString(&plan_bytes, /*root=*/0));
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace dmsrt {

class World;

enum class ReduceOp { kSum, kMin, kMax };
const char* ReduceOpName(ReduceOp op);  // "sum", "min", "max"

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int size() const = 0;
  virtual int rank() const = 0;
  // "local", "mpi" or "nccl".
  virtual const char* kind() const = 0;
  // For messages: kind, size and the world ranks of the members, e.g. "mpi[2 ranks: 2,3]".
  virtual std::string Describe() const = 0;
  // True when collective buffers are device pointers (NcclComm). Host-side control messages
  // then go through host() instead.
  virtual bool device_buffers() const { return false; }
  // A communicator over the same ranks, in the same order, for host-memory messages (the
  // StepPlan broadcast, the free-block agreement). `this` for host communicators. Owned by this
  // communicator.
  virtual Communicator* host() { return this; }

  // ---- collectives (each one synchronises all members) -------------------------------------
  // recv[i] = op over ranks of send[i]. send, recv: [count].
  virtual absl::Status AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) = 0;
  virtual absl::Status AllReduce(const int64_t* send, int64_t* recv, int64_t count,
                                 ReduceOp op) = 0;
  // recv[r * bytes .. (r + 1) * bytes) = rank r's send. send: [bytes], recv: [size * bytes].
  virtual absl::Status AllGatherBytes(const void* send, int64_t bytes, void* recv) = 0;
  // Copies `bytes` bytes of root's buf into every rank's buf.
  virtual absl::Status Broadcast(void* buf, int64_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;

  // ---- structure ---------------------------------------------------------------------------
  // Collective: ranks with the same color form a new communicator, ordered by (key, rank).
  // color must be >= 0. The new communicator inherits the timeout.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) = 0;

  // Reports `dmsrt: rank R failed: <reason>` on stderr and brings down every rank of the job so
  // none waits forever in a collective (MpiComm: MPI_Abort on MPI_COMM_WORLD, so mpirun exits
  // non-zero and names the rank). Call it from main (or the serving loop) when this rank cannot
  // go on. LocalComm has no other ranks to stop: it prints the line and returns ABORTED carrying
  // the reason, for main to return.
  virtual absl::Status Abort(const std::string& reason) = 0;

  // Watchdog: a blocking collective that has not completed after `timeout` returns
  // DEADLINE_EXCEEDED naming the collective and the members instead of waiting forever.
  // InfiniteDuration (the default) disables it. Implemented by MpiComm and NcclComm.
  void set_timeout(absl::Duration timeout) { timeout_ = timeout; }
  absl::Duration timeout() const { return timeout_; }

  // ---- helpers built on the collectives above ------------------------------------------------
  absl::Status AllReduceSum(float* data, int64_t count) {
    return AllReduce(data, data, count, ReduceOp::kSum);
  }
  absl::Status AllReduceMin(int64_t* data, int64_t count) {
    return AllReduce(data, data, count, ReduceOp::kMin);
  }
  // recv: [size, count].
  absl::Status AllGather(const float* send, int64_t count, float* recv) {
    return AllGatherBytes(send, count * static_cast<int64_t>(sizeof(float)), recv);
  }
  // Host memory only (use host() for device communicators): the minimum of `value` over ranks.
  absl::StatusOr<int64_t> AgreeMin(int64_t value);
  // Host memory only: root's string (any length) on every rank.
  absl::Status BroadcastString(std::string* s, int root);
  // Host memory only: root's vector (any length) on every rank. T must be trivially copyable.
  template <class T>
  absl::Status BroadcastVector(std::vector<T>* v, int root);

 protected:
  // Shared argument checks; `what` names the call in the message.
  absl::Status CheckCount(int64_t count, const char* what) const;
  absl::Status CheckRoot(int root, const char* what) const;
  // Broadcast of a length, then the payload; used by the helpers.
  absl::StatusOr<int64_t> BroadcastLength(int64_t length, int root);

  absl::Duration timeout_ = absl::InfiniteDuration();
};

template <class T>
absl::Status Communicator::BroadcastVector(std::vector<T>* v, int root) {
  static_assert(std::is_trivially_copyable<T>::value, "BroadcastVector needs trivially copyable T");
  absl::StatusOr<int64_t> n = BroadcastLength(static_cast<int64_t>(v->size()), root);
  if (!n.ok()) return n.status();
  if (rank() != root) v->resize(static_cast<size_t>(*n));
  if (*n == 0) return absl::OkStatus();
  return Broadcast(v->data(), *n * static_cast<int64_t>(sizeof(T)), root);
}

// One rank. Collectives copy send to recv (or do nothing in place); Split returns another
// LocalComm; Broadcast requires root 0.
class LocalComm final : public Communicator {
 public:
  LocalComm() = default;
  int size() const override { return 1; }
  int rank() const override { return 0; }
  const char* kind() const override { return "local"; }
  std::string Describe() const override { return "local[1 rank: 0]"; }

  absl::Status AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) override;
  absl::Status AllReduce(const int64_t* send, int64_t* recv, int64_t count, ReduceOp op) override;
  absl::Status AllGatherBytes(const void* send, int64_t bytes, void* recv) override;
  absl::Status Broadcast(void* buf, int64_t bytes, int root) override;
  absl::Status Barrier() override { return absl::OkStatus(); }
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) override;
  absl::Status Abort(const std::string& reason) override;
};

// The communicator of this rank's TP group: world_comm.Split(replica, tp_rank). Collective over
// world_comm. Checks that world_comm matches `world` (size and rank) and that the result has
// world.tp() members.
absl::StatusOr<std::unique_ptr<Communicator>> MakeTpComm(Communicator& world_comm,
                                                         const World& world);

}  // namespace dmsrt
