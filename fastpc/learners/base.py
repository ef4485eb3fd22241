"""The Learner contract every algorithm implements (DESIGN.md).

A learner owns a PCNet, an output loss and (optionally) a torch optimizer over the net's
parameters. Per batch it

1. runs the feedforward pass (this is also the test-time prediction, and the only pass that
   updates batch-norm running statistics),
2. ``infer``: relaxes its variables (states, errors, nudged phases, ...) to an
   :class:`Equilibrium`,
3. ``grads``: turns the equilibrium into the weight gradients ``step`` hands the optimizer,
4. ``step``: applies them.

Subclasses implement ``_relax`` (step 2 from the FF state) and may override ``_weight_grads``
(step 3; the default is the local PC update of PAPERS.md §0, shared by sPC, ePC and EP).
Hooks that later algorithms use without reshaping the contract:

- ``init`` is a :class:`fastpc.init.StateInit` that sees ``y`` (label-aware initializers) and
  observes converged states (memory initializers);
- ``Equilibrium.phases`` carries extra equilibria (EP's ±β nudged phases);
- ``Equilibrium.output`` is the output at equilibrium, a free state when a learner treats it so.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import distributed
from .. import energy as E
from ..init import StateInit, make_init
from ..nets import PCNet, frozen_batchnorm_stats
from ..precision import check_precision, forward_in
from ..runtime import by_device_and_dtype, constant, read_pair

__all__ = ["Equilibrium", "StepResult", "Learner", "check_option"]


@dataclass
class Equilibrium:
    """Where inference ended.

    states: final hidden states s_1 .. s_{L-1} (detached); generative mode (x=None): s_0 .. s_{L-1},
    ``states[0]`` the latent.
    output: the output at the final states, f_L(s_{L-1}) (or the output state).
    energy: total energy E at the final states, summed over the batch (scalar tensor).
    iters: inference iterations run.
    trace: (iters + 1,) total energy before every iteration and at the end, when traced.
    layer_trace: (iters + 1, L) per-layer energies [½‖ε_1‖², …, ½‖ε_{L-1}‖², ℓ] likewise;
    generative mode: (iters + 1, L + 1), the latent's prior ½·prior·‖s_0‖² first.
    grad_trace: (iters + 1,) ‖∇E‖ over the inference variables likewise (the distance to
    equilibrium), when traced by a learner that descends an energy.
    phases: extra named equilibria (e.g. EP's "+beta" / "-beta"), empty otherwise.
    """

    states: list[torch.Tensor]
    output: torch.Tensor
    energy: torch.Tensor
    iters: int
    trace: torch.Tensor | None = None
    layer_trace: torch.Tensor | None = None
    grad_trace: torch.Tensor | None = None
    phases: dict[str, "Equilibrium"] = field(default_factory=dict)


@dataclass
class StepResult:
    """One training step.

    loss: batch-mean output cost of the feedforward prediction (what test time sees).
    output: feedforward output (logits), detached — accuracy comes from it.
    energy: final inference energy divided by the batch size.
    equilibrium: the Equilibrium the update came from.
    smm: sequential matrix multiplications the step cost (:meth:`Learner.smm` of the
    iterations actually run); None for a learner without a count.
    """

    loss: torch.Tensor
    output: torch.Tensor
    energy: torch.Tensor
    equilibrium: Equilibrium
    smm: int | None = None


def check_option(cond: bool, msg: str) -> None:
    """``ValueError(msg)`` unless ``cond``: a learner option that does not hold."""
    if not cond:
        raise ValueError(msg)


_READ_ONLY = 1 << 16  # entries from which a tensor is checked by a read-only reduction


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite. A large CPU tensor (≥ 65,536 entries) is
    read once by ``aminmax`` (NaN propagates); the rest go through one foreach pass per device
    and dtype (torch's AMP check, with an unscale by 1, which changes no value but writes every
    entry back: on a large CPU gradient that write costs more than the read; on a GPU one pass
    and one host read beat a read per tensor), one host read each."""
    rest = []
    for t in tensors:
        if t.numel() < _READ_ONLY or t.device.type != "cpu":
            rest.append(t)
        elif not _finite(t):
            return False
    if not rest:
        return True
    for (device, _), ts in by_device_and_dtype(rest).items():
        found = torch.zeros(1, dtype=torch.float32, device=device)  # the AMP kernel takes a float32 flag
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found, constant((1.0,), torch.float32, device))
        if found.item():
            return False
    return True


def _ordinary(t: Any) -> Any:
    """``t``, copied outside inference mode when it is an inference tensor (an ordinary tensor
    the learner may save for autograd or keep)."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def _finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (NaN propagates through aminmax)."""
    lo, hi = read_pair(torch.aminmax(t))
    return math.isfinite(lo) and math.isfinite(hi)



_NARROW_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32)  # class indices taken as int64


class Learner(abc.ABC):
    """Base class of every learning algorithm. See the module docstring for the contract."""

    name: str = ""

    def __init__(
        self,
        net: PCNet,
        loss: str = "ce",
        optimizer: torch.optim.Optimizer | None = None,
        init: str | StateInit = "forward",
        init_options: dict[str, Any] | None = None,
        precision: str = "fp32",
    ):
        if not isinstance(net, PCNet):
            raise TypeError(f"a learner needs a fastpc.PCNet, got {type(net).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if init_options is not None and not isinstance(init_options, dict):
            raise TypeError(f"init_options must be a dict, got {type(init_options).__name__}")
        if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
            raise ValueError("the net's parameters are on the meta device (shapes without data); materialise them "
                             "first (net.to_empty(device=...) and initialise, or build the net on 'cpu'/'cuda')")
        self.net = net
        # the first parameter, for the door's dtype/device test (``.to()`` and ``.double()`` change it
        # in place; a replaced parameter object needs a new learner, as the block ops do)
        self._first_param = next(net.parameters(), None)
        self.loss = E.check_loss(loss)
        self.optimizer = optimizer
        self.init = make_init(init, **(init_options or {}))
        p = next(net.parameters(), None)
        self.precision = check_precision(precision, None if p is None else p.dtype)  # fastpc.precision

    # ---- public API -------------------------------------------------------------------
    def infer(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        trace: bool = False,
        callback: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
    ) -> Equilibrium:
        """Run inference on a batch (no weight change) and return the equilibrium.

        ``trace=True`` records the total and per-layer energy at every iteration.
        ``callback(t, states)`` is called after iteration t with the current hidden states
        (detached; for ePC rebuilt from the errors); returning True stops inference early.
        ``x=None`` (generative mode, learners with ``generative``): s_0 is free and ``y`` is the
        data, a dense tensor shaped like the output, clamped by the loss ``mse``.
        """
        with self._entered(x, y) as (x, y):
            return self._infer(x, y, trace, callback)

    def grads(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference + the weight gradients ``step`` would apply, without applying them."""
        with self._entered(x, y) as (x, y):
            return self._grads(x, y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Inference + one weight update with the learner's optimizer."""
        with self._entered(x, y) as (x, y):
            return self._step(x, y)

    # ---- what the public calls run (subclasses override these, not the public names) ----
    def _infer(self, x, y, trace=False, callback=None) -> Equilibrium:
        ff_states, out, y = self._start(x, y)
        return self._relax(x, y, ff_states, out, trace, callback)

    def _grads(self, x, y) -> dict[str, torch.Tensor]:
        ff_states, out, y = self._start(x, y)
        eq = self._relax(x, y, ff_states, out, False)
        self.net.zero_grad(set_to_none=True)
        self._weight_grads(x, y, eq)
        named = {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.net.zero_grad(set_to_none=True)
        return named

    def _step(self, x, y) -> StepResult:
        self._check_optimizer()
        ff_states, out, y = self._start(x, y)
        eq = self._relax(x, y, ff_states, out, False)
        self.optimizer.zero_grad(set_to_none=True)
        if x is None:  # generative: the reconstruction at the converged latent
            out = eq.output
        cost = self._output_cost(out, y).detach()  # before _weight_grads releases buffers
        self._weight_grads(x, y, eq)
        self._observe(x, y, eq, self._apply_update())
        return self._step_result(cost, out, eq)

    #: whether the learner's computation may run under an ambient ``torch.autocast`` (bp: its
    #: forward and backward are autograd's, which autocast serves); the others keep their
    #: precision in the ``precision`` option and refuse an ambient autocast
    runs_under_autocast: bool = False

    @contextlib.contextmanager
    def _entered(self, x: Any, y: Any) -> Iterator[tuple[Any, Any]]:
        """The public calls' common entry: the learner runs the same under the global torch
        state a caller may hold around it.

        - ``torch.inference_mode()``: the call runs outside it (on copies of ``x`` and ``y``
          when they are inference tensors), so buffers the learner keeps for the next batch
          are ordinary tensors and a later call outside inference mode can write them;
        - ``torch.no_grad()``: each learner enables autograd where it needs it;
        - ``torch.autocast`` on the net's device: ``ValueError`` for a learner that sets its
          precision itself (``precision='bf16'``), since ops under it would mix dtypes.
        """
        p = self._first_param
        device = "cpu" if p is None else p.device.type
        if not self.runs_under_autocast and device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            raise ValueError(f"learner {self.name!r} ran inside torch.autocast({device!r}); its precision is an "
                             "option: make it with precision='bf16' (YAML train.precision: bf16) and call it "
                             "outside autocast")
        if not torch.is_inference_mode_enabled():
            yield x, y
            return
        with torch.inference_mode(False):
            yield _ordinary(x), _ordinary(y)

    def _observe(self, x: torch.Tensor | None, y: torch.Tensor, eq: Equilibrium, applied: bool) -> None:
        """The initializer learns from a step only when the step's weight update reached the net
        (``applied``, the verdict of :meth:`_apply_update`) and its converged states are finite:
        a refused step (an overflowing batch) must not leave non-finite states in its memory."""
        if self.init.observes and applied and _all_finite(list(eq.states)):
            self.init.observe(x, y, eq.states)

    def smm(self, iters: int) -> int | None:
        """Sequential matrix multiplications (SMM, PAPERS.md §0 and §3) of one training step
        that ran ``iters`` inference iterations: the products that must run one after another
        on the path to the weight gradients (products of different layers that do not depend
        on each other run in parallel and count once). Each learner states its own count
        (bp 2L − 1, spc 2T, epc 2(L − 1)T, ...); as in the paper, neither the state
        initialisation (the FF pass of ``forward`` init; a table look-up for
        ``class_average``/``previous``) nor the final, layer-parallel weight-gradient product
        is counted. None (this default): no count for this learner."""
        del iters
        return None

    def to(self, *args: Any, **kwargs: Any) -> "Learner":
        """Move (or cast) the net and the initializer's state like ``nn.Module.to``; returns
        the learner. Make the optimizer after moving, as with any torch module."""
        self.net.to(*args, **kwargs)
        self.init.to(*args, **kwargs)
        return self

    def options(self) -> dict[str, Any]:
        """The learner's hyperparameters (saved with checkpoints)."""
        return {"loss": self.loss, "init": self.init.name, "init_options": self.init.options(),
                "precision": self.precision}

    def state_dict(self) -> dict[str, Any]:
        """Net, optimizer and initializer state."""
        return {
            "learner": self.name,
            "options": self.options(),
            "net": self.net.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "init": self.init.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("learner") != self.name:
            raise ValueError(f"state of learner {state.get('learner')!r} cannot load into {self.name!r}")
        self.net.load_state_dict(state["net"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.init.load_state_dict(state.get("init", {}))

    # ---- the learner's door and the one update path -------------------------------------
    skipped_updates: int = 0  # steps whose gradient was not finite (the weights were kept)
    _batch: int = 0  # examples in the batch the door last let in (data parallel: this rank's part)
    generative: bool = False  # whether x=None (a free latent s_0, the data y clamped at the output) works

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            raise ValueError("step() needs an optimizer: pass optimizer=... to make_learner")

    def _check_input(self, x: torch.Tensor, values: bool = True) -> None:
        """``ValueError``/``TypeError`` unless ``x`` is a non-empty, finite floating batch in
        the net's dtype and on its device; ``None`` (generative mode) only for a learner that
        has one. ``values=False``: the caller checks finiteness itself (:meth:`_check_finite`)."""
        if x is None and not self.generative:
            raise ValueError(f"x is None (generative mode), which learner {self.name!r} does not support "
                             "with these options; spc (schedule 'simultaneous') and epc do; or pass an input batch x")
        if x is None:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch (B, ...), got {type(x).__name__}")
        p = self._first_param
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty batch (B, ...) with B >= 1 and at least one feature dimension "
                             f"(one example: x[None]), got shape {tuple(x.shape)}")
        if p is not None and (x.dtype != p.dtype or x.device != p.device):
            raise TypeError(f"x must have the net's dtype and device ({p.dtype}, {p.device}), got ({x.dtype}, {x.device})")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        if values:
            self._check_finite(x)
        self._batch = x.shape[0]

    def _check_finite(self, x: torch.Tensor, proxy: torch.Tensor | None = None) -> None:
        """``ValueError`` if ``x`` holds NaN or inf. ``proxy``: a tensor that is finite only if
        ``x`` is (the first Linear's output on it, smaller), read first; ``x`` itself only when
        ``proxy`` is not finite (a bad x, or a product that overflowed, which is not refused)."""
        if proxy is not None and _finite(proxy):
            return
        if not _finite(x):
            raise ValueError("x holds NaN or inf")

    def latent_size(self) -> int:
        """Generative mode: the width of the latent s_0, the input width of the net's first
        Linear; ``ValueError`` for a net that does not start with one."""
        first = next((m for m in self.net.blocks[0].modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
        if not isinstance(first, nn.Linear):
            raise ValueError("generative mode (x=None) needs a net whose first block starts with an nn.Linear "
                             "(the latent s_0 is its input), e.g. fastpc.mlp([latent, ..., pixels])")
        return first.in_features

    def _check_data(self, y: torch.Tensor) -> None:
        """Generative mode's door: ``y`` the data, a dense floating batch in the net's dtype and
        on its device, clamped with loss mse (the output shape is checked after the FF pass)."""
        if self.loss != "mse":
            raise ValueError(f"generative mode (x=None) clamps the data y at the output with loss 'mse', got {self.loss!r}")
        if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() < 2 or y.shape[0] == 0:
            got = f"dtype {y.dtype}, shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"generative mode (x=None) takes the data y as a dense floating batch shaped like the "
                             f"output (B, ...), not class indices; got {got}")
        p = self._first_param
        if y.dtype != p.dtype or y.device != p.device:
            raise TypeError(f"y must have the net's dtype and device ({p.dtype}, {p.device}), got ({y.dtype}, {y.device})")
        self._batch = y.shape[0]

    def _check_target(self, y: torch.Tensor, out: torch.Tensor, index_range: bool = False) -> torch.Tensor:
        """``y`` as the energy takes it (integer class indices as int64), or a clear error. The
        range of CPU class indices is checked where the step makes their one-hot (before
        anything changes; :func:`fastpc.energy.one_hot`) unless ``index_range``."""
        if isinstance(y, torch.Tensor) and y.dtype in _NARROW_INTS:
            y = y.long()
        E.check_target(y, out.shape, self.loss, index_range)
        if y.device != out.device:
            raise ValueError(f"y must be on the net's device {out.device}, got {y.device}")
        return y

    def _apply_update(self) -> bool:
        """The one place where a weight update reaches the net: every learner's ``step`` ends
        here, with the gradients in ``p.grad`` (data-parallel averaging, clipping and loss
        scaling belong here). A non-finite gradient is dropped, the weights kept and
        ``skipped_updates`` counted; returns whether the optimizer stepped.

        Data parallel (torchrun, :mod:`fastpc.distributed`): every rank's gradient, the batch
        mean over its part of the batch, becomes the global batch's mean here, one flattened
        all_reduce (:func:`~fastpc.distributed.average_gradients`); the finiteness test runs
        after it, on the same numbers everywhere, so every rank skips the same steps. Not torch's
        DistributedDataParallel wrapper: it reduces from autograd hooks, and the PC learners
        write their analytic gradients into ``p.grad`` without autograd, so its hooks never fire
        (and bp would reduce twice)."""
        opt = self.optimizer
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        distributed.average_gradients(grads, self._batch)
        if grads and not _all_finite(grads):
            opt.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            return False
        opt.step()
        # the fused Adam/AdamW kernels change the weights in place without bumping their version
        # counters, which is how caches of the weights (bf16's copies, fastpc.precision) see a change
        torch.autograd.graph.increment_version([p for g in opt.param_groups for p in g["params"]])
        return True

    # ---- pieces subclasses compose ----------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.net.blocks

    def _start(self, x: torch.Tensor | None, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(FF states, FF output, checked ``y``): where inference starts."""
        ff_states, out = self._feedforward(x)
        return ff_states, out, self._check_target(y, out)

    def _feedforward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """FF pass without autograd; the one pass that updates batch-norm running stats."""
        self._check_input(x)
        with torch.no_grad():
            return self._fitting(x, lambda x: forward_in(self.precision, self.net.forward_states, x))

    def _fitting(self, x: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> Any:
        """``fn(x)`` (a forward pass), with a shape mismatch inside the net reported as the
        input's ``ValueError``."""
        try:
            return fn(x)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if any(k in first for k in ("shape", "size", "dimension", "mat1", "Expected", "expected")):
                raise ValueError(f"x of shape {tuple(x.shape)} does not fit the net ({first})") from e
            raise

    @abc.abstractmethod
    def _relax(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ff_states: list[torch.Tensor],
        out: torch.Tensor,
        trace: bool,
        callback: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
    ) -> Equilibrium:
        """Inference from the FF state (``callback`` as in :meth:`infer`)."""

    def _step_result(self, cost: torch.Tensor, out: torch.Tensor, eq: Equilibrium) -> StepResult:
        """A step's result from the FF output's summed cost and the equilibrium, per example."""
        B = out.shape[0]
        return StepResult(loss=cost.detach() / B, output=out.detach(), energy=eq.energy.detach() / B,
                          equilibrium=eq, smm=self.smm(eq.iters))

    def _output_cost(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ(out, y) summed over the batch (``E.output_cost``)."""
        return E.output_cost(out, y, self.loss)

    def _weight_scale(self, B: int) -> float:
        """Factor applied to the local energy's gradient (1/B: batch-mean)."""
        return 1.0 / B

    def _weight_grads(self, x: torch.Tensor, y: torch.Tensor, eq: Equilibrium) -> None:
        """Accumulate the local PC update (PAPERS.md §0) into ``p.grad``."""
        with frozen_batchnorm_stats(self.net), torch.enable_grad():
            e_local = E.local_energy(self.blocks, x, eq.states, y, self.loss)
            (e_local * self._weight_scale(y.shape[0])).backward()
