"""The import graph of nas (every import, also those inside functions and under TYPE_CHECKING): one-way, no cycle,
no command line importing another, search never importing training; and the package importing without its
optional dependencies."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import processes
import pytest

REPO = Path(__file__).resolve().parents[2]
CLIS = {"nas.train", "nas.search", "nas.latency.__main__", "nas.export.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, package: str) -> set[str]:
    """Every module (and, for a submodule, its package: Python imports that first) that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # from . import data: a module
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def graph(root: str) -> dict[str, set[str]]:
    paths = sorted((REPO / root).rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges[name] = {m for m in imported(path, package) if m in modules and m != name
                       and not name.startswith(m + ".")}  # a submodule's own package is importing it, not the reverse
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_of_nas_has_no_cycle():
    edges = graph("nas")
    assert len(edges) > 30 and "nas.samplers.performance" in edges and "nas.trainer" in edges["nas.train"]
    assert cycles(edges) == []


def test_search_never_imports_training_and_no_command_line_imports_another():
    edges = graph("nas")
    for module in ("nas.search", "nas.searching"):
        assert not reachable(edges, module) & {"nas.train", "nas.trainer"}, module
    assert {name: targets & CLIS for name, targets in edges.items() if targets & CLIS} == {}


def test_space_and_cost_do_not_import_each_other():
    edges = graph("nas")
    assert "nas.vit.cost" not in reachable(edges, "nas.vit.space")  # cost builds on the space, not the reverse


def test_elastic_ops_never_imports_nas():
    assert not any(target.startswith("nas") for targets in graph("elastic_ops").values() for target in targets)


BLOCKER = """
import importlib.abc, sys
OPTIONAL = {"tqdm", "matplotlib", "sklearn", "scipy", "optuna", "tensorboard", "onnx", "onnxscript", "onnxruntime",
            "safetensors"}

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Missing())
"""


def test_nas_imports_and_runs_its_core_without_the_optional_dependencies(tmp_path):
    """What ``pip install elastic-ops`` gives (no 'nas' or 'search' extra): every module imports, the supernet runs,
    and a command line that needs an extra says which, on one line."""
    code = BLOCKER + """
import importlib, pkgutil, torch
import elastic_ops, nas
for info in pkgutil.walk_packages(nas.__path__, "nas."):
    importlib.import_module(info.name)
from nas.spaces import load_space
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet
space = load_space("digits-tiny")
print(VisionTransformerSupernet(SupernetConfig.from_space(space))(torch.zeros(2, 1, 8, 8), space.min_arch()).shape)
from nas.train import main
sys.exit(main(["--out-dir", "run", "--steps", "1", "--no-progress", "--no-plot"]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=processes.child_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "torch.Size([2, 10])\n"
    assert done.stderr == ("nas.train: error: the digits data set needs sklearn, which is not installed: pip install "
                           "'elastic-ops[nas]' (No module named 'sklearn')\n")


def test_the_base_install_does_not_pull_the_extras():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("tqdm", "matplotlib", "scikit-learn", "scipy", "optuna", "tensorboard", "onnx", "safetensors"):
        assert heavy not in base, heavy
    extras = project["optional-dependencies"]
    assert {"tqdm", "matplotlib", "scikit-learn", "scipy"} <= set(extras["nas"])
    assert "elastic-ops[nas,search,tensorboard,export,sam]" in extras["test"]
