"""Print a pytest-benchmark JSON file as one table per suite: the median of every implementation side by side (with
kernel and host time where the GPU fixture measured them) and how many times faster this project's implementation
is than each of the others.

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
    """One line per case: each implementation's synchronised wall time, kernel time and host time per call, and how
    many times faster this project's implementation is than each other one (wall; kernel time in brackets)."""
    mine = next((name for name in CANDIDATES if name in impls), next(iter(impls)))
    wall = {name: bench["stats"]["median"] for name, bench in impls.items()}
    kernel = {name: bench["extra_info"].get("kernel_ms") for name, bench in impls.items()}
    host = {name: bench["extra_info"].get("host_us") for name, bench in impls.items()}

    def cell(name: str) -> str:
        text = f"{name} {1e3 * wall[name]:.3f} ms"
        if kernel[name] is not None:
            text += f" (kernel {kernel[name]:.3f} ms, host {host[name]:.0f} us)"
        return text

    def ratio(name: str) -> str:
        text = f"{wall[name] / wall[mine]:.2f}x"
        if kernel[name] is not None and kernel[mine] is not None:
            text += f" [{kernel[name] / kernel[mine]:.2f}x]"
        return f"{text} vs {name}"

    memory = {name: bench["extra_info"].get("peak_memory_mb") for name, bench in impls.items()}
    extra = ""
    if memory.get(mine) is not None:
        extra = " | peak MB " + ", ".join(f"{name} {mb:.0f}" for name, mb in memory.items() if mb is not None)
    params = "-".join(str(value) for _, value in suite_params[1])
    return (f"{suite_params[0]}[{params}]: " + ", ".join(cell(name) for name in impls) + " | "
            + ", ".join(ratio(name) for name in impls if name != mine) + extra)


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
