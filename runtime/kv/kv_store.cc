// The KV store's bookkeeping: sequences, reservations, commits, figures and the KvIndex API
// (see kv_store.h). The CPU attention is in kv_store_attend.cc.
#include "runtime/kv/kv_store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmsrt {

using kv_store_internal::kDeferAwaiting;
using kv_store_internal::kDeferKnown;
using kv_store_internal::kDeferNone;
using kv_store_internal::NextTokenNeed;
using kv_store_internal::RingEntry;
using kv_store_internal::RingFlagged;
using kv_store_internal::RingSlot;

KvStore::KvStore(const KvGeometry& g, const KvPolicyConfig& p, std::unique_ptr<KvPolicy> policy,
                 int64_t total_blocks, int64_t index_block_bytes, bool dead_slots)
    : geo_(g),
      pol_(p),
      policy_(std::move(policy)),
      pool_(index_block_bytes > 0
                ? std::make_unique<BlockPool>(total_blocks, index_block_bytes)
                : std::make_unique<BlockPool>(total_blocks, g.block_tokens, g.head_dim)),
      index_only_(index_block_bytes > 0) {
  group_ = g.n_heads / g.n_kv_heads;
  reuse_ = policy_->reuse();
  ring_ = reuse_ == KvSlotReuse::kFlagged;
  victim_ = reuse_ == KvSlotReuse::kVictim;
  dead_slots_ = dead_slots && ring_;
  model_bits_ = policy_->model_bits();
  slot_scores_ = policy_->slot_scores();
  budget_ = policy_->budget_tokens();
  if (ring_) w_ = policy_->delay_window();
  scale_ = 1.0f / std::sqrt(static_cast<float>(g.head_dim));
  if (!index_only_) {
    rows_.data = pool_->keys(0);
    rows_.block_floats = pool_->floats_per_block();
    rows_.v_offset = pool_->values(0) - pool_->keys(0);
    rows_.block_tokens = g.block_tokens;
    rows_.head_dim = g.head_dim;
  }
  scratch_.resize(1);
}

void KvStore::SetThreadPool(kernels::ThreadPool* pool) {
  threads_ = pool;
  scratch_.resize(pool != nullptr ? std::max(1, geo_.n_kv_heads) : 1);
}

// ---- sequences --------------------------------------------------------------------------------

absl::StatusOr<SeqId> KvStore::Create() {
  auto seq = std::make_unique<Sequence>();
  seq->heads.resize(static_cast<size_t>(geo_.n_layers) * geo_.n_kv_heads);
  for (HeadState& h : seq->heads) {
    if (ring_) h.ring.assign(static_cast<size_t>(w_) + 1, RingEntry(-1, false));
    // Room for a typical prompt without regrowth; longer sequences grow amortised.
    h.pos.reserve(256);
    h.blocks.reserve(256 / geo_.block_tokens + 1);
    if (slot_scores_) h.score.reserve(budget_);
  }
  seq->next_need.resize(seq->heads.size());
  const SeqId id = next_id_++;
  seqs_.emplace(id, std::move(seq));
  return id;
}

absl::StatusOr<SeqId> KvStore::Fork(SeqId parent) {
  auto it = seqs_.find(parent);
  if (it == seqs_.end()) return NoSuchSequence(parent);
  Sequence& p = *it->second;
  if (p.broken || !ResolveDeferred(p) || p.awaiting_weights > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot fork sequence ", parent, ": its cache is inconsistent"));
  }
  auto seq = std::make_unique<Sequence>();
  seq->heads = p.heads;  // metadata is per sequence: copied
  seq->length = p.length;
  seq->frozen = p.frozen;
  for (const HeadState& h : seq->heads) {
    for (int32_t b : h.blocks) pool_->AddRef(b);  // blocks are shared
  }
  // Shared blocks are copied before they are written: both needs change.
  p.next_need.assign(p.heads.size(), NextTokenNeed{});
  seq->next_need.assign(seq->heads.size(), NextTokenNeed{});
  const SeqId id = next_id_++;
  seqs_.emplace(id, std::move(seq));
  return id;
}

absl::Status KvStore::FreezeEviction(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return NoSuchSequence(id);
  Sequence& s = *it->second;
  if (s.broken || !ResolveDeferred(s)) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot freeze sequence ", id, ": its cache is inconsistent"));
  }
  s.awaiting_weights = 0;  // a frozen sequence picks no more victims
  for (HeadState& h : s.heads) {
    h.victim = -1;
    if (!ring_) continue;
    // The ring holds the last w + 1 tokens; a flagged one among them has not left yet and now
    // never will.
    const int64_t R = static_cast<int64_t>(h.ring.size());
    for (int64_t k = std::max<int64_t>(0, s.length - w_ - 1); k < s.length; ++k) {
      int32_t& e = h.ring[k % R];
      if (RingFlagged(e)) {
        e = RingEntry(RingSlot(e), false);
        --h.flagged;
      }
    }
  }
  s.frozen = true;
  s.next_need.assign(s.heads.size(), NextTokenNeed{});
  return absl::OkStatus();
}

absl::Status KvStore::Free(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return NoSuchSequence(id);
  Sequence& s = *it->second;
  for (const HeadState& h : s.heads) {
    for (int32_t b : h.blocks) pool_->Release(b);
  }
  total_reserved_ -= s.reserved;
  seqs_.erase(it);
  return absl::OkStatus();
}

int64_t KvStore::Length(SeqId id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? -1 : it->second->length;
}

absl::Status KvStore::Reserve(SeqId id, int32_t n_new) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return NoSuchSequence(id);
  Sequence& s = *it->second;
  if (s.broken) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, " is inconsistent (AttendAndAppend without a successful Reserve, or "
        "layers out of order); free it and recompute"));
  }
  if (n_new < 0) return absl::InvalidArgumentError("Reserve: negative token count");
  if (AwaitingBits(s)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, " is inconsistent (the decision bits of its last decode step were "
        "never supplied); free it and recompute"));
  }
  if (s.awaiting_weights > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, " is inconsistent (the attention weights of its last decode step were "
        "never supplied); free it and recompute"));
  }
  int64_t need = 0;
  for (int32_t l = 0; l < geo_.n_layers; ++l) {
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      const size_t idx = static_cast<size_t>(l) * geo_.n_kv_heads + j;
      if (n_new == 1 && s.next_need[idx].at == s.length) {
        need += s.next_need[idx].blocks;
      } else {
        if (j == 0) ResolveDeferred(s, l);  // the flags it reads must be in the ring
        need += BlocksNeeded(s.heads[idx], l, j, s.length, n_new, false, s.frozen);
      }
    }
  }
  const int64_t others = total_reserved_ - s.reserved;
  const int64_t available = pool_->free_blocks() - others;
  if (need > available) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache full: sequence %d needs %d more blocks for %d new tokens but only %d are "
        "available (%d free, %d promised to other sequences, %d in the pool of %d bytes each, "
        "%d bytes in all); raise --kv-budget, or run fewer or shorter sequences at once",
        id, need, n_new, std::max<int64_t>(available, 0), pool_->free_blocks(), others,
        pool_->total_blocks(), pool_->block_bytes(), pool_->total_blocks() * pool_->block_bytes()));
  }
  total_reserved_ += need - s.reserved;
  s.reserved = need;
  return absl::OkStatus();
}

// ---- figures and views ------------------------------------------------------------------------

KvFigures KvStore::Figures() const {
  KvFigures f = EmptyFigures();
  for (const auto& [id, s] : seqs_) AddFigures(*s, f);
  f.blocks_held = pool_->total_blocks() - pool_->free_blocks();
  f.kv_bytes = f.blocks_held * pool_->block_bytes();
  return f;
}

KvFigures KvStore::Figures(SeqId id) const {
  KvFigures f = EmptyFigures();
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return f;
  AddFigures(*it->second, f);
  int64_t held = 0;
  for (const HeadState& h : it->second->heads) held += static_cast<int64_t>(h.blocks.size());
  f.blocks_held = held;
  f.kv_bytes = held * pool_->block_bytes();
  return f;
}

std::vector<int32_t> KvStore::ResidentPositions(SeqId id, int32_t layer, int32_t head) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers || head < 0 ||
      head >= geo_.n_kv_heads) {
    return {};
  }
  const HeadState& h = it->second->heads[static_cast<size_t>(layer) * geo_.n_kv_heads + head];
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(Resident(h)));
  for (int32_t sl = 0; sl < h.n; ++sl) {
    if (h.pos[sl] != kv_store_internal::kDeadSlot) out.push_back(h.pos[sl]);
  }
  std::sort(out.begin(), out.end());
  return out;
}

KvFigures KvStore::EmptyFigures() const {
  KvFigures f;
  f.per_layer.resize(geo_.n_layers);
  f.per_head.resize(static_cast<size_t>(geo_.n_layers) * geo_.n_kv_heads);
  return f;
}

void KvStore::AddFigures(const Sequence& s, KvFigures& f) const {
  for (int32_t l = 0; l < geo_.n_layers; ++l) {
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      const size_t idx = static_cast<size_t>(l) * geo_.n_kv_heads + j;
      const HeadState& h = s.heads[idx];
      const int64_t flagged = h.flagged + PendingFlag(s, l, j, h.logical - 2);
      for (KvHeadFigures* t : {&f.per_layer[l], &f.per_head[idx]}) {
        t->logical += h.logical;
        t->resident += Resident(h);
        t->flagged += flagged;
        t->kv_reads += h.kv_reads;
        t->dense_reads += h.dense_reads;
      }
      f.logical_tokens += h.logical;
      f.resident_tokens += Resident(h);
      f.flagged_tokens += flagged;
      f.kv_reads += h.kv_reads;
      f.dense_reads += h.dense_reads;
      f.dense_blocks += (h.logical + geo_.block_tokens - 1) / geo_.block_tokens;
    }
  }
}

absl::Status KvStore::NoSuchSequence(SeqId id) {
  return absl::NotFoundError(absl::StrCat("no KV sequence with id ", id));
}

// ---- KvIndex ----------------------------------------------------------------------------------

absl::Status KvStore::SetDeferredBits(SeqId id, const uint8_t* bits, int64_t layer_stride) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return NoSuchSequence(id);
  Sequence& s = *it->second;
  bool all_awaiting = s.deferred_layers == geo_.n_layers;
  for (int32_t l = 0; l < geo_.n_layers && all_awaiting; ++l) {
    all_awaiting = s.deferred_state[l] == kDeferAwaiting;
  }
  if (!all_awaiting) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SetDeferredBits: sequence ", id,
        " has no decode step whose every layer was committed without its bits"));
  }
  const int32_t nkv = geo_.n_kv_heads;
  for (int32_t l = 0; l < geo_.n_layers; ++l) {
    std::copy_n(bits + l * layer_stride, nkv, s.deferred_bits.begin() + static_cast<int64_t>(l) * nkv);
    s.deferred_state[l] = kDeferKnown;
  }
  return absl::OkStatus();
}

absl::Status KvStore::SetVictimWeights(SeqId id, const float* w, int64_t layer_stride,
                                       int64_t head_stride) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return NoSuchSequence(id);
  Sequence& s = *it->second;
  if (!victim_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SetVictimWeights: KV policy ", KvPolicyName(pol_.kind), " takes no attention weights"));
  }
  if (s.frozen) return absl::OkStatus();
  if (s.awaiting_weights != geo_.n_layers) {
    return absl::FailedPreconditionError(absl::StrCat(
        "SetVictimWeights: sequence ", id, " has no decode step whose every layer awaits them"));
  }
  for (int32_t l = 0; l < geo_.n_layers; ++l) {
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      HeadState& h = s.heads[static_cast<size_t>(l) * geo_.n_kv_heads + j];
      // One row per head: the weights are the group's mean already.
      PickVictim(h, w + l * layer_stride + j * head_stride, /*group=*/1, h.logical - 1);
    }
  }
  s.awaiting_weights = 0;
  return absl::OkStatus();
}

void KvStore::PrefetchCommit(SeqId id, int32_t layer) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers) return;
  const Sequence& s = *it->second;
  const size_t base = static_cast<size_t>(layer) * geo_.n_kv_heads;
  const int64_t P = s.length;
  for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
    const HeadState& h = s.heads[base + j];
    // The ring entries of the tokens flagged and leaving now, and the ends the appends grow.
    if (!h.ring.empty()) {
      const int64_t R = static_cast<int64_t>(h.ring.size());
      __builtin_prefetch(h.ring.data() + (P + R - 1) % R, 1);
      __builtin_prefetch(h.ring.data() + (P + R - w_ - 1) % R, 1);
    }
    if (h.n > 0) {
      __builtin_prefetch(h.pos.data() + h.n - 1, 1);
      __builtin_prefetch(h.blocks.data() + (h.n - 1) / geo_.block_tokens, 1);
    }
    __builtin_prefetch(&s.next_need[base + j], 1);
  }
}

void KvStore::HeadViews(SeqId id, int32_t layer, KvHeadView* out) const {
  auto it = seqs_.find(id);
  const bool known = it != seqs_.end() && layer >= 0 && layer < geo_.n_layers;
  for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
    if (!known) {
      out[j] = KvHeadView{};
      continue;
    }
    const HeadState& h = it->second->heads[static_cast<size_t>(layer) * geo_.n_kv_heads + j];
    out[j] = KvHeadView{h.blocks.data(), static_cast<int32_t>(h.blocks.size()), h.n, Resident(h)};
  }
}

int64_t KvStore::FirstFlaggable(SeqId id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? std::numeric_limits<int64_t>::max() : FirstFlaggable(*it->second);
}

void KvStore::FlaggedSlots(SeqId id, int32_t layer, int32_t head, uint8_t boundary_bit,
                           std::vector<std::pair<int32_t, int32_t>>* out) const {
  out->clear();
  auto it = seqs_.find(id);
  if (!ring_ || it == seqs_.end() || layer < 0 || layer >= geo_.n_layers || head < 0 ||
      head >= geo_.n_kv_heads) {
    return;
  }
  const Sequence& s = *it->second;
  const HeadState& h = s.heads[static_cast<size_t>(layer) * geo_.n_kv_heads + head];
  const int64_t P = s.length;
  const int64_t R = static_cast<int64_t>(h.ring.size());
  const int32_t bt = geo_.block_tokens;
  // Flagged tokens before P - w - 1 have left; the ring holds the last w + 1.
  for (int64_t k = std::max<int64_t>(0, P - w_ - 1); k < P; ++k) {
    const int32_t slot = RingSlot(h.ring[k % R]);
    const bool flagged = k == P - 1 ? boundary_bit != 0 && MayFlag(s, k)
                                    : RingFlagged(h.ring[k % R]) || PendingFlag(s, layer, head, k);
    if (!flagged) continue;
    out->emplace_back(h.blocks[slot / bt] * bt + slot % bt, static_cast<int32_t>(k + w_));
  }
}

// ---- commits ----------------------------------------------------------------------------------

const uint8_t* KvStore::StepBits(const Sequence& s, const HeadState* heads, int32_t layer,
                                 int64_t P, int32_t n, const uint8_t* evict, const float* k) {
  if (!ring_) return nullptr;
  const size_t count = static_cast<size_t>(n) * geo_.n_kv_heads;
  if (bits_.size() < count) bits_.resize(count);
  if (s.frozen) {  // nothing is flagged any more
    std::fill(bits_.begin(), bits_.begin() + static_cast<std::ptrdiff_t>(count), 0);
    return bits_.data();
  }
  KvStepInputs in;
  in.evict = evict;
  in.k = k;
  if (k != nullptr && P >= 1 && policy_->previous_key()) {
    // Token P-1 is the newest entry of every head's ring; its key is in its slot.
    const int32_t bt = geo_.block_tokens;
    const int32_t hd = geo_.head_dim;
    prev_key_.resize(static_cast<size_t>(geo_.n_kv_heads) * hd);
    for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
      const HeadState& h = heads[j];
      const int32_t slot = RingSlot(h.ring[(P - 1) % static_cast<int64_t>(h.ring.size())]);
      const float* row = pool_->keys(h.blocks[slot / bt]) + static_cast<int64_t>(slot % bt) * hd;
      std::copy_n(row, hd, prev_key_.data() + static_cast<size_t>(j) * hd);
    }
    in.k_prev = prev_key_.data();
  }
  policy_->Decisions(layer, P, n, in, bits_.data());
  return bits_.data();
}

// CommitRows and CommitDecodeDeferred. A deferred commit runs as one with model bits and
// evict == nullptr (d[t] = 0: flag(t-1) is left alone) and leaves the layer awaiting its bits.
bool KvStore::CommitChunk(SeqId id, int32_t layer, int32_t n, int32_t row0, const uint8_t* evict,
                          bool defer, KvSlotSink& sink, bool decode_run) {
  if (n <= 0) return true;
  auto it = seqs_.find(id);
  if (it == seqs_.end() || layer < 0 || layer >= geo_.n_layers) return false;
  Sequence& s = *it->second;
  const int64_t P = s.length;
  HeadState* heads = &s.heads[static_cast<size_t>(layer) * geo_.n_kv_heads];
  const bool defer_ok = !defer || (model_bits_ && ring_ && w_ >= 1 && n == 1);
  // Victim policies: one token, and the weights of the layer's previous one given.
  const bool victim_ok =
      !victim_ || (n == 1 && !decode_run && !defer && (s.frozen || layer == s.awaiting_weights));
  if (!index_only_ || !victim_ok || !defer_ok || s.broken || heads[0].logical != P ||
      (decode_run && model_bits_) || !ResolveDeferred(s, layer)) {
    s.broken = true;
    return false;
  }
  const int32_t nkv = geo_.n_kv_heads;
  const uint8_t* bits = StepBits(s, heads, layer, P, n, evict, nullptr);
  if (n > 1 && !decode_run) CountPrefillReads(heads, n, P, bits);
  sink_ = &sink;
  for (int32_t j = 0; j < nkv && !s.broken; ++j) {
    for (int32_t i = 0; i < n; ++i) {
      if (!Commit(s, heads[j], P + i, BitAt(bits, nkv, i, j), nullptr, nullptr,
                  decode_run ? row0 : row0 + i, j)) {
        s.broken = true;
        break;
      }
      if (decode_run) {  // what one decode step reads: every slot resident after its commit
        heads[j].kv_reads += Resident(heads[j]);
        heads[j].dense_reads += P + i + 1;
      }
    }
    if (n == 1 && !decode_run && !s.broken) {
      heads[j].kv_reads += Resident(heads[j]);
      heads[j].dense_reads += P + 1;
    }
  }
  sink_ = nullptr;
  if (s.broken) return false;
  if (victim_ && !s.frozen) ++s.awaiting_weights;
  EndLayer(s, layer, P + n, defer);
  if (defer) {
    if (s.deferred_state.empty()) {
      s.deferred_state.assign(geo_.n_layers, kDeferNone);
      s.deferred_bits.assign(s.heads.size(), 0);
    }
    s.deferred_state[layer] = kDeferAwaiting;
    ++s.deferred_layers;
  }
  return true;
}

// Reads of the caller's prefill attention, before the commit (same counts as the CPU path: per
// query, the visible old slots plus the visible keys of the chunk).
void KvStore::CountPrefillReads(HeadState* heads, int32_t n, int64_t P, const uint8_t* bits) {
  const int32_t nkv = geo_.n_kv_heads;
  for (int32_t j = 0; j < nkv; ++j) {
    HeadState& h = heads[j];
    int64_t reads = 0;
    for (int32_t i = 0; i < n; ++i) reads += static_cast<int64_t>(Resident(h)) + i + 1;
    if (ring_) {
      // A flagged key k is hidden from the queries after k + w.
      const int64_t last_q = P + n - 1;
      auto hidden = [&](int64_t k) { return std::clamp<int64_t>(last_q - (k + w_), 0, n); };
      const int64_t R = static_cast<int64_t>(h.ring.size());
      for (int64_t k = std::max<int64_t>(0, P - w_ - 1); k < P; ++k) {
        const bool flagged =
            k == P - 1 ? BitAt(bits, nkv, 0, j) != 0 : RingFlagged(h.ring[k % R]);
        if (flagged) reads -= hidden(k);
      }
      for (int32_t c = 0; c + 1 < n; ++c) {
        if (BitAt(bits, nkv, c + 1, j)) reads -= hidden(P + c);
      }
    }
    h.kv_reads += reads;
    for (int32_t i = 0; i < n; ++i) h.dense_reads += P + i + 1;
  }
}

// After each layer, while its heads are in cache: what each may take for the next token. After
// the last layer the step is over: the sequence advances and gives back the part of its
// reservation it did not use. With `deferred`, flag(new_length - 2) is not in the ring yet.
void KvStore::EndLayer(Sequence& s, int32_t layer, int64_t new_length, bool deferred) {
  const size_t base = static_cast<size_t>(layer) * geo_.n_kv_heads;
  for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
    const int64_t blocks = BlocksNeeded(s.heads[base + j], layer, j, new_length, 1, deferred, s.frozen);
    s.next_need[base + j] = NextTokenNeed{new_length, static_cast<int32_t>(blocks)};
  }
  if (layer != geo_.n_layers - 1) return;
  s.length = new_length;
  total_reserved_ -= s.reserved;
  s.reserved = 0;
}

// Sets flag(k) (k >= 0) in the ring of `h`.
void KvStore::SetFlag(HeadState& h, int64_t k) {
  int32_t& e = h.ring[k % static_cast<int64_t>(h.ring.size())];
  if (!RingFlagged(e)) {
    e = RingEntry(RingSlot(e), true);
    ++h.flagged;
  }
}

// Deferred bits (see Sequence): applies a layer's given bits to the ring; false while they are
// still awaited. The bit of layer l, head j is d[t] of the head's last token t, so it flags
// token t - 1 = logical - 2.
bool KvStore::ResolveDeferred(Sequence& s, int32_t layer) {
  if (s.deferred_layers == 0 || s.deferred_state[layer] == kDeferNone) return true;
  if (s.deferred_state[layer] == kDeferAwaiting) return false;
  const size_t base = static_cast<size_t>(layer) * geo_.n_kv_heads;
  for (int32_t j = 0; j < geo_.n_kv_heads; ++j) {
    HeadState& h = s.heads[base + j];
    if (s.deferred_bits[base + j] != 0 && MayFlag(s, h.logical - 2)) {
      SetFlag(h, h.logical - 2);
    }
  }
  s.deferred_state[layer] = kDeferNone;
  --s.deferred_layers;
  return true;
}

bool KvStore::ResolveDeferred(Sequence& s) {
  for (int32_t l = 0; l < geo_.n_layers && s.deferred_layers > 0; ++l) {
    if (!ResolveDeferred(s, l)) return false;
  }
  return true;
}

bool KvStore::AwaitingBits(const Sequence& s) const {
  for (int32_t l = 0; l < geo_.n_layers && s.deferred_layers > 0; ++l) {
    if (s.deferred_state[l] == kDeferAwaiting) return true;
  }
  return false;
}

// For readers that cannot apply them: 1 if a given, unapplied bit of (layer, j) flags token `k`,
// else 0.
int KvStore::PendingFlag(const Sequence& s, int32_t layer, int32_t j, int64_t k) const {
  if (s.deferred_layers == 0 || s.deferred_state[layer] != kDeferKnown) return 0;
  const size_t idx = static_cast<size_t>(layer) * geo_.n_kv_heads + j;
  return s.deferred_bits[idx] != 0 && MayFlag(s, k) && k == s.heads[idx].logical - 2 ? 1 : 0;
}

// Upper bound on the blocks one head takes while appending n_new tokens at positions P..: new
// blocks for appended slots plus copies of shared blocks that will be written.
// `flag_pending`: flag(P - 2) is deferred (not in the ring yet), so it counts as unknown.
int64_t KvStore::BlocksNeeded(const HeadState& h, int32_t layer, int32_t j, int64_t P,
                              int32_t n_new, bool flag_pending, bool frozen) {
  const int32_t bt = geo_.block_tokens;
  int64_t appends = 0;
  cow_scratch_.clear();
  if (ring_) {
    appends = RingAppends(h, layer, j, P, n_new, flag_pending);
  } else if (!victim_ || frozen) {
    appends = n_new;
  } else {
    appends = std::max<int64_t>(0, std::min<int64_t>(h.n + n_new, budget_) - h.n);
    // Victims can be anywhere: every shared block may be written, one per token at most.
    int64_t shared = 0;
    for (int32_t b : h.blocks) shared += pool_->refcount(b) > 1;
    int64_t cow = std::min<int64_t>(shared, n_new);
    const int64_t new_blocks = (h.n + appends + bt - 1) / bt - static_cast<int64_t>(h.blocks.size());
    return new_blocks + cow;
  }
  if (appends > 0 && h.n % bt != 0) cow_scratch_.push_back(h.blocks.back());
  std::sort(cow_scratch_.begin(), cow_scratch_.end());
  cow_scratch_.erase(std::unique(cow_scratch_.begin(), cow_scratch_.end()), cow_scratch_.end());
  int64_t cow = 0;
  for (int32_t b : cow_scratch_) cow += pool_->refcount(b) > 1;
  const int64_t new_blocks =
      (h.n + appends + bt - 1) / bt - static_cast<int64_t>(h.blocks.size());
  return new_blocks + cow;
}

// kFlagged part of BlocksNeeded: the appends of tokens P .. P+n_new-1 (an upper bound), with the
// blocks of slots they may recycle pushed onto cow_scratch_.
int64_t KvStore::RingAppends(const HeadState& h, int32_t layer, int32_t j, int64_t P,
                             int32_t n_new, bool flag_pending) {
  const int64_t ring_known_to = P - 2 - (flag_pending ? 1 : 0);  // flags in the ring: k <= this
  const int32_t bt = geo_.block_tokens;
  const int64_t R = static_cast<int64_t>(h.ring.size());
  const int64_t end = P + n_new;  // tokens P .. end-1 arrive; token t evicts kk = t - w - 1
  // kk < 0: nothing leaves, the token appends.
  const int64_t first_leaving = std::max<int64_t>(P, static_cast<int64_t>(w_) + 1);
  int64_t appends = std::min(end, first_leaving) - P;
  // 0 <= kk < P: an old token leaves (at most min(P, w+1) of them, all in the ring).
  const int64_t old_end = std::min<int64_t>(end, P + w_ + 1);
  for (int64_t t = first_leaving; t < old_end; ++t) {
    const int64_t kk = t - w_ - 1;
    const int32_t slot = RingSlot(h.ring[kk % R]);
    const int f =
        kk <= ring_known_to ? RingFlagged(h.ring[kk % R]) : policy_->KnownFlag(layer, j, kk);
    const int32_t b = h.blocks[slot / bt];
    // Left dead instead of recycled (LeavesDead, from the block's counts and the ring, which an
    // earlier leaver of a chunk may change, or a pending flag hides): one token decides as its
    // commit will, a chunk counts both outcomes.
    bool dies = false, recycles = true;
    if (dead_slots_ && pool_->refcount(b) > 1) {
      const bool decided = n_new == 1 && !flag_pending;
      const bool dead = decided && LeavesDead(h, slot, t);
      dies = !decided || dead;
      recycles = !decided || !dead;
    }
    if (f != 0 && recycles) cow_scratch_.push_back(b);  // recycled (maybe)
    if (f != 1 || dies) ++appends;                      // appended (maybe)
  }
  // kk >= P: a token of this step leaves; its slot is private by then, so only whether it is
  // recycled matters. Counted exactly where the policy fixes the flags.
  const int64_t lo = std::max(first_leaving, old_end);
  if (lo < end) appends += policy_->MaybeUnflagged(layer, j, lo - w_ - 1, end - w_ - 1);
  return appends;
}

// A block for `s`, taken from its reservation; -1 if that would eat blocks promised to others.
int32_t KvStore::TakeBlock(Sequence& s) {
  if (s.reserved > 0) {
    --s.reserved;
    --total_reserved_;
  } else if (pool_->free_blocks() <= total_reserved_) {
    return -1;
  }
  return pool_->Allocate();
}

// Appends a slot (a new block on a block boundary); -1 when out of blocks.
int32_t KvStore::AppendSlot(Sequence& s, HeadState& h) {
  if (h.n % geo_.block_tokens == 0) {
    const int32_t b = TakeBlock(s);
    if (b < 0) return -1;
    h.blocks.push_back(b);
  }
  h.pos.push_back(0);
  if (slot_scores_) h.score.push_back(0.0f);
  return h.n++;
}

// Dead slots: whether the token leaving `slot` as token t arrives leaves it dead rather than
// copy its block. Only in a shared block, and only while more than half of the block stays
// resident for this sequence once it and the flagged tokens behind it in the ring (which leave
// within w tokens) have left: sharing a block of which it keeps little would cost it more
// appended slots than the copy's free ones (a windowed fork keeps just its prompt's sinks; a
// short prompt's ring may sit in one block). Reads the ring up to token t-2: the flag of t-1 is
// set by t's own bit, which Reserve does not know yet.
bool KvStore::LeavesDead(const HeadState& h, int32_t slot, int64_t t) const {
  if (!dead_slots_) return false;
  const int32_t bt = geo_.block_tokens;
  const int32_t e = slot / bt;
  if (pool_->refcount(h.blocks[e]) <= 1) return false;
  const int64_t R = static_cast<int64_t>(h.ring.size());
  int32_t leaving = 1;
  for (int64_t k = std::max<int64_t>(0, t - w_); k <= t - 2; ++k) {
    const int32_t entry = h.ring[k % R];
    leaving += RingFlagged(entry) && RingSlot(entry) / bt == e;
  }
  const int32_t slots = std::min(bt, h.n - e * bt);
  const int32_t dead = static_cast<size_t>(e) < h.dead_in_block.size() ? h.dead_in_block[e] : 0;
  return 2 * (slots - dead - leaving) > bt;
}

// Dead slots: the token in `slot` (of a shared block) left and the block stays as it is.
void KvStore::KillSlot(HeadState& h, int32_t slot, int32_t head) {
  h.pos[slot] = kv_store_internal::kDeadSlot;
  ++h.dead;
  if (h.dead_in_block.size() < h.blocks.size()) h.dead_in_block.resize(h.blocks.size(), 0);
  ++h.dead_in_block[slot / geo_.block_tokens];
  if (sink_ != nullptr) sink_->DeadSlot(head);
}

// Writes K/V of one token into `slot`, copying a shared block first.
// Index only: nothing is stored; the sink gets the copy and the write (row, head, pos).
bool KvStore::WriteSlot(Sequence& s, HeadState& h, int32_t slot, const float* krow,
                        const float* vrow, int32_t row, int32_t head, int64_t pos) {
  const int32_t bt = geo_.block_tokens;
  const int32_t hd = geo_.head_dim;
  int32_t& b = h.blocks[slot / bt];
  if (pool_->refcount(b) > 1) {
    const int32_t nb = TakeBlock(s);
    if (nb < 0) return false;
    if (sink_ != nullptr) {
      sink_->CopyBlock(b, nb);
    } else {
      std::memcpy(pool_->keys(nb), pool_->keys(b), static_cast<size_t>(pool_->block_bytes()));
    }
    pool_->Release(b);
    b = nb;
  }
  if (sink_ != nullptr) {
    sink_->WriteSlot(row, head, b, slot % bt, static_cast<int32_t>(pos), slot / bt);
    return true;
  }
  const int64_t off = static_cast<int64_t>(slot % bt) * hd;
  std::memcpy(pool_->keys(b) + off, krow, sizeof(float) * hd);
  std::memcpy(pool_->values(b) + off, vrow, sizeof(float) * hd);
  return true;
}

// The slot bookkeeping of the policy's mechanism for token t with decision bit d = d[t]; writes
// its K/V.
bool KvStore::Commit(Sequence& s, HeadState& h, int64_t t, uint8_t d, const float* krow,
                     const float* vrow, int32_t row, int32_t head) {
  int32_t slot = -1;
  if (ring_) {
    const int64_t R = static_cast<int64_t>(h.ring.size());
    // flag(t-1) = d[t] (set first so that w = 0 recycles t-1 at once).
    if (t >= 1 && d) SetFlag(h, t - 1);
    const int64_t leaving = t - w_ - 1;
    if (leaving >= 0) {
      const int32_t old = h.ring[leaving % R];
      if (RingFlagged(old)) slot = RingSlot(old);
      if (slot >= 0 && LeavesDead(h, slot, t)) {
        KillSlot(h, slot, head);  // the shared block is kept, not copied
        slot = -1;
      }
    }
    if (slot < 0) slot = AppendSlot(s, h);
    if (slot < 0) return false;
    h.ring[t % R] = RingEntry(slot, false);
  } else if (h.victim >= 0) {
    slot = h.victim;
    h.victim = -1;
  } else {
    slot = AppendSlot(s, h);
    if (slot < 0) return false;
  }
  if (!WriteSlot(s, h, slot, krow, vrow, row, head, t)) return false;
  h.pos[slot] = static_cast<int32_t>(t);
  if (slot_scores_) h.score[slot] = 0.0f;
  ++h.logical;
  return true;
}

}  // namespace dmsrt
