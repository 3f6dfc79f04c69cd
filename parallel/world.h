// World: where this process sits among the ranks of a job, as a plain value type.
//
// A job of `world_size` ranks is cut into `world_size / tp` replicas; each replica is one
// tensor-parallel (TP) group of `tp` consecutive ranks. Rank r belongs to replica r / tp and has
// TP rank r % tp inside it; TP rank 0 is the replica's leader (it samples and talks to the
// coordinator). The local rank (the process's index among the ranks on its node) picks the GPU.
//
//   world 4, tp 2:   rank      0  1  2  3
//                    replica   0  0  1  1
//                    tp_rank   0  1  0  1
//                    leader    y  n  y  n
//
// World holds numbers only and is testable without MPI. Construct it with World::Make (which
// validates), WorldFromMpi (MPI already initialised; see parallel/mpi/mpi_comm.h), or WorldFromEnv
// (reads the launcher's environment without touching MPI; for diagnostics and for deciding which
// communicator to build before MPI is up).
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace dmsrt {

class World {
 public:
  // A single rank: world 1, tp 1, rank 0, device 0.
  World() = default;

  // Validates and builds a World.
  //   world_size >= 1, 1 <= tp <= world_size, tp divides world_size, 0 <= rank < world_size.
  //   local_rank: index of this process among the ranks on its node; -1 = unknown (rank is used).
  //   devices_per_node: GPUs visible per node; > 0 gives device = local_rank % devices_per_node,
  //   0 = unknown (device = local_rank).
  static absl::StatusOr<World> Make(int world_size, int tp, int rank, int local_rank = -1,
                                    int devices_per_node = 0);

  int world_size() const { return world_size_; }
  int tp() const { return tp_; }
  int rank() const { return rank_; }
  int tp_rank() const { return rank_ % tp_; }
  int replica() const { return rank_ / tp_; }
  int num_replicas() const { return world_size_ / tp_; }
  int local_rank() const { return local_rank_; }
  int device() const { return device_; }
  // True for TP rank 0 of each replica.
  bool leader() const { return tp_rank() == 0; }
  // World rank of TP rank `tp_rank` in this rank's replica.
  int GroupMember(int tp_rank) const { return replica() * tp_ + tp_rank; }
  // World rank of the leader of this rank's replica.
  int leader_rank() const { return GroupMember(0); }

  // "rank 3/4 (replica 1/2, tp_rank 1/2, device 1)"
  std::string ToString() const;

  friend bool operator==(const World& a, const World& b) {
    return a.world_size_ == b.world_size_ && a.tp_ == b.tp_ && a.rank_ == b.rank_ &&
           a.local_rank_ == b.local_rank_ && a.device_ == b.device_;
  }
  friend bool operator!=(const World& a, const World& b) { return !(a == b); }

 private:
  int world_size_ = 1;
  int tp_ = 1;
  int rank_ = 0;
  int local_rank_ = 0;
  int device_ = 0;
};

// What the launcher put in the environment, read without MPI. Fields are empty when not set.
struct LauncherEnv {
  std::optional<int> world_size;  // OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_SIZE, SLURM_NTASKS
  std::optional<int> rank;        // OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK, SLURM_PROCID
  std::optional<int> local_rank;  // OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID
  std::string source;             // which family was found: "openmpi", "pmi", "pmix", "slurm", ""
};
LauncherEnv ReadLauncherEnv();

// True when this process was started by mpirun/mpiexec (or srun with PMI): one of
// OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK is set. A process started by hand is not.
bool InsideMpirun();

// World from the launcher's environment (no MPI calls). Outside a launcher this is the single-rank
// world. tp = 0 means "one replica of all ranks" (tp = world size).
absl::StatusOr<World> WorldFromEnv(int tp = 0, int devices_per_node = 0);

// World from MPI_COMM_WORLD (size and rank) plus the local rank from the environment. MPI must be
// initialised (see MpiRuntime). FAILED_PRECONDITION when built without MPI or MPI is not
// initialised. tp = 0 means tp = world size. Call it on every rank: when the launcher exports no
// local rank it is computed with MPI_Comm_split_type, a collective over MPI_COMM_WORLD.
absl::StatusOr<World> WorldFromMpi(int tp = 0, int devices_per_node = 0);

}  // namespace dmsrt
