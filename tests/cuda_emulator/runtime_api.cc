// The CUDA runtime and cuBLAS entry points the project calls, on the emulated device (see
// emulator.h). Definitions here take the place of libcudart's and libcublas's in the test
// executables that link this file.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "tests/cuda_emulator/emulator.h"

namespace emu = dmsrt::cuda_emulator;

namespace {

// The handle cuBLAS hands out. It holds nothing: GemmBf16 (launchers.cc) takes its stream as an
// argument, as the real wrapper does before binding it to the handle.
struct CublasContextEmu {};

thread_local cudaError_t last_error = cudaSuccess;

cudaError_t Note(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

bool IsDevice(const void* p, size_t n) { return emu::Inside(p, n, emu::MemoryKind::kDevice); }
bool IsPinned(const void* p, size_t n) { return emu::Inside(p, n, emu::MemoryKind::kPinnedHost); }

// Checks a copy's endpoints against its kind: device sides must be device memory, host sides
// must not be.
cudaError_t CheckCopy(void* dst, const void* src, size_t n, cudaMemcpyKind* kind, const char* what) {
  if (*kind == cudaMemcpyDefault) {
    const bool d = IsDevice(dst, n), s = IsDevice(src, n);
    *kind = d ? (s ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
              : (s ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  }
  const bool dst_dev = *kind == cudaMemcpyHostToDevice || *kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = *kind == cudaMemcpyDeviceToHost || *kind == cudaMemcpyDeviceToDevice;
  const bool ok_dst = dst_dev ? IsDevice(dst, n) : !IsDevice(dst, 1);
  const bool ok_src = src_dev ? IsDevice(src, n) : !IsDevice(src, 1);
  if (ok_dst && ok_src) return cudaSuccess;
  std::fprintf(stderr, "cuda emulator: %s of %zu bytes (kind %d): %s%s\n", what, n,
               static_cast<int>(*kind), ok_dst ? "" : "bad destination ",
               ok_src ? "" : "bad source");
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidPitchValue: return "cudaErrorInvalidPitchValue";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidPitchValue: return "invalid pitch argument";
    case cudaErrorNotReady: return "device not ready";
    default: return "unknown error";
  }
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = last_error != cudaSuccess ? last_error : emu::StickyError();
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  return last_error != cudaSuccess ? last_error : emu::StickyError();
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = emu::DeviceCount();
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = emu::CurrentDevice();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= emu::DeviceCount()) return Note(cudaErrorInvalidDevice);
  emu::SetCurrentDevice(device);
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::DeviceCount()) return Note(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;  // an H100 SXM
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    default: return Note(cudaErrorInvalidValue);
  }
}

cudaError_t cudaDeviceSynchronize(void) {
  emu::DrainAll();
  return Note(emu::StickyError());
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *total_bytes = emu::DeviceCapacity();
  *free_bytes = *total_bytes - emu::DeviceBytesAllocated();
  return Note(emu::StickyError());
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  cudaError_t e = cudaSuccess;
  *p = emu::Allocate(bytes, emu::MemoryKind::kDevice, &e);
  return Note(e);
}

cudaError_t cudaFree(void* p) { return Note(emu::Release(p, emu::MemoryKind::kDevice)); }

cudaError_t cudaMallocHost(void** p, size_t bytes) {
  cudaError_t e = cudaSuccess;
  *p = emu::Allocate(bytes, emu::MemoryKind::kPinnedHost, &e);
  return Note(e);
}

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int /*flags*/) {
  return cudaMallocHost(p, bytes);
}

cudaError_t cudaFreeHost(void* p) { return Note(emu::Release(p, emu::MemoryKind::kPinnedHost)); }

cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = emu::NewStream(true);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  *s = emu::NewStream((flags & cudaStreamNonBlocking) == 0);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s == nullptr || !emu::KnownStream(s)) return Note(cudaErrorInvalidResourceHandle);
  emu::DeleteStream(s);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (!emu::KnownStream(s)) return Note(cudaErrorInvalidResourceHandle);
  if (s == nullptr) {
    emu::DrainBlocking();
  } else {
    emu::Drain(s);
  }
  return Note(emu::StickyError());
}

cudaError_t cudaStreamQuery(cudaStream_t s) {
  if (!emu::KnownStream(s)) return Note(cudaErrorInvalidResourceHandle);
  const bool idle = emu::Poll(s);
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  return idle ? cudaSuccess : cudaErrorNotReady;
}

// Blocking copy on the legacy stream: waits for the legacy and blocking streams, not for
// non-blocking ones.
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, enum cudaMemcpyKind kind) {
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  const cudaError_t e = CheckCopy(dst, src, n, &kind, "cudaMemcpy");
  if (e != cudaSuccess) return Note(e);
  emu::DrainBlocking();
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  std::memmove(dst, src, n);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind kind,
                            cudaStream_t s) {
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  if (!emu::KnownStream(s)) return Note(cudaErrorInvalidResourceHandle);
  const cudaError_t e = CheckCopy(dst, src, n, &kind, "cudaMemcpyAsync");
  if (e != cudaSuccess) return Note(e);
  if (n == 0) return cudaSuccess;
  const bool host_src = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost;
  const bool host_dst = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost;
  if (host_dst && !IsPinned(dst, n)) {
    // To pageable memory: returns only once the copy is done.
    emu::Drain(s);
    if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
    std::memmove(dst, src, n);
    return cudaSuccess;
  }
  if (host_src && !IsPinned(src, n) && !emu::HostOnly()) {
    // From pageable memory: the data is staged before the call returns.
    auto copy = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                    static_cast<const char*>(src) + n);
    emu::Enqueue(s, [dst, copy] { std::memcpy(dst, copy->data(), copy->size()); });
    return cudaSuccess;
  }
  if (emu::HostOnly() && kind == cudaMemcpyDeviceToHost) {
    std::memset(dst, 0, n);  // device memory is never written in host-only mode: it reads as 0
  }
  emu::Enqueue(s, [dst, src, n] { std::memmove(dst, src, n); });
  return cudaSuccess;
}

// 2D copies: `height` rows of `width` bytes, rows `dpitch` / `spitch` bytes apart. Each side
// is checked as the span it covers; host sides follow the 1D rules (pageable sources are
// snapshotted at the call, pageable destinations wait for the stream).
namespace {

size_t Span(size_t pitch, size_t width, size_t height) {
  return height == 0 ? 0 : pitch * (height - 1) + width;
}

void CopyRows(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
              size_t height) {
  for (size_t r = 0; r < height; ++r) {
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                 width);
  }
}

cudaError_t Check2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                    size_t height, cudaMemcpyKind* kind, const char* what) {
  if (dpitch < width || spitch < width) return cudaErrorInvalidPitchValue;
  const size_t dn = Span(dpitch, width, height), sn = Span(spitch, width, height);
  if (*kind == cudaMemcpyDefault) {
    const bool d = IsDevice(dst, dn), s = IsDevice(src, sn);
    *kind = d ? (s ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
              : (s ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  }
  const bool dst_dev = *kind == cudaMemcpyHostToDevice || *kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = *kind == cudaMemcpyDeviceToHost || *kind == cudaMemcpyDeviceToDevice;
  const bool ok_dst = dst_dev ? IsDevice(dst, dn) : !IsDevice(dst, 1);
  const bool ok_src = src_dev ? IsDevice(src, sn) : !IsDevice(src, 1);
  if (ok_dst && ok_src) return cudaSuccess;
  std::fprintf(stderr, "cuda emulator: %s of %zu rows of %zu bytes (kind %d): %s%s\n", what, height,
               width, static_cast<int>(*kind), ok_dst ? "" : "bad destination ",
               ok_src ? "" : "bad source");
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, enum cudaMemcpyKind kind,
                              cudaStream_t s) {
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  if (!emu::KnownStream(s)) return Note(cudaErrorInvalidResourceHandle);
  const cudaError_t e = Check2D(dst, dpitch, src, spitch, width, height, &kind, "cudaMemcpy2DAsync");
  if (e != cudaSuccess) return Note(e);
  if (width == 0 || height == 0) return cudaSuccess;
  const bool host_src = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost;
  const bool host_dst = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost;
  if (host_dst && !IsPinned(dst, Span(dpitch, width, height))) {
    emu::Drain(s);
    if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
    CopyRows(dst, dpitch, src, spitch, width, height);
    return cudaSuccess;
  }
  if (host_src && !IsPinned(src, Span(spitch, width, height)) && !emu::HostOnly()) {
    auto copy = std::make_shared<std::vector<char>>(width * height);
    CopyRows(copy->data(), width, src, spitch, width, height);
    emu::Enqueue(s, [=] { CopyRows(dst, dpitch, copy->data(), width, width, height); });
    return cudaSuccess;
  }
  emu::Enqueue(s, [=] { CopyRows(dst, dpitch, src, spitch, width, height); });
  return cudaSuccess;
}

cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                         size_t height, enum cudaMemcpyKind kind) {
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  const cudaError_t e = Check2D(dst, dpitch, src, spitch, width, height, &kind, "cudaMemcpy2D");
  if (e != cudaSuccess) return Note(e);
  emu::DrainBlocking();
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  CopyRows(dst, dpitch, src, spitch, width, height);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t s) {
  if (emu::StickyError() != cudaSuccess) return Note(emu::StickyError());
  if (!emu::KnownStream(s)) return Note(cudaErrorInvalidResourceHandle);
  if (n > 0 && !IsDevice(p, n)) {
    std::fprintf(stderr, "cuda emulator: cudaMemset of %zu bytes outside device memory\n", n);
    return Note(cudaErrorInvalidValue);
  }
  emu::Enqueue(s, [p, value, n] { std::memset(p, value, n); });
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t n) {
  const cudaError_t e = cudaMemsetAsync(p, value, n, nullptr);
  if (e != cudaSuccess) return e;
  emu::DrainBlocking();
  return Note(emu::StickyError());
}

// ---- cuBLAS: the handle's lifetime; GemmBf16 (launchers.cc) does the product ----

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = reinterpret_cast<cublasHandle_t>(new CublasContextEmu);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete reinterpret_cast<CublasContextEmu*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  return emu::KnownStream(stream) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

}  // extern "C"
