// The NCCL entry points the project calls, on the emulated device (see emulator.h): every
// process of an mpirun job is one emulated GPU, and a collective over device buffers becomes an
// MPI collective over the host memory that backs them, so every multi-rank CUDA path runs
// without a GPU.
//
// How a collective runs. ncclAllReduce and friends are asynchronous on a GPU: they are queued on
// a stream and complete on the device, while the host goes on. Here a collective is a stream item
// that posts the non-blocking MPI collective when it reaches the front of its stream (the work
// before it has run, so its inputs are final) and is done when MPI says so. The call runs the
// stream as far as it can without waiting (cudaStreamQuery's rule), so a collective on an idle
// stream is posted at once; one behind a collective still in flight is posted when that one
// completes, as on a device, where a stuck NCCL kernel holds up its stream. cudaStreamQuery
// reports the stream busy until the collective is done (the way NcclComm's watchdog polls),
// cudaStreamSynchronize blocks on it as a synchronisation blocks on a stuck NCCL kernel, and
// ncclCommAbort releases those waits. The host never blocks inside a collective call.
//
// Communicators. The process that created the unique id (ncclGetUniqueId) must be a member; it
// collects every member's world rank (point-to-point on MPI_COMM_WORLD, with a tag from the id)
// and the members make an MPI communicator of exactly themselves (MPI_Comm_create_group, a
// collective over the members only). ncclCommSplit is MPI_Comm_split. A communicator belongs to
// the device current at its creation; its streams and buffers must be of that device.
//
// Checked as NCCL checks: buffers must be device memory of the communicator's device
// (ncclInvalidArgument otherwise: a host pointer fails here as it does on a GPU), counts and
// roots in range, the stream of the communicator's device.
//
// Fault injection (for the tests of a failing rank): DMSRT_CUDA_EMULATOR_NCCL_FAIL=R:N[:hang]
// makes the N-th collective (from 1) of world rank R fail: with an asynchronous error
// (ncclSystemError from ncclCommGetAsyncError, as a broken link reports), or with ":hang", a
// collective that never completes (a stuck peer) until the communicator is aborted.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/cuda_emulator/emulator.h"

namespace emu = dmsrt::cuda_emulator;

namespace {

constexpr char kMagic[] = "dmsrt-emulated-nccl";

struct IdFields {
  char magic[sizeof(kMagic)];
  int32_t creator_world_rank;
  int32_t serial;
};
static_assert(sizeof(IdFields) <= NCCL_UNIQUE_ID_BYTES, "the id fields fit a unique id");

// What a communicator handle points to; shared with the completions queued on streams, which may
// outlive the handle (ncclCommDestroy with work in flight).
struct CommState {
  MPI_Comm mpi = MPI_COMM_NULL;  // MPI_COMM_NULL for a communicator of one rank
  int size = 1;
  int rank = 0;
  int device = 0;
  std::atomic<bool> aborted{false};
  std::atomic<int> async_error{ncclSuccess};
  std::string last_error;
  ~CommState() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (mpi != MPI_COMM_NULL && !aborted.load() && !finalized) MPI_Comm_free(&mpi);
  }
};

// DMSRT_CUDA_EMULATOR_NCCL_FAIL for this process: the collective number to fail (0: none).
struct Injection {
  int64_t at = 0;
  bool hang = false;
};

const Injection& Injected() {
  static const Injection inj = [] {
    Injection i;
    const char* v = std::getenv("DMSRT_CUDA_EMULATOR_NCCL_FAIL");
    if (v == nullptr) return i;
    int rank = -1;
    long long at = 0;
    char mode[16] = {0};
    const int n = std::sscanf(v, "%d:%lld:%15s", &rank, &at, mode);
    if (n < 2 || rank != emu::WorldRankFromEnv() || at <= 0) return i;
    i.at = at;
    i.hang = n == 3 && std::strcmp(mode, "hang") == 0;
    return i;
  }();
  return inj;
}

std::atomic<int64_t> collectives{0};

}  // namespace

struct ncclComm {
  std::shared_ptr<CommState> st;
};

namespace {

ncclResult_t Fail(ncclComm* c, ncclResult_t r, const std::string& what) {
  std::fprintf(stderr, "emulated NCCL: %s\n", what.c_str());
  if (c != nullptr) c->st->last_error = what;
  return r;
}

MPI_Datatype ToMpi(ncclDataType_t t, size_t* bytes) {
  switch (t) {
    case ncclInt8: *bytes = 1; return MPI_INT8_T;
    case ncclUint8: *bytes = 1; return MPI_UINT8_T;
    case ncclInt32: *bytes = 4; return MPI_INT32_T;
    case ncclUint32: *bytes = 4; return MPI_UINT32_T;
    case ncclInt64: *bytes = 8; return MPI_INT64_T;
    case ncclUint64: *bytes = 8; return MPI_UINT64_T;
    case ncclFloat32: *bytes = 4; return MPI_FLOAT;
    case ncclFloat64: *bytes = 8; return MPI_DOUBLE;
    default: *bytes = 0; return MPI_DATATYPE_NULL;  // 16-bit floats: no MPI reduction
  }
}

MPI_Op ToMpi(ncclRedOp_t op) {
  switch (op) {
    case ncclSum: return MPI_SUM;
    case ncclProd: return MPI_PROD;
    case ncclMax: return MPI_MAX;
    case ncclMin: return MPI_MIN;
    default: return MPI_OP_NULL;
  }
}

// The checks every collective makes before it posts anything.
ncclResult_t Prologue(ncclComm* c, cudaStream_t stream, const char* what) {
  if (c == nullptr) return Fail(c, ncclInvalidArgument, std::string(what) + ": null communicator");
  if (c->st->aborted) return Fail(c, ncclInvalidUsage, std::string(what) + ": communicator aborted");
  if (emu::StickyError() != cudaSuccess) {
    return Fail(c, ncclUnhandledCudaError,
                std::string(what) + ": the device has faulted (" +
                    cudaGetErrorName(emu::StickyError()) + ")");
  }
  if (!emu::KnownStream(stream) || emu::StreamDevice(stream) != c->st->device) {
    return Fail(c, ncclUnhandledCudaError,
                std::string(what) + ": the stream is not a stream of the communicator's device " +
                    std::to_string(c->st->device));
  }
  return ncclSuccess;
}

ncclResult_t CheckBuffer(ncclComm* c, const void* p, size_t bytes, const char* what,
                         const char* arg) {
  if (bytes == 0) return ncclSuccess;
  int device = -1;
  if (!emu::Inside(p, bytes, emu::MemoryKind::kDevice, nullptr, &device)) {
    return Fail(c, ncclInvalidArgument,
                std::string(what) + ": " + arg + " (" + std::to_string(bytes) +
                    " bytes) is not device memory");
  }
  if (device != c->st->device) {
    return Fail(c, ncclInvalidArgument,
                std::string(what) + ": " + arg + " is memory of device " + std::to_string(device) +
                    ", the communicator's device is " + std::to_string(c->st->device));
  }
  return ncclSuccess;
}

// Queues the collective on the stream: `post` starts the MPI operation (or, with one rank, does
// the copy and leaves the request null). It is posted when it reaches the front of the stream
// (the work before it has run, so its inputs are final): at once when the stream holds nothing
// pending, else when the host next polls or waits for the stream.
template <class Post>
ncclResult_t Launch(ncclComm* c, cudaStream_t stream, const char* what, Post post) {
  std::shared_ptr<CommState> st = c->st;
  const int64_t number = ++collectives;
  const Injection& inj = Injected();
  if (emu::HostOnly()) return ncclSuccess;  // device memory is never touched in host-only mode
  if (inj.at == number) {
    if (!inj.hang) st->async_error = ncclSystemError;
    Fail(c, ncclSuccess, std::string(what) + ": injected " + (inj.hang ? "hang" : "failure") +
                             " (DMSRT_CUDA_EMULATOR_NCCL_FAIL)");
    // Never completes (nor lets the stream go on) until the communicator is aborted.
    emu::EnqueueAwaiting(
        stream, [st] { return st->aborted.load(); },
        [st] {
          while (!st->aborted.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        });
    return ncclSuccess;
  }
  struct Pending {
    Post post;
    MPI_Request req = MPI_REQUEST_NULL;
    bool posted = false;
  };
  auto p = std::make_shared<Pending>(Pending{std::move(post)});
  std::string name(what);
  // Posts on first call; true once the collective is complete (or failed: the error is async).
  auto done = [st, p, name] {
    if (!p->posted) {
      p->posted = true;
      const int rc = p->post(&p->req);
      if (rc != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(rc, msg, &len);
        st->last_error = name + ": " + std::string(msg, len);
        st->async_error = ncclSystemError;
        return true;
      }
    }
    if (p->req == MPI_REQUEST_NULL) return true;
    int flag = 0;
    if (MPI_Test(&p->req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
      st->async_error = ncclSystemError;
      return true;
    }
    return flag != 0;
  };
  emu::EnqueueAwaiting(
      stream, [st, done] { return st->aborted.load() || done(); },
      [st, done] {
        // As a stuck kernel: only completion or an abort ends the wait.
        while (!st->aborted.load() && !done()) std::this_thread::yield();
      });
  emu::Poll(stream);  // posts it now if nothing before it is pending
  return ncclSuccess;
}

}  // namespace

extern "C" {

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  return comm != nullptr ? comm->st->last_error.c_str() : "";
}

ncclResult_t ncclGetVersion(int* version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  static std::atomic<int32_t> serial{0};
  std::memset(id, 0, sizeof(*id));
  IdFields f;
  std::memcpy(f.magic, kMagic, sizeof(kMagic));
  int init = 0;
  MPI_Initialized(&init);
  f.creator_world_rank = -1;
  if (init) MPI_Comm_rank(MPI_COMM_WORLD, &f.creator_world_rank);
  f.serial = serial++;
  std::memcpy(id->internal, &f, sizeof(f));
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  IdFields f;
  std::memcpy(&f, id.internal, sizeof(f));
  if (std::memcmp(f.magic, kMagic, sizeof(kMagic)) != 0) {
    return Fail(nullptr, ncclInvalidArgument, "ncclCommInitRank: not a unique id of this emulator");
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return Fail(nullptr, ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) +
                                                  " of " + std::to_string(nranks));
  }
  auto st = std::make_shared<CommState>();
  st->size = nranks;
  st->rank = rank;
  st->device = emu::CurrentDevice();
  if (nranks > 1) {
    int init = 0;
    MPI_Initialized(&init);
    if (!init || f.creator_world_rank < 0) {
      return Fail(nullptr, ncclInvalidUsage,
                  "ncclCommInitRank: more than one rank needs MPI (start the job with mpirun)");
    }
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    const int tag = 17000 + f.serial % 10000;
    std::vector<int> members(nranks, -1);
    if (world_rank == f.creator_world_rank) {
      members[rank] = world_rank;
      for (int i = 1; i < nranks; ++i) {
        int msg[2];
        MPI_Recv(msg, 2, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (msg[0] < 0 || msg[0] >= nranks || members[msg[0]] != -1) {
          return Fail(nullptr, ncclInvalidUsage, "ncclCommInitRank: two members claim rank " +
                                                     std::to_string(msg[0]));
        }
        members[msg[0]] = msg[1];
      }
      for (int r = 0; r < nranks; ++r) {
        if (members[r] != world_rank) {
          MPI_Send(members.data(), nranks, MPI_INT, members[r], tag, MPI_COMM_WORLD);
        }
      }
    } else {
      int msg[2] = {rank, world_rank};
      MPI_Send(msg, 2, MPI_INT, f.creator_world_rank, tag, MPI_COMM_WORLD);
      MPI_Recv(members.data(), nranks, MPI_INT, f.creator_world_rank, tag, MPI_COMM_WORLD,
               MPI_STATUS_IGNORE);
    }
    MPI_Group world_group, group;
    MPI_Comm_group(MPI_COMM_WORLD, &world_group);
    MPI_Group_incl(world_group, nranks, members.data(), &group);
    const int rc = MPI_Comm_create_group(MPI_COMM_WORLD, group, tag, &st->mpi);
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    if (rc != MPI_SUCCESS || st->mpi == MPI_COMM_NULL) {
      return Fail(nullptr, ncclSystemError, "ncclCommInitRank: MPI_Comm_create_group failed");
    }
    MPI_Comm_set_errhandler(st->mpi, MPI_ERRORS_RETURN);
  }
  *comm = new ncclComm{std::move(st)};
  return ncclSuccess;
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm,
                           ncclConfig_t* /*config*/) {
  *newcomm = nullptr;
  if (comm == nullptr || comm->st->aborted) {
    return Fail(comm, ncclInvalidArgument, "ncclCommSplit: no usable communicator");
  }
  const CommState& p = *comm->st;
  auto st = std::make_shared<CommState>();
  st->device = p.device;
  if (p.mpi == MPI_COMM_NULL) {
    if (color == NCCL_SPLIT_NOCOLOR) return ncclSuccess;
  } else {
    MPI_Comm out = MPI_COMM_NULL;
    if (MPI_Comm_split(p.mpi, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, key, &out) !=
        MPI_SUCCESS) {
      return Fail(comm, ncclSystemError, "ncclCommSplit: MPI_Comm_split failed");
    }
    if (out == MPI_COMM_NULL) return ncclSuccess;
    st->mpi = out;
    MPI_Comm_size(out, &st->size);
    MPI_Comm_rank(out, &st->rank);
  }
  *newcomm = new ncclComm{std::move(st)};
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  delete comm;  // the state lives on while completions queued on streams hold it
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  comm->st->aborted = true;  // releases every queued completion; the MPI side is left as is
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (comm == nullptr) return ncclInvalidArgument;
  *async_error = static_cast<ncclResult_t>(comm->st->async_error.load());
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (comm == nullptr) return ncclInvalidArgument;
  *count = comm->st->size;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (comm == nullptr) return ncclInvalidArgument;
  *rank = comm->st->rank;
  return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
  if (comm == nullptr) return ncclInvalidArgument;
  *device = comm->st->device;
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  static const char* kWhat = "ncclAllReduce";
  if (ncclResult_t r = Prologue(comm, stream, kWhat)) return r;
  size_t esz = 0;
  const MPI_Datatype mt = ToMpi(type, &esz);
  const MPI_Op mop = ToMpi(op);
  if (mt == MPI_DATATYPE_NULL || mop == MPI_OP_NULL) {
    return Fail(comm, ncclInvalidArgument, "ncclAllReduce: data type or operation not emulated");
  }
  const size_t bytes = count * esz;
  if (ncclResult_t r = CheckBuffer(comm, send, bytes, kWhat, "sendbuff")) return r;
  if (ncclResult_t r = CheckBuffer(comm, recv, bytes, kWhat, "recvbuff")) return r;
  if (count == 0) return ncclSuccess;
  CommState* st = comm->st.get();
  return Launch(comm, stream, kWhat, [=](MPI_Request* req) {
    if (st->mpi == MPI_COMM_NULL) {
      if (send != recv) std::memmove(recv, send, bytes);
      return MPI_SUCCESS;
    }
    return MPI_Iallreduce(send == recv ? MPI_IN_PLACE : send, recv, static_cast<int>(count), mt,
                          mop, st->mpi, req);
  });
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
  static const char* kWhat = "ncclAllGather";
  if (ncclResult_t r = Prologue(comm, stream, kWhat)) return r;
  size_t esz = 0;
  MPI_Datatype mt = ToMpi(type, &esz);
  if (mt == MPI_DATATYPE_NULL) {
    if (type != ncclFloat16 && type != ncclBfloat16) {
      return Fail(comm, ncclInvalidArgument, "ncclAllGather: data type not emulated");
    }
    esz = 2;  // moved as bytes: a gather does no arithmetic
    mt = MPI_UINT16_T;
  }
  CommState* st = comm->st.get();
  const size_t bytes = count * esz;
  if (ncclResult_t r = CheckBuffer(comm, send, bytes, kWhat, "sendbuff")) return r;
  if (ncclResult_t r = CheckBuffer(comm, recv, bytes * st->size, kWhat, "recvbuff")) return r;
  if (count == 0) return ncclSuccess;
  const bool in_place = send == static_cast<const char*>(recv) + bytes * st->rank;
  return Launch(comm, stream, kWhat, [=](MPI_Request* req) {
    if (st->mpi == MPI_COMM_NULL) {
      if (!in_place) std::memmove(recv, send, bytes);
      return MPI_SUCCESS;
    }
    return MPI_Iallgather(in_place ? MPI_IN_PLACE : send, static_cast<int>(count), mt, recv,
                          static_cast<int>(count), mt, st->mpi, req);
  });
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  static const char* kWhat = "ncclBroadcast";
  if (ncclResult_t r = Prologue(comm, stream, kWhat)) return r;
  size_t esz = 0;
  MPI_Datatype mt = ToMpi(type, &esz);
  if (mt == MPI_DATATYPE_NULL) {
    esz = 2;
    mt = MPI_UINT16_T;
  }
  CommState* st = comm->st.get();
  if (root < 0 || root >= st->size) {
    return Fail(comm, ncclInvalidArgument, "ncclBroadcast: root " + std::to_string(root) +
                                               " of " + std::to_string(st->size) + " ranks");
  }
  const size_t bytes = count * esz;
  if (st->rank == root) {
    if (ncclResult_t r = CheckBuffer(comm, send, bytes, kWhat, "sendbuff")) return r;
  }
  if (ncclResult_t r = CheckBuffer(comm, recv, bytes, kWhat, "recvbuff")) return r;
  if (count == 0) return ncclSuccess;
  return Launch(comm, stream, kWhat, [=](MPI_Request* req) {
    if (st->rank == root && send != recv) std::memmove(recv, send, bytes);
    if (st->mpi == MPI_COMM_NULL) return MPI_SUCCESS;
    return MPI_Ibcast(recv, static_cast<int>(count), mt, root, st->mpi, req);
  });
}

}  // extern "C"
