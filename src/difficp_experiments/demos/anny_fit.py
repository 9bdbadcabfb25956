"""Optional example: fit the pose and shape of the ``anny`` parametric body to a depth map.

``anny`` (PyPI, Apache-2.0 code, CC0 MakeHuman assets) is a differentiable human body model,
an open stand-in for SMPL: ``pose`` (a local 4x4 transform per bone) and ``phenotype`` parameters
(gender, age, muscle, weight, height, proportions in [0, 1]) -> mesh vertices. Wrapped as a
:class:`DeformationModel` it is fitted by the same :func:`nonrigid_icp` as the embedded
deformation graph, with Jacobians by forward-mode autograd through anny's torch skinning.

It is an optional extra (about 600 MB of dependencies, a first build of several minutes and
~800 MB of cache): ``pip install anny``. Nothing else in difficp imports this module.

    python -m difficp_experiments.demos.anny_fit --out results/nonrigid_anny
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difficp._atomic import atomic_write_text
from difficp.geometry import depth_to_points, points_to_pixels, rotvec_to_rotmat
from difficp.nonrigid.icp import nonrigid_icp
from difficp.nonrigid.model import DeformationModel
from difficp_experiments.demos.nonrigid import camera_visibility

# Joints whose rotation is fitted (the big limb joints); every other bone keeps its rest pose.
DEFAULT_JOINTS = (
    "upperarm01.L",
    "upperarm01.R",
    "lowerarm01.L",
    "lowerarm01.R",
    "upperleg01.L",
    "upperleg01.R",
    "lowerleg01.L",
    "lowerleg01.R",
)


def load_anny(dtype: torch.dtype = torch.float32) -> Any:
    """The anny full-body model with torch linear blend skinning (forward-mode autograd works
    through it; the default NVIDIA Warp skinning has no forward-mode derivative)."""
    try:
        import anny
    except ImportError as err:  # pragma: no cover - optional extra
        raise ImportError("the anny example needs the optional package: pip install anny") from err
    return anny.Anny(skinning_method="lbs").to(dtype)


class AnnyBodyModel(DeformationModel):
    """anny as a deformation model.

    Parameters ``(B, P)``, ``P = 6 + 3 * len(joints) + 6``: a global rotation vector and
    translation (applied to the whole body, about the origin), a rotation vector per fitted joint
    (its local rotation; 0 = rest pose) and the 6 phenotypes (0.5 = average).

    Args:
        body: an ``anny.Anny`` model (see :func:`load_anny`).
        joints: names of the bones whose rotation is fitted.
        batch: number of bodies fitted at once.
        pose_prior, shape_prior: weights of the priors ``|joint rotvec|^2`` and
            ``|phenotype - 0.5|^2`` (the regulariser residuals): a depth map sees one side of the
            body, and shape and pose trade off against each other without them.
    """

    def __init__(
        self,
        body: Any,
        joints: tuple[str, ...] = DEFAULT_JOINTS,
        batch: int = 1,
        pose_prior: float = 1e-3,
        shape_prior: float = 1e-1,
    ) -> None:
        self.body = body
        self.pose_prior, self.shape_prior = pose_prior, shape_prior
        labels = list(body.bone_labels)
        missing = [j for j in joints if j not in labels]
        if missing:
            raise ValueError(f"unknown anny bones {missing}; choose among {labels}")
        self.joint_index = torch.tensor([labels.index(j) for j in joints])
        self.num_bones = len(labels)
        self.phenotypes = list(body.phenotype_labels)
        self.faces = body.get_triangular_faces()
        self.batch = batch
        with torch.no_grad():
            rest = self.deform(self.initial_params())
        self.rest_points = rest
        self.unbatched = False
        self.lengths = None

    @property
    def num_params(self) -> int:
        return 6 + 3 * len(self.joint_index) + len(self.phenotypes)

    def initial_params(self) -> Tensor:
        dtype = self.body.template_vertices.dtype
        p = torch.zeros(self.batch, self.num_params, dtype=dtype)
        p[:, -len(self.phenotypes) :] = 0.5
        return p

    def split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``params`` -> global rotvec ``(B, 3)``, translation ``(B, 3)``, joint rotvecs
        ``(B, J, 3)``, phenotypes ``(B, 6)``."""
        n_j = len(self.joint_index)
        return (
            params[:, :3],
            params[:, 3:6],
            params[:, 6 : 6 + 3 * n_j].unflatten(-1, (n_j, 3)),
            params[:, 6 + 3 * n_j :],
        )

    def _pose(self, joint_rotvecs: Tensor) -> Tensor:
        """``(B, J, 3)`` -> ``(B, bones, 4, 4)`` local pose transforms (identity elsewhere)."""
        B = joint_rotvecs.shape[0]
        dtype = joint_rotvecs.dtype
        # one-hot placement keeps this free of in-place writes (torch.func friendly)
        onehot = torch.zeros(len(self.joint_index), self.num_bones, dtype=dtype)
        onehot[torch.arange(len(self.joint_index)), self.joint_index] = 1
        delta = rotvec_to_rotmat(joint_rotvecs) - torch.eye(3, dtype=dtype)  # (B, J, 3, 3)
        R = torch.eye(3, dtype=dtype) + torch.einsum("jk,bjxy->bkxy", onehot, delta)
        top = torch.cat([R, torch.zeros(B, self.num_bones, 3, 1, dtype=dtype)], -1)
        bottom = torch.tensor([0, 0, 0, 1], dtype=dtype).expand(B, self.num_bones, 1, 4)
        return torch.cat([top, bottom], -2)

    def regularizer_residuals(self, params: Tensor) -> Tensor:
        _, _, joints, pheno = self.split(params)
        return torch.cat(
            [joints.flatten(1) * self.pose_prior**0.5, (pheno - 0.5) * self.shape_prior**0.5], -1
        )

    def deform(self, params: Tensor) -> Tensor:
        rotvec, translation, joints, pheno = self.split(params)
        kwargs = {name: pheno[:, i] for i, name in enumerate(self.phenotypes)}
        out = self.body(pose_parameters=self._pose(joints), phenotype_kwargs=kwargs)
        verts = out["vertices"]
        return verts @ rotvec_to_rotmat(rotvec).transpose(-1, -2) + translation[:, None]

    def deform_normals(self, params: Tensor) -> Tensor | None:
        """Area-weighted vertex normals of the posed mesh (used for visibility weights)."""
        v = self.deform(params)
        return vertex_normals(v, self.faces)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """``(B, V, 3)`` unit vertex normals of a triangle mesh ``faces`` ``(F, 3)``."""
    a, b, c = (vertices[:, faces[:, i]] for i in range(3))
    fn = torch.cross(b - a, c - a, dim=-1)  # (B, F, 3), length = 2 * area
    n = torch.zeros_like(vertices)
    for i in range(3):
        n = n.index_add(1, faces[:, i], fn)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def render_depth(
    vertices: Tensor,
    faces: Tensor,
    K: Tensor,
    world_to_cam: Tensor,
    size: tuple[int, int],
    samples: int = 200_000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A z-buffered depth map ``(H, W)`` of a mesh ``(V, 3)``, by splatting dense surface samples
    (uniform by area) into the nearest pixel and keeping the closest (0 = no surface)."""
    H, W = size
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    area = torch.cross(b - a, c - a, dim=-1).norm(dim=-1)
    tri = torch.multinomial(area, samples, replacement=True, generator=generator)
    u, v = torch.rand(2, samples, 1, generator=generator, dtype=vertices.dtype)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    pts = a[tri] + u * (b[tri] - a[tri]) + v * (c[tri] - a[tri])
    cam = pts @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    uv, z = points_to_pixels(cam[None], K[None])
    uv, z = uv[0], z[0]
    col, row = uv[:, 0].round().long(), uv[:, 1].round().long()
    ok = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    flat = (row * W + col)[ok]
    depth = torch.full((H * W,), float("inf"), dtype=vertices.dtype)
    depth = depth.scatter_reduce(0, flat, z[ok], reduce="amin")
    return torch.where(torch.isfinite(depth), depth, torch.zeros_like(depth)).reshape(H, W)


def run_anny_fit(
    out_dir: str | Path | None = None, seed: int = 0, iterations: int = 12
) -> dict[str, Any]:
    """Pose and shape a body, render its depth map from the front, fit anny to the depth points.

    Reports the mean vertex error to the true posed body (m) before and after, and the
    phenotype / joint-angle errors.
    """
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    body = load_anny(torch.float32)
    model = AnnyBodyModel(body)
    true = model.initial_params().clone()
    n_j = len(model.joint_index)
    joint_true = 0.5 * (torch.rand(1, n_j, 3, generator=g) - 0.5)  # up to ~15 degrees per axis
    joint_true[0, 2:4, 0] += 0.6  # elbows bent
    true[:, 6 : 6 + 3 * n_j] = joint_true.reshape(1, -1)
    true[:, -6:] = 0.5 + 0.3 * (torch.rand(1, 6, generator=g) - 0.5)
    true[:, 3:6] = torch.tensor([[0.03, -0.02, 0.01]])
    with torch.no_grad():
        true_vertices = model.deform(true)[0]
    # A camera 2.5 m in front (anny faces -y, z is up), 320 x 400 pixels.
    c = torch.tensor([0.0, -2.5, 0.0])
    R = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
    world_to_cam = torch.eye(4)
    world_to_cam[:3, :3] = R
    world_to_cam[:3, 3] = -R @ c
    K = torch.tensor([[360.0, 0, 160], [0, 360.0, 200], [0, 0, 1]])
    depth = render_depth(true_vertices, model.faces, K, world_to_cam, (400, 320), generator=g)
    depth = torch.where(depth > 0, depth + 0.003 * torch.randn(depth.shape, generator=g), depth)
    cam_points = depth_to_points(depth[None], K[None])[0].reshape(-1, 3)[depth.reshape(-1) > 0]
    target = (cam_points - world_to_cam[:3, 3]) @ R  # back to the world frame
    start = time.perf_counter()
    result = nonrigid_icp(
        None,
        target,
        model,
        solver="linear",
        metric="point_to_point",
        max_distance=0.15,
        max_iterations=iterations,
        return_history=True,
        source_weights=camera_visibility(c[None]),
    )
    seconds = time.perf_counter() - start
    assert result.rmse_history is not None  # asked for with return_history
    fitted = result.points[0].detach()
    rest = model.rest_points[0]
    pheno_fit = model.split(result.params.detach())[3][0]
    metrics = {
        "vertex_error_before": float((rest - true_vertices).norm(dim=-1).mean()),
        "vertex_error_after": float((fitted - true_vertices).norm(dim=-1).mean()),
        "phenotype_error_before": float((true[0, -6:] - 0.5).abs().mean()),
        "phenotype_error_after": float((pheno_fit - true[0, -6:]).abs().mean()),
        "target_points": int(target.shape[0]),
        "model_vertices": int(rest.shape[0]),
        "parameters": model.num_params,
        "iterations": int(result.iterations[0]),
        "seconds": seconds,
        "rmse_history": [float(x) for x in result.rmse_history[0]],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        _plot(rest, fitted, target, true_vertices, out / "anny_fit.png", metrics)
    return metrics


def _plot(
    rest: Tensor, fitted: Tensor, target: Tensor, true: Tensor, path: Path, metrics: dict[str, Any]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 6))
    for ax, pts, title in [
        (axes[0], rest, f"before: {metrics['vertex_error_before'] * 1000:.0f} mm"),
        (axes[1], fitted, f"after: {metrics['vertex_error_after'] * 1000:.1f} mm"),
    ]:
        t = target.numpy()
        p = pts.numpy()
        ax.scatter(t[:, 0], t[:, 2], s=0.3, c="0.6", label="depth-map points")
        ax.scatter(p[::3, 0], p[::3, 2], s=0.3, c="tab:red", label="anny vertices")
        ax.set_aspect("equal")
        ax.set_title(f"mean vertex error {title}")
        ax.legend(loc="lower right", fontsize=8, markerscale=10)
    fig.suptitle("anny body: pose + shape fitted to a front depth map by non-rigid ICP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="fit anny's pose and shape to a depth map")
    parser.add_argument("--out", default="nonrigid_anny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=12)
    args = parser.parse_args()
    m = run_anny_fit(args.out, args.seed, args.iterations)
    print(json.dumps({k: v for k, v in m.items() if k != "rmse_history"}, indent=2))


if __name__ == "__main__":
    main()


__all__ = ["AnnyBodyModel", "load_anny", "render_depth", "run_anny_fit", "vertex_normals"]
