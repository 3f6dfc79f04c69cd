// MpiRuntime and MpiComm (see mpi_comm.h).
//
// Counts above INT_MAX are split into several MPI calls (MPI counts are int). The watchdog polls
// MPI_Test: a short busy spin first (small collectives finish in microseconds and a sleep would
// dominate their latency), then sleeps that grow to 1 ms so a long wait does not burn a core.
#include "parallel/mpi/mpi_comm.h"

#include <algorithm>
#include <climits>
#include <string>
#include <cstdio>
#include <thread>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace dmsrt {
namespace {

// Elements (or bytes) per MPI call; keeps every count within int.
constexpr int64_t kMaxChunk = int64_t{1} << 30;

MPI_Op ToMpi(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMin:
      return MPI_MIN;
    case ReduceOp::kMax:
      return MPI_MAX;
  }
  return MPI_SUM;
}

bool MpiAlive() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

absl::Status MpiError(int code, const char* call, const char* file, int line) {
  char msg[MPI_MAX_ERROR_STRING + 1] = {0};
  int len = 0;
  if (MPI_Error_string(code, msg, &len) != MPI_SUCCESS) {
    std::snprintf(msg, sizeof(msg), "MPI error code %d", code);
  }
  return absl::InternalError(absl::StrFormat("%s:%d: %s failed: %s", file, line, call, msg));
}

// ---- MpiRuntime -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<MpiRuntime>> MpiRuntime::Init(int* argc, char*** argv,
                                                             int required_thread_level) {
  int initialized = 0, finalized = 0;
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Finalized(&finalized));
  if (finalized) {
    return absl::FailedPreconditionError(
        "MpiRuntime::Init: MPI was already finalised in this process and cannot start again");
  }
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Initialized(&initialized));
  std::unique_ptr<MpiRuntime> rt(new MpiRuntime());
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    DMSRT_MPI_RETURN_IF_ERROR(MPI_Init_thread(argc, argv, required_thread_level, &provided));
    rt->owns_ = true;
  } else {
    DMSRT_MPI_RETURN_IF_ERROR(MPI_Query_thread(&provided));
  }
  rt->thread_level_ = provided;
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  if (provided < required_thread_level) {
    // Keep owns_ so the destructor finalises what we started.
    return absl::FailedPreconditionError(absl::StrFormat(
        "MPI provides thread level %d, %d was required (rebuild MPI with thread support)",
        provided, required_thread_level));
  }
  return rt;
}

MpiRuntime::~MpiRuntime() {
  if (owns_ && MpiAlive()) MPI_Finalize();
}

// ---- MpiComm --------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<MpiComm>> MpiComm::WorldDup() {
  if (!MpiAlive()) {
    return absl::FailedPreconditionError("MpiComm: MPI is not initialised (create an MpiRuntime)");
  }
  MPI_Comm dup = MPI_COMM_NULL;
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return Adopt(dup);
}

absl::StatusOr<std::unique_ptr<MpiComm>> MpiComm::Adopt(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL) return absl::InvalidArgumentError("MpiComm::Adopt: MPI_COMM_NULL");
  std::unique_ptr<MpiComm> c(new MpiComm());
  c->comm_ = comm;
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_size(comm, &c->size_));
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_rank(comm, &c->rank_));
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_rank(MPI_COMM_WORLD, &c->world_rank_));
  MPI_Group group, world_group;
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_group(comm, &group));
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_group(MPI_COMM_WORLD, &world_group));
  std::vector<int> local(c->size_);
  for (int i = 0; i < c->size_; ++i) local[i] = i;
  c->members_.resize(c->size_);
  int rc = MPI_Group_translate_ranks(group, c->size_, local.data(), world_group,
                                     c->members_.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  if (rc != MPI_SUCCESS) return MpiError(rc, "MPI_Group_translate_ranks", __FILE__, __LINE__);
  return c;
}

MpiComm::~MpiComm() {
  if (comm_ == MPI_COMM_NULL || !MpiAlive()) return;
  // A request abandoned by the watchdog that never completed means a peer is gone: freeing the
  // communicator could then block, so it is left to MPI_Finalize / process exit instead.
  for (MPI_Request& r : abandoned_) {
    int done = 0;
    if (r != MPI_REQUEST_NULL && (MPI_Test(&r, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || !done)) {
      return;
    }
  }
  MPI_Comm_free(&comm_);
}

std::string MpiComm::Describe() const {
  constexpr size_t kShown = 16;
  std::vector<int> shown(members_.begin(),
                         members_.begin() + std::min(members_.size(), kShown));
  return absl::StrFormat("mpi[%d ranks: %s%s]", size_, absl::StrJoin(shown, ","),
                         members_.size() > kShown ? ",..." : "");
}

absl::Status MpiComm::Usable(const char* what) const {
  if (!broken_.empty()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s on %s: communicator unusable after an earlier failure (%s); call Abort()", what,
        Describe(), broken_));
  }
  if (!MpiAlive()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s on %s: MPI is not initialised or already finalised", what, Describe()));
  }
  return absl::OkStatus();
}

absl::Status MpiComm::WaitWithDeadline(MPI_Request* req, const char* what, int64_t count) {
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + timeout_;
  absl::Duration nap = absl::Microseconds(5);
  for (int polls = 0;; ++polls) {
    int done = 0;
    int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      absl::Status s = MpiError(rc, "MPI_Test", __FILE__, __LINE__);
      broken_ = s.ToString();
      return s;
    }
    if (done) return absl::OkStatus();
    if (polls < 2000) continue;  // busy spin: small collectives complete here
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      abandoned_.push_back(*req);
      *req = MPI_REQUEST_NULL;
      absl::Status s = absl::DeadlineExceededError(absl::StrFormat(
          "%s of %d elements on %s (this is world rank %d) did not complete within %s: a member "
          "died, is stuck, or called a different collective",
          what, count, Describe(), world_rank_, absl::FormatDuration(timeout_)));
      broken_ = s.ToString();
      return s;
    }
    std::this_thread::sleep_for(absl::ToChronoMicroseconds(std::min(nap, deadline - now)));
    nap = std::min(nap * 2, absl::Milliseconds(1));
  }
}

template <class Blocking, class NonBlocking>
absl::Status MpiComm::Run(const char* what, int64_t count, Blocking blocking,
                          NonBlocking nonblocking) {
  int rc = MPI_SUCCESS;
  if (timeout_ == absl::InfiniteDuration()) {
    rc = blocking();
    if (rc != MPI_SUCCESS) {
      // "MPI_Iallreduce" -> "MPI_Allreduce": name the call that actually failed.
      std::string name = what;
      if (name.rfind("MPI_I", 0) == 0 && name.size() > 5) {
        name.erase(4, 1);
        name[4] = static_cast<char>(name[4] - 'a' + 'A');
      }
      absl::Status s = MpiError(rc, name.c_str(), __FILE__, __LINE__);
      broken_ = s.ToString();
      return s;
    }
    return absl::OkStatus();
  }
  MPI_Request req = MPI_REQUEST_NULL;
  rc = nonblocking(&req);
  if (rc != MPI_SUCCESS) {
    absl::Status s = MpiError(rc, what, __FILE__, __LINE__);
    broken_ = s.ToString();
    return s;
  }
  return WaitWithDeadline(&req, what, count);
}

absl::Status MpiComm::AllReduceTyped(const void* send, void* recv, int64_t count,
                                     MPI_Datatype type, size_t elem_size, ReduceOp op) {
  absl::Status s = Usable("AllReduce");
  if (!s.ok()) return s;
  if (!(s = CheckCount(count, "AllReduce")).ok()) return s;
  const MPI_Op mop = ToMpi(op);
  for (int64_t off = 0; off < count; off += kMaxChunk) {
    const int n = static_cast<int>(std::min(kMaxChunk, count - off));
    char* r = static_cast<char*>(recv) + off * elem_size;
    const void* snd =
        send == recv ? MPI_IN_PLACE : static_cast<const char*>(send) + off * elem_size;
    s = Run(
        "MPI_Iallreduce", n,
        [&] { return MPI_Allreduce(snd, r, n, type, mop, comm_); },
        [&](MPI_Request* req) { return MPI_Iallreduce(snd, r, n, type, mop, comm_, req); });
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status MpiComm::AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) {
  return AllReduceTyped(send, recv, count, MPI_FLOAT, sizeof(float), op);
}

absl::Status MpiComm::AllReduce(const int64_t* send, int64_t* recv, int64_t count, ReduceOp op) {
  return AllReduceTyped(send, recv, count, MPI_INT64_T, sizeof(int64_t), op);
}

absl::Status MpiComm::AllGatherBytes(const void* send, int64_t bytes, void* recv) {
  absl::Status s = Usable("AllGather");
  if (!s.ok()) return s;
  if (!(s = CheckCount(bytes, "AllGather")).ok()) return s;
  if (bytes > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AllGather on %s: %d bytes per rank exceeds the MPI count limit %d; gather in pieces",
        Describe(), bytes, INT_MAX));
  }
  const int n = static_cast<int>(bytes);
  const void* snd =
      send == static_cast<const char*>(recv) + static_cast<int64_t>(rank_) * bytes ? MPI_IN_PLACE
                                                                                  : send;
  return Run(
      "MPI_Iallgather", bytes,
      [&] { return MPI_Allgather(snd, n, MPI_BYTE, recv, n, MPI_BYTE, comm_); },
      [&](MPI_Request* req) {
        return MPI_Iallgather(snd, n, MPI_BYTE, recv, n, MPI_BYTE, comm_, req);
      });
}

absl::Status MpiComm::Broadcast(void* buf, int64_t bytes, int root) {
  absl::Status s = Usable("Broadcast");
  if (!s.ok()) return s;
  if (!(s = CheckCount(bytes, "Broadcast")).ok()) return s;
  if (!(s = CheckRoot(root, "Broadcast")).ok()) return s;
  for (int64_t off = 0; off < bytes; off += kMaxChunk) {
    const int n = static_cast<int>(std::min(kMaxChunk, bytes - off));
    char* p = static_cast<char*>(buf) + off;
    s = Run(
        "MPI_Ibcast", n, [&] { return MPI_Bcast(p, n, MPI_BYTE, root, comm_); },
        [&](MPI_Request* req) { return MPI_Ibcast(p, n, MPI_BYTE, root, comm_, req); });
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status MpiComm::Barrier() {
  absl::Status s = Usable("Barrier");
  if (!s.ok()) return s;
  return Run(
      "MPI_Ibarrier", 0, [&] { return MPI_Barrier(comm_); },
      [&](MPI_Request* req) { return MPI_Ibarrier(comm_, req); });
}

absl::StatusOr<std::unique_ptr<Communicator>> MpiComm::Split(int color, int key) {
  absl::Status s = Usable("Split");
  if (!s.ok()) return s;
  if (color < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("Split: color must be >= 0, got %d", color));
  }
  MPI_Comm sub = MPI_COMM_NULL;
  DMSRT_MPI_RETURN_IF_ERROR(MPI_Comm_split(comm_, color, key, &sub));
  absl::StatusOr<std::unique_ptr<MpiComm>> c = Adopt(sub);
  if (!c.ok()) {
    MPI_Comm_free(&sub);
    return c.status();
  }
  (*c)->set_timeout(timeout_);
  return std::unique_ptr<Communicator>(std::move(*c));
}

absl::Status MpiComm::Abort(const std::string& reason) {
  std::fprintf(stderr, "dmsrt: rank %d failed: %s\n", world_rank_, reason.c_str());
  std::fflush(stderr);
  if (!MpiAlive()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("Abort on rank %d: MPI is not running (%s)", world_rank_, reason));
  }
  int rc = MPI_Abort(MPI_COMM_WORLD, 1);
  return MpiError(rc, "MPI_Abort", __FILE__, __LINE__);
}

}  // namespace dmsrt
