"""The ``difficp`` command line.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``, which registers an
argparse sub-parser whose ``func`` default is called with the parsed arguments. Only the module of
the command being run is imported, and ``difficp --help`` / ``--version`` import none (nor
PyTorch), so they answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from difficp import __version__

# command name -> (module, one-line help). Each module defines add_parser(subparsers).
COMMANDS: dict[str, tuple[str, str]] = {
    "register": ("difficp.commands.register", "register two point-cloud files by ICP"),
    "demo": ("difficp.commands.demo", "run a built-in demo (no data needed)"),
    "experiment": ("difficp.commands.experiment", "run a paper experiment (depth, ...)"),
    "benchmark": ("difficp.commands.benchmark", "run a registration benchmark (modelnet)"),
    "train": ("difficp.commands.train", "train a learned registration model (dcp)"),
}


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" hints for misspelt options and commands."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice:" in message and "argument COMMAND" in message:
            word = message.split("invalid choice: ")[1].split()[0].strip("'")
            message += suggest(word, list(COMMANDS))
        super().error(message)

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Exit with an error naming each unknown option and the closest known one."""
        known = _option_strings(self)
        hints = [
            f"{arg}{suggest(arg.split('=')[0], known)}" if arg.startswith("-") else arg
            for arg in extras
        ]
        self.error("unrecognized arguments: " + " ".join(hints))


def build_parser(command: str | None = None) -> _Parser:
    """The top-level parser; only ``command``'s module is imported (none when None)."""
    parser = _Parser(
        prog="difficp", description="Differentiable, batched ICP point-cloud registration."
    )
    parser.add_argument("--version", action="version", version=f"difficp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
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


def deepest_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Parser:
    """The innermost (sub-)parser that ``args`` went through, e.g. ``benchmark modelnet``'s."""
    while True:
        action = next(
            (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None
        )
        chosen = None if action is None else getattr(args, action.dest, None)
        if action is None or chosen not in action.choices:
            return parser  # type: ignore[return-value]
        parser = action.choices[chosen]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extras = parser.parse_known_args(argv)
    if extras:  # report against the parser that owns them, so its own options are suggested
        deepest_parser(parser, args).unrecognized(extras)
    if getattr(args, "func", None) is None:
        deepest_parser(parser, args).print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
