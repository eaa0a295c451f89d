"""How an edit goes, in its own progress file beside its outputs (`EditFiles.progress`, `<edit>.progress.json`), as a training's goes in its
run's progress.json: written atomically by the edit, at most once a second and at every change of phase, and read
by the app's page (never parsed out of printed lines).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import DiskFullError, atomic_path
from .errors import UserError, first_line
from .run import EDIT_PROGRESS_SUFFIX, PROGRESS_INTERVAL

# an edit's phases, in order (a guided edit makes its conditions between loading its ControlNets and the tuned
# model); then how it ended: done, stopped (Ctrl-C) or failed
PHASES = ("loading the model", "making the conditions", "inverting", "editing", "inverting and editing",
          "writing the videos", "scoring")


@dataclass
class EditProgress:
    """What an edit's progress file says."""

    phase: str  # one of PHASES while it runs; then "done", "stopped" or "failed"
    done: int = 0  # window-steps done (a denoising or inversion step of one window)
    total: int = 0  # window-steps of the whole edit
    seconds_per_step: float | None = None  # mean over the window-steps done so far
    eta_seconds: float | None = None  # seconds_per_step times the window-steps left (writing the videos not counted)
    message: str | None = None  # failed: the one-line error; stopped: "interrupted"
    updated: float = 0.0  # when it was written (time.time())

    @classmethod
    def load(cls, folder: str | Path, since: float = 0.0) -> EditProgress | None:
        """What the newest edit progress file in `folder` says, or None before an edit wrote one (or when it was
        written before `since`, a time.time(): an earlier edit's)."""
        found = []
        for path in Path(folder).glob(f"*{EDIT_PROGRESS_SUFFIX}"):
            try:
                found.append(cls(**json.loads(path.read_text())))
            except FileNotFoundError:  # replaced or removed since the listing
                continue
        newest = max(found, key=lambda progress: progress.updated, default=None)
        return newest if newest is not None and newest.updated >= since else None


class EditProgressWriter:
    """Keeps an edit's progress file (`path`) up to date: `start` with the edit's window-steps once the model is loaded,
    `phase` at each phase, `step` after window-steps; on leaving the `with` block, how it ended."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.progress = EditProgress(PHASES[0])
        self._started: float | None = None  # monotonic time of the first window-step's start
        self._written = 0.0

    def __enter__(self) -> EditProgressWriter:
        self._write()
        return self

    def start(self, total: int) -> None:
        """The model is loaded; `total` window-steps follow (the first starts now)."""
        self.progress.total, self._started = total, time.monotonic()

    def phase(self, name: str) -> None:
        self.progress.phase = name
        self._write()

    def step(self, count: int = 1) -> None:
        self.progress.done += count
        per_step = (time.monotonic() - self._started) / self.progress.done
        self.progress.seconds_per_step = per_step
        self.progress.eta_seconds = per_step * (self.progress.total - self.progress.done)
        if time.monotonic() - self._written >= PROGRESS_INTERVAL:
            self._write()

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.progress.phase, self.progress.eta_seconds = "done", 0.0
        elif isinstance(error, KeyboardInterrupt):
            self.progress.phase, self.progress.message = "stopped", str(error) or "interrupted"
        else:
            message = first_line(error)
            self.progress.phase = "failed"
            self.progress.message = message if isinstance(error, UserError) else f"{type(error).__name__}: {message}"
        with contextlib.suppress(OSError, DiskFullError):  # a full disk must not hide how the edit ended
            self._write()

    def _write(self) -> None:
        self.progress.updated = time.time()
        with atomic_path(self.path) as path:
            path.write_text(json.dumps(asdict(self.progress), indent=1))
        self._written = time.monotonic()
