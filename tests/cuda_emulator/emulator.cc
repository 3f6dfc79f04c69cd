// The emulated device's memory registry, streams and sticky faults (see emulator.h).
#include "tests/cuda_emulator/emulator.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>

#include <atomic>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace dmsrt {
namespace cuda_emulator {
namespace {

struct Block {
  size_t bytes = 0;
  MemoryKind kind = MemoryKind::kDevice;
  int device = 0;
  size_t mapped = 0;  // host-only mode: bytes of reserved address space (munmap), else 0
};

struct Work {
  std::function<void()> run;
  std::function<bool()> ready;  // null: ready at once
};

struct Stream {
  int device = 0;
  bool blocking = true;
  bool pending = false;  // work queued since the host last waited for this stream
  std::deque<Work> work;
};

struct State {
  std::mutex mu;
  std::map<uintptr_t, Block> blocks;  // by base address
  size_t device_bytes = 0;
  cudaError_t sticky = cudaSuccess;
  std::atomic<uint64_t> queued{0};
  std::atomic<uint64_t> waits{0};
  Stream legacy;
  std::vector<std::unique_ptr<Stream>> streams;
};

State& S() {
  static State* s = new State;  // never destroyed: frees may run during static destruction
  return *s;
}

thread_local int current_device = 0;

Stream* Get(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return &S().legacy;
  return reinterpret_cast<Stream*>(s);
}

// The allocation that holds [p, p + bytes), or blocks.end(). Caller holds mu.
std::map<uintptr_t, Block>::const_iterator FindLocked(const void* p, size_t bytes) {
  const auto& blocks = S().blocks;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = blocks.upper_bound(a);
  if (it == blocks.begin()) return blocks.end();
  --it;
  if (a - it->first > it->second.bytes || bytes > it->second.bytes - (a - it->first)) {
    return blocks.end();
  }
  return it;
}

}  // namespace

size_t DeviceCapacity() {
  static const size_t cap = [] {
    const char* v = std::getenv("DMSRT_CUDA_EMULATOR_MIB");
    const long mib = v != nullptr ? std::atol(v) : 4096;
    return static_cast<size_t>(mib > 0 ? mib : 4096) << 20;
  }();
  return cap;
}

int DeviceCount() {
  static const int n = [] {
    const char* v = std::getenv("DMSRT_CUDA_EMULATOR_DEVICES");
    const int d = v != nullptr ? std::atoi(v) : 1;
    return d > 0 ? d : 1;
  }();
  return n;
}

int CurrentDevice() { return current_device; }
void SetCurrentDevice(int device) { current_device = device; }

int StreamDevice(cudaStream_t s) {
  if (Get(s) == &S().legacy) return current_device;
  return Get(s)->device;
}

bool HostOnly() {
  static const bool on = [] {
    const char* v = std::getenv("DMSRT_CUDA_EMULATOR_HOST_ONLY");
    if (v == nullptr || v[0] == '\0' || std::strcmp(v, "0") == 0) return false;
    std::atexit([] {
      std::fprintf(stderr, "cuda emulator (host only): %llu device operations queued, %llu host waits\n",
                   static_cast<unsigned long long>(OperationsQueued()),
                   static_cast<unsigned long long>(HostWaits()));
    });
    return true;
  }();
  return on;
}

uint64_t OperationsQueued() { return S().queued.load(); }
uint64_t HostWaits() { return S().waits.load(); }

void* Allocate(size_t bytes, MemoryKind kind, cudaError_t* err) {
  *err = StickyError();
  if (*err != cudaSuccess) return nullptr;
  const size_t n = std::max<size_t>(bytes, 1);
  {
    std::lock_guard<std::mutex> lock(S().mu);
    if (kind == MemoryKind::kDevice && S().device_bytes + n > DeviceCapacity()) {
      *err = cudaErrorMemoryAllocation;
      return nullptr;
    }
  }
  void* p = nullptr;
  size_t mapped = 0;
  if (HostOnly() && kind == MemoryKind::kDevice) {
    // Address space only: pages are never touched, so they never cost memory.
    mapped = (n + 4095) / 4096 * 4096;
    p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
             -1, 0);
    if (p == MAP_FAILED) p = nullptr;
  } else {
    // 256-byte alignment, like cudaMalloc.
    p = std::aligned_alloc(256, (n + 255) / 256 * 256);
    if (p != nullptr) std::memset(p, 0xFF, n);
  }
  if (p == nullptr) {
    *err = cudaErrorMemoryAllocation;
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(S().mu);
  S().blocks[reinterpret_cast<uintptr_t>(p)] = Block{n, kind, current_device, mapped};
  if (kind == MemoryKind::kDevice) S().device_bytes += n;
  return p;
}

cudaError_t Release(void* p, MemoryKind kind) {
  if (p == nullptr) return cudaSuccess;
  DrainAll();  // cudaFree and cudaFreeHost synchronise the device
  size_t mapped = 0;
  {
    std::lock_guard<std::mutex> lock(S().mu);
    auto it = S().blocks.find(reinterpret_cast<uintptr_t>(p));
    if (it == S().blocks.end() || it->second.kind != kind) {
      std::fprintf(stderr, "cuda emulator: %s of %p, which is not the start of a live %s allocation\n",
                   kind == MemoryKind::kDevice ? "cudaFree" : "cudaFreeHost", p,
                   kind == MemoryKind::kDevice ? "device" : "pinned host");
      return cudaErrorInvalidValue;
    }
    if (kind == MemoryKind::kDevice) S().device_bytes -= it->second.bytes;
    mapped = it->second.mapped;
    S().blocks.erase(it);
  }
  if (mapped != 0) {
    munmap(p, mapped);
  } else {
    std::free(p);
  }
  return StickyError();
}

size_t DeviceBytesAllocated() {
  std::lock_guard<std::mutex> lock(S().mu);
  return S().device_bytes;
}

bool Inside(const void* p, size_t bytes, MemoryKind kind, size_t* room, int* device) {
  std::lock_guard<std::mutex> lock(S().mu);
  auto it = FindLocked(p, bytes);
  if (it == S().blocks.end() || it->second.kind != kind) return false;
  if (room != nullptr) {
    *room = it->second.bytes - (reinterpret_cast<uintptr_t>(p) - it->first);
  }
  if (device != nullptr) *device = it->second.device;
  return true;
}

cudaError_t CheckDevice(const void* p, size_t bytes, const char* launcher, const char* arg) {
  int owner = 0;
  if (bytes == 0) return cudaSuccess;
  if (Inside(p, bytes, MemoryKind::kDevice, nullptr, &owner)) {
    if (owner == current_device) return cudaSuccess;
    Fault(cudaErrorIllegalAddress, std::string(launcher) + ": argument '" + arg +
                                       "' is memory of device " + std::to_string(owner) +
                                       ", the launch runs on device " +
                                       std::to_string(current_device));
    return cudaErrorIllegalAddress;
  }
  size_t room = 0;
  const bool device = Inside(p, 1, MemoryKind::kDevice, &room);
  Fault(cudaErrorIllegalAddress,
        std::string(launcher) + ": argument '" + arg + "' needs " + std::to_string(bytes) +
            " bytes at " + std::to_string(reinterpret_cast<uintptr_t>(p)) +
            (device ? ", but its device allocation has only " + std::to_string(room) + " from there"
                    : ", which is not device memory"));
  return cudaErrorIllegalAddress;
}

size_t DeviceRoom(const void* p, size_t elem_bytes) {
  size_t room = 0;
  if (!Inside(p, 1, MemoryKind::kDevice, &room)) return 0;
  return room / elem_bytes;
}

int WorldRankFromEnv() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return 0;
}

cudaError_t InjectedFault(const char* launcher) {
  struct Spec {
    std::string launcher;
    long long at = 0;
  };
  static const Spec spec = [] {
    Spec sp;
    const char* v = std::getenv("DMSRT_CUDA_EMULATOR_FAULT");
    if (v == nullptr) return sp;
    const std::string text(v);
    const size_t a = text.find(':'), b = text.rfind(':');
    if (a == std::string::npos || b == a) return sp;
    if (std::atoi(text.substr(0, a).c_str()) != WorldRankFromEnv()) return sp;
    sp.launcher = text.substr(a + 1, b - a - 1);
    sp.at = std::atoll(text.substr(b + 1).c_str());
    return sp;
  }();
  static std::atomic<long long> seen{0};
  if (spec.at <= 0 || spec.launcher != launcher) return cudaSuccess;
  if (++seen != spec.at) return cudaSuccess;
  Fault(cudaErrorIllegalAddress, std::string(launcher) +
                                     ": injected device fault (DMSRT_CUDA_EMULATOR_FAULT)");
  return cudaErrorIllegalAddress;
}

void Fault(cudaError_t e, const std::string& what) {
  std::fprintf(stderr, "cuda emulator: fault (%s): %s\n", cudaGetErrorName(e), what.c_str());
  std::lock_guard<std::mutex> lock(S().mu);
  if (S().sticky == cudaSuccess) S().sticky = e;
}

cudaError_t StickyError() {
  std::lock_guard<std::mutex> lock(S().mu);
  return S().sticky;
}

cudaStream_t NewStream(bool blocking) {
  auto s = std::make_unique<Stream>();
  s->device = current_device;
  s->blocking = blocking;
  Stream* raw = s.get();
  std::lock_guard<std::mutex> lock(S().mu);
  S().streams.push_back(std::move(s));
  return reinterpret_cast<cudaStream_t>(raw);
}

bool KnownStream(cudaStream_t s) {
  if (Get(s) == &S().legacy) return true;
  std::lock_guard<std::mutex> lock(S().mu);
  for (const auto& p : S().streams) {
    if (reinterpret_cast<cudaStream_t>(p.get()) == s) return true;
  }
  return false;
}

void DeleteStream(cudaStream_t s) {
  Drain(s);  // work queued before a destroy still completes
  std::lock_guard<std::mutex> lock(S().mu);
  auto& v = S().streams;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (reinterpret_cast<cudaStream_t>(it->get()) == s) {
      v.erase(it);
      return;
    }
  }
}

namespace {

void Push(cudaStream_t s, Work w) {
  S().queued.fetch_add(1);
  Stream* st = Get(s);
  std::lock_guard<std::mutex> lock(S().mu);
  st->pending = true;
  if (HostOnly()) return;
  st->work.push_back(std::move(w));
}

// Runs queued work in order; with `stop_unready`, stops in front of an item that is not ready.
// True when the queue is empty.
bool Run(Stream* st, bool stop_unready) {
  for (;;) {
    Work w;
    {
      std::lock_guard<std::mutex> lock(S().mu);
      if (st->work.empty()) return true;
      if (stop_unready && st->work.front().ready && !st->work.front().ready()) return false;
      w = std::move(st->work.front());
      st->work.pop_front();
    }
    // After a fault the device runs nothing more.
    if (StickyError() == cudaSuccess) w.run();
  }
}

}  // namespace

void Enqueue(cudaStream_t s, std::function<void()> work) { Push(s, Work{std::move(work), nullptr}); }

void EnqueueAwaiting(cudaStream_t s, std::function<bool()> ready, std::function<void()> work) {
  Push(s, Work{std::move(work), std::move(ready)});
}

void Drain(cudaStream_t s) {
  Stream* st = Get(s);
  {
    std::lock_guard<std::mutex> lock(S().mu);
    if (st->pending) S().waits.fetch_add(1);
    st->pending = false;
  }
  Run(st, /*stop_unready=*/false);
}

bool Poll(cudaStream_t s) { return Run(Get(s), /*stop_unready=*/true); }

namespace {
std::vector<cudaStream_t> Streams(bool blocking_only) {
  std::lock_guard<std::mutex> lock(S().mu);
  std::vector<cudaStream_t> out;
  for (const auto& p : S().streams) {
    if (!blocking_only || p->blocking) out.push_back(reinterpret_cast<cudaStream_t>(p.get()));
  }
  return out;
}
}  // namespace

void DrainBlocking() {
  for (cudaStream_t s : Streams(true)) Drain(s);
  Drain(nullptr);
}

void DrainAll() {
  for (cudaStream_t s : Streams(false)) Drain(s);
  Drain(nullptr);
}

}  // namespace cuda_emulator
}  // namespace dmsrt
