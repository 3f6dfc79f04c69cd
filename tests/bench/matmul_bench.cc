// Decode matmuls of the default model's shape, without attention: where a CPU decode step's time
// goes and how far it is from the memory floor.
//
//   matmul_bench [--threads 2] [--reps 50] [--layers 30] [--tokens 1]
//
// Builds random weights with SmolLM2-135M's shapes and types (per layer Q/K/V, O, gate/up and
// down in Q4_1; the tied output head in Q8_0), then times steps of `--tokens` tokens that run
// every layer's products in the model's order (QKV batched, O, gate+up batched, down) and the
// head. The weights (about 96 MB) are larger than the caches, so each step streams them from
// memory as a real decode step does. Prints the median step time, its split between the layer
// products and the head, the achieved bytes/s and multiply-adds/s, and the step time a copy at
// the measured single-pass read bandwidth would need (the floor).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/reference/quant.h"

namespace {

using dmsrt::kernels::MatmulSpec;
using dmsrt::kernels::MatmulWorkspace;
using dmsrt::kernels::ThreadPool;

struct Weight {
  int type;
  int64_t rows, cols;
  std::vector<uint8_t> data;
};

Weight RandomWeight(int type, int64_t rows, int64_t cols, std::mt19937* rng) {
  Weight w{type, rows, cols, {}};
  w.data.resize(dmsrt::kernels::QuantRowBytes(type, cols) * rows);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<float> row(cols);
  const int64_t row_bytes = dmsrt::kernels::QuantRowBytes(type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : row) v = dist(*rng);
    void* dst = w.data.data() + r * row_bytes;
    if (type == dmsrt::kernels::kTypeQ4_1) {
      dmsrt::kernels::QuantizeRowQ4_1Ref(row.data(), static_cast<dmsrt::kernels::BlockQ4_1*>(dst), cols);
    } else {
      dmsrt::kernels::QuantizeRowQ8_0Ref(row.data(), static_cast<dmsrt::kernels::BlockQ8_0*>(dst), cols);
    }
  }
  return w;
}

MatmulSpec Spec(const Weight& w, float* y, int64_t ldy) {
  MatmulSpec s;
  s.type = w.type;
  s.w = w.data.data();
  s.rows = w.rows;
  s.y = y;
  s.ldy = ldy;
  return s;
}

struct Layer {
  Weight q, k, v, o, gate, up, down;
};

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Single-pass read bandwidth over `bytes` (sums 64-bit words), the best of a few passes.
double ReadBandwidth(ThreadPool* pool, int64_t bytes) {
  std::vector<uint64_t> buf(bytes / 8, 1);
  const int nth = pool->size();
  std::vector<uint64_t> sums(nth);
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t per = static_cast<int64_t>(buf.size()) / nth;
    pool->ParallelFor(nth, [&](int64_t c) {
      uint64_t s = 0;
      const uint64_t* p = buf.data() + c * per;
      for (int64_t i = 0; i < per; ++i) s += p[i];
      sums[c] = s;
    });
    best = std::max(best, bytes / Seconds(t0, std::chrono::steady_clock::now()));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 50, n_layers = 30, tokens = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (a == "--threads") threads = v;
    else if (a == "--reps") reps = v;
    else if (a == "--layers") n_layers = v;
    else if (a == "--tokens") tokens = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (threads < 1 || reps < 1 || n_layers < 1 || tokens < 1) {
    std::fprintf(stderr, "every option must be >= 1\n");
    return 2;
  }
  using namespace dmsrt::kernels;
  const int64_t d = 576, kv = 192, ff = 1536, vocab = 49152;
  std::mt19937 rng(7);
  std::vector<Layer> layers;
  for (int l = 0; l < n_layers; ++l) {
    layers.push_back({RandomWeight(kTypeQ4_1, d, d, &rng), RandomWeight(kTypeQ4_1, kv, d, &rng),
                      RandomWeight(kTypeQ4_1, kv, d, &rng), RandomWeight(kTypeQ4_1, d, d, &rng),
                      RandomWeight(kTypeQ4_1, ff, d, &rng), RandomWeight(kTypeQ4_1, ff, d, &rng),
                      RandomWeight(kTypeQ4_1, d, ff, &rng)});
  }
  const Weight head = RandomWeight(kTypeQ8_0, vocab, d, &rng);
  int64_t layer_bytes = 0;
  for (const Layer& L : layers) {
    for (const Weight* w : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) layer_bytes += w->data.size();
  }
  const int64_t head_bytes = head.data.size();
  const double layer_macs = static_cast<double>(n_layers) * (2 * d * d + 2 * kv * d + 3 * ff * d);
  const double head_macs = static_cast<double>(vocab) * d;

  ThreadPool pool(threads);
  MatmulWorkspace ws;
  std::vector<float> x(tokens * ff, 0.0f), h(tokens * ff), qkv(tokens * (d + 2 * kv)),
      gu(tokens * 2 * ff), logits(tokens * vocab);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto& v : x) v = dist(rng);

  std::vector<double> t_layers, t_head;
  for (int rep = 0; rep <= reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const Layer& L : layers) {
      MatmulSpec s3[3] = {Spec(L.q, qkv.data(), d + 2 * kv), Spec(L.k, qkv.data() + d, d + 2 * kv),
                          Spec(L.v, qkv.data() + d + kv, d + 2 * kv)};
      MatMulBatch(&pool, s3, 3, d, x.data(), tokens, &ws);
      MatMul(&pool, kTypeQ4_1, L.o.data.data(), d, d, x.data(), tokens, h.data(), d, &ws);
      MatmulSpec s2[2] = {Spec(L.gate, gu.data(), 2 * ff), Spec(L.up, gu.data() + ff, 2 * ff)};
      MatMulBatch(&pool, s2, 2, d, x.data(), tokens, &ws);
      MatMul(&pool, kTypeQ4_1, L.down.data.data(), d, ff, x.data(), tokens, h.data(), d, &ws);
    }
    const auto t1 = std::chrono::steady_clock::now();
    MatMul(&pool, kTypeQ8_0, head.data.data(), vocab, d, x.data(), tokens, logits.data(), vocab, &ws);
    const auto t2 = std::chrono::steady_clock::now();
    if (rep == 0) continue;  // warm-up
    t_layers.push_back(Seconds(t0, t1));
    t_head.push_back(Seconds(t1, t2));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double tl = median(t_layers), th = median(t_head);
  const double t_min = *std::min_element(t_layers.begin(), t_layers.end()) +
                       *std::min_element(t_head.begin(), t_head.end());
  const double bw = ReadBandwidth(&pool, 256ll << 20);
  std::printf("matmul path %s, %d threads, %d tokens per step, %d layers, median of %d steps\n",
              MatmulPath(), threads, tokens, n_layers, reps);
  std::printf("%-22s %10s %10s %10s %12s %10s\n", "part", "ms/step", "MB", "GB/s", "GMAC/s", "floor ms");
  auto row = [&](const char* name, double t, int64_t bytes, double macs) {
    std::printf("%-22s %10.3f %10.1f %10.2f %12.2f %10.3f\n", name, 1e3 * t, bytes / 1e6, bytes / t / 1e9,
                tokens * macs / t / 1e9, 1e3 * bytes / bw);
  };
  row("layers (Q4_1)", tl, layer_bytes, layer_macs);
  row("head (Q8_0)", th, head_bytes, head_macs);
  row("total", tl + th, layer_bytes + head_bytes, layer_macs + head_macs);
  std::printf("read bandwidth %.2f GB/s (%d threads); step at %.0f%% of the floor; %.1f steps/s "
              "(fastest layers + fastest head: %.3f ms)\n",
              bw / 1e9, threads, 100.0 * (layer_bytes + head_bytes) / bw / (tl + th), 1.0 / (tl + th),
              1e3 * t_min);
  return 0;
}
