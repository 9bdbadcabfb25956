"""End-to-end 3D registration from depth maps: a pose CNN whose estimate difficp refines.

Modules: ``render`` (Open3D ray casting), ``data`` (seeded depth-map pairs of the body mesh),
``model`` (the pose CNN), ``methods`` (nn / icp / nn_icp / nn_then_icp), ``train``,
``evaluate``, ``plot``. Command line: ``difficp experiment depth train|eval|plot``.
"""
