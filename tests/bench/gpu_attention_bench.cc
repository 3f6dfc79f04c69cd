// GPU kernel benchmark: decode attention over the per-head paged store against the measured
// device copy bandwidth, the DMS effect (forced-eviction resident lengths vs dense), prefill
// attention, and device sampling. Times with CUDA events, L2 flushed (a 256 MiB memset)
// before every repetition, median and spread over the repetitions. Prints a table and writes
// JSON (--json PATH).
//
// Decode bytes = bytes of K and V actually resident and read: Σ lengths * head_dim * 2 * 2.
// Copy bandwidth counts bytes read plus bytes written of a 2 GiB device-to-device copy.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/decode_attention.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/sampling.cuh"

namespace dmsrt {
namespace {

#define BENCH_CHECK(expr)                                                             \
  do {                                                                                \
    const cudaError_t e_ = (expr);                                                    \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

struct Stats {
  double median_ms = 0, min_ms = 0, max_ms = 0;
};

Stats Summarise(std::vector<float> ms) {
  std::sort(ms.begin(), ms.end());
  Stats s;
  s.median_ms = ms[ms.size() / 2];
  s.min_ms = ms.front();
  s.max_ms = ms.back();
  return s;
}

class Timer {
 public:
  Timer() {
    BENCH_CHECK(cudaEventCreate(&a_));
    BENCH_CHECK(cudaEventCreate(&b_));
    BENCH_CHECK(cudaMalloc(&flush_, kFlushBytes));
  }
  ~Timer() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
    cudaFree(flush_);
  }
  // Runs fn `reps` times after `warmup` runs; L2 flushed before each timed run.
  template <typename Fn>
  Stats Time(Fn fn, int reps, int warmup = 3) {
    for (int i = 0; i < warmup; ++i) fn();
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int i = 0; i < reps; ++i) {
      BENCH_CHECK(cudaMemsetAsync(flush_, i & 0xff, kFlushBytes));
      BENCH_CHECK(cudaEventRecord(a_));
      fn();
      BENCH_CHECK(cudaEventRecord(b_));
      BENCH_CHECK(cudaEventSynchronize(b_));
      float t = 0;
      BENCH_CHECK(cudaEventElapsedTime(&t, a_, b_));
      ms.push_back(t);
    }
    return Summarise(ms);
  }

 private:
  static constexpr size_t kFlushBytes = 256ull << 20;
  cudaEvent_t a_, b_;
  void* flush_ = nullptr;
};

size_t g_peak_used = 0;
void NotePeak() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) g_peak_used = std::max(g_peak_used, total_b - free_b);
}

void FillRandomBf16(__nv_bfloat16* d, size_t n, uint32_t seed) {
  std::vector<__nv_bfloat16> h(std::min<size_t>(n, 1 << 22));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : h) x = __float2bfloat16(nd(rng));
  for (size_t off = 0; off < n; off += h.size()) {
    const size_t cnt = std::min(h.size(), n - off);
    BENCH_CHECK(cudaMemcpy(d + off, h.data(), cnt * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  }
}

struct DecodeResult {
  int batch, heads, kv, dim, block;
  int64_t dense_len;
  int64_t resident_len;
  int splits;
  Stats st;
  double gbps;
};

// One decode-attention configuration: every (sequence, KV head) holds `len` resident slots in
// shuffled blocks.
DecodeResult BenchDecode(Timer& timer, int batch, int heads, int kv, int dim, int block,
                         int64_t dense_len, int64_t len, int reps, int sms, int split = 0) {
  const int max_blocks = static_cast<int>((len + block - 1) / block);
  const size_t num_blocks = static_cast<size_t>(batch) * kv * max_blocks;
  const size_t pool_elems = num_blocks * block * dim;
  __nv_bfloat16 *k, *v, *q, *out;
  BENCH_CHECK(cudaMalloc(&k, pool_elems * 2));
  BENCH_CHECK(cudaMalloc(&v, pool_elems * 2));
  BENCH_CHECK(cudaMalloc(&q, static_cast<size_t>(batch) * heads * dim * 2));
  BENCH_CHECK(cudaMalloc(&out, static_cast<size_t>(batch) * heads * dim * 2));
  FillRandomBf16(k, pool_elems, 1);
  FillRandomBf16(v, pool_elems, 2);
  FillRandomBf16(q, static_cast<size_t>(batch) * heads * dim, 3);
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(4));
  std::vector<int32_t> lengths(static_cast<size_t>(batch) * kv, static_cast<int32_t>(len));
  int32_t *d_tab, *d_len;
  BENCH_CHECK(cudaMalloc(&d_tab, perm.size() * 4));
  BENCH_CHECK(cudaMalloc(&d_len, lengths.size() * 4));
  BENCH_CHECK(cudaMemcpy(d_tab, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(d_len, lengths.data(), lengths.size() * 4, cudaMemcpyHostToDevice));
  DecodeAttentionParams p;
  p.batch = batch;
  p.n_heads = heads;
  p.n_kv_heads = kv;
  p.head_dim = dim;
  p.block_tokens = block;
  p.max_blocks_per_head = max_blocks;
  p.max_length = static_cast<int32_t>(len);
  p.scale = 1.f / std::sqrt(static_cast<float>(dim));
  p.split_tokens = split;
  const size_t ws_bytes = DecodeAttentionWorkspaceSize(p, sms);
  void* ws = nullptr;
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&ws, ws_bytes));
  NotePeak();
  DecodeResult r{batch, heads, kv, dim, block, dense_len, len, DecodeAttentionNumSplits(p, sms), {}, 0};
  r.st = timer.Time([&] {
    BENCH_CHECK(DecodeAttention(p, q, k, v, d_tab, d_len, out, ws, ws_bytes, sms, nullptr));
  }, reps);
  const double bytes = static_cast<double>(batch) * kv * len * dim * 2 * 2;
  r.gbps = bytes / (r.st.median_ms * 1e-3) / 1e9;
  cudaFree(k); cudaFree(v); cudaFree(q); cudaFree(out); cudaFree(d_tab); cudaFree(d_len);
  if (ws) cudaFree(ws);
  return r;
}

std::string Json(const DecodeResult& r) {
  std::ostringstream o;
  o << "{\"batch\":" << r.batch << ",\"heads\":" << r.heads << ",\"kv_heads\":" << r.kv
    << ",\"head_dim\":" << r.dim << ",\"block_tokens\":" << r.block << ",\"dense_len\":" << r.dense_len
    << ",\"resident_len\":" << r.resident_len << ",\"splits\":" << r.splits
    << ",\"median_ms\":" << r.st.median_ms << ",\"min_ms\":" << r.st.min_ms
    << ",\"max_ms\":" << r.st.max_ms << ",\"gbps\":" << r.gbps << "}";
  return o.str();
}

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) {
  using namespace dmsrt;
  std::string json_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  int dev = 0, sms = 0, count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "gpu_attention_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, dev));
  sms = prop.multiProcessorCount;
  std::printf("device: %s, %d SMs, L2 %d MiB, %.1f GiB\n", prop.name, sms, prop.l2CacheSize >> 20,
              prop.totalGlobalMem / 1073741824.0);
  Timer timer;
  const int reps = quick ? 5 : 15;

  // Copy ceiling: 2 GiB device-to-device, bytes read + written.
  const size_t copy_bytes = 2ull << 30;
  void *src, *dst;
  BENCH_CHECK(cudaMalloc(&src, copy_bytes));
  BENCH_CHECK(cudaMalloc(&dst, copy_bytes));
  BENCH_CHECK(cudaMemset(src, 0x5a, copy_bytes));
  NotePeak();
  const Stats cs = timer.Time([&] { BENCH_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbps = 2.0 * copy_bytes / (cs.median_ms * 1e-3) / 1e9;
  cudaFree(src);
  cudaFree(dst);
  std::printf("copy D2D: %.1f GB/s (read+write, median of 10, %.3f..%.3f ms)\n", copy_gbps, cs.min_ms, cs.max_ms);

  std::vector<DecodeResult> sweep;
  const std::vector<int> batches = quick ? std::vector<int>{1, 16} : std::vector<int>{1, 8, 32, 64};
  const std::vector<int64_t> lens = quick ? std::vector<int64_t>{1024, 8192}
                                          : std::vector<int64_t>{1024, 4096, 8192, 16384, 32768};
  std::printf("\ndecode attention, 32 heads / 8 KV heads, head_dim 128, block 16\n");
  std::printf("%6s %7s %6s %10s %10s %10s %9s %7s\n", "batch", "len", "splits", "median_ms",
              "min_ms", "max_ms", "GB/s", "%copy");
  for (int b : batches) {
    for (int64_t L : lens) {
      const DecodeResult r = BenchDecode(timer, b, 32, 8, 128, 16, L, L, reps, sms);
      std::printf("%6d %7lld %6d %10.4f %10.4f %10.4f %9.1f %6.1f%%\n", b, (long long)L, r.splits,
                  r.st.median_ms, r.st.min_ms, r.st.max_ms, r.gbps, 100 * r.gbps / copy_gbps);
      sweep.push_back(r);
    }
  }
  // Forced split sizes against the automatic choice, at small batches.
  std::printf("forced split sizes:\n");
  std::vector<DecodeResult> forced;
  for (int b : {1, 8}) {
    for (int64_t L : {4096, 32768}) {
      for (int split : {256, 512, 1024, 2048}) {
        const DecodeResult r = BenchDecode(timer, b, 32, 8, 128, 16, L, L, reps, sms, split);
        std::printf("%6d %7lld %6d %10.4f %10.4f %10.4f %9.1f %6.1f%%  (split %d)\n", b, (long long)L,
                    r.splits, r.st.median_ms, r.st.min_ms, r.st.max_ms, r.gbps,
                    100 * r.gbps / copy_gbps, split);
        forced.push_back(r);
      }
    }
  }
  // Block size of the DMS release (256) at one shape.
  const DecodeResult big_block = BenchDecode(timer, 32, 32, 8, 128, 256, 8192, 8192, reps, sms);
  std::printf("block 256: batch 32 len 8192: %.4f ms, %.1f GB/s (%.1f%% of copy)\n",
              big_block.st.median_ms, big_block.gbps, 100 * big_block.gbps / copy_gbps);

  // DMS effect: forced-eviction resident length ~ L/8 + 512 (keep 1/8, window 512) vs dense L.
  std::printf("\nDMS effect (resident = L/8 + 512 vs dense L), 32/8 heads, head_dim 128\n");
  std::printf("%6s %7s %9s %10s %10s %8s\n", "batch", "L", "resident", "dense_ms", "dms_ms", "ratio");
  std::vector<std::pair<DecodeResult, DecodeResult>> dms;
  for (int b : quick ? std::vector<int>{16} : std::vector<int>{8, 32}) {
    for (int64_t L : quick ? std::vector<int64_t>{8192} : std::vector<int64_t>{4096, 8192, 16384, 32768}) {
      const DecodeResult d = BenchDecode(timer, b, 32, 8, 128, 16, L, L, reps, sms);
      const DecodeResult s = BenchDecode(timer, b, 32, 8, 128, 16, L, L / 8 + 512, reps, sms);
      std::printf("%6d %7lld %9lld %10.4f %10.4f %7.2fx\n", b, (long long)L, (long long)(L / 8 + 512),
                  d.st.median_ms, s.st.median_ms, d.st.median_ms / s.st.median_ms);
      dms.push_back({d, s});
    }
  }

  // Prefill attention: one 2048-token chunk over 2048 old survivors, 32/8 heads, head_dim 128.
  double prefill_ms = 0, prefill_tflops = 0;
  {
    const int n = 2048, n_old = 2048, heads = 32, kv = 8, dim = 128, block = 16;
    const int max_blocks = n_old / block;
    const size_t nb = static_cast<size_t>(kv) * max_blocks;
    __nv_bfloat16 *q, *kn, *vn, *kp, *vp, *out;
    int32_t *lastn, *pos, *last, *tab, *old;
    BENCH_CHECK(cudaMalloc(&q, static_cast<size_t>(n) * heads * dim * 2));
    BENCH_CHECK(cudaMalloc(&out, static_cast<size_t>(n) * heads * dim * 2));
    BENCH_CHECK(cudaMalloc(&kn, static_cast<size_t>(n) * kv * dim * 2));
    BENCH_CHECK(cudaMalloc(&vn, static_cast<size_t>(n) * kv * dim * 2));
    BENCH_CHECK(cudaMalloc(&kp, nb * block * dim * 2));
    BENCH_CHECK(cudaMalloc(&vp, nb * block * dim * 2));
    FillRandomBf16(q, static_cast<size_t>(n) * heads * dim, 5);
    FillRandomBf16(kn, static_cast<size_t>(n) * kv * dim, 6);
    FillRandomBf16(vn, static_cast<size_t>(n) * kv * dim, 7);
    FillRandomBf16(kp, nb * block * dim, 8);
    FillRandomBf16(vp, nb * block * dim, 9);
    std::vector<int32_t> hlastn(static_cast<size_t>(n) * kv, 0x7fffffff), hpos(nb * block),
        hlast(nb * block, 0x7fffffff), htab(nb), hold(kv, n_old);
    for (size_t i = 0; i < hpos.size(); ++i) hpos[i] = static_cast<int32_t>(i % n_old);
    std::iota(htab.begin(), htab.end(), 0);
    auto up = [](int32_t** d, const std::vector<int32_t>& h) {
      BENCH_CHECK(cudaMalloc(d, h.size() * 4));
      BENCH_CHECK(cudaMemcpy(*d, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    };
    up(&lastn, hlastn); up(&pos, hpos); up(&last, hlast); up(&tab, htab); up(&old, hold);
    PrefillAttentionParams p;
    p.n_queries = n; p.q_pos0 = n_old; p.n_heads = heads; p.n_kv_heads = kv; p.head_dim = dim;
    p.block_tokens = block; p.max_blocks_per_head = max_blocks; p.scale = 1.f / std::sqrt(128.f);
    NotePeak();
    const Stats st = timer.Time([&] {
      BENCH_CHECK(PrefillAttention(p, q, kn, vn, lastn, kp, vp, pos, last, tab, old, out, nullptr));
    }, 5, 1);
    prefill_ms = st.median_ms;
    // Visible pairs: every query sees all old keys plus a causal triangle of the chunk.
    const double pairs = static_cast<double>(n) * n_old + static_cast<double>(n) * (n + 1) / 2;
    prefill_tflops = 4.0 * pairs * dim * heads / (prefill_ms * 1e-3) / 1e12;
    std::printf("\nprefill attention: chunk 2048 over 2048 survivors, 32/8 heads, d128: %.3f ms, %.2f TFLOP/s\n",
                prefill_ms, prefill_tflops);
    for (void* ptr : {(void*)q, (void*)kn, (void*)vn, (void*)kp, (void*)vp, (void*)out, (void*)lastn,
                      (void*)pos, (void*)last, (void*)tab, (void*)old}) cudaFree(ptr);
  }

  // Sampling: 64 rows of a 151936-token vocabulary, top-k 20 + top-p 0.95, T = 0.6.
  double sample_ms = 0;
  {
    const int rows = 64, vocab = 151936;
    float* logits;
    int32_t* tokens;
    DeviceSamplingParams* prm;
    BENCH_CHECK(cudaMalloc(&logits, static_cast<size_t>(rows) * vocab * 4));
    BENCH_CHECK(cudaMalloc(&tokens, rows * 4));
    BENCH_CHECK(cudaMalloc(&prm, rows * sizeof(DeviceSamplingParams)));
    std::vector<float> h(static_cast<size_t>(rows) * vocab);
    std::mt19937 rng(10);
    std::normal_distribution<float> nd(0.f, 3.f);
    for (auto& x : h) x = nd(rng);
    BENCH_CHECK(cudaMemcpy(logits, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    std::vector<DeviceSamplingParams> hp(rows);
    for (int r = 0; r < rows; ++r) { hp[r].temperature = 0.6f; hp[r].top_k = 20; hp[r].top_p = 0.95f; hp[r].seed = r; }
    BENCH_CHECK(cudaMemcpy(prm, hp.data(), hp.size() * sizeof(DeviceSamplingParams), cudaMemcpyHostToDevice));
    const Stats st = timer.Time([&] {
      BENCH_CHECK(SampleTokens(logits, rows, vocab, vocab, prm, tokens, nullptr, nullptr));
    }, reps);
    sample_ms = st.median_ms;
    std::printf("sampling: 64 rows x 151936, top-k 20 + top-p 0.95: %.3f ms (%.3f..%.3f)\n",
                st.median_ms, st.min_ms, st.max_ms);
    cudaFree(logits); cudaFree(tokens); cudaFree(prm);
  }

  std::printf("peak device memory in use (cudaMemGetInfo): %.2f GiB\n", g_peak_used / 1073741824.0);
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << "{\"device\":\"" << prop.name << "\",\"sms\":" << sms << ",\"copy_gbps\":" << copy_gbps
      << ",\"decode\":[";
    for (size_t i = 0; i < sweep.size(); ++i) f << (i ? "," : "") << Json(sweep[i]);
    f << "],\"decode_forced_split\":[";
    for (size_t i = 0; i < forced.size(); ++i) f << (i ? "," : "") << Json(forced[i]);
    f << "],\"decode_block256\":" << Json(big_block) << ",\"dms\":[";
    for (size_t i = 0; i < dms.size(); ++i) {
      f << (i ? "," : "") << "{\"dense\":" << Json(dms[i].first) << ",\"dms\":" << Json(dms[i].second)
        << ",\"time_ratio\":" << dms[i].first.st.median_ms / dms[i].second.st.median_ms << "}";
    }
    f << "],\"prefill_ms\":" << prefill_ms << ",\"prefill_tflops\":" << prefill_tflops
      << ",\"sampling_ms\":" << sample_ms << ",\"peak_used_bytes\":" << g_peak_used << "}\n";
  }
  return 0;
}
