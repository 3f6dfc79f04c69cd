// MPI bootstrap (MpiRuntime) and the CPU communicator (MpiComm). Compiled only with MPI
// (DMSRT_HAVE_MPI).
//
// MpiRuntime initialises MPI once per process and finalises it when destroyed, and switches
// MPI_COMM_WORLD to MPI_ERRORS_RETURN so a failing call comes back as an absl::Status carrying the
// file, line and MPI_Error_string instead of killing the process inside the library.
//
// MpiComm works on a private duplicate (or split) of MPI_COMM_WORLD, so its collectives never
// match collectives the application issues on MPI_COMM_WORLD itself. With a timeout set
// (Communicator::set_timeout) each collective is posted non-blocking (MPI_Iallreduce, MPI_Ibcast,
// MPI_Iallgather, MPI_Ibarrier) and polled with MPI_Test against a deadline: a peer that died or
// took another code path then yields DEADLINE_EXCEEDED naming the collective and the group,
// instead of a hang. Without a timeout the plain blocking calls are used.
//
//   DMSRT_ASSIGN_OR_RETURN(auto mpi, MpiRuntime::Init(&argc, &argv));   // keep alive until exit
//   DMSRT_ASSIGN_OR_RETURN(World world, WorldFromMpi(/*tp=*/2));
//   DMSRT_ASSIGN_OR_RETURN(auto world_comm, MpiComm::WorldDup());
//   world_comm->set_timeout(absl::Seconds(60));
//   DMSRT_ASSIGN_OR_RETURN(auto tp_comm, MakeTpComm(*world_comm, world));
//   ...
//   if (!status.ok()) return world_comm->Abort(status.ToString());    // stops every rank
//
// Destroy communicators before the MpiRuntime (MPI_Comm_free needs MPI alive).
#pragma once

// C API only: the deprecated C++ bindings of Open MPI / MPICH would need libmpi_cxx at link time.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parallel/comm.h"

namespace dmsrt {

// INTERNAL status "<file>:<line>: <call> failed: <MPI_Error_string(code)>".
absl::Status MpiError(int code, const char* call, const char* file, int line);

#define DMSRT_MPI_RETURN_IF_ERROR(call)                                      \
  do {                                                                       \
    int dmsrt_mpi_rc_ = (call);                                              \
    if (dmsrt_mpi_rc_ != MPI_SUCCESS)                                        \
      return ::dmsrt::MpiError(dmsrt_mpi_rc_, #call, __FILE__, __LINE__);    \
  } while (0)

// RAII owner of MPI initialisation. Create one in main, before any MpiComm; destroy it last.
class MpiRuntime {
 public:
  // MPI_Init_thread(argc, argv, required_thread_level) unless MPI is already initialised (then this
  // object does not finalise it). FAILED_PRECONDITION if MPI was already finalised (MPI cannot be
  // initialised twice in one process) or provides less than the required thread level.
  // MPI_THREAD_SERIALIZED lets any thread call MPI, one at a time (the server's worker thread).
  static absl::StatusOr<std::unique_ptr<MpiRuntime>> Init(
      int* argc, char*** argv, int required_thread_level = MPI_THREAD_SERIALIZED);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int thread_level() const { return thread_level_; }
  // True when this object called MPI_Init_thread (and will call MPI_Finalize).
  bool owns_mpi() const { return owns_; }

 private:
  MpiRuntime() = default;
  bool owns_ = false;
  int thread_level_ = MPI_THREAD_SINGLE;
};

class MpiComm final : public Communicator {
 public:
  // A private duplicate of MPI_COMM_WORLD. MPI must be initialised. Collective.
  static absl::StatusOr<std::unique_ptr<MpiComm>> WorldDup();
  // Takes ownership of `comm` (freed by the destructor). Sets MPI_ERRORS_RETURN on it.
  static absl::StatusOr<std::unique_ptr<MpiComm>> Adopt(MPI_Comm comm);
  ~MpiComm() override;

  int size() const override { return size_; }
  int rank() const override { return rank_; }
  const char* kind() const override { return "mpi"; }
  std::string Describe() const override;
  MPI_Comm raw() const { return comm_; }
  // Rank of this process in MPI_COMM_WORLD.
  int world_rank() const { return world_rank_; }
  // World ranks of the members, in communicator order.
  const std::vector<int>& members() const { return members_; }

  absl::Status AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) override;
  absl::Status AllReduce(const int64_t* send, int64_t* recv, int64_t count, ReduceOp op) override;
  absl::Status AllGatherBytes(const void* send, int64_t bytes, void* recv) override;
  absl::Status Broadcast(void* buf, int64_t bytes, int root) override;
  absl::Status Barrier() override;
  // MPI_Comm_split; blocking (MPI has no non-blocking split), so no watchdog here.
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) override;
  // Prints `dmsrt: rank R failed: reason` (R = world rank) and calls MPI_Abort(MPI_COMM_WORLD, 1):
  // mpirun then stops every rank and exits non-zero. Returns only if MPI_Abort itself fails.
  absl::Status Abort(const std::string& reason) override;

 private:
  MpiComm() = default;
  absl::Status Usable(const char* what) const;
  // Waits for `req` (posted by `what` on `count` elements) until the timeout.
  absl::Status WaitWithDeadline(MPI_Request* req, const char* what, int64_t count);
  // Runs one collective: blocking form without a timeout, non-blocking form + poll with one.
  template <class Blocking, class NonBlocking>
  absl::Status Run(const char* what, int64_t count, Blocking blocking, NonBlocking nonblocking);
  absl::Status AllReduceTyped(const void* send, void* recv, int64_t count, MPI_Datatype type,
                              size_t elem_size, ReduceOp op);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int size_ = 1;
  int rank_ = 0;
  int world_rank_ = 0;
  std::vector<int> members_;
  // Set after a timeout or a transport error; later calls fail fast.
  std::string broken_;
  // Requests abandoned by a timeout (they may still complete if the late peers arrive).
  std::vector<MPI_Request> abandoned_;
};

}  // namespace dmsrt
