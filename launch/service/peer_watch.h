// Noticing that an HTTP client hung up while its request waits, without writing to it.
//
// A non-streamed completion sends nothing until its job ends, so that the reply can carry the
// job's own status; the job must still be cancelled (its KV blocks freed) when the client goes
// away first. cpp-httplib 0.11 (Debian 12's) gives a handler no handle on its connection and has
// no Request::is_connection_closed, but it does record both ends' addresses in the Request. The
// connection's socket is the one whose local and peer addresses are those (a TCP connection's
// address pair is unique while it is open, and the socket stays open while the handler runs), or
// for TLS the socket under Request::ssl. Closed() then asks the kernel whether the peer closed its
// side, without reading anything.
//
// Threading: one per request, on the thread that serves it.
#pragma once

namespace httplib {
struct Request;
}

namespace dmsrt {

class PeerWatch {
 public:
  // Finds `req`'s connection. found() is false when it cannot (then Closed() is always false).
  explicit PeerWatch(const httplib::Request& req);
  bool found() const { return fd_ >= 0; }
  // True once the client closed or reset the connection. Data the client sent meanwhile (a
  // pipelined request) is left unread and does not count.
  bool Closed() const;

 private:
  int fd_ = -1;
};

}  // namespace dmsrt
