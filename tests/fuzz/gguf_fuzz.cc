// libFuzzer target for the GGUF reader: any byte string must parse into a valid file or fail
// with a status; on success every metadata getter and every byte of every tensor view must be
// readable (AddressSanitizer checks the bounds, the buffer is copied to an exact-size block).
#include <cstddef>
#include <cstdint>

#include "runtime/model/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = dmsrt::GgufFile::FromBytes(data, size, "fuzz.gguf");
  if (!f.ok()) return 0;
  const dmsrt::GgufFile& g = **f;
  for (const std::string& k : g.keys()) {
    (void)g.GetString(k);
    (void)g.GetInt(k);
    (void)g.GetFloat(k);
    (void)g.GetBool(k);
    (void)g.GetStringArray(k);
    (void)g.GetInt32Array(k);
    (void)g.GetFloatArray(k);
  }
  uint32_t sum = 0;
  for (const dmsrt::GgufTensorInfo& t : g.tensors()) {
    dmsrt::WeightTensor w = g.View(t);
    if (w.nbytes > 0) sum += w.data[0] + w.data[w.nbytes - 1];
    if (w.rows > 0) sum += *w.row(w.rows - 1);
  }
  volatile uint32_t sink = sum;
  (void)sink;
  return 0;
}
