"""How the command-line tools start and end: a `UserError` (bad options included) as one line, Ctrl-C quietly, real
bugs with their traceback; on the CPU, freed memory goes back to the system."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError

DEBUG_ENV = "TUNEAVIDEO_DEBUG"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter behind MALLOC_MMAP_THRESHOLD_


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (a bad value, a missing option) are a `UserError`: one line, not usage text."""

    def error(self, message: str) -> None:
        raise UserError(message)


def release_freed_memory() -> None:
    """Make glibc serve allocations of 1 MiB and more with mmap, so freed activation buffers go back to the system
    at once instead of staying in the heap: the same as `MALLOC_MMAP_THRESHOLD_=1048576` (a 4x512 training step on
    the CPU peaks at 5.2 GB instead of 7.5 to 7.9 GB). A no-op without glibc, or when that variable is set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def run_cli(main: Callable[[list[str]], None], prog: str, argv: list[str] | None = None) -> None:
    """Run `main(argv)`; `--debug` in argv (removed before `main` sees it) or TUNEAVIDEO_DEBUG=1 keeps tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not torch.cuda.is_available():
        release_freed_memory()
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        sys.exit(f"{prog}: error: {message}")
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        sys.exit(f"{prog}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""))


def read_tail(path: Path, max_bytes: int = 65536) -> str:
    """The last `max_bytes` of a text file ("" if it cannot be read): logs grow, a reader only needs their end."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - max_bytes))
            return file.read().decode("utf-8", "replace")
    except OSError:
        return ""
