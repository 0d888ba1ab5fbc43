"""Atomic file and folder writes: write under a temporary name, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from .errors import UsageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Works for a file or a folder written at the yielded path. On error the temporary is
    removed and an existing ``path`` is left untouched.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    target = os.path.join(tmp, "out")
    try:
        yield target
        if os.path.isdir(path) and os.path.isdir(target):
            # A folder cannot be renamed over a non-empty folder: swap via a second rename.
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: str | os.PathLike, flag: str = "--output_dir") -> str:
    """Creates ``path`` if needed and raises a clear ``ValueError`` if it cannot be written."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path!r} is not writable ({error.strerror}): choose another folder.") from None
    return path
