"""From a :class:`Config` to the objects a run uses: seed, device, data, net, optimizer, learner.

Everything here reads the config and returns a ready object; nothing writes files::

    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    loaders = make_run_loaders(cfg, device)
    net = build_net_for(cfg, loaders.info, device, torch.float32)
    learner = build_learner(cfg, net, build_optimizer(cfg, net), steps=len(loaders.train))
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import distributed
from .config import Config
from .errors import UserError
from .learners import Learner, make_learner
from .nets import PCNet, mlp, resnet, vgg
from .optim import MQ

__all__ = ["seed_everything", "resolve_device", "allocating", "build_net", "build_net_for", "build_optimizer",
           "COMPILE_AUTO_STEPS", "resolve_compile", "build_learner", "lr_factor", "make_run_loaders",
           "data_record", "restore_learner"]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device (``auto``: cuda when available; under torchrun ``auto`` and
    ``cuda`` are ``cuda:LOCAL_RANK``, one GPU per process on the node); an unavailable device is a
    UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda:") and distributed.launched():
        raise UserError(f"train.device={name} under torchrun would put every process on one GPU; use "
                        "train.device=cuda or auto (each process takes cuda:LOCAL_RANK)")
    if name == "cuda" and distributed.launched() and torch.cuda.is_available():
        if distributed.local_rank() >= torch.cuda.device_count():
            raise UserError(f"train.device={name} under torchrun: process {distributed.local_rank()} on this node has "
                            f"no GPU of its own ({torch.cuda.device_count()} visible); start at most that many "
                            "processes per node (--nproc_per_node) or use train.device=cpu")
        name = f"cuda:{distributed.local_rank()}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available; use train.device=cpu or auto")
    return torch.device(name)


@contextmanager
def allocating(what: str) -> Iterator[None]:
    """An allocator failure inside (e.g. ``model.width=1e9``) becomes a UserError about ``what``
    naming the model keys that size it."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or "alloc" in str(e).lower() or "out of memory" in str(e).lower()):
            raise
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{what}: not enough memory ({first}); use a smaller model.width, model.widths, "
                        "model.depth or model.width_mult") from None


def build_net(cfg: Config, num_classes: int, in_shape: tuple[int, int, int]) -> PCNet:
    """The PCNet of ``cfg.model``, with input/output sizes from the dataset."""
    m = cfg.model
    c, h, w = in_shape
    try:
        with allocating("model"):
            if m.arch == "mlp":
                hidden = list(m.widths) if m.widths is not None else [m.width] * (m.depth - 1)
                if m.mode == "generative":  # latent → hidden → image pixels
                    return mlp([m.latent, *hidden, c * h * w], act=m.act, init=m.weight_init)
                return mlp([c * h * w, *hidden, num_classes], act=m.act, init=m.weight_init)
            if m.arch == "vgg":
                return vgg(m.name, in_channels=c, num_classes=num_classes, image_size=h,
                           width_mult=m.width_mult, act=m.act, init=m.weight_init)
            return resnet(m.name or "resnet18", in_channels=c, num_classes=num_classes, image_size=h,
                          width_mult=m.width_mult)
    except (ValueError, TypeError) as e:
        raise UserError(f"model: {e}") from None


def build_net_for(cfg: Config, info: Any, device: torch.device, dtype: torch.dtype) -> PCNet:
    """:func:`build_net` for the dataset ``info`` (a ``DatasetInfo``), on ``device`` in ``dtype``."""
    net = build_net(cfg, info.num_classes, info.in_shape)
    with allocating("model"):
        return net.to(device=device, dtype=dtype)


def build_optimizer(cfg: Config, net: PCNet) -> torch.optim.Optimizer:
    """The weight optimizer of ``cfg.optim`` over ``net``'s parameters (Adam/AdamW fused where
    the device and dtype have the fused kernel)."""
    o = cfg.optim
    if o.name == "mq":
        return MQ(net, lr=o.lr, rho_max=0.9999 if cfg.model.arch == "mlp" else 0.999)
    if o.name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    try:  # one fused kernel per step instead of one per parameter
        return cls(net.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return cls(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)


COMPILE_AUTO_STEPS = 40_000  # learner.compile=auto: CPU runs at least this long compile their step


def resolve_compile(setting: bool | str, steps: int, device: torch.device) -> bool:
    """``learner.compile``: true/false as given; auto is true for a CPU run of at least
    ``COMPILE_AUTO_STEPS`` training steps (where compiling pays back; see benchmarks/README.md)
    when torch.compile can build kernels here. Off on CUDA, and off under torchrun (data parallel:
    the compiled step has no place for the line search's collectives, so it runs eagerly;
    ``true`` there is a UserError)."""
    if distributed.launched():
        if setting is True:
            raise UserError("learner.compile=true does not run under torchrun (the compiled step has no "
                            "collectives); use learner.compile=auto or false (the eager step)")
        return False
    if setting != "auto":
        return bool(setting)
    from .learners.compiled import compile_unavailable

    return device.type == "cpu" and steps >= COMPILE_AUTO_STEPS and compile_unavailable(device) is None


def build_learner(cfg: Config, net: PCNet, optimizer: torch.optim.Optimizer | None, steps: int = 0) -> Learner:
    """The configured learner; ``steps`` (planned training steps) decides ``learner.compile: auto``."""
    options = cfg.learner.options()
    if "compile" in options:
        device = next(net.parameters()).device
        options["compile"] = resolve_compile(options["compile"], steps, device)
    try:
        learner = make_learner(cfg.learner.name, net, optimizer=optimizer, precision=cfg.train.precision, **options)
    except (ValueError, TypeError) as e:
        raise UserError(f"learner: {e}") from None
    if cfg.model.mode == "generative" and not (learner.generative and learner.loss == "mse"):
        raise UserError(f"model.mode=generative needs learner.name spc (schedule simultaneous) or epc with "
                        f"learner.loss=mse, got learner.name={cfg.learner.name}, learner.loss={learner.loss}")
    return learner


def lr_factor(cfg: Config, step: int, total: int) -> float:
    """Multiplier of ``optim.lr`` at 0-based ``step`` of ``total`` (per-step schedule)."""
    o = cfg.optim
    if o.schedule == "none":
        return 1.0
    warm = int(o.warmup * total) if o.schedule == "warmup_cosine" else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_run_loaders(cfg: Config, device: torch.device):
    """The train / val / test loaders of ``cfg.data`` (``fastpc.data.Loaders``), seeded by
    ``train.seed``, on ``device``."""
    from .data import make_loaders

    d = cfg.data
    loaders = make_loaders(
        d.name, batch_size=d.batch_size, seed=cfg.train.seed, val_split=d.val_split, root=d.root,
        download=d.download, device=device, augment=d.augment, eval_batch_size=d.eval_batch_size,
        image_size=d.image_size, grouped=d.grouped is not None, classes_per_batch=d.grouped or 1,
        stream=d.stream, workers=d.workers)
    if distributed.world_size() > 1:  # data parallel: each process trains on its part of every batch
        loaders.train.shard(distributed.rank(), distributed.world_size())
    return loaders


def data_record(loaders) -> dict[str, Any]:
    """Which data a run used: dataset, folder, examples per split (summary.json's ``data``)."""
    train, val, test, info = loaders
    return {"name": info.name, "path": str(info.path), "train_examples": train.num_examples,
            "val_examples": val.num_examples if val is not None else 0, "test_examples": test.num_examples}


def restore_learner(learner: Learner, state: dict[str, Any], path: Path, cfg: Config) -> None:
    """Load the checkpoint ``state`` (read from ``path``) into ``learner``; one that does not fit
    the configured model is a UserError."""
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = " ".join(str(e).split())[:300]
        m = cfg.model
        raise UserError(f"checkpoint {path} does not fit the configured model (model.arch={m.arch}, "
                        f"learner.name={cfg.learner.name}): {first}") from None
