"""Atomic output: write to a temporary file beside the target, then rename, so a failed or
interrupted command never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output(path: str | Path) -> None:
    """ValueError unless `path` can become a file: not a folder, and its nearest existing ancestor is a
    folder (missing folders in between are created at write time). Commands call it before long work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{path}: {ancestor} is not a folder")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename, creating missing parent folders."""
    path = Path(path)
    check_output(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
