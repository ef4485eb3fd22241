"""State initializers (PAPERS.md §3) behind a registry.

An initializer turns the feedforward state of a batch into the states inference starts from.
It is an ``nn.Module``: what it remembers across batches lives in buffers (or submodules), so
it travels with ``Learner.to(...)`` and in ``state_dict`` (checkpoints carry it). It sees the
labels ``y`` (label-aware initializers) and, through :meth:`StateInit.observe`, the converged
states after every training step (memory initializers). Its options come from
``make_learner(..., init_options={...})`` or YAML ``learner.init_options``.

Test time stays the FF pass: an initializer only chooses where *training* inference starts
(and where ``learner.infer`` starts); ``net(x)``, ``fastpc eval`` and every reported test
accuracy use the feedforward prediction, which needs no label and no memory.

Registered: ``forward`` (the FF state), ``zeros``, ``normal``, ``previous`` (the previous
batch's converged states, position by position) and ``class_average`` (per class and layer a
running average of converged states; wants label-grouped batches, ``data.grouped``), after
Pinchetti et al. 2026 (PAPERS.md §3).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._registry import check_options, options_of, registrar

__all__ = ["StateInit", "register_init", "make_init", "list_inits", "init_options", "check_init_options",
           "ForwardInit", "ZerosInit", "NormalInit", "PreviousInit", "ClassAverageInit", "class_indices"]


class StateInit(nn.Module, abc.ABC):
    """Base class of every state initializer.

    ``init(ff_states, x, y) -> states``: new tensors (no grad) shaped like ``ff_states``, the
    feedforward states s_1..s_{L-1} of the batch. ``observe(x, y, states)`` is called with the
    converged states after each training step; stateless initializers ignore it.
    """

    name: str = ""
    #: the modes the initializer serves: "discriminative" (an input x, labels y) and/or
    #: "generative" (x None, the data y clamped at the output; the initializer gives the latent s_0)
    modes: tuple[str, ...] = ("discriminative", "generative")
    #: whether :meth:`observe` learns anything (set for each subclass: it overrides ``observe``)
    observes: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.observes = cls.observe is not StateInit.observe

    @abc.abstractmethod
    def forward(
        self, ff_states: Sequence[torch.Tensor], x: torch.Tensor | None, y: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The states inference starts from."""

    def observe(self, x: torch.Tensor | None, y: torch.Tensor | None, states: Sequence[torch.Tensor]) -> None:
        """Called with the converged states after each training step whose weight update
        reached the net and whose states are all finite (a refused step teaches the
        initializer nothing, so it never stores or hands out non-finite states); default:
        nothing."""
        del x, y, states

    def options(self) -> dict[str, Any]:
        """The options this initializer was made with (saved with checkpoints)."""
        return {}


_REGISTRY: dict[str, Callable[..., StateInit]] = {}


def register_init(name: str) -> Callable[[type[StateInit]], type[StateInit]]:
    """Class decorator: ``@register_init("forward")``."""
    return registrar(_REGISTRY, "state initializer", name)


def list_inits() -> list[str]:
    return sorted(_REGISTRY)


def init_options(name: str) -> list[str]:
    """The options initializer ``name`` accepts."""
    return list(options_of(_init_class(name)))


def _init_class(name: str) -> Callable[..., StateInit]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown state init {name!r}; expected one of {list_inits()}")
    return _REGISTRY[name]


def check_init_options(name: str, options: dict[str, Any]) -> None:
    """``ValueError`` unless initializer ``name`` exists and accepts every key of ``options``."""
    check_options("state init", name, _init_class(name), options)


def make_init(name: str | StateInit, **options: Any) -> StateInit:
    """Initializer by name with its options (or an instance passed through, without options)."""
    if isinstance(name, StateInit):
        if options:
            raise ValueError("init_options apply to an initializer given by name, not to an instance")
        return name
    check_init_options(name, options)
    return _REGISTRY[name](**options)


@register_init("forward")
class ForwardInit(StateInit):
    """s_i = f_i(s_{i-1}): the FF state, where every hidden error is 0."""

    def forward(self, ff_states, x, y):
        return [s.detach().clone() for s in ff_states]


@register_init("zeros")
class ZerosInit(StateInit):
    """s_i = 0."""

    def forward(self, ff_states, x, y):
        return [torch.zeros_like(s) for s in ff_states]


@register_init("normal")
class NormalInit(StateInit):
    """s_i ~ N(mean, std²), drawn from torch's global generator (seeded runs reproduce)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        if not (float(std) >= 0 and float(std) < float("inf")) or float(mean) != float(mean):
            raise ValueError(f"normal init needs a finite mean and a finite std >= 0, got mean={mean}, std={std}")
        self.mean, self.std = float(mean), float(std)

    def options(self):
        return {"mean": self.mean, "std": self.std}

    def forward(self, ff_states, x, y):
        return [torch.randn_like(s) * self.std + self.mean for s in ff_states]


class _GrowingBuffers(StateInit):
    """An initializer whose memory is one buffer per hidden layer, ``mem_0 .. mem_{L-2}`` (plus
    what a subclass registers), shaped only when the first batch is observed. Loading a
    ``state_dict`` creates the buffers it holds first, so a fresh initializer takes a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = 0

    def _mem(self) -> list[torch.Tensor]:
        return [getattr(self, f"mem_{i}") for i in range(self.layers)]

    def _set_mem(self, tensors: Sequence[torch.Tensor]) -> None:
        for i in range(len(tensors), self.layers):  # a net with fewer layers than before
            delattr(self, f"mem_{i}")
        for i, t in enumerate(tensors):
            self.register_buffer(f"mem_{i}", t)
        self.layers = len(tensors)

    def _follow(self, device: torch.device) -> None:
        """Keep the memory on the device of the states it stores (a checkpoint loaded on the CPU
        into a learner on another device)."""
        first = next(self.buffers(), None)
        if first is not None and first.device != device:
            self.to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        first = next(self.buffers(), None)
        device = first.device if first is not None else None

        def empty(key: str) -> torch.Tensor:
            t = state_dict[key]
            return torch.empty(t.shape, dtype=t.dtype, device=device or t.device)

        keys = sorted((k for k in state_dict if k.startswith(prefix + "mem_")),
                      key=lambda k: int(k[len(prefix) + 4:]))
        self._set_mem([empty(k) for k in keys])
        for name, buf in list(self._buffers.items()):  # size a lazily sized buffer as the checkpoint's
            if prefix + name in state_dict and buf is not None and not name.startswith("mem_"):
                self.register_buffer(name, empty(prefix + name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_init("previous")
class PreviousInit(_GrowingBuffers):
    """The converged states of the previous training batch, sample by sample at the same
    position in the batch: sample b of this batch starts where sample b of the last observed
    batch ended. Positions the last batch did not have (a larger batch), the very first batch,
    and layers whose per-sample shape differs start from the FF state. Good with full batches,
    noisy with shuffled mini-batches (PAPERS.md §3)."""

    def forward(self, ff_states, x, y):
        out = [s.detach().clone() for s in ff_states]
        if self.layers != len(out):
            return out
        for s, m in zip(out, self._mem()):
            if s.shape[1:] == m.shape[1:]:
                n = min(s.shape[0], m.shape[0])
                s[:n] = m[:n].to(s)
        return out

    def observe(self, x, y, states):
        self._set_mem([s.detach().clone() for s in states])


def class_indices(y: torch.Tensor | None, x: torch.Tensor | None = None) -> torch.Tensor:
    """The class of every sample: ``y`` itself for class indices (B,), ``argmax`` over classes
    for one-hot or dense targets (B, C). ``ValueError`` without labels (``y`` None, generative
    mode ``x`` None, or targets of another shape)."""
    if x is None or y is None:
        raise ValueError("class_average init needs class labels: y as class indices (B,) or one-hot/dense "
                         "targets (B, C), with an input x; got "
                         + ("no input (generative mode)" if x is None and y is not None else "no labels"))
    if y.dim() == 1 and not y.is_floating_point() and not y.is_complex():
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"class_average init needs class indices >= 0, got {int(y.min())}")
        return y.long()
    if y.dim() == 2 and y.is_floating_point():
        return y.argmax(1)
    raise ValueError("class_average init needs class labels: class indices (B,) or one-hot/dense targets "
                     f"(B, C); got a {y.dtype} tensor of shape {tuple(y.shape)}")


@register_init("class_average")
class ClassAverageInit(_GrowingBuffers):
    """Per class c and hidden layer i, a running average a_{c,i} of the converged states of the
    training samples of class c ("stream-aligned average", Pinchetti et al. 2026, PAPERS.md §3).
    A sample of class c starts inference from a_c; a class not observed yet starts from the FF
    state. Labels are needed: class indices, or one-hot/dense targets (argmax).

    Update, per observed batch and class c present in it with k samples whose converged states
    average to m_c (n_c: samples of class c observed before this batch):

    - warm-up, while n_c < ``warmup`` (and always for the first batch of a class): the plain
      running mean of every sample observed so far, a_c ← (n_c·a_c + k·m_c) / (n_c + k);
    - after it, an exponential moving average, one step per batch: a_c ← μ·a_c + (1 − μ)·m_c
      with μ = ``momentum`` (μ = 0: the last batch's class mean).

    ``warmup`` counts samples (default 0: the first batch of a class sets a_c to its mean, then
    the exponential average). With label-grouped batches (``data.grouped: 1``) a batch is one
    class, so one step per batch is one step per chunk of that class. The averages and counts
    are buffers (checkpoints and ``.to()`` carry them); their class dimension grows to the
    largest class seen (or the width of dense targets).
    """

    modes = ("discriminative",)

    def __init__(self, momentum: float = 0.9, warmup: int = 0):
        super().__init__()
        if not (isinstance(momentum, (int, float)) and 0.0 <= float(momentum) < 1.0):
            raise ValueError(f"class_average init needs momentum in [0, 1), got {momentum!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"class_average init needs warmup, an integer >= 0 (samples), got {warmup!r}")
        self.momentum, self.warmup = float(momentum), int(warmup)
        self.register_buffer("count", torch.zeros(0, dtype=torch.long))  # samples observed per class

    def options(self):
        return {"momentum": self.momentum, "warmup": self.warmup}

    def forward(self, ff_states, x, y):
        c = class_indices(y, x)
        out = [s.detach().clone() for s in ff_states]
        if self.layers != len(out) or not out:
            return out
        self._follow(out[0].device)
        c = c.to(self.count.device)
        seen = torch.zeros_like(c, dtype=torch.bool)  # (B,) class observed before
        inside = c < self.count.numel()
        seen[inside] = self.count[c[inside]] > 0
        if not bool(seen.any()):
            return out
        for s, a in zip(out, self._mem()):
            if s.shape[1:] == a.shape[1:]:
                s[seen] = a[c[seen]].to(s)
        return out

    def observe(self, x, y, states):
        c = class_indices(y, x)
        states = [s.detach() for s in states]
        if not states:
            return
        self._follow(states[0].device)
        c = c.to(self.count.device)
        width = max(int(c.max()) + 1, y.shape[1] if y.dim() == 2 else 0)
        if self.layers != len(states) or any(a.shape[1:] != s.shape[1:] for a, s in zip(self._mem(), states)):
            self._set_mem([s.new_zeros((0, *s.shape[1:])) for s in states])  # a new net: start over
            self.count = self.count.new_zeros(0)
        if width > self.count.numel():  # grow the class dimension
            grow = width - self.count.numel()
            self.count = torch.cat([self.count, self.count.new_zeros(grow)])
            self._set_mem([torch.cat([a, a.new_zeros((grow, *a.shape[1:]))]) for a in self._mem()])
        width = self.count.numel()
        k = torch.bincount(c, minlength=width).to(self.count)  # (C,) samples per class in this batch
        present = k > 0
        n = self.count
        warm = present & ((n < self.warmup) | (n == 0))
        ema = present & ~warm
        for a, s in zip(self._mem(), states):
            flat = s.reshape(s.shape[0], -1).to(a)  # (B, D)
            sums = flat.new_zeros((width, flat.shape[1])).index_add_(0, c.to(flat.device), flat)  # (C, D)
            kk = k.to(flat)[:, None]
            mean = sums / kk.clamp(min=1)
            av = a.view(width, -1)
            seen = n.to(flat)[:, None]
            av[warm] = (seen[warm] * av[warm] + sums[warm]) / (seen[warm] + kk[warm])
            av[ema] = self.momentum * av[ema] + (1.0 - self.momentum) * mean[ema]
        self.count += k
