"""The error policy (DESIGN.md section 10): every user error of nas is a UserError, which both command lines print
as one line with exit status 2; any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import processes
import pytest

import nas
from nas import errors, search, train
from nas.errors import ConfigError, MissingDependencyError, UserError, require, run_command


def nas_modules() -> list:
    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(nas.__path__, "nas.")]


def test_every_error_class_of_nas_is_a_user_error():
    defined = {cls for module in nas_modules() for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, BaseException) and cls.__module__.startswith("nas")}
    assert len(defined) >= 10
    assert all(issubclass(cls, UserError) for cls in defined), [c for c in defined if not issubclass(c, UserError)]


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    def refuse() -> int:
        raise ConfigError("config file 'c.yaml' is not valid YAML: while parsing\n  in line 3\n")

    assert run_command("nas.train", refuse) == 2
    assert capsys.readouterr().err == ("nas.train: error: config file 'c.yaml' is not valid YAML: while parsing in "
                                       "line 3\n")


@pytest.mark.parametrize("module, entry", [(train, "train"), (search, "run_search")])
@pytest.mark.parametrize("bug", [ValueError, RuntimeError, KeyError, ImportError])
def test_any_other_exception_is_a_bug_that_keeps_its_traceback(module, entry, bug, monkeypatch, tmp_path):
    """Plain ValueError, RuntimeError, ... from inside a run are not reported as a user's mistake."""
    def broken(*args, **kwargs):
        raise bug("a bug")

    monkeypatch.setattr(module, entry, broken)
    with pytest.raises(bug, match="a bug"):
        module.main(["--out-dir", str(tmp_path), "--set", "checkpoint=x.pt" if module is search else "epochs=1"])


def test_a_bug_prints_its_traceback_from_the_command_line(tmp_path):
    code = ("import sys, nas.search as cli\n"
            "def broken(*args): raise KeyError('a bug')\n"
            "cli.run_search = broken\n"
            "sys.exit(cli.main(['--checkpoint', 'x.pt', '--out-dir', 'out']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=processes.child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr and "KeyError: 'a bug'" in \
        done.stderr, done.stderr


def test_a_missing_optional_dependency_names_the_extra_that_installs_it():
    with pytest.raises(MissingDependencyError, match=r"plotting needs no_such_plotter, which is not installed: "
                                                     r"pip install 'elastic-ops\[nas\]'") as raised:
        require("no_such_plotter.pyplot", "nas", "plotting")
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, UserError)


def test_the_family_keeps_the_builtin_bases_callers_caught_before():
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.BudgetError, ValueError)
    assert issubclass(errors.CheckpointError, RuntimeError) and issubclass(errors.DataError, RuntimeError)
    assert issubclass(errors.CheckpointMismatchError, errors.CheckpointError)
    assert issubclass(errors.OutputError, OSError) and issubclass(errors.InfeasibleBudgetError, errors.BudgetError)
