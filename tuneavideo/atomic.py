"""Atomic writes: write under a temporary name beside the target, then rename, so a crash, Ctrl-C or a full disk never
leaves a half-written file or folder under a final name where a later run would pick it up.

A full disk gets its own one-line error (`DiskFullError`): every writer reports it differently (`OSError` ENOSPC,
`torch.save`'s "unexpected pos", safetensors' "No space left on device", ffmpeg's exit status, Pillow's), so
`disk_full` asks the file system itself.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# Free space below which a failed write is taken to have filled the disk (writers stop within one buffer of full).
_NEARLY_FULL = 1 << 20


class DiskFullError(UserError):
    """A write failed because the disk is full; nothing half-written is left under a final name."""


def disk_full(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether `err`, raised while writing `path`, means that `path`'s file system is full. Ask before removing the
    partial output: that frees the space again."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err):
        return True
    written = Path(path)
    while not written.exists():
        written = written.parent
    return shutil.disk_usage(written).free < _NEARLY_FULL


@contextmanager
def staged(temporary: Path, disk_full_message: str) -> Iterator[Path]:
    """Yield `temporary` (a file or folder) to write; if the block fails in any way (Ctrl-C included), remove it, and
    report a full disk as `DiskFullError(disk_full_message)`. On success the caller moves it to its final place."""
    try:
        yield temporary
    except BaseException as err:
        # asked before the partial output is removed: removing it frees the space again
        full = isinstance(err, Exception) and not isinstance(err, UserError) and disk_full(err, temporary)
        remove(temporary)
        if full:
            raise DiskFullError(disk_full_message) from err
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or a folder to; it replaces `path` only on success.

    Raises:
        DiskFullError: the write failed on a full disk (the temporary output is removed, `path` is untouched).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # same folder, so the rename is atomic; same suffix, so writers that pick a format from it still work
    temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}")
    message = (f"no space left on the disk of {target.parent} while writing {target.name}; free space and run again "
               "(files written before are kept)")
    with staged(temporary, message):
        yield temporary
        if target.is_dir() and temporary.is_dir():
            remove(target)
        os.replace(temporary, target)


def remove(path: Path) -> None:
    """Remove a file or a folder, if there (other processes may be removing the same folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
