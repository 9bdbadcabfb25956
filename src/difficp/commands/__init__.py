"""The library's own ``difficp`` sub-command, ``register`` (see :mod:`difficp.cli`).

Commands are found through the ``difficp.commands`` entry-point group; the demos and experiments
add theirs from :mod:`difficp_experiments.commands`.
"""
