"""Property-based fuzzing of everything a user hands the toolkit: space files, --set values, search states and weight
files, mutated by hypothesis. Each must end in success or in a refusal the command lines print as one line (a
``UserError``; a space file's ``ValueError``, which the commands report as a ``ConfigError``), never another exception,
and never past a memory cap (``RLIMIT_AS``: an allocation past it fails, which the test would see). Derandomised and
few examples: a few seconds each."""
from __future__ import annotations

import contextlib
import math
import resource

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.budget import Costs
from nas.build import build_supernet
from nas.config import parse_command_line
from nas.errors import UserError
from nas.memory import check_memory
from nas.pretrained import init_from, read_weights
from nas.searching import Search, SearchConfig
from nas.spaces import PRESETS, load_space
from nas.trainer import TrainConfig

CAP_BYTES = 3 << 30  # over what the process maps already
FUZZ = settings(max_examples=30, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values a hostile or careless file holds: huge, negative, fractional, non-finite numbers, the wrong types.
scalars = st.one_of(st.integers(-2, 10**12), st.sampled_from([0, 1, 2**31, 2**63, 10**400]),
                    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                    st.text(max_size=5), st.just("1e400"))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def virtual_memory_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


@pytest.fixture
def memory_cap():
    """An address-space cap a few GB over what the test process maps now; put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = virtual_memory_bytes() + CAP_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (min(cap, hard) if hard != resource.RLIM_INFINITY else cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refused_or_done(action) -> None:
    """``action()`` succeeds or refuses as the command lines do; anything else (TypeError, OverflowError,
    MemoryError, RuntimeError from an allocation...) propagates and fails the test."""
    with contextlib.suppress(UserError):
        action()


@pytest.mark.parametrize("preset", ["digits-tiny", "uninet-cifar"])
@FUZZ
@given(data=st.data())
def test_mutated_space_files(tmp_path, memory_cap, preset, data):
    space = yaml.safe_load(PRESETS[preset].read_text())
    target = space["stages"][data.draw(st.integers(0, len(space["stages"]) - 1))] if "stages" in space else space
    field = data.draw(st.sampled_from(sorted(target) + ["bogus"]))
    target[field] = data.draw(values)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))

    def load_and_build():
        try:
            loaded = load_space(path)
        except ValueError:  # the trainer reports it as a ConfigError naming the space
            return
        check_memory(loaded, batch_size=64)
        build_supernet(loaded, batch_size=64, max_memory_gb=2)

    refused_or_done(load_and_build)


@pytest.mark.parametrize("config", [TrainConfig, SearchConfig])
@FUZZ
@given(data=st.data())
def test_set_values(memory_cap, config, data):
    key = data.draw(st.sampled_from([f.name for f in config.__dataclass_fields__.values()] + ["bogus"]))
    text = data.draw(st.one_of(values.map(yaml.safe_dump).map(str.strip), st.text(max_size=8)))
    argv = ["--set", f"{key}={text}", "--out-dir", "/nonexistent/never-written"]
    refused_or_done(lambda: parse_command_line(config, argv, prog="fuzz", description=""))


@pytest.fixture(scope="module")
def saved_search(tmp_path_factory):
    """A state of a short synthetic search (nsga2 keeps the most fields), and how to build a search to resume it."""
    space = load_space("digits-tiny")
    path = tmp_path_factory.mktemp("search") / "state.pt"

    def search(generations: int) -> Search:
        config = SearchConfig(algorithm="nsga2", budgets=["macs=2M"], generations=generations, population=6, seed=1,
                              out_dir=str(path.parent))

        def evaluate(archs, contenders=None):
            return [{"top1": 50.0 + a.embed_dim / 10, "top5": 90.0, "loss": 1.0, "samples": 64} for a in archs]

        return Search(config, space, evaluate, Costs(space), log=lambda _: None)

    search(2).run(path)
    return torch.load(path, weights_only=True), search, path.parent


def paths_into(state, prefix=()) -> list[tuple]:
    """Every path of keys and indices into a nested state."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [prefix] + [p for key, value in items for p in paths_into(value, (*prefix, key))]


def replaced(state, path: tuple, value):
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(state, dict):
        return {**state, key: replaced(state[key], rest, value)}
    items = list(state)
    items[key] = replaced(items[key], rest, value)
    return type(state)(items) if isinstance(state, tuple) else items


@FUZZ
@given(data=st.data())
def test_mutated_search_states(memory_cap, saved_search, data):
    state, search, directory = saved_search
    path = data.draw(st.sampled_from(paths_into(state)[1:]))
    torch.save(replaced(state, path, data.draw(values)), directory / "edited.pt")
    refused_or_done(lambda: search(3).load_state(directory / "edited.pt"))


shapes = st.lists(st.sampled_from([0, 1, 3, 16, 2**20]), max_size=3)  # up to 2^60 elements: torch's range


@FUZZ
@given(data=st.data())
def test_weight_files(tmp_path, memory_cap, data):
    supernet = build_supernet(load_space("digits-tiny"))
    names = sorted(supernet.state_dict())
    weights = {}
    for name in data.draw(st.lists(st.sampled_from(names + ["other"]), min_size=1, max_size=3, unique=True)):
        shape = data.draw(shapes)
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
        if math.prod(shape) <= 4096:
            tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
            if dtype.is_floating_point and data.draw(st.booleans()):
                tensor.view(-1)[:1] = math.nan
        else:  # declared, not stored: one value expanded
            tensor = torch.zeros(1, dtype=dtype).expand(*shape)
        weights[name] = tensor
    torch.save(weights, tmp_path / "weights.pt")
    refused_or_done(lambda: init_from(supernet, read_weights(tmp_path / "weights.pt")))
