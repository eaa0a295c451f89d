"""One job at a time: a queue of tuning and editing jobs, each a subprocess of the project's command-line tools.

The state of every job lives here and on disk, not in a browser: `<job folder>/job.json` holds its status and
command, `<job folder>/log.txt` everything the process printed (for people to read: nothing is parsed out of it).
What a job did comes from the files its tool writes: a tuning's progress.json (`Job.progress`), an edit's
result.json (`Job.result`). A page only reads them, so closing it changes nothing and reopening it shows the job
again; an app restarted later finds its jobs in the same folders.

Jobs start in their own session (process group): a Ctrl-C in the app's terminal reaches the app only, which then
stops the running job with one SIGINT, the signal on which `train_tuneavideo.py` saves a checkpoint after the
current step and exits (a second SIGINT would make it stop at once, without one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import DiskFullError, atomic_path
from ..cli import read_tail
from ..run import EditResult, Progress, Run

JOB_FILE = "job.json"
LOG_FILE = "log.txt"
FINISHED = ("done", "failed", "stopped", "cancelled")


@dataclass
class Job:
    """A queued, running or finished tool run. `folder` is where it writes; `run` names the run it tunes or edits."""

    id: str
    kind: str  # "tune" or "edit"
    folder: Path
    command: list[str]
    run: str
    title: str = ""  # what the page shows next to the id (the prompt)
    status: str = "queued"  # queued, running, done, failed, stopped, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    returncode: int | None = None
    message: str = ""  # how it failed or stopped, in one line
    pid: int | None = None
    stop_requested: bool = False

    @property
    def log(self) -> Path:
        return self.folder / LOG_FILE

    def progress(self) -> Progress | None:
        """A tuning job's progress.json as its latest start wrote it (None for an edit, or before then)."""
        return Run(self.folder).progress(since=self.started) if self.kind == "tune" and self.started else None

    def result(self) -> EditResult | None:
        """A finished edit's result.json (None before it is written, for a tuning job, and when it cannot be read:
        truncated, not JSON, empty, or missing a key)."""
        try:
            return EditResult.load(self.folder)
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # JSON and UTF-8 errors are ValueErrors
            return None

    def save(self) -> None:
        """Write job.json atomically, so a reader never sees half of it."""
        with atomic_path(self.folder / JOB_FILE) as path:
            path.write_text(json.dumps(asdict(self) | {"folder": str(self.folder)}, indent=1))

    @classmethod
    def load(cls, path: Path) -> Job:
        data = json.loads(path.read_text())
        return cls(**data | {"folder": Path(data["folder"])})


def last_line(log: Path) -> str:
    """The last line a job's process printed ("" if none): shown as the message of a job that left no file saying
    how it failed."""
    lines = [line.strip() for line in read_tail(log).replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class JobRunner:
    """Runs queued jobs one after another in a worker thread; every method is safe to call from any thread."""

    def __init__(self, root: Path, cwd: Path) -> None:
        """Jobs are found and kept under `root`; their commands run in `cwd` (the repository)."""
        self.root = root
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress reaches the log as it happens
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._process: subprocess.Popen | None = None
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="job-runner", daemon=True)

    def start(self) -> JobRunner:
        """Load the jobs found under `root`, queue the ones that were waiting, and start working."""
        edits = [path for run in self.root.glob("*/") for path in Run(run).edits.glob(f"*/{JOB_FILE}")]
        for path in sorted([*self.root.glob(f"*/{JOB_FILE}"), *edits]):
            try:
                job = Job.load(path)
            except (OSError, ValueError, TypeError, KeyError):
                continue  # not a job the app can read; leave the folder alone
            if job.status == "running":  # the app stopped while it ran (a stopped job was marked so at shutdown)
                job.status, job.message = "stopped", "the app stopped while this job ran"
                job.save()
            self._jobs[job.id] = job
        for job in sorted(self._jobs.values(), key=lambda job: job.created):
            if job.status == "queued":
                self._queue.append(job.id)
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closing:
                raise RuntimeError("the app is shutting down")
            job.status = "queued"
            job.save()
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self._lock.notify_all()
        return job

    def requeue(self, job_id: str, command: list[str]) -> Job:
        """Queue a finished job again with `command` (e.g. a tuning job resuming from its checkpoint)."""
        with self._lock:
            job = self._jobs[job_id]
            if job.status not in FINISHED:
                raise ValueError(f"{job_id} is {job.status}")
            job.command, job.message, job.returncode, job.stop_requested = command, "", None, False
            job.started = job.finished = job.pid = None
            return self.submit(job)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else Job(**asdict(job))  # a copy: the worker keeps changing the original

    def jobs(self, kind: str | None = None) -> list[Job]:
        """Jobs of `kind` (all if None), newest first."""
        with self._lock:
            found = [Job(**asdict(job)) for job in self._jobs.values() if kind in (None, job.kind)]
        return sorted(found, key=lambda job: job.created, reverse=True)

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start, 2 for the one after, ...; None when not waiting."""
        with self._lock:
            return self._queue.index(job_id) + 1 if job_id in self._queue else None

    def waiting(self) -> list[str]:
        """Ids of the waiting jobs, the next to start first."""
        with self._lock:
            return list(self._queue)

    def stop(self, job_id: str) -> str:
        """Take a waiting job off the queue, or send the running one SIGINT (once); returns what was done."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return "no such job"
            if job.status == "queued":
                self._queue.remove(job_id)
                job.status, job.finished, job.message = "cancelled", time.time(), "taken off the queue"
                job.save()
                return "taken off the queue"
            if job.status != "running" or self._process is None:
                return f"not running ({job.status})"
            if job.stop_requested:
                return "already stopping"
            job.stop_requested = True
            job.save()
            self._process.send_signal(signal.SIGINT)
            return "stopping after the current step"

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop taking jobs, stop the running one (SIGINT, then SIGKILL after `timeout` s) and wait for it."""
        with self._lock:
            self._closing = True
            running = next((job for job in self._jobs.values() if job.status == "running"), None)
            self._lock.notify_all()
        if running is not None:
            self.stop(running.id)
        self._thread.join(timeout)
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
        self._thread.join(5)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._jobs[self._queue.popleft()]
                process = self._process = self._launch(job)
            returncode = process.wait() if process is not None else -1
            with self._lock:
                self._finish(job, returncode)

    def _launch(self, job: Job) -> subprocess.Popen | None:
        """Start `job`'s process, its output going to its log (called with the lock held); None if it cannot start."""
        job.status, job.started = "running", time.time()
        try:
            with open(job.log, "ab") as log:
                log.write(f"$ {shlex.join(job.command)}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    job.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
        except OSError as err:  # the command is not there, the job's folder was deleted, the disk is full
            job.message = f"cannot start the job: {err}"
            return None
        job.pid = process.pid
        with contextlib.suppress(OSError, DiskFullError):  # it runs all the same; job.json is written when it ends
            job.save()
        return process

    def _finish(self, job: Job, returncode: int) -> None:
        """Record how the job ended (called with the lock held)."""
        job.returncode, job.finished, job.pid = returncode, time.time(), None
        if returncode == 0:
            job.status, job.message = "done", ""
        else:
            job.status = "stopped" if job.stop_requested else "failed"
            progress = job.progress()  # a tuning's own account of how it failed or stopped
            ended = progress.message if progress else None
            job.message = job.message or ended or last_line(job.log) or f"exit status {returncode}"
        try:
            job.save()
        except (OSError, DiskFullError) as err:  # the job fails, not the queue
            job.status, job.message = "failed", f"cannot save the job's state: {err}"
        self._process = None
