"""Kept-ratio allocation across layers: IPRS (importance-proportional, capped at 1, excess redistributed) and
uniform; and the solve for the global kept ratio that meets a requested compression with exact accounting."""

from __future__ import annotations

from typing import Callable

import numpy as np


def iprs(importance: list[float], mean_kept: float) -> list[float]:
    """Per-layer kept ratios proportional to ``importance`` with mean ``mean_kept`` (budget C = r * L), none
    above 1: layers that would exceed 1 are fixed at 1 and the remaining budget is re-spread over the rest."""
    t = np.asarray(importance, dtype=np.float64)
    if (t < 0).any() or not np.isfinite(t).all():
        raise ValueError(f"importance scores must be finite and >= 0, got {t.tolist()}")
    n = len(t)
    if mean_kept >= 1.0:
        return [1.0] * n
    t = np.where(t > 0, t, 1e-12)  # a zero-importance layer still gets a (tiny) share
    w = np.zeros(n)
    fixed = np.zeros(n, dtype=bool)
    budget = mean_kept * n
    while True:
        free = ~fixed
        w[free] = t[free] / t[free].sum() * (budget - fixed.sum())
        over = free & (w > 1.0)
        if not over.any():
            break
        fixed |= over
        w[over] = 1.0
    return w.tolist()


def uniform(importance: list[float], mean_kept: float) -> list[float]:
    return [min(1.0, mean_kept)] * len(importance)


ALLOCATORS = {"iprs": iprs, "uniform": uniform}


def solve_mean_kept(allocate: Callable[[float], list[float]], params_after: Callable[[list[float]], int],
                    target_params: int, iterations: int = 50) -> tuple[float, list[float]]:
    """Bisection on the mean kept ratio r so that params_after(allocate(r)) meets target_params; among the
    integer-rounded outcomes it returns the one closest to the target."""
    lo, hi = 0.0, 1.0
    best = (float("inf"), 1.0, allocate(1.0))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        kept = allocate(mid)
        got = params_after(kept)
        if abs(got - target_params) < best[0]:
            best = (abs(got - target_params), mid, kept)
        if got > target_params:
            hi = mid
        else:
            lo = mid
    return best[1], best[2]
