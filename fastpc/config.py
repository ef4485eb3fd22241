"""Typed run configuration: YAML file -> ``--set`` overrides -> validated :class:`Config`.

The schema (five sections, one dataclass each, every field documented) is
:mod:`fastpc.config_schema`, re-exported here; ``fastpc/presets/`` holds one preset per
experiment. Every problem with user input raises :class:`fastpc.UserError`
with one line naming the key, what was given and what is accepted::

    cfg = load_config("fastpc/presets/cifar10-vgg5-epc.yaml", ["train.epochs=2", "learner.iters=10"])
    print(dump_config(cfg))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_schema import (
    Config, DataConfig, LearnerConfig, ModelConfig, OptimConfig, TrainConfig, choice, fail, one_line,
)
from .errors import UserError

__all__ = [
    "Config", "DataConfig", "ModelConfig", "LearnerConfig", "OptimConfig", "TrainConfig",
    "load_config", "config_from_dict", "config_to_dict", "apply_overrides", "parse_override",
    "dump_config", "valid_keys", "RENAMED_KEYS", "upgrade_stored_config",
]

# Keys renamed since fastpc wrote them, old -> new: a config the user gives with an old key is
# refused naming the new one; one fastpc stored is read under the new names (upgrade_stored_config).
RENAMED_KEYS: dict[str, str] = {"model.init": "model.weight_init"}


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def valid_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. ``learner.state_lr``."""
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str, candidates: list[str]) -> UserError:
    if key in RENAMED_KEYS:
        return UserError(f"config key {key!r} is now {RENAMED_KEYS[key]!r}; rename it")
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if close:
        return UserError(f"unknown config key {key!r}; did you mean {close[0]!r}?")
    section = key.split(".", 1)[0]
    same = [c for c in candidates if c.startswith(section + ".")]
    return UserError(f"unknown config key {key!r}; valid keys: {', '.join(same or candidates)}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type ``tp`` (YAML-typed; ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for tp_i in inner:  # e.g. bool | Literal["auto"]: the first type that takes the value
            try:
                return _coerce(key, value, tp_i)
            except UserError:
                pass
        names = [("true, false" if a is bool else ", ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                  else a.__name__) for a in inner]
        fail(key, f"expected one of {', '.join(names)}, got {value!r}")
    if origin is Literal:
        choices = list(typing.get_args(tp))
        if not isinstance(value, str):
            fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        choice(key, value, choices)
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail(key, f"expected a mapping of option names to values, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            fail(key, f"expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**1000:
            fail(key, f"number out of range: {value}")
        value = float(value)
        if not math.isfinite(value):
            fail(key, f"expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this module, not user input


def _section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"config section {name!r} must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        if not isinstance(k, str) or k not in fields:
            raise _unknown_key(f"{name}.{k}", valid_keys())
        kwargs[k] = _coerce(f"{name}.{k}", v, hints[k])
    return cls(**kwargs)


def upgrade_stored_config(d: Any) -> Any:
    """A config dict fastpc stored (a run's config.yaml, a checkpoint's ``config``) with the keys
    renamed since (:data:`RENAMED_KEYS`) under their new names; anything else is returned as is."""
    if not isinstance(d, dict):
        return d
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in RENAMED_KEYS.items():
        (section, old_name), (_, new_name) = old.split(".", 1), new.split(".", 1)
        if isinstance(out.get(section), dict) and old_name in out[section]:
            out[section].setdefault(new_name, out[section].pop(old_name))
    return out


def config_from_dict(d: Any) -> Config:
    """Validate a nested dict (as read from YAML) into a :class:`Config`; missing keys take defaults
    (a config fastpc stored: ``config_from_dict(upgrade_stored_config(d))``)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"a config must be a mapping with sections {', '.join(_SECTIONS)}, got {type(d).__name__}")
    for k in d:
        if not isinstance(k, str) or k not in _SECTIONS:
            close = difflib.get_close_matches(str(k), list(_SECTIONS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"unknown config section {k!r}; {hint}valid sections: {', '.join(_SECTIONS)}")
    return Config(**{s: _section(s, cls, d.get(s)) for s, cls in _SECTIONS.items()})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" may be overridden key by key
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader itself refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a key may appear once in a mapping)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[str, Any]:
    """``"learner.state_lr=0.3"`` -> ``("learner.state_lr", 0.3)``; the value is read as YAML."""
    if "=" not in item:
        raise UserError(f"--set expects key=value (e.g. learner.iters=10), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in valid_keys():
        raise _unknown_key(key, valid_keys())
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: cannot read value {raw!r} as YAML ({one_line(getattr(e, 'problem', None) or e)})") from None
    return key, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``d`` with ``--set key=value`` items applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
        key, value = parse_override(item)
        section, name = key.split(".", 1)
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][name] = value
    return out


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing or malformed file is a UserError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {one_line(e)}") from None
    try:
        return _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}: "
                        f"{one_line(getattr(e, 'problem', None) or e)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, stored: bool = False) -> Config:
    """Defaults (the quickstart) <- YAML file <- ``--set`` overrides, validated. ``stored``: the
    file is a run's config.yaml, whose renamed keys are read under their new names."""
    d = read_yaml(path) if path is not None else {}
    if stored:
        d = upgrade_stored_config(d)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a mapping with sections {', '.join(_SECTIONS)}")
    for k, v in d.items():  # report unknown sections before overrides touch them
        if k in _SECTIONS and v is not None and not isinstance(v, dict):
            raise UserError(f"config section {k!r} in {path} must be a mapping, got {v!r}")
    return config_from_dict(apply_overrides(d, list(overrides or [])))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (``fastpc.rundir.save_config`` writes it atomically)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
