// Where a benchmark figure was measured: the source commit, the CPU and its vector extensions, the
// matmul path this binary was compiled for, the thread count and the date. Every benchmark
// writes it next to its figures, so a figure can be read against the machine that produced it.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace dmsrt {

// {"commit", "cpu_model", "cpu_flags", "matmul_path", "threads", "date"}. `commit` is the source
// tree's HEAD (with "-dirty" for uncommitted changes to tracked files), or "unknown" when the
// source tree or git is not there; `cpu_flags` lists the SIMD extensions the kernels care about
// that /proc/cpuinfo reports; `date` is UTC, ISO 8601.
nlohmann::json BenchProvenance(int threads);

// One line for a table header: "commit 1a2b3c, AMD EPYC (avx2 fma; matmul avx2), 2 threads,
// 2026-12-06T10:00:00Z".
std::string ProvenanceLine(const nlohmann::json& p);

}  // namespace dmsrt
