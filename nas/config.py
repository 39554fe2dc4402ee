"""One config mechanism for both command lines, ``python -m nas.train`` and ``python -m nas.search``.

A config is a dataclass deriving from :class:`Config` whose fields are declared with :func:`setting`: a type
annotation, a default, a help text and, where they apply, the allowed choices, a flag name, and whether the setting
may change when a run resumes. From that one declaration come:

- checking: every field is checked against its type (an int where an int belongs, a float also from an int,
  ``None`` only where the type allows it, ...), its choices and its ceiling (a count that loops or allocations grow
  with), then by the config's own :meth:`Config.problems`;
  :meth:`Config.from_dict` refuses unknown keys. Every failure is a :class:`~nas.errors.ConfigError`.
- the command line (:func:`parse_command_line`): ``--config FILE`` (YAML, read with ``yaml.safe_load``), ``--set
  KEY=VALUE`` (the value read as YAML; ``KEY.NAME=VALUE`` sets one entry of a mapping setting), one flag per
  setting that is not a mapping (``--batch-size 32``; a bool is ``--progress`` / ``--no-progress``, a list a
  repeated flag), ``--resume``, and a ``--help`` that shows every setting with its default and choices. Later
  sources override earlier ones: the defaults (with ``--resume``: the settings the run was saved with), the file,
  the ``--set`` items, the flags.
- the resume rule (:func:`changes_on_resume`): a run continues only with the values it was saved with for every
  setting not marked ``resumable``; the resumable ones change where outputs go and what is shown, never a result.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError


def setting(default: Any, help: str, *, choices: Sequence | None = None, resumable: bool = False,
            flag: str | bool = True, at_most: int | None = None) -> Any:
    """A config field: ``default`` (a list or dict is copied for every config), ``help`` for ``--help``, the
    allowed ``choices``, whether it may change on resume, its flag (True: ``--`` and the name with dashes; a
    string: that flag; False: none, only ``--set`` and ``--config``) and, for a count whose loops or allocations grow
    with it, the largest value allowed (``at_most``)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "resumable": resumable,
                "flag": flag, "at_most": at_most}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- types ----------------------------------------------------------------------------------------------

def _options(hint) -> tuple:
    """The members of a union type (``int | None`` -> ``(int, NoneType)``), or the type itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _type_name(hint) -> str:
    if len(_options(hint)) > 1:
        return " | ".join(_type_name(option) for option in _options(hint))
    if hint is type(None):
        return "null"
    return str(hint) if typing.get_origin(hint) else hint.__name__  # "list[str]", "int"


def _converted(value: Any, hint) -> tuple[bool, Any]:
    """``(True, value as hint)`` if ``value`` is of type ``hint`` (an int is a float too, a bool is not an int;
    YAML 1.1 reads "2e-3", without a dot, as a string, which is a float here), else ``(False, value)``."""
    if len(_options(hint)) > 1:
        for option in _options(hint):
            ok, converted = _converted(value, option)
            if ok:
                return True, converted
        return False, value
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool), value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if hint is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        try:
            return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
        except OverflowError:  # an int past a float's range
            return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        item = (typing.get_args(hint) or (Any,))[0]
        items = [_converted(v, item) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, origin), value


def _numbers(config) -> list[tuple[str, float]]:
    """``(name, value)`` of every float value of a config, list items included (``compound_coefficients[1]``)."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        found += [(f.name if i is None else f"{f.name}[{i}]", v) for i, v in items if isinstance(v, float)]
    return found


def _is_mapping(hint) -> bool:
    return any((typing.get_origin(option) or option) is dict for option in _options(hint))


def _item(hint):
    """The item type of a list setting (``list[int]`` -> int; a bare list's items are strings on the command line)."""
    list_hint = next(option for option in _options(hint) if (typing.get_origin(option) or option) is list)
    return (typing.get_args(list_hint) or (str,))[0]


def _is_list(hint) -> bool:
    return any((typing.get_origin(option) or option) is list for option in _options(hint))


def _show(value: Any) -> str:
    """A default as one would write it in YAML: null, true, 3e-3, digits-tiny."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value) if not isinstance(value, str) or value else '""'


# -- configs ----------------------------------------------------------------------------------------------

class Config:
    """Base class of the configs: type and choice checks after construction, ``from_dict`` / ``to_dict``."""

    NAME: ClassVar[str] = ""  # names the config in errors: "bad training config: ..."

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        wrong = []
        for f in dataclasses.fields(self):
            ok, value = _converted(getattr(self, f.name), hints[f.name])
            if ok:
                setattr(self, f.name, value)
            else:
                wrong.append(f"{f.name} must be {_type_name(hints[f.name])}, got {getattr(self, f.name)!r}")
        if wrong:  # before the checks of values, which assume the types
            raise ConfigError(f"bad {self.NAME} config: " + "; ".join(wrong))
        problems = [f"{f.name}={getattr(self, f.name)!r} must be one of {', '.join(map(str, f.metadata['choices']))}"
                    for f in dataclasses.fields(self)
                    if f.metadata.get("choices") and getattr(self, f.name) not in f.metadata["choices"]]
        problems += [f"{f.name}={getattr(self, f.name)!r} must be at most {f.metadata['at_most']:,}"
                     for f in dataclasses.fields(self) if f.metadata.get("at_most") is not None
                     and getattr(self, f.name) is not None and getattr(self, f.name) > f.metadata["at_most"]]
        # No setting means anything by NaN or infinity, and a comparison with NaN passes every range check.
        problems += [f"{name}={value!r} must be a finite number" for name, value in _numbers(self)
                     if not math.isfinite(value)]
        problems += self.problems()
        if problems:
            raise ConfigError(f"bad {self.NAME} config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values (the types are right by now); empty when nothing is."""
        return []

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        if not isinstance(values, Mapping):
            raise ConfigError(f"a {cls.NAME} config is a mapping of setting: value, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"bad {cls.NAME} config: unknown key(s) {unknown}; valid keys: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}


def changes_on_resume(saved: Mapping[str, Any], config: Config) -> list[str]:
    """The settings that may not change on resume (not marked ``resumable``) whose value in ``config`` differs from
    the ``saved`` one, as ``"lr: 0.003 -> 0.1"``. A setting the saved config lacks counts as null."""
    return [f"{f.name}: {saved.get(f.name)!r} -> {getattr(config, f.name)!r}" for f in dataclasses.fields(config)
            if not f.metadata.get("resumable") and saved.get(f.name) != getattr(config, f.name)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (``yaml.safe_load``: plain data only)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(loaded, (dict, type(None))):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of setting: value, got "
                          f"{type(loaded).__name__}")
    return loaded or {}


def _value(text: str, hint, where: str) -> Any:
    """A value from the command line: the text itself for a string setting (null for none, where allowed),
    else the text read as YAML."""
    if str in _options(hint):
        nothing = type(None) in _options(hint) and text.strip() in ("null", "~", "")
        return None if nothing else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: the value is not valid YAML: {error}") from error


def apply_overrides(cls: type[Config], values: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """``values`` with the ``KEY=VALUE`` items set in order (``KEY.NAME=VALUE``: one entry of a mapping)."""
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, entry = key.strip().partition(".")
        where = f"--set {item!r}"
        if not sep or not name:
            raise ConfigError(f"{where} must look like KEY=VALUE")
        if name not in hints or name == "NAME":
            raise ConfigError(f"{where}: unknown key {name!r}; valid keys: "
                              + ", ".join(f.name for f in dataclasses.fields(cls)))
        if dot:
            if not _is_mapping(hints[name]):
                mappings = [f.name for f in dataclasses.fields(cls) if _is_mapping(hints[f.name])]
                raise ConfigError(f"{where}: only a mapping setting ({', '.join(mappings)}) takes KEY.NAME=VALUE")
            current = values.get(name, _default(cls, name))
            values[name] = {**(current if isinstance(current, dict) else {}), entry: _value(text, Any, where)}
        else:
            values[name] = _value(text, hints[name], where)
    return values


def _default(cls: type[Config], name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# -- the command line ---------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the usage and exits 2 by itself; the command lines report user errors on one line.
        raise ConfigError(f"{message} (see --help)")


def _flag(f: dataclasses.Field) -> str | None:
    flag = f.metadata.get("flag", True)
    return None if flag is False else flag if isinstance(flag, str) else "--" + f.name.replace("_", "-")


def _help(f: dataclasses.Field, default: Any) -> str:
    text = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        text += f"; one of {', '.join(map(_show, f.metadata['choices']))}"
    if f.metadata.get("at_most") is not None:
        text += f"; at most {f.metadata['at_most']:,}"
    text += f" (default: {_show(default)}{'; may change on resume' if f.metadata.get('resumable') else ''})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def build_parser(cls: type[Config], prog: str, description: str, resume_help: str | None,
                 resume_takes_path: bool) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    no_flag = [f.name for f in dataclasses.fields(cls) if _flag(f) is None or _is_mapping(hints[f.name])]
    epilog = ("Every setting is also a key of --config and --set; "
              + (f"{', '.join(no_flag)} only there. " if no_flag else "")
              + "Later sources override earlier ones: the defaults (with --resume, the settings the run was saved "
                "with), --config, --set, the flags."
              + (" A resumed run may change only the settings marked so." if resume_help is not None else ""))
    parser = _Parser(prog=prog, description=description, epilog=textwrap.fill(epilog, 100),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (read with yaml.safe_load)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a setting (the value is read as YAML; KEY.NAME=VALUE sets one entry of a "
                             "mapping setting); repeatable")
    if resume_help is None:
        pass  # a command with nothing to resume
    elif resume_takes_path:
        parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH", help=resume_help)
    else:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    group = parser.add_argument_group("settings")
    for f in dataclasses.fields(cls):
        flag, hint = _flag(f), hints[f.name]
        if flag is None or _is_mapping(hint):
            continue
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f, _default(cls, f.name)))
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif _is_list(hint):
            group.add_argument(flag, action="append", metavar="VALUE", **common)
        else:
            group.add_argument(flag, metavar=f.name.upper(), **common)
    return parser


def parse_command_line(cls: type[Config], argv: Sequence[str] | None, *, prog: str, description: str,
                       resume_help: str | None = None, resume_takes_path: bool = False,
                       saved: Callable[[str, bool | str], Mapping[str, Any] | None] | None = None
                       ) -> tuple[Config, bool | str]:
    """The config the command line describes, and ``--resume`` (False, True, or a path where it takes one; a command
    without ``resume_help`` has no ``--resume``).

    With ``--resume``, ``saved(out_dir, resume)`` gives the settings the run was saved with (None where there is no
    saved run, which the run itself reports), and they take the place of the defaults."""
    args = vars(build_parser(cls, prog, description, resume_help, resume_takes_path).parse_args(argv))
    hints = typing.get_type_hints(cls)
    flags = {}
    for f in dataclasses.fields(cls):
        if f.name in args:
            texts = args[f.name]
            where = f"{_flag(f)} {texts!r}"
            flags[f.name] = (texts if hints[f.name] is bool else [_value(t, _item(hints[f.name]), where) for t in texts]
                             if _is_list(hints[f.name]) else _value(texts, hints[f.name], where))
    from_file = read_config_file(args["config"]) if args["config"] else {}

    def merged(base: Mapping[str, Any]) -> dict[str, Any]:
        return {**apply_overrides(cls, {**base, **from_file}, args["overrides"]), **flags}

    values = merged({})
    if args.get("resume"):
        known = {f.name for f in dataclasses.fields(cls)}
        base = saved(str(values.get("out_dir", _default(cls, "out_dir"))), args["resume"]) or {}
        values = merged({k: v for k, v in base.items() if k in known})  # settings since removed are dropped
    return cls.from_dict(values), args.get("resume", False)
