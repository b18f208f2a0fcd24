#!/usr/bin/env bash
# One-shot GPU run: bench.py's ten cases, then the planner-regret corpora (seed 0 and the held-out
# seed 1) in float32 and bfloat16, written to benchmarks/RESULTS-gpu.md; ~5 minutes in all.
#
# Assumes (installs nothing by default; the GPU machine may have no network):
#   * the project's own dependencies (jax, flax, einops; `pip install -e ".[test]"`), and
#   * a CUDA jaxlib already present (`pip install "jax[cuda12]"`), so jax.default_backend() is gpu.
# GPU_INSTALL=1 runs `pip install -e ".[test]"` first (the project's extras, nothing else).
#
# Usage:
#   bash benchmarks/gpu.sh            # on a CUDA machine: writes benchmarks/RESULTS-gpu.md and
#                                     # the GPU's fitted profile, benchmarks/profile-gpu.json
#   bash benchmarks/gpu.sh --tiny     # anywhere (CPU), ~1-2 minutes: checks the script runs;
#                                     # writes $TINY_OUT (default /tmp/RESULTS-gpu-tiny.md) only
# Time shares (seconds, wall) may be changed: BENCH_TIMEOUT (default 120), REGRET_BUDGET (per
# corpus and dtype, default 30; the layer in progress finishes, so add ~5-10 s each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1

if [[ "${GPU_INSTALL:-0}" == 1 ]]; then
    "$PY" -m pip install -e ".[test]"
fi

if [[ $TINY == 1 ]]; then
    OUT=${TINY_OUT:-/tmp/RESULTS-gpu-tiny.md}
    PROFILE=${TINY_PROFILE:-/tmp/profile-gpu-tiny.json}
    BENCH_ARGS=(--cases tiny --rounds 2 --compile-rounds 1)
    REGRET_ARGS=(--tiny --n 2 --kinds "mix first axis" "summed axis")
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
else
    OUT=benchmarks/RESULTS-gpu.md
    PROFILE=benchmarks/profile-gpu.json
    # 5 timing rounds and 1 compile round: compiles dominate a GPU run's wall time
    BENCH_ARGS=(--quick)
    REGRET_ARGS=(--rounds 5 --compile-rounds 1 --min-time 0.01 --budget "${REGRET_BUDGET:-30}")
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
    "$PY" -c 'import jax, sys; b = jax.default_backend(); print("backend:", b, jax.devices())
sys.exit(0 if b == "gpu" else "no GPU backend: install a CUDA jaxlib (jax[cuda12])")'
fi
rm -f "$OUT"
START=$SECONDS

# bench.py writes its generated section; regret.py one section per seed and dtype (tagged markers)
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/bench.py "${BENCH_ARGS[@]}" --out "$OUT" ||
    echo "bench.py did not finish (rc $?): its section is missing from $OUT"
TIMES=$(mktemp --suffix .json)
for dtype in float32 bfloat16; do
    for seed in 0 1; do
        # seed 0 in float32 also keeps every candidate's times: the profile is fitted on them
        json=()
        [[ $seed == 0 && $dtype == float32 ]] && json=(--json "$TIMES")
        "$PY" benchmarks/regret.py "${REGRET_ARGS[@]}" --seed "$seed" --dtype "$dtype" \
            --out "$OUT" "${json[@]}" || echo "regret.py --seed $seed --dtype $dtype failed (rc $?)"
    done
done
# the GPU's own profile, fitted on seed 0 and checked on nothing else (load it with
# einmix_jax.planning.load_profile to plan with it)
"$PY" benchmarks/calibrate.py "$TIMES" --out "$PROFILE" --name "GPU, regret corpus seed 0" \
    >> "$OUT" || echo "calibrate.py failed (rc $?): no profile written"
rm -f "$TIMES"
echo "wrote $OUT and $PROFILE in $((SECONDS - START)) s"
