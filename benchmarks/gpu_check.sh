#!/usr/bin/env bash
# Everything a session with a lent GPU should run, most important first, each step under its own time limit:
# the compiled Triton tests, batched evaluation, the kernel suites (bf16), the training step.
# Logs and pytest-benchmark JSON go to $OUT (default ./gpu-results); print them with benchmarks/summarize.py.
#
# Run from the repository root: bash benchmarks/gpu_check.sh [steps...]   (steps: env tests batched kernels train)
# BENCH_SHAPES=S limits the kernel suites to one supernet shape (T,S,B by default), BENCH_OPS="linear mlp" to
# some ops; GPU_CHECK_SECONDS (default 560)
# bounds the whole run: a step gets at most what is left, and is interrupted (SIGINT: pytest still reports).
# The tests and batched evaluation compile one tile config per kernel (ELASTIC_OPS_AUTOTUNE=0): compiling and
# timing all eight for every shape takes longer than a lent session has. Each test failure is written to
# tests-failures.log as it happens.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-560}))
python=${PYTHON:-python3}
steps=${*:-env tests batched kernels train}
# pytest-xdist compiles the kernels of many tests at once; pytest-timeout stops a hung test.
parallel=$($python -c "import xdist" 2>/dev/null && echo "-n 16")
per_test=$($python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")

step() {  # step NAME SECONDS COMMAND...: run COMMAND, its output into $out/NAME.log and the console
    local name=$1 limit=$2; shift 2
    (( limit > deadline - SECONDS )) && limit=$((deadline - SECONDS))
    (( limit < 10 )) && { echo "=== $name: skipped, no time left"; return; }
    echo "=== $name (limit ${limit} s) $(date -u +%T)"
    timeout -s INT -k 15 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "=== $name: exit $rc $(date -u +%T)"
}

for name in $steps; do
    case $name in
    env)
        { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
          $python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        } > "$out/env.log" 2>&1; cat "$out/env.log" ;;
    tests)
        STREAM_FAILURES="$out/tests-failures.log" ELASTIC_OPS_AUTOTUNE=0 \
        step tests 170 $python -m pytest -p pytest_stream_failures tests/kernels tests/test_backend.py tests/test_nn.py tests/test_reference.py \
            --ignore tests/kernels/test_native.py -q -rfE --tb=short -p no:cacheprovider -p no:benchmark $parallel $per_test ;;
    batched)  # one tile config on both sides: autotuning every subnet's shapes outlasted a 150 s step
        ELASTIC_OPS_AUTOTUNE=0 step batched 150 $python benchmarks/bench_batched_eval.py gpu ;;
    kernels)
        suites=$(for op in ${BENCH_OPS:-linear layernorm mlp attention}; do echo "benchmarks/bench_$op.py"; done)
        step kernels 170 $python -m pytest $suites -k bf16 --benchmark-only -q -p no:cacheprovider \
            --benchmark-json "$out/kernels.json" $per_test
        [ -f "$out/kernels.json" ] && $python benchmarks/summarize.py "$out/kernels.json" ;;
    train)
        step train 70 $python benchmarks/bench_train_step.py gpu ;;
    *)
        echo "unknown step '$name' (steps: env tests batched kernels train)"; exit 2 ;;
    esac
done
