#!/usr/bin/env bash
# The test command: installs everything (including the test-only Python packages), builds, and
# runs the whole ctest suite: unit, mpi (real mpirun), e2e (gRPC on loopback), oracle (llama.cpp
# on the default model), fuzz (bounded). GPU tests skip with a reason on machines without one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash launch/setup.sh --test-deps
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --test-dir build --output-on-failure -j"${DMSRT_TEST_JOBS:-2}" "$@"
