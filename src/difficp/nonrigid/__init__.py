"""Non-rigid ICP: fit any differentiable deformation model ``params -> points`` to a target.

* :class:`DeformationModel` - the interface (points, regularisers, initial value).
* :class:`RigidModel` - rigid motion (reproduces rigid ICP).
* :class:`EmbeddedDeformationGraph` - Sumner et al. 2007 embedded deformation.
* :func:`nonrigid_icp` - the loop, with the rigid ICP's correspondence / weighting options.
"""

from difficp.nonrigid.deformation_graph import EmbeddedDeformationGraph, farthest_point_sampling
from difficp.nonrigid.icp import NonrigidICPResult, build_model, nonrigid_icp
from difficp.nonrigid.model import DeformationModel, ResidualBlock, rowwise_jacobian
from difficp.nonrigid.rigid import RigidModel

__all__ = [
    "DeformationModel",
    "EmbeddedDeformationGraph",
    "NonrigidICPResult",
    "ResidualBlock",
    "RigidModel",
    "build_model",
    "farthest_point_sampling",
    "nonrigid_icp",
    "rowwise_jacobian",
]
