// Subcommands of the dmsrt binary: per subcommand, its options as parsed, the function that adds
// them to its command line (Setup*) and the one that runs it (Run*, returning the exit code; none
// calls exit()). launch/commands.cc registers them; launch/cli.h says how.
//
// To add a subcommand: its options struct and its two functions here (or in a header of its own),
// a cmd_<name>.cc, and one line in Subcommands() (launch/commands.cc).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "launch/run_options.h"

namespace dmsrt {

struct GenerateOptions {
  RunOptions run;
  TpOptions tp;
  std::optional<std::string> prompt, chat;  // exactly one
  std::string system;
  int32_t max_tokens = 128;
  double temperature = 0.0;
  double top_p = 1.0;
  int32_t top_k = 0;
  double min_p = 0.0;
  int64_t seed = 0;
  std::vector<std::string> stop;
  bool json = false;
  bool no_stream = false;
};
void SetupGenerate(CLI::App& app, GenerateOptions& o);
int RunGenerate(const GenerateOptions& o, ProcessArgs& args);

struct ScoreOptions {
  RunOptions run;
  TpOptions tp;
  std::string text, file, tokens;  // at most one; --tokens wins, then --file
  std::string dump_logits;
  bool json = false;
  bool add_bos = false;
};
void SetupScore(CLI::App& app, ScoreOptions& o);
int RunScore(const ScoreOptions& o, ProcessArgs& args);

struct BenchOptions {
  RunOptions run;
  TpOptions tp;
  int32_t prefill = 512;
  int32_t decode = 128;
  int32_t reps = 3;
  std::string tokens_file, out;
  bool json = false;
  // The step-time grid of the profile (schema 2) that `dmsrt plan` reads.
  std::vector<int32_t> grid_batch = {1, 4, 16};
  std::vector<int32_t> grid_context = {64, 1024};
  std::vector<int32_t> grid_chunk = {16, 64, 256, 512};  // 512: serve's default prefill chunk
  bool no_grid = false;
};
void SetupBench(CLI::App& app, BenchOptions& o);
int RunBench(const BenchOptions& o, ProcessArgs& args);

struct BenchDecodeOptions {
  std::string backend = "cpu";
  std::string model, synthetic;  // exactly one
  std::string batch = "1,32,256";
  std::string context = "4096,32768";
  int32_t steps = 32;
  std::string kv_policy = "none";
  double dms_force_rate = 0.875;
  std::optional<int32_t> dms_window;     // unset: 16, or the model's under dms
  double dms_fill_rate = 0.875;
  int32_t kv_window = 512;  // window policy: tokens kept besides the sinks
  int32_t kv_sinks = 4;     // window policy: first tokens always kept
  std::optional<int64_t> kv_budget_bytes;  // unset: 4GiB on cpu, 0 on cuda
  int32_t kv_block = 16;
  int64_t seed = 1;
  int32_t threads = 0;
  int32_t device = -1;
  bool json = false;
  TpOptions tp;  // mpirun -np N dmsrt bench-decode --tp N: one tensor-parallel group
};
void SetupBenchDecode(CLI::App& app, BenchDecodeOptions& o);
int RunBenchDecode(const BenchDecodeOptions& o, ProcessArgs& args);

struct EvalCommandOptions {
  RunOptions run;
  std::string file;                          // default: tests/data/eval/heldout.txt
  std::optional<std::string> text, tokens;   // instead of --file
  int64_t max_tokens = 0;                    // 0: the whole text
  int64_t context = 0;                       // protocol b's C (0: 7/8 of the text)
  std::vector<double> target_cr = {2, 4, 8};
  int32_t forced_window = 64;
  std::string policies;                      // specs separated by ';' (launch/eval/eval.h)
  int32_t top_k = 64;
  std::vector<int32_t> passkey_lengths = {1024, 2048, 4096};
  std::vector<double> passkey_depths = {0.1, 0.5, 0.9};
  int32_t passkey_digits = 5;
  int64_t passkey_seed = 1;
  bool no_passkey = false, json = false, quiet = false, add_bos = false;
  std::string json_out, svg, merge;
  std::string calibration;             // threshold rate specs: calibration text (default: the corpus's)
  std::string write_passkey_prompts;   // write the probe prompts here and run nothing
};
void SetupEval(CLI::App& app, EvalCommandOptions& o);
int RunEval(const EvalCommandOptions& o, ProcessArgs& args);

struct TokenizeOptions {
  std::string model, tokenizer_dir, pre;
  // Exactly one mode.
  std::optional<std::string> text, file, decode, jsonl, decode_jsonl, chat;
  std::string chat_template;  // --template
  bool no_special = false;
  bool add_bos = false;
  bool json = false;
  bool stats = false;
  bool render = false;
  bool no_generation_prompt = false;
};
void SetupTokenize(CLI::App& app, TokenizeOptions& o);
int RunTokenize(const TokenizeOptions& o, ProcessArgs& args);

}  // namespace dmsrt
