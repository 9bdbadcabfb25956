"""difficp: fully differentiable, batched ICP point-cloud registration in PyTorch.

>>> import difficp
>>> result = difficp.icp(source, target, metric="point_to_plane", target_normals=normals)  # doctest: +SKIP

Attributes and submodules load on first use (PEP 562), so ``import difficp`` and the command
line's ``--help`` / ``--version`` do not pay for importing PyTorch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_ATTRIBUTES: dict[str, str] = {
    "ICP": "difficp.registration",
    "icp": "difficp.registration",
    "ICPResult": "difficp.loop",
    "ICPConfig": "difficp.config",
    "Correspondences": "difficp.correspondence",
    "NeighborIndex": "difficp.correspondence",
    "depth_normals": "difficp.geometry",
    "depth_to_points": "difficp.geometry",
    "estimate_normals": "difficp.normals",
    "evaluate_registration": "difficp.evaluation",
    "RegistrationEvaluation": "difficp.evaluation",
    "estimate_covariances": "difficp.normals",
    "regularize_covariances": "difficp.normals",
    "Cloud": "difficp.interop",
    "as_points": "difficp.interop",
    "VoxelGrid": "difficp.sampling",
    "multiscale_icp": "difficp.sampling",
    "parse_scales": "difficp.sampling",
    "voxel_downsample": "difficp.sampling",
    "invert_transform": "difficp.geometry",
    "make_transform": "difficp.geometry",
    "transform_points": "difficp.geometry",
}

# public submodules, importable as attributes after ``import difficp`` (``difficp.io.read_...``)
_SUBMODULES = frozenset(
    {
        "config",
        "correspondence",
        "evaluation",
        "geometry",
        "implicit",
        "inputs",
        "interop",
        "io",
        "loop",
        "metrics",
        "nonrigid",
        "normals",
        "registration",
        "sampling",
        "softmatch",
        "solvers",
        "strategies",
        "weighting",
    }
)

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from difficp import (  # noqa: F401
        config,
        correspondence,
        evaluation,
        geometry,
        implicit,
        inputs,
        interop,
        io,
        loop,
        metrics,
        nonrigid,
        normals,
        registration,
        sampling,
        softmatch,
        solvers,
        strategies,
        weighting,
    )
    from difficp.config import ICPConfig
    from difficp.correspondence import Correspondences, NeighborIndex
    from difficp.evaluation import RegistrationEvaluation, evaluate_registration
    from difficp.geometry import (
        depth_normals,
        depth_to_points,
        invert_transform,
        make_transform,
        transform_points,
    )
    from difficp.interop import Cloud, as_points
    from difficp.loop import ICPResult
    from difficp.normals import estimate_covariances, estimate_normals, regularize_covariances
    from difficp.registration import ICP, icp
    from difficp.sampling import VoxelGrid, multiscale_icp, parse_scales, voxel_downsample


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"difficp.{name}")
    else:
        raise AttributeError(f"module 'difficp' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ATTRIBUTES, *_SUBMODULES})


__all__ = [
    "ICP",
    "Cloud",
    "Correspondences",
    "ICPConfig",
    "ICPResult",
    "NeighborIndex",
    "RegistrationEvaluation",
    "VoxelGrid",
    "__version__",
    "as_points",
    "depth_normals",
    "depth_to_points",
    "estimate_covariances",
    "estimate_normals",
    "evaluate_registration",
    "icp",
    "invert_transform",
    "make_transform",
    "multiscale_icp",
    "parse_scales",
    "regularize_covariances",
    "transform_points",
    "voxel_downsample",
]
