#!/usr/bin/env bash
# The device call a GPU session makes, sized to the lease: 15 minutes of device time per task, the
# machine's start (a minute or two) included, so one full call and room for a shorter rerun.
#
#   device run: command "bash bench/gpu_session.sh",      timeout_s 600   (~9 minutes)
#   then, if time is left: "bash bench/gpu_session.sh tune", timeout_s 360
#
# Parts, most needed first, each under its own limit so a hang in one cannot eat the others:
#   1. the GPU-only tests (compiled bf16 experts, graph replay = eager decode for bf16 and int8,
#      static-cache generate reusing its graph): limit 150 s (their time is a guess: never run);
#   2. bench/gpu.py within what is left of TOTAL (less 90 s for part 3): ceilings, batch-1 decode,
#      transformers side by side, prefill 4096, batch 8/32/64; it skips what would not fit;
#   3. the rest of tests/test_kernels.py, compiled on the GPU, in whatever time remains.
# Everything lands in $OUT (logs, gpu_bench.json with each stage's seconds): the call's reply
# carries the table at the end of bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
# No C++ CPU kernels there: nothing timed runs on the CPU, and their first-use build (~30 s) would
# be device time spent on a CPU-side test model.
export PYTHONPATH=src PYTHONUNBUFFERED=1 MIXTRAL_CPU_KERNELS=0
OUT=${OUT:-/tmp/mixtral-gpu}
mkdir -p "$OUT"
TOTAL=${TOTAL:-540}  # seconds for all parts; give the call ~60 s more as its timeout_s

{ nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } \
    >"$OUT/env.txt" 2>&1

if [[ "${1:-main}" == "tune" ]]; then
    python3 bench/gpu.py --tune-only --tune-budget $((TOTAL / 2 + 30)) --json "$OUT/gpu_tune.json" 2>&1 | tee "$OUT/tune.log"
    exit
fi

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "(gpu or graph_decode) and not gpu_bench" 2>&1 \
    | tee "$OUT/tests_gpu.log" | tail -15

python3 bench/gpu.py --budget $((TOTAL - SECONDS - 90)) --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log"

left=$((TOTAL - SECONDS))
if ((left > 30)); then
    timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py >"$OUT/tests_all.log" 2>&1
    tail -3 "$OUT/tests_all.log"
fi
