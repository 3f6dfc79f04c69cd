// Options shared by the subcommands that run a model (generate, score, bench, serve): the model, the
// backend and the KV policy. One function adds them to a subcommand's command line and one turns
// them into a RunContext, so every subcommand accepts the same spellings, defaults and errors.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "launch/byte_size.h"
#include "launch/cli.h"
#include "parallel/comm_factory.h"
#include "runtime/backend/backend.h"
#include "runtime/model/model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace dmsrt {

// The command line of a model run, as parsed (AddRunOptions); LoadRunContext checks what depends
// on the model.
struct RunOptions {
  std::string model;                     // --model; empty: DefaultModelPath()
  std::string dms_adapter;               // --dms-adapter FILE.safetensors
  bool no_dms_adapter = false;           // --no-dms-adapter: not even the default model's
  std::string backend = "cpu";           // --backend cpu|cuda
  int32_t device = -1;                   // --device (-1: the launcher's local rank)
  int32_t threads = 0;                   // --threads (0: all cores)
  int64_t kv_budget_bytes = int64_t{1} << 30;  // --kv-budget
  int32_t kv_block = 16;                 // --kv-block
  std::optional<std::string> kv_policy;  // --kv-policy; unset: forced with --dms-force-rate,
                                         // dms on a model with DMS decisions, else none
  std::optional<double> dms_force_rate;  // --dms-force-rate (forced; unset: 0.875)
  std::optional<int32_t> dms_window;     // --dms-window (forced, threshold; unset: the
                                         // model's, else 512)
  std::optional<double> threshold;       // --threshold (threshold: flag when score < it)
  std::optional<double> threshold_rate;  // --threshold-rate (threshold: calibrate to this share)
  std::string threshold_calibration;     // --threshold-calibration FILE (default: a built-in
                                         // public-domain text)
  int32_t threshold_shift = 0;           // --threshold-shift 0|1
  int64_t dms_seed = 0;                  // --dms-seed (forced)
  int32_t kv_window = 512;               // --kv-window (window)
  int32_t kv_sinks = 4;                  // --kv-sinks (window)
  int32_t kv_tokens = 512;               // --kv-tokens (tova, h2o)
  int32_t prefill_chunk = 512;           // --prefill-chunk
};

// Adds --model --dms-adapter --backend --device --threads --kv-budget --kv-block --kv-policy
// --dms-force-rate --dms-window --dms-seed --threshold --threshold-rate --threshold-calibration
// --threshold-shift --kv-window --kv-sinks --kv-tokens --prefill-chunk.
void AddRunOptions(CLI::App& app, RunOptions* options);

// The options of AddRunOptions that other subcommands take with the same meaning and default
// (tokenize and coordinator: --model; bench-decode: --backend --device --threads --kv-block
// --kv-window --kv-sinks).
CLI::Option* AddModelOption(CLI::App& app, std::string* model);
CLI::Option* AddBackendOption(CLI::App& app, std::string* backend);
CLI::Option* AddDeviceOption(CLI::App& app, int32_t* device);
CLI::Option* AddThreadsOption(CLI::App& app, int32_t* threads);
CLI::Option* AddKvBlockOption(CLI::App& app, int32_t* kv_block);
void AddKvWindowOptions(CLI::App& app, int32_t* kv_window, int32_t* kv_sinks);

// The default model: $DMSRT_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf next to the
// source tree the binary was built from (found relative to the executable), else ./models/....
// NOT_FOUND with the setup command to run when none exists.
absl::StatusOr<std::string> DefaultModelPath();

// The learned DMS adapter of the default model (adapters/SmolLM2-135M-Instruct.dms.safetensors
// beside the source tree), or nullopt when the tree has none. LoadRunContext attaches it when the
// model is the default one, no --dms-adapter is given and the policy is unset or dms.
std::optional<std::string> DefaultDmsAdapterPath();

// `relative` (a path inside the source tree, e.g. "tests/data/eval/heldout.txt") next to the
// source tree the binary was built from (found relative to the executable), else relative to the
// working directory; nullopt when neither exists.
std::optional<std::string> FindBesideSourceTree(const std::string& relative);

struct RunContext {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string backend = "cpu";  // --backend cpu|cuda
  BackendOptions backend_options;
  int32_t prefill_chunk = 512;
  bool synthetic_eviction = false;  // forced policy: figures are for measurement only
  std::string dms_adapter;          // the adapter file attached (given or the default's), or ""
};

// Loads the model (--model or the default), attaches --dms-adapter (or DefaultDmsAdapterPath()), builds the tokenizer and the
// backend options (--backend cpu, the default, or cuda: one device per process; --device N, default:
// the launcher's local rank modulo the node's devices), and resolves the KV policy against the
// model (dms needs a model with DMS decisions; --dms-force-rate goes with forced only).
absl::StatusOr<RunContext> LoadRunContext(const RunOptions& options);

// ---- tensor parallelism (generate, score, bench) ------------------------------------------------
//
//   mpirun -np N build/bin/dmsrt generate --tp N ...
//
// These subcommands run one TP group: the job's ranks are the group (world size must equal the
// TP degree). With --backend cuda each rank drives the GPU of its local rank and the group's
// collectives go through NCCL. Under mpirun without --tp the degree is the world size; --tp N > 1 without mpirun
// is refused with the command to run. TP rank 0 leads (reads the prompt, samples, prints); the
// other ranks load the same model, build their shard and follow the leader's steps, printing
// nothing but errors. Without mpirun and with --tp 1 (or no --tp) nothing changes: no MPI.
// An error on any rank of a group brings the job down with a line naming the rank.

// --tp N and --tp-timeout SECONDS (collective watchdog).
struct TpOptions {
  int32_t tp = 0;  // generate, score, bench: 0 = the number of ranks; serve: ranks per replica
  double timeout_s = 300;
};

// Adds --tp and --tp-timeout; the default of --tp is options->tp, `tp_description` says what it
// counts for this subcommand.
void AddTpOptions(CLI::App& app, TpOptions* options, const std::string& tp_description);

struct TpSession {
  std::unique_ptr<ParallelContext> par;  // null: a single process without MPI
  int tp = 1;
  // The TP group's communicator, or null with one rank.
  Communicator* comm() const { return tp > 1 ? par->tp_comm.get() : nullptr; }
  bool leader() const { return tp <= 1 || par->world.tp_rank() == 0; }
};

// Checks --tp against the launcher's environment, and starts MPI (on the process's command line)
// when under mpirun. With --backend cuda (`backend`) and more than one rank, the TP group's
// communicator is an NcclComm on the device of this rank's local rank (bootstrapped over MPI).
// Errors are INVALID_ARGUMENT / FAILED_PRECONDITION with the command line to use; `command` is
// the subcommand's name, for that line.
absl::StatusOr<TpSession> StartTp(const TpOptions& options, const char* command,
                                  const std::string& backend, ProcessArgs& args);

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
