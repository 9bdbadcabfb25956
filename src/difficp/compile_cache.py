"""First use of the compiled (numba) kernels: are they compiled yet, and what to do if not.

numba compiles a kernel on its first call and caches it on disk; on 2 cores the whole fast path
takes 1-3 minutes once per installation. Until it is cached, the automatic choices
(``search_backend="auto"`` of :func:`difficp.icp`, the CPU path of
:func:`difficp.estimate_normals`) ask :func:`compile_or_fall_back` whether to run compiled code
now. ``DIFFICP_COMPILE`` decides:

* ``"background"`` (default): start ``difficp warmup`` once in a background process and run the
  PyTorch path (the same results, more slowly) until the cache is written;
* ``"now"``: compile in the calling process, before the call.

Imports nothing from numba or the rest of difficp, so any module may ask.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

#: The values of ``DIFFICP_COMPILE``.
COMPILE_MODES = ("background", "now")
_LOG = logging.getLogger("difficp")
_announced: set[str] = set()
_background: subprocess.Popen | None = None


def kernels_cached(kernels: Iterable[Any]) -> bool:
    """Whether every numba dispatcher in ``kernels`` is compiled in this process or has an
    entry in numba's on-disk cache (running it then costs no compilation). True when that
    cannot be told (a numba without the cache internals read here)."""
    for kernel in kernels:
        if kernel.signatures:
            continue
        try:
            if not kernel._cache._cache_file._load_index():
                return False
        except (AttributeError, OSError):
            return True
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
        _announce(
            "now",
            "difficp: compiling the ICP fast path (once: 1-3 minutes; numba caches it for "
            "later runs; `difficp warmup` does it ahead)",
        )
        return True
    global _background
    if _background is None:
        env = {**os.environ, "DIFFICP_COMPILE": "now"}
        command = [sys.executable, "-m", "difficp.commands.warmup", "--quiet"]
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
