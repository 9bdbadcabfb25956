"""Robust kernels (IRLS weights from metric residuals): one class per kernel, each with its
PyTorch ``weight`` and its compiled twin ``compiled_weight`` beside it.

``compiled_weight(r, k)`` is plain Python on floats (``math`` only): :mod:`difficp.fused`
compiles it with numba and dispatches to it by :meth:`Registry.code`, so this module does not
import numba. The parity test (tests/test_fused.py) runs every registered kernel on both paths.

To add a kernel: one class here, registered with ``@KERNELS.register("name")``, with both
methods; ``ICPConfig.robust_kernel`` then accepts ``"name"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difficp.strategies.registry import Registry

# The smallest normal float64: a floor for divisors (as torch.finfo(float64).tiny).
_TINY64 = 2.2250738585072014e-308


class RobustKernel:
    """IRLS weight ``w(r) = rho'(r) / r`` of residual norms ``r >= 0`` with scale ``k``."""

    name: str | None

    def weight(self, r: Tensor, k: Tensor) -> Tensor:
        """``(B, N)`` weights of residual norms ``r`` ``(B, N)``; ``k`` a 0-d tensor."""
        raise NotImplementedError

    # The compiled twin, ``compiled_weight(r: float, k: float) -> float``: the same weight for
    # one residual in float64, plain Python that numba compiles (a staticmethod). A kernel
    # without one sets ``fused_reason`` instead (tests/test_fused.py checks one is there).
    compiled_weight: Callable[[float, float], float] | None = None
    fused_reason: str | None = None


KERNELS: Registry[RobustKernel] = Registry("robust_kernel")


@KERNELS.register(None)
class NoKernel(RobustKernel):
    """No robust kernel: every weight 1 (code 0; the compiled kernel skips the call)."""

    def weight(self, r: Tensor, k: Tensor) -> Tensor:
        return torch.ones_like(r)

    @staticmethod
    def compiled_weight(r: float, k: float) -> float:
        return 1.0


@KERNELS.register("huber")
class Huber(RobustKernel):
    """1 if r <= k else k / r."""

    def weight(self, r: Tensor, k: Tensor) -> Tensor:
        return torch.where(r <= k, torch.ones_like(r), k / r.clamp_min(torch.finfo(r.dtype).tiny))

    @staticmethod
    def compiled_weight(r: float, k: float) -> float:
        return 1.0 if r <= k else k / max(r, _TINY64)


@KERNELS.register("cauchy")
class Cauchy(RobustKernel):
    """1 / (1 + (r/k)^2)."""

    def weight(self, r: Tensor, k: Tensor) -> Tensor:
        return 1 / (1 + (r / k) ** 2)

    @staticmethod
    def compiled_weight(r: float, k: float) -> float:
        return 1.0 / (1.0 + (r / k) ** 2)


@KERNELS.register("geman_mcclure")
class GemanMcClure(RobustKernel):
    """(k^2 / (k^2 + r^2))^2."""

    def weight(self, r: Tensor, k: Tensor) -> Tensor:
        return (k**2 / (k**2 + r**2)) ** 2

    @staticmethod
    def compiled_weight(r: float, k: float) -> float:
        return (k * k / (k * k + r * r)) ** 2


@KERNELS.register("tukey")
class Tukey(RobustKernel):
    """(1 - (r/k)^2)^2 if r <= k else 0."""

    def weight(self, r: Tensor, k: Tensor) -> Tensor:
        return torch.where(r <= k, (1 - (r / k) ** 2) ** 2, torch.zeros_like(r))

    @staticmethod
    def compiled_weight(r: float, k: float) -> float:
        return (1.0 - (r / k) ** 2) ** 2 if r <= k else 0.0


def robust_weights(residual: Tensor, kernel: str | None, scale: float | Tensor) -> Tensor:
    """IRLS weights of the kernel named ``kernel`` for residual norms ``residual`` ``(B, N)``."""
    k = torch.as_tensor(scale, dtype=residual.dtype, device=residual.device)
    return KERNELS[kernel].weight(residual.abs(), k)


__all__ = ["KERNELS", "RobustKernel", "robust_weights"]
