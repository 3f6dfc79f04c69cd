#include "runtime/model/tensor.h"

namespace dmsrt {

namespace {
struct TypeInfo {
  DType type;
  const char* name;
  int64_t block_size;
  int64_t block_bytes;
  bool supported;
};
// Block sizes and bytes follow GGML's definitions (see kernels/reference/quant.h).
constexpr TypeInfo kTypes[] = {
    {DType::kF32, "F32", 1, 4, true},       {DType::kF16, "F16", 1, 2, true},
    {DType::kBF16, "BF16", 1, 2, true},     {DType::kQ4_0, "Q4_0", 32, 18, true},
    {DType::kQ4_1, "Q4_1", 32, 20, true},   {DType::kQ5_0, "Q5_0", 32, 22, false},
    {DType::kQ5_1, "Q5_1", 32, 24, false},  {DType::kQ8_0, "Q8_0", 32, 34, true},
    {DType::kQ8_1, "Q8_1", 32, 36, false},  {DType::kQ2_K, "Q2_K", 256, 84, false},
    {DType::kQ3_K, "Q3_K", 256, 110, false}, {DType::kQ4_K, "Q4_K", 256, 144, false},
    {DType::kQ5_K, "Q5_K", 256, 176, false}, {DType::kQ6_K, "Q6_K", 256, 210, true},
    {DType::kQ8_K, "Q8_K", 256, 292, false},
};
const TypeInfo* Find(DType t) {
  for (const auto& i : kTypes) {
    if (i.type == t) return &i;
  }
  return nullptr;
}
}  // namespace

std::string DTypeName(DType t) {
  const TypeInfo* i = Find(t);
  return i ? i->name : "type#" + std::to_string(static_cast<int>(t));
}
bool DTypeSupported(DType t) {
  const TypeInfo* i = Find(t);
  return i && i->supported;
}
int64_t BlockSize(DType t) {
  const TypeInfo* i = Find(t);
  return i ? i->block_size : 0;
}
int64_t BlockBytes(DType t) {
  const TypeInfo* i = Find(t);
  return i ? i->block_bytes : 0;
}

}  // namespace dmsrt
