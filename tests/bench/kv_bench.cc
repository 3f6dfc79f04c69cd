// KV store benchmark: bytes of KV held and decode attention time per token against context
// length, for a dense cache, a sliding window and synthetic DMS ("forced": bits drawn at a fixed
// rate from a seeded hash, not a model's decisions — every row says so).
//
// Model shape (random values, one sequence): 16 layers, 4 KV heads, 16 query heads, head_dim 64,
// blocks of 16 tokens. For each policy the cache is filled to each context length with
// commit-only calls (no attention), then `steps` decode steps are timed (attention + append over
// all 16 layers, one token) and the median, min and max are reported. The figure's ceiling is
// the memory bandwidth measured in the same process (a large memcpy): "eff GB/s" is the resident
// K/V bytes the step reads divided by its median time.
//
//   kv_bench [--max_context=32768] [--min_context=1024] [--steps=9] [--threads=1]
// Prints a table, then one JSON object per row (prefix "JSON ").
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "kernels/cpu/thread_pool.h"
#include "runtime/kv/kv_cache.h"

namespace dmsrt {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Copy bandwidth (read + write bytes per second) of a 256 MiB memcpy, best of 3.
double MeasureCopyGBs() {
  const size_t bytes = 256u << 20;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    const auto t1 = Clock::now();
    best = std::min(best, Seconds(t0, t1));
    a[r] = b[bytes - 1 - r];  // keep the copies observable
  }
  return 2.0 * bytes / best / 1e9;
}

struct Row {
  std::string policy;
  bool synthetic = false;
  int64_t context = 0;
  double resident_per_head = 0;
  int64_t kv_bytes = 0;
  int64_t dense_bytes = 0;
  double cache_cr = 0, block_cr = 0, asymptotic_cr = 0;
  double ms_median = 0, ms_min = 0, ms_max = 0;
  double eff_gbs = 0;
};

int Main(int argc, char** argv) {
  int64_t max_context = 32768, min_context = 1024;
  int32_t steps = 9;
  int32_t threads = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      const size_t n = std::strlen(name);
      return a.compare(0, n, name) == 0 ? a.c_str() + n : nullptr;
    };
    if (const char* v = val("--max_context=")) {
      max_context = std::atoll(v);
    } else if (const char* v2 = val("--min_context=")) {
      min_context = std::atoll(v2);
    } else if (const char* v3 = val("--steps=")) {
      steps = std::atoi(v3);
    } else if (const char* v4 = val("--threads=")) {
      threads = std::atoi(v4);
    } else {
      std::fprintf(stderr, "usage: kv_bench [--max_context=N] [--min_context=N] [--steps=N] [--threads=N]\n");
      return 2;
    }
  }
  if (max_context < 1 || min_context < 1 || steps < 1 || threads < 1) {
    std::fprintf(stderr, "kv_bench: sizes and steps must be positive\n");
    return 2;
  }

  KvGeometry geo;
  geo.n_layers = 16;
  geo.n_kv_heads = 4;
  geo.n_heads = 16;
  geo.head_dim = 64;
  geo.block_tokens = 16;
  const int32_t hd = geo.head_dim, nkv = geo.n_kv_heads, nh = geo.n_heads;

  struct Policy {
    std::string label;
    KvPolicyConfig cfg;
    bool synthetic;
  };
  std::vector<Policy> policies;
  {
    KvPolicyConfig none;
    policies.push_back({"none", none, false});
    KvPolicyConfig win;
    win.kind = KvPolicyKind::kWindow;
    win.window = 512;
    win.sinks = 4;
    policies.push_back({"window(512+4)", win, false});
    KvPolicyConfig forced;
    forced.kind = KvPolicyKind::kForced;
    forced.window = 512;
    forced.force_rate = 0.875;
    forced.seed = 1;
    policies.push_back({"forced(0.875,w512) SYNTHETIC", forced, true});
  }

  // Random K/V/Q rows, cycled while filling (values never all zero).
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int32_t pool_tokens = 1024;
  std::vector<float> kpool((size_t)pool_tokens * nkv * hd), vpool(kpool.size()),
      qbuf((size_t)nh * hd), obuf((size_t)nh * hd);
  for (auto& x : kpool) x = u(rng);
  for (auto& x : vpool) x = u(rng);
  for (auto& x : qbuf) x = u(rng);

  const double copy_gbs = MeasureCopyGBs();
  kernels::ThreadPool pool(threads);
  std::vector<Row> rows;
  const int64_t dense_bytes_per_token = 2LL * geo.n_layers * nkv * hd * 4;
  for (const Policy& pol : policies) {
    // Enough for the dense cache at the largest context plus the timed steps, with slack.
    const int64_t budget = dense_bytes_per_token * (max_context + steps + 64) +
                           2LL * geo.n_layers * nkv * geo.block_tokens * hd * 4 * 2;
    auto cache = MakeCpuKvCache(geo, pol.cfg, budget);
    if (!cache.ok()) {
      std::fprintf(stderr, "kv_bench: %s\n", cache.status().ToString().c_str());
      return 1;
    }
    KvCache& kv = **cache;
    if (threads > 1) kv.SetThreadPool(&pool);
    auto seq = kv.Create();
    if (!seq.ok()) return 1;
    int64_t pos = 0;
    auto fill_to = [&](int64_t target) -> bool {
      while (pos < target) {
        const int32_t n = (int32_t)std::min<int64_t>(target - pos, pool_tokens - pos % pool_tokens);
        if (!kv.Reserve(*seq, n).ok()) return false;
        const size_t off = (size_t)(pos % pool_tokens) * nkv * hd;
        for (int32_t l = 0; l < geo.n_layers; ++l) {
          kv.AttendAndAppend(*seq, l, n, nullptr, kpool.data() + off, vpool.data() + off, nullptr,
                             nullptr);
        }
        pos += n;
      }
      return true;
    };
    for (int64_t ctx = min_context; ctx <= max_context; ctx *= 2) {
      if (!fill_to(ctx)) {
        std::fprintf(stderr, "kv_bench: fill failed at %lld\n", (long long)ctx);
        return 1;
      }
      const KvFigures f = kv.Figures(*seq);  // the cache the timed steps read
      std::vector<double> times;
      for (int32_t s = 0; s < steps; ++s) {
        if (!kv.Reserve(*seq, 1).ok()) return 1;
        const size_t off = (size_t)(pos % pool_tokens) * nkv * hd;
        const auto t0 = Clock::now();
        for (int32_t l = 0; l < geo.n_layers; ++l) {
          kv.AttendAndAppend(*seq, l, 1, qbuf.data(), kpool.data() + off, vpool.data() + off,
                             nullptr, obuf.data());
        }
        const auto t1 = Clock::now();
        times.push_back(Seconds(t0, t1));
        ++pos;
      }
      if (!std::isfinite(obuf[0])) {
        std::fprintf(stderr, "kv_bench: attention produced a non-finite value\n");
        return 1;
      }
      std::vector<double> sorted = times;
      std::sort(sorted.begin(), sorted.end());
      Row r;
      r.policy = pol.label;
      r.synthetic = pol.synthetic;
      r.context = ctx;
      r.resident_per_head = (double)f.resident_tokens / (geo.n_layers * nkv);
      r.kv_bytes = f.kv_bytes;
      r.dense_bytes = f.dense_blocks * kv.block_bytes();
      r.cache_cr = f.cache_cr();
      r.block_cr = f.block_cr();
      r.asymptotic_cr = f.asymptotic_cr();
      r.ms_median = sorted[sorted.size() / 2] * 1e3;
      r.ms_min = sorted.front() * 1e3;
      r.ms_max = sorted.back() * 1e3;
      r.eff_gbs = (double)f.resident_tokens * 2 * hd * 4 / (r.ms_median * 1e-3) / 1e9;
      rows.push_back(r);
    }
    if (!kv.Free(*seq).ok()) return 1;
  }

  std::printf("kv_bench: 16 layers, 4 KV heads, 16 query heads, head_dim 64, block 16, float32, "
              "1 sequence, %d thread(s); decode attention+append over all layers, %d steps\n", threads,
              steps);
  std::printf("memcpy bandwidth (read+write): %.2f GB/s; GB/s = resident K/V bytes read per step / "
              "median step time (above the copy figure when the cache fits in the CPU caches)\n",
              copy_gbs);
  // Timings on a shared machine depend on its load: print it next to them.
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    char buf[128] = {0};
    if (std::fgets(buf, sizeof(buf), f) != nullptr) std::printf("load average: %s", buf);
    std::fclose(f);
  }
  std::printf("%-30s %8s %12s %12s %12s %8s %8s %8s %12s %20s %8s\n", "policy", "context",
              "resident/hd", "KV MiB", "dense MiB", "cacheCR", "blockCR", "asymCR", "ms/token",
              "min..max ms", "GB/s");
  for (const Row& r : rows) {
    char range[64];
    std::snprintf(range, sizeof(range), "%.3f..%.3f", r.ms_min, r.ms_max);
    // The asymptotic CR (1 / (1 - eviction rate)) is a DMS figure; for the window it says nothing.
    char asym[32] = "n/a";
    if (r.synthetic) std::snprintf(asym, sizeof(asym), "%.2f", r.asymptotic_cr);
    std::printf("%-30s %8lld %12.1f %12.2f %12.2f %8.2f %8.2f %8s %12.3f %20s %8.2f\n",
                r.policy.c_str(), (long long)r.context, r.resident_per_head,
                r.kv_bytes / 1048576.0, r.dense_bytes / 1048576.0, r.cache_cr, r.block_cr, asym,
                r.ms_median, range, r.eff_gbs);
  }
  for (const Row& r : rows) {
    nlohmann::json j = {{"bench", "kv_decode_attention"},
                        {"policy", r.policy},
                        {"synthetic", r.synthetic},
                        {"context", r.context},
                        {"layers", geo.n_layers},
                        {"kv_heads", nkv},
                        {"heads", nh},
                        {"head_dim", hd},
                        {"resident_per_head", r.resident_per_head},
                        {"kv_bytes", r.kv_bytes},
                        {"dense_kv_bytes", r.dense_bytes},
                        {"cache_cr", r.cache_cr},
                        {"block_cr", r.block_cr},
                        {"asymptotic_cr", r.synthetic ? nlohmann::json(r.asymptotic_cr)
                                                      : nlohmann::json(nullptr)},
                        {"ms_per_token_median", r.ms_median},
                        {"ms_per_token_min", r.ms_min},
                        {"ms_per_token_max", r.ms_max},
                        {"effective_gbs", r.eff_gbs},
                        {"copy_gbs", copy_gbs},
                        {"steps", steps},
                        {"threads", threads}};
    std::printf("JSON %s\n", j.dump().c_str());
  }
  return 0;
}

}  // namespace
}  // namespace dmsrt

int main(int argc, char** argv) { return dmsrt::Main(argc, argv); }
