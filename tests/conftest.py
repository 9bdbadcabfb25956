"""Shared fixtures: the data directory and synthetic registration scenes with known poses."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from difficp.geometry import make_transform, random_rotation, transform_points

# Tests run in parallel worker processes (pytest -n 2 on 2 cores): one intra-op thread each
# avoids oversubscription, which slows small tensor ops tenfold.
torch.set_num_threads(1)
# search_backend="auto" compiles the fast path in the test process, as tests expect it to run,
# rather than in a background process (difficp.fused.compile_now).
os.environ.setdefault("DIFFICP_COMPILE", "now")

# Every valid (metric, solver) pair of ICPConfig.
METRIC_SOLVER_COMBOS = [
    ("point_to_point", "svd"),
    ("point_to_point", "linear"),
    ("point_to_point", "lm"),
    ("point_to_plane", "linear"),
    ("point_to_plane", "lm"),
    ("symmetric", "linear"),
    ("symmetric", "lm"),
]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$DIFFICP_DATA``, or skip the test when the external data is not available."""
    value = os.environ.get("DIFFICP_DATA")
    if not value or not Path(value).is_dir():
        pytest.skip("needs the external data: set DIFFICP_DATA (see README)")
    return Path(value)


def wavy_surface(
    n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth closed 'blobby sphere' with analytic normals: points and normals ``(n, 3)``.

    Radius r(u) = 1 + 0.2 sin(3 theta) cos(2 phi) makes it asymmetric, so registration is
    well posed (no symmetry to slide along).
    """
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    u = v / v.norm(dim=1, keepdim=True)
    theta = torch.arccos(u[:, 2].clamp(-1, 1))
    phi = torch.atan2(u[:, 1], u[:, 0])
    r = 1 + 0.2 * torch.sin(3 * theta) * torch.cos(2 * phi) + 0.1 * torch.sin(phi)
    pts = u * r[:, None]
    # Normal of the implicit surface |x| - r(u) = 0 by autograd (exact, no PCA noise).
    x = pts.clone().requires_grad_(True)
    ux = x / x.norm(dim=1, keepdim=True)
    th = torch.arccos(ux[:, 2].clamp(-1 + 1e-12, 1 - 1e-12))
    ph = torch.atan2(ux[:, 1], ux[:, 0])
    f = x.norm(dim=1) - (1 + 0.2 * torch.sin(3 * th) * torch.cos(2 * ph) + 0.1 * torch.sin(ph))
    (grad,) = torch.autograd.grad(f.sum(), x)
    normals = grad / grad.norm(dim=1, keepdim=True)
    return pts.to(dtype), normals.to(dtype)


def random_pose(
    generator: torch.Generator, max_angle_deg: float, max_translation: float, dtype=torch.float64
) -> torch.Tensor:
    R = random_rotation(max_angle_deg=max_angle_deg, generator=generator, dtype=dtype)
    t = (
        (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1)
        * max_translation
        / math.sqrt(3)
    )
    return make_transform(R, t.to(dtype))


def make_pair(
    seed: int,
    n: int = 1500,
    angle: float = 10.0,
    translation: float = 0.1,
    noise: float = 0.0,
    overlap: float = 1.0,
    outliers: float = 0.0,
    dtype: torch.dtype = torch.float64,
    resample: bool = True,
) -> dict:
    """A source/target pair with a known transform ``target = T source``.

    With ``resample`` both clouds are independent samples of the surface (so no exact point
    matches, which biases point-to-point ICP); otherwise the target is the moved source. With
    ``overlap < 1`` each keeps a different cap; ``noise`` is Gaussian sigma; ``outliers`` a fraction
    of uniform points added to the target.
    """
    g = torch.Generator().manual_seed(seed)
    src, src_n = wavy_surface(n, g, dtype)
    tgt0, tgt0_n = wavy_surface(n, g, dtype)
    if not resample:
        tgt0, tgt0_n = src.clone(), src_n.clone()
    if overlap < 1:
        keep_s = src[:, 0] < torch.quantile(src[:, 0], overlap)
        keep_t = tgt0[:, 0] > torch.quantile(tgt0[:, 0], 1 - overlap)
        src, src_n = src[keep_s], src_n[keep_s]
        tgt0, tgt0_n = tgt0[keep_t], tgt0_n[keep_t]
    T = random_pose(g, angle, translation, dtype)
    tgt = transform_points(tgt0, T)
    tgt_n = tgt0_n @ T[:3, :3].T
    if noise > 0:
        src = src + noise * torch.randn(src.shape, generator=g, dtype=torch.float64).to(dtype)
        tgt = tgt + noise * torch.randn(tgt.shape, generator=g, dtype=torch.float64).to(dtype)
    if outliers > 0:
        k = int(outliers * len(tgt))
        out = (torch.rand(k, 3, generator=g, dtype=torch.float64) * 3 - 1.5).to(dtype)
        out_n = torch.nn.functional.normalize(
            torch.randn(k, 3, generator=g, dtype=torch.float64), dim=1
        ).to(dtype)
        tgt = torch.cat([tgt, transform_points(out, T)])
        tgt_n = torch.cat([tgt_n, out_n])
    return {
        "source": src,
        "target": tgt,
        "source_normals": src_n,
        "target_normals": tgt_n,
        "transform": T,
    }


@pytest.fixture
def pair() -> dict:
    return make_pair(0)
