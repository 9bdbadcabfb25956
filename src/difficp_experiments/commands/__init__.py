"""``difficp`` sub-commands contributed by the experiments, one module each.

Each module defines ``add_parser(subparsers)`` and is registered in the ``difficp.commands``
entry-point group; :mod:`difficp.cli` imports only the module of the command being run.
A module first calls :func:`require` with the optional packages its command needs, so that a
missing extra is reported (by the CLI, as the extra to install) before anything runs.
"""

from __future__ import annotations

import argparse
import importlib.util

DATASETS = ("modelnet10", "modelnet40", "modelnet40_airplane")


def require(*modules: str) -> None:
    """Raise :class:`ModuleNotFoundError` (with ``name`` set) for the first of ``modules`` that
    is not installed. Only looks the modules up: importing them stays with the code that uses
    them, so that parsing the options stays fast."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--dataset``, shared by the ModelNet benchmark and training."""
    parser.add_argument("--data-dir", default=None, help="data directory (default: $DIFFICP_DATA)")
    parser.add_argument("--dataset", default="modelnet10", choices=DATASETS)
