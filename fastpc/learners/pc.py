"""What every iterative-inference PC learner (sPC, ePC) shares, over the block operations of
its net (:mod:`fastpc.blocks`).

- :class:`~fastpc.learners.chain.NetOps` (:mod:`fastpc.learners.chain`): the ops of each block,
  made once per net (``fast``: analytic where a block has them, the autograd fallback
  elsewhere; ``fast=False``: the fallback for every block); :class:`~fastpc.learners.chain.Chain`:
  one batch on those ops (each block's latest tape, a count of the calls:
  :attr:`ChainLearner.last_flops`);
- :class:`ChainRelaxation`: the part of a learner's energy every PC learner has (output cost and
  ∂ℓ/∂ŷ from one log-softmax, stacked hidden errors, per-layer energies, and the local weight
  update of PAPERS.md §0 from the tapes inference left);
- :class:`PCLearner`: the options, the feedforward pass on the ops (its tapes seed inference:
  the clamped input's prediction is computed once per batch), inference through
  :func:`fastpc.learners.descent.minimize`, and the compiled step
  (:mod:`fastpc.learners.compiled`) over the learner's own step core.

A learner adds its energy's variables and gradient (a :class:`ChainRelaxation` subclass made by
``_problem``). Generative mode (``x=None``, spc and epc): the chain's input s_0 is free, the first
variable; the initializer gives s_0 (``forward`` has no input to run: s_0 = 0, as ``zeros``), the
hidden states start at the FF pass from it, and the energy adds the prior ½·prior·‖s_0‖². Batch norm: only the feedforward pass updates running statistics.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from typing import Any, NamedTuple

import torch

from .. import energy as E
from ..init import ForwardInit
from ..nets import frozen_batchnorm_stats
from ..runtime import constant
from . import compiled
from .base import Equilibrium, Learner, StepResult, check_option
from .chain import Chain, NetOps
from .descent import AfterStep, Descent, Minimized, Relaxation, Stack, Workspace, dot, minimize

__all__ = ["ChainRelaxation", "ChainLearner", "PCLearner", "StepCore"]


class ChainRelaxation(Relaxation):
    """The energy E = Σ_i ½‖ε_i‖² + ℓ(ŷ, y) of a chain, as every PC learner has it. Subclasses
    set ``v`` and ``err`` (the stacked hidden errors ε_1..ε_{L-1}) and keep ``nz``: the first
    hidden layer (1-based) whose error may be non-zero; the errors below it are exactly zero."""

    err: Stack
    nz: int = 1
    latent: torch.Tensor | None = None  # generative mode: the free s_0 (a view of v), with its prior
    prior: float = 0.0

    def __init__(self, chain: Chain, target: torch.Tensor, loss: str, whole: bool):
        self.chain, self.target, self.loss, self.whole = chain, target, loss, whole
        self.L = len(chain.tapes)
        self._lsm = self._cost = self._dout = None

    @property
    def output(self) -> torch.Tensor:
        return self.chain.tapes[-1].out

    def _output_changed(self) -> None:
        self._lsm = self._cost = self._dout = None

    def _log_softmax(self) -> torch.Tensor:
        if self._lsm is None:
            self._lsm = E.log_softmax(self.output)
        return self._lsm

    def cost(self) -> torch.Tensor:
        """ℓ(ŷ, y) summed over the batch (ce: from the log-softmax :meth:`out_grad` shares)."""
        if self._cost is None:
            if self.loss == "ce":
                self._cost = E.ce_cost(self._log_softmax(), self.target)
            else:
                self._cost = E.output_cost(self.output, self.target, self.loss)
        return self._cost

    def out_grad(self) -> torch.Tensor:
        """∂ℓ/∂ŷ: softmax − t for ce (exp of the log-softmax when :meth:`energy` made one at
        this output), ŷ − t for mse."""
        if self._dout is None:
            if self.loss == "ce" and self._lsm is not None:
                self._dout = self._lsm.exp().sub_(self.target)
            else:
                self._dout = E.output_cost_grad(self.output, self.target, self.loss)
        return self._dout

    def energy(self) -> torch.Tensor:
        tail = self.err.tail(self.err.offsets[self.nz - 1])  # per tensor: none when every error is zero
        e = (dot(tail, tail).mul_(0.5) if tail else self.output.new_zeros(())).add_(self.cost())
        return e if self.latent is None else e.add_(E.latent_prior(self.latent, self.prior))

    def parts(self) -> torch.Tensor:
        # the cost as energy() left it, else computed aside (a trace does not change out_grad)
        cost = self._cost if self._cost is not None else E.output_cost(self.output, self.target, self.loss)
        pieces = self.err.pieces()
        zero = self.output.new_zeros(()) if self.nz > 1 else None  # ‖ε_i‖² below nz: exactly zero
        hidden = [torch.dot(e, e) if i + 1 >= self.nz else zero for i, e in enumerate(pieces)]
        head = [] if self.latent is None else [E.latent_prior(self.latent, 2.0 * self.prior)]
        # (½ each squared norm and the head's 2·prior term, the cost itself): one multiply
        halves = constant((0.5,) * (len(head) + len(hidden)) + (1.0,), cost.dtype, cost.device)
        return torch.stack([*head, *hidden, cost]).mul_(halves)

    def final_states(self) -> list[torch.Tensor]:
        """The states to hand out: tensors no later inference writes into."""
        return self.states()

    def weight_grads(self, scale: float) -> None:
        """Add scale × ∇_θ E_local into ``p.grad`` (PAPERS.md §0) from the tapes at the current
        states: −(∂f_k/∂θ)ᵀ ε_{k+1} per hidden block, (∂f_L/∂θ)ᵀ ∂ℓ/∂ŷ for the output block."""
        self.forward()
        chain = self.chain
        for k in range(self.L - 1):
            if k + 1 < self.nz:
                chain.zero_weight_grads(k)
            else:
                chain.weight_grads(k, self.err.views[k], -scale)
        chain.weight_grads(self.L - 1, self.out_grad(), scale)


class StepCore(NamedTuple):
    """What a step core hands back: FF output and its cost, the final states, output and
    per-layer energies, one gradient per parameter of the net (None: none), the call counts."""

    out: torch.Tensor
    cost: torch.Tensor
    states: list[torch.Tensor]
    output: torch.Tensor
    parts: torch.Tensor
    grads: list[torch.Tensor | None]
    calls: list[int]


class ChainLearner(Learner):
    """Base of the learners whose inference runs on the block operations of their net (sPC,
    ePC, EP): the ops made once per net, the feedforward pass on them (its tapes seed
    inference), batch-norm statistics frozen around inference and the update.

    ``fast``: ``"auto"`` (default) runs every block on its analytic ops where it has them and on
    the autograd fallback elsewhere; ``True`` requires analytic ops for every block
    (``ValueError`` naming the blocks otherwise); ``False`` runs every block on the autograd
    fallback (the reference). The same inference loop runs either way. ``precision`` "bf16":
    the bf16 ops of :func:`~fastpc.precision.bf16_ops` (analytic or autograd as ``fast`` says;
    no compiled step).
    """

    _flops_of: tuple | None = None  # (NetOps, calls, input shapes) of the last step, counted when asked

    @property
    def last_flops(self) -> int | None:
        """Matmul/conv FLOPs of the last step's block calls (None before a step, or when a block
        cannot count them); counted from the step's call counts when read."""
        if self._flops_of is None:
            return None
        netops, calls, shapes = self._flops_of
        return netops.flops(calls, shapes)

    def __init__(self, net, loss, optimizer, init, init_options, fast: bool | str, precision: str = "fp32"):
        super().__init__(net, loss=loss, optimizer=optimizer, init=init, init_options=init_options,
                         precision=precision)
        check_option(fast in (True, False, "auto"), f"fast must be True, False or 'auto', got {fast!r}")
        self.fast = fast
        self._ops: dict[bool, NetOps] = {}
        self._chain: Chain | None = None  # the batch of the last feedforward pass
        self._last: tuple[Equilibrium, Any] | None = None  # the last relax and what the update needs of it
        self._workspace = Workspace()  # inference's scratch buffers, reused from batch to batch
        if fast is True and (why := self.fast_unsupported()) is not None:
            raise ValueError(f"fast=True but {why}; use fast='auto' to run those blocks on the autograd fallback")

    def _netops(self, plain: bool = False) -> NetOps:
        ops = self._ops.get(plain)
        if ops is None or ops.block_ids != tuple(id(b) for b in self.net.blocks):
            ops = self._ops[plain] = NetOps(self.net.blocks, self.fast, plain, self.precision)
        return ops

    def _frozen(self, netops: NetOps) -> contextlib.AbstractContextManager:
        """``frozen_batchnorm_stats`` around inference and the weight update (nothing to freeze
        in a net without batch norm)."""
        return frozen_batchnorm_stats(self.net) if netops.has_batchnorm else contextlib.nullcontext()

    def fast_unsupported(self) -> str | None:
        """Why not every block runs on analytic ops (None: every block does)."""
        if self.fast is False:
            return "fast=False"
        rest = self._netops().fallbacks()
        return None if not rest else f"{', '.join(rest)} ha{'s' if len(rest) == 1 else 've'} no analytic ops"

    @property
    def uses_fast_path(self) -> bool:
        """Whether every block runs on its analytic ops."""
        return self.fast is not False and self._netops().analytic

    def _feedforward(self, x):
        netops = self._netops()
        self._check_input(x, values=not netops.linear_first)
        chain = Chain(netops, x, self._workspace)
        with torch.no_grad():
            states, out = self._fitting(x, lambda x: chain.feedforward())
        if netops.linear_first:
            self._check_finite(x, chain.tapes[0].pre)
        self._chain, self._last = chain, None
        return states, out


class PCLearner(ChainLearner):
    """Base of the learners that relax an energy of the states by gradient descent and then
    apply the local weight update (sPC, ePC). ``fast``: see :class:`ChainLearner`.
    ``compile=True``: ``step`` runs :meth:`_step_core` as one compiled graph when every block has
    analytic ops and the states start from the FF pass, for batches of the first batch's size.
    """

    compile_failed: str | None = None  # why the compiled step was given up (then eager)

    def __init__(self, net, loss, optimizer, init, init_options, *, iters: int, state_lr: float, momentum: float,
                 safeguard: bool, armijo: float, fast: bool | str, compile: bool, state_optimizer: str = "sgd",
                 tol: float | None = None, armijo_steps: int = 20, prior: float = 1.0, precision: str = "fp32"):
        super().__init__(net, loss, optimizer, init, init_options, fast, precision)
        check_option(isinstance(iters, (int, float)) and int(iters) == iters and iters >= 0,
                     f"iters must be an integer >= 0, got {iters!r}")
        check_option(isinstance(state_lr, (int, float)) and math.isfinite(state_lr) and state_lr > 0,
                     f"state_lr must be a finite number > 0, got {state_lr!r}")
        check_option(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        check_option(0 <= armijo < 1, f"armijo must be in [0, 1), got {armijo}")
        check_option(compile in (True, False), f"compile must be True or False, got {compile!r}")
        self.iters, self.state_lr, self.momentum = int(iters), float(state_lr), float(momentum)
        self.safeguard, self.armijo, self.state_optimizer = bool(safeguard), float(armijo), state_optimizer
        check_option(tol is None or (isinstance(tol, (int, float)) and 0 <= tol < 1),
                     f"tol must be a number in [0, 1) or None, got {tol!r}")
        check_option(isinstance(armijo_steps, int) and armijo_steps >= 0,
                     f"armijo_steps must be an integer >= 0, got {armijo_steps!r}")
        self.tol, self.armijo_steps = (None if tol is None else float(tol)), int(armijo_steps)
        check_option(isinstance(prior, (int, float)) and math.isfinite(prior) and prior >= 0,
                     f"prior must be a finite number >= 0, got {prior!r}")
        self.prior = float(prior)
        self.descent  # noqa: B018 - validates the combination
        if self.precision == "bf16" and self.safeguard and self.armijo >= 0.9 and \
                (why := self.fast_unsupported()) is not None:
            warnings.warn(f"fastpc: precision 'bf16' with armijo={self.armijo}: {why}; the bf16 autocast ops round "
                          "such a block's input to 8 bits, steps below that do not lower the energy and the Armijo "
                          "test rejects them all; use analytic blocks (fast='auto'), armijo <= 0.5 or "
                          "safeguard=False (benchmarks/README.md, bench precision)", RuntimeWarning, stacklevel=4)
        self.compile = bool(compile)
        self._compiled: tuple | None = None  # (key, compiled core, its NetOps)
        self._compiled_batch: int | None = None
        self._out_shapes: dict[torch.Size, torch.Size] = {}

    @property
    def descent(self) -> Descent:
        """The inference options as one :class:`Descent` (made again only when one changed)."""
        key = (self.iters, self.state_lr, self.momentum, self.state_optimizer, self.safeguard, self.armijo,
               self.tol, self.armijo_steps)
        made = self.__dict__.get("_descent")
        if made is None or made[0] != key:
            made = self._descent = (key, Descent(*key))
        return made[1]

    @abc.abstractmethod
    def _problem(self, chain: Chain, states0: list[torch.Tensor], target: torch.Tensor, from_ff: bool,
                 whole: bool) -> ChainRelaxation:
        """The learner's energy on ``chain`` (after its FF pass), from ``states0`` (``from_ff``:
        they are the FF states, bit for bit)."""

    def _weight_scale(self, B: int) -> float:
        return 1.0 / B

    def _compilable(self) -> bool:
        """Whether this learner's options allow the compiled step."""
        return True

    @property
    def uses_compiled_step(self) -> bool:
        """Whether ``step`` runs compiled: ``compile=True``, every block analytic, states from
        the FF pass, no tolerance (it stops on a value), options that allow it, and compiling
        has not failed."""
        return (self.compile and self.compile_failed is None and type(self.init) is ForwardInit and self.tol is None
                and self.uses_fast_path and self._compilable())

    # ---- the eager step ---------------------------------------------------------------------
    def _start(self, x, y):
        if x is not None:
            return super()._start(x, y)
        self._check_input(None)
        self._check_data(y)
        shape = (y.shape[0], self.latent_size())
        s0 = self.init([y.new_zeros(shape)], None, y)[0]
        if tuple(s0.shape) != shape:
            raise ValueError(f"init {self.init.name!r} gave a latent of shape {tuple(s0.shape)}; the net's latent "
                             f"s_0 has shape {shape}")
        chain = Chain(self._netops(), None, self._workspace, like=y)
        with torch.no_grad():
            states, out = chain.feedforward(s0)
        self._chain, self._last = chain, None
        return [s0, *states], out, self._check_target(y, out)

    def _relax(self, x, y, ff_states, out, trace, callback=None):
        after = None if callback is None else (lambda problem, t: callback(t, problem.states()))
        return self._run_relax(x, y, ff_states, out, trace, after)

    def _run_relax(self, x, y, ff_states, out, trace: bool, after_step=None) -> Equilibrium:
        """Inference from the init's states; ``after_step(problem, t)`` as in ``minimize``."""
        chain = self._chain
        if chain is None or chain.x is not x:  # states given by a caller: a fresh FF pass
            ff_states, out = self._feedforward(x)
            chain = self._chain
        # its states are the FF states (generative: of the init's s_0): no copy to make here
        from_ff = x is None or type(self.init) is ForwardInit
        target = E.dense_target(y, out)  # first: a class index out of range is refused here
        states0 = ff_states if from_ff else self.init(ff_states, x, y)
        with self._frozen(chain.netops), torch.no_grad():
            problem = self._problem(chain, states0, target, from_ff, False)
            res = Minimized(None, 0, None)
            if states0:
                hook: AfterStep | None = None if after_step is None else (lambda t: after_step(problem, t))
                res = self._infer_on(problem, trace, hook)
            problem.forward()
            # the per-layer energies only for a trace; the total alone is one dot over the errors
            final = problem.parts() if trace else None
            energy = final.sum() if trace else problem.energy()
        layer_trace = torch.stack([*(res.traces or []), final]) if trace else None
        grad_trace = torch.stack(res.grad_norms) if trace and res.grad_norms else None
        eq = Equilibrium(states=problem.final_states(), output=problem.output, energy=energy, iters=res.iters,
                         trace=None if layer_trace is None else layer_trace.sum(1), layer_trace=layer_trace,
                         grad_trace=grad_trace)
        self._last = (eq, problem)
        return eq

    def _infer_on(self, problem: ChainRelaxation, trace: bool, after_step: AfterStep | None) -> Minimized:
        """Inference on ``problem`` (the learner's relaxation): :func:`minimize` with the
        learner's :class:`Descent`; a learner with another schedule (SeqIL) overrides it."""
        return minimize(problem, self.descent, trace, after_step, workspace=self._workspace)

    def _weight_grads(self, x, y, eq):
        if self._last is None or self._last[0] is not eq:
            return super()._weight_grads(x, y, eq)
        problem = self._last[1]
        chain = problem.chain
        with self._frozen(chain.netops), torch.no_grad():
            problem.weight_grads(self._weight_scale(y.shape[0]))
        self._flops_of = (chain.netops, chain.calls, chain.in_shapes())
        self._chain = self._last = None

    def _output_cost(self, out, y):
        if self._last is not None:
            return E.output_cost(out, self._last[1].target, self.loss)
        return super()._output_cost(out, y)

    # ---- the compiled step ----------------------------------------------------------------
    def _step_core(self, netops: NetOps, descent: Descent, x: torch.Tensor, y: torch.Tensor) -> StepCore:
        """One training step up to the optimizer from the FF state: the FF pass, inference and
        the local weight gradients, on ``netops`` (plain ops; no host sync): what
        :func:`~fastpc.learners.compiled.compile_step` traces."""
        params = netops.params
        for p in params:
            p.grad = None
        chain = Chain(netops, x)
        states0, out = chain.feedforward()
        target = E.dense_target(y, out)
        problem = self._problem(chain, states0, target, True, True)
        if states0:
            minimize(problem, descent, sync_free=True)
        problem.forward()
        parts = problem.parts()
        problem.weight_grads(self._weight_scale(y.shape[0]))
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return StepCore(out, E.output_cost(out, target, self.loss), problem.states(), problem.output, parts,
                        grads, list(chain.calls))

    def _step(self, x, y):
        if self.optimizer is not None and x is not None and self.uses_compiled_step:
            self._check_input(x)
            y = self._check_target(y, self._out_like(x), index_range=True)  # compiled: no scatter check
            # one compiled graph per batch size costs a compile each: only the first batch's
            # size is compiled, any other (an epoch's last, partial batch) runs eagerly
            if self._compiled_batch is None:
                self._compiled_batch = x.shape[0]
            if x.shape[0] == self._compiled_batch:
                return self._compiled_step(x, y)
        return super()._step(x, y)

    def _out_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor of the output's shape for ``x`` (one FF pass per new input shape)."""
        shape = self._out_shapes.get(x.shape)
        if shape is None:
            with torch.no_grad(), frozen_batchnorm_stats(self.net):
                shape = self._out_shapes[x.shape] = self._fitting(x, self.net).shape
        return x.new_empty(shape)

    def _compile_key(self) -> tuple:
        return (self._netops().block_ids, self.loss, self.descent, self._weight_scale(1), self._weight_scale(2))

    def _compiled_step(self, x, y) -> StepResult:
        """``Learner.step`` with everything up to the optimizer in one compiled graph. If
        compiling or running it fails, the step runs eagerly; when that works, the failure was
        the compiler's: a warning says so and later steps stay eager (``compile_failed``)."""
        key = self._compile_key()
        if self._compiled is None or self._compiled[0] != key:
            netops, descent = NetOps(self.net.blocks, self.fast, plain=True), self.descent
            core = compiled.compile_step(lambda x, y: self._step_core(netops, descent, x, y), x.device)
            self._compiled = (key, core, netops)
        _, core, netops = self._compiled
        try:
            with torch.no_grad():
                res = core(x, y)
        except Exception as e:  # noqa: BLE001 - decided below by re-running eagerly
            result = super()._step(x, y)  # raises if the input is at fault
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.compile_failed = f"{type(e).__name__}: {why}"[:300]
            warnings.warn(f"fastpc: compiling the {self.name} step failed ({self.compile_failed}); "
                          "training continues eagerly", RuntimeWarning, stacklevel=3)
            return result
        if not self._grads_cover_optimizer(netops.params, res.grads):
            self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(netops.params, res.grads):
            if g is not None:
                p.grad = g
        applied = self._apply_update()
        self._flops_of = (netops, res.calls, [x.shape] + [s.shape for s in res.states])
        eq = Equilibrium(states=res.states, output=res.output, energy=res.parts.sum(), iters=self.iters)
        self._observe(x, y, eq, applied)
        return self._step_result(res.cost, res.out, eq)

    def _grads_cover_optimizer(self, params, grads) -> bool:
        """Whether every parameter the optimizer updates gets a new gradient (then ``zero_grad``
        is redundant: the assignment replaces every old gradient)."""
        opt = self.optimizer
        key = (id(opt), len(opt.param_groups), sum(len(g["params"]) for g in opt.param_groups))
        if getattr(self, "_cover_key", None) != key:
            fresh = {id(p) for p, g in zip(params, grads) if g is not None}
            self._cover = all(id(p) in fresh for grp in opt.param_groups for p in grp["params"])
            self._cover_key = key
        return self._cover

    def options(self) -> dict[str, Any]:
        return {**super().options(), "iters": self.iters, "state_lr": self.state_lr, "momentum": self.momentum,
                "safeguard": self.safeguard, "armijo": self.armijo, "tol": self.tol, "armijo_steps": self.armijo_steps, "prior": self.prior}
