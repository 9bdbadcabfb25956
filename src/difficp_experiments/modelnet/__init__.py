"""The ModelNet registration benchmark: learned models, datasets, training and the harness.

Submodules are imported on demand (``data`` (ModelNet pairs, needs ``h5py``), ``dcp``,
``pointnetlk``, ``classical`` (Open3D baselines), ``benchmark``, ``train_dcp``, ``metrics``) so
that importing the package stays cheap. Command line: ``difficp benchmark modelnet`` and
``difficp train dcp``.
"""
