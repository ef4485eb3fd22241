"""Sequential inference (SeqIL) and the soft-clamped target (PAPERS.md §4), over a
:class:`~fastpc.learners.chain.Chain`'s block operations (MLPs and conv nets alike).

One sweep updates the hidden layers from the top one down, each with one gradient step on E
at the point the sweep has reached: layer i's top-down error ε_{i+1} = s_{i+1} − f_{i+1}(s_i)
uses s_{i+1} already updated in this sweep and the prediction from the not-yet-updated s_i,
its bottom-up error ε_i the not-yet-updated s_{i-1}::

    s_i ← s_i − γ_t (ε_i − J_{i+1}ᵀ ε_{i+1})          (top hidden layer: ε_i + J_Lᵀ ∂ℓ/∂ŷ)

with γ_t = γ / (1 + t) for sweep t = 0, 1, ... (``iters`` counts sweeps). This is one block
Gauss–Seidel gradient step on E in the top-down order, so the output error reaches every
layer in one sweep (a simultaneous step moves it down one layer). A sweep costs what a
simultaneous step costs: one VJP and one forward per hidden block.

Soft clamp (``beta``): the target becomes ŷ* = (1 − m)·y + m·softmax(f_L(s_{L-1})),
m = 1/(1 + β), computed at the FF output before the first sweep and recomputed after every
sweep (the authors' code). **[fastpc]** the local weight update uses the same soft target, as
it stands after the last sweep (the authors' code: output error against the soft target), so
``grads()`` is the gradient of :func:`fastpc.energy.local_energy` with that dense target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import energy as E
from .descent import Minimized, batch_total
from .chain import Chain
from .pc import ChainRelaxation

__all__ = ["SequentialRelaxation", "soft_target", "sweeps"]


def soft_target(y: torch.Tensor, output: torch.Tensor, beta: float) -> torch.Tensor:
    """ŷ* = (1 − m)·y + m·softmax(output), m = 1/(1 + β); ``y`` the dense target (B, C)."""
    m = 1.0 / (1.0 + beta)
    return torch.lerp(y, E.softmax(output), m)


class SequentialRelaxation(ChainRelaxation):
    """sPC's energy over the states s_1..s_{L-1}, relaxed by top-down sweeps (:meth:`sweep`).

    ``target`` is the dense (hard) target; with ``beta`` the energy's target is the soft one,
    recomputed after every sweep. ``from_ff``: ``states0`` are the FF states and every tape of
    ``chain`` is at them. Each state is a tensor of its own (not a view of one buffer): a sweep
    writes s_i while the tapes of the blocks below, on the autograd fallback, still hold
    graphs over s_{i-1}, s_{i-2}, … (views of one buffer share one version counter)."""

    def __init__(self, chain: Chain, states0: list[torch.Tensor], target: torch.Tensor, loss: str,
                 from_ff: bool, beta: float | None = None):
        super().__init__(chain, target, loss, False)
        shapes = chain.state_shapes()
        self.s = [chain.stack(f"s{i}", [shape]).views[0] for i, shape in enumerate(shapes)]
        for s, s0 in zip(self.s, states0):
            s.copy_(s0)
        self.err = chain.stack("err", shapes)
        self.step_buf = chain.stack("g", shapes)  # one layer's gradient at a time
        self.hard, self.beta = target, beta
        self.stale = self.L if from_ff else 1  # the first block whose input moved since its tape
        self.errors_stale = True
        if beta is not None:
            self.target = soft_target(target, self.output, beta)

    def moved(self, start: int) -> None:
        """The states from the one holding offset ``start`` (of the stacked layout) changed."""
        self.stale = min(self.stale, self.err.index(start) + 1)
        self.errors_stale = True

    def forward(self) -> None:
        chain, s, L = self.chain, self.s, self.L
        if self.stale < L:
            for k in range(self.stale, L):
                chain.forward(k, s[k - 1])
            self.stale, self.errors_stale = L, True
            self._output_changed()
        if self.errors_stale:
            for j in range(L - 1):  # ε_{j+1} = s_{j+1} − f_{j+1}(s_j)
                torch.sub(s[j], chain.tapes[j].out, out=self.err.views[j])
            self.errors_stale = False

    def grad(self, out) -> int:
        """The simultaneous gradient ∇E at the current states (every layer)."""
        self.forward()
        chain, eps, L = self.chain, self.err.views, self.L
        for i in range(L - 1, 0, -1):
            g, sign = (self.out_grad(), 1.0) if i == L - 1 else (eps[i], -1.0)
            chain.vjp_into(i, g, out.views[i - 1], eps[i - 1], sign)
        return 0

    def sweep(self, gamma: float, measure: bool = False) -> torch.Tensor | None:
        """One top-down sweep with step ``gamma``, then the soft target at the new output.
        ``measure``: return ‖g‖ over the sweep, g the per-layer gradients it stepped along (each
        at the Gauss–Seidel point the sweep had reached)."""
        self.forward()
        chain, s, eps, g, L = self.chain, self.s, self.err.views, self.step_buf.views, self.L
        sq = None
        for i in range(L - 1, 0, -1):  # hidden layer i is views[i - 1]; block i maps s_i to s_{i+1}
            if i == L - 1:
                top, sign = self.out_grad(), 1.0
            else:  # ε_{i+1}: s_{i+1} from this sweep, its prediction from the old s_i
                top, sign = torch.sub(s[i], chain.tapes[i].out, out=eps[i]), -1.0
            torch.sub(s[i - 1], chain.tapes[i - 1].out, out=eps[i - 1])  # ε_i, from the old s_{i-1}
            chain.vjp_into(i, top, g[i - 1], eps[i - 1], sign)  # ∇_{s_i}E here
            if measure:
                gi = g[i - 1].reshape(-1)
                sq = torch.dot(gi, gi) if sq is None else sq.add_(torch.dot(gi, gi))
            s[i - 1].add_(g[i - 1], alpha=-gamma)
            chain.forward(i, s[i - 1])  # the new prediction of s_{i+1} (the output when i = L - 1)
        self.errors_stale = True
        self._output_changed()
        if self.beta is not None:
            self.target = soft_target(self.hard, self.output, self.beta)
        return None if sq is None else batch_total(sq)[0].sqrt_()  # data parallel: the global batch's

    def states(self) -> list[torch.Tensor]:
        return list(self.s)

    def final_states(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.s]  # the buffers are reused by the next batch


def sweeps(problem: SequentialRelaxation, iters: int, lr: float, trace: bool = False,
           after_step: Callable[[int], bool | None] | None = None, tol: float | None = None) -> Minimized:
    """``iters`` sweeps of ``problem`` with steps lr / (1 + t), t = 0, 1, ...; ``after_step(t)``
    runs after sweep t (1-based) with the problem forwarded, returning True stops. ``tol``:
    stop after the first sweep whose gradient norm (:meth:`SequentialRelaxation.sweep`) is
    ≤ tol × the first sweep's (``iters`` is the cap). Returns what
    :func:`~fastpc.learners.descent.minimize` returns (``trace``: per-layer energies before
    every sweep, and each sweep's gradient norm with the simultaneous ‖∇E‖ where the sweeps
    ended); the problem is left forwarded."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    traces: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    t_run, first = 0, None
    for t in range(iters if problem.L > 1 else 0):
        problem.forward()
        if trace:
            traces.append(problem.parts())
        gn = problem.sweep(lr / (1 + t), measure=trace or tol is not None)
        t_run = t + 1
        if gn is not None:
            norms.append(gn)
            if tol is not None:
                first = gn.item() if first is None else first
                if gn.item() <= tol * first:
                    break
        if after_step is not None:
            problem.forward()
            if after_step(t + 1) is True:
                break
    problem.forward()
    if not trace:
        return Minimized(None, t_run, None)
    problem.grad(problem.step_buf)  # the simultaneous ‖∇E‖ where the sweeps ended
    return Minimized(traces, t_run, [*norms, torch.linalg.vector_norm(problem.step_buf.flat)])
