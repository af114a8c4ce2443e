#!/usr/bin/env bash
# GPU tests and `triaxkv bench attention` on a machine with a GPU but no cargo.
#
#   scripts/gpu-check.sh --pack DIR   here (with cargo): build the binary and the GPU test
#                                     binary, strip them into DIR with this script and the
#                                     SDPA baseline script (DIR then travels to the GPU machine)
#   bash DIR/gpu-check.sh             there: run the tests and the benchmarks, results to $OUT
#
# Env (run mode): BENCH=0 skips the benchmark, SDPA=0 the PyTorch SDPA baseline on the same
# shapes, HARNESS=1 also runs the nvcc harness's quick grid (same kernel, scripts/gpu/),
# NCU=1 profiles the INT2 kernel at 8 x 32k with Nsight Compute, BENCH_ARGS adds arguments to
# `bench attention` (e.g. "--batch 8 --context 32768"), TESTS adds arguments to the GPU test
# binary (a name filter, e.g. "decode_step gemm"), DECODE_STEP=1 also runs `bench decode-step`
# (random-weight llama3-8b; DECODE_STEP_ARGS adds arguments, e.g. "--batch 8,32";
# DECODE_STEP_ARGS2, when set, runs it a second time with those arguments). SDPA_BATCH and
# SDPA_CONTEXT (comma-separated) set the SDPA baseline's grid (default 1,8,32 x 4k,32k,128k).
# FORWARD=1 runs `eval gpu-forward` (GPU vs CPU forward of a real model; MODEL names the GGUF,
# FORWARD_ARGS adds arguments, e.g. "--max-tokens 1024"). SERVE=1 runs `bench serve` on the
# packed workload (serve-workload.json, rendered by --pack from every trajectory in traces/all;
# SERVE_ARGS adds arguments, e.g. "--kv-memory 4GiB --duration 60"). SERVE_GPU=1 runs
# `triaxkv serve --gpu` on MODEL (scripts/gpu/serve_check.py: greedy answers vs the CPU
# server, then concurrent multi-turn clients; SERVE_GPU_ARGS adds arguments, e.g.
# "--clients 64 --duration 60"; "--wait-fp8 --sinks-fp8 --decode-fp8 --window-fp8" go to the GPU
# server; a profile allocated with --hold-fp8 sets them itself), once per
# entry of SERVE_GPU_PROFILES (default "f16
# tag-only-2.97": 16-bit, then profiles/tag-only-2.97.json, which the GPU pool stores exactly).
# BUNDLE=1 leaves $OUT holding one results.tar.gz of everything the run wrote (for transports
# that bring back only a few files: SERVE_GPU alone writes more than eight).
set -uo pipefail

if [ "${1:-}" = "--pack" ]; then
  dir=${2:?usage: scripts/gpu-check.sh --pack DIR}
  set -e
  cd "$(dirname "$0")/.."
  target=${CARGO_TARGET_DIR:-target}
  cargo build --bin triaxkv
  test_bin=$(cargo test --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
  mkdir -p "$dir"
  strip -o "$dir/triaxkv" "$target/debug/triaxkv"
  strip -o "$dir/gpu-tests" "$test_bin"
  cp scripts/gpu-check.sh scripts/gpu/sdpa_baseline.py scripts/gpu/serve_check.py "$dir/"
  # bench serve's workload needs the tokenizer, which the GPU machine lacks: render it here
  # (every bundled trajectory; xz: the carried files share 64 MiB).
  rm -f "$dir/serve-workload.json.xz"
  "$target/debug/triaxkv" bench serve-workload --traces traces/all \
    -o "$dir/serve-workload.json"
  xz -T2 -6 "$dir/serve-workload.json"
  mkdir -p "$dir/profiles"
  cp profiles/*.json "$dir/profiles/"
  # xz shrinks the binaries ~5x: the carried tree, binaries and any model share 64 MiB.
  rm -f "$dir/triaxkv.xz" "$dir/gpu-tests.xz"
  xz -T2 -6 "$dir/triaxkv" "$dir/gpu-tests"
  du -sh "$dir"/*
  exit 0
fi

HERE=$(cd "$(dirname "$0")" && pwd)
for b in triaxkv gpu-tests; do
  if [ -f "$HERE/$b.xz" ] && [ ! -x "$HERE/$b" ]; then xz -dk "$HERE/$b.xz"; fi
done
if [ -f "$HERE/serve-workload.json.xz" ] && [ ! -f "$HERE/serve-workload.json" ]; then
  xz -dk "$HERE/serve-workload.json.xz"
fi
OUT=${OUT:-/tmp/triaxkv-gpu-out}
mkdir -p "$OUT"
export TRIAXKV_HOME=${TRIAXKV_HOME:-/tmp/triaxkv-home}
export TRIAXKV_REQUIRE_GPU=1 # the tests fail instead of skipping
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv \
  >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [ "${HARNESS:-0}" = 1 ]; then
  (nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 scripts/gpu/attn_harness.cu \
    -o /tmp/attn_harness >/tmp/harness_build.txt 2>&1) &
fi

# cuBLAS (bench decode-step, its tests) is loaded at run time: find it where the loader
# does not (the CUDA toolkit's lib64, or the nvidia-cublas wheel).
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia.cublas, os; print(os.path.join(nvidia.cublas.__path__[0], "lib"))' 2>/dev/null); do
    if ls "$d"/libcublas.so* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      echo "libcublas from $d"
      break
    fi
  done
fi

echo "== GPU tests"
# shellcheck disable=SC2086
"$HERE/gpu-tests" --test-threads=1 --nocapture ${TESTS:-} 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

sdpa_arg=()
if [ "${SDPA:-1}" = 1 ] && [ "${BENCH:-1}" = 1 ]; then
  echo "== PyTorch SDPA baseline"
  if python3 "$HERE/sdpa_baseline.py" "$OUT/sdpa.json" 2>&1 | tee "$OUT/sdpa.txt"; then
    sdpa_arg=(--sdpa "$OUT/sdpa.json")
  else
    status=1
  fi
fi

if [ "${BENCH:-1}" = 1 ]; then
  echo "== bench attention"
  # shellcheck disable=SC2086
  "$HERE/triaxkv" bench attention "${sdpa_arg[@]}" --json "$OUT/bench_attention.json" \
    --markdown "$OUT/bench_attention.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "${DECODE_STEP:-0}" = 1 ]; then
  echo "== bench decode-step (random weights, speed only)"
  # shellcheck disable=SC2086
  "$HERE/triaxkv" bench decode-step --random-weights llama3-8b \
    --json "$OUT/bench_decode_step.json" --markdown "$OUT/bench_decode_step.md" \
    ${DECODE_STEP_ARGS:-} 2>&1 | tee "$OUT/decode_step.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  if [ -n "${DECODE_STEP_ARGS2:-}" ]; then
    # shellcheck disable=SC2086
    "$HERE/triaxkv" bench decode-step --random-weights llama3-8b \
      --json "$OUT/bench_decode_step2.json" --markdown "$OUT/bench_decode_step2.md" \
      $DECODE_STEP_ARGS2 2>&1 | tee "$OUT/decode_step2.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
fi

if [ "${FORWARD:-0}" = 1 ]; then
  echo "== eval gpu-forward (GPU forward vs CPU forward, real weights)"
  # shellcheck disable=SC2086
  "$HERE/triaxkv" eval gpu-forward ${MODEL:+--model "$MODEL"} -o "$OUT/gpu-forward" \
    ${FORWARD_ARGS:-} 2>&1 | tee "$OUT/gpu_forward.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "${SERVE:-0}" = 1 ]; then
  echo "== bench serve (random weights, recorded agent sessions)"
  # shellcheck disable=SC2086
  (cd "$HERE" && ./triaxkv bench serve --workload serve-workload.json \
    --json "$OUT/bench_serve.json" --markdown "$OUT/bench_serve.md" ${SERVE_ARGS:-}) \
    2>&1 | tee "$OUT/serve.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "${SERVE_GPU:-0}" = 1 ]; then
  echo "== serve --gpu (real model: greedy vs the CPU server, concurrent clients)"
  for p in ${SERVE_GPU_PROFILES:-f16 tag-only-2.97}; do
    prof=()
    [ "$p" = f16 ] || prof=(--profile "$HERE/profiles/$p.json")
    # shellcheck disable=SC2086
    python3 "$HERE/serve_check.py" --bin "$HERE/triaxkv" --model "${MODEL:?SERVE_GPU needs MODEL}" \
      --out "$OUT/serve-gpu-$p" "${prof[@]}" ${SERVE_GPU_ARGS:-} 2>&1 | tee "$OUT/serve-gpu-$p.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi

if [ "${HARNESS:-0}" = 1 ]; then
  wait
  echo "== nvcc harness, quick grid (same kernel)"
  if [ -x /tmp/attn_harness ]; then
    TKV_QUICK=1 /tmp/attn_harness bench /tmp/harness.json 2>&1 | tee -a "$OUT/bench.log"
  else
    cat /tmp/harness_build.txt
    status=1
  fi
fi

if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
  echo "== ncu int2 8 x 32k"
  timeout 300 ncu --clock-control none -k regex:tkv_decode_int2 -s 3 -c 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section InstructionStats \
    "$HERE/triaxkv" bench attention --batch 8 --context 32768 --caches int2 --iters 3 \
    >"$OUT/ncu.txt" 2>&1 || status=1
  grep -E "Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Executed Instructions  " \
    "$OUT/ncu.txt" | head -20
fi
if [ "${BUNDLE:-0}" = 1 ]; then
  bundle=$(mktemp /tmp/triaxkv-results.XXXXXX)
  (cd "$OUT" && tar czf "$bundle" . && find . -mindepth 1 -delete && mv "$bundle" results.tar.gz) ||
    status=1
fi
exit $status
