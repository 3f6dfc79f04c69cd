// build/bin/dmsrt <subcommand> — see launch/commands.h for the list.
#include "launch/commands.h"

int main(int argc, char** argv) { return dmsrt::RunCommandLine(argc, argv); }
