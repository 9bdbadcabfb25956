"""First use of the compiled (numba) kernels: are they compiled yet, and what to do if not.

numba compiles a kernel on its first call and caches it on disk; on 2 cores the whole fast path
takes 1-3 minutes once per installation. Until it is cached, the automatic choices
(``search_backend="auto"`` of :func:`difficp.icp`, the CPU path of
:func:`difficp.estimate_normals`) ask :func:`compile_or_fall_back` whether to run compiled code
now. ``DIFFICP_COMPILE`` decides:

* ``"background"`` (default): start ``difficp warmup`` once in a background process and run the
  PyTorch path (the same results, more slowly) until the cache is written;
* ``"now"``: compile in the calling process, before the call.

One compile runs at a time per installation: an advisory file lock (:func:`compile_lock`) is
held by whoever compiles, so many processes starting at once on a fresh install (pytest
workers, data-loader workers, DDP ranks, a shell loop) start one background compile between
them, and a process compiling ``"now"`` first waits for a running one and then loads its cache.

Imports nothing from numba or the rest of difficp, so any module may ask.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

#: The values of ``DIFFICP_COMPILE``.
COMPILE_MODES = ("background", "now")
_LOG = logging.getLogger("difficp")
_announced: set[str] = set()
_background: subprocess.Popen | None = None
_holding_lock = False  # this process compiles under the lock (the warmup command)
# Dispatchers found compiled or cached: asked on every ICP call, and the answer stays yes (reading
# numba's signatures or its cache index from disk measured ~1-2 ms per call on small problems).
_ready: set[Any] = set()


def lock_path() -> Path:
    """The lock file of this installation: one per package directory (each install, virtual
    environment or source checkout has its own numba cache), in the temporary directory."""
    package = str(Path(__file__).resolve().parent)
    digest = hashlib.sha1(package.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"difficp-compile-{digest}.lock"


@contextlib.contextmanager
def compile_lock(wait: bool) -> Iterator[bool]:
    """Hold this installation's compile lock for the ``with`` block.

    Args:
        wait: block until the lock is free; else give up at once if another process holds it.
    Yields:
        Whether the lock is held. Without POSIX ``fcntl`` (Windows) or a writable temporary
        directory there is no lock and it yields True: compiles may then overlap, which costs
        time but gives the same cache.
    """
    global _holding_lock
    try:
        import fcntl  # here: POSIX only (Windows: ImportError, no lock)

        handle = open(lock_path(), "a+b")  # noqa: SIM115 -- closed in the finally below
    except (ImportError, OSError):
        yield True
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        _holding_lock = True
        try:
            yield True
        finally:
            _holding_lock = False
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def compile_running() -> bool:
    """Whether another process is compiling this installation's kernels right now."""
    if _holding_lock:
        return False
    with compile_lock(wait=False) as held:
        return not held


def kernels_cached(kernels: Iterable[Any]) -> bool:
    """Whether every numba dispatcher in ``kernels`` is compiled in this process or has an
    entry in numba's on-disk cache (running it then costs no compilation). True when that
    cannot be told (a numba without the cache internals read here)."""
    for kernel in kernels:
        if kernel in _ready:
            continue
        if not kernel.signatures:
            try:
                if not kernel._cache._cache_file._load_index():
                    return False
            except (AttributeError, OSError):
                return True
        _ready.add(kernel)
    return True


def compile_or_fall_back(ready: bool) -> bool:
    """Whether to run the compiled kernels now: True when ``ready`` (cached) or
    ``DIFFICP_COMPILE=now``; else starts the background compile once, says so once on the
    ``difficp`` logger, and returns False (run the PyTorch path for now).

    Raises:
        ValueError: ``DIFFICP_COMPILE`` is not one of :data:`COMPILE_MODES`.
    """
    if ready:
        return True
    mode = os.environ.get("DIFFICP_COMPILE", "background")
    if mode not in COMPILE_MODES:
        raise ValueError(f"DIFFICP_COMPILE must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "now":
        if compile_running():
            _announce(
                "wait",
                "difficp: waiting for the ICP fast path being compiled by another process "
                "(once per installation)",
            )
            with compile_lock(wait=True):
                pass  # its cache is written: the kernels now load from it
        else:
            _announce(
                "now",
                "difficp: compiling the ICP fast path (once: 1-3 minutes; numba caches it for "
                "later runs; `difficp warmup` does it ahead)",
            )
        return True
    global _background
    if _background is None and not compile_running():
        env = {**os.environ, "DIFFICP_COMPILE": "now"}
        command = [sys.executable, "-m", "difficp.commands.warmup", "--quiet", "--background"]
        try:
            _background = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # not killed with a Ctrl-C meant for this process
            )
        except OSError:
            return True  # cannot start one: compile here
    _announce(
        "background",
        "difficp: compiling the ICP fast path in a background process (once: 1-3 minutes; "
        "numba caches it for later runs); until it is ready difficp.icp runs its PyTorch path, "
        "which gives the same results more slowly. `difficp warmup` compiles it ahead; "
        "DIFFICP_COMPILE=now compiles it in the calling process instead.",
    )
    return False


def _announce(key: str, message: str) -> None:
    """Log ``message`` once per process (a warning: Python prints it on stderr by default)."""
    if key not in _announced:
        _announced.add(key)
        _LOG.warning(message)
