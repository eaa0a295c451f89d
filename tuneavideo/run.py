"""A run folder (a training `output_dir`): the one place that names its files.

    config.yaml                    the training config as resolved (every override applied), with the versions
    progress.json                  how the training goes or ended (`Progress`, with the loss and learning rate
                                   of every step), rewritten as it goes
    logs/                          TensorBoard events
    samples/sample-STEP/<prompt>.gif|.mp4, samples/sample-STEP.gif   validation samples (named prompts: a subfolder
                                   per name)
    inv_latents/ddim_latent-STEP.pt  the tuned window inverted by validation at STEP
    inv_latents/span-<key>.pt      an edit's inversion of other frames, keyed by everything it depends on
    checkpoint-STEP/               resumable training state (`tuneavideo.checkpointing`)
    tuned_parameters.safetensors   the tuned tensors alone (`tuneavideo.tuned_parameters`)
    unet/, vae/, ..., model_index.json   the tuned pipeline; model_index.json is written last: the run is finished
    edits/                         edits, unless `inference.py --output-dir` says otherwise
    results/                       Video-P2P edit configs' outputs (`inference.py --p2p-config`), as Video-P2P
                                   writes them: inversion[_fast].gif, <save_name>[_fast].gif, and MP4s beside them

Beside an edit's videos (named by `tuneavideo.editing`; a local edit's `inversion.mp4` and `<prompt>.mask.mp4` by
`tuneavideo.local_editing`) are `result.json` (its `EditResult`) and, when scored, `metrics.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from omegaconf import OmegaConf

from .atomic import DiskFullError, atomic_path
from .config import ConfigError, TrainConfig, load_config
from .errors import UserError, first_line
from .pipelines.windows import Window
from .video.frames import tuned_window
from .video.readers import Clip, VideoReadError
from .video.writers import prompt_file_name

MODEL_INDEX = "model_index.json"  # diffusers' pipeline index: written last, so its presence means finished
PROGRESS_INTERVAL = 1.0  # seconds between progress.json rewrites while training runs
HISTORY_LIMIT = 1000  # most entries in progress.json's history: a longer run keeps one per so many steps
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_SAMPLE = re.compile(r"sample-(\d+)")


class RunError(UserError):
    """A run folder that is missing, unfinished or unreadable; the message is one line."""


def result_file(edit_folder: str | os.PathLike) -> Path:
    """Where an edit writes its `EditResult`, beside its videos."""
    return Path(edit_folder) / "result.json"


def edit_progress_file(edit_folder: str | os.PathLike) -> Path:
    """Where an edit keeps how it goes (`tuneavideo.edit_progress`), beside its videos."""
    return Path(edit_folder) / "edit-progress.json"


def metrics_file(edit_folder: str | os.PathLike) -> Path:
    """Where a scored edit writes its LOVEU-TGVE figures, beside its videos."""
    return Path(edit_folder) / "metrics.json"


@dataclass
class Progress:
    """What progress.json says: a training run's newest step and how it ended."""

    state: str  # running, stopped, finished or failed
    step: int  # optimizer steps done
    total: int  # max_train_steps
    loss: float | None = None  # of the newest step
    learning_rate: float | None = None
    seconds_per_step: float | None = None  # mean over the steps of this process (validation included)
    eta_seconds: float | None = None  # seconds_per_step times the steps left
    sample: str | None = None  # the newest validation sample's MP4 (the first prompt's)
    message: str | None = None  # failed: the one-line error; stopped: what was kept and how to go on
    updated: float = 0.0  # when it was written (time.time())
    # [step, loss, learning rate] of every step, oldest first; past HISTORY_LIMIT steps, of every n-th step (the
    # loss: the mean over the n steps up to it)
    history: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """A run folder and every path in it (see the module docstring)."""

    folder: Path  # a str is taken too

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    # --- the files -------------------------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def model_index(self) -> Path:
        return self.folder / MODEL_INDEX

    @property
    def progress_file(self) -> Path:
        return self.folder / "progress.json"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def tuned_parameters(self) -> Path:
        return self.folder / "tuned_parameters.safetensors"

    @property
    def edits(self) -> Path:
        """Where edits go by default."""
        return self.folder / "edits"

    @property
    def p2p_results(self) -> Path:
        """Where a Video-P2P edit config of this run writes (Video-P2P's own `<pretrained_model_path>/results`)."""
        return self.folder / "results"

    @property
    def pipeline_staging(self) -> Path:
        """Where the tuned pipeline is written before it is moved into the run folder."""
        return self.folder / ".pipeline.tmp"

    @property
    def samples(self) -> Path:
        """Validation samples."""
        return self.folder / "samples"

    def sample(self, step: int, prompt: str, name: str | None = None, suffix: str = ".mp4") -> Path:
        """A validation prompt's sample at `step` (a named prompt's in a subfolder of its name)."""
        folder = self.samples / f"sample-{step}" / (prompt_file_name(name) if name else "")
        return folder / f"{prompt_file_name(prompt)}{suffix}"

    def sample_files(self) -> list[Path]:
        """Every validation sample written (samples/sample-STEP*), the newest step's first, by name within a step."""
        steps = {}
        for path in self.samples.rglob("*"):
            match = _SAMPLE.match(path.relative_to(self.samples).parts[0])
            if match and path.is_file() and not path.name.startswith("."):  # not an atomic write's temporary
                steps[path] = int(match[1])
        return sorted(steps, key=lambda path: (-steps[path], path))

    def sample_grid(self, step: int) -> Path:
        """Every validation prompt's sample at `step`, side by side in one GIF."""
        return self.samples / f"sample-{step}.gif"

    def validation_latent(self, step: int) -> Path:
        """The tuned window as validation inverted it at `step`: the latent edits of that window start from."""
        return self.folder / "inv_latents" / f"ddim_latent-{step}.pt"

    def checkpoint(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step}"

    def checkpoint_staging(self, step: int) -> Path:
        """Where checkpoint-STEP is written before it is renamed (never listed by `checkpoints`)."""
        return self.folder / f".checkpoint-{step}.tmp"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint-STEP folders, oldest first."""
        found = [path for path in self.folder.glob("checkpoint-*")
                 if path.is_dir() and checkpoint_step(path) is not None]
        return sorted(found, key=checkpoint_step)

    # --- what the folder holds -------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the tuned pipeline was saved (`model_index.json`, written last)."""
        return self.model_index.is_file()

    def holds_a_run(self) -> bool:
        """Whether a training run wrote here already."""
        markers = (self.config_file, self.model_index, self.folder / "unet", self.tuned_parameters)
        return any(path.exists() for path in markers) or bool(self.checkpoints())

    def check_output_dir(self, resuming: bool, overwrite: bool) -> None:
        """Refuse to write a new run over an earlier one unless asked to (resume it, or overwrite it)."""
        if self.holds_a_run() and not (resuming or overwrite):
            raise RunError(f"output_dir {self.folder} already holds a run: continue it with resume_from_checkpoint="
                           "latest, replace it with overwrite=true, or choose another output_dir")

    def check_finished(self) -> Run:
        """This run, checked to be a finished training run.

        Raises:
            RunError: no such folder, or no config.yaml or tuned model in it.
        """
        if not self.folder.is_dir():
            raise RunError(f"{self.folder}: no such run folder (tune first: python train_tuneavideo.py "
                           "--config=...)")
        if not self.config_file.is_file():
            raise RunError(f"{self.folder}: has no {self.config_file.name}, so it is not the output_dir of a "
                           "training run")
        if not self.finished:
            raise RunError(f"{self.folder}: has no tuned model ({MODEL_INDEX}) yet; did the training run finish?")
        return self

    def config(self) -> TrainConfig:
        """The training config the run was tuned with."""
        try:
            return load_config(self.config_file)
        except ConfigError as err:
            raise RunError(f"{err} (the run's config; re-run the training to rewrite it)") from err

    def write_config(self, cfg: TrainConfig) -> None:
        """config.yaml: `cfg` resolved, headed by the versions it was tuned with."""
        versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__}
        header = "".join(f"# {name} {version}\n" for name, version in versions.items())
        with atomic_path(self.config_file) as path:
            path.write_text(header + OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    def clip(self, cfg: TrainConfig) -> Clip:
        """The clip the run was tuned on (`cfg` is the run's config)."""
        try:
            return Clip(cfg.train_data.video_path, cfg.train_data.fps)
        except VideoReadError as err:
            raise RunError(f"{err} (the source clip, train_data.video_path in {self.config_file})") from err

    def inversion_cache(self, cfg: TrainConfig, clip: Clip, size: tuple[int, int], frames: range,
                        windows: list[Window], num_inv_steps: int) -> Path:
        """Where the inversion of `frames` of `clip` at `size` in `windows` is cached. The tuned window inverted as
        validation does it is the run's own validation latent; any other is keyed by everything it depends on: the
        clip's files, the tuned weights, the size, the frames, the windows and the steps."""
        data, validation = cfg.train_data, cfg.validation_data
        tuned = tuned_window(clip.info.num_frames, data.n_sample_frames, data.sample_start_idx,
                             data.sample_frame_rate, clip.path)
        if (frames == tuned and len(windows) == 1 and validation.use_inv_latent
                and num_inv_steps == validation.num_inv_steps):
            return self.validation_latent(cfg.max_train_steps)
        source = os.stat(clip.path)
        # a folder's own time stamp does not change when a frame is overwritten in place; its images' do
        changed = max(os.stat(p).st_mtime_ns for p in clip.images) if clip.images else source.st_mtime_ns
        weights = [os.stat(p) for p in sorted((self.folder / "unet").glob("diffusion_pytorch_model*"))]
        key = dict(source=[os.path.abspath(clip.path), source.st_size, changed],
                   unet=[[w.st_size, w.st_mtime_ns] for w in weights], size=list(size),
                   frames=[frames.start, frames.stop, frames.step], num_inv_steps=num_inv_steps,
                   windows=[[w.frames[0], w.frames[-1], len(w.frames)] for w in windows])
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / "inv_latents" / f"span-{digest}.pt"

    # --- progress --------------------------------------------------------------------------------------------------

    def progress(self, since: float = 0.0) -> Progress | None:
        """What progress.json says, or None before a training wrote it (or when it was written before `since`, a
        time.time(): a reader that started a training ignores what an earlier one left)."""
        try:
            progress = Progress(**json.loads(self.progress_file.read_text()))
        except FileNotFoundError:
            return None
        return progress if progress.updated >= since else None

    def write_progress(self, progress: Progress) -> None:
        with atomic_path(self.progress_file) as path:
            path.write_text(json.dumps(asdict(progress), indent=1))


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint-STEP folder's name, or None for any other name."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match[1]) if match else None


class ProgressWriter:
    """Keeps a run's progress.json up to date while it trains: the first step of this process, then at most every
    PROGRESS_INTERVAL seconds, and each sample at once; on leaving the `with` block, how it ended (finished, stopped
    by Ctrl-C, or failed with its one-line error). With `enabled` False (processes other than the main one) it
    writes nothing. A resumed run keeps the newest sample and the history (up to the step it resumes from) of the
    run it continues."""

    def __init__(self, run: Run, total: int, enabled: bool = True, resuming: bool = False) -> None:
        self.run, self.enabled = run, enabled
        self.progress = Progress("running", 0, total)
        earlier = run.progress() if resuming else None
        if earlier:
            self.progress.sample, self.progress.history = earlier.sample, earlier.history
        self._every = math.ceil(total / HISTORY_LIMIT)  # steps per history entry
        self._losses: list[float] = []  # since the last history entry
        self._first_step = 0
        self._started = self._written = 0.0

    def __enter__(self) -> ProgressWriter:
        return self

    def begin(self, step: int) -> None:
        """The loop starts at `step` (a resumed run's checkpoint step, else 0)."""
        self.progress.step, self._first_step, self._started = step, step, time.monotonic()
        self.progress.history = [entry for entry in self.progress.history if entry[0] <= step]
        self._write()

    def step(self, step: int, loss: float, learning_rate: float) -> None:
        now = time.monotonic()
        per_step = (now - self._started) / (step - self._first_step)
        self.progress.step, self.progress.loss, self.progress.learning_rate = step, loss, learning_rate
        self.progress.seconds_per_step = per_step
        self.progress.eta_seconds = per_step * (self.progress.total - step)
        self._losses.append(loss)
        if step % self._every == 0 or step == self.progress.total:
            self.progress.history.append([step, sum(self._losses) / len(self._losses), learning_rate])
            self._losses.clear()
        if now - self._written >= PROGRESS_INTERVAL or step == self._first_step + 1:
            self._write()

    def sample(self, path: Path) -> None:
        self.progress.sample = str(path)
        self._write()

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.progress.state, self.progress.eta_seconds = "finished", 0.0
        elif isinstance(error, KeyboardInterrupt):
            self.progress.state, self.progress.message = "stopped", str(error) or "interrupted"
        else:
            message = first_line(error)
            self.progress.state = "failed"
            self.progress.message = message if isinstance(error, UserError) else f"{type(error).__name__}: {message}"
        with contextlib.suppress(OSError, DiskFullError):  # a full disk must not hide how the run ended
            self._write()

    def _write(self) -> None:
        if self.enabled:
            self.progress.updated = time.time()
            self.run.write_progress(self.progress)
            self._written = time.monotonic()
