#include "launch/commands.h"

#include <cstdio>
#include <cstring>
#include <string>

#ifdef DMSRT_HAVE_GRPC
#include "launch/service_commands.h"
#endif

namespace dmsrt {
namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* help;
};

const Command kCommands[] = {
    {"generate", RunGenerate, "one prompt or chat turn -> streamed text, then speed and KV figures"},
    {"score", RunScore, "teacher-forced perplexity / top-1 / logits of a text"},
    {"bench", RunBench, "prefill/decode speed next to the measured memory-bandwidth floor; JSON profile"},
    {"bench-decode", RunBenchDecode, "decode tokens/s at batch x context for a real or synthetic model (cpu or cuda)"},
    {"eval", RunEval, "eviction quality: perplexity, KL and top-1 against dense, passkey retrieval, per policy and cache CR"},
    {"tokenize", RunTokenize, "text -> token ids (and --decode ids -> text)"},
#ifdef DMSRT_HAVE_GRPC
    {"serve", RunServe, "one replica (TP group under mpirun); hosts the coordinator unless --coordinator"},
    {"coordinator", RunCoordinator, "the coordinator alone; replicas join with serve --coordinator"},
    {"submit", RunSubmit, "submit a best-of-N job and show progress, answer and votes"},
#endif
};

void Usage(FILE* out) {
  std::fprintf(out, "usage: dmsrt <subcommand> [options]\n\nsubcommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-12s %s\n", c.name, c.help);
}

}  // namespace

int RunCommandLine(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    Usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : kCommands) {
    if (std::string(argv[1]) == c.name) return c.run(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "dmsrt: unknown subcommand '%s'\n\n", argv[1]);
  Usage(stderr);
  return 2;
}

}  // namespace dmsrt
