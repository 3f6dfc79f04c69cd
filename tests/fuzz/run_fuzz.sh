#!/bin/bash
# Builds the libFuzzer targets for the GGUF and safetensors parsers with clang
# (-fsanitize=fuzzer,address,undefined) and runs each for a bounded time from small valid seeds.
# The project itself is built with gcc, so the parsers (runtime/gguf.cc, safetensors.cc,
# mapped_file.cc, tensor.cc: abseil and nlohmann-json only) are compiled here on their own.
#
# usage: run_fuzz.sh SOURCE_DIR WORK_DIR [SECONDS_PER_TARGET]
# exit: 0 no finding, 1 a crash/leak/timeout was found (reproducer left in WORK_DIR),
#       77 skipped (no clang++ with libFuzzer, or no python3 for the seeds).
set -u
SRC=${1:?source dir}
WORK=${2:?work dir}
SECS=${3:-20}
CXX=${FUZZ_CXX:-clang++}

if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "SKIP: $CXX not found; install clang to run the fuzz targets"
  exit 77
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "SKIP: python3 not found (needed to write the seed files)"
  exit 77
fi
mkdir -p "$WORK"
probe="$WORK/probe.cc"
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' > "$probe"
if ! "$CXX" -fsanitize=fuzzer "$probe" -o "$WORK/probe" >/dev/null 2>&1; then
  echo "SKIP: $CXX cannot build libFuzzer targets (-fsanitize=fuzzer unsupported)"
  exit 77
fi

# Abseil libraries the parsers need (status, strings, and their dependencies).
ABSL_LIBS="-labsl_status -labsl_statusor -labsl_strings -labsl_str_format_internal -labsl_cord
  -labsl_cordz_info -labsl_cord_internal -labsl_cordz_functions -labsl_cordz_handle
  -labsl_strings_internal -labsl_int128 -labsl_throw_delegate -labsl_raw_logging_internal
  -labsl_synchronization -labsl_time -labsl_base -labsl_spinlock_wait -labsl_stacktrace
  -labsl_symbolize -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal
  -labsl_graphcycles_internal -labsl_exponential_biased -labsl_time_zone"
FLAGS="-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
  -fno-sanitize-recover=undefined -I$SRC"
PARSERS="$SRC/runtime/gguf.cc $SRC/runtime/safetensors.cc $SRC/runtime/mapped_file.cc
  $SRC/runtime/tensor.cc"

python3 "$SRC/tests/fuzz/make_seeds.py" "$WORK/seeds_gguf" "$WORK/seeds_safetensors" || exit 1

status=0
for target in gguf safetensors; do
  bin="$WORK/${target}_fuzz"
  echo "== building $bin"
  # shellcheck disable=SC2086
  if ! "$CXX" $FLAGS "$SRC/tests/fuzz/${target}_fuzz.cc" $PARSERS -o "$bin" $ABSL_LIBS -pthread; then
    echo "FAIL: could not build the $target fuzz target"
    exit 1
  fi
  corpus="$WORK/corpus_$target"
  mkdir -p "$corpus"
  echo "== fuzzing $target for ${SECS}s"
  (cd "$WORK" && "$bin" -max_total_time="$SECS" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "$corpus" "$WORK/seeds_$target") 2>&1 | tail -n 25
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "FAIL: $target fuzzer exited with $rc; reproducer in $WORK (crash-*/leak-*/timeout-*)"
    status=1
  else
    echo "OK: $target: no crash in ${SECS}s"
  fi
done
exit $status
