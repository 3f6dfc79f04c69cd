// libFuzzer target for the safetensors header parser: any byte string must parse or fail with a
// status; on success the first and last byte of every tensor view must be readable.
#include <cstddef>
#include <cstdint>

#include "runtime/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = dmsrt::SafetensorsFile::FromBytes(data, size, "fuzz.safetensors");
  if (!f.ok()) return 0;
  uint32_t sum = 0;
  for (const auto& t : (*f)->tensors()) {
    dmsrt::WeightTensor w = (*f)->View(t);
    if (w.nbytes > 0) sum += w.data[0] + w.data[w.nbytes - 1];
  }
  for (const auto& kv : (*f)->metadata()) sum += static_cast<uint32_t>(kv.second.size());
  volatile uint32_t sink = sum;
  (void)sink;
  return 0;
}
