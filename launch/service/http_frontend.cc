// HTTP server of the coordinator (see http_frontend.h).
#include "launch/service/http_frontend.h"

#include <httplib.h>

#include <sys/socket.h>

#include <chrono>
#include <ctime>
#include <regex>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "launch/service/openai_request.h"
#include "launch/service/openai_response.h"
#include "launch/service/peer_watch.h"

namespace dmsrt {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// Not "application/json" exactly: cpp-httplib gzips that type when the client accepts it, and a
// compressed body would hold back the keep-alive bytes that detect a closed connection.
constexpr char kJsonType[] = "application/json; charset=utf-8";

void SendError(httplib::Response& res, const OpenAiError& e) {
  res.status = e.status;
  res.set_content(OpenAiErrorJson(e), kJsonType);
}

// The coordinator's refusal as an OpenAI error: bad input is 400, a missing token 401, no replica
// 503 (retry later); a job that ended early without a result: 499 cancelled, 504 deadline.
OpenAiError FromStatus(const grpc::Status& s) {
  OpenAiError e;
  e.message = s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
      e.status = 400;
      if (e.message.find("model context") != std::string::npos) e.code = "context_length_exceeded";
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.status = 400;
      e.code = "kv_capacity_exceeded";
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      e.status = 401;
      e.type = "authentication_error";
      e.code = "invalid_api_key";
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.status = 404;
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.status = 503;
      e.type = "server_error";
      break;
    case grpc::StatusCode::CANCELLED:
      e.status = 499;
      e.code = "cancelled";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.status = 504;
      e.type = "server_error";
      e.code = "deadline_exceeded";
      break;
    default:
      e.status = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

std::string TraceParent(const httplib::Request& req) {
  static const std::regex kForm("^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$");
  std::string v = req.get_header_value("traceparent");
  return std::regex_match(v, kForm) ? v : "";
}

// Feeds a streamed job's events to the HTTP response. While no event comes it writes an SSE
// comment at most every kKeepAliveSeconds; a failed write means the client is gone.
class StreamSink final : public JobEventSink {
 public:
  StreamSink(httplib::DataSink& sink, OpenAiResponder& responder)
      : sink_(sink), responder_(responder), last_write_(Clock::now()) {}
  bool Write(const v1::JobEvent& e) override {
    const std::string s = responder_.StreamEvent(e);
    if (s.empty()) return true;
    last_write_ = Clock::now();
    return sink_.write(s.data(), s.size());
  }
  bool Gone() override {
    const auto now = Clock::now();
    if (std::chrono::duration<double>(now - last_write_).count() < HttpFrontend::kKeepAliveSeconds) {
      return false;
    }
    last_write_ = now;
    static constexpr char kSse[] = ": keep-alive\n\n";
    return !sink_.write(kSse, sizeof(kSse) - 1);
  }

 private:
  httplib::DataSink& sink_;
  OpenAiResponder& responder_;
  Clock::time_point last_write_;
};

// Records a non-streamed job's events; the client is gone when its connection closes.
class RecordSink final : public JobEventSink {
 public:
  RecordSink(OpenAiResponder& responder, const PeerWatch& peer) : responder_(responder), peer_(peer) {}
  bool Write(const v1::JobEvent& e) override {
    responder_.Record(e);
    return true;
  }
  bool Gone() override { return peer_.Closed(); }

 private:
  OpenAiResponder& responder_;
  const PeerWatch& peer_;
};

// A sink for a response that never started (headers could not be sent): the job is cancelled.
class GoneSink final : public JobEventSink {
 public:
  bool Write(const v1::JobEvent&) override { return false; }
  bool Gone() override { return true; }
};

struct Completion {
  OpenAiEndpoint endpoint;
  OpenAiRequest request;
  std::string job_id;
  bool followed = false;
};

OpenAiResponder MakeResponder(JobBroker& b, const Completion& c) {
  return OpenAiResponder(c.endpoint, c.request, c.request.model.empty() ? b.ModelName() : c.request.model,
                         static_cast<int64_t>(std::time(nullptr)),
                         [&b](int32_t id) { return b.TokenText(id); });
}

// Non-streamed: nothing is sent until the job ends, so the reply carries the job's own status
// (OpenAiResponder::Final). Meanwhile the connection is watched, and a client that hangs up
// cancels the job.
void RespondWhole(JobBroker& b, const Completion& c, const httplib::Request& req,
                  httplib::Response& res) {
  OpenAiResponder responder = MakeResponder(b, c);
  const PeerWatch peer(req);
  RecordSink sink(responder, peer);
  const grpc::Status s = b.Follow(c.job_id, sink, /*cancel_on_disconnect=*/true);
  if (!responder.finished() && !s.ok()) return SendError(res, FromStatus(s));
  const OpenAiReply reply = responder.Final();
  res.status = reply.status;
  res.set_content(reply.body, kJsonType);
}

// Streamed: server-sent events from the first token on (the status is 200 from the start; a late
// failure arrives as an error event).
void RespondStream(JobBroker& broker, std::shared_ptr<Completion> c, httplib::Response& res) {
  JobBroker* b = &broker;
  auto provider = [b, c](size_t, httplib::DataSink& sink) {
    c->followed = true;
    OpenAiResponder responder = MakeResponder(*b, *c);
    StreamSink events(sink, responder);
    b->Follow(c->job_id, events, /*cancel_on_disconnect=*/true);
    sink.done();
    return true;
  };
  auto release = [b, c](bool) {
    if (c->followed) return;
    GoneSink gone;
    b->Follow(c->job_id, gone, /*cancel_on_disconnect=*/true);
  };
  res.set_chunked_content_provider("text/event-stream", provider, release);
}

void HandleCompletion(JobBroker& broker, const HttpFrontendOptions& options, OpenAiEndpoint endpoint,
                      const httplib::Request& req, httplib::Response& res) {
  auto c = std::make_shared<Completion>();
  c->endpoint = endpoint;
  OpenAiError err;
  OpenAiLimits limits;
  limits.max_n = options.max_n;
  if (!ParseOpenAiRequest(endpoint, req.body, limits, &c->request, &err)) return SendError(res, err);
  int32_t n = 0;
  grpc::Status s = broker.CreateJob(c->request.job, TraceParent(req), &c->job_id, &n);
  if (!s.ok()) return SendError(res, FromStatus(s));
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Dmsrt-Job-Id", c->job_id);
  if (c->request.stream) return RespondStream(broker, c, res);
  RespondWhole(broker, *c, req, res);
}

}  // namespace

HttpFrontend::HttpFrontend(JobBroker& broker, HttpFrontendOptions options)
    : broker_(broker), options_(std::move(options)) {}

HttpFrontend::~HttpFrontend() { Stop(); }

void HttpFrontend::Routes() {
  httplib::Server& s = *server_;
  JobBroker* b = &broker_;
  const HttpFrontendOptions* o = &options_;
  if (options_.openai) {
    s.set_pre_routing_handler([b](const httplib::Request& req, httplib::Response& res) {
      if (req.path.rfind("/v1/", 0) != 0) return httplib::Server::HandlerResponse::Unhandled;
      const bool has = req.has_header("Authorization");
      const std::string v = req.get_header_value("Authorization");
      grpc::Status a = b->CheckBearer(has ? &v : nullptr);
      if (a.ok()) return httplib::Server::HandlerResponse::Unhandled;
      OpenAiError e = FromStatus(a);
      e.message = has ? "the bearer token does not match" : "missing 'Authorization: Bearer <token>' header (the server runs with --auth-token)";
      SendError(res, e);
      return httplib::Server::HandlerResponse::Handled;
    });
    s.Post("/v1/chat/completions", [b, o](const httplib::Request& req, httplib::Response& res) {
      HandleCompletion(*b, *o, OpenAiEndpoint::kChatCompletions, req, res);
    });
    s.Post("/v1/completions", [b, o](const httplib::Request& req, httplib::Response& res) {
      HandleCompletion(*b, *o, OpenAiEndpoint::kCompletions, req, res);
    });
    auto model = [b] {
      return json{{"id", b->ModelName()}, {"object", "model"}, {"created", 0}, {"owned_by", "dmsrt"}};
    };
    s.Get("/v1/models", [model](const httplib::Request&, httplib::Response& res) {
      res.set_content(json{{"object", "list"}, {"data", json::array({model()})}}.dump(), kJsonType);
    });
    s.Get(R"(/v1/models/(.+))", [model, b](const httplib::Request& req, httplib::Response& res) {
      if (req.matches[1] != b->ModelName()) {
        OpenAiError e;
        e.status = 404;
        e.param = "model";
        e.code = "model_not_found";
        e.message = absl::StrCat("no model '", std::string(req.matches[1]), "': this server serves '",
                                 b->ModelName(), "'");
        return SendError(res, e);
      }
      res.set_content(model().dump(), kJsonType);
    });
  }
  if (options_.metrics) {
    s.Get("/metrics", [b](const httplib::Request&, httplib::Response& res) {
      res.set_content(b->MetricsText(), "text/plain; version=0.0.4");
    });
  }
  // cpp-httplib's own refusals (unknown route, body too large, malformed request) as error objects.
  s.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req,
                                                               httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    OpenAiError e;
    e.status = res.status;
    if (res.status == 404) {
      e.message = absl::StrCat("no route ", req.method, " ", req.path,
                               ": see /v1/chat/completions, /v1/completions, /v1/models");
    } else if (res.status == 413) {
      e.message = "the request body is too large: shorten the prompt";
    } else {
      e.message = absl::StrCat("HTTP ", res.status);
      if (res.status >= 500) e.type = "server_error";
    }
    SendError(res, e);
    return httplib::Server::HandlerResponse::Handled;
  }));
}

absl::Status HttpFrontend::Start() {
  if (options_.tls_cert.empty() != options_.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (options_.tls_cert.empty()) {
    server_ = std::make_unique<httplib::Server>();
  } else {
    server_ = std::make_unique<httplib::SSLServer>(options_.tls_cert.c_str(), options_.tls_key.c_str());
  }
  if (!server_->is_valid()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot start HTTPS with --tls-cert ", options_.tls_cert,
                                                   " and --tls-key ", options_.tls_key,
                                                   ": check that both are readable PEM files"));
  }
  const int threads = std::max(1, options_.threads);
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server_->set_payload_max_length(options_.max_body_bytes);
  // cpp-httplib listens with a backlog of 5 (a compile-time constant of the packaged library):
  // a burst of clients connecting at once would find the accept queue full and be reset. Keep
  // the listening socket and listen again on it with a deep backlog once bound.
  server_->set_socket_options([this](int sock) {
    httplib::default_socket_options(sock);
    listen_fd_ = sock;
  });
  server_->set_read_timeout(30, 0);
  server_->set_write_timeout(30, 0);
  Routes();
  if (options_.port == 0) {
    port_ = server_->bind_to_any_port(options_.host);
  } else if (server_->bind_to_port(options_.host, options_.port)) {
    port_ = options_.port;
  }
  if (port_ > 0 && listen_fd_ >= 0) ::listen(listen_fd_, kListenBacklog);
  if (port_ <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", options_.host, ":",
                                               options_.port, " (address in use, or not an address of this host)"));
  }
  listener_ = std::thread([this] { server_->listen_after_bind(); });
  return absl::OkStatus();
}

void HttpFrontend::Stop() {
  if (server_) server_->stop();
  if (listener_.joinable()) listener_.join();
}

}  // namespace dmsrt
