"""Where the external data lives: ``--data-dir``, else ``$DIFFICP_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "DIFFICP_DATA"


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory from ``explicit`` or ``$DIFFICP_DATA``; None when neither is set."""
    value = explicit if explicit is not None else os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else None


def require_data_dir(explicit: str | os.PathLike | None = None, *, needs: str = "") -> Path:
    """Like :func:`find_data_dir` but raises a clear error when missing or not a directory."""
    path = find_data_dir(explicit)
    if path is None:
        raise FileNotFoundError(
            f"no data directory: pass --data-dir or set ${ENV_VAR}"
            + (f" (needed for {needs})" if needs else "")
        )
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist")
    return path
