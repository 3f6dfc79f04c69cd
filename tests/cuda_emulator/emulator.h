// A CUDA device emulated on the host, for testing the host code that drives the device (the
// CUDA backend's step orchestration: buffer sizes, offsets, index staging, stream order) on
// machines without a GPU. It is linked into test executables only, in place of the CUDA runtime,
// cuBLAS and the kernel launchers of kernels/*.cuh:
//   runtime_api.cc  the CUDA runtime and cuBLAS entry points the project calls;
//   launchers.cc    every launcher, computed with the C++ references of kernels/reference/ (the
//                   oracle the real kernels are tested against on a GPU) or, for pure data
//                   movement, by copying bits as the kernel's contract states.
// What it models, so that bugs which would corrupt memory silently on a GPU fail loudly here:
//   * device memory is a registry of allocations; new allocations are filled with 0xFF bytes
//     (NaN in bf16 and fp32, -1 in int32), so reading what was never written shows up;
//   * every pointer a launcher or a copy touches must lie inside one live allocation of the
//     right kind (device, or pinned host); index arrays are checked against the pools they
//     address when the work runs;
//   * streams are queues: launches and asynchronous copies run only when something waits for
//     them (stream or device synchronisation, a blocking copy on a blocking stream, a free),
//     so a result read before its stream is synchronised is stale here as it would be on a
//     device. Copies follow CUDA's rules for pageable memory: host to device snapshots the
//     source at the call, device to pageable host waits for the stream;
//   * a fault is sticky: later calls return it, as on a device.
// It does not model concurrency between streams (queues run in submission order when drained)
// and it is slow: it is meant for tiny models.
//
// Host-only mode (DMSRT_CUDA_EMULATOR_HOST_ONLY=1) measures what the host spends per step, the
// work a device cannot hide (bookkeeping, index building, staging, enqueueing): device memory is
// reserved address space that is never touched, and queued work is counted and dropped instead
// of run. Argument checks still run; results read back are zeros. With DMSRT_CUDA_EMULATOR_MIB
// set to a real device's memory, a full-size synthetic model runs on a small host. At exit it
// prints the device operations queued and the host waits: synchronisations (or blocking copies)
// that found work queued since the last wait on that stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace dmsrt {
namespace cuda_emulator {

enum class MemoryKind { kDevice, kPinnedHost };

// Bytes of the emulated device (cudaMemGetInfo's total, and the cap on cudaMalloc).
// DMSRT_CUDA_EMULATOR_MIB overrides the default of 4096.
size_t DeviceCapacity();
// Devices the process sees (cudaGetDeviceCount): DMSRT_CUDA_EMULATOR_DEVICES, default 1. They
// share one memory registry, but every allocation and stream belongs to the device that was
// current (cudaSetDevice, per thread as in CUDA) when it was made, and a launch that touches
// another device's memory, or goes to another device's stream, faults: a rank that binds one
// device for its communicator and another for its buffers fails here as on a GPU machine.
int DeviceCount();
int CurrentDevice();
void SetCurrentDevice(int device);
// The device of a stream (nullptr: the current device's legacy stream).
int StreamDevice(cudaStream_t s);
// True in host-only mode (see above).
bool HostOnly();
// Device operations (launches, copies, memsets) queued so far.
uint64_t OperationsQueued();
// Times the host waited for queued work: a synchronisation or blocking copy that found work
// queued on a stream since the last wait for it (waits on an idle stream cost a device little
// and are not counted).
uint64_t HostWaits();

// Allocation bookkeeping.
void* Allocate(size_t bytes, MemoryKind kind, cudaError_t* err);
cudaError_t Release(void* p, MemoryKind kind);
size_t DeviceBytesAllocated();
// True when [p, p + bytes) lies inside one live allocation of `kind`. With `room`, also the
// bytes from p to the end of that allocation; with `device`, the device it belongs to.
bool Inside(const void* p, size_t bytes, MemoryKind kind, size_t* room = nullptr,
            int* device = nullptr);

// Checks that a launcher argument [p, p + bytes) is memory of the current device. On failure
// records a sticky cudaErrorIllegalAddress naming the launcher and the argument, and returns it.
cudaError_t CheckDevice(const void* p, size_t bytes, const char* launcher, const char* arg);
// How many whole `elem_bytes` elements fit from p to the end of its device allocation (0 when p
// is not device memory).
size_t DeviceRoom(const void* p, size_t elem_bytes);

// Fault injection, for the tests of a failing rank: DMSRT_CUDA_EMULATOR_FAULT=R:LAUNCHER:N makes
// the N-th launch (from 1) of LAUNCHER (e.g. DecodeAttention) on world rank R (from the
// launcher's environment) fault with cudaErrorIllegalAddress, as a kernel that reads outside its
// buffers would. Returns the fault for that launch, else cudaSuccess.
cudaError_t InjectedFault(const char* launcher);
// This process's rank in the mpirun job (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK), else 0.
int WorldRankFromEnv();

// Records a fault (the first one sticks) and prints it.
void Fault(cudaError_t e, const std::string& what);
// The sticky fault, or cudaSuccess.
cudaError_t StickyError();

// Streams. nullptr is the legacy default stream.
cudaStream_t NewStream(bool blocking);
void DeleteStream(cudaStream_t s);
bool KnownStream(cudaStream_t s);
// Queues work on a stream. Work runs in order when the stream is drained; it reports faults
// through Fault().
void Enqueue(cudaStream_t s, std::function<void()> work);
// Queues work that completes something started elsewhere (a collective in flight between
// processes): `ready` says whether `work` would return at once; Drain runs `work` anyway (it may
// block, as a stream synchronisation does on a device), Poll stops in front of it.
void EnqueueAwaiting(cudaStream_t s, std::function<bool()> ready, std::function<void()> work);
// Runs the stream's queued work in order (a host wait: see HostWaits).
void Drain(cudaStream_t s);
// cudaStreamQuery: runs queued work up to the first item that is not ready; true when none is
// left. Not a host wait.
bool Poll(cudaStream_t s);
// Legacy-stream semantics: the legacy stream and every blocking stream.
void DrainBlocking();
void DrainAll();

}  // namespace cuda_emulator
}  // namespace dmsrt
