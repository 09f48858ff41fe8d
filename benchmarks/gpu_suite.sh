#!/usr/bin/env bash
# The GPU suite: GPU tests, all tests on CUDA, the full benchmark sweep at realistic sizes (bf16),
# the model-level benchmark and the static compile report, in under 10 minutes on one H100; then
# MQAR on the Zoology grid (`python -m benchmarks.quality --plan zoology --device cuda`, estimated
# 7-8 minutes; QUALITY=0 skips it).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      # default OUT_DIR: benchmarks/results/<card>_<date>
#
# Needs only a Python with torch and triton (nothing is installed or downloaded): the repository is
# put on PYTHONPATH. pytest is used when importable (tests are skipped with a note otherwise);
# flash-linear-attention is benchmarked when importable, or when a wheel lies in FLA_WHEEL_DIR
# (default: <repo>/wheels), which is unpacked into OUT_DIR/.fla (no pip). Each phase has a time cap
# (seconds, env: TESTS_GPU_S, TESTS_S, SWEEP_S, SWEEP_LARGE_S, MODEL_S, COMPILE_S; 560 s in all, and QUALITY_S 480
# for the Zoology grid); an interrupted sweep still writes the rows it measured, an interrupted grid
# resumes from OUT_DIR/quality_zoology/runs.jsonl when the script is run again on the same OUT_DIR. Everything lands in OUT_DIR: logs, junit XML, results.csv/json, plots.
# DRY=1 runs the same phases on the CPU at tiny sizes (checks the script itself; no GPU numbers).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
    SIZES=(--device cpu --dtype float32 --batch 1 --heads 2 --head-dim 16 --seq-lens 64,128 --budget-s 0 --min-reps 1)
    SIZES_LARGE=("${SIZES[@]}")
    MODEL_ARGS=(--device cpu --quick)
    QUALITY_ARGS=(--plan zoology-toy --device cpu)
    CARD=dry_run_cpu
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu_suite] no CUDA device visible to $PY: this script is for a GPU machine (DRY=1 checks it on a CPU)" >&2
    exit 2
else
    SIZES=(--dtype bfloat16 --batch 4 --heads 16 --head-dim 64 --seq-lens 1024,2048,4096,8192,16384)
    SIZES_LARGE=(--dtype bfloat16 --batch 8 --heads 32 --head-dim 128 --seq-lens 1024,4096,16384)
    MODEL_ARGS=()
    QUALITY_ARGS=(--plan zoology --device cuda)
    CARD=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name()).strip('_'))")
fi
OUT=${1:-"$REPO/benchmarks/results/${CARD}_$(date -u +%Y-%m-%d)"}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_suite.log"
: > "$LOG"
say() { echo "[gpu_suite] $*" | tee -a "$LOG"; }
START=$SECONDS
status=0

say "card $CARD -> $OUT"
{
    "$PY" -c "import torch, triton, platform; print('python', platform.python_version(), '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    command -v nvidia-smi >/dev/null && nvidia-smi
} > "$OUT/environment.txt" 2>&1
head -1 "$OUT/environment.txt" | tee -a "$LOG"

# optional flash-linear-attention from a local wheel (unpacked, never pip-installed)
FLA_WHEEL_DIR=${FLA_WHEEL_DIR:-"$REPO/wheels"}
if ! "$PY" -c "import fla" >/dev/null 2>&1; then
    WHEEL=$(ls "$FLA_WHEEL_DIR"/flash_linear_attention-*.whl "$FLA_WHEEL_DIR"/fla-*.whl 2>/dev/null | head -1)
    if [ -n "$WHEEL" ]; then
        "$PY" -m zipfile -e "$WHEEL" "$OUT/.fla" && export PYTHONPATH="$PYTHONPATH:$OUT/.fla"
        say "flash-linear-attention from $WHEEL"
    else
        say "flash-linear-attention not installed (no wheel in $FLA_WHEEL_DIR): provider 'fla' skipped"
    fi
fi

run_phase() {  # name, cap_seconds, command...
    local name=$1 cap=$2; shift 2
    local t0=$SECONDS
    say "$name: $* (cap ${cap}s)"
    timeout -s INT -k 20 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -3 "$OUT/$name.log" | sed "s/^/    /" | tee -a "$LOG"
    say "$name: exit $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}

# 1. tests: the GPU-marked ones first, then the rest, all on CUDA (the interpreter is not used)
if [ "$DRY" = 1 ]; then
    say "DRY=1: tests skipped (run scripts/test.sh on the CPU)"
elif "$PY" -c "import pytest" >/dev/null 2>&1; then
    XDIST=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo "-n 4" || echo "")
    run_phase tests_gpu "${TESTS_GPU_S:-80}" "$PY" -m pytest tests -m gpu -q -rs --junitxml="$OUT/tests_gpu.xml"
    run_phase tests_all "${TESTS_S:-140}" "$PY" -m pytest tests -m "not gpu" -q $XDIST --junitxml="$OUT/tests_all.xml"
else
    say "pytest is not importable: tests skipped (the benchmarks below still check numerics)"
fi

# 2. the sweep: every op, provider and mode, T = 1K..16K, bf16
run_phase bench "${SWEEP_S:-150}" "$PY" -m benchmarks --out "$OUT/bench" "${SIZES[@]}"
run_phase bench_large "${SWEEP_LARGE_S:-80}" "$PY" -m benchmarks --out "$OUT/bench_large" "${SIZES_LARGE[@]}" \
    --ops linear_attention,linear_attention_noncausal,cms_scan_mix,titans_scan,titans_scan_dgd,titans_scan_p16,titans_scan_p64,titans_scan_blocks,titans_selfmod_scan,hope_selfmod_layer,hope_level_layer,cms_step,ema_update_ --modes fwd,fwd+bwd

# 3. the model: training / generation tokens/s, latency per token vs prefix
run_phase model "${MODEL_S:-50}" "$PY" -m benchmarks.model --out "$OUT/model" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"}

# 4. static compile report (registers, spills, shared memory, tensor-core instructions)
if [ -f "$REPO/tools/compile_report.py" ]; then
    # default configs for both archs (every config of every kernel is ~100 compiles: minutes)
    run_phase compile_report "${COMPILE_S:-60}" "$PY" -m tools.compile_report --arch 80 --arch 90 \
        --configs default --csv "$OUT/compile_report.csv"
fi

# 5. quality: MQAR on the Zoology grid, every variant, the best of four learning rates per cell
if [ "${QUALITY:-1}" != 0 ]; then
    run_phase quality_zoology "${QUALITY_S:-480}" "$PY" -m benchmarks.quality "${QUALITY_ARGS[@]}" --out "$OUT/quality_zoology"
else
    say "QUALITY=0: the Zoology MQAR grid skipped"
fi

say "done in $((SECONDS - START)) s (status $status). Results: $OUT"
say "to keep them: put them under benchmarks/results/${CARD}_<date>/ and commit (see benchmarks/README.md)"
exit $status
