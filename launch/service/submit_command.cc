// `dmsrt submit`: a client of JobService.RunJob.
//
// On a terminal it redraws one progress line (threads running/done, tokens/s, KV in use, current
// vote) from the event stream plus a cluster-status poll; otherwise it prints one plain line per
// finished thread. Then the selected answer, the vote table and per-thread figures; --json prints
// one JSON object instead. Exit codes: 0 answered (or no answer), 1 RPC error, 2 bad usage, 3 the
// job was cancelled, failed or passed its deadline.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "dmsrt/v1/dmsrt.grpc.pb.h"
#include "launch/service_commands.h"
#include "parallel/status_macros.h"
#include "runtime/model/mapped_file.h"

namespace dmsrt {

namespace {

const char* ReasonName(v1::FinishReason r) { return v1::FinishReason_Name(r).c_str(); }

std::string OutcomeText(v1::JobOutcome o) {
  std::string s = v1::JobOutcome_Name(o);
  if (s.rfind("JOB_", 0) == 0) s = s.substr(4);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

const char* CodeName(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    default: return "ERROR";
  }
}

absl::StatusOr<v1::JobRequest> BuildRequest(const SubmitOptions& o) {
  v1::JobRequest r;
  const int inputs = o.prompt.has_value() + o.chat.has_value() + !o.messages.empty();
  if (inputs != 1) {
    return absl::InvalidArgumentError(
        "give exactly one of --prompt TEXT, --chat TEXT or --message ROLE:TEXT (repeatable)");
  }
  if (o.prompt) r.set_prompt(*o.prompt);
  if (o.chat) r.set_chat(*o.chat);
  for (const std::string& m : o.messages) {
    const size_t colon = m.find(':');
    const std::string role = colon == std::string::npos ? "" : m.substr(0, colon);
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--message '", m.substr(0, 40), "' must be ROLE:TEXT with ROLE system, user or assistant"));
    }
    v1::ChatMessage* msg = r.mutable_conversation()->add_messages();
    msg->set_role(role);
    msg->set_content(m.substr(colon + 1));
  }
  if (o.n && o.budget_bytes) return absl::InvalidArgumentError("give --n or --budget, not both");
  r.set_n(o.n.value_or(o.budget_bytes ? 0 : 8));
  if (o.budget_bytes) r.mutable_kv()->set_kv_budget_bytes(*o.budget_bytes);
  r.mutable_stopping()->set_max_tokens(o.max_tokens);
  for (const std::string& stop : o.stop) r.mutable_stopping()->add_stop(stop);
  // Every thread runs to --max-tokens (benchmarks, fixed-length reasoning budgets).
  r.mutable_stopping()->set_ignore_eos(o.ignore_eos);
  r.mutable_sampling()->set_temperature(static_cast<float>(o.temperature));
  r.mutable_sampling()->set_top_p(static_cast<float>(o.top_p));
  r.mutable_sampling()->set_top_k(o.top_k);
  r.mutable_sampling()->set_seed(static_cast<uint64_t>(o.seed));
  if (!o.regex.empty()) r.mutable_answer()->set_extraction_regex(o.regex);
  if (o.selection == "majority") {
    r.mutable_answer()->set_selection(v1::SELECTION_MAJORITY_VOTE);
  } else if (o.selection == "logprob") {
    r.mutable_answer()->set_selection(v1::SELECTION_MAX_MEAN_LOGPROB);
  } else {
    r.mutable_answer()->set_selection(v1::SELECTION_FIRST_FINISHED);
  }
  r.mutable_answer()->set_early_stop(o.early_stop);
  r.set_deadline_seconds(o.deadline_s);
  return r;
}

}  // namespace

void SetupSubmit(CLI::App& app, SubmitOptions& o) {
  app.add_option("--address", o.address, "HOST:PORT of the coordinator")->type_name("ADDRESS");
  app.add_option("--prompt", o.prompt, "the prompt, as it is");
  app.add_option("--chat", o.chat, "one user turn, rendered with the model's chat template");
  app.add_option("--message", o.messages,
                 "one turn of a conversation, ROLE:TEXT (system, user or assistant); repeat in order")
      ->type_name("TURN");
  app.add_option("--n", o.n, "threads (default: 8; with --budget, as many as the budget holds)")
      ->transform(Integer(0));
  AddByteSizeOption(app, "--budget", &o.budget_bytes,
                    "budget mode: KV memory for the job's threads (instead of --n)");
  app.add_option("--max-tokens", o.max_tokens, "tokens per thread at most (0: the coordinator's default)")
      ->transform(Integer(0));
  app.add_option("--temperature", o.temperature, "sampling temperature (0: greedy)")
      ->transform(Number(0.0));
  app.add_option("--top-p", o.top_p, "nucleus sampling")->transform(Number(0.0, 1.0, /*min_exclusive=*/true));
  app.add_option("--top-k", o.top_k, "sample among the k most likely tokens (0: off)")
      ->transform(Integer(0));
  app.add_option("--seed", o.seed, "sampling seed (thread i uses seed + i)")->transform(Integer());
  app.add_option("--stop", o.stop, "a string that ends a thread; repeatable")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->allow_extra_args(false);
  app.add_option("--regex", o.regex,
                 "extract each thread's answer: the last match, group 1 if any (ECMAScript; "
                 "default: \\boxed{}, else the last number)");
  app.add_option("--selection", o.selection, "how the answer is chosen")
      ->transform(OneOf({"majority", "logprob", "first"}));
  app.add_flag("--early-stop", o.early_stop, "cancel the other threads once the majority cannot change");
  app.add_flag("--ignore-eos", o.ignore_eos, "every thread runs to --max-tokens");
  app.add_option("--deadline", o.deadline_s, "the job's deadline in seconds (0: none)")->transform(Number(0.0));
  app.add_option("--auth-token", o.auth_token, "send 'authorization: Bearer TOKEN'");
  app.add_option("--tls-ca", o.tls_ca, "dial with TLS, trusting this root certificate (PEM)")->type_name("FILE");
  app.add_option("--timeout", o.timeout_s, "RPC deadline in seconds (0: none)")->transform(Number(0.0));
  app.add_option("--wait-ready", o.wait_ready_s,
                 "first wait up to this many seconds for a replica to be ready (0: do not wait)")
      ->transform(Number(0.0));
  app.add_flag("--json", o.json, "print one JSON object at the end");
  app.add_flag("--no-progress", o.no_progress, "no progress line, even on a terminal");
  app.footer(
      "Exit codes: 0 answered (or no answer), 1 RPC error, 2 bad usage, 3 the job was cancelled, "
      "failed or passed its deadline.");
}

int RunSubmit(const SubmitOptions& o, ProcessArgs&) {
  absl::StatusOr<v1::JobRequest> req = BuildRequest(o);
  if (!req.ok()) {
    std::cerr << "dmsrt submit: " << req.status().message() << "\n";
    return 2;
  }
  const bool json = o.json;
  const bool tty = !json && !o.no_progress && isatty(STDOUT_FILENO);
  req->set_stream_tokens(tty);
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!o.tls_ca.empty()) {
    absl::StatusOr<std::string> ca = ReadWholeFile(o.tls_ca);
    if (!ca.ok()) {
      std::cerr << "dmsrt submit: --tls-ca: " << ca.status().message() << "\n";
      return 2;
    }
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = std::move(*ca);
    creds = grpc::SslCredentials(o);
  }
  const std::string& address = o.address;
  auto channel = grpc::CreateChannel(address, creds);
  auto stub = v1::JobService::NewStub(channel);
  // --wait-ready S: a freshly started server needs a moment before a replica has registered and
  // loaded its model; poll the cluster status until one is ready (or S seconds pass).
  if (o.wait_ready_s > 0) {
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(o.wait_ready_s * 1000));
    bool ready = false;
    std::string last = "no answer";
    while (!ready && std::chrono::steady_clock::now() < until) {
      grpc::ClientContext c;
      if (!o.auth_token.empty()) c.AddMetadata("authorization", "Bearer " + o.auth_token);
      c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      v1::ClusterStatus cs;
      grpc::Status st = stub->GetClusterStatus(&c, v1::GetClusterStatusRequest(), &cs);
      if (st.ok()) {
        for (const auto& r : cs.replicas()) ready = ready || r.state() == "ready";
        last = ready ? "ready" : "no replica ready yet";
      } else {
        last = st.error_message();
      }
      if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    if (!ready) {
      std::cerr << "dmsrt submit: no replica at " << address << " became ready within "
                << o.wait_ready_s << " s (" << last << ")\n";
      return 1;
    }
  }
  grpc::ClientContext ctx;
  if (!o.auth_token.empty()) ctx.AddMetadata("authorization", "Bearer " + o.auth_token);
  if (o.timeout_s > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1000)));
  }
  ctx.set_wait_for_ready(false);

  // Progress state, shared with the cluster poll thread.
  std::mutex pm;
  int32_t n = 0, done = 0;
  int64_t tokens = 0;
  std::string leader = "-";
  double kv_pct = 0, tps = 0;
  std::atomic<bool> finished{false};
  auto draw = [&] {
    if (!tty) return;
    std::lock_guard<std::mutex> l(pm);
    std::printf("\r\033[K threads %d running / %d done | %lld tokens | %.1f tok/s | KV %.1f%% | vote: %s",
                n - done, done, static_cast<long long>(tokens), tps, kv_pct, leader.c_str());
    std::fflush(stdout);
  };
  std::thread poller;
  if (tty) {
    poller = std::thread([&] {
      while (!finished.load()) {
        grpc::ClientContext c;
        if (!o.auth_token.empty()) c.AddMetadata("authorization", "Bearer " + o.auth_token);
        c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
        v1::ClusterStatus cs;
        if (stub->GetClusterStatus(&c, v1::GetClusterStatusRequest(), &cs).ok()) {
          std::lock_guard<std::mutex> l(pm);
          kv_pct = cs.kv_blocks_total() > 0 ? 100.0 * cs.kv_blocks_used() / cs.kv_blocks_total() : 0;
          tps = 0;
          for (const auto& r : cs.replicas()) tps += r.state() == "ready" ? r.tokens_per_second() : 0;
        }
        draw();
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
      }
    });
  }

  auto reader = stub->RunJob(&ctx, *req);
  v1::JobEvent ev;
  std::string job_id;
  v1::JobFinished final;
  bool have_final = false;
  std::vector<std::string> errors;
  while (reader->Read(&ev)) {
    job_id = ev.job_id();
    switch (ev.event_case()) {
      case v1::JobEvent::kAccepted: {
        std::lock_guard<std::mutex> l(pm);
        n = ev.accepted().n();
        if (!json && !tty) {
          std::printf("%s: %d threads, %lld prompt tokens\n", job_id.c_str(), n,
                      static_cast<long long>(ev.accepted().prompt_tokens()));
        }
        break;
      }
      case v1::JobEvent::kToken: {
        std::lock_guard<std::mutex> l(pm);
        tokens += ev.token().token_ids_size();
        break;
      }
      case v1::JobEvent::kThreadFinished: {
        const v1::ThreadFinished& t = ev.thread_finished();
        {
          std::lock_guard<std::mutex> l(pm);
          ++done;
        }
        if (!json && !tty) {
          std::printf("thread %d: %s, %lld tokens, cache CR %.2f, answer %s\n", t.thread_index(),
                      ReasonName(t.reason()), static_cast<long long>(t.tokens()), t.cache_cr(),
                      t.has_answer() ? t.answer().c_str() : "(none)");
        }
        break;
      }
      case v1::JobEvent::kVoteUpdate: {
        std::lock_guard<std::mutex> l(pm);
        if (ev.vote_update().table_size() > 0) {
          leader = absl::StrCat(ev.vote_update().table(0).answer(), " (",
                                ev.vote_update().table(0).votes(), ")");
        }
        break;
      }
      case v1::JobEvent::kError:
        errors.push_back(ev.error().message());
        if (!json) std::fprintf(stderr, "\nerror: %s%s\n", ev.error().message().c_str(),
                                ev.error().retryable() ? " (retryable)" : "");
        break;
      case v1::JobEvent::kJobFinished:
        final = ev.job_finished();
        have_final = true;
        break;
      default:
        break;
    }
    draw();
  }
  grpc::Status st = reader->Finish();
  finished = true;
  if (poller.joinable()) poller.join();
  if (tty) std::printf("\n");
  if (!have_final) {
    std::cerr << "dmsrt submit: " << CodeName(st.error_code()) << ": " << st.error_message() << "\n";
    return 1;
  }
  int rc = 0;
  if (final.outcome() == v1::JOB_CANCELLED || final.outcome() == v1::JOB_FAILED ||
      final.outcome() == v1::JOB_DEADLINE_EXCEEDED) {
    rc = 3;
  }
  if (json) {
    nlohmann::json j;
    j["job_id"] = job_id;
    j["outcome"] = OutcomeText(final.outcome());
    j["status"] = CodeName(st.error_code());
    j["n"] = final.n();
    j["answer"] = final.has_answer() ? nlohmann::json(final.selected_answer()) : nlohmann::json(nullptr);
    j["message"] = final.message();
    nlohmann::json votes = nlohmann::json::array();
    for (const auto& v : final.votes()) votes.push_back({{"answer", v.answer()}, {"votes", v.votes()}});
    j["votes"] = votes;
    nlohmann::json threads = nlohmann::json::array();
    for (const auto& t : final.threads()) {
      threads.push_back({{"index", t.thread_index()},
                         {"reason", ReasonName(t.reason())},
                         {"tokens", t.tokens()},
                         {"cache_cr", t.cache_cr()},
                         {"mean_logprob", t.mean_logprob()},
                         {"answer", t.has_answer() ? nlohmann::json(t.answer()) : nlohmann::json(nullptr)},
                         {"replica", t.replica()},
                         {"message", t.message()}});
    }
    j["threads"] = threads;
    j["usage"] = {{"prompt_tokens", final.usage().prompt_tokens()},
                  {"generated_tokens", final.usage().generated_tokens()},
                  {"seconds", final.usage().seconds()},
                  {"time_to_first_token_seconds", final.usage().time_to_first_token_seconds()}};
    j["errors"] = errors;
    std::cout << j.dump() << std::endl;
    return rc;
  }
  std::printf("outcome: %s%s%s\n", OutcomeText(final.outcome()).c_str(),
              final.message().empty() ? "" : " — ", final.message().c_str());
  std::printf("answer: %s\n", final.has_answer() ? final.selected_answer().c_str() : "(none)");
  std::printf("votes:\n");
  for (const auto& v : final.votes()) std::printf("  %-24s %d\n", v.answer().c_str(), v.votes());
  std::printf("threads:\n  %-6s %-16s %-7s %-9s %-8s %s\n", "index", "reason", "tokens", "cache_cr",
              "replica", "answer");
  for (const auto& t : final.threads()) {
    std::printf("  %-6d %-16s %-7lld %-9.2f %-8d %s\n", t.thread_index(), ReasonName(t.reason()),
                static_cast<long long>(t.tokens()), t.cache_cr(), t.replica(),
                t.has_answer() ? t.answer().c_str() : "-");
  }
  const auto& u = final.usage();
  std::printf("usage: %lld prompt tokens, %lld generated tokens, %.2f s (%.1f tokens/s), first token after %.2f s\n",
              static_cast<long long>(u.prompt_tokens()), static_cast<long long>(u.generated_tokens()),
              u.seconds(), u.seconds() > 0 ? u.generated_tokens() / u.seconds() : 0.0,
              u.time_to_first_token_seconds());
  return rc;
}

}  // namespace dmsrt
