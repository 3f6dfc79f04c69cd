// Finding a request's connection and watching it (see peer_watch.h).
#include "launch/service/peer_watch.h"

#include <httplib.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdlib>
#include <string>

namespace dmsrt {

namespace {

// The numeric address and port of one end of `fd`, formatted as cpp-httplib formats the ones it
// puts in Request (getnameinfo with NI_NUMERICHOST). False for a socket that is not TCP/IP or
// not connected.
bool Endpoint(int fd, bool peer, std::string* host, int* port) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  sockaddr* a = reinterpret_cast<sockaddr*>(&addr);
  if ((peer ? ::getpeername(fd, a, &len) : ::getsockname(fd, a, &len)) != 0) return false;
  if (addr.ss_family == AF_INET) {
    *port = ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    *port = ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  } else {
    return false;
  }
  char buf[NI_MAXHOST];
  if (::getnameinfo(a, len, buf, sizeof(buf), nullptr, 0, NI_NUMERICHOST) != 0) return false;
  *host = buf;
  return true;
}

bool Matches(int fd, const httplib::Request& req) {
  std::string host;
  int port = -1;
  // The port first: it rules out almost every other descriptor with no name lookup.
  if (!Endpoint(fd, /*peer=*/false, &host, &port) || port != req.local_port || host != req.local_addr) {
    return false;
  }
  return Endpoint(fd, /*peer=*/true, &host, &port) && port == req.remote_port &&
         host == req.remote_addr;
}

int FindSocket(const httplib::Request& req) {
#ifdef CPPHTTPLIB_OPENSSL_SUPPORT
  if (req.ssl != nullptr) return SSL_get_fd(req.ssl);
#endif
  if (req.local_port <= 0 || req.remote_port <= 0) return -1;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  const int own = ::dirfd(dir);
  int found = -1;
  while (dirent* e = ::readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == own) continue;
    if (Matches(static_cast<int>(fd), req)) {
      found = static_cast<int>(fd);
      break;
    }
  }
  ::closedir(dir);
  return found;
}

}  // namespace

PeerWatch::PeerWatch(const httplib::Request& req) : fd_(FindSocket(req)) {}

bool PeerWatch::Closed() const {
  if (fd_ < 0) return false;
  pollfd p{};
  p.fd = fd_;
  p.events = POLLIN | POLLRDHUP;
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    const ssize_t n = ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  }
  return false;
}

}  // namespace dmsrt
