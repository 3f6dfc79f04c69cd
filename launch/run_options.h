// Options shared by the subcommands that run a model (generate, score, serve): the model, the
// backend and the KV policy. One place turns the command line into a BackendOptions, so every
// subcommand accepts the same spellings and gives the same errors.
#pragma once

#include <memory>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "launch/args.h"
#include "runtime/backend.h"
#include "runtime/model.h"
#include "runtime/tokenizer.h"

namespace dmsrt {

// Options understood by LoadRunContext (add them to a subcommand's value options).
const std::set<std::string>& RunValueOptions();

struct RunContext {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  BackendOptions backend_options;
  int32_t prefill_chunk = 512;
  bool synthetic_eviction = false;  // forced policy: figures are for measurement only
};

// Loads the model (--model or the default), attaches --dms-adapter, builds the tokenizer and the
// backend options (--threads --kv-budget --kv-block --kv-policy --dms-window --dms-force-rate
// --dms-seed --kv-window --kv-sinks --kv-tokens --prefill-chunk).
absl::StatusOr<RunContext> LoadRunContext(const Args& args);

}  // namespace dmsrt
