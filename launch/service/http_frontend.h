// The coordinator's HTTP server (cpp-httplib): the OpenAI-compatible API
//   POST /v1/chat/completions, POST /v1/completions (server-sent events with "stream": true),
//   GET /v1/models
// and/or the Prometheus page GET /metrics. serve and coordinator run one for the API
// (--http-listen, same --auth-token and --tls-cert/--tls-key as the gRPC port) and one for
// /metrics on its own port (--metrics-port, plain HTTP without authentication, as before).
//
// Requests are parsed by ParseOpenAiRequest and submitted through JobBroker, the same path as
// gRPC's RunJob: same validation, admission and event log. A client that closes its connection
// cancels its job, freeing its KV blocks:
//   - a streamed response (200 and server-sent events from the start) writes an SSE comment every
//     kKeepAliveSeconds while it waits for tokens, and the first failed write cancels the job; a
//     failure after the start arrives as an error event;
//   - a non-streamed response sends nothing until the job ends, so its status is the job's own
//     (200, or an error object with 4xx/5xx: OpenAiResponder::Final); meanwhile the connection is
//     watched for the client hanging up (PeerWatch, about every 200 ms).
//
// Threading: one listener thread plus a pool of `threads` workers; a streaming response holds its
// worker until the job ends, so the pool is sized for many long-lived streams.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "launch/service/job_stream.h"

namespace httplib {
class Server;
}

namespace dmsrt {

struct HttpFrontendOptions {
  std::string host = "127.0.0.1";
  int port = 0;                     // 0: any free port (see HttpFrontend::port)
  std::string tls_cert, tls_key;    // PEM files; both or neither
  int threads = 256;                // workers: concurrent requests and streams
  size_t max_body_bytes = 4 << 20;  // larger bodies get a 413 error object
  int32_t max_n = 64;
  bool openai = true;               // serve /v1/*
  bool metrics = false;             // serve /metrics
};

class HttpFrontend {
 public:
  static constexpr double kKeepAliveSeconds = 0.5;
  static constexpr int kListenBacklog = 1024;

  // `broker` must outlive the server.
  HttpFrontend(JobBroker& broker, HttpFrontendOptions options);
  ~HttpFrontend();
  // Binds and starts serving; an error names the address or the TLS file.
  absl::Status Start();
  // Stops accepting and waits for the workers (call JobBroker's shutdown first so streams end).
  void Stop();
  int port() const { return port_; }

 private:
  void Routes();
  JobBroker& broker_;
  HttpFrontendOptions options_;
  std::unique_ptr<httplib::Server> server_;
  std::thread listener_;
  int port_ = 0;
  int listen_fd_ = -1;  // the listening socket, to deepen its backlog
};

}  // namespace dmsrt
