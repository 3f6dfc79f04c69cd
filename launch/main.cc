// build/bin/dmsrt <subcommand> — see launch/commands.cc for the list, `dmsrt --help` for the same.
#include "launch/cli.h"

int main(int argc, char** argv) { return dmsrt::RunCommandLine(argc, argv); }
