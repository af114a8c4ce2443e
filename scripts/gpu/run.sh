#!/usr/bin/env bash
# Build and run the decode-attention harness on the GPU machine; results go to $OUT.
#   scripts/gpu/run.sh     build variants, correctness (golden + random), timing grid,
#                          quick grids of the variants, ncu of one shape, torch SDPA baseline
# Env: SDPA=0 skips the torch baseline, NCU=0 skips Nsight Compute, VARIANTS=0 the variants
# (VARIANTS=all: every variant).
# Needs nvcc (CUDA 12.4+), an sm_90 GPU, python3 with torch for the SDPA baseline.
set -uo pipefail
OUT=${OUT:-/tmp/triaxkv-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
status=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
build() { # $1 = name, rest = -D flags; resource report to /tmp/ptxas_$1.txt
  local name=$1; shift
  nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -Xptxas -v "$@" \
    scripts/gpu/attn_harness.cu -o /tmp/h_$name > "/tmp/ptxas_$name.txt" 2>&1
}
# Variants: default (cp.async ring, 3 stages, UNR 1/2, 128 registers; FP8 UNR 2 at 3 CTAs/SM)
# and fp8u1 (FP8 UNR 1 at 4 CTAs/SM), quick grid. (The v1 kernel predates the FP8 class;
# its numbers stay in docs/KERNEL_BENCH.md and its source in git history.)
# VARIANTS=all adds uncapped registers and the plain register-load path (quick grid). (A 4-stage
# variant no longer fits the 48 KB of static shared memory since v4's INT2 stages hold 4 tiles.)
build main &
if [ "${VARIANTS:-1}" != 0 ]; then
  build fp8u1 -DTKV_UNR_FP8=1 -DTKV_MIN_BLOCKS_FP8=4 &
fi
if [ "${VARIANTS:-1}" = all ]; then
  build mb1 -DTKV_MIN_BLOCKS=1 &
  build regs -DTKV_STAGES=0 -DTKV_UNR_INT4=2 -DTKV_UNR_INT2=4 -DTKV_MIN_BLOCKS=1 &
fi
wait
[ -x /tmp/h_main ] || { echo "BUILD FAILED"; grep -m20 error "/tmp/ptxas_main.txt"; exit 1; }
grep -A2 "properties for tkv_decode_.*vg64" "/tmp/ptxas_main.txt" | grep -E "properties|spill|Used" | head -12
echo "== golden"; /tmp/h_main golden tests/fixtures/kv_golden/decode_case1.bin || status=1
echo "== golden (CUDA graph)"; TKV_GRAPH=1 /tmp/h_main golden tests/fixtures/kv_golden/decode_case1.bin | tail -3 || status=1
echo "== random"; /tmp/h_main random || status=1
echo "== bench main"; /tmp/h_main bench "$OUT/bench.json" > "$OUT/bench.txt" || status=1
cat "$OUT/bench.txt"
for v in fp8u1 mb1 regs; do
  [ -x /tmp/h_$v ] || continue
  echo "== variant $v"
  grep -A2 "properties for tkv_decode_\(int2\|fp8\)_vg64" "/tmp/ptxas_$v.txt" | grep -E "Used" | head -2
  /tmp/h_$v golden tests/fixtures/kv_golden/decode_case1.bin | tail -1 || status=1
  if [ $v = v1 ]; then
    /tmp/h_$v bench "$OUT/bench_v1.json" > "$OUT/bench_v1.txt" || status=1
  else
    TKV_QUICK=1 /tmp/h_$v bench "/tmp/bench_$v.json" > "$OUT/bench_$v.txt" || status=1
  fi
  tail -n +3 "$OUT/bench_$v.txt"
done
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  echo "== ncu int2 8x32k"
  TKV_ONLY=int2:8:32768 timeout 240 ncu --clock-control none -k regex:tkv_decode_int2 -s 3 -c 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section InstructionStats /tmp/h_main bench /tmp/ncu.json > "$OUT/ncu.txt" 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Issued Warp|No Eligible|Warp Cycles Per Issued|Executed Instructions  " "$OUT/ncu.txt" | head -30
fi
if [ "${SDPA:-1}" = 1 ]; then
  echo "== torch SDPA baseline"
  PYTHONUNBUFFERED=1 python3 scripts/gpu/sdpa_baseline.py "$OUT/sdpa.json" | tee "$OUT/sdpa.txt" || status=1
fi
exit $status
