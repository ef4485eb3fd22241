"""Typed run configuration: YAML file -> ``--set`` overrides -> validated :class:`Config`.

Five sections, one dataclass each, every field documented. The dataclass defaults *are* the
built-in quickstart (ePC on a 4-layer MLP on Fashion-MNIST for one epoch); ``fastpc/presets/``
holds one preset per experiment. Every problem with user input raises :class:`fastpc.UserError`
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError

__all__ = [
    "Config", "DataConfig", "ModelConfig", "LearnerConfig", "OptimConfig", "TrainConfig",
    "load_config", "config_from_dict", "config_to_dict", "apply_overrides", "parse_override",
    "dump_config", "valid_keys", "RENAMED_KEYS", "upgrade_stored_config",
]

# Keys renamed since fastpc wrote them, old -> new: a config the user gives with an old key is
# refused naming the new one; one fastpc stored is read under the new names (upgrade_stored_config).
RENAMED_KEYS: dict[str, str] = {"model.init": "model.weight_init"}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(key: str, msg: str) -> None:
    raise UserError(f"{key}: {msg}")


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    """Dataset: fashion-mnist, mnist, kmnist, cifar10, cifar100 or imagefolder."""
    root: str | None = None
    """Folder holding the data (searched before $FASTPC_DATA, the cache and system paths)."""
    batch_size: int = 128
    """Training mini-batch size."""
    eval_batch_size: int = 1000
    """Batch size for validation and test evaluation."""
    val_split: float = 0.0
    """Fraction of the training split held out for validation, in [0, 1)."""
    download: bool = True
    """Download (md5-verified) when the data is not found locally."""
    augment: bool | None = None
    """Random crop + flip on training batches; null = on for CIFAR / image folders only."""
    image_size: int | list[int] | None = None
    """Resize every image to this size (an int, or [height, width]); null = as stored. Needed for
    image folders whose images differ in size."""

    def __post_init__(self) -> None:
        from .data.imagefolder import parse_image_size
        from .data.sources import DATASET_NAMES, check_name

        try:
            self.name = check_name(self.name)
        except UserError:
            _choice("data.name", self.name, list(DATASET_NAMES))
        if self.batch_size < 1:
            _fail("data.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            _fail("data.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.val_split < 1.0:
            _fail("data.val_split", f"must be in [0, 1), got {self.val_split}")
        parse_image_size(self.image_size)


@dataclass
class ModelConfig:
    arch: Literal["mlp", "vgg", "resnet"] = "mlp"
    """Architecture family: mlp, vgg or resnet."""
    widths: list[int] | None = None
    """MLP hidden widths, e.g. [128, 128, 128]; input and output sizes come from the dataset.
    null = ``depth - 1`` hidden layers of ``width``."""
    depth: int = 4
    """MLP: number of linear layers (blocks); depth 4 on Fashion-MNIST is 784-128-128-128-10."""
    width: int = 128
    """MLP hidden width used when ``widths`` is null."""
    name: str | None = None
    """vgg: vgg5, vgg7, vgg9 or vgg10; resnet: resnet18 (the default for resnet)."""
    act: str = "gelu"
    """Activation: relu, gelu, tanh, sigmoid, silu, leaky_relu or identity (mlp, vgg)."""
    weight_init: str = "orthogonal"
    """Weight initialisation: orthogonal, kaiming_uniform, gaussian or default (mlp, vgg)."""
    width_mult: float = 1.0
    """Channel multiplier for vgg / resnet (e.g. 0.25 for CPU-sized runs)."""

    def __post_init__(self) -> None:
        from .nets import ACTIVATIONS, VGG_CONFIGS

        if self.widths is not None and (len(self.widths) < 1 or min(self.widths) < 1):
            _fail("model.widths", f"must be a non-empty list of positive integers, got {self.widths}")
        if self.depth < 1:
            _fail("model.depth", f"must be >= 1, got {self.depth}")
        if self.width < 1:
            _fail("model.width", f"must be >= 1, got {self.width}")
        if not 0.0 < self.width_mult <= 64.0:
            _fail("model.width_mult", f"must be in (0, 64], got {self.width_mult}")
        _choice("model.act", self.act, sorted(ACTIVATIONS))
        _choice("model.weight_init", self.weight_init, ["orthogonal", "kaiming_uniform", "gaussian", "default"])
        names = {"vgg": sorted(VGG_CONFIGS), "resnet": ["resnet18"], "mlp": []}[self.arch]
        if self.arch == "vgg" and self.name is None:
            _fail("model.name", f"is required with model.arch=vgg; expected one of {names}")
        if self.name is not None:
            if self.arch == "mlp":
                _fail("model.name", "is only used by vgg and resnet; set it to null for mlp")
            _choice("model.name", self.name, names)


@dataclass
class LearnerConfig:
    name: str = "epc"
    """Learning algorithm, a registered learner: bp, spc or epc (see ``fastpc.list_learners()``)."""
    loss: Literal["ce", "mse"] = "ce"
    """Output cost: ce (cross-entropy) or mse (½‖ŷ − onehot(y)‖²)."""
    iters: int = 5
    """T, inference iterations per batch (ignored by bp)."""
    state_lr: float = 0.1
    """Inference step size (λ for sPC, η_e for ePC)."""
    init: str = "forward"
    """State initializer: forward, zeros, normal, ... (see ``fastpc.list_inits()``)."""
    init_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the state initializer, e.g. {std: 0.5} for normal (see ``fastpc.init.init_options``)."""
    momentum: float = 0.0
    """Momentum of the inference optimizer, in [0, 1)."""
    state_optimizer: Literal["sgd", "adam"] = "sgd"
    """Inference optimizer for spc: sgd or adam."""
    incremental: bool = False
    """spc only: iPC, a weight step after every inference step."""
    rescale: bool = False
    """epc only: divide the weight update by min(1, state_lr·iters), as the reference code does."""
    safeguard: bool | None = None
    """spc/epc: backtracking line search on inference steps, one step size per batch (see ``armijo``);
    null: the learner's default (on for epc, off for spc)."""
    armijo: float | None = None
    """With safeguard: a step must decrease the batch energy by this fraction of the decrease
    its gradient predicts (0: must not rise; 0.99: keeps epc's update aligned with BP);
    null: the learner's default (0.99 for epc, 0 for spc)."""
    compile: bool | Literal["auto"] = "auto"
    """spc/epc on an MLP with init forward: run each training step (FF pass, inference, local
    update) as one torch.compile graph, for batches of the training batch size. Same maths as
    the eager fast path, less time per step after a one-off compile (benchmarks/README.md).
    auto: on for CPU runs of at least 40,000 training steps (where compiling pays back) when a
    C++ compiler is available; off on CUDA (set true to try it)."""

    def __post_init__(self) -> None:
        from .init import list_inits
        from .learners import list_learners

        _choice("learner.name", self.name, list_learners())
        _choice("learner.init", self.init, list_inits())
        from .init import check_init_options

        try:
            check_init_options(self.init, self.init_options)
        except ValueError as e:
            _fail("learner.init_options", str(e))
        if self.iters < 0:
            _fail("learner.iters", f"must be >= 0, got {self.iters}")
        if not self.state_lr > 0:
            _fail("learner.state_lr", f"must be > 0, got {self.state_lr}")
        if not 0.0 <= self.momentum < 1.0:
            _fail("learner.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.armijo is not None and not 0.0 <= self.armijo < 1.0:
            _fail("learner.armijo", f"must be in [0, 1), got {self.armijo}")

    def options(self) -> dict[str, Any]:
        """The options ``make_learner(self.name, ...)`` accepts (others are left out)."""
        from .learners import learner_options

        accepted = learner_options(self.name)
        mine = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        return {k: v for k, v in mine.items() if k in accepted and v is not None}


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "mq"] = "adamw"
    """Weight optimizer: adamw, adam, sgd or mq (fastpc.optim.MQ; lr is its α; ρ cap as the paper's)."""
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    momentum: float = 0.9
    """sgd momentum, in [0, 1)."""
    nesterov: bool = False
    """sgd Nesterov momentum (needs momentum > 0)."""
    schedule: Literal["none", "cosine", "warmup_cosine"] = "cosine"
    """Per-step learning-rate schedule: none, cosine, or warmup_cosine (linear warm-up, then cosine)."""
    warmup: float = 0.0
    """warmup_cosine: fraction of all training steps spent warming up, in (0, 1)."""
    min_lr_ratio: float = 0.0
    """cosine schedules decay to lr × min_lr_ratio, in [0, 1]."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            _fail("optim.lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            _fail("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            _fail("optim.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            _fail("optim.nesterov", "needs optim.name=sgd and optim.momentum > 0")
        if self.schedule == "warmup_cosine" and not 0.0 < self.warmup < 1.0:
            _fail("optim.warmup", f"must be in (0, 1) with schedule warmup_cosine, got {self.warmup}")
        if self.schedule != "warmup_cosine" and self.warmup != 0:
            _fail("optim.warmup", f"is only used by schedule warmup_cosine (schedule is {self.schedule})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training split."""
    seed: int = 0
    """Seeds torch, numpy, python and the data order; a fixed seed reproduces bit for bit on CPU."""
    device: str = "cpu"
    """cpu, cuda, cuda:N, mps, or auto (cuda when available)."""
    out: str | None = None
    """Run folder; null = runs/<date>-<time>-<learner>-<arch>."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter and data precision."""
    checkpoint_every: int = 1
    """Write checkpoints/last.pt every this many epochs (and always after the last); 0 = only at the end."""
    max_energy: float = 1.0e6
    """Stop as diverged when a step's loss or energy per example is not finite or exceeds this."""
    progress: bool = True
    """Show a tqdm progress bar per epoch."""
    threads: int | None = None
    """CPU threads for torch (``torch.set_num_threads``); null = torch's default."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            _fail("train.epochs", f"must be >= 1, got {self.epochs}")
        if self.out is not None and not self.out.strip():
            _fail("train.out", "must be a folder path or null (a new folder under runs/), got an empty string")
        if not 0 <= self.seed < 2**63:
            _fail("train.seed", f"must be in [0, 2**63), got {self.seed}")
        dev = self.device.split(":")
        if dev[0] not in ("cpu", "cuda", "mps", "auto") or len(dev) > 2 or (len(dev) == 2 and not dev[1].isdigit()):
            _fail("train.device", f"must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")
        if self.checkpoint_every < 0:
            _fail("train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if not self.max_energy > 0:
            _fail("train.max_energy", f"must be > 0, got {self.max_energy}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            _fail("train.threads", f"must be in [1, 1024] or null, got {self.threads}")


@dataclass
class Config:
    """A full run: data, model, learner, weight optimizer, training loop."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def valid_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. ``learner.state_lr``."""
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _choice(key: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(key, f"unknown value {value!r}{hint}; expected one of {', '.join(choices)}")


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
        _fail(key, f"expected one of {', '.join(names)}, got {value!r}")
    if origin is Literal:
        choices = list(typing.get_args(tp))
        if not isinstance(value, str):
            _fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        _choice(key, value, choices)
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            _fail(key, f"expected a mapping of option names to values, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            _fail(key, f"expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**1000:
            _fail(key, f"number out of range: {value}")
        value = float(value)
        if not math.isfinite(value):
            _fail(key, f"expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
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
        raise UserError(f"--set {key}: cannot read value {raw!r} as YAML ({_one_line(getattr(e, 'problem', None) or e)})") from None
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
        raise UserError(f"cannot read config file {path}: {_one_line(e)}") from None
    try:
        return _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}: "
                        f"{_one_line(getattr(e, 'problem', None) or e)}") from None


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
