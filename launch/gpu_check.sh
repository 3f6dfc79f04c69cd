#!/usr/bin/env bash
# One-call check of the CUDA kernels on a GPU machine: configure + build (CUDA on, no MPI/gRPC),
# run the GPU tests (ctest -L gpu), run the kernel benchmark, the PyTorch SDPA peer and the
# end-to-end decode benchmark of the CUDA backend on the Qwen3-8B-shaped synthetic model (batch
# 1/32/256 x context 4K/32K, KV policy none vs forced DMS at 0.875 vs dms: the model's own
# Variant-A decisions, context filled at 0.875, window 16 as forced), and print a short summary
# table LAST (decode-attention GB/s vs measured copy bandwidth and vs SDPA, the DMS time ratio,
# end-to-end decode tokens/s, KV held and device memory per cell).
#
# With two or more GPUs (and MPI: mpirun and its headers) it also runs tensor parallelism on
# them: the TP tests (ctest -L gpu_tp: the CUDA backend at TP 2/4/8 against TP 1 and the CPU,
# generate and bench-decode --tp 2 under mpirun), an all-reduce sweep over all GPUs in
# nccl-tests' terms (size, time, algbw, busbw, #wrong; tests/bench/allreduce_bench.cc --nccl),
# and end-to-end decode at TP 2 next to TP 1. With one GPU it says plainly that it skipped them.
#
# Works on a bare machine that has only a CUDA toolkit, CMake and PyTorch: abseil and GoogleTest
# are built from third_party/ (run launch/fetch_source_deps.sh beforehand where the registry is
# reachable and carry third_party/ along). Logs and JSON go to $OUT when it is set, otherwise to
# $BUILD/gpu_check/.
#
# Usage: launch/gpu_check.sh [--quick] [--no-bench] [--build-dir DIR]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build="$here/build-gpu"
quick=""
bench=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --no-bench) bench=0 ;;
    --build-dir) build="$2"; shift ;;
    *) echo "usage: $0 [--quick] [--no-bench] [--build-dir DIR]" >&2; exit 2 ;;
  esac
  shift
done
out="${OUT:-$build/gpu_check}"
mkdir -p "$out"
jobs=$(nproc 2>/dev/null || echo 4)

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
date -u +"date: %Y-%m-%dT%H:%M:%SZ"

echo "== configure"
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DDMSRT_WITH_CUDA=ON -DDMSRT_WITH_MPI=AUTO \
  -DDMSRT_WITH_GRPC=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/build.log" 2>&1 || {
  tail -40 "$out/build.log"; echo "gpu_check: configure failed (log: $out/build.log)"; exit 1; }
grep "dmsrt:" "$out/build.log"

echo "== build (-j$jobs)"
build_status="full"
if ! cmake --build "$build" -j"$jobs" >>"$out/build.log" 2>&1; then
  # Another part of the tree may not build here; the GPU tests and the benchmark may still.
  gpu_targets=$(ls "$here"/tests/gpu/*_test.c* 2>/dev/null | xargs -n1 basename | sed 's/\.c[cu]*$//' | tr '\n' ' ')
  gpu_targets="$gpu_targets dmsrt tp_cuda_backend_gpu_test allreduce_bench"
  echo "full build failed; building only: $gpu_targets gpu_attention_bench"
  grep -E "error" "$out/build.log" | head -10
  build_status="partial"
  for t in $gpu_targets gpu_attention_bench; do
    cmake --build "$build" -j"$jobs" --target "$t" >>"$out/build.log" 2>&1 || {
      echo "target $t failed to build"; build_status="partial (some targets failed)"; }
  done
fi
echo "build: $build_status"

echo "== ctest -L gpu"
tests_rc=0
(cd "$build" && ctest -L gpu --output-on-failure --timeout 600) 2>&1 | tee "$out/ctest.log"
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E "tests passed|tests failed" "$out/ctest.log" | tail -1)

if [ "$bench" = 1 ]; then
  echo "== kernel benchmark"
  if [ -x "$build/bin/gpu_attention_bench" ]; then
    "$build/bin/gpu_attention_bench" $quick --json "$out/gpu_bench.json" 2>&1 | tee "$out/bench.txt"
  else
    echo "gpu_attention_bench was not built"
  fi
  echo "== PyTorch SDPA peer"
  PYTHONUNBUFFERED=1 python3 "$here/tests/bench/sdpa_peer.py" $quick --json "$out/sdpa.json" 2>&1 | tee "$out/sdpa.txt"
  echo "== end-to-end decode, Qwen3-8B shapes (synthetic weights generated on the device)"
  e2e_batch="1,32,256"; e2e_steps=16
  [ -n "$quick" ] && { e2e_batch="1,32"; e2e_steps=4; }
  for pol in none forced dms; do
    model=qwen3-8b; rate=(--dms-force-rate 0.875)
    [ "$pol" = dms ] && { model=qwen3-8b:dms; rate=(--dms-fill-rate 0.875); }
    if [ -x "$build/bin/dmsrt" ]; then
      "$build/bin/dmsrt" bench-decode --backend cuda --synthetic "$model" --batch "$e2e_batch" \
        --context 4096,32768 --steps "$e2e_steps" --kv-policy "$pol" "${rate[@]}" \
        --dms-window 16 --json >"$out/e2e_$pol.json" 2>"$out/e2e_$pol.err" || {
          echo "bench-decode ($pol) failed:"; tail -5 "$out/e2e_$pol.err"; }
    fi
  done
fi

echo "== tensor parallelism"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
tp_line=""
if [ "$gpus" -lt 2 ]; then
  tp_line="skipped: this machine has $gpus GPU(s); the TP tests and the all-reduce sweep need two or more"
elif ! grep -q "MPI=ON" "$out/build.log"; then
  tp_line="skipped: $gpus GPUs, but no MPI was found (apt-get install libopenmpi-dev openmpi-bin), which tensor parallelism needs"
else
  mpi=(mpirun)
  mpirun --version 2>&1 | grep -q "Open MPI" && mpi+=(--allow-run-as-root --bind-to none)
  tp_np=2; [ "$gpus" -ge 4 ] && tp_np=4; [ "$gpus" -ge 8 ] && tp_np=8
  sel="tp_cuda_backend_gpu_np2|tp_cuda_cli_gpu"
  [ "$tp_np" -ge 4 ] && sel="$sel|tp_cuda_backend_gpu_np4"
  [ "$tp_np" -ge 8 ] && sel="$sel|tp_cuda_backend_gpu_np8"
  (cd "$build" && ctest -L gpu_tp -R "$sel" --output-on-failure --timeout 900) 2>&1 | tee "$out/ctest_tp.log"
  tp_rc=${PIPESTATUS[0]}
  [ "$tp_rc" -ne 0 ] && tests_rc=$tp_rc
  tp_line="TP tests: $(grep -E "tests passed|tests failed" "$out/ctest_tp.log" | tail -1)"
  echo "-- all-reduce sweep over $gpus GPUs (NCCL)"
  if [ -x "$build/tests/allreduce_bench" ]; then
    "${mpi[@]}" -np "$gpus" "$build/tests/allreduce_bench" --nccl -b 8 -e 1G -f 4 -n 20 -w 5 -r 5 \
      --json "$out/allreduce.json" 2>&1 | tee "$out/allreduce.txt"
    [ "${PIPESTATUS[0]}" -ne 0 ] && { tests_rc=1; tp_line="$tp_line; all-reduce sweep FAILED"; }
  else
    tp_line="$tp_line; allreduce_bench was not built"
  fi
  if [ "$bench" = 1 ] && [ -x "$build/bin/dmsrt" ]; then
    echo "-- end-to-end decode, qwen3-8b shapes, TP 1 and TP 2"
    tp_bench=(bench-decode --backend cuda --synthetic qwen3-8b --batch 1,32 --context 4096
              --steps 8 --kv-policy forced --dms-force-rate 0.875 --dms-window 16 --json)
    "$build/bin/dmsrt" "${tp_bench[@]}" >"$out/e2e_tp1.json" 2>"$out/e2e_tp1.err"
    "${mpi[@]}" -np 2 "$build/bin/dmsrt" "${tp_bench[@]}" --tp 2 >"$out/e2e_tp2.json" 2>"$out/e2e_tp2.err" \
      || { echo "bench-decode --tp 2 failed:"; tail -5 "$out/e2e_tp2.err"; }
  fi
fi
echo "$tp_line"

echo "== summary"
python3 - "$out" "$tests_line" "$build_status" "$tp_line" <<'PY' | tee "$out/summary.txt"
import json, os, sys
out, tests_line, build_status, tp_line = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def load(name):
    p = os.path.join(out, name)
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return None
b = load("gpu_bench.json")
s = load("sdpa.json")
print(f"build: {build_status}; gpu tests: {tests_line or 'no result'}")
if b:
    print(f"device: {b['device']} ({b['sms']} SMs); copy D2D (read+write): {b['copy_gbps']:.0f} GB/s")
    sd = {(r['batch'], r['len']): r for r in (s['sdpa'] if s else [])}
    print(f"{'batch':>5} {'len':>6} {'dmsrt ms':>9} {'GB/s':>7} {'%copy':>6} {'sdpa ms':>8} {'sdpa GB/s':>9} {'speedup':>7}")
    for r in b['decode']:
        p = sd.get((r['batch'], r['dense_len']))
        ps = f"{p['median_ms']:>8.4f} {p['gbps']:>9.0f} {p['median_ms']/r['median_ms']:>6.2f}x" if p else f"{'-':>8} {'-':>9} {'-':>7}"
        print(f"{r['batch']:>5} {r['dense_len']:>6} {r['median_ms']:>9.4f} {r['gbps']:>7.0f} {100*r['gbps']/b['copy_gbps']:>5.1f}% {ps}")
    for d in b['dms']:
        print(f"DMS batch {d['dense']['batch']} L {d['dense']['dense_len']}: resident {d['dms']['resident_len']} -> {d['time_ratio']:.2f}x faster than dense")
    print(f"prefill 2048+2048 survivors: {b['prefill_ms']:.3f} ms ({b['prefill_tflops']:.2f} TFLOP/s); sampling 64x151936: {b['sampling_ms']:.3f} ms")
    peak = b['peak_used_bytes'] / 2**30
    tp = s['peak_bytes'] / 2**30 if s else float('nan')
    print(f"peak device memory: dmsrt bench {peak:.2f} GiB in use; torch SDPA {tp:.2f} GiB allocated")
else:
    print("no benchmark results")
e = {p: load(f"e2e_{p}.json") for p in ("none", "forced", "dms")}
if any(e.values()):
    print("end-to-end decode, qwen3-8b shapes (bf16, synthetic weights), tokens/s (KV GiB held):")
    print(f"{'batch':>5} {'context':>7} {'none':>22} {'forced 0.875':>22} {'dms (model bits)':>22} {'device GiB':>10}")
    cells = {}
    for p, j in e.items():
        for c in (j or {}).get('cells', []):
            cells.setdefault((c['batch'], c['context']), {})[p] = c
    for (bt, ctx), cs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def fmt(c):
            if not c:
                return f"{'-':>22}"
            if not c['fits']:
                return f"{'does not fit':>22}"
            return f"{c['decode_tokens_per_s']:>10.0f} ({c['kv_bytes_held']/2**30:>6.1f} GiB)"
        dev = max(c.get('device_bytes_in_use', 0) for c in cs.values()) / 2**30
        print(f"{bt:>5} {ctx:>7} {fmt(cs.get('none'))} {fmt(cs.get('forced'))} {fmt(cs.get('dms'))} {dev:>10.1f}")
print(f"tensor parallelism: {tp_line}")
a = load("allreduce.json")
if a:
    rows = a.get("rows", [])
    wrong = sum(r.get("wrong", 0) for r in rows)
    best = max(rows, key=lambda r: r.get("busbw_gbs", 0), default=None)
    if best:
        print(f"all-reduce over {a.get('ranks', '?')} GPUs ({a.get('comm')}): peak busbw "
              f"{best['busbw_gbs']:.1f} GB/s at {best['bytes']} bytes; #wrong {wrong}")
t1, t2 = load("e2e_tp1.json"), load("e2e_tp2.json")
if t1 and t2:
    print("end-to-end decode, qwen3-8b shapes, forced 0.875: tokens/s at TP 1 -> TP 2")
    for c1, c2 in zip(t1["cells"], t2["cells"]):
        if c1.get("fits") and c2.get("fits"):
            print(f"  batch {c1['batch']:>3} context {c1['context']}: {c1['decode_tokens_per_s']:.0f} -> "
                  f"{c2['decode_tokens_per_s']:.0f} ({c2['decode_tokens_per_s'] / c1['decode_tokens_per_s']:.2f}x)")
PY
exit $tests_rc
