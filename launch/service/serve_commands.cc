// `dmsrt serve` and `dmsrt coordinator`.
//
// serve: every MPI rank (tp = 1: each rank is its own replica) loads the model, builds a CPU
// backend and an Engine, and runs a ReplicaAgent that dials the coordinator. Without
// --coordinator, rank 0 first starts the coordinator on --listen; the address the replicas dial is
// broadcast from rank 0 over MPI, so only rank 0 needs to know it. SIGINT/SIGTERM end the server.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>

#include <atomic>
#include <csignal>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "launch/args.h"
#include "launch/run_options.h"
#include "launch/service/coordinator.h"
#include "launch/service/metrics_http.h"
#include "launch/service/replica_agent.h"
#include "launch/service_commands.h"
#include "parallel/comm_factory.h"
#include "parallel/status_macros.h"
#include "runtime/engine.h"

namespace dmsrt {

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Server credentials from --tls-cert/--tls-key (both or neither).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCreds(const Args& args) {
  const std::string cert = args.Get("tls-cert"), key = args.Get("tls-key");
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions opts;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  DMSRT_ASSIGN_OR_RETURN(pair.cert_chain, ReadFile(cert));
  DMSRT_ASSIGN_OR_RETURN(pair.private_key, ReadFile(key));
  opts.pem_key_cert_pairs.push_back(pair);
  return grpc::SslServerCredentials(opts);
}

// Channel credentials for a replica dialling the coordinator: TLS with --tls-ca (or the server's
// own --tls-cert as the root) when TLS is on.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCreds(const Args& args) {
  std::string ca = args.Get("tls-ca", args.Get("tls-cert"));
  if (ca.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  DMSRT_ASSIGN_OR_RETURN(o.pem_root_certs, ReadFile(ca));
  return grpc::SslCredentials(o);
}

CoordinatorOptions CoordOptions(const Args& args, absl::Status* st) {
  CoordinatorOptions o;
  o.auth_token = args.Get("auth-token");
  auto max_n = args.GetInt("max-n", o.max_n);
  auto def_tok = args.GetInt("default-max-tokens", o.default_max_tokens);
  if (!max_n.ok()) *st = max_n.status();
  if (!def_tok.ok()) *st = def_tok.status();
  if (max_n.ok()) o.max_n = static_cast<int32_t>(*max_n);
  if (def_tok.ok()) o.default_max_tokens = static_cast<int32_t>(*def_tok);
  return o;
}

struct HostedCoordinator {
  std::unique_ptr<Coordinator> coordinator;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<MetricsHttpServer> metrics;
  std::string dial_address;  // what replicas on this host dial
};

absl::StatusOr<HostedCoordinator> StartCoordinator(const Args& args, const Model& model,
                                                   const Tokenizer& tok) {
  HostedCoordinator h;
  absl::Status st;
  CoordinatorOptions opts = CoordOptions(args, &st);
  DMSRT_RETURN_IF_ERROR(st);
  h.coordinator = std::make_unique<Coordinator>(model, tok, opts);
  const std::string listen = args.Get("listen", "127.0.0.1:50051");
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--listen ", listen, " is not HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  DMSRT_ASSIGN_OR_RETURN(auto creds, ServerCreds(args));
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
  if (args.Has("metrics-port")) {
    DMSRT_ASSIGN_OR_RETURN(int64_t mp, args.GetInt("metrics-port", 0));
    Coordinator* c = h.coordinator.get();
    h.metrics = std::make_unique<MetricsHttpServer>([c] { return c->MetricsText(); });
    DMSRT_RETURN_IF_ERROR(h.metrics->Start(dial_host, static_cast<int>(mp)));
    std::cout << "metrics on http://" << dial_host << ":" << h.metrics->port() << "/metrics"
              << std::endl;
  }
  std::cout << "coordinator listening on " << h.dial_address << std::endl;
  return h;
}

void StopHosted(HostedCoordinator& h) {
  if (h.metrics) h.metrics->Stop();
  if (h.coordinator) h.coordinator->Shutdown();
  if (h.server) h.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

std::set<std::string> ServiceValueOptions() {
  std::set<std::string> o = {"listen", "coordinator", "tp", "metrics-port", "auth-token",
                             "tls-cert", "tls-key", "tls-ca", "max-n", "default-max-tokens"};
  return o;
}

absl::Status ServeRank(const Args& args, ParallelContext& par);

absl::Status Serve(int argc, char** argv) {
  std::set<std::string> vopts = ServiceValueOptions();
  for (const std::string& o : RunValueOptions()) vopts.insert(o);
  DMSRT_ASSIGN_OR_RETURN(Args args, Args::Parse(argc, argv, vopts, {}));
  DMSRT_ASSIGN_OR_RETURN(int64_t tp, args.GetInt("tp", 1));
  if (tp != 1) {
    return absl::InvalidArgumentError(
        "serve runs one replica per MPI rank (--tp 1); tensor-parallel replicas are not served yet");
  }
  ParallelOptions popts;
  popts.tp = 1;
  popts.timeout = absl::Seconds(600);
  DMSRT_ASSIGN_OR_RETURN(ParallelContext par, InitParallel(&argc, &argv, popts));
  absl::Status s = ServeRank(args, par);
  // A rank that fails must not leave the others waiting in a collective: stop the whole job.
  if (!s.ok() && par.world.world_size() > 1) {
    std::cerr << "dmsrt serve: rank " << par.world.rank() << ": " << s << std::endl;
    par.Fail(s);
  }
  return s;
}

absl::Status ServeRank(const Args& args, ParallelContext& par) {
  const World& world = par.world;
  DMSRT_ASSIGN_OR_RETURN(RunContext rc, LoadRunContext(args));
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeCpuBackend(*rc.model, rc.backend_options));
  EngineOptions eo;
  eo.prefill_chunk = rc.prefill_chunk;
  Engine engine(*backend, *rc.tokenizer, *rc.model, eo);

  HostedCoordinator hosted;
  std::string address = args.Get("coordinator");
  absl::Status start_status;
  if (address.empty() && world.rank() == 0) {
    absl::StatusOr<HostedCoordinator> h = StartCoordinator(args, *rc.model, *rc.tokenizer);
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

  const KvCache& kv = backend->kv();
  v1::ReplicaInfo info;
  info.set_replica(world.replica());
  info.set_tp(1);
  info.set_model(rc.model->config.name);
  info.set_kv_blocks_total(kv.total_blocks());
  info.set_kv_block_bytes(kv.block_bytes());
  info.set_kv_block_tokens(kv.geometry().block_tokens);
  info.set_blocks_per_token_dense(static_cast<int64_t>(kv.geometry().n_layers) * kv.geometry().n_kv_heads);
  info.set_kv_policy(KvPolicyName(kv.policy().kind));
  info.set_kv_window(kv.policy().kind == KvPolicyKind::kWindow ? kv.policy().window : kv.policy().window);
  info.set_kv_force_rate(kv.policy().force_rate);
  info.set_max_positions(rc.model->config.max_positions);
  DMSRT_ASSIGN_OR_RETURN(auto creds, ClientCreds(args));
  ReplicaAgent agent(engine, info, address, creds, args.Get("auth-token"));

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  engine.Start();
  std::cout << "replica " << world.replica() << " (" << world.ToString() << "): "
            << kv.total_blocks() << " KV blocks of " << kv.block_bytes() << " bytes, policy "
            << KvPolicyName(kv.policy().kind) << ", coordinator " << address << std::endl;
  agent.Run(&g_stop);
  engine.Stop();
  StopHosted(hosted);
  return absl::OkStatus();
}

absl::Status CoordinatorOnly(int argc, char** argv) {
  std::set<std::string> vopts = ServiceValueOptions();
  vopts.insert("model");
  DMSRT_ASSIGN_OR_RETURN(Args args, Args::Parse(argc, argv, vopts, {}));
  std::string path = args.Get("model");
  if (path.empty()) {
    DMSRT_ASSIGN_OR_RETURN(path, DefaultModelPath());
  }
  // The coordinator tokenizes prompts (exact length checks, budget mode), so it reads the model
  // file's tokenizer and configuration; the weights stay unused in the mapping.
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, LoadModel(path));
  DMSRT_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::Create(model->tokenizer));
  DMSRT_ASSIGN_OR_RETURN(HostedCoordinator h, StartCoordinator(args, *model, *tok));
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  StopHosted(h);
  return absl::OkStatus();
}

}  // namespace

int RunServe(int argc, char** argv) {
  absl::Status s = Serve(argc, argv);
  if (!s.ok()) {
    std::cerr << "dmsrt serve: " << s << std::endl;
    return 1;
  }
  return 0;
}

int RunCoordinator(int argc, char** argv) {
  absl::Status s = CoordinatorOnly(argc, argv);
  if (!s.ok()) {
    std::cerr << "dmsrt coordinator: " << s << std::endl;
    return 1;
  }
  return 0;
}

}  // namespace dmsrt
