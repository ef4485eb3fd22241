"""Tolerances for comparing one quantity computed along two code paths.

Exact equality is kept only where it is the claim on every machine (the same code run twice,
a value zero by construction). Two different paths (nn.Linear vs the fast path's GEMM, a sum in
another order, another vectorised kernel or BLAS branch on another CPU) agree only to rounding:
a dot product or sum of n terms carries a relative error of at most about n·u (u = eps/2,
Higham, Accuracy and Stability of Numerical Algorithms, §3.1), so two such paths differ by at
most 2·n·u = n·eps of the magnitudes involved.
"""

from __future__ import annotations

import torch


def two_path_tol(dtype: torch.dtype, terms: int) -> dict[str, float]:
    """``assert_close`` tolerances for a value built from ``terms`` rounded terms (summed over
    every reduction on its way: dot products, batch sums) along two different code paths, on
    values of order one (``atol`` covers entries that cancel to near zero)."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=terms * eps, atol=terms * eps)
