"""The ``difficp`` command line.

Sub-commands are plugins: each is a module exposing ``add_parser(subparsers)``, which registers
an argparse sub-parser whose ``func`` default is called with the parsed arguments, and is listed
in the ``difficp.commands`` entry-point group (``name = "package.module"``). The library
contributes ``register``; the ``experiments`` extra (package :mod:`difficp_experiments`)
contributes ``demo``, ``experiment``, ``benchmark`` and ``train``, and other distributions may add
their own. Only the module of the command being run is imported, and ``difficp --help`` /
``--version`` import none (nor PyTorch), so they answer at once. A command whose module needs a
package that is not installed exits with status 2 and one line naming the extra to install.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from difficp import __version__

#: Entry-point group of the sub-commands; each entry's value is the module that defines them.
GROUP = "difficp.commands"

#: One-line help of the commands this distribution registers, for ``difficp --help`` (which must
#: not import the command modules to read it) and for their own parsers (:func:`add_command`).
#: Other plugins are listed by their distribution.
HELP: dict[str, str] = {
    "register": "register two point-cloud files by ICP",
    "warmup": "compile the ICP fast path ahead (once per installation)",
    "demo": "run a built-in demo (no data needed)",
    "experiment": "run a paper experiment (depth, ...)",
    "benchmark": "run a registration benchmark (modelnet)",
    "train": "train a learned registration model (dcp)",
}


def add_command(
    subparsers: Any,
    name: str,
    description: str | None = None,
    func: Callable[[argparse.Namespace], int] | None = None,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add this distribution's sub-command ``name`` to ``subparsers`` (from
    ``add_subparsers``) with its one-line help from :data:`HELP`, so that ``difficp --help``
    and the command's own parser say the same, and ``description`` for its own ``--help``;
    :func:`main` calls ``func`` (when given) with the parsed arguments. ``kwargs`` go to
    ``add_parser``."""
    parser = subparsers.add_parser(name, help=HELP[name], description=description, **kwargs)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed ``difficp.commands`` entry points (a seam for tests)."""
    return list(importlib.metadata.entry_points(group=GROUP))


def commands() -> dict[str, importlib.metadata.EntryPoint]:
    """Command name -> its entry point, in the order of :data:`HELP`, then by name."""
    found = {ep.name: ep for ep in entry_points()}
    order = [n for n in HELP if n in found] + sorted(n for n in found if n not in HELP)
    return {name: found[name] for name in order}


def _help(ep: importlib.metadata.EntryPoint) -> str:
    if ep.name in HELP:
        return HELP[ep.name]
    dist = getattr(ep, "dist", None)
    return f"(plugin from {dist.name})" if dist is not None else "(plugin)"


def _extras_providing(module: str) -> list[str]:
    """The extras of the ``difficp`` distribution that require the package ``module``."""
    try:
        requirements = importlib.metadata.requires("difficp") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    extras = []
    for req in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.-]+).*;.*extra\s*==\s*[\"']([^\"']+)[\"']", req)
        if match and re.sub(r"[-_.]+", "_", match[1]).lower() == module.lower():
            extras.append(match[2])
    return extras


def missing_extra_message(err: ModuleNotFoundError) -> str | None:
    """What to install for a command that failed with ``err``, or None when ``err`` is not a
    missing optional package (a bug, which should stay a traceback)."""
    missing = (err.name or "").split(".")[0]
    if not missing or missing == "difficp":
        return None
    extras = _extras_providing(missing)
    if missing == "difficp_experiments" or "experiments" in extras:
        extra = "experiments"
    elif extras:
        extra = extras[0]
    else:
        return None
    return f'needs {missing}, part of the {extra} extra: pip install "difficp[{extra}]"'


class _MissingExtraError(Exception):
    """A command module could not be imported because an extra is not installed."""


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
            message += suggest(word, list(commands()))
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
    """The top-level parser; only ``command``'s module is imported (none when None).

    Raises:
        _MissingExtraError: ``command``'s module needs a package of an extra that is not installed.
    """
    parser = _Parser(
        prog="difficp", description="Differentiable, batched ICP point-cloud registration."
    )
    parser.add_argument("--version", action="version", version=f"difficp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, ep in commands().items():
        if name != command:
            sub.add_parser(name, help=_help(ep))
            continue
        try:
            module = importlib.import_module(ep.module)
        except ModuleNotFoundError as err:
            message = missing_extra_message(err)
            if message is None:
                raise
            raise _MissingExtraError(f"difficp {name}: error: {message}") from err
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


# GNU OpenMP threads spin for GOMP_SPINCOUNT iterations (300,000 by default) after each
# parallel region before they sleep. PyTorch's then hold the cores that numba's pool (the
# compiled ICP kernels) needs: with one other busy process on a 2-core machine, colored ICP at 2
# threads took 24-31 ms instead of 10-13 (benchmarks/colored.py, 3DMatch pair). 30,000 gave 13 ms
# there and left the idle machine's PyTorch gradient path as it was (60-65 ms, 3 A/B rounds of
# benchmarks/gradients.py's nearest unroll); OMP_WAIT_POLICY=PASSIVE gave 10 ms but slowed that
# path by 40%. PyTorch reads it when it loads, so only a process that has not imported it can set
# it; a value the user set is kept.
OPENMP_SPIN_COUNT = "30000"


def limit_openmp_spinning() -> None:
    """Default ``GOMP_SPINCOUNT`` to :data:`OPENMP_SPIN_COUNT` unless PyTorch is loaded already."""
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def main(argv: Sequence[str] | None = None) -> int:
    limit_openmp_spinning()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and not commands():
        # The group comes from the installed metadata: empty means an install that predates it.
        print(
            f"difficp: error: no commands installed (entry-point group {GROUP} is empty); "
            "reinstall difficp: pip install -e .",
            file=sys.stderr,
        )
        return 2
    try:
        parser = build_parser(command if command in commands() else None)
    except _MissingExtraError as err:
        print(err, file=sys.stderr)
        return 2
    args, extras = parser.parse_known_args(argv)
    if extras:  # report against the parser that owns them, so its own options are suggested
        deepest_parser(parser, args).unrecognized(extras)
    if getattr(args, "func", None) is None:
        deepest_parser(parser, args).print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:  # an optional package the command imports as it runs
        message = missing_extra_message(err)
        if message is None:
            raise
        print(f"difficp {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
