#!/usr/bin/env bash
# The README's first command: fetch the default model, build, and run the main job on the
# bundled default (SmolLM2-135M-Instruct + traces/): inspect tags, generate a real agent step,
# a quick calibration, allocation at equal memory and evaluation. Outputs go to ./demo-out/ (override with DEMO_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/triaxkv-target}"
out="${DEMO_OUT:-demo-out}"

bash scripts/setup.sh >/dev/null
cargo build --locked --bin triaxkv
bin="$CARGO_TARGET_DIR/debug/triaxkv"

echo "== 1. token counts per tag on the calibration traces"
"$bin" trace inspect traces/calib/*.jsonl

echo "== 2. the model continues a recorded tau-bench agent before its second assistant step"
"$bin" generate --trace traces/test/tau-bench-airline.jsonl --index 0 --upto-step 1 --max-tokens 48

echo "== 3. quick calibration (per-tag attention distortion at INT2/INT4) -> $out/calib"
"$bin" calibrate --traces traces/calib/webvoyager.jsonl traces/calib/swe-agent.jsonl \
    --max-tokens 4096 --queries 32 -o "$out/calib"

echo "== 4. allocate: the KIVI-2 baseline, and the tri-axial profile at the same memory"
"$bin" allocate --calib "$out/calib" --policy kivi2 -o "$out/profiles/kivi2.json" >/dev/null
bits=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["budget"]["achieved_bits"])' \
    "$out/profiles/kivi2.json")
"$bin" allocate --calib "$out/calib" --budget "$bits" -o "$out/profiles/triaxial.json"
"$bin" allocate --calib "$out/calib" --policy uniform-int2 -o "$out/profiles/uniform-int2.json" >/dev/null

echo "== 5. eval on held-out traces: KL, top-1, perplexity, tool-call match vs the 16-bit cache"
"$bin" eval --profile "$out/profiles/triaxial.json" "$out/profiles/kivi2.json" \
    "$out/profiles/uniform-int2.json" \
    --traces traces/test/webvoyager.jsonl traces/test/swe-agent.jsonl \
    --max-tokens 3072 --positions 32 --tool-calls 1 -o "$out/eval"
echo "see $out/calib/summary.md, $out/calib/heatmap.png, $out/eval/eval.md and $out/eval/pareto.png"
