"""The ``difficp`` command line.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``, which registers an
argparse sub-parser whose ``func`` default is called with the parsed arguments. Modules are
imported lazily only for the command being run, so ``difficp register`` never imports the
learning code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> (module, one-line help). Each module defines add_parser(subparsers).
COMMANDS: dict[str, tuple[str, str]] = {
    "register": ("difficp.commands.register", "register two point-cloud files by ICP"),
    "demo": ("difficp.commands.demo", "run a built-in demo (no data needed)"),
    "experiment": ("difficp.commands.experiment", "run a paper experiment (depth, ...)"),
    "benchmark": ("difficp.commands.benchmark", "run a registration benchmark (modelnet)"),
    "train": ("difficp.commands.train", "train a learned registration model (dcp)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported (all when None)."""
    parser = argparse.ArgumentParser(
        prog="difficp", description="Differentiable, batched ICP point-cloud registration."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # command not part of this installation
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
