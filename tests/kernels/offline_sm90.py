"""Compile every Triton kernel of the GPU path for an H100 (sm_90) on a machine without a GPU, at the signatures
the ops really launch, and report what each became (DESIGN.md section 4).

Run as a script in a process where ``TRITON_INTERPRET`` is unset or 0: ``python tests/kernels/offline_sm90.py``
prints one JSON object per compiled kernel. The ops run on CPU tensors of AutoFormer-S shapes (bf16 and fp16)
with a stand-in CUDA driver that reports capability 9.0 and never launches: each launch goes through the JIT's own
binder (so stride-1 arguments become constants and 16-divisible integers and pointers are marked so, exactly as on
the device), is compiled, and is recorded. Outputs of the kernels are never written; the torch parts of the ops
(cuBLAS on a GPU) still run on the CPU, on those unwritten buffers, which only the compile cares nothing about.

``--unspecialized`` compiles one GEMM kernel again with every integer and pointer argument left unspecialised, the
mistake a hand-written offline compile makes: the test checks that the report tells the two apart.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default; set, so that 3.9 does not warn about it

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90_SHARED_MEMORY = 232448  # bytes a block may use on an H100 (227 KiB)
SM90_PROCESSORS = 132


class OfflineDriver:
    """The few calls the JIT makes of its driver before a launch, answered for an H100 that is not there."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes of the PTX, from the ptxas that triton uses for sm_90."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as source:
        source.write(ptx)
    try:
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", source.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(source.name)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    return {"spill_bytes": sum(spills), "registers": max(registers, default=0)}


def describe(name: str, compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {
        "kernel": name,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "shared_bytes": compiled.metadata.shared,
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "tma_loads": len(re.findall(r"\bcp\.async\.bulk\.tensor\.\w+\.shared::\w+\.global", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)),
        "scalar_16bit_global_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.[bu]16\b", ptx)),
        "vector_global_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v[248]\.", ptx)),
        **ptxas_report(ptx),
    }


def record_launches(reports: list, seen: set):
    """Make every kernel launch compile for sm_90 and report, instead of running."""
    compile_and_keep = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        compiled = compile_and_keep(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, compiled.hash)
        if key not in seen:
            seen.add(key)
            reports.append(describe(self.fn.__name__, compiled))
        return compiled

    JITFunction.run = run


def run_ops(dtype: torch.dtype) -> None:
    """Forward and backward of every op, and the grouped ops, at AutoFormer-S shapes (16 images: the token count
    stays a multiple of 16, as with the benchmarks' 128)."""
    import elastic_ops
    from elastic_ops import GroupSizes
    from elastic_ops.ops import attention, grouped, layernorm, linear, mlp

    batch, tokens, embed, super_embed, hidden, super_hidden, heads, super_heads, head_dim = 16, 197, 384, 448, 1344, \
        1792, 6, 7, 64

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, dtype=dtype) * 0.02)

    def backward(y):  # a gradient as a loss gives it: contiguous, one value per element
        y.backward(torch.randn_like(y))

    x = torch.randn(batch, tokens, embed, dtype=dtype, requires_grad=True)
    fc1_w, fc1_b = param(super_hidden, super_embed), param(super_hidden)
    fc2_w, fc2_b = param(super_embed, super_hidden), param(super_embed)
    backward(linear.elastic_linear(x, fc1_w, fc1_b, hidden, "gelu"))
    with torch.no_grad():
        linear.elastic_linear(x, fc1_w, fc1_b, hidden, "gelu")
    backward(mlp.elastic_mlp(x, fc1_w, fc1_b, fc2_w, fc2_b, hidden))
    norm_w, norm_b = param(super_embed), param(super_embed)
    backward(layernorm.elastic_layer_norm(x, norm_w, norm_b))
    with torch.no_grad():
        layernorm.elastic_layer_norm(x, norm_w, norm_b)
    qkv_w, qkv_b = param(3 * super_heads * head_dim, super_embed), param(3 * super_heads * head_dim)
    proj_w, proj_b = param(super_embed, super_heads * head_dim), param(super_embed)
    backward(attention.elastic_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, head_dim))

    with torch.no_grad():  # batched evaluation: 4 subnets of different widths in one launch per op
        sizes = GroupSizes([384, 320, 448, 384], "cpu")
        hidden_sizes = GroupSizes([1344, 960, 1792, 1152], "cpu")
        head_counts = GroupSizes([6, 5, 7, 6], "cpu")
        stacked = torch.zeros(4, 4, tokens, super_embed, dtype=dtype)
        grouped.grouped_layer_norm(stacked, sizes, norm_w, norm_b)
        grouped.grouped_mlp(stacked, sizes, fc1_w, fc1_b, fc2_w, fc2_b, hidden_sizes)
        grouped.grouped_attention(stacked, sizes, qkv_w, qkv_b, proj_w, proj_b, head_counts, head_dim)
    assert elastic_ops  # the package is imported first, as users do


def unspecialized_gemm(reports: list) -> None:
    """The grouped GEMM compiled with no integer or pointer specialisation, as a careless offline compile would."""
    from elastic_ops import GroupSizes
    from elastic_ops.ops import grouped

    kernel = grouped._grouped_linear_kernel
    runtime_args = [param.name for param in kernel.params if not param.is_constexpr]
    grouped._grouped_linear_kernel = JITFunction(kernel.fn, do_not_specialize=runtime_args,
                                                 do_not_specialize_on_alignment=runtime_args)
    try:
        with torch.no_grad():
            sizes = GroupSizes([384, 320], "cpu")
            grouped.grouped_linear(torch.zeros(2, 4, 197, 448, dtype=torch.bfloat16),
                                   torch.zeros(448, 448, dtype=torch.bfloat16), None, sizes)
    finally:
        grouped._grouped_linear_kernel = kernel
    for report in reports:
        report["kernel"] += " (unspecialized)"


def main() -> None:
    from elastic_ops.ops import _common

    driver.set_active(OfflineDriver())
    # The ops ask the device for its processors and for tensor-descriptor support: answer as an H100 would.
    _common.sm_count = lambda device: SM90_PROCESSORS
    _common.descriptors_supported = lambda device: True
    for module in ("linear", "layernorm"):  # the modules that imported the helpers by name
        ops_module = sys.modules.get(f"elastic_ops.ops.{module}") or __import__(f"elastic_ops.ops.{module}",
                                                                                fromlist=["_"])
        for helper in ("sm_count", "descriptors_supported"):
            if hasattr(ops_module, helper):
                setattr(ops_module, helper, getattr(_common, helper))
    reports: list[dict] = []
    record_launches(reports, set())
    torch.manual_seed(0)
    if "--unspecialized" in sys.argv:
        unspecialized_gemm(reports)
    else:
        for dtype in (torch.bfloat16, torch.float16):
            run_ops(dtype)
    for report in reports:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
