"""Files that are either as they were or completely new, on a crash, a kill -9, a power cut
or a full disk: written under a temporary name in the same folder, fsync'ed, renamed into
place, and the rename made durable by an fsync of the folder."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Make a rename, a new name or a deletion in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_into_place(temp: Path, final: Path) -> None:
    """Put a finished temporary file in place of ``final``: its data on disk first (else a
    power cut can leave the new name on an empty file), then the rename, then the folder."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    fsync_folder(final.parent)


def replace_file(final: Path, chunks: Iterable[bytes], temp: Path, mode: int = 0o640) -> None:
    """Write ``chunks`` to ``temp`` (same folder, a name readers ignore; created with
    ``mode``, never looser), then swap it in for ``final``. On any failure the temporary file
    is removed and ``final`` is untouched."""
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)  # exactly: the umask may have taken bits away
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(final.parent)
