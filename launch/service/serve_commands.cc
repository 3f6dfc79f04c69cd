// `dmsrt serve` and `dmsrt coordinator`.
//
// serve: the mpirun world is cut into replicas of --tp consecutive ranks (world size = replicas x
// tp; --tp 1, the default, makes every rank its own replica). Every rank loads the model and
// builds its shard of the backend (--backend cuda: on the GPU of its local rank, the group's
// collectives through NCCL). The TP leader of each replica (TP rank 0) wraps its shard
// (MakeTpLeaderBackend), runs the Engine over it and a ReplicaAgent that dials the coordinator;
// the other ranks of the group follow the leader's steps (RunTpFollower) until it shuts the group
// down. Without --coordinator, rank 0 first starts the coordinator on --listen; the address the
// replicas dial is broadcast from rank 0 over MPI, so only rank 0 needs to know it.
//
// Ending: SIGINT/SIGTERM (mpirun forwards them to every rank) stop each leader's agent and
// engine; the leader then releases its followers (shutdown plan) before it stops the hosted
// coordinator, so a whole world ends within mpirun's grace period. Followers ignore the signal
// and end with their leader. An idle leader pings its followers (every --tp-timeout / 4, at most
// 30 s) so their wait for the next step stays inside the collective watchdog. When a leader's
// group breaks (a collective timed out or failed, or a step failed in a way that may leave the
// ranks' caches apart), the leader stops and brings the whole job down with a line naming it
// (ParallelContext::Fail); a follower that fails does the same.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <thread>

#include <CLI/CLI.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "launch/plan/step_check.h"
#include "launch/run_options.h"
#include "launch/service/coordinator.h"
#include "launch/service/http_frontend.h"
#include "launch/service/replica_agent.h"
#include "launch/service_commands.h"
#include "parallel/comm_factory.h"
#include "parallel/status_macros.h"
#include "parallel/world.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/tp_replica.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

// Server credentials from --tls-cert/--tls-key (both or neither).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCreds(const ServiceOptions& o) {
  const std::string& cert = o.tls_cert;
  const std::string& key = o.tls_key;
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions opts;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  DMSRT_ASSIGN_OR_RETURN(pair.cert_chain, ReadWholeFile(cert));
  DMSRT_ASSIGN_OR_RETURN(pair.private_key, ReadWholeFile(key));
  opts.pem_key_cert_pairs.push_back(pair);
  return grpc::SslServerCredentials(opts);
}

// Channel credentials for a replica dialling the coordinator: TLS with --tls-ca (or the server's
// own --tls-cert as the root) when TLS is on.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCreds(const ServiceOptions& so) {
  const std::string ca = so.tls_ca.empty() ? so.tls_cert : so.tls_ca;
  if (ca.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  DMSRT_ASSIGN_OR_RETURN(o.pem_root_certs, ReadWholeFile(ca));
  return grpc::SslCredentials(o);
}

CoordinatorOptions CoordOptions(const ServiceOptions& s) {
  CoordinatorOptions o;
  o.auth_token = s.auth_token;
  o.max_n = s.max_n;
  o.default_max_tokens = s.default_max_tokens;
  return o;
}

// --listen, --metrics-port, --auth-token, --tls-*, --max-n, --default-max-tokens.
void AddServiceOptions(CLI::App& app, ServiceOptions* o) {
  const CoordinatorOptions defaults;
  o->max_n = defaults.max_n;
  o->default_max_tokens = defaults.default_max_tokens;
  app.add_option("--listen", o->listen, "HOST:PORT the coordinator serves gRPC on (port 0: any free port)")
      ->type_name("ADDRESS");
  app.add_option("--metrics-port", o->metrics_port,
                 "serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port)")
      ->transform(Integer(0, 65535));
  app.add_option("--http-listen", o->http_listen,
                 "HOST:PORT of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                 "/v1/models; port 0: any free port); same --auth-token and TLS as gRPC")
      ->type_name("ADDRESS");
  app.add_option("--http-threads", o->http_threads,
                 "HTTP worker threads: each open request or stream holds one")
      ->transform(Integer(1, 100000));
  app.add_option("--auth-token", o->auth_token,
                 "clients and replicas must send 'authorization: Bearer TOKEN' (gRPC and HTTP)");
  app.add_option("--tls-cert", o->tls_cert, "TLS certificate chain (PEM; with --tls-key)")->type_name("FILE");
  app.add_option("--tls-key", o->tls_key, "TLS private key (PEM; with --tls-cert)")->type_name("FILE");
  app.add_option("--tls-ca", o->tls_ca,
                 "root certificate a replica trusts when it dials the coordinator (default: --tls-cert)")
      ->type_name("FILE");
  app.add_option("--max-n", o->max_n, "threads per job at most")->transform(Integer(1));
  app.add_option("--default-max-tokens", o->default_max_tokens,
                 "tokens per thread when a job gives no max_tokens")
      ->transform(Integer(1));
}

// The coordinator a serve rank hosts. Stop() gives calls in flight `grace` to end, so replicas
// still connected cannot keep the server from going down; the destructor (an error path) gives
// them none.
struct HostedCoordinator {
  std::unique_ptr<Coordinator> coordinator;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<HttpFrontend> http;     // --http-listen: the OpenAI-compatible API
  std::unique_ptr<HttpFrontend> metrics;  // --metrics-port: /metrics alone
  std::string dial_address;  // what replicas on this host dial

  HostedCoordinator() = default;
  HostedCoordinator(HostedCoordinator&&) = default;
  HostedCoordinator& operator=(HostedCoordinator&&) = default;
  ~HostedCoordinator() { Stop(std::chrono::seconds(0)); }
  void Stop(std::chrono::seconds grace = std::chrono::seconds(2)) {
    if (coordinator) coordinator->Shutdown();  // ends the streams HTTP workers follow
    if (http) http->Stop();
    if (metrics) metrics->Stop();
    if (server) server->Shutdown(std::chrono::system_clock::now() + grace);
  }
};

absl::StatusOr<std::unique_ptr<HttpFrontend>> StartHttp(const ServiceOptions& so, Coordinator& c) {
  const size_t colon = so.http_listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(so.http_listen.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--http-listen ", so.http_listen, " is not HOST:PORT"));
  }
  HttpFrontendOptions ho;
  ho.host = so.http_listen.substr(0, colon);
  ho.port = port;
  ho.tls_cert = so.tls_cert;
  ho.tls_key = so.tls_key;
  ho.threads = so.http_threads;
  ho.max_n = so.max_n;
  auto http = std::make_unique<HttpFrontend>(c, ho);
  DMSRT_RETURN_IF_ERROR(http->Start());
  std::cout << "OpenAI-compatible HTTP API on " << (so.tls_cert.empty() ? "http" : "https") << "://"
            << ho.host << ":" << http->port() << "/v1" << std::endl;
  return http;
}

absl::StatusOr<HostedCoordinator> StartCoordinator(const ServiceOptions& so, const Model& model,
                                                   const Tokenizer& tok) {
  HostedCoordinator h;
  h.coordinator = std::make_unique<Coordinator>(model, tok, CoordOptions(so));
  const std::string& listen = so.listen;
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--listen ", listen, " is not HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  DMSRT_ASSIGN_OR_RETURN(auto creds, ServerCreds(so));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(listen, creds, &port);
  b.RegisterService(static_cast<v1::JobService::Service*>(h.coordinator.get()));
  b.RegisterService(static_cast<v1::ReplicaService::Service*>(h.coordinator.get()));
  b.SetMaxReceiveMessageSize(64 << 20);
  h.server = b.BuildAndStart();
  if (!h.server || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen,
                                               " (address in use, or not an address of this host)"));
  }
  std::string dial_host = host == "0.0.0.0" || host == "[::]" || host.empty() ? "127.0.0.1" : host;
  h.dial_address = absl::StrCat(dial_host, ":", port);
  if (so.metrics_port) {
    HttpFrontendOptions mo;
    mo.host = dial_host;
    mo.port = *so.metrics_port;
    mo.threads = 4;
    mo.openai = false;
    mo.metrics = true;
    h.metrics = std::make_unique<HttpFrontend>(*h.coordinator, mo);
    DMSRT_RETURN_IF_ERROR(h.metrics->Start());
    std::cout << "metrics on http://" << dial_host << ":" << h.metrics->port() << "/metrics"
              << std::endl;
  }
  if (!so.http_listen.empty()) {
    DMSRT_ASSIGN_OR_RETURN(h.http, StartHttp(so, *h.coordinator));
  }
  std::cout << "coordinator listening on " << h.dial_address << std::endl;
  return h;
}

struct ServeTp {
  int tp = 1;
  absl::Duration timeout = absl::Seconds(300);
};

// --tp and --tp-timeout, checked against the launcher's environment before MPI starts, so every
// rank gives the same message and nothing waits.
absl::StatusOr<ServeTp> ParseServeTp(const TpOptions& o) {
  ServeTp t;
  int64_t tp = o.tp;
  const double timeout_s = o.timeout_s;
  if (tp < 0) {
    return absl::InvalidArgumentError(
        "--tp must be >= 1 (ranks per replica; 0 = all ranks form one replica)");
  }
  if (!(timeout_s > 0)) return absl::InvalidArgumentError("--tp-timeout must be > 0 seconds");
  t.timeout = absl::Seconds(timeout_s);
  const bool launched = InsideMpirun();
  const int64_t world = launched ? ReadLauncherEnv().world_size.value_or(1) : 1;
  if (tp == 0) tp = world;
  if (!launched && tp > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--tp %d needs %d processes per replica: launch with mpirun -np %d dmsrt serve --tp %d "
        "... (mpirun -np %d for 2 replicas)",
        tp, tp, tp, tp, 2 * tp));
  }
  if (world % tp != 0) {
    const int64_t below = world / tp * tp;
    return absl::InvalidArgumentError(absl::StrFormat(
        "serve --tp %d under mpirun with %d ranks: every replica is a group of %d ranks, so the "
        "number of ranks must be a multiple of %d (replicas x tp): launch with mpirun -np %d%s",
        tp, world, tp, tp, below + tp, below > 0 ? absl::StrCat(" or -np ", below) : ""));
  }
  t.tp = static_cast<int>(tp);
  return t;
}

absl::Status ServeRank(const ServeOptions& o, ParallelContext& par, const ServeTp& tp);

absl::Status Serve(const ServeOptions& o, ProcessArgs& args) {
  DMSRT_ASSIGN_OR_RETURN(ServeTp tp, ParseServeTp(o.tp));
  // From here on a signal asks for a clean stop instead of killing the rank mid-collective.
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  ParallelOptions popts;
  popts.tp = tp.tp;
  popts.timeout = tp.timeout;
  popts.gpu = o.run.backend == "cuda" && tp.tp > 1;  // NCCL within each replica's group
  DMSRT_ASSIGN_OR_RETURN(ParallelContext par, InitParallel(&args.argc, &args.argv, popts));
  absl::Status s = ServeRank(o, par, tp);
  // A rank that fails must not leave the others waiting in a collective: stop the whole job.
  if (!s.ok() && par.world.world_size() > 1) {
    std::cerr << "dmsrt serve: rank " << par.world.rank() << ": " << s << std::endl;
    par.Fail(s);
  }
  return s;
}

// Errors after which the ranks of a TP group may no longer hold the same caches: everything but
// a refused request (every rank refuses it alike; a full cache is handled by the engine).
bool BreaksTpGroup(const absl::Status& s) {
  return !(absl::IsInvalidArgument(s) || absl::IsNotFound(s) || absl::IsResourceExhausted(s));
}

absl::Status ServeRank(const ServeOptions& o, ParallelContext& par, const ServeTp& tp) {
  const World& world = par.world;
  DMSRT_ASSIGN_OR_RETURN(RunContext rc, LoadRunContext(o.run));

  HostedCoordinator hosted;
  std::string address = o.coordinator;
  absl::Status start_status;
  if (address.empty() && world.rank() == 0) {
    absl::StatusOr<HostedCoordinator> h = StartCoordinator(o.service, *rc.model, *rc.tokenizer);
    if (h.ok()) {
      hosted = std::move(*h);
      address = hosted.dial_address;
    } else {
      start_status = h.status();
      address = "!" + std::string(h.status().message());
    }
  }
  // Every rank learns the address (or rank 0's failure) from rank 0.
  DMSRT_RETURN_IF_ERROR(par.world_comm->host()->BroadcastString(&address, 0));
  if (!address.empty() && address[0] == '!') {
    if (!start_status.ok()) return start_status;
    return absl::UnavailableError(absl::StrCat("rank 0 could not start the coordinator: ", address.substr(1)));
  }

  // This rank's shard (the whole model with --tp 1).
  Communicator* group = tp.tp > 1 ? par.tp_comm.get() : nullptr;
  rc.backend_options.comm = group;
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                         MakeBackend(rc.backend, *rc.model, rc.backend_options));
  if (!world.leader()) {
    std::cout << "replica " << world.replica() << " (" << world.ToString()
              << "): following the TP leader, world rank " << world.leader_rank() << std::endl;
    DMSRT_RETURN_IF_ERROR(RunTpFollower(*backend, group));  // returns when the leader shuts down
    std::cout << "replica " << world.replica() << " (" << world.ToString() << "): stopped"
              << std::endl;
    return absl::OkStatus();
  }
  if (group != nullptr) {
    DMSRT_ASSIGN_OR_RETURN(backend, MakeTpLeaderBackend(std::move(backend), group));
    const std::string span = TpSpanNote(world, par.tp_hosts);
    if (!span.empty()) std::cout << "replica " << world.replica() << ": " << span << std::endl;
  }

  EngineOptions eo;
  eo.prefill_chunk = rc.prefill_chunk;
  absl::Mutex fatal_mu;
  absl::Status fatal;  // why this replica's TP group cannot go on
  if (group != nullptr) {
    eo.idle_period = std::min(tp.timeout / 4, absl::Seconds(30));
    Backend* leader = backend.get();
    eo.on_idle = [leader] { return PingTpFollowers(*leader); };
    eo.on_failure = [leader, &fatal_mu, &fatal](const absl::Status& s) {
      absl::Status health = TpGroupHealth(*leader);
      if (health.ok() && !BreaksTpGroup(s)) return;  // the group is intact; the jobs failed
      absl::MutexLock lock(&fatal_mu);
      if (fatal.ok()) fatal = health.ok() ? s : health;
      g_stop = true;
    };
  }
  StepLogFile step_log(nullptr, &std::fclose);
  if (!o.step_log.empty()) {
    DMSRT_ASSIGN_OR_RETURN(step_log, OpenStepLog(o.step_log, "a"));
    std::FILE* f = step_log.get();
    // end_s: when the step ended, in seconds since this header; with `seconds` it places every
    // step on serve's timeline, so the time between steps (idle or not) can be read off too.
    const auto opened = std::chrono::steady_clock::now();
    eo.on_step = [f, opened](const StepShape& s, double seconds) {
      const double end_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - opened).count();
      WriteStepLogLine(f, s, seconds, end_s);
      std::fflush(f);  // whole lines on disk: a reader may take the steps so far mid-run
    };
  }
  Engine engine(*backend, *rc.tokenizer, *rc.model, eo);

  const KvCache& kv = backend->kv();  // for a TP leader: the group's figures (tp_replica.h)
  const KvGeometry& geo = kv.geometry();
  v1::ReplicaInfo info;
  info.set_replica(world.replica());
  info.set_tp(world.tp());
  info.set_model(rc.model->config.name);
  info.set_kv_blocks_total(kv.total_blocks());
  info.set_kv_block_bytes(kv.block_bytes());
  info.set_kv_block_tokens(geo.block_tokens);
  info.set_blocks_per_token_dense(static_cast<int64_t>(geo.n_layers) * geo.n_kv_heads);
  info.set_kv_policy(KvPolicyName(kv.policy().kind));
  info.set_kv_window(kv.policy().window);
  info.set_kv_force_rate(kv.policy().force_rate);
  info.set_kv_dead_slots(kv.dead_slots());
  if (kv.policy().kind == KvPolicyKind::kDms) {
    info.set_dms_expected_eviction_rate(rc.model->config.dms.expected_eviction_rate);
  }
  info.set_max_positions(rc.model->config.max_positions);
  DMSRT_ASSIGN_OR_RETURN(auto creds, ClientCreds(o.service));
  ReplicaAgent agent(engine, info, address, creds, o.service.auth_token);

  engine.Start();
  const double kv_mib = kv.total_blocks() * static_cast<double>(kv.block_bytes()) / 1048576.0;
  std::cout << "replica " << world.replica() << " (" << world.ToString() << "): "
            << kv.total_blocks() << " KV blocks of " << kv.block_bytes() << " bytes ("
            << absl::StrFormat("%.1f MiB", kv_mib)
            << (world.tp() > 1 ? absl::StrCat(" over ", world.tp(), " ranks") : "") << "), policy "
            << KvPolicyName(kv.policy().kind)
            << (info.dms_expected_eviction_rate() > 0
                    ? absl::StrFormat(" (calibrated eviction rate %.3f)",
                                      info.dms_expected_eviction_rate())
                    : "")
            << (rc.dms_adapter.empty() ? "" : absl::StrCat(", adapter ", rc.dms_adapter))
            << ", coordinator " << address << std::endl;
  agent.Run(&g_stop);
  engine.Stop();
  {
    absl::MutexLock lock(&fatal_mu);
    if (!fatal.ok()) return fatal;  // the caller stops the whole job at once
  }
  // Release the followers first: they end at once, while the coordinator may wait for its calls.
  if (group != nullptr) DMSRT_RETURN_IF_ERROR(ShutdownTpFollowers(*backend));
  hosted.Stop();
  std::cout << "replica " << world.replica() << " (" << world.ToString() << "): stopped"
            << std::endl;
  return absl::OkStatus();
}

absl::Status CoordinatorOnly(const CoordinatorCommandOptions& o) {
  std::string path = o.model;
  if (path.empty()) {
    DMSRT_ASSIGN_OR_RETURN(path, DefaultModelPath());
  }
  // The coordinator tokenizes prompts (exact length checks, budget mode), so it reads the model
  // file's tokenizer and configuration; the weights stay unused in the mapping.
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, LoadModel(path));
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::Create(model->tokenizer));
  DMSRT_ASSIGN_OR_RETURN(HostedCoordinator h, StartCoordinator(o.service, *model, *tok));
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  h.Stop();
  return absl::OkStatus();
}

}  // namespace

void SetupServe(CLI::App& app, ServeOptions& o) {
  app.add_option("--coordinator", o.coordinator,
                 "HOST:PORT of a coordinator to join instead of hosting one on rank 0")
      ->type_name("ADDRESS");
  app.add_option("--step-log", o.step_log,
                 "append one CSV line per engine step (decode rows, prefill tokens, KV tokens, "
                 "sampled rows, retries, seconds, and when it ended in seconds since the log "
                 "opened) to FILE, to compare with a profile (`dmsrt plan --check-steps`)")
      ->type_name("FILE");
  AddServiceOptions(app, &o.service);
  AddRunOptions(app, &o.run);
  AddTpOptions(app, &o.tp,
               "ranks per replica: mpirun -np replicas x N dmsrt serve --tp N (0: all ranks form one replica)");
  app.footer(
      "Under mpirun every group of --tp ranks is one replica; without --coordinator, rank 0 also "
      "hosts the coordinator on --listen.");
}

void SetupCoordinator(CLI::App& app, CoordinatorCommandOptions& o) {
  AddModelOption(app, &o.model)->description(
      "the model whose tokenizer and context length the coordinator checks prompts with (default: "
      "$DMSRT_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf)");
  AddServiceOptions(app, &o.service);
}

int RunServe(const ServeOptions& o, ProcessArgs& args) {
  absl::Status s = Serve(o, args);
  if (!s.ok()) {
    std::cerr << "dmsrt serve: " << s << std::endl;
    return 1;
  }
  return 0;
}

int RunCoordinator(const CoordinatorCommandOptions& o, ProcessArgs&) {
  absl::Status s = CoordinatorOnly(o);
  if (!s.ok()) {
    std::cerr << "dmsrt coordinator: " << s << std::endl;
    return 1;
  }
  return 0;
}

}  // namespace dmsrt
