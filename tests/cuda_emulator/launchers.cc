// The launchers of kernels/*.cuh on the emulated device (see emulator.h). Each one checks its
// arguments as the CUDA launcher does, checks that every buffer it will touch is device memory
// of the size the contract implies, and queues the work on its stream. The arithmetic is that of
// the C++ references in kernels/reference/ (bf16 in, fp32 compute, bf16 out); data movement
// copies bits. Index arrays are validated when the work runs, against the pools they address,
// and so are the contracts a GPU would not check (slot writes that race, lengths above the
// promised maximum).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "kernels/decode_attention.cuh"
#include "kernels/dequant.cuh"
#include "kernels/dms.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/gemm.cuh"
#include "kernels/kv_store.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/reference/attention_ref.h"
#include "kernels/reference/dms_ref.h"
#include "kernels/reference/elementwise_ref.h"
#include "kernels/reference/quant.h"
#include "kernels/reference/random_hash.h"
#include "kernels/reference/sampling_ref.h"
#include "kernels/sampling.cuh"
#include "kernels/slot_weights.cuh"
#include "tests/cuda_emulator/emulator.h"

namespace dmsrt {
namespace {

namespace emu = cuda_emulator;
using bf16 = __nv_bfloat16;

float F(bf16 x) { return kernels::Bf16ToFp32(static_cast<__nv_bfloat16_raw>(x).x); }

bf16 B(float f) {
  __nv_bfloat16_raw r;
  r.x = kernels::Fp32ToBf16(f);
  return bf16(r);
}

std::vector<float> ToFloat(const bf16* p, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = F(p[i]);
  return v;
}

void ToBf16(const float* v, size_t n, bf16* p) {
  for (size_t i = 0; i < n; ++i) p[i] = B(v[i]);
}

// The start of every launcher: a faulted device or an unknown stream refuses work.
cudaError_t Begin(cudaStream_t s, const char* launcher) {
  if (emu::StickyError() != cudaSuccess) return emu::StickyError();
  if (!emu::KnownStream(s)) return cudaErrorInvalidResourceHandle;
  // A kernel goes to a stream of the current device.
  if (emu::StreamDevice(s) != emu::CurrentDevice()) return cudaErrorInvalidResourceHandle;
  return emu::InjectedFault(launcher);
}

#define EMU_CHECK(ptr, bytes, arg)                                                   \
  do {                                                                               \
    const cudaError_t emu_e_ = emu::CheckDevice((ptr), (bytes), kName, (arg));       \
    if (emu_e_ != cudaSuccess) return emu_e_;                                        \
  } while (0)

// Bytes of a strided [rows, cols] view with row stride ld.
size_t Strided(int64_t rows, int64_t cols, int64_t ld, size_t elem) {
  if (rows <= 0 || cols <= 0) return 0;
  return static_cast<size_t>((rows - 1) * ld + cols) * elem;
}

cudaError_t Aligned16(const void* p, const char* launcher, const char* arg) {
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) return cudaSuccess;
  emu::Fault(cudaErrorMisalignedAddress,
             std::string(launcher) + ": argument '" + arg + "' is not 16-byte aligned");
  return cudaErrorMisalignedAddress;
}

// Slots a set of paged pools holds (the smallest of the pools given), in whole blocks.
int64_t PoolBlocks(int32_t block_tokens, int32_t head_dim, const void* k_pool, const void* v_pool,
                   const void* pos_pool, const void* last_vis_pool) {
  size_t slots = emu::DeviceRoom(k_pool, static_cast<size_t>(head_dim) * sizeof(bf16));
  slots = std::min(slots, emu::DeviceRoom(v_pool, static_cast<size_t>(head_dim) * sizeof(bf16)));
  if (pos_pool != nullptr) slots = std::min(slots, emu::DeviceRoom(pos_pool, sizeof(int32_t)));
  if (last_vis_pool != nullptr) {
    slots = std::min(slots, emu::DeviceRoom(last_vis_pool, sizeof(int32_t)));
  }
  return static_cast<int64_t>(slots) / block_tokens;
}

// The paged pools gathered into compact fp32 copies of the blocks some tables use, for the
// attention references: tables are rewritten to index the copies.
struct CompactPools {
  std::vector<float> k, v;
  std::vector<int32_t> pos, last_vis;
  std::vector<int32_t> tables;
  bool ok = true;
  std::string error;

  // tables [n_tables, max_blocks]; lengths [n_tables].
  CompactPools(const int32_t* tables_in, const int32_t* lengths, int32_t n_tables,
               int32_t max_blocks, int32_t block_tokens, int32_t head_dim, const bf16* k_pool,
               const bf16* v_pool, const int32_t* pos_pool, const int32_t* last_vis_pool,
               int64_t pool_blocks) {
    tables.assign(tables_in, tables_in + static_cast<size_t>(n_tables) * max_blocks);
    std::map<int32_t, int32_t> remap;
    for (int32_t t = 0; t < n_tables && ok; ++t) {
      const int32_t used = (lengths[t] + block_tokens - 1) / block_tokens;
      for (int32_t i = 0; i < used; ++i) {
        int32_t& b = tables[static_cast<size_t>(t) * max_blocks + i];
        if (b < 0 || b >= pool_blocks) {
          ok = false;
          error = "block table " + std::to_string(t) + " entry " + std::to_string(i) + " = " +
                  std::to_string(b) + " is outside the pool of " + std::to_string(pool_blocks) +
                  " blocks";
          break;
        }
        auto [it, fresh] = remap.emplace(b, static_cast<int32_t>(remap.size()));
        if (fresh) {
          const size_t src = static_cast<size_t>(b) * block_tokens;
          const size_t n = static_cast<size_t>(block_tokens) * head_dim;
          const std::vector<float> kb = ToFloat(k_pool + src * head_dim, n);
          const std::vector<float> vb = ToFloat(v_pool + src * head_dim, n);
          k.insert(k.end(), kb.begin(), kb.end());
          v.insert(v.end(), vb.begin(), vb.end());
          if (pos_pool != nullptr) pos.insert(pos.end(), pos_pool + src, pos_pool + src + block_tokens);
          if (last_vis_pool != nullptr) {
            last_vis.insert(last_vis.end(), last_vis_pool + src, last_vis_pool + src + block_tokens);
          }
        }
        b = it->second;
      }
    }
  }
};

}  // namespace

// ---- elementwise ----------------------------------------------------------------------------

cudaError_t RmsNorm(const bf16* x, const bf16* weight, int32_t rows, int32_t dim, float eps,
                    bf16* out, cudaStream_t stream) {
  static const char* kName = "RmsNorm";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (rows < 0 || dim <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const size_t n = static_cast<size_t>(rows) * dim;
  EMU_CHECK(x, n * sizeof(bf16), "x");
  EMU_CHECK(weight, dim * sizeof(bf16), "weight");
  EMU_CHECK(out, n * sizeof(bf16), "out");
  if (dim % 8 == 0) {
    for (auto [p, a] : {std::pair<const void*, const char*>{x, "x"}, {weight, "weight"}, {out, "out"}}) {
      if (const cudaError_t e = Aligned16(p, kName, a)) return e;
    }
  }
  emu::Enqueue(stream, [=] {
    const std::vector<float> xf = ToFloat(x, n), wf = ToFloat(weight, dim);
    std::vector<float> of(n);
    kernels::RmsNormRef(xf.data(), wf.data(), rows, dim, eps, of.data());
    ToBf16(of.data(), n, out);
  });
  return cudaSuccess;
}

cudaError_t ResidualAdd(bf16* x, const bf16* y, int64_t n, cudaStream_t stream) {
  static const char* kName = "ResidualAdd";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n < 0) return cudaErrorInvalidValue;
  EMU_CHECK(x, n * sizeof(bf16), "x");
  EMU_CHECK(y, n * sizeof(bf16), "y");
  emu::Enqueue(stream, [=] {
    for (int64_t i = 0; i < n; ++i) x[i] = B(F(x[i]) + F(y[i]));
  });
  return cudaSuccess;
}

cudaError_t ResidualAddF32(bf16* x, const float* y, int64_t n, cudaStream_t stream) {
  static const char* kName = "ResidualAddF32";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n < 0) return cudaErrorInvalidValue;
  EMU_CHECK(x, n * sizeof(bf16), "x");
  EMU_CHECK(y, n * sizeof(float), "y");
  emu::Enqueue(stream, [=] {
    for (int64_t i = 0; i < n; ++i) x[i] = B(F(x[i]) + F(B(y[i])));
  });
  return cudaSuccess;
}

cudaError_t SiluMul(const bf16* gate, const bf16* up, int32_t rows, int32_t ffn, int32_t ld_in,
                    bf16* out, int32_t ld_out, cudaStream_t stream) {
  static const char* kName = "SiluMul";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (rows < 0 || ffn <= 0 || ld_in < ffn || ld_out < ffn || rows > 65535) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  EMU_CHECK(gate, Strided(rows, ffn, ld_in, sizeof(bf16)), "gate");
  EMU_CHECK(up, Strided(rows, ffn, ld_in, sizeof(bf16)), "up");
  EMU_CHECK(out, Strided(rows, ffn, ld_out, sizeof(bf16)), "out");
  emu::Enqueue(stream, [=] {
    const size_t nin = Strided(rows, ffn, ld_in, 1);
    const std::vector<float> g = ToFloat(gate, nin), u = ToFloat(up, nin);
    std::vector<float> o(Strided(rows, ffn, ld_out, 1));
    kernels::SiluMulRef(g.data(), u.data(), rows, ffn, ld_in, o.data(), ld_out);
    for (int32_t r = 0; r < rows; ++r) {
      ToBf16(o.data() + static_cast<size_t>(r) * ld_out, ffn, out + static_cast<size_t>(r) * ld_out);
    }
  });
  return cudaSuccess;
}

cudaError_t EmbeddingGather(const bf16* table, int32_t vocab, int32_t hidden, const int32_t* ids,
                            int32_t rows, bf16* out, cudaStream_t stream) {
  static const char* kName = "EmbeddingGather";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (rows < 0 || hidden <= 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  EMU_CHECK(table, static_cast<size_t>(vocab) * hidden * sizeof(bf16), "table");
  EMU_CHECK(ids, rows * sizeof(int32_t), "ids");
  EMU_CHECK(out, static_cast<size_t>(rows) * hidden * sizeof(bf16), "out");
  emu::Enqueue(stream, [=] {
    for (int32_t r = 0; r < rows; ++r) {
      bf16* o = out + static_cast<size_t>(r) * hidden;
      if (ids[r] < 0 || ids[r] >= vocab) {
        std::fill(o, o + hidden, B(0.f));
      } else {
        std::memmove(o, table + static_cast<size_t>(ids[r]) * hidden, hidden * sizeof(bf16));
      }
    }
  });
  return cudaSuccess;
}

// ---- GEMM (the cuBLAS call of kernels/gemm.cu) -------------------------------------------------

cudaError_t GemmBf16(cublasHandle_t handle, int32_t m, int32_t n, int32_t k, const bf16* a,
                     int32_t lda, const bf16* w, int32_t ldw, void* c, int32_t ldc,
                     GemmOut out_type, float alpha, float beta, cudaStream_t stream) {
  static const char* kName = "GemmBf16";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (handle == nullptr || m < 0 || n < 0 || k <= 0 || lda < k || ldw < k || ldc < n) {
    return cudaErrorInvalidValue;
  }
  if (m == 0 || n == 0) return cudaSuccess;
  const size_t esz = out_type == GemmOut::kF32 ? sizeof(float) : sizeof(bf16);
  EMU_CHECK(a, Strided(m, k, lda, sizeof(bf16)), "a");
  EMU_CHECK(w, Strided(n, k, ldw, sizeof(bf16)), "w");
  EMU_CHECK(c, Strided(m, n, ldc, esz), "c");
  emu::Enqueue(stream, [=] {
    std::vector<float> af(static_cast<size_t>(m) * k), wf(static_cast<size_t>(n) * k);
    for (int32_t i = 0; i < m; ++i) {
      for (int32_t x = 0; x < k; ++x) af[static_cast<size_t>(i) * k + x] = F(a[static_cast<size_t>(i) * lda + x]);
    }
    for (int32_t j = 0; j < n; ++j) {
      for (int32_t x = 0; x < k; ++x) wf[static_cast<size_t>(j) * k + x] = F(w[static_cast<size_t>(j) * ldw + x]);
    }
    for (int32_t i = 0; i < m; ++i) {
      for (int32_t j = 0; j < n; ++j) {
        const float* ar = af.data() + static_cast<size_t>(i) * k;
        const float* wr = wf.data() + static_cast<size_t>(j) * k;
        float acc = 0.f;
        for (int32_t x = 0; x < k; ++x) acc += ar[x] * wr[x];
        const size_t o = static_cast<size_t>(i) * ldc + j;
        if (out_type == GemmOut::kF32) {
          float* cf = static_cast<float*>(c);
          cf[o] = alpha * acc + (beta != 0.f ? beta * cf[o] : 0.f);
        } else {
          bf16* cb = static_cast<bf16*>(c);
          cb[o] = B(alpha * acc + (beta != 0.f ? beta * F(cb[o]) : 0.f));
        }
      }
    }
  });
  return cudaSuccess;
}

// ---- KV store data movement ------------------------------------------------------------------

cudaError_t KvCopyBlocks(const int32_t* pairs, int32_t n, int32_t block_tokens, int32_t head_dim,
                         bf16* k_pool, bf16* v_pool, int32_t* pos_pool, int32_t* last_vis_pool,
                         cudaStream_t stream) {
  static const char* kName = "KvCopyBlocks";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n < 0 || block_tokens <= 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  EMU_CHECK(pairs, 2 * n * sizeof(int32_t), "pairs");
  emu::Enqueue(stream, [=] {
    const int64_t blocks = PoolBlocks(block_tokens, head_dim, k_pool, v_pool, pos_pool, last_vis_pool);
    std::set<int32_t> src, dst;
    for (int32_t i = 0; i < n; ++i) {
      const int32_t s = pairs[2 * i], d = pairs[2 * i + 1];
      if (s < 0 || s >= blocks || d < 0 || d >= blocks) {
        emu::Fault(cudaErrorIllegalAddress, "KvCopyBlocks: pair " + std::to_string(i) + " (" +
                                                std::to_string(s) + " -> " + std::to_string(d) +
                                                ") outside a pool of " + std::to_string(blocks) +
                                                " blocks");
        return;
      }
      src.insert(s);
      if (!dst.insert(d).second) {
        emu::Fault(cudaErrorIllegalAddress, "KvCopyBlocks: block " + std::to_string(d) +
                                                " is the destination of two copies (a race)");
        return;
      }
    }
    for (int32_t d : dst) {
      if (src.count(d) != 0) {
        emu::Fault(cudaErrorIllegalAddress, "KvCopyBlocks: block " + std::to_string(d) +
                                                " is both a source and a destination (a race)");
        return;
      }
    }
    const size_t kv = static_cast<size_t>(block_tokens) * head_dim;
    for (int32_t i = 0; i < n; ++i) {
      const size_t s = pairs[2 * i], d = pairs[2 * i + 1];
      std::memcpy(k_pool + d * kv, k_pool + s * kv, kv * sizeof(bf16));
      std::memcpy(v_pool + d * kv, v_pool + s * kv, kv * sizeof(bf16));
      std::memcpy(pos_pool + d * block_tokens, pos_pool + s * block_tokens, block_tokens * sizeof(int32_t));
      std::memcpy(last_vis_pool + d * block_tokens, last_vis_pool + s * block_tokens,
                  block_tokens * sizeof(int32_t));
    }
  });
  return cudaSuccess;
}

cudaError_t KvWriteSlots(const int32_t* writes, int32_t n, const bf16* k, const bf16* v,
                         int32_t n_kv_heads, int32_t head_dim, bf16* k_pool, bf16* v_pool,
                         int32_t* pos_pool, cudaStream_t stream) {
  static const char* kName = "KvWriteSlots";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n < 0 || n_kv_heads <= 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  EMU_CHECK(writes, 4 * n * sizeof(int32_t), "writes");
  emu::Enqueue(stream, [=] {
    const size_t row_elems = static_cast<size_t>(n_kv_heads) * head_dim;
    const int64_t rows = static_cast<int64_t>(
        std::min(emu::DeviceRoom(k, row_elems * sizeof(bf16)), emu::DeviceRoom(v, row_elems * sizeof(bf16))));
    const int64_t slots = PoolBlocks(1, head_dim, k_pool, v_pool, pos_pool, nullptr);
    std::set<int32_t> seen;
    for (int32_t i = 0; i < n; ++i) {
      const int32_t* w = writes + 4 * i;
      if (w[0] < 0 || w[0] >= rows || w[1] < 0 || w[1] >= n_kv_heads || w[2] < 0 || w[2] >= slots) {
        emu::Fault(cudaErrorIllegalAddress,
                   "KvWriteSlots: write " + std::to_string(i) + " (row " + std::to_string(w[0]) +
                       ", head " + std::to_string(w[1]) + ", slot " + std::to_string(w[2]) +
                       ") outside " + std::to_string(rows) + " rows / " + std::to_string(slots) +
                       " slots");
        return;
      }
      if (!seen.insert(w[2]).second) {
        emu::Fault(cudaErrorIllegalAddress, "KvWriteSlots: slot " + std::to_string(w[2]) +
                                                " written twice in one call (a race)");
        return;
      }
    }
    for (int32_t i = 0; i < n; ++i) {
      const int32_t* w = writes + 4 * i;
      const size_t src = static_cast<size_t>(w[0]) * row_elems + static_cast<size_t>(w[1]) * head_dim;
      const size_t dst = static_cast<size_t>(w[2]) * head_dim;
      std::memcpy(k_pool + dst, k + src, head_dim * sizeof(bf16));
      std::memcpy(v_pool + dst, v + src, head_dim * sizeof(bf16));
      pos_pool[w[2]] = w[3];
    }
  });
  return cudaSuccess;
}

cudaError_t KvScatterInt32(const int32_t* pairs, int32_t n, bool use_fill, int32_t fill,
                           int32_t* dst, cudaStream_t stream) {
  static const char* kName = "KvScatterInt32";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  EMU_CHECK(pairs, 2 * n * sizeof(int32_t), "pairs");
  emu::Enqueue(stream, [=] {
    const int64_t room = static_cast<int64_t>(emu::DeviceRoom(dst, sizeof(int32_t)));
    for (int32_t i = 0; i < n; ++i) {
      if (pairs[2 * i] < 0 || pairs[2 * i] >= room) {
        emu::Fault(cudaErrorIllegalAddress, "KvScatterInt32: index " + std::to_string(pairs[2 * i]) +
                                                " outside " + std::to_string(room));
        return;
      }
    }
    for (int32_t i = 0; i < n; ++i) dst[pairs[2 * i]] = use_fill ? fill : pairs[2 * i + 1];
  });
  return cudaSuccess;
}

cudaError_t AddBiasRows(bf16* x, const bf16* bias, int32_t rows, int32_t cols, int32_t ld,
                        cudaStream_t stream) {
  static const char* kName = "AddBiasRows";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (rows < 0 || cols < 0 || ld < cols) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  EMU_CHECK(x, Strided(rows, cols, ld, sizeof(bf16)), "x");
  EMU_CHECK(bias, cols * sizeof(bf16), "bias");
  emu::Enqueue(stream, [=] {
    for (int32_t r = 0; r < rows; ++r) {
      for (int32_t c = 0; c < cols; ++c) {
        bf16& e = x[static_cast<size_t>(r) * ld + c];
        e = B(F(e) + F(bias[c]));
      }
    }
  });
  return cudaSuccess;
}

cudaError_t FillRandomBf16(bf16* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  static const char* kName = "FillRandomBf16";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n < 0) return cudaErrorInvalidValue;
  EMU_CHECK(dst, n * sizeof(bf16), "dst");
  emu::Enqueue(stream, [=] {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = B(scale * kernels::HashUniformSigned(seed, static_cast<uint64_t>(i)));
    }
  });
  return cudaSuccess;
}

// ---- attention ---------------------------------------------------------------------------------

namespace {

// What DecodeAttention and DecodeSlotWeights check at the launch: the shape, and that q, the
// tables (or table rows) and the lengths are device memory of the size the contract implies.
cudaError_t CheckDecodeLaunch(const DecodeAttentionParams& p, const char* name, const bf16* q,
                              const int32_t* block_tables, const int32_t* lengths) {
  if (p.batch <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.n_heads / p.n_kv_heads > 8 || p.block_tokens <= 0 || p.max_blocks_per_head <= 0 ||
      p.max_length < 0 || p.max_length > p.block_tokens * p.max_blocks_per_head ||
      (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)) {
    return cudaErrorInvalidValue;
  }
  const size_t qn = static_cast<size_t>(p.batch) * p.n_heads * p.head_dim;
  const size_t heads = static_cast<size_t>(p.batch) * p.n_kv_heads;
  const char* kName = name;
  EMU_CHECK(q, qn * sizeof(bf16), "q");
  if (p.table_rows == nullptr) {
    EMU_CHECK(block_tables, heads * p.max_blocks_per_head * sizeof(int32_t), "block_tables");
  } else {
    EMU_CHECK(p.table_rows, p.batch * sizeof(int32_t), "table_rows");
  }
  EMU_CHECK(lengths, heads * sizeof(int32_t), "lengths");
  return cudaSuccess;
}

// When the work runs: every length within [0, max_length], and the q rows and compacted pools
// of the batch's heads (row b's tables gathered from table row table_rows[b] when rows are
// indirect). Faults and returns false on a bad index.
bool DecodeOperands(const DecodeAttentionParams& p, const char* name, const bf16* q,
                    const bf16* k_pool, const bf16* v_pool, const int32_t* block_tables,
                    const int32_t* lengths, std::vector<float>* qf,
                    std::unique_ptr<CompactPools>* pools) {
  const size_t heads = static_cast<size_t>(p.batch) * p.n_kv_heads;
  for (size_t h = 0; h < heads; ++h) {
    if (lengths[h] < 0 || lengths[h] > p.max_length) {
      emu::Fault(cudaErrorIllegalAddress,
                 std::string(name) + ": length " + std::to_string(lengths[h]) + " of head " +
                     std::to_string(h) + " is outside [0, max_length = " +
                     std::to_string(p.max_length) + "] (the split plan would drop keys)");
      return false;
    }
  }
  const size_t row_ints = static_cast<size_t>(p.n_kv_heads) * p.max_blocks_per_head;
  std::vector<int32_t> gathered;
  const int32_t* tables = block_tables;
  if (p.table_rows != nullptr) {
    gathered.resize(p.batch * row_ints);
    for (int32_t b = 0; b < p.batch; ++b) {
      const int32_t r = p.table_rows[b];
      const int32_t* src = block_tables + static_cast<size_t>(r) * row_ints;
      if (r < 0 || !emu::Inside(src, row_ints * sizeof(int32_t), emu::MemoryKind::kDevice)) {
        emu::Fault(cudaErrorIllegalAddress, std::string(name) + ": table row " +
                                                std::to_string(r) + " of batch row " +
                                                std::to_string(b) + " is outside block_tables");
        return false;
      }
      std::copy(src, src + row_ints, gathered.begin() + b * row_ints);
    }
    tables = gathered.data();
  }
  const int64_t blocks = PoolBlocks(p.block_tokens, p.head_dim, k_pool, v_pool, nullptr, nullptr);
  *pools = std::make_unique<CompactPools>(tables, lengths, static_cast<int32_t>(heads),
                                          p.max_blocks_per_head, p.block_tokens, p.head_dim,
                                          k_pool, v_pool, nullptr, nullptr, blocks);
  if (!(*pools)->ok) {
    emu::Fault(cudaErrorIllegalAddress, std::string(name) + ": " + (*pools)->error);
    return false;
  }
  *qf = ToFloat(q, static_cast<size_t>(p.batch) * p.n_heads * p.head_dim);
  return true;
}

}  // namespace

cudaError_t DecodeAttention(const DecodeAttentionParams& p, const bf16* q, const bf16* k_pool,
                            const bf16* v_pool, const int32_t* block_tables,
                            const int32_t* lengths, bf16* out, void* workspace,
                            size_t workspace_bytes, int32_t num_sms, cudaStream_t stream) {
  static const char* kName = "DecodeAttention";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (const cudaError_t e = CheckDecodeLaunch(p, kName, q, block_tables, lengths)) return e;
  const size_t ws = DecodeAttentionWorkspaceSize(p, num_sms);
  if (workspace_bytes < ws) return cudaErrorInvalidValue;
  const size_t qn = static_cast<size_t>(p.batch) * p.n_heads * p.head_dim;
  EMU_CHECK(out, qn * sizeof(bf16), "out");
  EMU_CHECK(workspace, ws, "workspace");
  for (auto [ptr, a] : {std::pair<const void*, const char*>{q, "q"}, {k_pool, "k_pool"}, {v_pool, "v_pool"}}) {
    if (const cudaError_t e = Aligned16(ptr, kName, a)) return e;
  }
  emu::Enqueue(stream, [=] {
    std::vector<float> qf;
    std::unique_ptr<CompactPools> c;
    if (!DecodeOperands(p, kName, q, k_pool, v_pool, block_tables, lengths, &qf, &c)) return;
    std::vector<float> of(qn);
    kernels::DecodeAttentionRef(p.batch, p.n_heads, p.n_kv_heads, p.head_dim, p.block_tokens,
                                p.max_blocks_per_head, p.scale, qf.data(), c->k.data(), c->v.data(),
                                c->tables.data(), lengths, of.data());
    ToBf16(of.data(), qn, out);
  });
  return cudaSuccess;
}

cudaError_t DecodeSlotWeights(const DecodeAttentionParams& p, const bf16* q, const bf16* k_pool,
                              const int32_t* block_tables, const int32_t* lengths, float* out,
                              int32_t ld, cudaStream_t stream) {
  static const char* kName = "DecodeSlotWeights";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (ld <= 0) return cudaErrorInvalidValue;
  if (const cudaError_t e = CheckDecodeLaunch(p, kName, q, block_tables, lengths)) return e;
  const size_t heads = static_cast<size_t>(p.batch) * p.n_kv_heads;
  EMU_CHECK(out, heads * ld * sizeof(float), "out");
  for (auto [ptr, a] : {std::pair<const void*, const char*>{q, "q"}, {k_pool, "k_pool"}}) {
    if (const cudaError_t e = Aligned16(ptr, kName, a)) return e;
  }
  emu::Enqueue(stream, [=] {
    std::vector<float> qf;
    std::unique_ptr<CompactPools> c;
    if (!DecodeOperands(p, kName, q, k_pool, k_pool, block_tables, lengths, &qf, &c)) return;
    kernels::DecodeSlotWeightsRef(p.batch, p.n_heads, p.n_kv_heads, p.head_dim, p.block_tokens,
                                  p.max_blocks_per_head, p.scale, qf.data(), c->k.data(),
                                  c->tables.data(), lengths, out, ld);
  });
  return cudaSuccess;
}

cudaError_t PrefillAttention(const PrefillAttentionParams& p, const bf16* q, const bf16* k_new,
                             const bf16* v_new, const int32_t* last_vis_new, const bf16* k_pool,
                             const bf16* v_pool, const int32_t* pos_pool,
                             const int32_t* last_vis_pool, const int32_t* block_table,
                             const int32_t* old_lengths, bf16* out, cudaStream_t stream) {
  static const char* kName = "PrefillAttention";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (p.n_queries <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.block_tokens <= 0 || p.max_blocks_per_head <= 0 || p.q_pos0 < 0 ||
      (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)) {
    return cudaErrorInvalidValue;
  }
  const size_t qn = static_cast<size_t>(p.n_queries) * p.n_heads * p.head_dim;
  const size_t kn = static_cast<size_t>(p.n_queries) * p.n_kv_heads * p.head_dim;
  EMU_CHECK(q, qn * sizeof(bf16), "q");
  EMU_CHECK(k_new, kn * sizeof(bf16), "k_new");
  EMU_CHECK(v_new, kn * sizeof(bf16), "v_new");
  EMU_CHECK(last_vis_new, static_cast<size_t>(p.n_queries) * p.n_kv_heads * sizeof(int32_t), "last_vis_new");
  EMU_CHECK(block_table, static_cast<size_t>(p.n_kv_heads) * p.max_blocks_per_head * sizeof(int32_t), "block_table");
  EMU_CHECK(old_lengths, p.n_kv_heads * sizeof(int32_t), "old_lengths");
  EMU_CHECK(out, qn * sizeof(bf16), "out");
  emu::Enqueue(stream, [=] {
    for (int32_t j = 0; j < p.n_kv_heads; ++j) {
      if (old_lengths[j] < 0 || old_lengths[j] > p.block_tokens * p.max_blocks_per_head) {
        emu::Fault(cudaErrorIllegalAddress, "PrefillAttention: old length " +
                                                std::to_string(old_lengths[j]) + " of head " +
                                                std::to_string(j) + " exceeds its block table");
        return;
      }
    }
    const int64_t blocks =
        PoolBlocks(p.block_tokens, p.head_dim, k_pool, v_pool, pos_pool, last_vis_pool);
    CompactPools c(block_table, old_lengths, p.n_kv_heads, p.max_blocks_per_head, p.block_tokens,
                   p.head_dim, k_pool, v_pool, pos_pool, last_vis_pool, blocks);
    if (!c.ok) {
      emu::Fault(cudaErrorIllegalAddress, "PrefillAttention: " + c.error);
      return;
    }
    const std::vector<float> qf = ToFloat(q, qn), kf = ToFloat(k_new, kn), vf = ToFloat(v_new, kn);
    std::vector<float> of(qn);
    kernels::PrefillAttentionRef(p.n_queries, p.q_pos0, p.n_heads, p.n_kv_heads, p.head_dim,
                                 p.block_tokens, p.max_blocks_per_head, p.scale, qf.data(),
                                 kf.data(), vf.data(), last_vis_new, c.k.data(), c.v.data(),
                                 c.pos.data(), c.last_vis.data(), c.tables.data(), old_lengths,
                                 of.data());
    ToBf16(of.data(), qn, out);
  });
  return cudaSuccess;
}

// ---- DMS decisions and RoPE --------------------------------------------------------------------

cudaError_t RopeDmsVariantA(const RopeDmsParams& p, const int32_t* positions, bf16* q, bf16* k,
                            uint8_t* bits, cudaStream_t stream) {
  static const char* kName = "RopeDmsVariantA";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (p.n_tokens <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.head_dim <= 0 || p.head_dim % 2 != 0 || p.head_dim > 2048 ||
      (p.decide && bits == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const size_t qn = static_cast<size_t>(p.n_tokens) * p.n_heads * p.head_dim;
  const size_t kn = static_cast<size_t>(p.n_tokens) * p.n_kv_heads * p.head_dim;
  EMU_CHECK(positions, p.n_tokens * sizeof(int32_t), "positions");
  EMU_CHECK(q, qn * sizeof(bf16), "q");
  if (k != nullptr) EMU_CHECK(k, kn * sizeof(bf16), "k");
  if (p.decide) EMU_CHECK(bits, static_cast<size_t>(p.n_tokens) * p.n_kv_heads, "bits");
  emu::Enqueue(stream, [=] {
    std::vector<float> qf = ToFloat(q, qn);
    std::vector<float> kf = k != nullptr ? ToFloat(k, kn) : std::vector<float>();
    kernels::RopeDmsVariantARef(p.n_tokens, p.n_heads, p.n_kv_heads, p.head_dim, p.theta,
                                p.decide, p.alpha_scale, p.alpha_offset, p.alpha_per_layer,
                                positions, qf.data(), k != nullptr ? kf.data() : nullptr, bits,
                                p.scaling);
    ToBf16(qf.data(), qn, q);
    if (k != nullptr) ToBf16(kf.data(), kn, k);
  });
  return cudaSuccess;
}

cudaError_t DmsThreshold(int32_t n_tokens, int32_t n_kv_heads, const float* logits, int32_t ld,
                         const float* bias, float alpha_scale, float alpha_offset,
                         bool alpha_per_layer, uint8_t* bits, cudaStream_t stream) {
  static const char* kName = "DmsThreshold";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (n_tokens <= 0 || n_kv_heads <= 0 || ld < (alpha_per_layer ? 1 : n_kv_heads)) {
    return cudaErrorInvalidValue;
  }
  EMU_CHECK(logits, Strided(n_tokens, alpha_per_layer ? 1 : n_kv_heads, ld, sizeof(float)), "logits");
  EMU_CHECK(bits, static_cast<size_t>(n_tokens) * n_kv_heads, "bits");
  if (bias != nullptr) EMU_CHECK(bias, (alpha_per_layer ? 1 : n_kv_heads) * sizeof(float), "bias");
  emu::Enqueue(stream, [=] {
    kernels::DmsThresholdRef(n_tokens, n_kv_heads, logits, ld, bias, alpha_scale, alpha_offset,
                             alpha_per_layer, bits);
  });
  return cudaSuccess;
}

// ---- sampling and dequantization -------------------------------------------------------------

cudaError_t SampleTokens(const float* logits, int32_t rows, int32_t vocab, int32_t ld,
                         const DeviceSamplingParams* params, int32_t* tokens, float* logprobs,
                         cudaStream_t stream) {
  static const char* kName = "SampleTokens";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  if (rows < 0 || vocab <= 0 || ld < vocab) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  EMU_CHECK(logits, Strided(rows, vocab, ld, sizeof(float)), "logits");
  EMU_CHECK(params, rows * sizeof(DeviceSamplingParams), "params");
  EMU_CHECK(tokens, rows * sizeof(int32_t), "tokens");
  if (logprobs != nullptr) EMU_CHECK(logprobs, rows * sizeof(float), "logprobs");
  emu::Enqueue(stream, [=] {
    for (int32_t r = 0; r < rows; ++r) {
      const float* row = logits + static_cast<size_t>(r) * ld;
      tokens[r] = kernels::SampleRowRef(row, vocab, params[r]);
      if (logprobs != nullptr) logprobs[r] = kernels::LogProbRef(row, vocab, tokens[r]);
    }
  });
  return cudaSuccess;
}

cudaError_t DequantizeToBf16(int ggml_type, const void* src, int64_t rows, int64_t cols, bf16* dst,
                             cudaStream_t stream) {
  static const char* kName = "DequantizeToBf16";
  if (const cudaError_t e = Begin(stream, kName)) return e;
  namespace q = kernels;
  const bool supported = ggml_type == q::kTypeF32 || ggml_type == q::kTypeF16 ||
                         ggml_type == q::kTypeBF16 || ggml_type == q::kTypeQ4_0 ||
                         ggml_type == q::kTypeQ4_1 || ggml_type == q::kTypeQ8_0 ||
                         ggml_type == q::kTypeQ6_K;
  if (!supported || rows < 0 || cols <= 0 || cols % q::QuantBlockSize(ggml_type) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const size_t row_bytes = static_cast<size_t>(q::QuantRowBytes(ggml_type, cols));
  EMU_CHECK(src, rows * row_bytes, "src");
  EMU_CHECK(dst, static_cast<size_t>(rows * cols) * sizeof(bf16), "dst");
  emu::Enqueue(stream, [=] {
    std::vector<float> row(cols);
    for (int64_t r = 0; r < rows; ++r) {
      q::DequantizeRow(ggml_type, static_cast<const char*>(src) + r * row_bytes, row.data(), cols);
      ToBf16(row.data(), cols, dst + r * cols);
    }
  });
  return cudaSuccess;
}

}  // namespace dmsrt
