"""The weight of the unsupervised (consistency) loss over training: a sigmoid-shaped ramp-up.

Semi-supervised methods trust the other network's pseudo-labels little at first, when both are
poor, and more as training proceeds (Laine & Aila 2017; SSL4MIS). The weight at iteration ``i`` of
``total`` is ``w(i) = max_weight * exp(-5 * (1 - t)^2)`` with ``t = clip(i / total, 0, 1)``: it rises
from ``max_weight * e^-5`` (0.0067 * max_weight) to ``max_weight`` at the last iteration.
"""

from __future__ import annotations

import math

__all__ = ["sigmoid_ramp_up", "RampUpWeight"]


def sigmoid_ramp_up(iteration: float, total: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(iteration / total, 0, 1)``; 1.0 when ``total <= 0``."""
    if total <= 0:
        return 1.0
    t = min(max(float(iteration) / float(total), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class RampUpWeight:
    """``w(i) = max_weight * sigmoid_ramp_up(i, total)``: the CPS/consistency weight ``w_cps(i)``.

    Args:
        total: iterations of the whole run (the ramp ends there; resumed runs keep the same ramp).
        max_weight: the final weight (0.1 in the CCT-R paper and SSL4MIS).
    """

    def __init__(self, total: int, max_weight: float = 0.1):
        if int(total) < 1:
            raise ValueError(f"RampUpWeight: total must be a positive number of iterations, got {total!r}")
        if float(max_weight) < 0:
            raise ValueError(f"RampUpWeight: max_weight must be >= 0, got {max_weight!r}")
        self.total = int(total)
        self.max_weight = float(max_weight)

    def __call__(self, iteration: int) -> float:
        return self.max_weight * sigmoid_ramp_up(iteration, self.total)

    def __repr__(self) -> str:
        return f"RampUpWeight(total={self.total}, max_weight={self.max_weight})"
