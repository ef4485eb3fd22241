"""Energies of a predictive coding network as pure functions (PAPERS.md §0).

Every learner calls these; none re-derives them. Costs are **summed** over the batch, as the
inference dynamics use them; learners divide by the batch size where they report a mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "check_loss",
    "one_hot",
    "output_cost",
    "output_cost_per_sample",
    "output_cost_grad",
    "errors",
    "error_energy_per_sample",
    "energy",
    "energy_per_sample",
    "layer_energies",
    "local_energy",
]

LOSSES = ("ce", "mse")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")
    return loss


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """y (B,) int64 → (B, num_classes) one-hot in ``dtype``."""
    return F.one_hot(y, num_classes).to(dtype)


def output_cost_per_sample(yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ(ŷ, y) per sample, shape (B,).

    ``mse``: ½‖ŷ − onehot(y)‖²;  ``ce``: −log softmax(ŷ)_y.
    """
    if loss == "ce":
        return F.cross_entropy(yhat, y, reduction="none")
    if loss == "mse":
        return 0.5 * (yhat - one_hot(y, yhat.shape[1], yhat.dtype)).pow(2).sum(1)
    raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")


def output_cost(yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ(ŷ, y) = Σ_b ℓ(ŷ_b, y_b), summed over the batch (scalar)."""
    if loss == "ce":
        return F.cross_entropy(yhat, y, reduction="sum")
    return output_cost_per_sample(yhat, y, loss).sum()


def output_cost_grad(yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """∂ℓ/∂ŷ in closed form: softmax(ŷ) − onehot(y) for ``ce``, ŷ − onehot(y) for ``mse``."""
    target = one_hot(y, yhat.shape[1], yhat.dtype)
    if loss == "ce":
        return torch.softmax(yhat, dim=1) - target
    if loss == "mse":
        return yhat - target
    raise ValueError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")


def errors(states: Sequence[torch.Tensor], preds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """ε_i = s_i − μ_i for each hidden layer."""
    return [s - mu for s, mu in zip(states, preds)]


def error_energy_per_sample(eps: torch.Tensor) -> torch.Tensor:
    """½‖ε_b‖² per sample, shape (B,)."""
    return 0.5 * eps.pow(2).flatten(1).sum(1)


def energy_per_sample(
    errs: Sequence[torch.Tensor], yhat: torch.Tensor, y: torch.Tensor, loss: str
) -> torch.Tensor:
    """E_b = Σ_i ½‖ε_{i,b}‖² + ℓ(ŷ_b, y_b) per sample, shape (B,); its sum is :func:`energy`."""
    e = output_cost_per_sample(yhat, y, loss)
    for eps in errs:
        e = e + error_energy_per_sample(eps)
    return e


def energy(errs: Sequence[torch.Tensor], yhat: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """E = Σ_i ½‖ε_i‖² + ℓ(ŷ, y), summed over the batch (scalar)."""
    e = output_cost(yhat, y, loss)
    for eps in errs:
        e = e + 0.5 * eps.pow(2).sum()
    return e


def layer_energies(
    errs: Sequence[torch.Tensor], yhat: torch.Tensor, y: torch.Tensor, loss: str
) -> torch.Tensor:
    """Per-layer energies [½‖ε_1‖², …, ½‖ε_{L-1}‖², ℓ(ŷ, y)], each summed over the batch,
    shape (L,). Their sum is :func:`energy`."""
    parts = [0.5 * eps.detach().pow(2).sum() for eps in errs]
    parts.append(output_cost(yhat.detach(), y, loss))
    return torch.stack(parts)


def local_energy(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    states: Sequence[torch.Tensor],
    y: torch.Tensor,
    loss: str,
) -> torch.Tensor:
    """E_local = Σ_i ½‖s_i − f_i(s_{i-1}.detach())‖² + ℓ(f_L(s_{L-1}.detach()), y).

    Inputs of every block are detached, so its gradient w.r.t. the weights of block i is the
    local PC update −(∂f_i/∂θ_i)ᵀ ε_i; it never backpropagates across blocks.
    """
    prev = x
    e = x.new_zeros(())
    for block, s in zip(blocks[:-1], states):
        e = e + 0.5 * (s.detach() - block(prev.detach())).pow(2).sum()
        prev = s
    return e + output_cost(blocks[-1](prev.detach()), y, loss)
