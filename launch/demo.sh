#!/usr/bin/env bash
# The main job on the default model: a chat prompt through `dmsrt generate`, streamed, with the
# speed and KV figures. Run launch/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/bin/dmsrt ] || { echo "demo.sh: build/bin/dmsrt is missing: run launch/setup.sh" >&2; exit 1; }
build/bin/dmsrt generate --chat "${1:-What is 12 times 7? Answer briefly.}" --max-tokens 96
