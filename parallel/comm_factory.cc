// InitParallel: launcher detection -> MPI bootstrap -> World -> world and TP communicators.
//
// The MPI runtime is held through a shared_ptr<void> so this header needs neither mpi.h nor a
// complete MpiRuntime type in builds without MPI.
#include "parallel/comm_factory.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"
#include "parallel/status_macros.h"

#ifdef DMSRT_HAVE_MPI
#include "parallel/mpi/mpi_comm.h"
#endif
#ifdef DMSRT_HAVE_NCCL
#include "parallel/nccl/nccl_comm.h"
#endif

namespace dmsrt {

const char* CommKindName(CommKind kind) {
  switch (kind) {
    case CommKind::kAuto:
      return "auto";
    case CommKind::kLocal:
      return "local";
    case CommKind::kMpi:
      return "mpi";
    case CommKind::kNccl:
      return "nccl";
  }
  return "?";
}

absl::StatusOr<CommKind> ParseCommKind(std::string_view name) {
  const std::string n = absl::AsciiStrToLower(std::string(name));
  if (n == "auto") return CommKind::kAuto;
  if (n == "local") return CommKind::kLocal;
  if (n == "mpi") return CommKind::kMpi;
  if (n == "nccl") return CommKind::kNccl;
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown communicator '%s' (expected auto, local, mpi or nccl)", name));
}

bool BuiltWithMpi() {
#ifdef DMSRT_HAVE_MPI
  return true;
#else
  return false;
#endif
}

bool BuiltWithNccl() {
#ifdef DMSRT_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

ParallelContext::~ParallelContext() {
  tp_comm.reset();
  world_comm.reset();
  mpi_runtime.reset();
}

int ParallelContext::Fail(const absl::Status& status) {
  const std::string reason = status.ToString();
  if (world_comm != nullptr) {
    (void)world_comm->Abort(reason);
  } else {
    std::fprintf(stderr, "dmsrt: rank %d failed: %s\n", world.rank(), reason.c_str());
  }
  return 1;
}

namespace {

// Every TP rank's host name, in tp_rank order (collective over the group's host communicator).
absl::StatusOr<std::vector<std::string>> GatherHosts(Communicator& tp_host) {
  constexpr int64_t kLen = 256;
  char mine[kLen] = {};
  if (gethostname(mine, kLen - 1) != 0) std::snprintf(mine, kLen, "unknown");
  std::vector<char> all(static_cast<size_t>(kLen) * tp_host.size());
  DMSRT_RETURN_IF_ERROR(tp_host.AllGatherBytes(mine, kLen, all.data()));
  std::vector<std::string> hosts;
  for (int r = 0; r < tp_host.size(); ++r) {
    const char* h = all.data() + static_cast<size_t>(r) * kLen;
    hosts.emplace_back(h, strnlen(h, kLen));
  }
  return hosts;
}

}  // namespace

std::vector<std::string> DistinctHosts(const std::vector<std::string>& hosts) {
  std::vector<std::string> out;
  for (const std::string& h : hosts) {
    if (std::find(out.begin(), out.end(), h) == out.end()) out.push_back(h);
  }
  return out;
}

std::string TpSpanNote(const World& world, const std::vector<std::string>& tp_hosts) {
  const std::vector<std::string> nodes = DistinctHosts(tp_hosts);
  if (nodes.size() <= 1) return "";
  return absl::StrFormat(
      "tensor-parallel group %d (world ranks %d..%d) spans %d nodes (%s): its collectives (two "
      "all-reduces per layer, the logits gather) cross the network every step; a group inside "
      "one node keeps them on NVLink",
      world.replica(), world.GroupMember(0), world.GroupMember(world.tp() - 1), nodes.size(),
      absl::StrJoin(nodes, ", "));
}

absl::StatusOr<ParallelContext> InitParallel(int* argc, char*** argv,
                                             const ParallelOptions& options) {
  const bool launched = InsideMpirun();
  CommKind kind = options.kind;
  if (kind == CommKind::kAuto) {
    if (options.gpu && BuiltWithNccl()) {
      kind = CommKind::kNccl;
    } else if (launched) {
      kind = CommKind::kMpi;
    } else {
      kind = CommKind::kLocal;
    }
  }
  if (launched && !BuiltWithMpi()) {
    DMSRT_ASSIGN_OR_RETURN(World env_world, WorldFromEnv(1));
    if (env_world.world_size() > 1) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "started under mpirun with %d ranks, but this dmsrt was built without MPI; rebuild with "
          "-DDMSRT_WITH_MPI=ON or start a single process",
          env_world.world_size()));
    }
  }
  if (kind == CommKind::kMpi && !BuiltWithMpi()) {
    return absl::FailedPreconditionError(
        "MPI communicator requested, but dmsrt was built without MPI (-DDMSRT_WITH_MPI=ON)");
  }
  if (kind == CommKind::kNccl && !BuiltWithNccl()) {
    return absl::FailedPreconditionError(
        "NCCL communicator requested, but dmsrt was built without CUDA+NCCL");
  }
  if (kind == CommKind::kLocal && launched) {
    DMSRT_ASSIGN_OR_RETURN(World env_world, WorldFromEnv(1));
    if (env_world.world_size() > 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "local (single-rank) communicator requested, but started under mpirun with %d ranks",
          env_world.world_size()));
    }
  }

  ParallelContext ctx;
  ctx.kind = kind;
  int devices = options.devices_per_node;
#ifdef DMSRT_HAVE_NCCL
  if (kind == CommKind::kNccl && devices == 0) {
    DMSRT_ASSIGN_OR_RETURN(devices, CudaDeviceCount());
  }
#endif

  // Host world communicator.
  if (launched && BuiltWithMpi()) {
#ifdef DMSRT_HAVE_MPI
    DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<MpiRuntime> rt, MpiRuntime::Init(argc, argv));
    ctx.mpi_runtime = std::shared_ptr<MpiRuntime>(std::move(rt));
    DMSRT_ASSIGN_OR_RETURN(ctx.world, WorldFromMpi(options.tp, devices));
    DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<MpiComm> wc, MpiComm::WorldDup());
    ctx.world_comm = std::move(wc);
#endif
  } else {
    DMSRT_ASSIGN_OR_RETURN(ctx.world, World::Make(1, options.tp == 0 ? 1 : options.tp, 0, -1,
                                                  devices));
    ctx.world_comm = std::make_unique<LocalComm>();
  }
  ctx.world_comm->set_timeout(options.timeout);

  // TP communicator: host split, then NCCL on top when asked.
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> tp_host,
                         MakeTpComm(*ctx.world_comm, ctx.world));
  DMSRT_ASSIGN_OR_RETURN(ctx.tp_hosts, GatherHosts(*tp_host));
  if (kind == CommKind::kNccl) {
#ifdef DMSRT_HAVE_NCCL
    NcclCommOptions nopts;
    nopts.sync = options.nccl_sync;
    DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<NcclComm> nc,
                           NcclComm::Create(std::move(tp_host), ctx.world.device(), nopts));
    ctx.tp_comm = std::move(nc);
#endif
  } else {
    ctx.tp_comm = std::move(tp_host);
  }
  ctx.tp_comm->set_timeout(options.timeout);
  return ctx;
}

}  // namespace dmsrt
