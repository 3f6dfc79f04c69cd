// The gRPC subcommands of the dmsrt binary (built only with gRPC; launch/commands.cc registers them
// when DMSRT_HAVE_GRPC is defined). Each returns the exit code.
//   serve        one replica (tp=1 per MPI rank); rank 0 also hosts the coordinator unless
//                --coordinator names one
//   coordinator  the coordinator alone; replicas join it with `serve --coordinator HOST:PORT`
//   submit       a client: submit a best-of-N job, show progress, print the answer and the votes
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "launch/run_options.h"

namespace dmsrt {

// What a hosted coordinator listens on and accepts (serve and coordinator).
struct ServiceOptions {
  std::string listen = "127.0.0.1:50051";
  std::optional<int32_t> metrics_port;
  std::string http_listen;  // HOST:PORT of the OpenAI-compatible HTTP API; empty: none
  int32_t http_threads = 256;
  std::string auth_token;
  std::string tls_cert, tls_key, tls_ca;
  int32_t max_n = 0;               // 0: the coordinator's default (set by AddServiceOptions)
  int32_t default_max_tokens = 0;  // likewise
};

struct ServeOptions {
  RunOptions run;
  TpOptions tp{/*tp=*/1};
  ServiceOptions service;
  std::string coordinator;  // HOST:PORT; empty: rank 0 hosts one on --listen
  std::string step_log;     // FILE: one CSV line per engine step (EngineOptions::on_step)
};
void SetupServe(CLI::App& app, ServeOptions& o);
int RunServe(const ServeOptions& o, ProcessArgs& args);

struct CoordinatorCommandOptions {
  std::string model;
  ServiceOptions service;
};
void SetupCoordinator(CLI::App& app, CoordinatorCommandOptions& o);
int RunCoordinator(const CoordinatorCommandOptions& o, ProcessArgs& args);

struct SubmitOptions {
  std::string address = "127.0.0.1:50051";
  std::optional<std::string> prompt, chat;  // exactly one of these and messages
  std::vector<std::string> messages;        // ROLE:TEXT turns of a conversation
  std::optional<int32_t> n;                 // default: 8, or 0 (the budget decides) with --budget
  std::optional<int64_t> budget_bytes;      // --budget
  int32_t max_tokens = 0;
  double temperature = 0.7;
  double top_p = 1.0;
  int32_t top_k = 0;
  int64_t seed = 0;
  std::vector<std::string> stop;
  std::string regex;
  std::string selection = "majority";
  double deadline_s = 0;
  std::string auth_token, tls_ca;
  double timeout_s = 0;
  double wait_ready_s = 0;
  bool json = false;
  bool early_stop = false;
  bool no_progress = false;
  bool ignore_eos = false;
};
void SetupSubmit(CLI::App& app, SubmitOptions& o);
int RunSubmit(const SubmitOptions& o, ProcessArgs& args);

}  // namespace dmsrt
