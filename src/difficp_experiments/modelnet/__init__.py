"""Learned registration models, datasets, training and benchmarks (needs ``h5py`` for ModelNet).

Submodules are imported on demand (``difficp.learning.modelnet``, ``.dcp``, ``.pointnetlk``,
``.classical``, ``.benchmark``, ``.train_dcp``, ``.metrics``) so that importing the package stays
cheap and optional dependencies are only needed by the parts that use them.
"""
