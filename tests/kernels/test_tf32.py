"""README: on a GPU, fp32 inputs are multiplied in IEEE fp32 unless torch's own matmuls may use TF32. What decides it
is checked here with no GPU: ``dot_precision`` follows torch's flag (set directly or through
``torch.set_float32_matmul_precision``), and every ``tl.dot`` of every kernel takes its precision from the launch's
``DOT_PRECISION``, which every launch computes with ``dot_precision`` (the GEMMs on cuBLAS follow the flag themselves).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from elastic_ops.ops._common import dot_precision

OPS = Path(__file__).parents[2] / "elastic_ops" / "ops"


@pytest.fixture
def restore_matmul_precision():
    allowed, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.set_float32_matmul_precision(precision)


def test_fp32_products_use_tf32_only_where_torch_allows_it(restore_matmul_precision):
    fp32 = torch.zeros(2, 2)
    torch.set_float32_matmul_precision("highest")
    assert not torch.backends.cuda.matmul.allow_tf32 and dot_precision(fp32) == "ieee"
    torch.set_float32_matmul_precision("high")
    assert torch.backends.cuda.matmul.allow_tf32 and dot_precision(fp32) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert dot_precision(fp32) == "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True
    assert dot_precision(fp32) == "tf32"
    assert dot_precision(fp32.double()) == "ieee"  # fp64 is exact whatever the flag
    assert dot_precision(fp32.half()) == dot_precision(fp32.bfloat16()) == "tf32"  # Triton's default for them


def _calls(tree: ast.AST, name: str):
    """Calls of ``tl.<name>(...)``."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == name and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"]


def _is_dot_precision_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dot_precision"


def test_every_dot_of_every_kernel_takes_the_precision_dot_precision_chose():
    dots = launches = 0
    for path in sorted(OPS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "dot"):
            dots += 1
            precision = {k.arg: k.value for k in call.keywords}.get("input_precision")
            assert isinstance(precision, ast.Name) and precision.id == "DOT_PRECISION", (
                f"{path.name}:{call.lineno}: tl.dot without input_precision=DOT_PRECISION (Triton's default is tf32)")
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            # A launch may pass a local that the same function set from dot_precision (once for several uses).
            chosen = {target.id for node in ast.walk(function) if isinstance(node, ast.Assign)
                      and _is_dot_precision_call(node.value) for target in node.targets if isinstance(target, ast.Name)}
            for node in ast.walk(function):
                for keyword in node.keywords if isinstance(node, ast.Call) else []:
                    if keyword.arg == "DOT_PRECISION":
                        launches += 1
                        value = keyword.value
                        assert _is_dot_precision_call(value) or (isinstance(value, ast.Name) and value.id in chosen), (
                            f"{path.name}:{node.lineno}: DOT_PRECISION not computed by dot_precision")
    assert dots >= 10 and launches >= 4, (dots, launches)
