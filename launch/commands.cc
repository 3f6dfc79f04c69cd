// The subcommands of the dmsrt binary, in the order `dmsrt --help` lists them.
#include "launch/commands.h"
#include "launch/plan/plan_command.h"

#ifdef DMSRT_HAVE_GRPC
#include "launch/service_commands.h"
#endif

namespace dmsrt {

const std::vector<Subcommand>& Subcommands() {
  static const std::vector<Subcommand> kSubcommands = {
      MakeSubcommand("generate", "one prompt or chat turn -> streamed text, then speed and KV figures",
                     SetupGenerate, RunGenerate),
      MakeSubcommand("score", "teacher-forced perplexity / top-1 / logits of a text", SetupScore,
                     RunScore),
      MakeSubcommand("bench", "prefill/decode speed next to the measured memory-bandwidth floor; JSON profile",
                     SetupBench, RunBench),
      MakeSubcommand("bench-decode",
                     "decode tokens/s at batch x context for a real or synthetic model (cpu or cuda)",
                     SetupBenchDecode, RunBenchDecode),
      MakeSubcommand("eval",
                     "eviction quality: perplexity, KL and top-1 against dense, passkey retrieval, "
                     "per policy and cache CR",
                     SetupEval, RunEval),
      MakeSubcommand("plan",
                     "capacity planning: GPUs for a best-of-N workload at a latency SLO, by "
                     "simulating the real scheduler with measured or datasheet step times",
                     SetupPlan, RunPlanCommand),
      MakeSubcommand("tokenize", "text -> token ids (and --decode ids -> text)", SetupTokenize,
                     RunTokenize),
#ifdef DMSRT_HAVE_GRPC
      MakeSubcommand("serve", "one replica (TP group under mpirun); hosts the coordinator unless --coordinator",
                     SetupServe, RunServe),
      MakeSubcommand("coordinator", "the coordinator alone; replicas join with serve --coordinator",
                     SetupCoordinator, RunCoordinator),
      MakeSubcommand("submit", "submit a best-of-N job and show progress, answer and votes",
                     SetupSubmit, RunSubmit),
#endif
  };
  return kSubcommands;
}

}  // namespace dmsrt
