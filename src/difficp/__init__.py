"""difficp: fully differentiable, batched ICP point-cloud registration in PyTorch.

>>> import difficp
>>> result = difficp.icp(source, target, metric="point_to_plane", target_normals=normals)  # doctest: +SKIP
"""

from difficp.config import ICPConfig
from difficp.correspondence import Correspondences, NeighborIndex
from difficp.geometry import (
    depth_normals,
    depth_to_points,
    invert_transform,
    make_transform,
    transform_points,
)
from difficp.icp import ICP, ICPResult, icp
from difficp.normals import estimate_normals

__all__ = [
    "ICP",
    "Correspondences",
    "ICPConfig",
    "ICPResult",
    "NeighborIndex",
    "depth_normals",
    "depth_to_points",
    "estimate_normals",
    "icp",
    "invert_transform",
    "make_transform",
    "transform_points",
]
__version__ = "0.1.0"
