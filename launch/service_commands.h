// The gRPC subcommands of the dmsrt binary (built only with gRPC; launch/commands.cc dispatches to
// them when DMSRT_HAVE_GRPC is defined). argv[0] is the subcommand name; each returns the exit code.
//   serve        one replica (tp=1 per MPI rank); rank 0 also hosts the coordinator unless
//                --coordinator names one
//   coordinator  the coordinator alone; replicas join it with `serve --coordinator HOST:PORT`
//   submit       a client: submit a best-of-N job, show progress, print the answer and the votes
#pragma once

namespace dmsrt {

int RunServe(int argc, char** argv);
int RunCoordinator(int argc, char** argv);
int RunSubmit(int argc, char** argv);

}  // namespace dmsrt
