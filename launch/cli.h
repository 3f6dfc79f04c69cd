// The command line of the dmsrt binary, on CLI11: `dmsrt <subcommand> [options]`.
//
// Each subcommand is a pair of functions over its own options struct: a setup function that adds
// the options to a CLI11 App (bound to the struct's fields, with descriptions, defaults and
// allowed values, so `--help` is generated from the definitions) and a run function that gets
// the parsed struct and returns the exit code. launch/commands.cc lists them (Subcommands()).
//
// Parsing is strict: an unknown option, a stray argument, a missing value or a value that is no
// number, out of range or not one of the allowed ones is refused before anything runs, with a
// line that names the option, and the exit code 2. A repeated single-valued option keeps its last
// value. Options shared by several subcommands are added by one function each
// (launch/run_options.h: AddRunOptions, AddTpOptions).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace CLI {
class App;
class Option;
class Validator;
}  // namespace CLI

namespace dmsrt {

// The process's command line as main() received it; MPI_Init takes it (launch/run_options.h).
struct ProcessArgs {
  int argc = 0;
  char** argv = nullptr;
};

using RunFunction = std::function<int(ProcessArgs&)>;

struct Subcommand {
  std::string name;
  std::string description;  // one line, listed by `dmsrt --help`
  // Adds the subcommand's options to `app`, bound to storage the returned function owns; that
  // function runs the subcommand once the command line has been parsed into it.
  std::function<RunFunction(CLI::App& app)> bind;
};

// A Subcommand from its options struct and its two functions.
template <typename Options>
Subcommand MakeSubcommand(std::string name, std::string description,
                          void (*setup)(CLI::App&, Options&),
                          int (*run)(const Options&, ProcessArgs&)) {
  Subcommand c{std::move(name), std::move(description), nullptr};
  c.bind = [setup, run](CLI::App& app) -> RunFunction {
    auto options = std::make_shared<Options>();
    setup(app, *options);
    return [options, run](ProcessArgs& args) { return run(*options, args); };
  };
  return c;
}

// Every subcommand of the binary, in the order `dmsrt --help` lists them (launch/commands.cc).
const std::vector<Subcommand>& Subcommands();

// `dmsrt` and its subcommands as one CLI11 application.
class CommandLine {
 public:
  explicit CommandLine(const std::vector<Subcommand>& subcommands = Subcommands());
  ~CommandLine();
  CommandLine(const CommandLine&) = delete;
  CommandLine& operator=(const CommandLine&) = delete;

  // Parses argv (argv[0] is the program). Returns the exit code when the process should end
  // without running a subcommand: 0 after help was written to `out`, 2 after an error was written
  // to `err` ("dmsrt <subcommand>: <what was wrong>" and where to find the options). Returns
  // nullopt when a subcommand is ready: Run() runs it.
  std::optional<int> Parse(int argc, const char* const* argv, std::ostream& out, std::ostream& err);
  int Run(ProcessArgs& args);

  // The generated help of `subcommand`, or of `dmsrt` itself for "".
  std::string Help(const std::string& subcommand = "") const;

  CLI::App& app() { return *app_; }

 private:
  std::unique_ptr<CLI::App> app_;
  std::vector<std::pair<CLI::App*, RunFunction>> runs_;
};

// Parses the process's command line and runs the chosen subcommand (main()).
int RunCommandLine(int argc, char** argv);

// ---- helpers for setup functions ----------------------------------------------------------------
//
// Validators for numeric options. The value is converted first, so a malformed number is refused
// as such ("--threads: expects an integer, got 'x'"), then checked against the bounds ("--kv-block:
// must be in [1, 4096], got 0"); the bounds appear in --help next to the type.
CLI::Validator Integer(std::optional<int64_t> min = std::nullopt,
                       std::optional<int64_t> max = std::nullopt);
CLI::Validator Number(std::optional<double> min = std::nullopt,
                      std::optional<double> max = std::nullopt, bool min_exclusive = false);

// One of `values`, compared without case and stored in the spelling given here ("--backend:
// expects one of cpu, cuda, got 'x'").
CLI::Validator OneOf(std::vector<std::string> values);

// A byte-size option ("2GiB", "512MiB", "100000000": launch/byte_size.h) stored as bytes;
// `default_text` is what --help shows as the default ("" for none).
CLI::Option* AddByteSizeOption(CLI::App& app, const std::string& name, int64_t* bytes,
                               const std::string& description, const std::string& default_text);
CLI::Option* AddByteSizeOption(CLI::App& app, const std::string& name,
                               std::optional<int64_t>* bytes, const std::string& description);

}  // namespace dmsrt
