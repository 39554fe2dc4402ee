"""Host time of one op call beyond torch's own call on the same slices: what validation, backend choice, the autograd
Function and the launches cost on the CPU side (target: at most 10 us per op call; DESIGN.md section 4).

Tiny tensors, so that the device finishes each call long before the host issues the next: the time per call of N
calls without a sync is then the host's alone. Compared in one run:
- gpu-*: this project's GPU path against the PyTorch reference of the op on the same slices (F.linear, F.gelu,
  F.layer_norm, scaled_dot_product_attention), forward under ``torch.no_grad()`` and forward + backward. GPU only.
- cpu-dispatch: the dispatch layer alone (``elastic_ops.X`` with the reference backend forced against
  ``elastic_ops.reference.X`` called directly), on any machine.

Run: python benchmarks/bench_host_overhead.py   (prints microseconds per call and the differences)
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

import elastic_ops
from elastic_ops import reference

CALLS = 200


def per_call_us(fn, sync, repeats: int = 5) -> float:
    """Fastest of ``repeats`` runs of CALLS calls without a sync, per call: the least disturbed by other work."""
    for _ in range(20):
        fn()
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, time.perf_counter() - start)
        sync()
    return 1e6 * best / CALLS


def sdpa_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim):
    """Torch's own attention on the same slices (as in bench_attention.py)."""
    batch, tokens, embed = x.shape
    width = num_heads * head_dim
    weight = qkv_weight.view(3, -1, qkv_weight.shape[1])[:, :width, :embed].reshape(3 * width, embed)
    bias = qkv_bias.view(3, -1)[:, :width].reshape(3 * width)
    q, k, v = F.linear(x, weight, bias).view(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(head_dim))
    return F.linear(context.transpose(1, 2).reshape(batch, tokens, width), proj_weight[:embed, :width],
                    proj_bias[:embed])


def cases(device):
    """(name, elastic call, torch's call on the same slices, arguments) of each op on tiny shapes."""
    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, device=device) * 0.1)

    x = torch.randn(2, 16, 32, device=device)
    w1, b1, w2, b2 = param(128, 48), param(128), param(48, 128), param(48)
    norm_w, norm_b = param(48), param(48)
    qkv_w, qkv_b, proj_w, proj_b = param(3 * 4 * 16, 48), param(3 * 4 * 16), param(48, 4 * 16), param(48)
    return [
        ("linear", lambda: elastic_ops.elastic_linear(x, w1, b1, 96), lambda: F.linear(x, w1[:96, :32], b1[:96])),
        ("linear+gelu", lambda: elastic_ops.elastic_linear(x, w1, b1, 96, "gelu"),
         lambda: F.gelu(F.linear(x, w1[:96, :32], b1[:96]))),
        ("layer_norm", lambda: elastic_ops.elastic_layer_norm(x, norm_w, norm_b),
         lambda: F.layer_norm(x, (32,), norm_w[:32], norm_b[:32])),
        ("mlp", lambda: elastic_ops.elastic_mlp(x, w1, b1, w2, b2, 96), lambda: reference.mlp(x, w1, b1, w2, b2, 96)),
        ("attention", lambda: elastic_ops.elastic_attention(x, qkv_w, qkv_b, proj_w, proj_b, 3, 16),
         lambda: sdpa_attention(x, qkv_w, qkv_b, proj_w, proj_b, 3, 16)),
    ], x


def measure_gpu() -> None:
    device = torch.device("cuda")
    ops, x = cases(device)
    print(f"host us per call on {torch.cuda.get_device_name()}, torch {torch.__version__}: elastic / torch on the "
          "same slices / difference (target <= 10)")
    for mode in ("forward", "forward_backward"):
        for name, elastic, plain in ops:
            def timed(call):
                if mode == "forward":
                    def run():
                        with torch.no_grad():
                            call()
                    return run
                x.requires_grad_(True)
                return lambda: call().sum().backward()
            ours = per_call_us(timed(elastic), torch.cuda.synchronize)
            theirs = per_call_us(timed(plain), torch.cuda.synchronize)
            x.requires_grad_(False)
            print(f"gpu-{mode:16s} {name:12s} {ours:7.1f} {theirs:7.1f} {ours - theirs:+7.1f}")


def measure_dispatch() -> None:
    """The dispatch layer alone, forward only: the same reference function called through elastic_ops and directly."""
    ops = {
        "linear": (elastic_ops.elastic_linear, reference.linear),
        "layer_norm": (elastic_ops.elastic_layer_norm, reference.layer_norm),
        "mlp": (elastic_ops.elastic_mlp, reference.mlp),
        "attention": (elastic_ops.elastic_attention, reference.attention),
    }
    x = torch.randn(2, 16, 32)
    args = {
        "linear": (x, torch.randn(96, 48), torch.randn(96), 96),
        "layer_norm": (x, torch.randn(48), torch.randn(48)),
        "mlp": (x, torch.randn(128, 48), torch.randn(128), torch.randn(48, 128), torch.randn(48), 96),
        "attention": (x, torch.randn(192, 48), torch.randn(192), torch.randn(48, 64), torch.randn(48), 3, 16),
    }
    torch.set_num_threads(1)  # tiny ops: more threads only add their wake-ups to the timing
    print(f"dispatch us per call (CPU, 1 thread, torch {torch.__version__}): through elastic_ops / reference called "
          "directly / difference")
    with torch.no_grad(), elastic_ops.use_backend("reference"):
        for name, (through, direct) in ops.items():
            ours = per_call_us(lambda: through(*args[name]), lambda: None)
            theirs = per_call_us(lambda: direct(*args[name]), lambda: None)
            print(f"cpu-dispatch {name:12s} {ours:7.1f} {theirs:7.1f} {ours - theirs:+7.1f}")


if __name__ == "__main__":
    if torch.cuda.is_available():
        measure_gpu()
    measure_dispatch()
