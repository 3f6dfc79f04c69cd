// Leader-driven tensor-parallel replica (see tp_replica.h): the plan encoding, the leader's
// Backend and KvCache facades that broadcast before acting, and the followers' loop.
#include "runtime/engine/tp_replica.h"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "parallel/comm.h"
#include "parallel/status_macros.h"

namespace dmsrt {
namespace {

enum PlanOp : int32_t {
  kForward = 1,
  kCreate = 2,
  kFork = 3,
  kFree = 4,
  kReserve = 5,
  kShutdown = 6,
  kFigures = 7,
  kPing = 8,
  kAppendUncomputed = 9,
};

using Plan = std::vector<int32_t>;

// The logits mode (0 none, 1 last, 2 all) plus kSampleBit when the chunk samples: every rank
// must compute the same logits rows (a device backend gathers them over the group).
constexpr int32_t kSampleBit = 4;

int32_t LogitsCode(const SeqChunk& c) {
  int32_t code = 1;
  switch (c.logits) {
    case SeqChunk::Logits::kNone: code = 0; break;
    case SeqChunk::Logits::kLast: code = 1; break;
    case SeqChunk::Logits::kAll: code = 2; break;
  }
  return code | (c.sample ? kSampleBit : 0);
}

// A double in two int32 plan words, and back.
void PutDouble(double v, Plan* p) {
  int32_t w[2];
  static_assert(sizeof(w) == sizeof(v), "two words hold a double");
  std::memcpy(w, &v, sizeof(v));
  p->push_back(w[0]);
  p->push_back(w[1]);
}
double GetDouble(const int32_t* w) {
  double v = 0;
  std::memcpy(&v, w, sizeof(v));
  return v;
}

Plan EncodeForward(const std::vector<SeqChunk>& batch) {
  Plan p = {kForward, static_cast<int32_t>(batch.size())};
  for (const SeqChunk& c : batch) {
    p.push_back(c.seq);
    p.push_back(LogitsCode(c));
    p.push_back(static_cast<int32_t>(c.tokens.size()));
    p.insert(p.end(), c.tokens.begin(), c.tokens.end());
  }
  return p;
}

absl::StatusOr<std::vector<SeqChunk>> DecodeForward(const Plan& p) {
  auto bad = [] { return absl::DataLossError("malformed forward plan from the TP leader"); };
  if (p.size() < 2) return bad();
  const int64_t n = p[1];
  size_t at = 2;
  std::vector<SeqChunk> batch;
  for (int64_t i = 0; i < n; ++i) {
    if (at + 3 > p.size()) return bad();
    SeqChunk c;
    c.seq = p[at];
    const int32_t mode = p[at + 1];
    const int64_t len = p[at + 2];
    at += 3;
    const int32_t logits = mode & ~kSampleBit;
    if (mode < 0 || logits > 2 || len < 0 || at + static_cast<size_t>(len) > p.size()) return bad();
    c.logits = logits == 0 ? SeqChunk::Logits::kNone
                           : (logits == 1 ? SeqChunk::Logits::kLast : SeqChunk::Logits::kAll);
    c.sample = (mode & kSampleBit) != 0;  // the leader alone samples; the rows are what matter
    c.tokens.assign(p.begin() + at, p.begin() + at + len);
    at += static_cast<size_t>(len);
    batch.push_back(std::move(c));
  }
  if (at != p.size()) return bad();
  return batch;
}

// The TP rank that DMSRT_TEST_FAIL_RANK names, or -1.
int InjectedFailRank() {
  const char* v = std::getenv("DMSRT_TEST_FAIL_RANK");
  int r = -1;
  if (v == nullptr || !absl::SimpleAtoi(v, &r)) return -1;
  return r;
}

// How that rank fails (DMSRT_TEST_FAIL_HOW): an error (the default), killed, or stuck.
enum class FailHow { kError, kKill, kStall };
FailHow InjectedFailHow() {
  const char* v = std::getenv("DMSRT_TEST_FAIL_HOW");
  if (v != nullptr && std::string(v) == "kill") return FailHow::kKill;
  if (v != nullptr && std::string(v) == "stall") return FailHow::kStall;
  return FailHow::kError;
}

// Errors that every rank of the group meets alike for the same plan (the followers keep going).
bool Deterministic(const absl::Status& s) {
  return absl::IsInvalidArgument(s) || absl::IsNotFound(s) || absl::IsResourceExhausted(s) ||
         absl::IsFailedPrecondition(s);
}

// What every rank does with one plan. Returns the status of this rank's part; `shutdown` is set
// by the shutdown plan. `forwarded` counts forward steps (for the failure hook).
struct Executor {
  Backend* local = nullptr;
  int rank = 0;
  int fail_rank = -1;
  FailHow fail_how = FailHow::kError;
  int64_t forwards = 0;

  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) {
    if (forwards++ == 0 && rank == fail_rank) {
      if (fail_how == FailHow::kKill) std::raise(SIGKILL);
      if (fail_how == FailHow::kStall) {
        while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
      }
      return absl::DataLossError(
          absl::StrCat("injected failure (DMSRT_TEST_FAIL_RANK=", fail_rank, ")"));
    }
    return local->Forward(batch);
  }
};

// All ranks: min over ranks of (ok, free blocks). Returns {all_ok, agreed_free}.
absl::StatusOr<std::pair<bool, int64_t>> Agree(Communicator* comm, bool ok, int64_t free_blocks) {
  int64_t v[2] = {ok ? 1 : 0, free_blocks};
  DMSRT_RETURN_IF_ERROR(comm->host()->AllReduce(v, v, 2, ReduceOp::kMin));
  return std::make_pair(v[0] == 1, v[1]);
}

// All ranks: the group's KV figures (every field summed over ranks; per-head figures placed at
// their global head). `all` = every sequence, else `seq`.
absl::StatusOr<KvFigures> GroupFigures(Communicator* comm, const KvCache& kv, bool all,
                                       SeqId seq) {
  const KvFigures mine = all ? kv.Figures() : kv.Figures(seq);
  const KvGeometry& g = kv.geometry();
  const int tp = comm->size();
  auto put = [](const KvHeadFigures& h, int64_t* v) {
    v[0] = h.logical, v[1] = h.resident, v[2] = h.flagged, v[3] = h.kv_reads;
    v[4] = h.dense_reads;
  };
  auto get = [](const int64_t* v) {
    KvHeadFigures h;
    h.logical = v[0], h.resident = v[1], h.flagged = v[2], h.kv_reads = v[3];
    h.dense_reads = v[4];
    return h;
  };
  // Totals and per layer: summed.
  const size_t layers = static_cast<size_t>(g.n_layers);
  std::vector<int64_t> sums = {mine.logical_tokens, mine.resident_tokens, mine.flagged_tokens,
                               mine.kv_reads,       mine.dense_reads,     mine.blocks_held,
                               mine.dense_blocks,   mine.kv_bytes};
  const size_t base = sums.size();
  sums.resize(base + layers * 5, 0);
  for (size_t l = 0; l < layers && l < mine.per_layer.size(); ++l) {
    put(mine.per_layer[l], &sums[base + l * 5]);
  }
  DMSRT_RETURN_IF_ERROR(comm->host()->AllReduce(sums.data(), sums.data(),
                                                static_cast<int64_t>(sums.size()), ReduceOp::kSum));
  // Per head: gathered; rank r holds global KV heads [r * n_kv, (r + 1) * n_kv).
  const size_t local_heads = layers * static_cast<size_t>(g.n_kv_heads);
  std::vector<int64_t> heads(local_heads * 5, 0), all_heads(heads.size() * tp);
  for (size_t i = 0; i < local_heads && i < mine.per_head.size(); ++i) {
    put(mine.per_head[i], &heads[i * 5]);
  }
  DMSRT_RETURN_IF_ERROR(comm->host()->AllGatherBytes(
      heads.data(), static_cast<int64_t>(heads.size() * sizeof(int64_t)), all_heads.data()));

  KvFigures f;
  f.logical_tokens = sums[0], f.resident_tokens = sums[1], f.flagged_tokens = sums[2];
  f.kv_reads = sums[3], f.dense_reads = sums[4], f.blocks_held = sums[5];
  f.dense_blocks = sums[6], f.kv_bytes = sums[7];
  for (size_t l = 0; l < layers; ++l) f.per_layer.push_back(get(&sums[base + l * 5]));
  const int32_t n_kv = g.n_kv_heads;
  f.per_head.resize(local_heads * tp);
  for (int r = 0; r < tp; ++r) {
    for (size_t l = 0; l < layers; ++l) {
      for (int32_t j = 0; j < n_kv; ++j) {
        const size_t src = (static_cast<size_t>(r) * local_heads + l * n_kv + j) * 5;
        f.per_head[l * n_kv * tp + static_cast<size_t>(r) * n_kv + j] = get(&all_heads[src]);
      }
    }
  }
  return f;
}

class TpLeaderBackend;

// The leader's KvCache: sequence operations go to every rank; queries answer for the leader's
// heads, except the pool figures, which are the group's agreed minimum.
class TpKvFacade final : public KvCache {
 public:
  explicit TpKvFacade(TpLeaderBackend* owner) : owner_(owner) {}
  const KvGeometry& geometry() const override;
  const KvPolicyConfig& policy() const override;
  bool dead_slots() const override;
  absl::StatusOr<SeqId> Create() override;
  absl::StatusOr<SeqId> Fork(SeqId parent) override;
  absl::Status Free(SeqId seq) override;
  int64_t Length(SeqId seq) const override;
  absl::Status Reserve(SeqId seq, int32_t n_new) override;
  void AttendAndAppend(SeqId seq, int32_t layer, int32_t n, const float* q, const float* k,
                       const float* v, const uint8_t* evict, float* out) override;
  void SetThreadPool(kernels::ThreadPool* pool) override;
  int64_t total_blocks() const override;
  int64_t free_blocks() const override;
  int64_t block_bytes() const override;
  KvFigures Figures() const override;
  KvFigures Figures(SeqId seq) const override;
  std::vector<int32_t> ResidentPositions(SeqId seq, int32_t layer, int32_t head) const override;

 private:
  TpLeaderBackend* owner_;
};

class TpLeaderBackend final : public Backend {
 public:
  TpLeaderBackend(std::unique_ptr<Backend> local, Communicator* comm)
      : local_(std::move(local)), comm_(comm), kv_(this) {
    exec_.local = local_.get();
    exec_.rank = comm_->rank();
    exec_.fail_rank = InjectedFailRank();
    exec_.fail_how = InjectedFailHow();
    agreed_free_ = local_->kv().free_blocks() * comm_->size();
    agreed_total_ = local_->kv().total_blocks() * comm_->size();
  }
  ~TpLeaderBackend() override { (void)Shutdown(); }

  // Agrees on the smallest pool size once, at start (pools are sized alike, but a rank's shard
  // may have a different block geometry in principle). Block counts are kept in group units
  // (tp x a rank's count), the unit of the group geometry (see tp_replica.h).
  absl::Status Init() {
    int64_t total = local_->kv().total_blocks();
    DMSRT_RETURN_IF_ERROR(comm_->host()->AllReduce(&total, &total, 1, ReduceOp::kMin));
    agreed_total_ = total * comm_->size();
    group_geometry_ = local_->kv().geometry();
    group_geometry_.n_kv_heads *= comm_->size();
    group_geometry_.n_heads *= comm_->size();
    group_geometry_.kv_head_offset = 0;
    return absl::OkStatus();
  }

  // The group's figures; the leader's own when the group cannot answer (after a failure).
  KvFigures Figures(bool all, SeqId seq) {
    const KvCache& mine = local_->kv();
    if (!Send({kFigures, all ? 1 : 0, seq}).ok()) return all ? mine.Figures() : mine.Figures(seq);
    absl::StatusOr<KvFigures> f = GroupFigures(comm_, mine, all, seq);
    if (!Settle(f.status(), "KV figures").ok() || !f.ok()) {
      return all ? mine.Figures() : mine.Figures(seq);
    }
    return *std::move(f);
  }
  const KvGeometry& group_geometry() const { return group_geometry_; }

  const char* name() const override { return local_->name(); }
  bool samples_on_device() const override { return local_->samples_on_device(); }

  absl::StatusOr<ForwardResult> Forward(const std::vector<SeqChunk>& batch) override {
    DMSRT_RETURN_IF_ERROR(Send(EncodeForward(batch)));
    absl::StatusOr<ForwardResult> r = exec_.Forward(batch);
    DMSRT_RETURN_IF_ERROR(Settle(r.status(), "forward step"));
    return r;
  }

  KvCache& kv() override { return kv_; }

  absl::Status AppendUncomputed(SeqId seq, int32_t n, double dms_flag_rate) override {
    Plan p = {kAppendUncomputed, seq, n};
    PutDouble(dms_flag_rate, &p);
    DMSRT_RETURN_IF_ERROR(Send(std::move(p)));
    return Settle(local_->AppendUncomputed(seq, n, dms_flag_rate), "uncomputed append");
  }

  int64_t DeviceBytesInUse() const override { return local_->DeviceBytesInUse(); }

  absl::Status Shutdown() {
    if (shut_down_ || !broken_.ok()) return absl::OkStatus();
    shut_down_ = true;
    Plan p = {kShutdown};
    return comm_->host()->BroadcastVector(&p, 0);
  }

  absl::Status Ping() {
    DMSRT_RETURN_IF_ERROR(Send({kPing}));
    return Settle(absl::OkStatus(), "keepalive");
  }

  const absl::Status& health() const { return broken_; }

  // ---- used by the facade ----
  absl::Status Send(Plan plan) {
    if (shut_down_) return absl::FailedPreconditionError("the TP group was shut down");
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("the TP group failed earlier: ", broken_.message()));
    }
    absl::Status s = comm_->host()->BroadcastVector(&plan, 0);
    if (!s.ok()) broken_ = s;
    return s;
  }
  // After the leader's own part: agree with the followers. Returns the leader's error if any,
  // else an error when a follower failed.
  absl::Status Settle(const absl::Status& mine, const char* what) {
    if (!mine.ok() && !Deterministic(mine)) {
      // The leader failed where the followers may not have: they can be inside collectives of
      // the step that the leader never joined, so agreeing now could pair mismatched collectives.
      // The group is out of step; stop talking to it (the caller stops the job).
      broken_ = mine;
      return mine;
    }
    absl::StatusOr<std::pair<bool, int64_t>> a =
        Agree(comm_, mine.ok(), local_->kv().free_blocks());
    if (!a.ok()) {
      broken_ = a.status();
      return mine.ok() ? a.status() : mine;
    }
    agreed_free_ = a->second * comm_->size();
    if (!mine.ok()) return mine;
    if (!a->first) {
      return absl::InternalError(absl::StrCat(
          what, " failed on another rank of the TP group ", comm_->Describe(),
          " (see that rank's error output)"));
    }
    return absl::OkStatus();
  }

  Backend& local() { return *local_; }
  int64_t agreed_free() const { return agreed_free_; }
  int64_t agreed_total() const { return agreed_total_; }

 private:
  std::unique_ptr<Backend> local_;
  Communicator* comm_;
  TpKvFacade kv_;
  Executor exec_;
  KvGeometry group_geometry_;  // the whole group's heads (set in Init)
  int64_t agreed_free_ = 0;
  int64_t agreed_total_ = 0;
  bool shut_down_ = false;
  absl::Status broken_;  // OK until a collective of the leader fails
};

const KvGeometry& TpKvFacade::geometry() const { return owner_->group_geometry(); }
const KvPolicyConfig& TpKvFacade::policy() const { return owner_->local().kv().policy(); }
bool TpKvFacade::dead_slots() const { return owner_->local().kv().dead_slots(); }

absl::StatusOr<SeqId> TpKvFacade::Create() {
  // The id this cache will give next is not known before creating, so the leader creates first
  // and sends the id it got; followers check theirs against it.
  absl::StatusOr<SeqId> id = owner_->local().kv().Create();
  if (!id.ok()) return id.status();  // nothing sent: no rank changed
  DMSRT_RETURN_IF_ERROR(owner_->Send({kCreate, *id}));
  DMSRT_RETURN_IF_ERROR(owner_->Settle(absl::OkStatus(), "sequence create"));
  return id;
}

absl::StatusOr<SeqId> TpKvFacade::Fork(SeqId parent) {
  absl::StatusOr<SeqId> id = owner_->local().kv().Fork(parent);
  if (!id.ok()) return id.status();
  DMSRT_RETURN_IF_ERROR(owner_->Send({kFork, parent, *id}));
  DMSRT_RETURN_IF_ERROR(owner_->Settle(absl::OkStatus(), "sequence fork"));
  return id;
}

absl::Status TpKvFacade::Free(SeqId seq) {
  DMSRT_RETURN_IF_ERROR(owner_->Send({kFree, seq}));
  return owner_->Settle(owner_->local().kv().Free(seq), "sequence free");
}

int64_t TpKvFacade::Length(SeqId seq) const { return owner_->local().kv().Length(seq); }

absl::Status TpKvFacade::Reserve(SeqId seq, int32_t n_new) {
  DMSRT_RETURN_IF_ERROR(owner_->Send({kReserve, seq, n_new}));
  absl::Status mine = owner_->local().kv().Reserve(seq, n_new);
  absl::Status s = owner_->Settle(mine, "KV reservation");
  if (mine.ok() && absl::IsInternal(s)) {
    // A follower's pool is fuller than the leader's: the group as a whole cannot take the step.
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache full on another rank of the TP group: sequence ", seq, " cannot take ", n_new,
        " more tokens; raise --kv-budget, or run fewer or shorter sequences at once"));
  }
  return s;
}

void TpKvFacade::AttendAndAppend(SeqId seq, int32_t layer, int32_t n, const float* q,
                                 const float* k, const float* v, const uint8_t* evict,
                                 float* out) {
  // Layer-level access cannot be forwarded: the other ranks hold other heads. Misuse is reported
  // the cache's way (NaN output); Forward is the only way to step a TP group.
  (void)seq, (void)layer, (void)q, (void)k, (void)v, (void)evict;
  if (out != nullptr) {
    const KvGeometry& g = geometry();
    const int64_t count = static_cast<int64_t>(n) * g.n_heads * g.head_dim;
    for (int64_t i = 0; i < count; ++i) out[i] = std::numeric_limits<float>::quiet_NaN();
  }
}

void TpKvFacade::SetThreadPool(kernels::ThreadPool* pool) {
  owner_->local().kv().SetThreadPool(pool);
}
int64_t TpKvFacade::total_blocks() const { return owner_->agreed_total(); }
int64_t TpKvFacade::free_blocks() const { return owner_->agreed_free(); }
int64_t TpKvFacade::block_bytes() const { return owner_->local().kv().block_bytes(); }
KvFigures TpKvFacade::Figures() const { return owner_->Figures(true, -1); }
KvFigures TpKvFacade::Figures(SeqId seq) const { return owner_->Figures(false, seq); }
std::vector<int32_t> TpKvFacade::ResidentPositions(SeqId seq, int32_t layer,
                                                   int32_t head) const {
  // The leader holds global KV heads [0, n_kv / tp); others live on other ranks.
  const int32_t local_heads = owner_->local().kv().geometry().n_kv_heads;
  if (head < 0 || head >= local_heads) return {};
  return owner_->local().kv().ResidentPositions(seq, layer, head);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeTpLeaderBackend(std::unique_ptr<Backend> local,
                                                             Communicator* comm) {
  if (local == nullptr || comm == nullptr) {
    return absl::InvalidArgumentError("MakeTpLeaderBackend: null backend or communicator");
  }
  if (comm->rank() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MakeTpLeaderBackend on TP rank ", comm->rank(), ": only TP rank 0 leads; the others run "
        "RunTpFollower"));
  }
  auto b = std::make_unique<TpLeaderBackend>(std::move(local), comm);
  DMSRT_RETURN_IF_ERROR(b->Init());
  return std::unique_ptr<Backend>(std::move(b));
}

absl::Status ShutdownTpFollowers(Backend& leader) {
  auto* b = dynamic_cast<TpLeaderBackend*>(&leader);
  if (b == nullptr) {
    return absl::InvalidArgumentError("ShutdownTpFollowers: not a TP leader backend");
  }
  return b->Shutdown();
}

absl::Status PingTpFollowers(Backend& leader) {
  auto* b = dynamic_cast<TpLeaderBackend*>(&leader);
  if (b == nullptr) return absl::InvalidArgumentError("PingTpFollowers: not a TP leader backend");
  return b->Ping();
}

absl::Status TpGroupHealth(Backend& leader) {
  auto* b = dynamic_cast<TpLeaderBackend*>(&leader);
  if (b == nullptr) return absl::InvalidArgumentError("TpGroupHealth: not a TP leader backend");
  return b->health();
}

absl::Status RunTpFollower(Backend& local, Communicator* comm) {
  if (comm == nullptr || comm->rank() == 0) {
    return absl::InvalidArgumentError("RunTpFollower needs a communicator of which this process "
                                      "is not rank 0");
  }
  Communicator* host = comm->host();
  {  // matches the leader's Init
    int64_t total = local.kv().total_blocks();
    DMSRT_RETURN_IF_ERROR(host->AllReduce(&total, &total, 1, ReduceOp::kMin));
  }
  Executor exec;
  exec.local = &local;
  exec.rank = comm->rank();
  exec.fail_rank = InjectedFailRank();
  exec.fail_how = InjectedFailHow();
  KvCache& kv = local.kv();
  while (true) {
    Plan plan;
    DMSRT_RETURN_IF_ERROR(host->BroadcastVector(&plan, 0));
    if (plan.empty()) return absl::DataLossError("empty plan from the TP leader");
    absl::Status mine;
    switch (plan[0]) {
      case kShutdown:
        return absl::OkStatus();
      case kPing:
        if (plan.size() != 1) {
          return absl::DataLossError("malformed keepalive plan from the TP leader");
        }
        break;
      case kForward: {
        absl::StatusOr<std::vector<SeqChunk>> batch = DecodeForward(plan);
        if (!batch.ok()) return batch.status();
        mine = exec.Forward(*batch).status();
        break;
      }
      case kCreate:
      case kFork: {
        if ((plan[0] == kCreate && plan.size() != 2) || (plan[0] == kFork && plan.size() != 3)) {
          return absl::DataLossError("malformed sequence plan from the TP leader");
        }
        absl::StatusOr<SeqId> id = plan[0] == kCreate ? kv.Create() : kv.Fork(plan[1]);
        const SeqId want = plan.back();
        if (!id.ok()) {
          mine = id.status();
        } else if (*id != want) {
          return absl::InternalError(absl::StrCat(
              "TP rank ", comm->rank(), " diverged from its leader: its new sequence is ", *id,
              ", the leader's is ", want));
        }
        break;
      }
      case kFree:
        if (plan.size() != 2) return absl::DataLossError("malformed free plan from the TP leader");
        mine = kv.Free(plan[1]);
        break;
      case kReserve:
        if (plan.size() != 3) {
          return absl::DataLossError("malformed reserve plan from the TP leader");
        }
        mine = kv.Reserve(plan[1], plan[2]);
        break;
      case kAppendUncomputed:
        if (plan.size() != 5) {
          return absl::DataLossError("malformed append plan from the TP leader");
        }
        mine = local.AppendUncomputed(plan[1], plan[2], GetDouble(&plan[3]));
        break;
      case kFigures: {
        if (plan.size() != 3) {
          return absl::DataLossError("malformed figures plan from the TP leader");
        }
        absl::StatusOr<KvFigures> f = GroupFigures(comm, kv, plan[1] == 1, plan[2]);
        if (!f.ok()) return f.status();
        break;
      }
      default:
        return absl::DataLossError(absl::StrCat("unknown plan ", plan[0], " from the TP leader"));
    }
    if (!mine.ok() && !Deterministic(mine)) return mine;
    DMSRT_ASSIGN_OR_RETURN(auto agreed, Agree(comm, mine.ok(), kv.free_blocks()));
    (void)agreed;
  }
}

}  // namespace dmsrt
