"""Embedded deformation graph (Sumner, Schmid and Pauly, SIGGRAPH 2007).

A sparse set of graph nodes ``g_j`` is sampled on the source (farthest point sampling). Each node
carries a local transform ``(A_j, t_j)`` acting in its neighbourhood, and every source point is
skinned to its ``k`` nearest nodes:

    x_i = sum_j w_ij [A_j (v_i - g_j) + g_j + t_j],   w_ij ~ (1 - |v_i - g_j| / d_max)^2 (sum 1),

with ``d_max`` the distance to the ``(k+1)``-th nearest node. Two regularisers keep the motion
plausible where the data do not constrain it (e.g. the unseen back of a partial scan):

* rigidity (``rot``, only for ``rotation="affine"``): the columns of ``A_j`` orthonormal,
  ``(c1.c2)^2 + (c1.c3)^2 + (c2.c3)^2 + (c1.c1 - 1)^2 + (c2.c2 - 1)^2 + (c3.c3 - 1)^2``;
* smoothness (``reg``): node ``j``'s transform predicts its graph neighbour ``n`` where ``n`` went,
  ``|A_j (g_n - g_j) + g_j + t_j - (g_n + t_n)|^2``.

``rotation="affine"`` is the paper's parametrisation (``A_j`` an unconstrained 3x3, 12 parameters
per node; the data term is then linear in the parameters and only ``rot`` is not). ``"rotvec"``
makes ``A_j = exp([omega_j]x)`` a true rotation (6 parameters per node, no ``rot`` term needed).

Jacobians are row-sparse (a point depends on ``k`` nodes, an edge on 2, a rigidity term on 1) and
come from forward-mode autograd on those local parameters (:func:`rowwise_jacobian`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from difficp.geometry import rotvec_to_rotmat
from difficp.nonrigid.model import (
    DeformationModel,
    ResidualBlock,
    as_batched_points,
    rowwise_jacobian,
)

Rotation = Literal["affine", "rotvec"]


def farthest_point_sampling(points: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """``(B, k)`` indices of ``k`` points picked by farthest point sampling (starting at index 0).

    Args:
        points: ``(B, N, 3)``.
        mask: ``(B, N)`` bool of real points (padding is never picked), or None.
    """
    B, N, _ = points.shape
    p = points.detach()
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=p.device)
    dist = torch.where(
        mask,
        torch.full((B, N), float("inf"), dtype=p.dtype, device=p.device),
        torch.full((B, N), -1.0, dtype=p.dtype, device=p.device),
    )
    current = torch.zeros(B, dtype=torch.long, device=p.device)
    chosen = []
    ar = torch.arange(B, device=p.device)
    for _ in range(k):  # loop over samples, vectorised over batch and points
        chosen.append(current)
        d = ((p - p[ar, current][:, None]) ** 2).sum(-1)
        dist = torch.where(mask, torch.minimum(dist, d), dist)
        current = dist.argmax(1)
    return torch.stack(chosen, 1)


def _gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``(B, K, C...)`` at ``index`` ``(B, ...)`` -> ``(B, ..., C...)``."""
    B = values.shape[0]
    flat = index.reshape(B, -1)
    out = values[torch.arange(B, device=values.device)[:, None], flat]
    return out.reshape(*index.shape, *values.shape[2:])


def _safe_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance over the last axis, with a zero (not NaN) gradient at coincidence."""
    sq = ((a - b) ** 2).sum(-1)
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


class EmbeddedDeformationGraph(DeformationModel):
    """Embedded deformation graph on a source point cloud (Sumner et al. 2007).

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` source points (differentiable: nodes and skinning
            weights are functions of them; only the *choice* of nodes and neighbours is not).
        num_nodes: graph nodes ``K`` per cloud (farthest point sampling).
        skin_k: nodes each point is skinned to.
        graph_k: graph neighbours of each node (k nearest other nodes) for the smoothness term.
        rotation: ``"affine"`` (3x3 per node + rigidity term) or ``"rotvec"`` (rotation vector).
        rot_weight: weight of the rigidity (orthonormality) term (dimensionless residuals).
        smooth_weight: weight of the smoothness term (residuals in the units of the points).
        source_normals: ``(B, N, 3)`` unit normals, or None (deformed with the blended node
            rotations, re-normalised).
        lengths: ``(B,)`` valid counts of a padded batch, or None.

    Parameters ``(B, K * q)``: node ``j`` owns ``[j*q, (j+1)*q)``, ``q = 12`` (``A`` row-major,
    then ``t``) for affine or ``q = 6`` (``omega``, ``t``) for rotvec; zero deformation is
    ``A = I, t = 0``.
    """

    def __init__(
        self,
        source: Tensor,
        num_nodes: int = 64,
        skin_k: int = 4,
        graph_k: int = 6,
        rotation: Rotation = "affine",
        rot_weight: float = 1.0,
        smooth_weight: float = 10.0,
        source_normals: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> None:
        self.rest_points, self.unbatched = as_batched_points("source", source)
        B = self.rest_points.shape[0]
        if rotation not in ("affine", "rotvec"):
            raise ValueError(f"rotation must be 'affine' or 'rotvec', got {rotation!r}")
        device = self.rest_points.device
        self.lengths = None if lengths is None else torch.as_tensor(lengths, device=device)
        mask = self.valid_mask()
        min_count = int(mask.sum(1).min())
        if not 2 <= skin_k + 1 <= num_nodes <= min_count:
            raise ValueError(
                f"need skin_k + 1 <= num_nodes <= points per cloud, got skin_k={skin_k}, "
                f"num_nodes={num_nodes}, smallest cloud {min_count} points"
            )
        if not 1 <= graph_k < num_nodes:
            raise ValueError(f"graph_k must be in [1, num_nodes - 1], got {graph_k}")
        if source_normals is not None and source_normals.dim() == 2:
            source_normals = source_normals[None]
        self.rest_normals = None if source_normals is None else source_normals.to(self.rest_points)
        self.rotation = rotation
        self.q = 12 if rotation == "affine" else 6
        self.num_nodes, self.skin_k, self.graph_k = num_nodes, skin_k, graph_k
        self.rot_weight, self.smooth_weight = rot_weight, smooth_weight

        # Nodes: sampled source points (their positions stay differentiable in the source).
        self.node_index = farthest_point_sampling(self.rest_points, num_nodes, mask)  # (B, K)
        self.nodes = _gather_rows(self.rest_points, self.node_index)  # (B, K, 3)
        # Skinning: k nearest nodes, Sumner's weights with d_max = distance to the (k+1)-th.
        with torch.no_grad():
            d_all = torch.cdist(self.rest_points, self.nodes)
            nearest = d_all.topk(skin_k + 1, dim=-1, largest=False).indices  # (B, N, k+1)
        node_pos = _gather_rows(self.nodes, nearest)  # (B, N, k+1, 3)
        d = _safe_distance(self.rest_points[:, :, None], node_pos)
        d_max = d[..., -1:].clamp_min(torch.finfo(d.dtype).eps)
        w = (1 - d[..., :-1] / d_max).clamp_min(0) ** 2
        self.skin_index = nearest[..., :-1]  # (B, N, k)
        self.skin_weights = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        # Graph edges: each node to its graph_k nearest other nodes.
        with torch.no_grad():
            dn = torch.cdist(self.nodes, self.nodes)
            neigh = dn.topk(graph_k + 1, dim=-1, largest=False).indices[..., 1:]  # (B, K, gk)
        self.edge_from = torch.arange(num_nodes, device=neigh.device).repeat_interleave(graph_k)
        self.edge_from = self.edge_from.expand(B, -1)  # (B, E)
        self.edge_to = neigh.reshape(B, -1)  # (B, E)

    # ----- parameters -------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.num_nodes * self.q

    def initial_params(self) -> Tensor:
        B = self.rest_points.shape[0]
        theta = self.rest_points.new_zeros(B, self.num_nodes, self.q)
        if self.rotation == "affine":
            theta[..., :9] = torch.eye(3, dtype=theta.dtype, device=theta.device).reshape(9)
        return theta.reshape(B, -1)

    def node_transforms(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Per-node parameters ``(..., q)`` -> ``A`` ``(..., 3, 3)`` and ``t`` ``(..., 3)``."""
        if self.rotation == "affine":
            return theta[..., :9].unflatten(-1, (3, 3)), theta[..., 9:12]
        return rotvec_to_rotmat(theta[..., :3]), theta[..., 3:6]

    def _param_index(self, nodes: Tensor) -> Tensor:
        """Node ids ``(B, ...)`` -> global parameter ids ``(B, ..., q)``."""
        return nodes[..., None] * self.q + torch.arange(self.q, device=nodes.device)

    # ----- deformation ------------------------------------------------------------------
    def _local_points(self, theta_local: Tensor) -> Tensor:
        """``(B, N, k*q)`` parameters of each point's nodes -> ``(B, N, 3)`` deformed points."""
        A, t = self.node_transforms(theta_local.unflatten(-1, (self.skin_k, self.q)))
        g = _gather_rows(self.nodes, self.skin_index)  # (B, N, k, 3)
        offset = (self.rest_points[:, :, None] - g)[..., None]  # (B, N, k, 3, 1)
        moved = (A @ offset)[..., 0] + g + t
        return (self.skin_weights[..., None] * moved).sum(-2)

    def _theta_local(self, params: Tensor) -> Tensor:
        theta = params.unflatten(-1, (self.num_nodes, self.q))
        return _gather_rows(theta, self.skin_index).flatten(-2)  # (B, N, k*q)

    def deform(self, params: Tensor) -> Tensor:
        return self._local_points(self._theta_local(params))

    def deform_normals(self, params: Tensor) -> Tensor | None:
        if self.rest_normals is None:
            return None
        theta = params.unflatten(-1, (self.num_nodes, self.q))
        A, _ = self.node_transforms(_gather_rows(theta, self.skin_index))  # (B, N, k, 3, 3)
        rotated = (A @ self.rest_normals[:, :, None, :, None])[..., 0]  # (B, N, k, 3)
        n = (self.skin_weights[..., None] * rotated).sum(-2)
        return n / n.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(n.dtype).tiny)

    def point_jacobian(self, params: Tensor) -> tuple[Tensor, Tensor]:
        jac = rowwise_jacobian(self._local_points, self._theta_local(params))  # (B, N, 3, k*q)
        return jac, self._param_index(self.skin_index).flatten(-2)

    def deformed_nodes(self, params: Tensor) -> Tensor:
        """``(B, K, 3)`` where the nodes went: ``g_j + t_j``."""
        _, t = self.node_transforms(params.unflatten(-1, (self.num_nodes, self.q)))
        return self.nodes + t

    # ----- regularisers -----------------------------------------------------------------
    def _rot_residuals(self, theta_node: Tensor) -> Tensor:
        """``(B, K, q)`` -> ``(B, K, 6)`` orthonormality residuals of the columns of ``A``."""
        A, _ = self.node_transforms(theta_node)
        c1, c2, c3 = A[..., :, 0], A[..., :, 1], A[..., :, 2]
        res = torch.stack(
            [
                (c1 * c2).sum(-1),
                (c1 * c3).sum(-1),
                (c2 * c3).sum(-1),
                (c1 * c1).sum(-1) - 1,
                (c2 * c2).sum(-1) - 1,
                (c3 * c3).sum(-1) - 1,
            ],
            -1,
        )
        return res * self.rot_weight**0.5

    def _smooth_residuals(self, theta_edge: Tensor) -> Tensor:
        """``(B, E, 2q)`` parameters of (from, to) nodes -> ``(B, E, 3)`` smoothness residuals."""
        A_j, t_j = self.node_transforms(theta_edge[..., : self.q])
        _, t_n = self.node_transforms(theta_edge[..., self.q :])
        g_j = _gather_rows(self.nodes, self.edge_from)
        g_n = _gather_rows(self.nodes, self.edge_to)
        pred = (A_j @ (g_n - g_j)[..., None])[..., 0] + g_j + t_j
        return (pred - (g_n + t_n)) * self.smooth_weight**0.5

    def regularizers(self, params: Tensor, with_jacobian: bool = True) -> list[ResidualBlock]:
        theta = params.unflatten(-1, (self.num_nodes, self.q))
        blocks = []
        if self.rotation == "affine" and self.rot_weight > 0:
            node_ids = torch.arange(self.num_nodes, device=params.device)
            index = self._param_index(node_ids.expand(params.shape[0], -1))
            jac = rowwise_jacobian(self._rot_residuals, theta) if with_jacobian else None
            blocks.append(ResidualBlock(self._rot_residuals(theta), jac, index))
        if self.smooth_weight > 0:
            theta_edge = torch.cat(
                [_gather_rows(theta, self.edge_from), _gather_rows(theta, self.edge_to)], -1
            )
            jac = rowwise_jacobian(self._smooth_residuals, theta_edge) if with_jacobian else None
            index = torch.cat(
                [self._param_index(self.edge_from), self._param_index(self.edge_to)], -1
            )
            blocks.append(ResidualBlock(self._smooth_residuals(theta_edge), jac, index))
        return blocks


__all__ = ["EmbeddedDeformationGraph", "farthest_point_sampling"]
