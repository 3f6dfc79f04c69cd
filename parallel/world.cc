// World construction and launcher detection.
//
// Environment variables are read with plain getenv and parsed strictly (a malformed value is an
// error, not a silent 0), because a wrong rank number would make two processes believe they are
// the same rank and deadlock later in a collective, far from the cause.
#include "parallel/world.h"

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"

#ifdef DMSRT_HAVE_MPI
#include "parallel/mpi/mpi_comm.h"
#endif

namespace dmsrt {
namespace {

std::optional<int> EnvInt(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  int out = 0;
  if (!absl::SimpleAtoi(v, &out)) return std::nullopt;
  return out;
}

bool EnvSet(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0';
}

}  // namespace

absl::StatusOr<World> World::Make(int world_size, int tp, int rank, int local_rank,
                                  int devices_per_node) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("world size must be >= 1, got %d", world_size));
  }
  if (tp < 1 || tp > world_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor-parallel size must be in [1, world size %d], got %d", world_size, tp));
  }
  if (world_size % tp != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor-parallel size %d does not divide the world size %d: every replica needs exactly "
        "%d ranks; start a multiple of %d ranks or pick a tp that divides %d",
        tp, world_size, tp, tp, world_size));
  }
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rank %d out of range for world size %d", rank, world_size));
  }
  if (local_rank < -1) {
    return absl::InvalidArgumentError(absl::StrFormat("local rank must be >= -1, got %d", local_rank));
  }
  if (devices_per_node < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("devices per node must be >= 0, got %d", devices_per_node));
  }
  World w;
  w.world_size_ = world_size;
  w.tp_ = tp;
  w.rank_ = rank;
  w.local_rank_ = local_rank >= 0 ? local_rank : rank;
  w.device_ = devices_per_node > 0 ? w.local_rank_ % devices_per_node : w.local_rank_;
  return w;
}

std::string World::ToString() const {
  return absl::StrFormat("rank %d/%d (replica %d/%d, tp_rank %d/%d, device %d)", rank_, world_size_,
                         replica(), num_replicas(), tp_rank(), tp_, device_);
}

LauncherEnv ReadLauncherEnv() {
  LauncherEnv env;
  struct Family {
    const char* name;
    const char* size;
    const char* rank;
    const char* local_rank;
  };
  // Open MPI first: its mpirun also sets PMIX_RANK, and OMPI_* carry the local rank.
  static constexpr Family kFamilies[] = {
      {"openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"},
      {"pmi", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"},
      {"pmix", "PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK"},
      {"slurm", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"},
  };
  for (const Family& f : kFamilies) {
    std::optional<int> size = EnvInt(f.size);
    std::optional<int> rank = EnvInt(f.rank);
    if (!size.has_value() && !rank.has_value()) continue;
    env.world_size = size;
    env.rank = rank;
    env.local_rank = EnvInt(f.local_rank);
    env.source = f.name;
    break;
  }
  if (!env.local_rank.has_value()) {
    // Launchers that do not export a local rank of their own family.
    for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                             "LOCAL_RANK"}) {
      if ((env.local_rank = EnvInt(name)).has_value()) break;
    }
  }
  return env;
}

bool InsideMpirun() {
  return EnvSet("OMPI_COMM_WORLD_SIZE") || EnvSet("PMI_SIZE") || EnvSet("PMIX_RANK");
}

absl::StatusOr<World> WorldFromEnv(int tp, int devices_per_node) {
  LauncherEnv env = ReadLauncherEnv();
  if (env.source.empty()) return World::Make(1, tp == 0 ? 1 : tp, 0, -1, devices_per_node);
  if (!env.world_size.has_value() || !env.rank.has_value()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "launcher environment (%s) is incomplete: world size %s, rank %s", env.source,
        env.world_size ? std::to_string(*env.world_size) : "unset",
        env.rank ? std::to_string(*env.rank) : "unset"));
  }
  return World::Make(*env.world_size, tp == 0 ? *env.world_size : tp, *env.rank,
                     env.local_rank.value_or(-1), devices_per_node);
}

absl::StatusOr<World> WorldFromMpi(int tp, int devices_per_node) {
#ifdef DMSRT_HAVE_MPI
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    return absl::FailedPreconditionError(
        "WorldFromMpi: MPI is not initialised (create an MpiRuntime first)");
  }
  int size = 0, rank = 0;
  if (MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS ||
      MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) {
    return absl::InternalError("WorldFromMpi: MPI_Comm_size/MPI_Comm_rank failed");
  }
  // The local rank: prefer the launcher's; otherwise ask MPI for the ranks sharing this node.
  std::optional<int> local = ReadLauncherEnv().local_rank;
  if (!local.has_value()) {
    MPI_Comm node;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
      int lr = 0;
      MPI_Comm_rank(node, &lr);
      MPI_Comm_free(&node);
      local = lr;
    }
  }
  return World::Make(size, tp == 0 ? size : tp, rank, local.value_or(-1), devices_per_node);
#else
  (void)tp;
  (void)devices_per_node;
  return absl::FailedPreconditionError(
      "WorldFromMpi: dmsrt was built without MPI (configure with -DDMSRT_WITH_MPI=ON)");
#endif
}

}  // namespace dmsrt
