"""Host time of one op call beyond plain torch on the same slices: what validation, backend choice, views and the
launch cost on the CPU side (target: at most 10 us per op call; DESIGN.md section 4).

Tiny tensors and one thread, so that each call's compute is small and the time per call is mostly host work. Each op
is timed against plain torch on the same slices two ways: with the slices taken in the call (``F.linear(x, W[:o, :i],
b[:o])``, what a supernet written in plain torch runs) and with the slices taken beforehand (``F.linear`` alone). The
callables take turns within each repeat (interleaved) and each keeps its fastest repeat, the one least disturbed by
other work on a shared machine.

Paths:
- native: the CPU path (``elastic_ops.X`` on CPU float32 tensors under ``torch.no_grad()``, the native kernels).
- dispatch: the dispatch layer alone, ``elastic_ops.X`` with the reference backend forced against
  ``elastic_ops.reference.X`` called directly.
- gpu-path host: the GPU path's Python on CPU tensors, with no GPU: the Triton backend in the interpreter
  (``TRITON_INTERPRET=1``, set by this script when there is no CUDA device) with every Triton kernel launch replaced
  by a stub that does nothing. What is timed is the dispatch, the checks, the views, the allocations and the torch
  calls the GPU path makes (its cuBLAS GEMMs run as CPU GEMMs, as plain torch's do); what is not is the Triton
  launcher's own host time and the stubbed kernels' work, which plain torch does on the CPU (its LayerNorm, softmax).
  On the CPU the fp32 GELU GEMM takes the fused kernel's path (tensor descriptors), as fp16/bf16/TF32 do on a GPU.
- gpu-*: on a machine with CUDA, the real GPU path, forward and forward + backward.

Run: python benchmarks/bench_host_overhead.py   (prints microseconds per call and the differences)
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import elastic_ops  # imports no triton: the script sets TRITON_INTERPRET before anything does
from elastic_ops import functional

CALLS = 25
REPEATS = 300


def interleaved_us(calls: dict[str, Callable[[], object]], sync: Callable[[], None] = lambda: None,
                   repeats: int = REPEATS) -> dict[str, float]:
    """Per-call microseconds of each callable: CALLS calls without a sync per repeat, the callables taking turns in
    every repeat, the fastest repeat of each kept."""
    for fn in calls.values():
        for _ in range(20):
            fn()
    best = dict.fromkeys(calls, math.inf)
    for _ in range(repeats):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e6 * seconds / CALLS for name, seconds in best.items()}


def sdpa_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim):
    """Torch's own attention on the same slices (as in bench_attention.py)."""
    batch, tokens, embed = x.shape
    width = num_heads * head_dim
    weight = qkv_weight.view(3, -1, qkv_weight.shape[1])[:, :width, :embed].reshape(3 * width, embed)
    bias = qkv_bias.view(3, -1)[:, :width].reshape(3 * width)
    return attention_on_slices(x, weight, bias, proj_weight[:embed, :width], proj_bias[:embed], num_heads, head_dim)


def attention_on_slices(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim):
    batch, tokens, _ = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).view(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(head_dim))
    return F.linear(context.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim), proj_weight, proj_bias)


def cases(device) -> list[tuple[str, Callable, Callable, Callable]]:
    """(name, elastic call, torch's call slicing in the call, torch's call on slices taken before) on tiny shapes:
    x [2, 16, 32] against super weights of width 48 and hidden 128 (active 96), 3 of 4 heads of 16."""
    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, device=device) * 0.1)

    x = torch.randn(2, 16, 32, device=device)
    w1, b1, w2, b2 = param(128, 48), param(128), param(48, 128), param(48)
    norm_w, norm_b = param(48), param(48)
    qkv_w, qkv_b, proj_w, proj_b = param(3 * 4 * 16, 48), param(3 * 4 * 16), param(48, 4 * 16), param(48)
    w1s, b1s, w2s, b2s = w1[:96, :32], b1[:96], w2[:32, :96], b2[:32]
    norm_ws, norm_bs = norm_w[:32], norm_b[:32]
    qkv_ws = qkv_w.view(3, -1, 48)[:, :48, :32].reshape(3 * 48, 32)
    qkv_bs = qkv_b.view(3, -1)[:, :48].reshape(3 * 48)
    proj_ws, proj_bs = proj_w[:32, :48], proj_b[:32]
    return [
        ("linear", lambda: elastic_ops.elastic_linear(x, w1, b1, 96), lambda: F.linear(x, w1[:96, :32], b1[:96]),
         lambda: F.linear(x, w1s, b1s)),
        ("linear+gelu", lambda: elastic_ops.elastic_linear(x, w1, b1, 96, "gelu"),
         lambda: F.gelu(F.linear(x, w1[:96, :32], b1[:96])), lambda: F.gelu(F.linear(x, w1s, b1s))),
        ("layer_norm", lambda: elastic_ops.elastic_layer_norm(x, norm_w, norm_b),
         lambda: F.layer_norm(x, (32,), norm_w[:32], norm_b[:32]), lambda: F.layer_norm(x, (32,), norm_ws, norm_bs)),
        ("mlp", lambda: elastic_ops.elastic_mlp(x, w1, b1, w2, b2, 96),
         lambda: F.linear(F.gelu(F.linear(x, w1[:96, :32], b1[:96])), w2[:32, :96], b2[:32]),
         lambda: F.linear(F.gelu(F.linear(x, w1s, b1s)), w2s, b2s)),
        ("attention", lambda: elastic_ops.elastic_attention(x, qkv_w, qkv_b, proj_w, proj_b, 3, 16),
         lambda: sdpa_attention(x, qkv_w, qkv_b, proj_w, proj_b, 3, 16),
         lambda: attention_on_slices(x, qkv_ws, qkv_bs, proj_ws, proj_bs, 3, 16)),
    ]


def stub_triton_launches() -> None:
    """Replace every Triton kernel of the GPU path by a launch that does nothing (benchmark only)."""
    from elastic_ops.ops import attention, grouped, layernorm, linear

    def launch(*args, **kwargs):
        return None

    class Stub:
        def __getitem__(self, grid):
            return launch

    for module in (attention, grouped, layernorm, linear):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                setattr(module, name, Stub())


def measure_cpu(path: str, backend: str) -> None:
    torch.set_num_threads(1)  # tiny ops: more threads only add their wake-ups to the timing
    # A stubbed kernel leaves its output uninitialised, and CPU GEMMs on denormal garbage run many times slower.
    torch.set_flush_denormal(True)
    print(f"\n{path}: us per call (CPU, 1 thread, torch {torch.__version__}); elastic | torch, slices in the call | "
          "torch, slices taken before | elastic minus each (target <= 10)")
    with torch.no_grad(), elastic_ops.use_backend(backend):
        for name, elastic, plain, presliced in cases(torch.device("cpu")):
            functional._plans.clear()
            elastic()
            ran = {getattr(plan, "__module__", "?") for plan in functional._plans.values()}
            t = interleaved_us({"elastic": elastic, "plain": plain, "presliced": presliced})
            print(f"{path:14s} {name:12s} {t['elastic']:7.1f} | {t['plain']:7.1f} | {t['presliced']:7.1f} | "
                  f"{t['elastic'] - t['plain']:+7.1f} {t['elastic'] - t['presliced']:+7.1f}   ({', '.join(ran)})")


def measure_gpu() -> None:
    device = torch.device("cuda")
    ops = cases(device)
    print(f"host us per call on {torch.cuda.get_device_name()}, torch {torch.__version__}: elastic | torch, slices "
          "in the call | torch, slices taken before | elastic minus each (target <= 10)")
    for mode in ("forward", "forward_backward"):
        for name, *calls in ops:
            def timed(call):
                if mode == "forward":
                    def run():
                        with torch.no_grad():
                            call()
                    return run
                return lambda: call().sum().backward()
            t = interleaved_us(dict(zip(("elastic", "plain", "presliced"), map(timed, calls))),
                               torch.cuda.synchronize, repeats=10)
            print(f"gpu-{mode:16s} {name:12s} {t['elastic']:7.1f} | {t['plain']:7.1f} | {t['presliced']:7.1f} | "
                  f"{t['elastic'] - t['plain']:+7.1f} {t['elastic'] - t['presliced']:+7.1f}")


def measure_dispatch() -> None:
    """The dispatch layer alone: the reference backend forced, against the same reference function called directly."""
    from elastic_ops import reference

    torch.set_num_threads(1)
    x = torch.randn(2, 16, 32)
    calls = {
        "linear": (elastic_ops.elastic_linear, reference.linear, (x, torch.randn(96, 48), torch.randn(96), 96)),
        "layer_norm": (elastic_ops.elastic_layer_norm, reference.layer_norm, (x, torch.randn(48), torch.randn(48))),
        "mlp": (elastic_ops.elastic_mlp, reference.mlp,
                (x, torch.randn(128, 48), torch.randn(128), torch.randn(48, 128), torch.randn(48), 96)),
        "attention": (elastic_ops.elastic_attention, reference.attention,
                      (x, torch.randn(192, 48), torch.randn(192), torch.randn(48, 64), torch.randn(48), 3, 16)),
    }
    print(f"\ndispatch: us per call (CPU, 1 thread, torch {torch.__version__}); elastic_ops.X with the reference "
          "forced | elastic_ops.reference.X called directly | difference")
    with torch.no_grad(), elastic_ops.use_backend("reference"):
        for name, (through, direct, args) in calls.items():
            t = interleaved_us({"through": lambda: through(*args), "direct": lambda: direct(*args)})
            print(f"{'dispatch':14s} {name:12s} {t['through']:7.1f} | {t['direct']:7.1f} | "
                  f"{t['through'] - t['direct']:+7.1f}")


if __name__ == "__main__":
    if torch.cuda.is_available():
        measure_gpu()
    else:  # before triton is first imported: the GPU path's Python runs in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    measure_cpu("native", "native")
    if not torch.cuda.is_available():
        measure_dispatch()
        if importlib.util.find_spec("triton") is not None:
            stub_triton_launches()
            measure_cpu("gpu-path host", "triton")
