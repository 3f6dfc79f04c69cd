// One call that sets up everything a process needs to take part in a job: MPI (when started under
// mpirun), the World, the world communicator and this rank's TP-group communicator.
//
// Which communicator (CommKind::kAuto):
//   started by hand (no launcher variables)     -> LocalComm (world 1), or NcclComm of 1 rank
//                                                  when opts.gpu and NCCL was built
//   under mpirun, built with MPI                -> MpiComm; with opts.gpu and NCCL built, the TP
//                                                  communicator is an NcclComm bootstrapped over
//                                                  MPI (one GPU per rank, device = local rank)
//   under mpirun, built without MPI             -> FAILED_PRECONDITION (every rank would think it
//                                                  is alone and do the whole job)
// world_comm is always a host (CPU-memory) communicator: control messages, Abort. tp_comm is the
// data path for activations (host buffers for MPI/Local, device buffers for NCCL).
//
//   int main(int argc, char** argv) {
//     ParallelOptions opts;
//     opts.tp = 2;
//     opts.timeout = absl::Seconds(120);
//     absl::StatusOr<ParallelContext> par = InitParallel(&argc, &argv, opts);
//     if (!par.ok()) { std::cerr << par.status() << "\n"; return 1; }
//     absl::Status s = Serve(*par);                   // uses par->tp_comm, par->world
//     if (!s.ok()) return par->Fail(s);              // names the rank, stops the others
//     return 0;
//   }                                                 // comms freed, then MPI finalised
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/comm.h"
#include "parallel/world.h"

namespace dmsrt {

enum class CommKind { kAuto, kLocal, kMpi, kNccl };
const char* CommKindName(CommKind kind);  // "auto", "local", "mpi", "nccl"
absl::StatusOr<CommKind> ParseCommKind(std::string_view name);

// Which kinds this build contains.
bool BuiltWithMpi();
bool BuiltWithNccl();

struct ParallelOptions {
  int tp = 0;  // tensor-parallel degree; 0 = all ranks form one replica
  CommKind kind = CommKind::kAuto;
  bool gpu = false;          // kAuto: use NCCL for tp_comm when built with it
  int devices_per_node = 0;  // 0 = ask CUDA (NCCL) or use the local rank
  absl::Duration timeout = absl::InfiniteDuration();  // collective watchdog (see comm.h)
  bool nccl_sync = true;     // NcclComm waits for each collective (see nccl_comm.h)
};

// Owns the communicators and the MPI runtime; move-only. Members are destroyed in reverse order,
// so the communicators go before MPI is finalised.
struct ParallelContext {
  std::shared_ptr<void> mpi_runtime;  // non-null when this process initialised MPI
  World world;
  CommKind kind = CommKind::kLocal;   // the kind of tp_comm
  std::unique_ptr<Communicator> world_comm;  // host memory, all ranks
  std::unique_ptr<Communicator> tp_comm;     // this replica's ranks, tp_rank order
  std::vector<std::string> tp_hosts;         // the host name of each of them, tp_rank order

  ParallelContext() = default;
  ParallelContext(ParallelContext&&) = default;
  ParallelContext& operator=(ParallelContext&&) = default;
  ~ParallelContext();

  // For main: world_comm->Abort(status) and an exit code (1). Under MPI this does not return
  // (MPI_Abort stops the job); single-rank it prints the failure line and returns 1.
  int Fail(const absl::Status& status);
};

// The distinct hosts of a TP group's ranks (`hosts` in tp_rank order), in first-seen order.
std::vector<std::string> DistinctHosts(const std::vector<std::string>& hosts);
// For a TP group whose ranks are on more than one node: the line that says its collectives cross
// the network (a group inside a node uses NVLink or shared memory); "" otherwise.
std::string TpSpanNote(const World& world, const std::vector<std::string>& tp_hosts);

// Collective over all ranks of the job when under mpirun. Safe to call once per process.
absl::StatusOr<ParallelContext> InitParallel(int* argc, char*** argv,
                                             const ParallelOptions& options);

}  // namespace dmsrt
