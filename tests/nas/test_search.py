"""Search algorithms on synthetic objectives with a known optimum, the search loop (budgets, resume,
outputs, errors) and an end-to-end ``python -m nas.search`` run on CIFAR-10."""
from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import processes
import pytest
import torch
from hostile import RunsCode, fill_disk
from significance import sign_flip_p_value

from nas.budget import Budget, Costs
from nas.costs import macs_many, params_many
from nas.errors import CheckpointError, CheckpointMismatchError
from nas.samplers import LearnedSampler
from nas.search import parse_args
from nas.searchers import SEARCHERS, InfeasibleBudgetError, build_searcher, non_dominated_fronts
from nas.searching import Search, SearchConfig, search_data, write_outputs
from nas.spaces import load_space
from nas.vit.arch import Arch

ALGORITHMS = sorted(SEARCHERS)


def distance_objective(target: Arch):
    """A synthetic accuracy: 100 at ``target``, one point less per gene that differs from it."""
    def score(arch: Arch) -> float:
        genes = [arch.embed_dim != target.embed_dim, arch.layer_on != target.layer_on]
        genes += [a != b for a, b, on in zip(arch.num_heads, target.num_heads, target.layer_on) if on]
        genes += [a != b for a, b, on in zip(arch.mlp_ratio, target.mlp_ratio, target.layer_on) if on]
        return 100.0 - float(sum(genes))
    return score


def synthetic_setup(space_name="cifar-tiny", quantile=0.5, seed=7):
    """A space, a MACs budget at the given quantile of uniform draws, and a target arch inside it."""
    space = load_space(space_name)
    draws = space.sample_many(np.random.default_rng(seed), 400)
    limit = float(np.quantile(macs_many(draws, space), quantile))
    target = next(a for a in draws.archs() if macs_many([a], space)[0] <= 0.8 * limit)
    return space, Budget("macs", limit), target


def extra_options(name, space):
    """The learned sampler of FocusFormer, untrained: the search must work from any trained state."""
    return {"sampler": LearnedSampler(space, seed=0)} if name == "sampler" else {}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_searcher_respects_budget_and_reports_its_best(name):
    """Every proposal meets the budget, and ``best()`` is the best arch observed so far with its own score."""
    space, budget, target = synthetic_setup()
    costs = Costs(space)
    score = distance_objective(target)
    searcher = build_searcher(name, space, costs.feasible([budget]), seed=3, cost=costs.metric("macs"),
                              **extra_options(name, space))
    observed = {}
    for _ in range(8):
        archs = searcher.propose(24)
        assert len(archs) == 24
        assert (macs_many(archs, space) <= budget.high).all(), f"{name} proposed an arch over the budget"
        scores = [score(a) for a in archs]
        searcher.observe(archs, scores)
        observed.update(zip(archs, scores))
        best_arch, best = searcher.best()
        assert best == max(observed.values()) and score(best_arch) == best


# Equal evaluations for a searcher and random search: 16 proposals a generation, 16 generations, except for the two
# model-based searchers, whose every proposal fits a model to all the history: they are compared at 8 generations.
GENERATIONS = {"tpe": 8, "autotuner": 8}
SEEDS = range(10)


@functools.cache
def best_scores(name: str, generations: int) -> tuple[float, ...]:
    """The best score ``name`` reaches on the cifar-tiny distance objective, one per seed of SEEDS."""
    space, budget, target = synthetic_setup()
    costs = Costs(space)
    score = distance_objective(target)
    bests = []
    for seed in SEEDS:
        searcher = build_searcher(name, space, costs.feasible([budget]), seed=seed, cost=costs.metric("macs"),
                                  **extra_options(name, space))
        for _ in range(generations):
            archs = searcher.propose(16)
            searcher.observe(archs, [score(a) for a in archs])
        bests.append(searcher.best()[1])
    return tuple(bests)


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - {"random"}))
def test_guided_search_beats_random_at_equal_evaluations(name):
    """Paired by seed against random search at the same number of evaluations: the gains in best score pass a
    one-sided sign-flip test at the 1% level and average at least one point (one gene nearer the optimum; random
    search's best over 10 seeds spreads 95..98). A searcher that proposes as random search does gives gains whose
    signs are exchangeable, so it passes the test with probability at most 1%, whatever the margin."""
    generations = GENERATIONS.get(name, 16)
    gains = np.subtract(best_scores(name, generations), best_scores("random", generations))
    assert sign_flip_p_value(gains) <= 0.01 and gains.mean() >= 1.0, f"{name}: gains over random {gains.tolist()}"


def test_evolution_finds_the_optimum():
    space, budget, target = synthetic_setup("digits-tiny")
    costs = Costs(space)
    score = distance_objective(target)
    searcher = build_searcher("evolution", space, costs.feasible([budget]), seed=0)
    for _ in range(20):
        archs = searcher.propose(50)
        searcher.observe(archs, [score(a) for a in archs])
    assert searcher.best()[1] == 100.0


def test_non_dominated_fronts_by_hand():
    score = np.array([1.0, 2.0, 3.0, 2.0, 0.5])
    cost = np.array([1.0, 2.0, 3.0, 1.0, 5.0])
    fronts = [sorted(f.tolist()) for f in non_dominated_fronts(score, cost)]
    # 3 (2.0 at cost 1) dominates 0 and 1; 2 is the only one with score 3; 4 is dominated by everyone.
    assert fronts == [[2, 3], [0, 1], [4]]


# --- the search loop -------------------------------------------------------------------------------

def synthetic_search(tmp_path, algorithm="evolution", generations=4, budgets=("macs=35M", "params=500K"), **overrides):
    space = load_space("cifar-tiny")
    config = SearchConfig(algorithm=algorithm, budgets=list(budgets), generations=generations, population=16,
                          parents=4, mutations=8, crossovers=8, seed=5, out_dir=str(tmp_path), **overrides)
    target = space.sample(np.random.default_rng(11))
    score = distance_objective(target)
    calls = []

    def evaluate(archs, contenders=None):  # every candidate evaluated fully: the synthetic score has no noise
        calls.append(list(archs))
        return [{"top1": score(a), "top5": 100.0, "loss": 100.0 - score(a)} for a in archs]

    return Search(config, space, evaluate, Costs(space), log=lambda _: None, **extra_options(algorithm, space)), calls


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_continues_exactly(tmp_path, algorithm):
    straight, _ = synthetic_search(tmp_path / "a", algorithm)
    expected = straight.run()
    first, _ = synthetic_search(tmp_path / "b", algorithm, generations=2)
    first.run(tmp_path / "b" / "state.pt")
    resumed, calls = synthetic_search(tmp_path / "b", algorithm, generations=4)
    resumed.load_state(tmp_path / "b" / "state.pt")
    assert resumed.step == 2
    assert resumed.run(tmp_path / "b" / "state.pt") == expected
    evaluated_after_resume = [a for call in calls for a in call]
    assert len(evaluated_after_resume) == len(set(evaluated_after_resume)), "a candidate was evaluated twice"


def edited_states(state: dict) -> dict[str, tuple[dict, str]]:
    """A saved state edited by hand in each way a resume must not believe, and what the refusal says."""
    arch, metrics, step, complete = state["evaluated"][0]
    searcher = state["searchers"][0]

    def candidate(**changes) -> dict:
        edited = {"arch": arch, "metrics": metrics, "step": step, "complete": complete, **changes}
        return {**state, "evaluated": [tuple(edited.values()), *state["evaluated"][1:]]}

    return {
        "top1 1000": (candidate(metrics={**metrics, "top1": 1000.0}), r"evaluated\[0\]'s top1 is 1000.0, not a finite"),
        "top1 nan": (candidate(metrics={**metrics, "top1": math.nan}), r"evaluated\[0\]'s top1 is nan"),
        "macs edited": (candidate(metrics={**metrics, "macs": 1.0}), r"evaluated\[0\]'s macs is 1.0, but the arch's"),
        "arch outside": (candidate(arch={**arch, "embed_dim": 999}), r"evaluated\[0\] is not an arch of space"),
        "unknown arch field": (candidate(arch={**arch, "colour": 1}), r"evaluated\[0\] is not an arch of space"),
        "step -5": ({**state, "step": -5}, r"search state: step is -5, not an integer"),
        "candidate step": (candidate(step=99), r"evaluated\[0\]'s step is 99"),
        "complete 2": (candidate(complete=2), r"complete flag is 2, not true or false"),
        "score edited": ({**state, "searchers": [{**searcher, "scores": [(arch, 99.5), *searcher["scores"][1:]]},
                                                 *state["searchers"][1:]]},
                         "holds scores the search never gave it"),
        "extra searcher": ({**state, "searchers": [*state["searchers"], searcher]}, "searchers' states, this search"),
    }


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_edited_search_state_is_refused_in_one_line(tmp_path, algorithm):
    first, _ = synthetic_search(tmp_path, algorithm, generations=2, budgets=("macs=35M",))
    first.run(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    cases = edited_states(state)
    searcher = state["searchers"][0]
    if algorithm == "nsga2":
        cases["size -3"] = ({**state, "searchers": [{**searcher, "size": -3}]}, r"nsga2 state: size is -3")
    if algorithm == "rl":
        cases["logits nan"] = ({**state, "searchers": [{**searcher, "logits": [[math.nan] * len(searcher["logits"][0]),
                                                                               *searcher["logits"][1:]]}]}, "logits")
        cases["logits short"] = ({**state, "searchers": [{**searcher, "logits": searcher["logits"][1:]}]}, "logits")
    for name, (edited, message) in cases.items():
        torch.save(edited, tmp_path / "edited.pt")
        resumed, _ = synthetic_search(tmp_path, algorithm, generations=3, budgets=("macs=35M",))
        with pytest.raises(CheckpointError, match=message) as refused:
            resumed.load_state(tmp_path / "edited.pt")
        assert "\n" not in str(refused.value), name
    resumed, _ = synthetic_search(tmp_path, algorithm, generations=3, budgets=("macs=35M",))
    resumed.load_state(tmp_path / "state.pt")  # the state as saved loads


def plain_types(value) -> set[type]:
    """The types of ``value`` and of everything inside it."""
    inside = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    keys = value.keys() if isinstance(value, dict) else ()
    return {type(value)}.union(*(plain_types(v) for v in (*keys, *inside)))


def test_tpe_state_is_plain_data_and_a_pickled_study_never_loads(tmp_path):
    first, _ = synthetic_search(tmp_path, "tpe", generations=1)
    first.run(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert plain_types(state) <= {dict, list, tuple, str, int, float, bool, type(None)}
    assert len(state["searchers"][0]["trials"]) >= 16

    marker = tmp_path / "MARKER"
    searcher = {k: v for k, v in state["searchers"][0].items() if k not in ("trials", "generators", "pending")}
    old = {**searcher, "study": pickle.dumps(RunsCode(marker))}  # what the state held before: a pickled study
    torch.save({**state, "searchers": [old, *state["searchers"][1:]]}, tmp_path / "old.pt")
    resumed, _ = synthetic_search(tmp_path, "tpe", generations=2)
    with pytest.raises(ValueError, match="pickled the Optuna study; it is not loaded"):
        resumed.load_state(tmp_path / "old.pt")
    assert not marker.exists()

    garbled = {**state["searchers"][0], "trials": [{"state": "DONE"}]}
    torch.save({**state, "searchers": [garbled, *state["searchers"][1:]]}, tmp_path / "garbled.pt")
    with pytest.raises(CheckpointError, match="the tpe search state is malformed"):
        resumed.load_state(tmp_path / "garbled.pt")


def test_budgets_share_candidates_and_are_respected(tmp_path):
    search, calls = synthetic_search(tmp_path)
    summary = search.run()
    assert len(calls) == 4, "each step's candidates of all budgets go to the evaluator in one call"
    evaluated = [a for call in calls for a in call]
    assert len(evaluated) == len(set(evaluated)) == len(summary["candidates"])
    space = search.space
    for label, budget in zip(summary["best"], search.budgets):
        best = Arch.from_dict(summary["best"][label]["arch"])
        value = {"macs": macs_many, "params": params_many}[budget.metric]([best], space)[0]
        assert value <= budget.high
        inside = [c["top1"] for c in summary["candidates"] if c[budget.metric] <= budget.high]
        assert summary["best"][label]["top1"] == max(inside)
    front = summary["pareto_front"]["macs"]
    assert [c["macs"] for c in front] == sorted(c["macs"] for c in front)
    assert [c["top1"] for c in front] == sorted(c["top1"] for c in front)
    written = write_outputs(search, str(tmp_path))
    assert json.loads((tmp_path / "search.json").read_text()) == json.loads(json.dumps(written))
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_clear_errors(tmp_path):
    with pytest.raises(InfeasibleBudgetError, match="no arch of space 'cifar-tiny' can meet it"):
        synthetic_search(tmp_path, budgets=("macs=1M",))
    with pytest.raises(ValueError, match="latency model"):
        synthetic_search(tmp_path, budgets=("latency=5ms",))
    with pytest.raises(ValueError, match="algorithm='genetic' must be one of"):
        SearchConfig(algorithm="genetic")
    with pytest.raises(ValueError, match="population must be a positive int"):
        SearchConfig(population=0)
    with pytest.raises(ValueError, match="unknown key"):
        SearchConfig.from_dict({"populaton": 10})
    with pytest.raises(ValueError, match="unknown metric 'energy'"):
        Budget.parse("energy=5")
    first, _ = synthetic_search(tmp_path, generations=1)
    first.run(tmp_path / "state.pt")
    other, _ = synthetic_search(tmp_path, generations=2, mutation_prob=0.5)
    with pytest.raises(ValueError, match="mutation_prob"):
        other.load_state(tmp_path / "state.pt")


def test_budget_parsing():
    assert Budget.parse("flops=2.6G") == Budget("macs", 1.3e9)
    assert Budget.parse("params=4M:6M") == Budget("params", 6e6, 4e6)
    assert Budget.parse("latency=5ms") == Budget("latency", 5.0)
    assert Budget.parse("macs<=1.3G").label == "macs=1.3G"


def test_config_from_yaml_and_flags(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("algorithm: nsga2\npopulation: 12\nbudgets: [macs=1G]\n")
    config, _ = parse_args(["--config", str(path), "--population", "20", "--budget", "params=5M", "--no-progress"])
    assert (config.algorithm, config.population, config.budgets, config.progress) == ("nsga2", 20, ["params=5M"], False)


# --- python -m nas.search on a tiny supernet: its output directory, resume, errors ----------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from nas.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("train") / "run"
    return Path(train(TrainConfig(max_steps=1, batch_size=32, train_subset=64, test_subset=32, search_holdout=64,
                                  out_dir=str(out), ckpt_every=0, progress=False, plot=False,
                                  backend="reference")).checkpoint)  # the autouse fixture's choice is per test


def search_args(checkpoint: Path, output: Path, generations: int = 2) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--out-dir", str(output), "--generations", str(generations),
            "--population", "4", "--parents", "2", "--mutations", "2", "--crossovers", "2", "--test-images", "16",
            "--no-progress"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("nas.search: error: ") and err.count("\n") == 1, err
    return err


def test_a_search_owns_its_output(tiny_checkpoint, tmp_path, capsys):
    from nas.rundir import OwnedDirectory
    from nas.search import main

    out = tmp_path / "out"
    assert main(search_args(tiny_checkpoint, out, generations=1)) == 0
    state = (out / "state.pt").read_bytes()
    # A user's file, and a killed write's temporary: a refusing search deletes neither.
    temporaries = [out / ".state.pt.abcdefgh.tmp", out / ".state.pt.nas-abcdefgh.tmp"]
    for temporary in temporaries:
        temporary.write_text("x")
    assert main(search_args(tiny_checkpoint, out)) == 2
    assert one_line_error(capsys) == (f"nas.search: error: out_dir '{out}' already holds a search (state.pt); "
                                      "continue it with --resume, or choose another --out-dir\n")
    assert all(temporary.exists() for temporary in temporaries)
    held = OwnedDirectory(out, "output")
    assert main(search_args(tiny_checkpoint, out) + ["--resume"]) == 2
    assert f"out_dir '{out}' is in use by another run" in one_line_error(capsys)
    assert (out / "state.pt").read_bytes() == state
    held.release()
    assert main(search_args(tiny_checkpoint, out) + ["--resume"]) == 0


def test_resume_accepts_a_moved_checkpoint_with_the_same_content(tiny_checkpoint, tmp_path, capsys):
    from nas.search import main

    assert main(search_args(tiny_checkpoint, tmp_path / "straight")) == 0
    moved = tmp_path / "moved.pt"
    moved.write_bytes(tiny_checkpoint.read_bytes())
    assert main(search_args(tiny_checkpoint, tmp_path / "out", generations=1)) == 0
    assert main(search_args(moved, tmp_path / "out") + ["--resume"]) == 0
    straight, resumed = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("straight", "out"))
    assert resumed["candidates"] == straight["candidates"]

    state = torch.load(tiny_checkpoint, weights_only=True)
    state["model"]["head.bias"] += 1  # another supernet
    torch.save(state, tmp_path / "other.pt")
    assert main(search_args(tmp_path / "other.pt", tmp_path / "out", generations=3) + ["--resume"]) == 2
    assert "evaluated on other data or another checkpoint" in one_line_error(capsys)


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize("args, files, message", [
    (["--device", "tpu"], {}, "device='tpu': Expected one of .* device type at start of device string: tpu"),
    (["--seed", "-1"], {}, r"bad search config: seed must be in 0..4294967295, got -1"),
    (["--config", "{dir}/c.yaml"], {"c.yaml": "budgets: [macs=1G\n"}, r"config file '.*c.yaml' is not valid YAML: "),
    (["--config", "{dir}/c.yaml"], {"c.yaml": "budgets: 5\n"}, r"bad search config: budgets must be list\[str\], "
                                                               "got 5"),
    (["--config", "{dir}/c.yaml"], {"c.yaml": "mutation_prob: high\n"}, "bad search config: mutation_prob must be "
                                                                        "float, got 'high'"),
    (["--resume"], {"out/state.pt": b"garbage"}, r"search state '.*out/state.pt' is corrupt or not a nas.search state: "
                                                 "Unsupported operand 103"),
    (["--resume"], {"out/state.pt": [1, 2]}, r"search state '.*out/state.pt' holds a list, not a nas.search state"),
    (["--resume"], {"out/state.pt": {"version": 1}}, r"search state '.*out/state.pt' is malformed: "
                                                     r"KeyError\('config'\)"),
    ([], {"out/eval_cache.json": "{not json"}, r"evaluation cache '.*out/eval_cache.json' is corrupt \(Expecting"),
    ([], {"out/eval_cache.json": '{"k": {"top1": "high"}}'}, r"evaluation cache '.*out/eval_cache.json' is corrupt "
                                                              r"\(an evaluation result is a mapping of top1, top5"),
    ([], {"out": "a file"}, r"out_dir '.*out' is a file, not a directory"),
    # The checkpoint trained on digits and records no data_dir: another data set needs one.
    (["--dataset", "cifar10"], {}, r"data set 'cifar10' needs a data directory \(data_dir / --data-dir\)"),
    (["--latency-model", "{dir}/none.json"], {}, r".*none.json: cannot read the latency model: No such file"),
    (["--algorithm", "sampler"], {}, r"--algorithm sampler needs a supernet trained with the learned sampler"),
    (["--population", "1000000000"], {}, r"bad search config: population=1000000000 must be at most 100,000$"),
    (["--set", "num_workers=100000"], {}, r"bad search config: num_workers=100000 must be at most 256$"),
    (["--set", "subnets_per_pass=1000000"], {}, r"bad search config: subnets_per_pass=1000000 must be at most "
                                                r"100,000$"),
    (["--generations", "100000", "--population", "1000"], {}, r"bad search config: generations=100000 \* "
                                                              r"population=1000 \* 1 budget\(s\) = 100,000,000 "
                                                              r"candidates, at most 10,000,000"),
    (["--batch-size", "1000000000"], {}, r"space 'digits-tiny': its supernet would take about .* GB \(evaluating "
                                         r"1000000000 images a batch\), more than .* GB allowed by .*; "
                                         r"batch_size=1000000000 is too large: at most [0-9]+ fit$"),
])
def test_one_line_errors(tiny_checkpoint, tmp_path, capsys, args, files, message):
    from nas.search import main

    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write(tmp_path / name, content)
    assert main(search_args(tiny_checkpoint, tmp_path / "out") + [a.format(dir=tmp_path) for a in args]) == 2
    assert re.fullmatch(f"nas.search: error: {message}.*\n", one_line_error(capsys))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    from nas.search import main

    assert main(search_args(tiny_checkpoint, tmp_path / "out") + ["--device", "cuda"]) == 2
    assert one_line_error(capsys) == "nas.search: error: device='cuda' but CUDA is not available\n"


def test_unwritable_output_is_a_one_line_error(tiny_checkpoint, tmp_path, monkeypatch, read_only_dir, capsys):
    from nas.search import main

    assert main(search_args(tiny_checkpoint, read_only_dir)) == 2
    assert re.fullmatch(f"nas.search: error: cannot write to out_dir '{read_only_dir}': "
                        "(Permission denied|Read-only file system|Operation not permitted)\n", one_line_error(capsys))
    fill_disk(monkeypatch, room=1000)
    assert main(search_args(tiny_checkpoint, tmp_path / "out")) == 2
    assert re.fullmatch(f"nas.search: error: cannot write '{tmp_path / 'out'}/.*': No space left on device\n",
                        one_line_error(capsys))


# --- search data: the training images the checkpoint held out ------------------------------------------

def test_search_data_is_the_split_the_checkpoint_held_out(tmp_path, capsys):
    from nas.checkpoint import load_checkpoint
    from nas.data import load_digits, normalize
    from nas.search import main
    from nas.trainer import TrainConfig, train

    trained = train(TrainConfig(max_steps=1, batch_size=32, train_subset=64, test_subset=32, search_holdout=100,
                                out_dir=str(tmp_path / "train"), ckpt_every=0, progress=False, plot=False))
    state = load_checkpoint(trained.checkpoint)
    full = load_digits("train")
    space = load_space("digits-tiny")

    def searched(checkpoint, holdout_images=0):
        config = SearchConfig(checkpoint=trained.checkpoint, holdout_images=holdout_images, test_images=16)
        batches, _, calibration, described = search_data(config, checkpoint, space, "cpu")
        assert calibration is None  # a ViT supernet has no BatchNorm to recalibrate
        return batches.images, described

    def normalised(images):  # the search data are kept normalised, read as they are by every pass
        return normalize(images, full.mean, full.std)

    order = np.random.default_rng(1).permutation(len(full))
    images, described = searched(state)
    assert torch.equal(images, normalised(full.images[order[:100]]))
    assert described == "100 held-out digits training images"
    assert torch.equal(searched(state, 30)[0], normalised(full.images[order[:30]]))
    reseeded = {**state, "search_split": {**state["search_split"], "seed": 5}}  # the seed is read, not assumed
    assert torch.equal(searched(reseeded)[0],
                       normalised(full.images[np.random.default_rng(5).permutation(len(full))[:100]]))

    with pytest.raises(ValueError, match="holdout_images=101, but .* held only 100 digits training images out"):
        searched(state, 101)
    with pytest.raises(CheckpointMismatchError, match="training set of 999 images, not of this digits one"):
        searched({**state, "search_split": {**state["search_split"], "of": 999}})
    kept_none = {**state, "search_split": {**state["search_split"], "images": 0}}
    with pytest.warns(UserWarning, match="search_holdout=0: the supernet trained on every digits training image"):
        images, described = searched(kept_none)
    assert images.shape[0] == len(full) // 5 and described.endswith("(which the supernet trained on)")
    with pytest.warns(UserWarning, match="records no held-out split"):
        searched({k: v for k, v in state.items() if k != "search_split"})

    args = ["--checkpoint", trained.checkpoint, "--holdout-images", "101", "--out-dir", str(tmp_path / "s"),
            "--no-progress"]
    assert main(args) == 2
    assert "held only 100 digits training images out of training" in capsys.readouterr().err


# --- end to end on CIFAR-10 with a supernet trained by nas.train ---------------------------------------

CIFAR_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar-10-batches-py")


@pytest.mark.slow
def test_end_to_end_on_cifar(tmp_path, capsys):
    if not os.path.exists(os.path.join(CIFAR_DIR, "test_batch")):
        pytest.skip(f"CIFAR-10 is not at {os.path.abspath(CIFAR_DIR)} (expected ../shared/data next to the repo)")
    from nas.search import main
    from nas.trainer import TrainConfig, train

    trained = train(TrainConfig(space="cifar-tiny", dataset="cifar10", data_dir=CIFAR_DIR, max_steps=2, batch_size=16,
                                train_subset=128, test_subset=32, warmup_steps=1, out_dir=str(tmp_path / "train"),
                                backend="reference", progress=False, plot=False))
    out = tmp_path / "search"
    args = ["--checkpoint", trained.checkpoint, "--budget", "macs=30M", "--generations", "2", "--population", "4",
            "--parents", "2", "--mutations", "2", "--crossovers", "2", "--holdout-images", "48", "--test-images", "32",
            "--batch-size", "48", "--out-dir", str(out), "--export", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "search.json").read_text())
    assert len(summary["candidates"]) == 8 and summary["steps"] == 2
    best = summary["best"]["macs=30M"]
    assert best["macs"] <= 30e6 and summary["test"]["macs=30M"]["samples"] == 32
    assert (out / "pareto.png").exists() and os.path.exists(summary["exported"]["macs=30M"])
    assert main(args + ["--resume", "--generations", "3"]) == 0
    resumed = json.loads((out / "search.json").read_text())
    assert resumed["steps"] == 3 and resumed["candidates"][:8] == summary["candidates"]

    capsys.readouterr()
    assert main(args[:2] + ["--space", "digits-tiny", "--out-dir", str(tmp_path / "x")]) == 2
    assert "not of the requested space 'digits-tiny'" in capsys.readouterr().err
    assert main(args[:2] + ["--budget", "params=1K", "--out-dir", str(tmp_path / "y")]) == 2
    assert "no arch of space 'cifar-tiny' can meet it" in capsys.readouterr().err
    assert main(args[:2] + ["--population", "0"]) == 2
    assert "population must be a positive int" in capsys.readouterr().err


def test_torchrun_search_equals_one_process(tiny_checkpoint, tmp_path):
    """Two gloo ranks share each step's candidates (racing on): the same candidates, metrics and best archs as one
    process, written once by rank 0."""
    from nas.search import main

    args = search_args(tiny_checkpoint, tmp_path / "one", generations=3) + ["--race"]
    assert main(args) == 0
    command = processes.TORCHRUN + ["--nproc_per_node", "2", "-m", "nas.search",
                                    *search_args(tiny_checkpoint, tmp_path / "two", generations=3), "--race"]
    done = processes.run(command, tmp_path, timeout=240)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
    one, two = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("one", "two"))
    assert [c["arch"] for c in two["candidates"]] == [c["arch"] for c in one["candidates"]]
    for mine, theirs in zip(two["candidates"], one["candidates"]):
        assert (mine["top1"], mine["samples"], mine["complete"]) == (theirs["top1"], theirs["samples"],
                                                                   theirs["complete"])
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert {label: best and best["arch"] for label, best in two["best"].items()} == \
        {label: best and best["arch"] for label, best in one["best"].items()}
    assert done.stdout.count("[search] best for") == sum(best is not None for best in one["best"].values())
