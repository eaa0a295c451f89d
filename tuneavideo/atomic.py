"""Atomic writes: write under a temporary name beside the target, then rename, so a crash or a full disk never
leaves a half-written file or folder where a later run would pick it up."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or a folder to; it replaces `path` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # same folder, so the rename is atomic; same suffix, so writers that pick a format from it still work
    temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}")
    try:
        yield temporary
        if target.is_dir() and temporary.is_dir():
            _remove(target)
        os.replace(temporary, target)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
