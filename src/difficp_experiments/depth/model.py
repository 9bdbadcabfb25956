"""A small CNN that predicts the rigid motion between two depth maps of the same body."""

from __future__ import annotations

from dataclasses import dataclass

import roma
import torch
from torch import Tensor, nn

from difficp.geometry import depth_to_points, make_transform


def _block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: statistics do not depend on the batch, so the network
    # behaves the same when fine-tuned through ICP with small batches and at test time.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2),
        nn.GroupNorm(8, c_out),
        nn.ReLU(inplace=True),
    )


@dataclass(frozen=True)
class PoseCNNConfig:
    """The architecture of a :class:`PoseCNN` (besides its camera), saved with its weights.

    Attributes:
        res: side of the square input depth maps, in pixels (a multiple of 16).
        width: channels of the first layer (doubling twice).
        depth_offset: subtracted from valid depths (about the camera distance).
        hidden: width of the hidden layer of the regression head.
    """

    res: int = 64
    width: int = 32
    depth_offset: float = 3.5
    hidden: int = 256


class PoseCNN(nn.Module):
    """Pose regression from a stacked source/target depth pair.

    Input channels (built inside :meth:`forward`): source and target depth minus
    ``depth_offset`` (0 where invalid), the two validity masks, and two pixel-coordinate channels
    (CoordConv), so that convolutions can tell *where* in the image the body is.

    Output parametrisation (why: it makes the easy part of the answer free). With ``c_s``, ``c_t``
    the centroids of the back-projected source and target points, the predicted motion is
    ``x -> R (x - c_s) + c_t + delta``: rotate about the source centroid, move to the target
    centroid, plus a learned correction ``delta`` (visible-surface centroids are not the same
    physical point once the body turns). ``R`` comes from a 6-D output through
    ``roma.special_gramschmidt`` (continuous, Zhou et al. 2019).

    Args:
        intrinsics: ``(3, 3)`` camera of the input depth maps (needed for the centroids).
        config: the architecture (:class:`PoseCNNConfig`; its defaults when None).
    """

    # buffers (register_buffer)
    intrinsics: Tensor
    base6d: Tensor
    coords: Tensor

    def __init__(self, intrinsics: Tensor, config: PoseCNNConfig | None = None) -> None:
        super().__init__()
        self.config = PoseCNNConfig() if config is None else config
        res, w, hidden = self.config.res, self.config.width, self.config.hidden
        self.register_buffer("intrinsics", torch.as_tensor(intrinsics, dtype=torch.float32))
        self.features = nn.Sequential(
            _block(6, w, 5),
            _block(w, 2 * w, 3),
            _block(2 * w, 4 * w, 3),
            _block(4 * w, 4 * w, 3),
        )
        side = res // 16
        last = nn.Linear(hidden, 9)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, hidden), nn.ReLU(inplace=True), last
        )
        # Start at "no rotation, move centroid onto centroid": zero last layer; identity 6-D base.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.register_buffer("base6d", torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        v, u = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
        self.register_buffer("coords", torch.stack([u, v]))

    def centroids(self, depth: Tensor) -> Tensor:
        """``(B, 2, 3)`` centroids of the back-projected source and target depth maps."""
        B, res = depth.shape[0], self.config.res
        pts = depth_to_points(depth.reshape(B * 2, res, res), self.intrinsics)
        valid = (depth.reshape(B * 2, -1) > 0).to(pts.dtype)
        total = (pts.reshape(B * 2, -1, 3) * valid[..., None]).sum(1)
        return (total / valid.sum(1, keepdim=True).clamp_min(1)).reshape(B, 2, 3)

    def forward(self, depth: Tensor) -> Tensor:
        """``depth`` ``(B, 2, res, res)`` (source, target; 0 = invalid) -> ``(B, 4, 4)`` motion."""
        B, res = depth.shape[0], self.config.res
        if depth.shape[1:] != (2, res, res):
            raise ValueError(f"depth must be (B, 2, {res}, {res}), got {tuple(depth.shape)}")
        mask = (depth > 0).to(depth.dtype)
        shifted = depth - self.config.depth_offset
        x = torch.cat([shifted * mask, mask, self.coords.expand(B, -1, -1, -1).to(depth)], dim=1)
        out = self.head(self.features(x))
        R = roma.special_gramschmidt(self.base6d + out[:, :6].reshape(B, 3, 2))
        c = self.centroids(depth)
        c_s, c_t = c[:, 0], c[:, 1]
        t = c_t + out[:, 6:] - (R @ c_s[..., None])[..., 0]
        return make_transform(R, t)
