"""ModelNet h5 loading and the registration protocols of the benchmark.

Files: the standard ``modelnet40_ply_hdf5_2048`` folder (``ply_data_{train,test}*.h5`` with datasets
``data`` (N, P, 3) and ``label`` (N, 1)), and the same-format files of the project's data directory
(``modelnet10/modelnet10_poisson1024_{split}.h5`` in raw mesh units, and
``modelnet40_airplane/modelnet40_resampled_airplane_first2048_{split}.h5``, already normalised).

Conventions: points are row vectors ``(N, 3)``; a pair's ground truth ``(R, t)`` maps the source
into the target, ``target = source @ R.T + t`` (before any permutation, noise or cropping of the
target). Every pair is generated from ``numpy.random.default_rng([seed, index])``, so the pair with
a given index is the same for every method, every run and any ``--limit``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("modelnet10", "modelnet40", "modelnet40_airplane")
PROTOCOLS = ("clean", "unseen", "noise", "noise_independent", "partial")

# DCP's settings (Wang & Solomon 2019): 1024 points, Euler angles in [0, 45] degrees per axis,
# translations in [-0.5, 0.5]; Gaussian jitter sigma 0.01 clipped at 0.05.
NUM_POINTS = 1024
MAX_ANGLE_DEG = 45.0
MAX_TRANSLATION = 0.5
NOISE_SIGMA = 0.01
NOISE_CLIP = 0.05
# RPM-Net's partial setting: a random plane keeps 70% of each cloud.
PARTIAL_KEEP = 0.7


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre each shape on its bounding-box centre and scale it into the unit sphere.

    Args:
        points: ``(N, P, 3)`` shapes in any units.
    Returns:
        ``(N, P, 3)`` float32 with every shape's farthest point at distance 1 from its centre.
    """
    pts = points.astype(np.float64)
    centre = 0.5 * (pts.max(axis=1, keepdims=True) + pts.min(axis=1, keepdims=True))
    pts = pts - centre
    radius = np.linalg.norm(pts, axis=-1).max(axis=1)[:, None, None]
    return (pts / np.maximum(radius, 1e-12)).astype(np.float32)


def _read_h5(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``data`` ``(N, P, 3)`` and ``label`` ``(N,)`` of several h5 files."""
    datas, labels = [], []
    for f in files:
        with h5py.File(f, "r") as h:
            datas.append(np.asarray(h["data"][:], dtype=np.float32)[..., :3])
            labels.append(np.asarray(h["label"][:], dtype=np.int64).reshape(-1))
    return np.concatenate(datas, axis=0), np.concatenate(labels, axis=0)


def dataset_files(data_dir: str | os.PathLike, dataset: str, split: str) -> list[Path]:
    """The h5 files of ``dataset``'s ``split`` (``"train"`` or ``"test"``) under ``data_dir``.

    ``modelnet40`` looks for ``ply_data_{split}*.h5`` in ``data_dir/modelnet40_ply_hdf5_2048`` or in
    ``data_dir`` itself (so either the folder or its parent can be given).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir)
    if dataset == "modelnet10":
        candidates = [root / "modelnet10" / f"modelnet10_poisson1024_{split}.h5"]
    elif dataset == "modelnet40_airplane":
        name = f"modelnet40_resampled_airplane_first2048_{split}.h5"
        candidates = [root / "modelnet40_airplane" / name]
    else:
        candidates = []
        for folder in (root / "modelnet40_ply_hdf5_2048", root):
            candidates = sorted(Path(p) for p in glob.glob(str(folder / f"ply_data_{split}*.h5")))
            if candidates:
                break
    files = [c for c in candidates if c.is_file()]
    if not files:
        raise FileNotFoundError(f"no {dataset} {split} h5 file found under {root}")
    return files


def load_modelnet(
    data_dir: str | os.PathLike, dataset: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split: points ``(N, P, 3)`` float32 inside the unit sphere, labels ``(N,)``.

    ModelNet10's raw mesh units are normalised here; the ModelNet40 files already are (normalising
    them again would only change shapes whose farthest point is not exactly at radius 1).
    """
    points, labels = _read_h5(dataset_files(data_dir, dataset, split))
    if dataset == "modelnet10":
        points = normalize_unit_sphere(points)
    return points, labels


def euler_xyz_to_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """``R = Rx(ax) @ Ry(ay) @ Rz(az)`` for ``angles_rad = (ax, ay, az)``, DCP's composition."""
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rx @ Ry @ Rz


def jitter(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DCP's noise: i.i.d. Gaussian sigma 0.01 per coordinate, clipped to [-0.05, 0.05]."""
    noise = np.clip(NOISE_SIGMA * rng.standard_normal(points.shape), -NOISE_CLIP, NOISE_CLIP)
    return points + noise


def crop_by_plane(
    points: np.ndarray, rng: np.random.Generator, keep: float = PARTIAL_KEEP
) -> np.ndarray:
    """Keep the ``keep`` fraction of ``points`` ``(P, 3)`` on one side of a random plane.

    The plane's normal is uniform on the sphere; the points farthest along it are kept (so the
    plane passes wherever it must to keep exactly ``round(keep * P)`` points), as in RPM-Net.
    """
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    height = (points - points.mean(axis=0)) @ direction
    n_keep = round(keep * len(points))
    order = np.argsort(-height, kind="stable")
    return points[np.sort(order[:n_keep])]


@dataclass(frozen=True)
class Pair:
    """One registration problem.

    Attributes:
        source: ``(N, 3)`` float32.
        target: ``(M, 3)`` float32.
        rotation: ``(3, 3)`` float32 ground truth, ``target ~ source @ R.T + t``.
        translation: ``(3,)`` float32.
        label: class index of the shape.
    """

    source: np.ndarray
    target: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    label: int


def make_pair(
    shape: np.ndarray,
    protocol: str,
    rng: np.random.Generator,
    label: int = -1,
    num_points: int = NUM_POINTS,
) -> Pair:
    """Build the pair of ``protocol`` from one shape ``(P, 3)`` (the first ``num_points`` are used).

    ``clean`` and ``unseen``: target = R source + t exactly; ``noise``: DCP's jitter applied to the
    source before the target is made from it (both share the noise); ``noise_independent``: fresh
    jitter on each cloud; ``partial``: each cloud cropped by its own random plane (70% kept), then
    independent jitter. Both clouds are randomly permuted.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    src = shape[:num_points].astype(np.float64)
    angles = rng.uniform(0.0, np.deg2rad(MAX_ANGLE_DEG), size=3)
    R = euler_xyz_to_matrix(angles)
    t = rng.uniform(-MAX_TRANSLATION, MAX_TRANSLATION, size=3)
    tgt_body = src.copy()  # the target's points in the source frame, before R, t
    if protocol == "noise":
        src = jitter(src, rng)
        tgt_body = src.copy()
    elif protocol == "noise_independent":
        tgt_body = jitter(src, rng)
        src = jitter(src, rng)
    elif protocol == "partial":
        tgt_body = jitter(crop_by_plane(src, rng), rng)
        src = jitter(crop_by_plane(src, rng), rng)
    tgt = tgt_body @ R.T + t
    src = src[rng.permutation(len(src))]
    tgt = tgt[rng.permutation(len(tgt))]
    return Pair(
        source=src.astype(np.float32),
        target=tgt.astype(np.float32),
        rotation=R.astype(np.float32),
        translation=t.astype(np.float32),
        label=int(label),
    )


def unseen_class_split(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the shapes in the first half of the classes (train) and in the rest (test)."""
    first_half = labels < num_classes // 2
    return first_half, ~first_half


NUM_CLASSES = {"modelnet10": 10, "modelnet40": 40, "modelnet40_airplane": 1}


class ModelNetPairs(Dataset):
    """Registration pairs from ModelNet shapes, deterministic per index.

    Args:
        points: ``(N, P, 3)`` normalised shapes; labels: ``(N,)``.
        protocol: one of :data:`PROTOCOLS`. ``unseen`` keeps only the second half of the classes
            when ``split == "test"`` and the first half when ``split == "train"``.
        split: ``"train"`` or ``"test"`` (only used by ``unseen``).
        seed: base seed; pair ``i`` uses ``default_rng([seed, i])``.
        num_points: points taken from each shape before cropping.
        num_classes: classes of the dataset (for ``unseen``).
        shuffle: visit the shapes in a fixed random order (from ``seed``) instead of file order,
            so the first ``n`` pairs (``--limit n``) mix all classes (files are sorted by class).
    Items are dicts of float32 tensors: ``source`` (N, 3), ``target`` (M, 3), ``rotation`` (3, 3),
    ``translation`` (3,), and ``label`` / ``index`` ints.
    """

    def __init__(
        self,
        points: np.ndarray,
        labels: np.ndarray,
        protocol: str = "clean",
        split: str = "test",
        seed: int = 0,
        num_points: int = NUM_POINTS,
        num_classes: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if points.shape[1] < num_points:
            raise ValueError(f"shapes have {points.shape[1]} points, fewer than {num_points}")
        if protocol == "unseen":
            n_cls = int(num_classes if num_classes is not None else labels.max() + 1)
            if n_cls < 2:
                raise ValueError("the unseen protocol needs at least two classes")
            train_mask, test_mask = unseen_class_split(labels, n_cls)
            keep = train_mask if split == "train" else test_mask
            points, labels = points[keep], labels[keep]
        order = (
            np.random.default_rng(seed).permutation(len(points))
            if shuffle
            else np.arange(len(points))
        )
        self.points = points[order]
        self.labels = labels[order]
        self.protocol = protocol
        self.seed = seed
        self.num_points = num_points

    def __len__(self) -> int:
        return len(self.points)

    def pair(self, index: int, seed: int | None = None) -> Pair:
        """The :class:`Pair` of ``index`` (with ``seed`` overriding the dataset's)."""
        rng = np.random.default_rng([self.seed if seed is None else seed, index])
        return make_pair(
            self.points[index], self.protocol, rng, int(self.labels[index]), self.num_points
        )

    def __getitem__(self, index: int) -> dict:
        p = self.pair(index)
        return {
            "source": torch.from_numpy(p.source),
            "target": torch.from_numpy(p.target),
            "rotation": torch.from_numpy(p.rotation),
            "translation": torch.from_numpy(p.translation),
            "label": p.label,
            "index": index,
        }
