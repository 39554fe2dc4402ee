"""Fixtures shared by the GPU benchmarks."""
from __future__ import annotations

import time

import pytest
import torch

HOST_CALLS = 20  # calls issued back to back for the host time: few enough that the launch queue never fills


def kernel_time_ms(fn) -> tuple[float, str]:
    """(median GPU time of one call in ms, how it was measured): CUDA-graph replays, which leave out every host cost,
    or ``triton.testing.do_bench`` where ``fn`` cannot be captured (its time then includes any GPU idle time that
    the host causes inside one call)."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"), "cuda-graph"
    except Exception:  # capture fails on host syncs and on some compiled or autograd paths; measure without it
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"), "do_bench"


def host_time_us(fn) -> float:
    """Host time of one call in us: HOST_CALLS calls issued without a sync in between, divided by their number. While
    the GPU keeps up, this is the Python, dispatch and launch cost alone."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / HOST_CALLS


@pytest.fixture
def cuda_benchmark(benchmark):
    """``measure(fn, flops=None, bytes_moved=None)``: median synchronised wall time of ``fn`` (after warm-up, the
    pytest-benchmark statistic), and in ``benchmark.extra_info`` the kernel time (``kernel_ms``, ``kernel_method``),
    the host time per call (``host_us``), TFLOP/s and GB/s of the kernel time, and the peak memory ``fn`` allocates on
    top of what was live before."""
    def measure(fn, flops: float | None = None, bytes_moved: float | None = None):
        fn()  # compile outside the timing and the memory peak
        torch.cuda.synchronize()
        live = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        info = benchmark.extra_info
        info["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - live) / 2**20

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
        info["device"] = torch.cuda.get_device_name()
        if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
            return
        info["host_us"] = host_time_us(fn)
        info["kernel_ms"], info["kernel_method"] = kernel_time_ms(fn)
        if flops is not None:
            info["tflops"] = flops / info["kernel_ms"] / 1e9
        if bytes_moved is not None:
            info["gb_per_s"] = bytes_moved / info["kernel_ms"] / 1e6

    return measure
