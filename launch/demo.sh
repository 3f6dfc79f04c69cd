#!/usr/bin/env bash
# The main job on the default model: a best-of-8 reasoning job through the coordinator.
# Starts one `dmsrt serve` world of 2 replicas under mpirun on 127.0.0.1 (rank 0 also hosts the
# coordinator), submits the question with `dmsrt submit` as a budget-mode job (the coordinator
# runs as many threads as the KV budget holds), prints the selected answer, the votes and
# per-thread figures (cache CR included), then stops the server. The replicas run the default
# model with its learned DMS adapter (adapters/SmolLM2-135M-Instruct.dms.safetensors, found
# without a flag), so the same budget buys more threads than a dense cache; pass `dense` as the
# third argument to run the same job on a dense cache and compare. Run launch/setup.sh first.
#   bash launch/demo.sh ["question"] [budget] [dense]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${DMSRT_BIN:-build/bin/dmsrt}
[ -x $bin ] || { echo "demo.sh: $bin is missing: run launch/setup.sh" >&2; exit 1; }
question=${1:-"What is 12 times 7? Put the final answer in \\boxed{}."}
budget=${2:-24MiB}
cache=${3:-dms}
serve_flags=""
if [ "$cache" = dense ]; then serve_flags="--no-dms-adapter"; fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t dmsrt_serve.XXXXXX.log)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "starting 2 replicas on 127.0.0.1:$port (log: $log)"
setsid mpirun --oversubscribe -np 2 $bin serve --listen 127.0.0.1:$port --threads 1 --kv-budget 256MiB \
  $serve_flags > "$log" 2>&1 &
server=$!
stop() { kill -TERM -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true; }
trap stop EXIT
echo "KV cache: $cache$( [ "$cache" = dms ] && echo " (learned adapter, see the serve log)"); job budget: $budget"
$bin submit --address 127.0.0.1:$port --wait-ready 120 --chat "$question" --budget "$budget" \
  --max-tokens 96 --temperature 0.7 --seed 1
