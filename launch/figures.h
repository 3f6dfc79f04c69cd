// KV compression figures (docs/dms-semantics.md §6) as JSON and as the one-line summary that
// generate/bench print. Every ratio names what it divides.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "runtime/kv/kv_cache.h"

namespace dmsrt {

// Keys: cache_cr, eviction_rate, asymptotic_cr, block_cr, kv_reads, dense_kv_reads, kv_bytes,
// logical_tokens, resident_tokens, and (with detail) kv_detail.per_layer / kv_detail.per_head.
nlohmann::json FiguresJson(const KvFigures& f, int32_t n_kv_heads, bool detail);
// "KV: 1.2 MiB held, 512 resident / 1024 logical tokens; cache CR 2.00x, ..."
std::string FiguresLine(const KvFigures& f, const std::string& policy_label);
std::string HumanBytes(int64_t bytes);

}  // namespace dmsrt
