"""Per-layer diagnostics of PC inference and learning (PAPERS.md §1–2). Pure computations.

- :func:`energy_map`: per-layer energy over inference iterations (the signal-decay picture).
- :func:`first_arrival`: the iteration at which each layer's energy first becomes non-zero.
- :func:`alignment`: per-block cosine similarity and norm ratio of a learner's weight update
  with the BP gradient on the same net and batch.
- :func:`linear_equilibrium`: the exact equilibrium of a linear MLP with MSE loss.
- :func:`iters_to_equilibrium` / :func:`iters_vs_depth`: inference iterations needed to reach
  that equilibrium, per learner and depth.
- :func:`write_run_diagnostics`: all of the above as PNGs + ``diagnostics.md`` for a trained
  net (``fastpc report RUN``).

Layer indices follow PAPERS.md §0: energy column k-1 is ½‖ε_k‖² for hidden layer k = 1..L-1,
the last column (L) is the output cost ℓ.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import energy as E
from .learners import Learner, make_learner
from .nets import PCNet, mlp

__all__ = [
    "EnergyMap",
    "Alignment",
    "DepthIters",
    "energy_map",
    "first_arrival",
    "alignment",
    "linear_equilibrium",
    "iters_to_equilibrium",
    "iters_vs_depth",
    "write_run_diagnostics",
]


# ---- energy over iterations -----------------------------------------------------------------
@dataclass
class EnergyMap:
    """Per-layer energies over inference iterations.

    energies: (T + 1, L) — row t is [½‖ε_1‖², …, ½‖ε_{L-1}‖², ℓ] after t iterations, summed over
    the batch (exactly ``learner.infer(x, y, trace=True).layer_trace``).
    learner: the learner's name; options: its hyperparameters; batch_size: B.
    """

    learner: str
    energies: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1

    @property
    def iters(self) -> int:
        return self.energies.shape[0] - 1

    @property
    def depth(self) -> int:
        return self.energies.shape[1]


def energy_map(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> EnergyMap:
    """Trace one inference of ``learner`` on (x, y); no weight changes."""
    eq = learner.infer(x, y, trace=True)
    if eq.layer_trace is None:
        raise ValueError(f"learner {learner.name!r} returned no layer trace")
    return EnergyMap(learner.name, eq.layer_trace.detach().cpu(), learner.options(), int(y.shape[0]))


def first_arrival(energies: torch.Tensor, threshold: float = 0.0) -> list[int | None]:
    """For each layer (column) of a (T + 1, L) energy trace, the first iteration t at which its
    energy exceeds ``threshold`` (None if never). After the FF init only the output term is
    non-zero, so the output column is 0; sPC's hidden layer k arrives at t = L - k (the signal
    moves one layer per step), ePC's at t = 1 for every layer."""
    out: list[int | None] = []
    for col in energies.T:
        hit = torch.nonzero(col > threshold).flatten()
        out.append(int(hit[0]) if hit.numel() else None)
    return out


# ---- alignment with BP ------------------------------------------------------------------------
@dataclass
class Alignment:
    """Per-block alignment of a learner's update g with the BP gradient g_bp.

    cosine[i] = <g_i, g_bp_i> / (‖g_i‖ ‖g_bp_i‖), norm_ratio[i] = ‖g_i‖ / ‖g_bp_i‖, where g_i
    concatenates the gradients of all parameters of block i+1 (weights and biases).
    """

    learner: str
    cosine: torch.Tensor  # (L,)
    norm_ratio: torch.Tensor  # (L,)
    options: dict[str, Any] = field(default_factory=dict)

    def cell(self, i: int) -> str:
        """'cosine / norm ratio' of block i+1 for a table; a block whose update is exactly zero
        (no signal reached it) has no direction: 'no update'."""
        if float(self.norm_ratio[i]) == 0.0:
            return "no update / 0"
        return f"{float(self.cosine[i]):.3f} / {float(self.norm_ratio[i]):.3g}"


def _block_of(name: str) -> int:
    parts = name.split(".")
    if parts[0] != "blocks":
        raise ValueError(f"parameter {name!r} is not inside net.blocks")
    return int(parts[1])


def _per_block(grads: dict[str, torch.Tensor], depth: int) -> list[torch.Tensor]:
    flat: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    for name in sorted(grads):
        flat[_block_of(name)].append(grads[name].detach().flatten().double())
    return [torch.cat(f) if f else torch.zeros(0, dtype=torch.float64) for f in flat]


def alignment(learner: Learner, x: torch.Tensor, y: torch.Tensor,
              reference: dict[str, torch.Tensor] | None = None) -> Alignment:
    """Cosine similarity and norm ratio, per block, of ``learner.grads(x, y)`` with the BP
    gradient (``reference``, default: the ``bp`` learner's grads on the same net and loss)."""
    if reference is None:
        reference = make_learner("bp", learner.net, loss=learner.loss).grads(x, y)
    L = learner.net.depth
    g = _per_block(learner.grads(x, y), L)
    r = _per_block(reference, L)
    cos, ratio = torch.full((L,), float("nan"), dtype=torch.float64), torch.full((L,), float("nan"), dtype=torch.float64)
    for i, (a, b) in enumerate(zip(g, r)):
        if a.numel() == 0 or a.shape != b.shape:
            continue
        na, nb = a.norm(), b.norm()
        ratio[i] = na / nb if nb > 0 else float("nan")
        cos[i] = (a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    return Alignment(learner.name, cos, ratio, learner.options())


# ---- exact equilibrium of a linear net --------------------------------------------------------
def _linear_of(block: nn.Module) -> nn.Linear:
    mods = [m for m in block.modules() if not isinstance(m, (nn.Sequential, nn.Flatten, nn.Identity))]
    if len(mods) != 1 or not isinstance(mods[0], nn.Linear):
        raise ValueError("linear_equilibrium needs blocks made of one nn.Linear (plus Flatten/Identity), "
                         f"got {block}; build the net with fpc.mlp(widths, act='identity')")
    return mods[0]


def linear_equilibrium(net: PCNet, x: torch.Tensor, y: torch.Tensor, loss: str = "mse") -> list[torch.Tensor]:
    """Exact minimiser s*_1..s*_{L-1} of E for a linear MLP (``fpc.mlp(..., act="identity")``)
    with MSE loss, solved in float64.

    Stacking the residuals r = [ε_1; …; ε_{L-1}; ŷ − onehot(y)] = A s + r_0 (per sample), E is
    ½‖A s + r_0‖² with A = [[I, 0, …], [−W_2, I, …], …, [0, …, W_L]]; the top block of A is unit
    lower-triangular, so AᵀA is positive definite and s* = −(AᵀA)⁻¹ Aᵀ r_0.
    """
    if loss != "mse":
        raise ValueError("the closed-form equilibrium needs loss='mse' (the energy is then quadratic)")
    lins = [_linear_of(b) for b in net.blocks]
    L = len(lins)
    if L < 2:
        return []
    x = x.flatten(1).double()
    widths = [lin.out_features for lin in lins]
    n, offs = sum(widths[:-1]), [0]
    for w in widths[:-1]:
        offs.append(offs[-1] + w)
    m = n + widths[-1]
    A = torch.zeros(m, n, dtype=torch.float64)
    B = x.shape[0]
    r0 = torch.zeros(B, m, dtype=torch.float64)
    for i, lin in enumerate(lins):  # block i+1: rows of ε_{i+1} (or the output)
        W = lin.weight.detach().double()
        b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
        rows = slice(offs[i], offs[i] + widths[i]) if i < L - 1 else slice(n, m)
        if i < L - 1:
            A[rows, offs[i]:offs[i] + widths[i]] = torch.eye(widths[i], dtype=torch.float64)
        if i == 0:
            r0[:, rows] = -(x @ W.T + b)  # ε_1 = s_1 − W_1 x − b_1
        else:
            sign = -1.0 if i < L - 1 else 1.0  # ε_i = s_i − W s_{i-1} − b ; ŷ − y = W s_{L-1} + b − y
            A[rows, offs[i - 1]:offs[i - 1] + widths[i - 1]] = sign * W
            r0[:, rows] = -b if i < L - 1 else b - E.one_hot(y, widths[-1], torch.float64)
    H = A.T @ A
    s = -torch.cholesky_solve((r0 @ A).T, torch.linalg.cholesky(H)).T  # (B, n)
    return [s[:, offs[i]:offs[i + 1]].to(lins[0].weight.dtype) for i in range(L - 1)]


def iters_to_equilibrium(learner: Learner, x: torch.Tensor, y: torch.Tensor,
                         target: Sequence[torch.Tensor], tol: float = 1e-3, max_iters: int = 10000) -> int | None:
    """Inference iterations until ‖s − s*‖ ≤ tol · ‖s_FF − s*‖ (all hidden states stacked), run
    with the learner's own step rule; None if not reached within ``max_iters``. The learner's
    ``iters`` is raised to ``max_iters`` for this call and restored afterwards."""
    tgt = [t.detach().to(x.dtype).flatten(1) for t in target]
    with torch.no_grad():
        ff, _ = learner.net.forward_states(x)
    d0 = torch.sqrt(sum(((f.flatten(1) - t) ** 2).sum() for f, t in zip(ff, tgt)))
    if d0 == 0:
        return 0
    hit: list[int] = []

    def cb(t: int, states: list[torch.Tensor]) -> bool:
        d = torch.sqrt(sum(((s.flatten(1) - g) ** 2).sum() for s, g in zip(states, tgt)))
        if not torch.isfinite(d):
            return True
        if d <= tol * d0:
            hit.append(t)
            return True
        return False

    saved = learner.iters
    learner.iters = int(max_iters)
    try:
        learner.infer(x, y, callback=cb)
    finally:
        learner.iters = saved
    return hit[0] if hit else None


@dataclass
class DepthIters:
    """Iterations to the exact equilibrium versus depth for linear MLPs (MSE loss).
    iters[name][j] is for depths[j] (None = not reached within max_iters)."""

    depths: list[int]
    iters: dict[str, list[int | None]]
    options: dict[str, dict[str, Any]]
    tol: float
    max_iters: int
    width: int


DEFAULT_DEPTH_LEARNERS: dict[str, dict[str, Any]] = {
    "spc": {"state_lr": 0.1},
    "epc": {"state_lr": 0.05, "safeguard": False},
}
# sPC's state Hessian has eigenvalues ≤ (1 + ‖W‖)² = 4 for gain-1 orthogonal linear nets, so
# λ = 0.1 is stable at any depth; ePC's error Hessian I + JᵀJ has largest eigenvalue L (MSE,
# ‖J_j‖ = 1 for every layer), so η_e = 0.05 is stable up to depth 39.


def iters_vs_depth(depths: Sequence[int], x: torch.Tensor, y: torch.Tensor, width: int = 128,
                   learners: dict[str, dict[str, Any]] | None = None, tol: float = 1e-3,
                   max_iters: int = 5000, seed: int = 0, num_classes: int | None = None,
                   init: str = "orthogonal") -> DepthIters:
    """For each depth: a linear MLP (``init``, default orthogonal with gain 1) in float64, the exact
    equilibrium by :func:`linear_equilibrium`, and the iterations each learner (name →
    options) needs to reach it from the FF state.

    With orthogonal weights and MSE, ePC's error Hessian is I + JᵀJ with JJᵀ = (L − 1)·I, so its
    relevant eigenvalues all equal L: η_e = 1/L reaches s* in one step and ePC gets faster with
    depth (rate |1 − η_e L|); ``init="gaussian"`` gives a less degenerate spectrum."""
    learners = dict(DEFAULT_DEPTH_LEARNERS if learners is None else learners)
    x = x.double()
    classes = int(num_classes or int(y.max()) + 1)
    res: dict[str, list[int | None]] = {k: [] for k in learners}
    for depth in depths:
        torch.manual_seed(seed)
        net = mlp([x[0].numel()] + [width] * (depth - 1) + [classes], act="identity", init=init).double()
        target = linear_equilibrium(net, x, y)
        for name, opts in learners.items():
            lrn = make_learner(name.split(":")[0], net, loss="mse", **opts)
            res[name].append(iters_to_equilibrium(lrn, x, y, target, tol, max_iters))
    return DepthIters(list(depths), res, {k: dict(v) for k, v in learners.items()}, tol, max_iters, width)


# ---- run report -------------------------------------------------------------------------------
def plots_module():
    """fastpc.plots, imported lazily (matplotlib is only needed for pictures)."""
    from . import plots
    return plots


def write_run_diagnostics(run_dir: str | Path, learner: Learner, x: torch.Tensor, y: torch.Tensor,
                          iters: int | None = None, depth_sweep: bool = True) -> list[Path]:
    """Diagnostics of a trained net on one batch, written under ``run_dir/diagnostics/``:

    - ``energy_heatmap.png``: per-layer energy over ``iters`` inference iterations (default
      max(2·depth, learner.iters)) for spc and epc side by side on the net (their options come
      from ``learner`` when it is that learner, PAPERS.md defaults otherwise);
    - ``alignment.png``: per-block cosine and norm ratio of ``learner``'s update with BP (and of
      spc / epc with the same settings as the heatmap);
    - ``iters_vs_depth.png`` (``depth_sweep``): iterations to the exact equilibrium of linear MLPs
      of the run's width, depth 2 … the run's depth;
    - ``diagnostics.md``: the numbers behind the pictures.

    Returns the written paths. The net is not changed (it is deep-copied).
    """
    plots = plots_module()
    out = Path(run_dir) / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(learner.net).eval()
    L = net.depth
    T = int(iters) if iters is not None else max(2 * L, int(getattr(learner, "iters", 0) or 0))
    opts = {"spc": {"state_lr": 0.1}, "epc": {"state_lr": 0.05, "safeguard": False}}
    if learner.name in opts:
        own = learner.options()
        opts[learner.name] = {k: own[k] for k in ("state_lr", "momentum", "safeguard") if k in own}
    maps = [energy_map(make_learner(n, net, loss=learner.loss, iters=T, **o), x, y) for n, o in opts.items()]
    paths = [out / "energy_heatmap.png"]
    plots.plot_energy_heatmaps(maps, paths[-1])
    run_learner = make_learner(learner.name, net, **learner.options())
    aligns = [alignment(run_learner, x, y)]
    for n, o in opts.items():
        if n != learner.name:
            aligns.append(alignment(make_learner(n, net, loss=learner.loss, iters=learner.options().get("iters", 5), **o), x, y))
    paths.append(out / "alignment.png")
    plots.plot_alignment(aligns, paths[-1])
    md = [f"# Diagnostics ({learner.name}, depth {L}, batch {y.shape[0]})", "",
          f"## Energy per layer over {T} inference iterations (batch sum)", ""]
    for m in maps:
        arr = first_arrival(m.energies)
        md.append(f"- {m.learner} {m.options.get('state_lr')}: energy {float(m.energies[0].sum()):.4g} → "
                  f"{float(m.energies[-1].sum()):.4g}; first non-zero iteration per layer 1..L: {arr}")
    md += ["", "## Alignment of the weight update with BP, per block (cosine / norm ratio)", "",
           "| block | " + " | ".join(a.learner for a in aligns) + " |", "|---:|" + "---|" * len(aligns)]
    for i in range(L):
        md.append(f"| {i + 1} | " + " | ".join(a.cell(i) for a in aligns) + " |")
    if depth_sweep and L >= 2:
        width = max((b.out_features for b in net.modules() if isinstance(b, nn.Linear)), default=64)
        depths = sorted({d for d in (2, 4, 8, 12, 16, 20, L) if 2 <= d <= L})
        xs = x[: min(16, x.shape[0])]
        di = iters_vs_depth(depths, xs, y[: xs.shape[0]], width=min(width, 128), max_iters=3000,
                            num_classes=int(net(x[:1]).shape[1]))
        paths.append(out / "iters_vs_depth.png")
        plots.plot_iters_vs_depth(di, paths[-1])
        md += ["", f"## Iterations to the exact equilibrium, linear MLPs width {di.width}, MSE, "
                   f"tol {di.tol} (None: > {di.max_iters})", "",
               "| depth | " + " | ".join(di.iters) + " |", "|---:|" + "---:|" * len(di.iters)]
        for j, d in enumerate(di.depths):
            md.append(f"| {d} | " + " | ".join(str(di.iters[k][j]) for k in di.iters) + " |")
    paths.append(out / "diagnostics.md")
    paths[-1].write_text("\n".join(md) + "\n")
    return paths
