"""File-system helpers for crash-safe writes; torch-free, so light readers can import them.

A file is made durable in three steps: its contents are fsynced, it is
renamed into place (atomic on POSIX: a reader sees the old file or the new
one, never a mix), and the folder is fsynced so that the rename itself
survives a power loss.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Create or replace ``target`` through ``write(tmp_path)`` on a temporary file, atomically and durably.

    The temporary file ``.<name>.<random>.tmp`` is created in ``target``'s
    folder with mode ``0o666`` minus the umask, exactly as ``open(path, "w")``
    would create ``target`` (``tempfile.mkstemp`` would make it 0600, and the
    rename would carry that over). ``write`` fills it by path; it is then
    fsynced, renamed over ``target`` and the folder fsynced. On any error,
    ``KeyboardInterrupt`` included, the temporary file is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    while True:
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # a name taken by chance (or by a killed writer): draw another
            continue
        os.close(fd)
        break
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file: its contents reach the disk before this returns."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder: makes the creation, renaming or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
