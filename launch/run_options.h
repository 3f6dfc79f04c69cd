// Options shared by the subcommands that run a model (generate, score, serve): the model, the
// backend and the KV policy. One place turns the command line into a BackendOptions, so every
// subcommand accepts the same spellings and gives the same errors.
#pragma once

#include <memory>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "launch/args.h"
#include "launch/byte_size.h"
#include "parallel/comm_factory.h"
#include "runtime/backend/backend.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

// Options understood by LoadRunContext (add them to a subcommand's value options).
const std::set<std::string>& RunValueOptions();

struct RunContext {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string backend = "cpu";  // --backend cpu|cuda
  BackendOptions backend_options;
  int32_t prefill_chunk = 512;
  bool synthetic_eviction = false;  // forced policy: figures are for measurement only
};

// Loads the model (--model or the default), attaches --dms-adapter, builds the tokenizer, reads
// --backend (cpu, the default, or cuda: one device, --tp 1; --device N, default: the launcher's
// local rank modulo the node's devices) and the backend options (--threads --kv-budget --kv-block --kv-policy --dms-window --dms-force-rate
// --dms-seed --kv-window --kv-sinks --kv-tokens --prefill-chunk).
absl::StatusOr<RunContext> LoadRunContext(const Args& args);

// ---- tensor parallelism (generate, score, bench) ------------------------------------------------
//
//   mpirun -np N build/bin/dmsrt generate --tp N ...
//
// These subcommands run one TP group: the job's ranks are the group (world size must equal the
// TP degree). Under mpirun without --tp the degree is the world size; --tp N > 1 without mpirun
// is refused with the command to run. TP rank 0 leads (reads the prompt, samples, prints); the
// other ranks load the same model, build their shard and follow the leader's steps, printing
// nothing but errors. Without mpirun and with --tp 1 (or no --tp) nothing changes: no MPI.
// An error on any rank of a group brings the job down with a line naming the rank.

// --tp N (0 = world size) and --tp-timeout SECONDS (collective watchdog, default 300).
const std::set<std::string>& TpValueOptions();

struct TpSession {
  std::unique_ptr<ParallelContext> par;  // null: a single process without MPI
  int tp = 1;
  // The TP group's communicator, or null with one rank.
  Communicator* comm() const { return tp > 1 ? par->tp_comm.get() : nullptr; }
  bool leader() const { return tp <= 1 || par->world.tp_rank() == 0; }
};

// Reads --tp and the launcher's environment, and starts MPI when under mpirun. Errors are
// INVALID_ARGUMENT / FAILED_PRECONDITION with the command line to use.
absl::StatusOr<TpSession> StartTp(const Args& args, int* argc, char*** argv);

// The backend for `ctx` on this rank. With tp 1: MakeBackend(ctx.backend). On the TP leader: its shard,
// wrapped so that every step and sequence operation reaches the followers. On a follower: builds
// the shard, follows the leader until it shuts the group down, and returns null — the caller then
// returns OK at once.
absl::StatusOr<std::unique_ptr<Backend>> MakeRunBackend(RunContext& ctx, TpSession& tp);

// Exit code of subcommand `command` for status `s`: prints "dmsrt <command>: <message>" and maps
// INVALID_ARGUMENT/NOT_FOUND to 2, others to 1. In a TP group of more than one rank it stops the
// whole job instead (ParallelContext::Fail: "dmsrt: rank R failed: ..."), so no rank waits.
int CommandExit(const char* command, const absl::Status& s, TpSession* tp);

}  // namespace dmsrt
