"""How the command-line tools start and end: a `UserError` (bad options included) as one line, Ctrl-C quietly, real
bugs with their traceback; on the CPU, freed memory goes back to the system. What they print in between: our own
lines, one per phase, and one progress bar per long phase; the libraries' logs only with `--verbose`."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import diffusers
import huggingface_hub
import torch
import transformers
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import UserError

DEBUG_ENV = "TUNEAVIDEO_DEBUG"
VERBOSE_ENV = "TUNEAVIDEO_VERBOSE"
OUR_LOGGERS = ("tuneavideo", "benchmarks", "__main__")  # __main__: a tool run with -m
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter behind MALLOC_MMAP_THRESHOLD_


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (a bad value, a missing option) are a `UserError`: one line, not usage text. Its help
    lists `run_cli`'s own options too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true", help="also show the libraries' own logs, progress bars "
                          f"and warnings (or set {VERBOSE_ENV}=1)")
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")

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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def setup_terminal(verbose: bool) -> None:
    """What this process prints: our own loggers' lines (`tuneavideo.*`, `benchmarks.*`, from INFO) as they are;
    of the libraries (diffusers, transformers, accelerate, huggingface_hub, PIL, httpx, gradio, ...) only errors, no
    progress bars and no Python warnings, unless `verbose`: then their logs and warnings as they come (each line
    named), and the tools this process starts (the app's jobs, the benchmark's tunings) are verbose too."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    warnings.simplefilter("ignore")  # the libraries' FutureWarnings and the like; ours are log lines


def run_cli(main: Callable[[list[str]], None], prog: str, argv: list[str] | None = None) -> None:
    """Run `main(argv)` with the terminal set up by `setup_terminal`; `--verbose` in argv or TUNEAVIDEO_VERBOSE=1
    shows the libraries' logs, `--debug` or TUNEAVIDEO_DEBUG=1 keeps tracebacks (both removed before `main` sees
    them). Log lines are written above the progress bars, not into them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or _env_flag(DEBUG_ENV)
    setup_terminal("--verbose" in argv or _env_flag(VERBOSE_ENV))
    argv = [arg for arg in argv if arg not in ("--debug", "--verbose")]
    if not torch.cuda.is_available():
        release_freed_memory()
    try:
        with logging_redirect_tqdm():
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


def run_processes(script: str | os.PathLike, argv: list[str], num_processes: int) -> None:
    """Run `python script *argv` as `num_processes` processes of this machine (one per GPU; CPU workers without
    CUDA), as torchrun and `accelerate launch --multi_gpu` start them, but as one command: a process that stops says
    why in its own line, and then this raises one `UserError` saying which stopped, instead of PyTorch's launcher
    report and traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not _env_flag(VERBOSE_ENV):  # the launcher's own lines about each process it stops or sees fail
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=f"tuneavideo-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)  # torchrun --standalone
    try:
        elastic_launch(config, sys.executable)(os.fspath(script), *argv)
    except ChildFailedError as err:
        failed = sorted(err.failures)
        ranks = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}"
        raise UserError(f"{len(failed)} of {num_processes} processes stopped ({ranks}); the lines above say why"
                        ) from None


def read_tail(path: Path, max_bytes: int = 65536) -> str:
    """The last `max_bytes` of a text file ("" if it cannot be read): logs grow, a reader only needs their end."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - max_bytes))
            return file.read().decode("utf-8", "replace")
    except OSError:
        return ""
