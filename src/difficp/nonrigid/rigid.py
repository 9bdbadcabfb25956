"""Rigid motion as a deformation model: 6 parameters about an initial transform.

``params = (omega, v)`` ``(B, 6)`` define ``T(params) = [exp([omega]x) | v] @ T_init``: the rotation
vector and translation of a correction applied on the left of ``T_init`` (the same convention as
the rigid ICP's updates), so ``params = 0`` is ``T_init``. Fitting it by non-rigid ICP reproduces
rigid ICP; it is also the smallest model to test the generic (dense, autograd) code path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difficp.geometry import make_transform, rotate_vectors, rotvec_to_rotmat, transform_points
from difficp.nonrigid.model import DeformationModel, as_batched_points


class RigidModel(DeformationModel):
    """``points = source @ R(params).T + t(params)``, with ``T(params) = [exp(omega) | v] @ init``.

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` source points.
        init: ``(4, 4)`` or ``(B, 4, 4)`` initial source-to-target transform (default identity).
        source_normals: ``(B, N, 3)`` unit normals, or None.
        lengths: ``(B,)`` valid counts of a padded batch, or None.
    """

    def __init__(
        self,
        source: Tensor,
        init: Tensor | None = None,
        source_normals: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> None:
        self.rest_points, self.unbatched = as_batched_points("source", source)
        B = self.rest_points.shape[0]
        dtype, device = self.rest_points.dtype, self.rest_points.device
        if init is None:
            init = torch.eye(4, dtype=dtype, device=device)
        init = init.to(dtype=dtype, device=device)
        if init.shape[-2:] != (4, 4):
            raise ValueError(f"init must be (4, 4) or (B, 4, 4), got {tuple(init.shape)}")
        self.init = init.expand(B, 4, 4) if init.dim() == 2 else init
        if source_normals is not None and source_normals.dim() == 2:
            source_normals = source_normals[None]
        self.rest_normals = source_normals
        self.lengths = lengths
        # Pre-move the source by init once; params then act on the moved points.
        self._moved = transform_points(self.rest_points, self.init)
        self._moved_normals = (
            None if source_normals is None else rotate_vectors(source_normals.to(dtype), self.init)
        )

    @property
    def num_params(self) -> int:
        return 6

    def initial_params(self) -> Tensor:
        return self.rest_points.new_zeros(self.rest_points.shape[0], 6)

    def correction(self, params: Tensor) -> Tensor:
        """``(B, 4, 4)`` the left correction ``[exp([omega]x) | v]``."""
        return make_transform(rotvec_to_rotmat(params[..., :3]), params[..., 3:])

    def transform(self, params: Tensor) -> Tensor:
        """``(B, 4, 4)`` full source-to-target transform ``T(params)``."""
        return self.correction(params) @ self.init

    def deform(self, params: Tensor) -> Tensor:
        R = rotvec_to_rotmat(params[..., :3])
        return self._moved @ R.transpose(-1, -2) + params[..., None, 3:]

    def deform_normals(self, params: Tensor) -> Tensor | None:
        if self._moved_normals is None:
            return None
        return self._moved_normals @ rotvec_to_rotmat(params[..., :3]).transpose(-1, -2)


__all__ = ["RigidModel"]
