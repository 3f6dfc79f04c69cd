// The dmsrt command line (launch/cli.h): help generated for every subcommand, refusals that name
// the option, and the shared options parsed alike by every subcommand that takes them.
#include "launch/cli.h"

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <gtest/gtest.h>

#include "launch/commands.h"
#ifdef DMSRT_HAVE_GRPC
#include "launch/service_commands.h"
#endif

namespace dmsrt {
namespace {

struct Outcome {
  std::optional<int> exit;  // nullopt: a subcommand is ready to run
  std::string out, err;
};

Outcome Parse(CommandLine& cl, std::vector<std::string> words) {
  words.insert(words.begin(), "dmsrt");
  std::vector<const char*> argv;
  for (const std::string& w : words) argv.push_back(w.c_str());
  std::ostringstream out, err;
  Outcome o;
  o.exit = cl.Parse(static_cast<int>(argv.size()), argv.data(), out, err);
  o.out = out.str();
  o.err = err.str();
  return o;
}

Outcome Parse(std::vector<std::string> words) {
  CommandLine cl;
  return Parse(cl, std::move(words));
}

// A subcommand whose options land in `*out`, set up by the subcommand's own setup function.
template <typename Options>
Subcommand Capture(const std::string& name, void (*setup)(CLI::App&, Options&), Options* out) {
  return Subcommand{name, "test", [setup, out](CLI::App& app) -> RunFunction {
                      setup(app, *out);
                      return [](ProcessArgs&) { return 0; };
                    }};
}

// The long names of the options a subcommand takes (its --help included).
std::vector<std::string> OptionNames(CommandLine& cl, const std::string& subcommand) {
  std::vector<std::string> names;
  for (const CLI::Option* o : cl.app().get_subcommand(subcommand)->get_options()) {
    for (const std::string& l : o->get_lnames()) names.push_back("--" + l);
  }
  return names;
}

TEST(CommandLine, TopLevelHelpListsEverySubcommand) {
  Outcome o = Parse({"--help"});
  ASSERT_EQ(o.exit, 0) << o.err;
  for (const Subcommand& s : Subcommands()) {
    EXPECT_NE(o.out.find(s.name), std::string::npos) << s.name;
    EXPECT_NE(o.out.find(s.description), std::string::npos) << s.name;
  }
  EXPECT_NE(o.out.find("dmsrt <subcommand> --help"), std::string::npos) << o.out;
  // No subcommand: the same list on stderr, exit 2.
  Outcome none = Parse({});
  EXPECT_EQ(none.exit, 2);
  EXPECT_NE(none.err.find("generate"), std::string::npos) << none.err;
}

TEST(CommandLine, HelpIsGeneratedForEverySubcommand) {
  ASSERT_GE(Subcommands().size(), 5u);
  for (const Subcommand& s : Subcommands()) {
    CommandLine cl;
    Outcome o = Parse(cl, {s.name, "--help"});
    ASSERT_EQ(o.exit, 0) << s.name << ": " << o.err;
    EXPECT_NE(o.out.find("Usage: dmsrt " + s.name), std::string::npos) << o.out;
    for (const CLI::Option* opt : cl.app().get_subcommand(s.name)->get_options()) {
      const std::string name = "--" + opt->get_lnames().front();
      EXPECT_NE(o.out.find(name), std::string::npos) << s.name << " help lacks " << name;
      EXPECT_FALSE(opt->get_description().empty()) << s.name << " " << name << " has no description";
      EXPECT_NE(o.out.find(opt->get_description()), std::string::npos) << s.name << " " << name;
    }
  }
}

TEST(CommandLine, HelpShowsDefaultsAndAllowedValues) {
  CommandLine cl;
  const std::string help = cl.Help("generate");
  EXPECT_NE(help.find("default: 128"), std::string::npos) << help;  // --max-tokens
  EXPECT_NE(help.find("default: 1GiB"), std::string::npos) << help;  // --kv-budget
  EXPECT_NE(help.find("one of none, dms, forced, window, tova, h2o"), std::string::npos) << help;
  EXPECT_NE(help.find("in [1, 4096]"), std::string::npos) << help;  // --kv-block
  EXPECT_NE(cl.Help("submit").find("one of majority, logprob, first"), std::string::npos);
}

TEST(CommandLine, UnknownOptionIsRefusedByName) {
  for (const Subcommand& s : Subcommands()) {
    Outcome o = Parse({s.name, "--no-such-option", "3"});
    EXPECT_EQ(o.exit, 2) << s.name;
    EXPECT_NE(o.err.find("dmsrt " + s.name + ": unknown option --no-such-option"), std::string::npos)
        << o.err;
    EXPECT_NE(o.err.find("dmsrt " + s.name + " --help"), std::string::npos) << o.err;
  }
  Outcome typo = Parse({"generate", "--max-token", "5"});
  EXPECT_EQ(typo.exit, 2);
  EXPECT_NE(typo.err.find("unknown option --max-token (did you mean --max-tokens?)"), std::string::npos)
      << typo.err;
  Outcome stray = Parse({"generate", "hello"});
  EXPECT_EQ(stray.exit, 2);
  EXPECT_NE(stray.err.find("unexpected argument 'hello'"), std::string::npos) << stray.err;
  Outcome sub = Parse({"generat"});
  EXPECT_EQ(sub.exit, 2);
  EXPECT_NE(sub.err.find("unknown subcommand 'generat'"), std::string::npos) << sub.err;
}

TEST(CommandLine, MalformedValuesAreRefusedByName) {
  struct Case {
    std::vector<std::string> words;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{"generate", "--threads", "x"}, "dmsrt generate: --threads: expects an integer, got 'x'"},
      {{"score", "--threads", "1.5"}, "dmsrt score: --threads: expects an integer, got '1.5'"},
      {{"bench", "--prefill", "12k"}, "dmsrt bench: --prefill: expects an integer, got '12k'"},
      {{"generate", "--temperature", "warm"}, "--temperature: expects a number, got 'warm'"},
      {{"generate", "--top-p", "0"}, "--top-p: must be in (0, 1], got 0"},
      {{"generate", "--kv-block", "0"}, "--kv-block: must be in [1, 4096], got 0"},
      {{"generate", "--kv-budget", "12XB"}, "--kv-budget: bad byte size '12XB'"},
      {{"generate", "--kv-policy", "lru"}, "--kv-policy: expects one of none, dms, forced"},
      {{"generate", "--backend", "tpu"}, "--backend: expects one of cpu, cuda, got 'tpu'"},
      {{"generate", "--tp-timeout", "0"}, "--tp-timeout: must be > 0, got 0"},
      {{"generate", "--prompt"}, "dmsrt generate: --prompt needs a value"},
      {{"bench-decode", "--batch", "1,x"}, "--batch: takes positive integers separated by commas"},
      {{"bench-decode", "--kv-budget", "lots"}, "--kv-budget: bad byte size 'lots'"},
      {{"tokenize", "--model"}, "dmsrt tokenize: --model needs a value"},
#ifdef DMSRT_HAVE_GRPC
      {{"serve", "--max-n", "many"}, "dmsrt serve: --max-n: expects an integer, got 'many'"},
      {{"coordinator", "--metrics-port", "70000"}, "--metrics-port: must be in [0, 65535], got 70000"},
      {{"submit", "--budget", "1XB"}, "dmsrt submit: --budget: bad byte size '1XB'"},
      {{"submit", "--selection", "best"}, "--selection: expects one of majority, logprob, first"},
#endif
  };
  for (const Case& c : cases) {
    Outcome o = Parse(c.words);
    EXPECT_EQ(o.exit, 2) << c.words[0] << " " << c.words[1];
    EXPECT_NE(o.err.find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << o.err;
  }
}

TEST(CommandLine, ValuesAreReadAsBefore) {
  GenerateOptions g;
  CommandLine cl({Capture("generate", SetupGenerate, &g)});
  // A value that starts with "-" other than a number goes after "=".
  Outcome o = Parse(cl, {"generate", "--prompt=-x is an option-like prompt", "--stop", "a",
                         "--stop=--b", "--max-tokens", "010", "--threads", "3", "--threads", "5",
                         "--json", "--kv-budget", "1.5GB", "--dms-seed", "-7", "--top-k", "-0"});
  ASSERT_EQ(o.exit, std::nullopt) << o.err;
  EXPECT_EQ(g.prompt, "-x is an option-like prompt");
  EXPECT_FALSE(g.chat.has_value());
  EXPECT_EQ(g.stop, (std::vector<std::string>{"a", "--b"}));
  EXPECT_EQ(g.max_tokens, 10);  // decimal, not octal
  EXPECT_EQ(g.top_k, 0);
  EXPECT_EQ(g.run.threads, 5);  // a repeated option keeps its last value
  EXPECT_TRUE(g.json);
  EXPECT_EQ(g.run.kv_budget_bytes, 1500000000);
  EXPECT_EQ(g.run.dms_seed, -7);
}

// Each shared option is defined once (AddRunOptions / AddTpOptions) and reaches the same field
// from every subcommand that takes it.
TEST(CommandLine, SharedOptionsParseAlikeInEverySubcommand) {
  const std::vector<std::string> shared = {
      "--model", "m.gguf", "--dms-adapter", "a.safetensors", "--backend", "CUDA", "--device", "1",
      "--threads", "3", "--kv-budget", "2GiB", "--kv-block", "32", "--kv-policy", "forced",
      "--dms-force-rate", "0.5", "--dms-window", "64", "--dms-seed", "9", "--kv-window", "100",
      "--kv-sinks", "2", "--kv-tokens", "300", "--prefill-chunk", "128", "--tp", "2",
      "--tp-timeout", "12.5"};
  auto check = [](const RunOptions& r, const TpOptions& t, const std::string& who) {
    EXPECT_EQ(r.model, "m.gguf") << who;
    EXPECT_EQ(r.dms_adapter, "a.safetensors") << who;
    EXPECT_EQ(r.backend, "cuda") << who;
    EXPECT_EQ(r.device, 1) << who;
    EXPECT_EQ(r.threads, 3) << who;
    EXPECT_EQ(r.kv_budget_bytes, int64_t{2} << 30) << who;
    EXPECT_EQ(r.kv_block, 32) << who;
    EXPECT_EQ(r.kv_policy, "forced") << who;
    EXPECT_EQ(r.dms_force_rate, 0.5) << who;
    EXPECT_EQ(r.dms_window, 64) << who;
    EXPECT_EQ(r.dms_seed, 9) << who;
    EXPECT_EQ(r.kv_window, 100) << who;
    EXPECT_EQ(r.kv_sinks, 2) << who;
    EXPECT_EQ(r.kv_tokens, 300) << who;
    EXPECT_EQ(r.prefill_chunk, 128) << who;
    EXPECT_EQ(t.tp, 2) << who;
    EXPECT_EQ(t.timeout_s, 12.5) << who;
  };
  GenerateOptions g;
  ScoreOptions sc;
  BenchOptions b;
  std::vector<Subcommand> subs = {Capture("generate", SetupGenerate, &g),
                                  Capture("score", SetupScore, &sc), Capture("bench", SetupBench, &b)};
#ifdef DMSRT_HAVE_GRPC
  ServeOptions sv;
  subs.push_back(Capture("serve", SetupServe, &sv));
#endif
  for (const Subcommand& s : subs) {
    CommandLine cl(subs);
    std::vector<std::string> words = {s.name};
    words.insert(words.end(), shared.begin(), shared.end());
    Outcome o = Parse(cl, words);
    ASSERT_EQ(o.exit, std::nullopt) << s.name << ": " << o.err;
  }
  check(g.run, g.tp, "generate");
  check(sc.run, sc.tp, "score");
  check(b.run, b.tp, "bench");
#ifdef DMSRT_HAVE_GRPC
  check(sv.run, sv.tp, "serve");
#endif
}

TEST(CommandLine, SharedOptionDefaults) {
  GenerateOptions g;
  BenchDecodeOptions bd;
  CommandLine cl({Capture("generate", SetupGenerate, &g)});
  ASSERT_EQ(Parse(cl, {"generate", "--chat", "hi"}).exit, std::nullopt);
  EXPECT_EQ(g.run.backend, "cpu");
  EXPECT_EQ(g.run.kv_budget_bytes, int64_t{1} << 30);
  EXPECT_EQ(g.run.kv_block, 16);
  EXPECT_FALSE(g.run.kv_policy.has_value());
  EXPECT_FALSE(g.run.dms_force_rate.has_value());
  EXPECT_FALSE(g.run.dms_window.has_value());
  EXPECT_EQ(g.run.prefill_chunk, 512);
  EXPECT_EQ(g.tp.tp, 0);
  EXPECT_EQ(g.tp.timeout_s, 300);
  EXPECT_EQ(g.max_tokens, 128);
  EXPECT_EQ(g.chat, "hi");
  // bench-decode keeps its own defaults for the KV options it shares a spelling with.
  CommandLine cl2({Capture("bench-decode", SetupBenchDecode, &bd)});
  ASSERT_EQ(Parse(cl2, {"bench-decode", "--synthetic", "tiny-llama"}).exit, std::nullopt);
  EXPECT_EQ(bd.kv_policy, "none");
  EXPECT_EQ(bd.dms_force_rate, 0.875);
  EXPECT_FALSE(bd.kv_budget_bytes.has_value());
  EXPECT_EQ(bd.seed, 1);
  EXPECT_EQ(bd.batch, "1,32,256");
}

// Every option of AddRunOptions appears exactly once in each subcommand that runs a model, and
// with the same description (CLI11 refuses a second definition of a name on one App).
TEST(CommandLine, SharedOptionsAreDefinedOnce) {
  CLI::App reference;
  RunOptions ro;
  TpOptions to;
  AddRunOptions(reference, &ro);
  AddTpOptions(reference, &to, "tp");
  CommandLine cl;
  std::vector<std::string> runners = {"generate", "score", "bench"};
#ifdef DMSRT_HAVE_GRPC
  runners.push_back("serve");
#endif
  for (const std::string& sub : runners) {
    const std::vector<std::string> names = OptionNames(cl, sub);
    for (const CLI::Option* ref : reference.get_options()) {
      const std::string name = "--" + ref->get_lnames().front();
      if (name == "--help") continue;
      EXPECT_EQ(std::count(names.begin(), names.end(), name), 1) << sub << " " << name;
      const CLI::Option* mine = cl.app().get_subcommand(sub)->get_option(name);
      if (name != "--tp") {
        EXPECT_EQ(mine->get_description(), ref->get_description()) << sub << " " << name;
      }
    }
  }
}

}  // namespace
}  // namespace dmsrt
