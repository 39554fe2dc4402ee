"""Fixtures shared by the GPU benchmarks."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def cuda_benchmark(benchmark):
    """``measure(fn, flops=None, bytes_moved=None)``: median GPU time of ``fn`` (synchronised, after warm-up); its
    TFLOP/s, GB/s and the peak memory it allocates on top of what was live before go in ``benchmark.extra_info``."""
    def measure(fn, flops: float | None = None, bytes_moved: float | None = None):
        fn()  # compile / autotune outside the timing and the memory peak
        torch.cuda.synchronize()
        live = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - live) / 2**20

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
        if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
            return
        median = benchmark.stats.stats.median
        if flops is not None:
            benchmark.extra_info["tflops"] = flops / median / 1e12
        if bytes_moved is not None:
            benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9

    return measure
