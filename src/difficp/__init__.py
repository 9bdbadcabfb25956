"""difficp: fully differentiable, batched ICP point-cloud registration in PyTorch."""

from difficp.config import ICPConfig

__all__ = ["ICPConfig"]
__version__ = "0.1.0"
