#!/usr/bin/env bash
# Everything a session with a lent GPU should run, most important first, each step under its own time limit:
# the compiled tests of every kernel, the kernel benchmarks (bf16, kernel and host time apart), the host overhead,
# the training step, batched evaluation, then the torch.compile baselines (their compiles take the longest).
# Logs and pytest-benchmark JSON go to $OUT (default ./gpu-results); print them with benchmarks/summarize.py.
#
# Run from the repository root: bash benchmarks/gpu_check.sh [steps...]
#   steps: env tests kernels host train batched compiled train-compiled   (all of them, in that order, by default)
# BENCH_SHAPES=S limits the kernel suites to one supernet shape (S by default here; T,S,B in the suites),
# BENCH_OPS="linear mlp" to some ops. GPU_CHECK_SECONDS (default 480) bounds the whole run: a step gets at most what
# is left, and is interrupted (SIGINT: pytest still reports). Each test failure is written to tests-failures.log as
# it happens. Nothing is autotuned: every kernel has fixed tiles, so a step's time is compile time plus its runs.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export BENCH_SHAPES=${BENCH_SHAPES:-S}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
python=${PYTHON:-python3}
steps=${*:-env tests kernels host train batched compiled train-compiled}
# pytest-xdist compiles the kernels of many tests at once; pytest-timeout stops a hung test.
parallel=$($python -c "import xdist" 2>/dev/null && echo "-n 16")
per_test=$($python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
suites=$(for op in ${BENCH_OPS:-linear layernorm mlp attention}; do echo "benchmarks/bench_$op.py"; done)

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

benchmarks() {  # benchmarks NAME SECONDS SELECTION: the kernel suites' cases matching SELECTION, summarised
    local name=$1 limit=$2 selection=$3
    step "$name" "$limit" $python -m pytest $suites -k "$selection" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$out/$name.json" $per_test
    [ -f "$out/$name.json" ] && $python benchmarks/summarize.py "$out/$name.json" | tee "$out/$name.txt"
}

for name in $steps; do
    case $name in
    env)
        { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
          $python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        } > "$out/env.log" 2>&1; cat "$out/env.log" ;;
    tests)
        STREAM_FAILURES="$out/tests-failures.log" \
        step tests 150 $python -m pytest -p pytest_stream_failures tests/kernels tests/test_backend.py tests/test_nn.py tests/test_reference.py \
            --ignore tests/kernels/test_native.py --ignore tests/kernels/test_offline_sm90.py -q -rfE --tb=short \
            -p no:cacheprovider -p no:benchmark $parallel $per_test ;;
    kernels)
        benchmarks kernels 120 "bf16 and not compiled" ;;
    host)
        step host 30 $python benchmarks/bench_host_overhead.py ;;
    train)
        step train 60 $python benchmarks/bench_train_step.py gpu elastic autoformer ;;
    batched)
        step batched 90 $python benchmarks/bench_batched_eval.py gpu ;;
    compiled)
        benchmarks compiled 150 "bf16 and compiled" ;;
    train-compiled)
        step train-compiled 150 $python benchmarks/bench_train_step.py gpu elastic autoformer-compiled ;;
    *)
        echo "unknown step '$name' (steps: env tests kernels host train batched compiled train-compiled)"; exit 2 ;;
    esac
done
