// A job in which one rank fails: it must take the whole job down, quickly, naming itself.
//
// The last rank hits an error before a collective and calls Communicator::Abort; the other ranks
// are already waiting in that collective. ctest (tests/cmake/mpi.cmake) runs this under mpirun and
// passes only if mpirun exits non-zero AND the output contains "dmsrt: rank <last> failed". The
// waiting ranks carry a 30 s watchdog, so even if Abort did not stop them they would leave with
// DEADLINE_EXCEEDED instead of hanging.
#include <cstdio>
#include <vector>

#include "absl/status/status.h"
#include "parallel/comm_factory.h"

namespace {

absl::Status Step(dmsrt::Communicator& comm, const dmsrt::World& world) {
  std::vector<float> partial(111, 1.0f);
  if (world.rank() == world.world_size() - 1) {
    return absl::DataLossError("injected failure: layer 3 weights unreadable");
  }
  return comm.AllReduceSum(partial.data(), partial.size());
}

}  // namespace

int main(int argc, char** argv) {
  dmsrt::ParallelOptions opts;
  opts.tp = 0;
  opts.timeout = absl::Seconds(30);
  absl::StatusOr<dmsrt::ParallelContext> par = dmsrt::InitParallel(&argc, &argv, opts);
  if (!par.ok()) {
    std::fprintf(stderr, "init: %s\n", par.status().ToString().c_str());
    return 2;
  }
  absl::Status s = Step(*par->tp_comm, par->world);
  if (!s.ok()) return par->Fail(s);
  std::printf("rank %d: step finished\n", par->world.rank());
  return 0;
}
