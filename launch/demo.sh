#!/usr/bin/env bash
# The main job on the default model: a best-of-8 reasoning job through the coordinator.
# Starts one `dmsrt serve` world of 2 replicas under mpirun on 127.0.0.1 (rank 0 also hosts the
# coordinator), submits the question with `dmsrt submit`, prints the selected answer, the votes and
# per-thread figures, then stops the server. Run launch/setup.sh first.
#   bash launch/demo.sh ["question"] [n]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${DMSRT_BIN:-build/bin/dmsrt}
[ -x $bin ] || { echo "demo.sh: $bin is missing: run launch/setup.sh" >&2; exit 1; }
question=${1:-"What is 12 times 7? Put the final answer in \\boxed{}."}
n=${2:-8}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t dmsrt_serve.XXXXXX.log)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "starting 2 replicas on 127.0.0.1:$port (log: $log)"
setsid mpirun --oversubscribe -np 2 $bin serve --listen 127.0.0.1:$port --threads 1 --kv-budget 256MiB \
  > "$log" 2>&1 &
server=$!
stop() { kill -TERM -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true; }
trap stop EXIT
$bin submit --address 127.0.0.1:$port --wait-ready 120 --chat "$question" --n "$n" \
  --max-tokens 96 --temperature 0.7 --seed 1
