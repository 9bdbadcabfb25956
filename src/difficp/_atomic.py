"""Crash-safe file writes and checkpoints: every file difficp writes goes through here.

A file is written to a temporary name in its own directory, flushed and ``fsync``-ed, then
renamed over the final name (``os.replace`` is atomic on POSIX and Windows). A reader therefore
sees either the old file or the complete new one, never a truncated one, whatever happens to the
writing process. :class:`AtomicFiles` extends that to several files: none is renamed into place
unless all of them were written.

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) add two things: loading uses
``torch.load(weights_only=True)`` (a checkpoint is data; it must never run code), and the
previous good checkpoint is kept beside the new one (``name.pt.prev``), so a latest checkpoint
that is corrupt (disk full, copied half-way, edited) falls back to it with a warning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike

__all__ = [
    "AtomicFiles",
    "CheckpointError",
    "atomic_open",
    "atomic_write_text",
    "check_writable",
    "load_checkpoint",
    "previous_checkpoint",
    "save_checkpoint",
]


def check_writable(path: PathLike, what: str = "output") -> Path:
    """Raise ``OSError`` (naming ``what`` and the reason) unless ``path`` can be written.

    Checked up front, so that a long computation is not wasted on an output it cannot write:
    the folder exists, is a folder, is writable, and ``path`` itself is not a folder.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give a file name")
    if not parent.exists():
        raise FileNotFoundError(f"{what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{what} {path} exists and is not writable")
    return path


def _fsync_dir(folder: Path) -> None:
    """Persist a rename (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFiles:
    """Write several files all-or-nothing.

    ``open(path)`` returns a binary file object on a temporary file beside ``path``. Leaving the
    ``with`` block without an exception syncs and renames every temporary file into place;
    an exception (or :meth:`discard`) deletes them, so no final file is created or changed::

        with AtomicFiles() as files:
            files.open("a.txt").write(b"...")
            files.open("b.ply").write(b"...")   # if this raises, a.txt is not written either
    """

    def __init__(self) -> None:
        self._pending: list[tuple[IO[bytes], Path, Path]] = []

    def open(self, path: PathLike) -> IO[bytes]:
        """A writable binary file whose content becomes ``path`` on :meth:`commit`."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        f = os.fdopen(fd, "wb")
        self._pending.append((f, Path(tmp), path))
        return f

    def commit(self) -> None:
        """Sync every file, then rename them into place (the renames come last, together)."""
        try:
            for f, _, _ in self._pending:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        except BaseException:
            self.discard()
            raise
        folders = set()
        for _, tmp, path in self._pending:
            # mkstemp creates 0600 files; give the final file the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
            folders.add(path.parent)
        self._pending = []
        for folder in folders:
            _fsync_dir(folder)

    def discard(self) -> None:
        """Delete the temporary files; no final file is touched."""
        for f, tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending = []

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type: object, _exc: object, _tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[IO[bytes]]:
    """``with atomic_open(path) as f: f.write(...)``: ``path`` appears complete or not at all."""
    with AtomicFiles() as files:
        yield files.open(path)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """Neither a checkpoint nor its previous copy could be loaded."""


def previous_checkpoint(path: PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint that ``path`` replaced."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(obj: Any, path: PathLike, keep_previous: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` atomically, keeping the old file as ``path.prev``.

    ``obj`` must hold only tensors and plain Python types (dict, list, tuple, str, int, float,
    bool, None), so that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    import torch  # here: the atomic writes of difficp.io do not load PyTorch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFiles() as files:
        torch.save(obj, files.open(path))
        if keep_previous and path.is_file():
            # Keep the last good file before the new one replaces it. A hard link costs
            # nothing; where links are not supported the file is copied.
            prev = previous_checkpoint(path)
            tmp = prev.with_name(prev.name + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, prev)


def _load(path: Path, map_location: Any) -> Any:
    import torch  # here: as in save_checkpoint

    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: PathLike, map_location: Any = "cpu", fallback: bool = True) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` of tensors and
    plain types) with ``weights_only=True``.

    When ``path`` is unreadable (truncated, corrupt, or holding objects that would need code to
    rebuild) and ``fallback``, the previous checkpoint ``path.prev`` is loaded instead, with a
    warning. Raises ``FileNotFoundError`` when neither exists and :class:`CheckpointError` when
    none can be loaded.
    """
    path = Path(path)
    prev = previous_checkpoint(path)
    candidates = [path] + ([prev] if fallback and prev.is_file() else [])
    if not path.is_file() and len(candidates) == 1:
        raise FileNotFoundError(f"{path}: no such checkpoint")
    errors = []
    for candidate in candidates:
        if not candidate.is_file():
            errors.append(f"{candidate}: missing")
            continue
        try:
            obj = _load(candidate, map_location)
        except Exception as err:  # any failure to read means "unusable file"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            errors.append(f"{candidate}: {type(err).__name__}: {first_line}")
            continue
        if candidate != path:
            warnings.warn(
                f"checkpoint {errors[0]}; loaded the previous checkpoint {candidate} instead",
                RuntimeWarning,
                stacklevel=2,
            )
        return obj
    raise CheckpointError("cannot load checkpoint: " + "; ".join(errors))
