"""Rejection (step 4): how a margin to a threshold becomes a keep-weight, one class per mode,
each with its PyTorch ``keep`` and its compiled twin ``compiled_keep`` beside it.

The margin is positive on the kept side: ``max_distance - d`` for distances, ``n_s . n_t -
cos(max_normal_angle)`` for normals. ``compiled_keep`` is plain Python on floats (compiled by
:mod:`difficp.fused`, dispatched by :meth:`Registry.code`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difficp.strategies.registry import Registry

# A soft-rejection keep-weight below this counts as rejected (exactly 0). The sigmoid is never 0,
# and the solvers are invariant to a common scale of the weights, so a pair whose every
# correspondence is rejected by a wide margin (weights ~1e-80) would otherwise take full steps
# on them and report converged=True instead of being lost.
NEGLIGIBLE_WEIGHT = 1e-12


class Rejection:
    """Keep-weight in ``[0, 1]`` of a margin to a threshold."""

    name: str
    # Whether a partner beyond the distance threshold has weight exactly 0, so that the search
    # may stop at the threshold (a bounded radius; Open3D's max_correspondence_distance).
    bounds_search: bool = False

    def keep(self, margin: Tensor, temperature: float | Tensor) -> Tensor:
        """``(B, N)`` keep-weights of margins ``(B, N)``."""
        raise NotImplementedError

    # The compiled twin, ``compiled_keep(margin: float, temperature: float) -> float``: the
    # same for one margin in float64, plain Python that numba compiles (a staticmethod). A mode
    # without one sets ``fused_reason`` instead (tests/test_fused.py checks one is there).
    compiled_keep: Callable[[float, float], float] | None = None
    fused_reason: str | None = None


REJECTIONS: Registry[Rejection] = Registry("rejection")


@REJECTIONS.register("hard")
class HardRejection(Rejection):
    """A 0/1 mask: kept when the margin is >= 0 (on the threshold counts as kept)."""

    bounds_search = True

    def keep(self, margin: Tensor, temperature: float | Tensor) -> Tensor:
        return (margin >= 0).to(margin.dtype)

    @staticmethod
    def compiled_keep(margin: float, temperature: float) -> float:
        return 1.0 if margin >= 0 else 0.0


def soft_keep(margin: Tensor, temperature: float | Tensor) -> Tensor:
    """``sigmoid(margin / temperature)``, with values below :data:`NEGLIGIBLE_WEIGHT` set to 0."""
    s = torch.sigmoid(margin / temperature)
    return torch.where(s > NEGLIGIBLE_WEIGHT, s, torch.zeros_like(s))


@REJECTIONS.register("soft")
class SoftRejection(Rejection):
    """``sigmoid(margin / temperature)``: differentiable in the thresholds; 0 when negligible."""

    def keep(self, margin: Tensor, temperature: float | Tensor) -> Tensor:
        return soft_keep(margin, temperature)

    @staticmethod
    def compiled_keep(margin: float, temperature: float) -> float:
        x = margin / temperature
        s = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
        return s if s > NEGLIGIBLE_WEIGHT else 0.0


__all__ = ["NEGLIGIBLE_WEIGHT", "REJECTIONS", "Rejection", "soft_keep"]
