"""Print a pytest-benchmark JSON file as one table per suite: the median of every implementation side by side and
how many times faster the first implementation of the row is than each of the others.

Run: python benchmarks/summarize.py results.json [more.json ...]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

IMPLEMENTATION_PARAMS = ("impl", "backend")  # the parameter that names what a benchmark compares
CANDIDATES = ("elastic_triton", "elastic", "batched", "native")  # this project's; the others are baselines


def rows(benchmarks: list[dict]) -> dict[tuple, dict[str, dict]]:
    """``(suite, params other than impl) -> impl -> benchmark``, in the order the suite ran them."""
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for bench in benchmarks:
        params = dict(bench["params"] or {})
        impl = next((params.pop(name) for name in IMPLEMENTATION_PARAMS if name in params), bench["name"])
        table[(bench["name"].split("[")[0], tuple(params.items()))][impl] = bench
    return table


def format_row(suite_params: tuple, impls: dict[str, dict]) -> str:
    mine = next((name for name in CANDIDATES if name in impls), next(iter(impls)))
    median = {name: bench["stats"]["median"] for name, bench in impls.items()}
    cells = [f"{name} {1e3 * median[name]:.3f} ms" for name in impls]
    ratios = [f"{median[name] / median[mine]:.2f}x vs {name}" for name in impls if name != mine]
    memory = {name: bench["extra_info"].get("peak_memory_mb") for name, bench in impls.items()}
    extra = ""
    if memory.get(mine) is not None:
        extra = " | peak MB " + ", ".join(f"{name} {mb:.0f}" for name, mb in memory.items() if mb is not None)
    params = "-".join(str(value) for _, value in suite_params[1])
    return f"{suite_params[0]}[{params}]: " + ", ".join(cells) + " | " + ", ".join(ratios) + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        info = data.get("machine_info", {})
        print(f"# {path}: {info.get('cpu', {}).get('brand_raw', '')} {data.get('datetime', '')}")
        for key, impls in rows(data["benchmarks"]).items():
            print(format_row(key, impls))


if __name__ == "__main__":
    main()
