"""difficp's experiments and demos, and the command-line plugins that run them.

Not part of the library: :mod:`difficp` never imports this package, and only this package needs
the ``experiments`` extra (``pip install "difficp[experiments]"``: matplotlib, tqdm, h5py,
Open3D). It adds the ``demo``, ``experiment``, ``benchmark`` and ``train`` commands to the
``difficp`` command line through the ``difficp.commands`` entry-point group (see
``pyproject.toml`` and :mod:`difficp.cli`).

* :mod:`difficp_experiments.commands` - the command-line plugins (argument parsing only).
* :mod:`difficp_experiments.demos` - the rigid terrain demo, the non-rigid limb demo and the
  optional anny body fit.
* :mod:`difficp_experiments.depth` - pose CNN + differentiable ICP on rendered depth maps.
* :mod:`difficp_experiments.modelnet` - the ModelNet benchmark, DCP / PointNetLK and training.

Their committed outputs stay in the repository's ``results/``; commands write to ``--out``
paths relative to the current directory (run them from the repository root to update those).
"""
