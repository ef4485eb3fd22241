"""Energies of a predictive coding network as pure functions (PAPERS.md §0).

Every learner composes these; none re-derives them. One energy serves every model fastpc
trains:

- the chain s_0 → s_1 → … → s_{L-1} → ŷ = f_L(s_{L-1}), with s_0 = x clamped (discriminative)
  or free (``x=None``: generative, s_0 is the first state);
- the target ``y``: class indices (B,) or a dense tensor shaped like the output (soft labels,
  images); index targets are the one-hot dense target, exactly;
- the output as a free state (EP): its error ε_L = s_L − f_L(s_{L-1}) joins the errors and the
  cost is taken at s_L, weighted per sample (β, or ±β for the random-sign estimator).

Costs are **summed** over the batch, as the inference dynamics use them; learners divide by
the batch size where they report a mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import runtime

__all__ = [
    "LOSSES",
    "check_loss",
    "check_target",
    "one_hot",
    "dense_target",
    "softmax",
    "log_softmax",
    "ce_cost",
    "output_cost",
    "output_cost_per_sample",
    "output_cost_grad",
    "predictions",
    "errors",
    "error_energy_per_sample",
    "energy",
    "energy_per_sample",
    "layer_energies",
    "local_energy",
    "latent_prior",
]

LOSSES = ("ce", "mse")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")
    return loss


def check_target(y: torch.Tensor, out_shape: Sequence[int], loss: str, index_range: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``y`` is a target for outputs of ``out_shape``:
    class indices (int64, shape (B,), in [0, C)) or a dense floating tensor of the output's
    shape (soft labels for ``ce``, any values for ``mse``). ``index_range=False`` leaves the
    range of class indices on the CPU to :func:`one_hot` (its scatter checks every index anyway,
    and raises the same error)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices (B,) or a dense target {tuple(out_shape)}, "
                        f"got {type(y).__name__}")
    B = out_shape[0]
    if y.dtype == torch.int64:
        if y.shape != (B,) or len(out_shape) != 2:
            raise ValueError(f"class-index y must have shape ({B},) for outputs {tuple(out_shape)}, "
                             f"got {tuple(y.shape)}")
        if index_range or y.device.type != "cpu":
            _check_index_range(y, out_shape[1])
        return
    if not y.is_floating_point():
        raise TypeError(f"y must be int64 class indices or a floating dense target, got dtype {y.dtype}")
    if tuple(y.shape) != tuple(out_shape):
        raise ValueError(f"a dense target y must have the output's shape {tuple(out_shape)}, got {tuple(y.shape)}")
    if not all(map(math.isfinite, torch.stack(torch.aminmax(y)).tolist())):
        raise ValueError("the dense target y holds NaN or inf")
    if loss == "ce":
        tol = 8 * y.shape[1] * torch.finfo(y.dtype).eps
        if len(out_shape) != 2 or bool((y < 0).any()) or not bool(((y.sum(1) - 1).abs() <= tol).all()):
            raise ValueError("a dense target for loss 'ce' must hold one distribution per row "
                             "(entries >= 0 summing to 1); use loss 'mse' for other targets")


def _check_index_range(y: torch.Tensor, num_classes: int) -> None:
    lo, hi = runtime.read_pair(torch.aminmax(y)) if y.numel() else (0, 0)  # one reduction
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"class indices in y must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """y (B,) int64 → (B, num_classes) one-hot in ``dtype`` (one scatter; F.one_hot's range check
    costs a device sync). On the CPU the scatter checks every index: an index outside
    [0, num_classes) raises :func:`check_target`'s ``ValueError``."""
    z = torch.zeros(y.shape[0], num_classes, dtype=dtype, device=y.device)
    try:
        return z.scatter_(1, y.unsqueeze(1), 1.0)
    except RuntimeError as e:
        if "out of bounds" not in str(e):
            raise
        _check_index_range(y, num_classes)
        raise


def dense_target(y: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
    """The target as a dense tensor like ``yhat``: one-hot for class indices, else ``y``."""
    if y.is_floating_point():
        return y
    return one_hot(y, yhat.shape[1], yhat.dtype)


# ATen's row-wise (log-)softmax is slow when the row is shorter than a SIMD vector (10 classes:
# ~3x slower than over the columns of the transposed view); same values up to rounding
_FEW_CLASSES = 32


def softmax(yhat: torch.Tensor) -> torch.Tensor:
    """softmax over the classes (dim 1)."""
    if yhat.dim() == 2 and yhat.shape[1] <= _FEW_CLASSES:
        return torch.softmax(yhat.t(), 0).t()
    return torch.softmax(yhat, 1)


def log_softmax(yhat: torch.Tensor) -> torch.Tensor:
    """log softmax over the classes (dim 1)."""
    if yhat.dim() == 2 and yhat.shape[1] <= _FEW_CLASSES:
        return torch.log_softmax(yhat.t(), 0).t()
    return torch.log_softmax(yhat, 1)


def ce_cost(log_probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """−Σ t ⊙ log softmax(ŷ) from the log-probabilities, summed over the batch (scalar)."""
    return -(t * log_probs).sum()


def output_cost_per_sample(yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ(ŷ_b, t_b) per sample, shape (B,), with t the dense target of ``y``.

    ``mse``: ½‖ŷ − t‖²;  ``ce``: −Σ_c t_c log softmax(ŷ)_c (= −log softmax(ŷ)_y for indices).
    """
    t = dense_target(y, yhat)
    if loss == "ce":
        return -(t * log_softmax(yhat)).flatten(1).sum(1)
    if loss == "mse":
        return 0.5 * (yhat - t).pow(2).flatten(1).sum(1)
    raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")


def output_cost(yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ(ŷ, y) = Σ_b ℓ(ŷ_b, y_b), summed over the batch (scalar)."""
    t = dense_target(y, yhat)
    if loss == "ce":
        return ce_cost(log_softmax(yhat), t)
    if loss == "mse":
        d = (yhat - t).reshape(-1)
        return 0.5 * torch.dot(d, d)
    raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")


def output_cost_grad(yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """∂ℓ/∂ŷ in closed form: softmax(ŷ) − t for ``ce`` (t a distribution per sample, as
    :func:`check_target` requires), ŷ − t for ``mse``."""
    t = dense_target(y, yhat)
    if loss == "ce":
        return softmax(yhat).sub_(t)
    if loss == "mse":
        return yhat - t
    raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")


def predictions(
    blocks: Sequence[nn.Module], x: torch.Tensor | None, states: Sequence[torch.Tensor], detach_inputs: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(μ, ŷ): the prediction μ_i = f_i(s_{i-1}) of every state that has a predecessor, and the
    output ŷ = f_L(s_last).

    ``x`` given: s_0 = x is clamped and ``states`` are s_1..s_{L-1} (μ has one entry per state).
    ``x=None``: ``states`` are s_0..s_{L-1}, s_0 free (μ has one entry per state after the first).
    ``detach_inputs``: every block sees detached inputs (the local weight update).
    """
    chain = ([x] if x is not None else []) + list(states)
    if len(chain) != len(blocks):
        raise ValueError(f"{len(blocks)} blocks need {len(blocks) - (x is not None)} states, got {len(states)}")
    ins = [s.detach() for s in chain] if detach_inputs else chain
    preds = [b(s) for b, s in zip(blocks[:-1], ins[:-1])]
    return preds, blocks[-1](ins[-1])


def errors(states: Sequence[torch.Tensor], preds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """ε_i = s_i − μ_i for each state that has a prediction (the last ``len(preds)`` states)."""
    return [s - mu for s, mu in zip(states[len(states) - len(preds):], preds)]


def error_energy_per_sample(eps: torch.Tensor) -> torch.Tensor:
    """½‖ε_b‖² per sample, shape (B,)."""
    return 0.5 * eps.pow(2).flatten(1).sum(1)


def energy_per_sample(
    errors: Sequence[torch.Tensor],
    yhat: torch.Tensor,
    y: torch.Tensor | None,
    loss: str,
    weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """E_b = Σ_i ½‖ε_{i,b}‖² + w_b·ℓ(ŷ_b, y_b) per sample, shape (B,); its sum is :func:`energy`.

    ``weight`` w: per-sample (B,) or scalar weight of the cost (EP's ±β), default 1;
    ``y=None``: no cost (EP's free phase)."""
    e = yhat.new_zeros(yhat.shape[0]) if y is None else output_cost_per_sample(yhat, y, loss)
    if weight is not None and y is not None:
        e = e * weight
    for eps in errors:
        e = e + error_energy_per_sample(eps)
    return e


def energy(
    errors: Sequence[torch.Tensor],
    yhat: torch.Tensor,
    y: torch.Tensor | None,
    loss: str,
    weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """E = Σ_i ½‖ε_i‖² + Σ_b w_b·ℓ(ŷ_b, y_b), summed over the batch (scalar)."""
    if weight is None or y is None:
        e = yhat.new_zeros(()) if y is None else output_cost(yhat, y, loss)
    else:
        e = (output_cost_per_sample(yhat, y, loss) * weight).sum()
    for eps in errors:
        e = e + 0.5 * eps.pow(2).sum()
    return e


def layer_energies(
    errors: Sequence[torch.Tensor | None], yhat: torch.Tensor, y: torch.Tensor | None, loss: str
) -> torch.Tensor:
    """Per-layer energies [½‖ε_1‖², …, ½‖ε_n‖², ℓ(ŷ, y)], each summed over the batch, shape
    (n + 1,). Their sum is :func:`energy`. An error of None is exactly zero."""
    zero = yhat.new_zeros(())
    parts = []
    for eps in errors:
        v = None if eps is None else eps.detach().reshape(-1)
        parts.append(zero if v is None else torch.dot(v, v))
    parts.append(zero if y is None else output_cost(yhat.detach(), y, loss).mul(2.0))
    return torch.stack(parts).mul_(0.5)


def latent_prior(s0: torch.Tensor, prior: float) -> torch.Tensor:
    """½·prior·‖s_0‖², summed over the batch: a generative model's N(0, I/prior) prior on its
    free latent s_0 (``prior=0``: none)."""
    v = s0.reshape(-1)
    return torch.dot(v, v).mul_(0.5 * prior)


def local_energy(
    blocks: Sequence[nn.Module],
    x: torch.Tensor | None,
    states: Sequence[torch.Tensor],
    y: torch.Tensor | None,
    loss: str,
    output: torch.Tensor | None = None,
    weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """E_local = Σ_i ½‖s_i − f_i(s_{i-1}.detach())‖² + w·ℓ(f_L(s_{L-1}.detach()), y).

    Inputs of every block are detached, so its gradient w.r.t. the weights of block i is the
    local PC update −(∂f_i/∂θ_i)ᵀ ε_i; it never backpropagates across blocks. ``x=None``:
    ``states[0]`` is the free s_0. ``output``: the output is a free state s_L (EP); its error
    ½‖s_L − f_L(s_{L-1})‖² replaces the cost, which is then taken at s_L (no weight gradient).
    """
    preds, yhat = predictions(blocks, x, states, detach_inputs=True)
    errs = errors([s.detach() for s in states], preds)
    if output is not None:
        return energy([*errs, output.detach() - yhat], output.detach(), None, loss)
    return energy(errs, yhat, y, loss, weight)
