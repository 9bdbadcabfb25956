"""PointNetLK (Aoki et al., CVPR 2019): Lucas-Kanade on global PointNet features.

The feature is ``phi(P) = max_i MLP(p_i)`` (five 1x1 Conv1d with bias, BatchNorm, ReLU; 1024-d).
Registration is inverse-compositional: the Jacobian of ``phi`` at the target (the "template") is
estimated once by finite differences along the six twist axes (step ``dt``), then each iteration
solves ``J dxi = phi(g . source) - phi(target)`` by least squares and updates
``g <- exp(-dxi) g``. Both clouds are first centred on their means, as in the reference setting.

Parameter names follow the checkpoint (``feature_model.conv1..5``, ``feature_model.bn1..5``,
``dt``), so ``load_state_dict(..., strict=True)`` works on ``pointnetlk_modelnet40.t7``.
Clouds are ``(B, N, 3)``; the returned ``(R, t)`` maps the source into the target.
"""

from __future__ import annotations

import os

import roma
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difficp.geometry import make_transform, transform_points


def hat(w: Tensor) -> Tensor:
    """Skew matrices ``(..., 3, 3)`` of vectors ``(..., 3)``: ``hat(w) @ x = w x x``."""
    zero = torch.zeros_like(w[..., 0])
    wx, wy, wz = w.unbind(-1)
    return torch.stack(
        [
            torch.stack([zero, -wz, wy], -1),
            torch.stack([wz, zero, -wx], -1),
            torch.stack([-wy, wx, zero], -1),
        ],
        -2,
    )


def se3_exp(xi: Tensor) -> Tensor:
    """Exponential map of twists ``(..., 6)`` = ``(omega, v)`` -> transforms ``(..., 4, 4)``.

    ``R = exp(hat(omega))``; ``t = V v`` with ``V = I + (1 - cos a)/a^2 W + (a - sin a)/a^3 W^2``
    (``a = |omega|``, ``W = hat(omega)``); the coefficients switch to their Taylor series near 0.
    """
    omega, v = xi[..., :3], xi[..., 3:]
    a2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    a = a2.clamp_min(1e-24).sqrt()
    small = a2 < 1e-8
    c1 = torch.where(small, 0.5 - a2 / 24, (1 - torch.cos(a)) / a2.clamp_min(1e-24))
    c2 = torch.where(small, 1 / 6 - a2 / 120, (a - torch.sin(a)) / (a2 * a).clamp_min(1e-36))
    W = hat(omega)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(W)
    V = eye + c1 * W + c2 * (W @ W)
    return make_transform(roma.rotvec_to_rotmat(omega), (V @ v[..., None])[..., 0])


class PointNetFeatures(nn.Module):
    """PointNet without T-nets: ``(B, N, 3)`` -> max-pooled ``(B, 1024)`` global feature."""

    def __init__(self, widths: tuple[int, ...] = (3, 64, 64, 64, 128, 1024)) -> None:
        super().__init__()
        self.depth = len(widths) - 1
        for i in range(self.depth):
            setattr(self, f"conv{i + 1}", nn.Conv1d(widths[i], widths[i + 1], kernel_size=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm1d(widths[i + 1]))

    def forward(self, points: Tensor) -> Tensor:
        h = points.transpose(1, 2)
        for i in range(1, self.depth + 1):
            h = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h)))
        return h.max(dim=-1).values


class PointNetLK(nn.Module):
    """PointNetLK registration. ``forward(source, target)`` -> ``(R (B,3,3), t (B,3))``.

    Args:
        max_iterations: LK iterations (10 in the reference setting).
        xtol: stop when every pair's update twist has norm below this.
    """

    dt: Tensor  # buffer: finite-difference steps (1, 6)

    def __init__(self, max_iterations: int = 10, xtol: float = 1e-7) -> None:
        super().__init__()
        self.feature_model = PointNetFeatures()
        self.register_buffer("dt", torch.full((1, 6), 0.01))
        self.max_iterations = max_iterations
        self.xtol = xtol

    def jacobian(self, template: Tensor, feature: Tensor) -> Tensor:
        """Finite-difference Jacobian ``(B, K, 6)`` of ``phi(exp(xi) template)`` at ``xi = 0``."""
        B, N, _ = template.shape
        dt = self.dt.to(template).expand(B, 6)
        # Perturb by exp(-dt_k e_k): J_k = (phi(template) - phi(exp(-dt_k e_k) template)) / dt_k.
        steps = se3_exp(-torch.diag_embed(dt))  # (B, 6, 4, 4)
        moved = transform_points(template[:, None], steps)  # (B, 6, N, 3)
        f = self.feature_model(moved.reshape(B * 6, N, 3)).view(B, 6, -1).transpose(1, 2)
        return (feature[..., None] - f) / dt[:, None, :]

    def forward(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mu_s, mu_t = source.mean(1, keepdim=True), target.mean(1, keepdim=True)
        p1, p0 = source - mu_s, target - mu_t
        f0 = self.feature_model(p0)
        J = self.jacobian(p0, f0)
        pinv = torch.linalg.pinv(J)  # (B, 6, K)
        g = torch.eye(4, dtype=source.dtype, device=source.device).repeat(len(source), 1, 1)
        for _ in range(self.max_iterations):
            r = self.feature_model(transform_points(p1, g)) - f0
            dx = -(pinv @ r[..., None])[..., 0]
            if float(dx.norm(dim=1).max()) < self.xtol:
                break
            g = se3_exp(dx) @ g
        # Undo the centring: x -> g (x - mu_s) + mu_t.
        R = g[:, :3, :3]
        t = g[:, :3, 3] + mu_t[:, 0] - (R @ mu_s[:, 0, :, None])[..., 0]
        return R, t


def load_pointnetlk(path: str | os.PathLike, **kwargs: float) -> PointNetLK:
    """PointNetLK from ``pointnetlk_modelnet40.t7`` (strict key match), in eval mode."""
    model = PointNetLK(**kwargs)  # type: ignore[arg-type]
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
