"""Correspondences (step 2): one class per ``ICPConfig.correspondence`` value, each finding the
partners of the moved source with :meth:`Correspondence.find` from the few numbers it needs
(:class:`MatchOptions`). The searches themselves are in :mod:`difficp.correspondence`; the
compiled twin of hard nearest-neighbour search is the KD forest of :mod:`difficp.kdtree`, which
the fused kernel runs; that of projective correspondence is :meth:`Projective.compiled_pixel`,
which :func:`difficp.fused.projective_iteration` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difficp.correspondence import (
    Correspondences,
    DepthTarget,
    nearest_correspondences,
    projective_correspondences,
    soft_correspondences,
)
from difficp.strategies.registry import Registry, compiled_helper


@dataclass(frozen=True)
class MatchOptions:
    """What a correspondence search reads from the config.

    Attributes:
        radius: hard search radius (hard rejection at ``max_distance``), None = unbounded.
        temperature: softmax temperature of soft partners (float or 0-d tensor).
        soft_k: soft partners over the ``soft_k`` nearest targets only (None = all).
        require_normals: partners without a normal are invalid (projective, normal metrics).
    """

    radius: float | None = None
    temperature: float | Tensor = 1e-3
    soft_k: int | None = None
    require_normals: bool = False


class Correspondence:
    """Finds each moved source point's partner."""

    name: str
    # Why the compiled path (difficp.fused) cannot run it; None: it can (its twin is the
    # KD forest search of difficp.kdtree).
    fused_reason: str | None = None
    # Whether the target is a depth map seen by a pinhole camera (else a point cloud).
    depth_target: bool = False

    def needs_index(self, soft_k: int | None) -> bool:
        """Whether it searches the target's :class:`~difficp.correspondence.NeighborIndex`
        (built once by :func:`~difficp.inputs.prepare_problem`)."""
        return False

    def find(self, moved: Tensor, target: Any, mask: Tensor, o: MatchOptions) -> Correspondences:
        """Partners of ``moved`` ``(B, N, 3)`` (real points: ``mask`` ``(B, N)``) in the
        prepared target (:class:`~difficp.correspondence.PointTarget` or :class:`DepthTarget`)."""
        raise NotImplementedError


CORRESPONDENCES: Registry[Correspondence] = Registry("correspondence")

_ONLY_HARD = "only hard (nearest-neighbour or projective) correspondences are compiled"


@CORRESPONDENCES.register("nearest")
class Nearest(Correspondence):
    """Hard nearest neighbour (exact; not differentiable in the choice of partner)."""

    def needs_index(self, soft_k: int | None) -> bool:
        return True

    def find(self, moved: Tensor, target: Any, mask: Tensor, o: MatchOptions) -> Correspondences:
        return nearest_correspondences(moved, target, mask, o.radius)


@CORRESPONDENCES.register("soft")
class Soft(Correspondence):
    """Softmax-weighted mean of the targets (differentiable)."""

    fused_reason = _ONLY_HARD

    def needs_index(self, soft_k: int | None) -> bool:
        return soft_k is not None  # the top-k search; all targets without it

    def find(self, moved: Tensor, target: Any, mask: Tensor, o: MatchOptions) -> Correspondences:
        return soft_correspondences(moved, target, o.temperature, mask, o.soft_k)


@CORRESPONDENCES.register("projective")
class Projective(Correspondence):
    """The depth-map pixel each source point projects onto."""

    depth_target = True

    def find(self, moved: Tensor, target: Any, mask: Tensor, o: MatchOptions) -> Correspondences:
        assert isinstance(target, DepthTarget)
        corr = projective_correspondences(moved, target, mask)
        if o.require_normals:
            has_normal = corr.normals is not None and corr.normals.detach().abs().sum(-1) > 0
            corr.valid = corr.valid & has_normal
        return corr

    @staticmethod
    def compiled_pixel(
        x: float, y: float, z: float, fx: float, fy: float, cx: float, cy: float, h: int, w: int
    ) -> int:
        """The compiled twin of the pixel choice of
        :func:`~difficp.correspondence.projective_correspondences`: the flat index ``row * w +
        col`` of the pixel of an ``h x w`` image that the camera-frame point ``(x, y, z)``
        projects onto (pinhole ``fx, fy, cx, cy``, rounded half to even as ``torch.round``),
        or -1 behind the camera or outside the image. Plain Python on floats (``math`` only)
        that :mod:`difficp.fused` compiles; the same operations in the same order as
        :func:`~difficp.geometry.points_to_pixels`, so the same pixel."""
        if not z > 0:
            return -1
        u = fx * x / z + cx
        v = fy * y / z + cy
        # Far outside rounds outside: checked first, so the rounding never sees huge values.
        if not (-1.0 <= u <= w and -1.0 <= v <= h):
            return -1
        col = _round_half_even(u)
        row = _round_half_even(v)
        if col < 0 or col > w - 1 or row < 0 or row > h - 1:
            return -1
        return int(row) * w + int(col)


@compiled_helper
def _round_half_even(value: float) -> float:
    """``value`` rounded to the nearest integer, ties to even (``torch.round``); exact, since
    ``value - floor(value)`` is for pixel coordinates (well below 2**52)."""
    floor = float(math.floor(value))
    rest = value - floor
    if rest > 0.5 or (rest == 0.5 and floor % 2 == 1):
        floor += 1.0
    return floor


def for_target(name: str, target: Any) -> Correspondence:
    """The strategy for config value ``name``; a depth-map target is always projective."""
    return CORRESPONDENCES["projective" if isinstance(target, DepthTarget) else name]


__all__ = ["CORRESPONDENCES", "Correspondence", "MatchOptions", "for_target"]
