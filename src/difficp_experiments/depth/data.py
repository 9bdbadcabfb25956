"""Depth-map pairs of the body mesh: seeded samples, batching, and point clouds.

A sample is drawn from ``(seed, split, index)`` alone (``numpy.random.default_rng([seed, split,
index])``), so any sample can be regenerated on its own, in any order, on any machine, and the
training split (``TRAIN``) never meets a test split (``TEST``) whatever the seeds.

One sample:
    * a viewpoint v: camera on a sphere around the body (random azimuth, elevation and
      distance), looking at the body's centre;
    * a rigid motion ``M`` *in v's camera frame*: a difficulty ``s ~ U(0, 1)``, then a rotation
      by ``s * max_angle_deg`` about a uniformly random axis through the body centre and a
      translation of length ``s * max_translation`` in a uniformly random direction. One shared
      ``s`` spreads the initial misalignment evenly from easy (0) to hard (about 1.4 m RMSE),
      so every bin of the success-vs-initial-distance curves is populated;
    * source = depth of the body seen from v, target = depth of ``M·body`` seen from v.
``M`` maps source camera-frame points onto target camera-frame points
(``target ~ source @ R.T + t``), the same convention as :func:`difficp.icp`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch import Tensor

from difficp._atomic import load_checkpoint, save_checkpoint
from difficp.geometry import depth_normals, depth_to_points
from difficp_experiments.depth.render import BODY_MESH, DepthRenderer, look_at, pinhole_intrinsics

TRAIN, VAL, TEST = 1, 2, 3  # split tags mixed into every sample's seed
BODY_CENTRE = np.array([0.0, 1.0, 0.0])  # centre of the 2 m body's bounding box (feet at y = 0)


@dataclass(frozen=True)
class SceneConfig:
    """How samples are drawn. Distances in metres, angles in degrees.

    cnn_res: side of the square depth maps the network sees.
    icp_res: side of the square depth maps turned into point clouds for ICP (may be finer).
    """

    cnn_res: int = 64
    icp_res: int = 64
    fov_deg: float = 45.0
    distance: tuple[float, float] = (3.25, 3.75)
    elevation_deg: tuple[float, float] = (-10.0, 30.0)
    look_jitter: float = 0.1
    max_angle_deg: float = 90.0
    max_translation: float = 1.0
    n_body_points: int = 1024
    min_valid: int = 30

    def intrinsics(self, res: int) -> Tensor:
        """``(3, 3)`` float32 intrinsics of a ``res`` x ``res`` camera."""
        return torch.from_numpy(pinhole_intrinsics(res, res, self.fov_deg)).float()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SceneConfig:
        d = dict(d)
        for key in ("distance", "elevation_deg"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def body_points(vertices: np.ndarray, n: int) -> np.ndarray:
    """A fixed subsample ``(n, 3)`` of the body's vertices, the points the error is measured on."""
    idx = np.random.default_rng(12345).choice(
        len(vertices), size=min(n, len(vertices)), replace=False
    )
    return np.asarray(vertices, dtype=np.float64)[np.sort(idx)]


def rmse_between(points: Tensor, T_a: Tensor, T_b: Tensor) -> Tensor:
    """``(B,)`` RMSE between ``points`` ``(B, N, 3)`` moved by ``T_a`` and by ``T_b`` (B, 4, 4)."""
    dR = T_a[:, :3, :3] - T_b[:, :3, :3]
    dt = T_a[:, :3, 3] - T_b[:, :3, 3]
    diff = points @ dR.transpose(1, 2) + dt[:, None]
    # The epsilon keeps sqrt's gradient finite when an estimate is exact.
    return (diff.square().sum(-1).mean(-1) + 1e-12).sqrt()


class DepthPairs(torch.utils.data.Dataset):
    """``n`` samples ``(seed, split, offset + i)``, rendered on demand.

    Items are dicts of tensors:
        ``depth`` ``(2, r, r)`` source and target depth at ``cnn_res`` (0 = no hit);
        ``icp_depth`` ``(2, R, R)`` the same at ``icp_res``;
        ``transform`` ``(4, 4)`` the true motion ``M`` (source camera frame -> target);
        ``body`` ``(n_body_points, 3)`` body points in the source camera frame;
        ``init_rmse`` ``()`` the RMSE of ``body`` under ``M`` vs identity (the initial distance).
    """

    def __init__(
        self,
        renderer: DepthRenderer,
        config: SceneConfig,
        seed: int,
        split: int,
        n: int,
        offset: int = 0,
    ) -> None:
        self.renderer = renderer
        self.config = config
        self.seed, self.split, self.n, self.offset = seed, split, n, offset
        self.body_world = body_points(renderer.vertices, config.n_body_points)
        self.K_cnn = pinhole_intrinsics(config.cnn_res, config.cnn_res, config.fov_deg)
        self.K_icp = pinhole_intrinsics(config.icp_res, config.icp_res, config.fov_deg)

    def __len__(self) -> int:
        return self.n

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One viewpoint ``T_cw`` ``(4, 4)`` and motion ``M`` ``(4, 4)`` (camera frame)."""
        c = self.config
        az = rng.uniform(0, 2 * math.pi)
        el = math.radians(rng.uniform(*c.elevation_deg))
        dist = rng.uniform(*c.distance)
        look = BODY_CENTRE + rng.uniform(-c.look_jitter, c.look_jitter, 3)
        eye = look + dist * np.array(
            [math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)]
        )
        T_cw = look_at(eye, look)
        s = rng.uniform(0, 1)  # difficulty
        axis = rng.normal(size=3)
        angle = math.radians(s * c.max_angle_deg)
        R = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
        direction = rng.normal(size=3)
        t = direction / np.linalg.norm(direction) * s * c.max_translation
        centre = T_cw[:3, :3].T @ (BODY_CENTRE - T_cw[:3, 3])  # body centre, camera frame
        M = np.eye(4)
        M[:3, :3] = R
        M[:3, 3] = centre + t - R @ centre  # rotate about the body centre, then translate
        return T_cw, M

    def views(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample ``i``'s camera pose ``T_cw``, motion ``M`` ``(4, 4)`` and depth ``(2, r, r)``.

        A draw whose source or target shows fewer than ``min_valid`` pixels is redrawn from the
        same generator, so the result still depends on ``(seed, split, index)`` only.
        """
        if not 0 <= i < self.n:
            raise IndexError(i)
        c = self.config
        rng = np.random.default_rng([self.seed, self.split, self.offset + i])
        for _ in range(100):
            T_cw, M = self._draw(rng)
            # Depth of M·body from T_cw == depth of body from M^-1 moved camera: T_cw M^-1.
            T_target = T_cw @ np.linalg.inv(M)
            depth = np.stack(
                [
                    self.renderer.render(T, self.K_cnn, c.cnn_res, c.cnn_res)
                    for T in (T_cw, T_target)
                ]
            )
            if (depth > 0).sum(axis=(1, 2)).min() >= c.min_valid:
                break
        return T_cw, M, depth

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        c = self.config
        T_cw, M, depth = self.views(i)
        T_target = T_cw @ np.linalg.inv(M)
        if c.icp_res == c.cnn_res:
            icp_depth = depth
        else:
            icp_depth = np.stack(
                [
                    self.renderer.render(T, self.K_icp, c.icp_res, c.icp_res)
                    for T in (T_cw, T_target)
                ]
            )
        body = (self.body_world - T_cw[:3, 3]) @ T_cw[:3, :3]  # world -> source camera frame
        moved = body @ M[:3, :3].T + M[:3, 3]
        return {
            "depth": torch.from_numpy(depth),
            "icp_depth": torch.from_numpy(icp_depth),
            "transform": torch.from_numpy(M).float(),
            "body": torch.from_numpy(body).float(),
            "init_rmse": torch.tensor(float(np.sqrt(((moved - body) ** 2).sum(-1).mean()))),
        }


def open_renderer(data_dir: Path) -> DepthRenderer:
    """The body-mesh renderer from the data directory (``scans/human/...obj``)."""
    path = Path(data_dir) / BODY_MESH
    if not path.is_file():
        raise FileNotFoundError(f"body mesh not found: {path} (check --data-dir / $DIFFICP_DATA)")
    return DepthRenderer.from_file(path)


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack a list of samples into a batch (every field gains a leading ``B``)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def load_or_build(path: Path, dataset: DepthPairs, progress: bool = True) -> dict[str, Tensor]:
    """The whole of ``dataset`` as one batch, cached in ``path`` (``.pt``).

    The cache is reused only if it was built from the same seed, split, size and scene config;
    otherwise it is rebuilt. This is how the fixed test set is "written to disk once".
    """
    from tqdm import tqdm

    meta = {
        "seed": dataset.seed,
        "split": dataset.split,
        "n": dataset.n,
        "offset": dataset.offset,
        "config": dataset.config.to_dict(),
    }
    path = Path(path)
    if path.is_file():
        try:
            blob = load_checkpoint(path, fallback=False)
        except Exception:  # a truncated or foreign cache file: render it again
            blob = {"meta": "null"}
        if json.loads(blob["meta"]) == json.loads(json.dumps(meta)):
            return blob["data"]
    items = [
        dataset[i]
        for i in tqdm(
            range(len(dataset)), desc=f"render {path.name}", disable=not progress, leave=False
        )
    ]
    data = collate(items)
    save_checkpoint({"meta": json.dumps(meta), "data": data}, path, keep_previous=False)
    return data


def depth_to_clouds(
    depth: Tensor,
    intrinsics: Tensor,
    max_jump: float = 0.1,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Back-project depth maps to padded point clouds with normals.

    Args:
        depth: ``(B, H, W)`` z-depth, 0 = no hit.
        intrinsics: ``(3, 3)`` or ``(B, 3, 3)``.
        max_jump: drop pixels whose 4-neighbours differ in depth by more than this (metres):
            there the central-difference normal straddles a depth edge and is meaningless.
        max_points: keep at most this many points per cloud (a random subset; all if None).
    Returns:
        ``points`` ``(B, N, 3)``, ``normals`` ``(B, N, 3)`` (facing the camera), ``lengths``
        ``(B,)``; rows past a cloud's length are zero padding. ``N`` = the largest count.
    """
    pts_map = depth_to_points(depth, intrinsics)
    nrm_map = depth_normals(pts_map)
    pad = torch.nn.functional.pad(depth[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    jump = torch.stack(
        [
            (pad[:, 1:-1, 2:] - depth).abs(),
            (pad[:, 1:-1, :-2] - depth).abs(),
            (pad[:, 2:, 1:-1] - depth).abs(),
            (pad[:, :-2, 1:-1] - depth).abs(),
        ]
    ).amax(0)
    keep = (depth > 0) & (nrm_map.abs().sum(-1) > 0) & (jump < max_jump)
    B = depth.shape[0]
    keep = keep.reshape(B, -1)
    # Random keys for valid pixels, +inf for invalid ones: sorting puts the valid pixels first in
    # random order (so truncation to max_points is a uniform subsample) without a Python loop.
    keys = (
        torch.rand(keep.shape, generator=generator)
        if max_points is not None
        else torch.arange(keep.shape[1], dtype=torch.float32).expand(B, -1)
    )
    keys = torch.where(keep, keys, torch.full_like(keys, math.inf))
    order = keys.argsort(dim=1)
    lengths = keep.sum(1)
    if max_points is not None:
        lengths = lengths.clamp(max=max_points)
    n = max(int(lengths.max()), 1)
    idx = order[:, :n, None].expand(-1, -1, 3)
    points = pts_map.reshape(B, -1, 3).gather(1, idx)
    normals = nrm_map.reshape(B, -1, 3).gather(1, idx)
    valid = torch.arange(n)[None] < lengths[:, None]
    points = torch.where(valid[..., None], points, torch.zeros_like(points))
    normals = torch.where(valid[..., None], normals, torch.zeros_like(normals))
    return points, normals, lengths
