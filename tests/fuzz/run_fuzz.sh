#!/bin/bash
# Builds the libFuzzer targets for the GGUF and safetensors parsers with clang
# (-fsanitize=fuzzer,address,undefined) and runs each for a bounded time from small valid seeds.
# The project itself is built with gcc, so the parsers (runtime/model/gguf.cc, safetensors.cc,
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
COMMON="-std=c++17 -O1 -g -fno-omit-frame-pointer -fno-sanitize-recover=undefined -I$SRC"
# Parser objects are built once (instrumented for coverage) and shared by both targets; they are
# rebuilt only when their source is newer.
mkdir -p "$WORK/obj"
OBJS=""
for src in gguf safetensors mapped_file tensor; do
  obj="$WORK/obj/$src.o"
  if [ ! -f "$obj" ] || [ "$SRC/runtime/model/$src.cc" -nt "$obj" ] || [ "$SRC/runtime/model/$src.h" -nt "$obj" ]; then
    echo "== compiling runtime/model/$src.cc"
    # shellcheck disable=SC2086
    "$CXX" $COMMON -fsanitize=fuzzer-no-link,address,undefined -c "$SRC/runtime/model/$src.cc" \
        -o "$obj" || { echo "FAIL: could not compile runtime/model/$src.cc with $CXX"; exit 1; }
  fi
  OBJS="$OBJS $obj"
done

python3 "$SRC/tests/fuzz/make_seeds.py" "$WORK/seeds_gguf" "$WORK/seeds_safetensors" || exit 1

status=0
for target in gguf safetensors; do
  bin="$WORK/${target}_fuzz"
  echo "== building $bin"
  # shellcheck disable=SC2086
  if ! "$CXX" $COMMON -fsanitize=fuzzer,address,undefined "$SRC/tests/fuzz/${target}_fuzz.cc" \
      $OBJS -o "$bin" $ABSL_LIBS -pthread; then
    echo "FAIL: could not build the $target fuzz target"
    exit 1
  fi
  corpus="$WORK/corpus_$target"
  mkdir -p "$corpus"
  echo "== fuzzing $target for ${SECS}s"
  log="$WORK/${target}.log"
  (cd "$WORK" && "$bin" -max_total_time="$SECS" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "$corpus" "$WORK/seeds_$target") >"$log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log"
    echo "FAIL: $target fuzzer exited with $rc; reproducer in $WORK (crash-*/leak-*/timeout-*)"
    status=1
  else
    grep -E "^Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" "$log"
    echo "OK: $target: no crash in ${SECS}s"
  fi
done
exit $status
