// NcclComm (see nccl_comm.h).
//
// The unique id travels together with a success flag, so a rank 0 that cannot create it tells the
// others instead of leaving them in ncclCommInitRank. The watchdog polls instead of calling
// cudaStreamSynchronize because a stuck NCCL kernel never completes and only ncclCommAbort frees it.
#include "parallel/nccl/nccl_comm.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace dmsrt {
namespace {

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMin:
      return ncclMin;
    case ReduceOp::kMax:
      return ncclMax;
  }
  return ncclSum;
}

struct IdMessage {
  int32_t ok = 0;
  ncclUniqueId id;
};

}  // namespace

absl::Status NcclError(ncclResult_t code, const char* call, const char* file, int line) {
  return absl::InternalError(
      absl::StrFormat("%s:%d: %s failed: %s", file, line, call, ncclGetErrorString(code)));
}

absl::Status CudaError(cudaError_t code, const char* call, const char* file, int line) {
  return absl::InternalError(absl::StrFormat("%s:%d: %s failed: %s (%s)", file, line, call,
                                             cudaGetErrorString(code), cudaGetErrorName(code)));
}

absl::StatusOr<int> CudaDeviceCount() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no CUDA device available (%s)", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e)));
  }
  return n;
}

absl::StatusOr<std::unique_ptr<NcclComm>> NcclComm::Create(std::unique_ptr<Communicator> host,
                                                           int device,
                                                           const NcclCommOptions& options) {
  if (host == nullptr) return absl::InvalidArgumentError("NcclComm::Create: null host communicator");
  if (host->device_buffers()) {
    return absl::InvalidArgumentError("NcclComm::Create: the bootstrap must be a host communicator");
  }
  IdMessage msg;
  if (host->rank() == 0) {
    ncclResult_t r = ncclGetUniqueId(&msg.id);
    msg.ok = r == ncclSuccess ? 1 : 0;
    if (r != ncclSuccess) {
      absl::Status err = NcclError(r, "ncclGetUniqueId", __FILE__, __LINE__);
      (void)host->Broadcast(&msg, sizeof(msg), 0);  // tell the others, then fail
      return err;
    }
  }
  absl::Status s = host->Broadcast(&msg, sizeof(msg), 0);
  if (!s.ok()) return s;
  if (!msg.ok) {
    return absl::InternalError(absl::StrFormat(
        "NcclComm::Create on %s: rank 0 could not create the NCCL unique id", host->Describe()));
  }
  std::unique_ptr<NcclComm> c(new NcclComm());
  c->device_ = device;
  c->size_ = host->size();
  c->rank_ = host->rank();
  c->sync_ = c->own_sync_ = options.sync;
  c->timeout_ = host->timeout();
  DMSRT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (options.stream != nullptr) {
    c->stream_ = options.stream;
  } else {
    DMSRT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
    c->owns_stream_ = true;
  }
  c->own_stream_ = c->stream_;
  DMSRT_NCCL_RETURN_IF_ERROR(ncclCommInitRank(&c->comm_, c->size_, msg.id, c->rank_));
  c->host_ = std::move(host);
  return c;
}

NcclComm::~NcclComm() {
  cudaSetDevice(device_);
  if (comm_ != nullptr) {
    if (broken_.empty()) {
      ncclCommDestroy(comm_);
    } else {
      ncclCommAbort(comm_);
    }
  }
  if (owns_stream_ && own_stream_ != nullptr) cudaStreamDestroy(own_stream_);
}

void NcclComm::UseStream(cudaStream_t stream, bool sync) {
  if (stream == nullptr) {
    stream_ = own_stream_;
    sync_ = own_sync_;
  } else {
    stream_ = stream;
    sync_ = sync;
  }
}

std::string NcclComm::Describe() const {
  return absl::StrFormat("nccl[device %d, over %s]", device_,
                         host_ != nullptr ? host_->Describe() : std::string("?"));
}

absl::Status NcclComm::Usable(const char* what) const {
  if (!broken_.empty() || comm_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s on %s: communicator unusable after an earlier failure (%s); call Abort()", what,
        Describe(), broken_));
  }
  return absl::OkStatus();
}

absl::Status NcclComm::Synchronize() {
  absl::Status s = Usable("Synchronize");
  if (!s.ok()) return s;
  const absl::Time deadline = timeout_ == absl::InfiniteDuration()
                                  ? absl::InfiniteFuture()
                                  : absl::Now() + timeout_;
  for (int polls = 0;; ++polls) {
    cudaError_t e = cudaStreamQuery(stream_);
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) {
      s = CudaError(e, "cudaStreamQuery", __FILE__, __LINE__);
    } else {
      ncclResult_t async = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
        s = NcclError(r != ncclSuccess ? r : async, "NCCL collective", __FILE__, __LINE__);
      }
    }
    if (!s.ok()) {
      // NCCL's rule after an error: abort the communicator, which also frees its kernels, so
      // that whatever waits on this stream next (a free, a synchronisation) does not hang.
      broken_ = s.ToString();
      ncclCommAbort(comm_);
      comm_ = nullptr;
      return s;
    }
    if (polls < 1000) continue;
    if (absl::Now() >= deadline) {
      s = absl::DeadlineExceededError(absl::StrFormat(
          "NCCL work on %s did not complete within %s: a member died, is stuck, or called a "
          "different collective; the NCCL communicator was aborted",
          Describe(), absl::FormatDuration(timeout_)));
      broken_ = s.ToString();
      ncclCommAbort(comm_);
      comm_ = nullptr;
      return s;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

absl::Status NcclComm::Finish(const char* what, int64_t count) {
  if (!sync_) return absl::OkStatus();
  absl::Status s = Synchronize();
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrFormat("%s of %d elements: %s", what, count, s.message()));
  }
  return s;
}

absl::Status NcclComm::AllReduceTyped(const void* send, void* recv, int64_t count,
                                      ncclDataType_t type, ReduceOp op) {
  absl::Status s = Usable("AllReduce");
  if (!s.ok()) return s;
  if (!(s = CheckCount(count, "AllReduce")).ok()) return s;
  if (count == 0) return absl::OkStatus();
  DMSRT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  DMSRT_NCCL_RETURN_IF_ERROR(ncclAllReduce(send, recv, static_cast<size_t>(count), type,
                                           ToNccl(op), comm_, stream_));
  return Finish("ncclAllReduce", count);
}

absl::Status NcclComm::AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) {
  return AllReduceTyped(send, recv, count, ncclFloat32, op);
}

absl::Status NcclComm::AllReduce(const int64_t* send, int64_t* recv, int64_t count, ReduceOp op) {
  return AllReduceTyped(send, recv, count, ncclInt64, op);
}

absl::Status NcclComm::AllGatherBytes(const void* send, int64_t bytes, void* recv) {
  absl::Status s = Usable("AllGather");
  if (!s.ok()) return s;
  if (!(s = CheckCount(bytes, "AllGather")).ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  DMSRT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  DMSRT_NCCL_RETURN_IF_ERROR(
      ncclAllGather(send, recv, static_cast<size_t>(bytes), ncclChar, comm_, stream_));
  return Finish("ncclAllGather", bytes);
}

absl::Status NcclComm::Broadcast(void* buf, int64_t bytes, int root) {
  absl::Status s = Usable("Broadcast");
  if (!s.ok()) return s;
  if (!(s = CheckCount(bytes, "Broadcast")).ok()) return s;
  if (!(s = CheckRoot(root, "Broadcast")).ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  DMSRT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  DMSRT_NCCL_RETURN_IF_ERROR(
      ncclBroadcast(buf, buf, static_cast<size_t>(bytes), ncclChar, root, comm_, stream_));
  return Finish("ncclBroadcast", bytes);
}

absl::Status NcclComm::Barrier() {
  absl::Status s = Synchronize();
  if (!s.ok()) return s;
  return host_->Barrier();
}

absl::StatusOr<std::unique_ptr<Communicator>> NcclComm::Split(int color, int key) {
  absl::Status s = Usable("Split");
  if (!s.ok()) return s;
  if (color < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("Split: color must be >= 0, got %d", color));
  }
  absl::StatusOr<std::unique_ptr<Communicator>> sub_host = host_->Split(color, key);
  if (!sub_host.ok()) return sub_host.status();
  std::unique_ptr<NcclComm> c(new NcclComm());
  c->device_ = device_;
  c->sync_ = c->own_sync_ = own_sync_;
  c->timeout_ = timeout_;
  c->size_ = (*sub_host)->size();
  c->rank_ = (*sub_host)->rank();
  DMSRT_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  DMSRT_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
  c->owns_stream_ = true;
  c->own_stream_ = c->stream_;
  DMSRT_NCCL_RETURN_IF_ERROR(ncclCommSplit(comm_, color, key, &c->comm_, nullptr));
  c->host_ = std::move(*sub_host);
  return std::unique_ptr<Communicator>(std::move(c));
}

absl::Status NcclComm::Abort(const std::string& reason) {
  if (comm_ != nullptr) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  if (broken_.empty()) broken_ = "aborted: " + reason;
  return host_->Abort(reason);
}

}  // namespace dmsrt
