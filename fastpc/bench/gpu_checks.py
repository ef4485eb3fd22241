"""The correctness part of ``fastpc bench gpu``: every registered learner's gradients and one
optimizer step on the device against the same learner on the CPU in float64.

Each learner runs on a copy of one net in float64 on the CPU (the reference) and in float32 and
float64 on the device, and again with ``precision='bf16'`` on the device; the compared quantities are the
weight gradients of ``learner.grads`` and the weights after one ``learner.step`` under plain SGD
(the update is the gradient times the rate, so the step is compared through the change of the
weights). The error is max |a − ref| / max |ref| over every tensor of a quantity.

Tolerances: a dot product or sum of n terms carries a relative error of at most about n·u
(u = eps/2 of its dtype); the quantities here go through every layer's products and through T
inference steps, so the bound of a dtype is ``(T + 1) · Σ fan-in · eps(dtype)``. EP's gradient is the
difference of two nudged equilibria divided by 2β: that cancellation scales the rounding by
1/β, and so does its bound. bf16 rounds every
product's inputs to 8 significant bits: its bound is a fixed 16·eps(bf16) = 0.125 of the
largest entry, a loose band that a wrong kernel or a dropped term still breaks. TF32 is turned
off for the checks (it would round float32 products to 10 bits).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import fastpc as fpc

__all__ = ["check_rows", "dtype_tol", "BF16_TOL", "rel_error"]

BF16_TOL = 16 * torch.finfo(torch.bfloat16).eps  # 0.125


def dtype_tol(widths: list[int], iters: int, dtype: torch.dtype, beta: float | None = None) -> float:
    """The bound ``(iters + 1) · Σ fan-in · eps(dtype)``, over ``beta`` for EP."""
    return (iters + 1) * sum(widths[:-1]) * torch.finfo(dtype).eps / (beta or 1.0)


def rel_error(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max |a − ref| / max |ref| over the tensors of ``ref`` (``a`` moved to the CPU, float64)."""
    diff = max((a[k].detach().double().cpu() - ref[k].double()).abs().max().item() for k in ref)
    scale = max(ref[k].double().abs().max().item() for k in ref)
    return diff / max(scale, 1e-300)


def _learner(name: str, net: fpc.PCNet, iters: int, precision: str = "fp32"):
    opts: dict[str, Any] = {} if name == "bp" else {"iters": iters}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return fpc.make_learner(name, net, optimizer=opt, precision=precision, **opts)


def _measure(name: str, net: fpc.PCNet, x, y, iters: int, precision: str = "fp32") -> dict[str, Any]:
    """Gradients, then the weights' change over one step, of ``name`` on ``net`` (modified)."""
    learner = _learner(name, net, iters, precision)
    grads = {k: v.detach().clone() for k, v in learner.grads(x, y).items()}
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    learner.step(x, y)
    change = {k: v.detach() - before[k] for k, v in net.named_parameters()}
    return {"grads": grads, "step": change}


def check_rows(device: torch.device, widths: list[int], batch: int, iters: int, seed: int = 0,
               perturb: float = 0.0) -> list[dict[str, Any]]:
    """One row per learner, precision and quantity: its error against the CPU float64 reference,
    the tolerance and pass/fail. ``perturb`` scales the reference's gradients by ``1 + perturb``
    (a check that has to fail when it is not 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (batch,), generator=g)
    torch.manual_seed(seed)
    base = fpc.mlp(widths, act="gelu").double()
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name in fpc.list_learners():
            ref = _measure(name, copy.deepcopy(base), x, y, iters)
            ref["grads"] = {k: v * (1 + perturb) for k, v in ref["grads"].items()}
            beta = fpc.learner_options(name).get("beta") if name == "ep" else None
            t = 0 if name == "bp" else iters
            cases = [("float32", torch.float32, "fp32", dtype_tol(widths, t, torch.float32, beta)),
                     ("float64", torch.float64, "fp32", dtype_tol(widths, t, torch.float64, beta)),
                     ("bf16", torch.float32, "bf16", BF16_TOL)]
            for label, dtype, precision, tol in cases:
                net = copy.deepcopy(base).to(device=device, dtype=dtype)
                xd, yd = x.to(device=device, dtype=dtype), y.to(device)
                try:
                    got = _measure(name, net, xd, yd, iters, precision)
                except Exception as e:  # recorded; the other learners still run
                    rows.append({"learner": name, "dtype": label, "quantity": "grads+step", "error": None,
                                 "tol": tol, "status": "fail", "note": f"{type(e).__name__}: {e}"[:300]})
                    continue
                for q in ("grads", "step"):
                    err = rel_error(got[q], ref[q])
                    rows.append({"learner": name, "dtype": label, "quantity": q, "error": err, "tol": tol,
                                 "status": "pass" if err <= tol else "fail", "note": ""})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows
