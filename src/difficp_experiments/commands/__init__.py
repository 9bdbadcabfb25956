"""``difficp`` sub-commands contributed by the experiments, one module each.

Each module defines ``add_parser(subparsers)`` and is registered in the ``difficp.commands``
entry-point group; :mod:`difficp.cli` imports only the module of the command being run.
A module first calls :func:`require` with the optional packages its command needs, so that a
missing extra is reported (by the CLI, as the extra to install) before anything runs.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from typing import Any

from difficp.cli import add_command

DATASETS = ("modelnet10", "modelnet40", "modelnet40_airplane")


def require(*modules: str) -> None:
    """Raise :class:`ModuleNotFoundError` (with ``name`` set) for the first of ``modules`` that
    is not installed. Only looks the modules up: importing them stays with the code that uses
    them, so that parsing the options stays fast."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def add_subcommand(
    subparsers: Any, command: str, name: str, help: str, description: str, dest: str
) -> argparse.ArgumentParser:
    """Add ``difficp COMMAND NAME``: this distribution's command ``command`` (its one-line help
    from :data:`difficp.cli.HELP`) with the sub-command ``name`` (chosen into ``args.<dest>``;
    its own ``help`` and ``description``); returns the sub-command's parser. Without NAME,
    :func:`difficp.cli.main` prints the command's help and exits with 2."""
    group = add_command(subparsers, command).add_subparsers(dest=dest, metavar=dest.upper())
    return group.add_parser(name, help=help, description=description)


def add_dataset_options(
    parser: argparse.ArgumentParser, protocols: Sequence[str], protocol_help: str | None = None
) -> None:
    """``--data-dir``, ``--dataset`` and ``--protocol`` (one of ``protocols``, default
    ``clean``), shared by the ModelNet benchmark and training."""
    parser.add_argument("--data-dir", default=None, help="data directory (default: $DIFFICP_DATA)")
    parser.add_argument("--dataset", default="modelnet10", choices=DATASETS)
    parser.add_argument("--protocol", default="clean", choices=list(protocols), help=protocol_help)
