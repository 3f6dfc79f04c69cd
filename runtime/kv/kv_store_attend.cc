// The KV store's CPU path: AttendAndAppend, the attention of a step over the paged store
// followed (or, under kVictim, interleaved) by the commit of its tokens (see kv_store.h).
#include <algorithm>
#include <limits>

#include "kernels/cpu/paged_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "runtime/kv/kv_store.h"

namespace dmsrt {

using kv_store_internal::DecodeUnit;
using kv_store_internal::kDecodeKeyChunk;
using kv_store_internal::kDecodeParallelMadds;
using kv_store_internal::RingFlagged;

// Runs fn(j, scratch) for every local KV head j: on the worker threads when a pool is set and the
// step has enough work (`madds` multiply-adds) to pay for waking them, else inline.
template <typename Fn>
void KvStore::ForEachHead(int64_t madds, const Fn& fn) {
  const int32_t nkv = geo_.n_kv_heads;
  if (threads_ == nullptr || threads_->size() < 2 || nkv < 2 || madds < (1 << 20)) {
    for (int32_t j = 0; j < nkv; ++j) fn(j, scratch_[0]);
    return;
  }
  // One chunk per head, each with its own scratch (a worker may run several heads).
  threads_->ParallelFor(nkv, [&](int64_t j) { fn(static_cast<int32_t>(j), scratch_[j]); });
}

void KvStore::AttendAndAppend(SeqId id, int32_t layer, int32_t n, const float* q, const float* k,
                              const float* v, const uint8_t* evict, float* out) {
  if (n <= 0) return;
  auto it = seqs_.find(id);
  if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers) {
    Poison(out, n);
    return;
  }
  if (index_only_) {  // no storage here: CommitRows is the way in
    it->second->broken = true;
    Poison(out, n);
    return;
  }
  Sequence& s = *it->second;
  const int64_t P = s.length;
  HeadState* heads = &s.heads[static_cast<size_t>(layer) * geo_.n_kv_heads];
  // Commit-only (q == out == nullptr): the tokens are stored without attention. Possible for the
  // policies whose cache does not depend on attention weights.
  const bool attend = q != nullptr && out != nullptr;
  if (s.broken || heads[0].logical != P || (!attend && (victim_ || q != out))) {
    // Out of order, repeated, an earlier failure, or a commit-only call the policy cannot do.
    s.broken = true;
    Poison(out, n);
    return;
  }
  const uint8_t* bits = StepBits(s, heads, layer, P, n, evict, k);
  if (!attend) {
    CommitOnly(s, heads, layer, n, k, v, bits);
    return;
  }
  if (victim_) {
    AttendVictim(s, heads, n, q, k, v, out);
  } else if (n == 1) {
    AttendDecode(s, heads, q, k, v, bits, out);
  } else {
    AttendChunk(s, heads, n, q, k, v, bits, out);
  }
  if (s.broken) {
    Poison(out, n);
    return;
  }
  EndLayer(s, layer, P + n, false);
}

void KvStore::CommitOnly(Sequence& s, HeadState* heads, int32_t layer, int32_t n, const float* k,
                         const float* v, const uint8_t* bits) {
  const int32_t nkv = geo_.n_kv_heads;
  const int64_t P = s.length;
  for (int32_t j = 0; j < nkv && !s.broken; ++j) {
    for (int32_t i = 0; i < n; ++i) {
      const int64_t off = static_cast<int64_t>(i) * nkv * geo_.head_dim +
                          static_cast<int64_t>(j) * geo_.head_dim;
      if (!Commit(s, heads[j], P + i, BitAt(bits, nkv, i, j), k + off, v + off)) {
        s.broken = true;
        break;
      }
    }
  }
  if (!s.broken) EndLayer(s, layer, P + n, false);
}

// kVictim: token by token (commit, attend over every slot, pick the next victim).
void KvStore::AttendVictim(Sequence& s, HeadState* heads, int32_t n, const float* q,
                           const float* k, const float* v, float* out) {
  const int32_t nkv = geo_.n_kv_heads;
  const int32_t hd = geo_.head_dim;
  const int64_t qstride = static_cast<int64_t>(geo_.n_heads) * hd;
  const int64_t kstride = static_cast<int64_t>(nkv) * hd;
  const int64_t P = s.length;
  Scratch& sc = scratch_[0];
  for (int32_t j = 0; j < nkv && !s.broken; ++j) {
    HeadState& h = heads[j];
    for (int32_t i = 0; i < n; ++i) {
      const int64_t t = P + i;
      const int64_t koff = i * kstride + static_cast<int64_t>(j) * hd;
      const int64_t qoff = i * qstride + static_cast<int64_t>(j) * group_ * hd;
      if (!Commit(s, h, t, 0, k + koff, v + koff)) {
        s.broken = true;
        break;
      }
      GatherAllSlots(sc, h);
      AttendRows(sc, q + qoff, Resident(h), out + qoff);
      h.kv_reads += Resident(h);
      h.dense_reads += t + 1;
      if (!s.frozen) PickVictim(h, sc.probs.data(), group_, t);
    }
  }
}

// Decode (§4): bookkeeping for every head first (it allocates, so it stays on this thread), then
// attention over the resident slots = R(t). A head with more than kDecodeKeyChunk slots is split into
// chunks of that many keys whose partial softmaxes are combined afterwards, so that one long
// head's keys can be shared between workers; the chunking depends on the slot count alone, so the
// result is the same for every thread count.
void KvStore::AttendDecode(Sequence& s, HeadState* heads, const float* q, const float* k,
                           const float* v, const uint8_t* bits, float* out) {
  const int32_t nkv = geo_.n_kv_heads;
  const int32_t hd = geo_.head_dim;
  const int32_t g = group_;
  const int64_t P = s.length;
  int64_t work = 0;
  for (int32_t j = 0; j < nkv; ++j) {
    const int64_t koff = static_cast<int64_t>(j) * hd;
    if (!Commit(s, heads[j], P, BitAt(bits, nkv, 0, j), k + koff, v + koff)) {
      s.broken = true;
      return;
    }
    work += Resident(heads[j]);
  }
  decode_units_.clear();
  for (int32_t j = 0; j < nkv; ++j) {
    const int32_t chunks = (Resident(heads[j]) + kDecodeKeyChunk - 1) / kDecodeKeyChunk;
    for (int32_t c = 0; c < chunks; ++c) decode_units_.push_back({j, c, chunks});
  }
  auto scratch_for = [&](int32_t j) -> Scratch& {
    return static_cast<size_t>(j) < scratch_.size() ? scratch_[j] : scratch_[0];
  };
  auto prepare = [&](int32_t j) {
    Scratch& sc = scratch_for(j);
    const int32_t m = Resident(heads[j]);
    EnsureKeyScratch(sc, static_cast<size_t>(m));
    // With dead slots the resident rows are not a slot range: gathered here, once.
    if (heads[j].dead > 0) GatherAllSlots(sc, heads[j]);
    if (sc.probs.size() < static_cast<size_t>(g) * m) sc.probs.resize(static_cast<size_t>(g) * m);
    const size_t parts = static_cast<size_t>((m + kDecodeKeyChunk - 1) / kDecodeKeyChunk) *
                         kernels::KeyChunkFloats(g, hd);
    if (sc.parts.size() < parts) sc.parts.resize(parts);
  };
  auto run = [&](const DecodeUnit& u) {
    Scratch& sc = scratch_for(u.head);
    const HeadState& h = heads[u.head];
    const int64_t qoff = static_cast<int64_t>(u.head) * g * hd;
    const int32_t m = Resident(h);
    if (u.chunks == 1) {
      if (h.dead == 0) GatherAllSlots(sc, h);
      AttendRows(sc, q + qoff, m, out + qoff);
      return;
    }
    const int32_t c0 = u.chunk * kDecodeKeyChunk;
    const int32_t c1 = std::min(m, c0 + kDecodeKeyChunk);
    if (h.dead == 0) {
      kernels::GatherSlotRange(rows_, h.blocks.data(), c0, c1, sc.kp.data(), sc.vp.data());
    }
    kernels::AttendKeyChunk(q + qoff, g, hd, scale_, sc.kp.data() + c0, sc.vp.data() + c0, c1 - c0,
                            sc.probs.data() + c0, m,
                            sc.parts.data() + u.chunk * kernels::KeyChunkFloats(g, hd));
  };
  auto finish = [&](int32_t j) {
    HeadState& h = heads[j];
    const int32_t chunks = (Resident(h) + kDecodeKeyChunk - 1) / kDecodeKeyChunk;
    if (chunks > 1) {
      kernels::CombineKeyChunks(scratch_for(j).parts.data(), chunks, g, hd,
                                out + static_cast<int64_t>(j) * g * hd);
    }
    h.kv_reads += Resident(h);
    h.dense_reads += P + 1;
  };
  const int64_t n_units = static_cast<int64_t>(decode_units_.size());
  const bool parallel = threads_ != nullptr && threads_->size() >= 2 && n_units >= 2 &&
                        scratch_.size() >= static_cast<size_t>(nkv) &&
                        work * g * hd >= kDecodeParallelMadds;
  if (parallel) {
    for (int32_t j = 0; j < nkv; ++j) prepare(j);
    threads_->ParallelFor(n_units, [&](int64_t i) { run(decode_units_[i]); });
    for (int32_t j = 0; j < nkv; ++j) finish(j);
    return;
  }
  for (int64_t i = 0; i < n_units; ++i) {  // one head's chunks at a time: scratch_[0] may be shared
    const DecodeUnit& u = decode_units_[i];
    if (u.chunk == 0) prepare(u.head);
    run(u);
    if (u.chunk + 1 == u.chunks) finish(u.head);
  }
}

// Exact chunk (§5): every query attends (old slots with the §3 rule, the chunk's own keys with
// their last-visible-query bound) before any token of the chunk is committed.
void KvStore::AttendChunk(Sequence& s, HeadState* heads, int32_t n, const float* q,
                          const float* k, const float* v, const uint8_t* bits, float* out) {
  const int32_t nkv = geo_.n_kv_heads;
  const int32_t hd = geo_.head_dim;
  const int32_t g = group_;
  const int32_t bt = geo_.block_tokens;
  const int64_t qstride = static_cast<int64_t>(geo_.n_heads) * hd;  // per token in q/out
  const int64_t kstride = static_cast<int64_t>(nkv) * hd;           // per token in k/v
  const int64_t P = s.length;
  int64_t work = 0;
  for (int32_t j = 0; j < nkv; ++j) work += (Resident(heads[j]) + n) * static_cast<int64_t>(n);
  ForEachHead(work * g * hd, [&](int32_t j, Scratch& sc) {
    HeadState& h = heads[j];
    // Flags inside the chunk: flag(P+c) = d[P+c+1]; the last one is still 0.
    if (sc.chunk_flag.size() < static_cast<size_t>(n)) sc.chunk_flag.resize(n);
    for (int32_t c = 0; c < n; ++c) sc.chunk_flag[c] = c + 1 < n ? BitAt(bits, nkv, c + 1, j) : 0;
    const uint8_t first_bit = BitAt(bits, nkv, 0, j);  // flags token P-1
    const int32_t n_old = h.n;
    EnsureKeyScratch(sc, static_cast<size_t>(n_old) + n);
    for (int32_t i = 0; i < n; ++i) {
      const int64_t qpos = P + i;
      int32_t m = 0;
      for (int32_t sl = 0; sl < n_old; ++sl) {
        const int64_t kpos = h.pos[sl];
        if (kpos == kv_store_internal::kDeadSlot) continue;
        // Only the ring's tokens can be flagged and still resident.
        const bool flagged =
            kpos == P - 1 ? first_bit != 0
                          : ring_ && kpos >= P - w_ - 1 &&
                                RingFlagged(h.ring[kpos % static_cast<int64_t>(h.ring.size())]);
        if (flagged && qpos - kpos > w_) continue;
        const int32_t b = h.blocks[sl / bt];
        sc.kp[m] = rows_.key(b, sl % bt);
        sc.vp[m] = rows_.value(b, sl % bt);
        ++m;
      }
      for (int32_t c = 0; c <= i; ++c) {
        if (sc.chunk_flag[c] && i - c > w_) continue;
        const int64_t koff = c * kstride + static_cast<int64_t>(j) * hd;
        sc.kp[m] = k + koff;
        sc.vp[m] = v + koff;
        ++m;
      }
      const int64_t qoff = i * qstride + static_cast<int64_t>(j) * g * hd;
      AttendRows(sc, q + qoff, m, out + qoff);
      h.kv_reads += m;
      h.dense_reads += qpos + 1;
    }
  });
  for (int32_t j = 0; j < nkv && !s.broken; ++j) {
    for (int32_t i = 0; i < n; ++i) {
      const int64_t koff = i * kstride + static_cast<int64_t>(j) * hd;
      if (!Commit(s, heads[j], P + i, BitAt(bits, nkv, i, j), k + koff, v + koff)) {
        s.broken = true;
        break;
      }
    }
  }
}

// Softmax attention of the g query heads of one group over m keys given by the scratch row
// pointers; qg, outg [g, head_dim]; the weights are left in sc.probs[h * m + c].
void KvStore::AttendRows(Scratch& sc, const float* qg, int32_t m, float* outg) const {
  const size_t need = static_cast<size_t>(group_) * m;
  if (sc.probs.size() < need) sc.probs.resize(need);
  kernels::AttendRows(qg, group_, geo_.head_dim, scale_, sc.kp.data(), sc.vp.data(), m,
                      sc.probs.data(), outg);
}

void KvStore::EnsureKeyScratch(Scratch& sc, size_t m) const {
  if (sc.kp.size() < m) {
    sc.kp.resize(m);
    sc.vp.resize(m);
  }
}

void KvStore::GatherAllSlots(Scratch& sc, const HeadState& h) const {
  EnsureKeyScratch(sc, static_cast<size_t>(h.n));
  if (h.dead == 0) {
    kernels::GatherSlotRows(rows_, h.blocks.data(), h.n, sc.kp.data(), sc.vp.data());
    return;
  }
  const int32_t bt = geo_.block_tokens;
  int32_t m = 0;
  for (int32_t sl = 0; sl < h.n; ++sl) {
    if (h.pos[sl] == kv_store_internal::kDeadSlot) continue;
    sc.kp[m] = rows_.key(h.blocks[sl / bt], sl % bt);
    sc.vp[m] = rows_.value(h.blocks[sl / bt], sl % bt);
    ++m;
  }
}

// kVictim: after the query of token t attended over all slots, the policy picks the next victim.
void KvStore::PickVictim(HeadState& h, const float* probs, int32_t group, int64_t t) const {
  KvVictimInputs in;
  in.probs = probs;
  in.group = group;
  in.m = h.n;
  in.pos = h.pos.data();
  in.score = slot_scores_ ? h.score.data() : nullptr;
  in.t = t;
  h.victim = policy_->PickVictim(in);
}

void KvStore::Poison(float* out, int32_t n) {
  if (out == nullptr) return;
  std::fill(out, out + static_cast<size_t>(n) * geo_.n_heads * geo_.head_dim,
            std::numeric_limits<float>::quiet_NaN());
}

}  // namespace dmsrt
