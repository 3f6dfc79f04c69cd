// A tiny HTTP/1.0 server for the Prometheus text endpoint (`GET /metrics`).
//
// One accept thread, one request per connection, the body produced by a callback. Deliberately
// minimal: Prometheus scrapes with plain GETs, and a full HTTP stack would be a dependency for one
// page.
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace dmsrt {

class MetricsHttpServer {
 public:
  explicit MetricsHttpServer(std::function<std::string()> body) : body_(std::move(body)) {}
  ~MetricsHttpServer() { Stop(); }
  // Binds host:port (port 0 picks a free one; see port()).
  absl::Status Start(const std::string& host, int port);
  void Stop();
  int port() const { return port_; }

 private:
  void Loop();
  std::function<std::string()> body_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace dmsrt
