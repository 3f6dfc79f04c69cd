// LocalComm (the single-rank communicator) and the parts of Communicator shared by every
// implementation: argument checks and the length-prefixed broadcast helpers.
#include <cstdio>
#include <cstring>

#include "absl/strings/str_format.h"
#include "parallel/comm.h"
#include "parallel/world.h"

namespace dmsrt {

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
  }
  return "?";
}

absl::Status Communicator::CheckCount(int64_t count, const char* what) const {
  if (count < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s on %s: negative count %d", what, Describe(), count));
  }
  return absl::OkStatus();
}

absl::Status Communicator::CheckRoot(int root, const char* what) const {
  if (root < 0 || root >= size()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s on %s: root %d out of range [0, %d)",
                                                      what, Describe(), root, size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Communicator::BroadcastLength(int64_t length, int root) {
  if (device_buffers()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s holds device buffers; broadcast host data through host()", Describe()));
  }
  absl::Status s = CheckRoot(root, "Broadcast");
  if (!s.ok()) return s;
  int64_t n = length;
  s = Broadcast(&n, sizeof(n), root);
  if (!s.ok()) return s;
  if (n < 0) return absl::InternalError(absl::StrFormat("Broadcast: received length %d", n));
  return n;
}

absl::StatusOr<int64_t> Communicator::AgreeMin(int64_t value) {
  if (device_buffers()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s holds device buffers; agree on host values through host()", Describe()));
  }
  int64_t v = value;
  absl::Status s = AllReduce(&v, &v, 1, ReduceOp::kMin);
  if (!s.ok()) return s;
  return v;
}

absl::Status Communicator::BroadcastString(std::string* s, int root) {
  absl::StatusOr<int64_t> n = BroadcastLength(static_cast<int64_t>(s->size()), root);
  if (!n.ok()) return n.status();
  if (rank() != root) s->resize(static_cast<size_t>(*n));
  if (*n == 0) return absl::OkStatus();
  return Broadcast(s->data(), *n, root);
}

// ---- LocalComm ------------------------------------------------------------------------------

absl::Status LocalComm::AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) {
  absl::Status s = CheckCount(count, "AllReduce");
  if (!s.ok()) return s;
  if (send != recv && count > 0) std::memmove(recv, send, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status LocalComm::AllReduce(const int64_t* send, int64_t* recv, int64_t count, ReduceOp op) {
  absl::Status s = CheckCount(count, "AllReduce");
  if (!s.ok()) return s;
  if (send != recv && count > 0) std::memmove(recv, send, count * sizeof(int64_t));
  return absl::OkStatus();
}

absl::Status LocalComm::AllGatherBytes(const void* send, int64_t bytes, void* recv) {
  absl::Status s = CheckCount(bytes, "AllGather");
  if (!s.ok()) return s;
  if (send != recv && bytes > 0) std::memmove(recv, send, bytes);
  return absl::OkStatus();
}

absl::Status LocalComm::Broadcast(void* buf, int64_t bytes, int root) {
  absl::Status s = CheckCount(bytes, "Broadcast");
  if (!s.ok()) return s;
  return CheckRoot(root, "Broadcast");
}

absl::StatusOr<std::unique_ptr<Communicator>> LocalComm::Split(int color, int key) {
  if (color < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("Split: color must be >= 0, got %d", color));
  }
  auto c = std::make_unique<LocalComm>();
  c->set_timeout(timeout());
  return std::unique_ptr<Communicator>(std::move(c));
}

absl::Status LocalComm::Abort(const std::string& reason) {
  std::fprintf(stderr, "dmsrt: rank 0 failed: %s\n", reason.c_str());
  std::fflush(stderr);
  return absl::AbortedError(reason);
}

// ---- TP group -------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Communicator>> MakeTpComm(Communicator& world_comm,
                                                         const World& world) {
  if (world_comm.size() != world.world_size() || world_comm.rank() != world.rank()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeTpComm: communicator %s (rank %d) does not match %s", world_comm.Describe(),
        world_comm.rank(), world.ToString()));
  }
  absl::StatusOr<std::unique_ptr<Communicator>> tp =
      world_comm.Split(world.replica(), world.tp_rank());
  if (!tp.ok()) return tp.status();
  if ((*tp)->size() != world.tp() || (*tp)->rank() != world.tp_rank()) {
    return absl::InternalError(absl::StrFormat(
        "MakeTpComm: split gave %s with rank %d, expected %d ranks with this one at %d",
        (*tp)->Describe(), (*tp)->rank(), world.tp(), world.tp_rank()));
  }
  return tp;
}

}  // namespace dmsrt
