// NcclComm: the GPU communicator, one CUDA device per rank. Compiled only with CUDA and NCCL
// (DMSRT_HAVE_NCCL).
//
// Bootstrap: NCCL needs every rank to hold the same ncclUniqueId. Rank 0 of a host communicator
// (MpiComm under mpirun, LocalComm for one rank) creates it and broadcasts its bytes; every rank
// then selects its device and calls ncclCommInitRank. The NcclComm owns that host communicator and
// returns it from host() for control messages (StepPlan broadcast, free-block agreement), which
// live in host memory.
//
// Buffers passed to the collectives are DEVICE pointers; the work is enqueued on stream(), a
// non-blocking stream owned by the communicator. With NcclCommOptions::sync (the default) each call
// also waits for the stream, giving the blocking semantics of comm.h. With sync = false, calls
// return once enqueued and results are ordered with later work on stream(); Synchronize() waits.
// The CUDA backend binds its compute stream with UseStream(stream, /*sync=*/false): collectives
// are then ordered with its kernels by the stream alone, and its waits go through Synchronize()
// so that they have the watchdog too.
//
// Watchdog: with a timeout set, waiting polls cudaStreamQuery and ncclCommGetAsyncError until the
// deadline; on expiry the NCCL communicator is aborted (ncclCommAbort frees the stuck kernels) and
// DEADLINE_EXCEEDED names the collective and the members. An asynchronous NCCL error or a device
// error found while waiting aborts it too (INTERNAL), as NCCL asks after an error.
//
//   DMSRT_ASSIGN_OR_RETURN(auto tp_host, MakeTpComm(*world_comm, world));
//   DMSRT_ASSIGN_OR_RETURN(auto tp, NcclComm::Create(std::move(tp_host), world.device()));
//   DMSRT_RETURN_IF_ERROR(tp->AllReduceSum(d_attn_out, n_tokens * hidden));  // device memory
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda_check.h"
#include "parallel/comm.h"

namespace dmsrt {

// INTERNAL status "<file>:<line>: <call> failed: <error string>".
absl::Status NcclError(ncclResult_t code, const char* call, const char* file, int line);
absl::Status CudaError(cudaError_t code, const char* call, const char* file, int line);

#define DMSRT_NCCL_RETURN_IF_ERROR(call)                                      \
  do {                                                                        \
    ncclResult_t dmsrt_nccl_rc_ = (call);                                     \
    if (dmsrt_nccl_rc_ != ncclSuccess)                                        \
      return ::dmsrt::NcclError(dmsrt_nccl_rc_, #call, __FILE__, __LINE__);   \
  } while (0)
// DMSRT_CUDA_RETURN_IF_ERROR: kernels/cuda_check.h (one definition for every layer).

// Number of visible CUDA devices; FAILED_PRECONDITION when there is none.
absl::StatusOr<int> CudaDeviceCount();

struct NcclCommOptions {
  bool sync = true;               // wait for each collective before returning
  cudaStream_t stream = nullptr;  // enqueue here instead of a stream of our own (not owned)
};

class NcclComm final : public Communicator {
 public:
  // Collective over `host`. device: the CUDA device of this rank (World::device()).
  static absl::StatusOr<std::unique_ptr<NcclComm>> Create(std::unique_ptr<Communicator> host,
                                                          int device,
                                                          const NcclCommOptions& options = {});
  ~NcclComm() override;

  int size() const override { return size_; }
  int rank() const override { return rank_; }
  const char* kind() const override { return "nccl"; }
  std::string Describe() const override;
  bool device_buffers() const override { return true; }
  Communicator* host() override { return host_.get(); }

  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  // Enqueues later collectives on `stream` (not owned; a compute stream of `device()`, so that
  // they are ordered with its kernels) and sets whether each collective waits for it. Synchronize
  // then waits for `stream`. nullptr restores the communicator's own stream and the sync setting
  // it was created with (call it before `stream` is destroyed). Not collective.
  void UseStream(cudaStream_t stream, bool sync);
  ncclComm_t raw() const { return comm_; }
  // Waits for everything enqueued on stream(), with the watchdog.
  absl::Status Synchronize();

  absl::Status AllReduce(const float* send, float* recv, int64_t count, ReduceOp op) override;
  absl::Status AllReduce(const int64_t* send, int64_t* recv, int64_t count, ReduceOp op) override;
  absl::Status AllGatherBytes(const void* send, int64_t bytes, void* recv) override;
  absl::Status Broadcast(void* buf, int64_t bytes, int root) override;
  // Host barrier (NCCL has none): drains stream() then host()->Barrier().
  absl::Status Barrier() override;
  // ncclCommSplit plus the same split of host(). Collective.
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) override;
  // ncclCommAbort, then host()->Abort(reason) (which stops the job under MPI).
  absl::Status Abort(const std::string& reason) override;

 private:
  NcclComm() = default;
  absl::Status Usable(const char* what) const;
  absl::Status Finish(const char* what, int64_t count);  // sync if asked, record errors
  absl::Status AllReduceTyped(const void* send, void* recv, int64_t count, ncclDataType_t type,
                              ReduceOp op);

  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;      // where collectives go now
  cudaStream_t own_stream_ = nullptr;  // created or given at Create (stream_ unless UseStream)
  bool owns_stream_ = false;
  bool sync_ = true;
  bool own_sync_ = true;
  int device_ = 0;
  int size_ = 1;
  int rank_ = 0;
  std::string broken_;
};

}  // namespace dmsrt
