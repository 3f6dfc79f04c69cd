// Subcommands of the dmsrt binary. Each returns the process exit code; none calls exit().
#pragma once

namespace dmsrt {

// Dispatches argv[1] to a subcommand; prints usage for none or an unknown one.
int RunCommandLine(int argc, char** argv);

// Subcommand entry points: argv[0] is the subcommand name.
int RunGenerate(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunScore(int argc, char** argv);
int RunBench(int argc, char** argv);
int RunBenchDecode(int argc, char** argv);
int RunEval(int argc, char** argv);

}  // namespace dmsrt
