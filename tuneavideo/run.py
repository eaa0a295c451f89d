"""A run folder (a training `output_dir`): the one place that names its files.

    config.yaml                    the training config as resolved (every override applied), with the versions
    base_model.json                what it was tuned from: the base model, its config folder, and each LoRA's path,
                                   SHA-256 and scale (`tuneavideo.base_model.BaseModel.record`)
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

An edit folder (`edits/` or any `inference.py --output-dir`) holds edits side by side (`EditFiles`): each video's
`<prompt>.mp4` (and `.gif`, `<prompt>/` JPEG frames, a local edit's `<prompt>.mask.mp4`), each edit's own
`<name>.side-by-side.mp4` (and a local edit's `<name>.inversion.mp4`, a scored edit's `<name>.metrics.json`),
where the name is its prompts' file names joined by `+`, and `result.json`: every edit written there
(`EditResult`), the newest last; the web app's edit folders also hold the job's `request.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import diffusers
import torch
import transformers
from omegaconf import OmegaConf
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from transformers import CLIPTokenizer

from .atomic import DiskFullError, atomic_path
from .config import ConfigError, TrainConfig, load_config
from .errors import UserError, first_line
from .pipelines.loading import load_tuned_pipeline
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from .pipelines.windows import Window
from .video.frames import tuned_window
from .video.readers import Clip, VideoReadError
from .video.writers import prompt_file_name

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"  # diffusers' pipeline index: written last, so its presence means finished
PROGRESS_INTERVAL = 1.0  # seconds between progress.json rewrites while training runs
HISTORY_LIMIT = 1000  # most entries in progress.json's history: a longer run keeps one per so many steps
SIDE_BY_SIDE = "side-by-side"  # <edit>.side-by-side.mp4: the source and every video of the edit
INVERSION = "inversion"  # <edit>.inversion.mp4: a local edit's source branch, decoded
MASK = "mask"  # <prompt>.mask.mp4: a local edit's blend mask over the source
CONDITION = "condition"  # <edit>.condition.mp4: the condition frames of a structure-guided edit
# a video's file name must not end in .<kind>: it would take theirs
SHARED_KINDS = (SIDE_BY_SIDE, INVERSION, MASK, CONDITION)
EDIT_PROGRESS_SUFFIX = ".progress.json"  # <edit>.progress.json: how an edit goes (`tuneavideo.edit_progress`)
EDIT_NAME_BYTES = 160  # an edit's name past this many UTF-8 bytes is cut and given a hash: file names hold 255
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_SAMPLE = re.compile(r"sample-(\d+)")


class RunError(UserError):
    """A run folder that is missing, unfinished or unreadable; the message is one line."""


def result_file(edit_folder: str | os.PathLike) -> Path:
    """Where an edit writes its `EditResult`, beside its videos."""
    return Path(edit_folder) / "result.json"


def request_file(edit_folder: str | os.PathLike) -> Path:
    """Where the web app writes an edit job's `EditRequest` for `inference.py --request`."""
    return Path(edit_folder) / "request.json"


@dataclass(frozen=True)
class EditFiles:
    """Where one edit writes in `folder`: per video (of file stem `stems[k]`) its MP4, GIF, JPEG folder and a local
    edit's mask; per edit its side-by-side, a local edit's inversion, a guided edit's conditions and a scored edit's
    metrics, named after the edit (`name`), so that edits sharing a folder keep each other's files."""

    folder: Path
    stems: list[str]  # one per video, in prompt order
    name: str  # the edit's own: its prompts' file names joined by "+"

    @classmethod
    def of(cls, folder: str | os.PathLike, prompt_stems: list[str], stems: list[str]) -> EditFiles:
        name = "+".join(prompt_stems)
        if len(name.encode()) > EDIT_NAME_BYTES:
            digest = hashlib.sha1(name.encode()).hexdigest()[:8]
            name = name.encode()[: EDIT_NAME_BYTES - 9].decode(errors="ignore") + "-" + digest
        return cls(Path(folder), stems, name)

    def videos(self, suffix: str = ".mp4") -> list[Path]:
        return [self.folder / f"{stem}{suffix}" for stem in self.stems]

    def masks(self) -> list[Path]:
        return self.videos(f".{MASK}.mp4")

    def frame_folders(self) -> list[Path]:
        return [self.folder / stem for stem in self.stems]

    @property
    def side_by_side(self) -> Path:
        return self.folder / f"{self.name}.{SIDE_BY_SIDE}.mp4"

    @property
    def inversion(self) -> Path:
        return self.folder / f"{self.name}.{INVERSION}.mp4"

    @property
    def condition(self) -> Path:
        """Every ControlNet's condition frames, side by side, frame for frame with the edit."""
        return self.folder / f"{self.name}.{CONDITION}.mp4"

    @property
    def metrics(self) -> Path:
        """The LOVEU-TGVE figures of a scored edit."""
        return self.folder / f"{self.name}.metrics.json"

    @property
    def progress(self) -> Path:
        """How the edit goes while it runs (`tuneavideo.edit_progress`); written in place (atomically), not
        staged, so that it can be read during the edit."""
        return self.folder / f"{self.name}{EDIT_PROGRESS_SUFFIX}"


@dataclass
class EditResult:
    """What an edit wrote and how: one entry of its folder's result.json."""

    folder: Path
    videos: list[Path]  # one MP4 per prompt and video, in prompt order
    gifs: list[Path]  # empty when the edit is too long for a GIF, or without `gif`
    side_by_side: Path
    size: tuple[int, int]  # (width, height) of every edit
    fps: Fraction  # the MP4s' constant rate
    frames: range  # the source frames edited
    span: tuple[float, float]  # seconds [start, end) of the source's timeline the edits cover
    windows: int  # UNet calls per denoising step
    cached_latent: Path | None  # the inversion reused from the run folder; None when the clip was inverted here
    with_audio: bool  # whether the MP4s carry the source's sound
    frame_folders: list[Path]  # one JPEG folder per video with `jpeg_frames`, else empty
    metrics: Path | None = None  # the scores of every edit and of the source (with `evaluate`)
    # the source has a variable frame rate: each edited frame is repeated at `fps` to its source frame's time
    variable_rate: bool = False
    inversion: Path | None = None  # a local edit's source branch decoded: how well the clip was recovered
    masks: list[Path] = field(default_factory=list)  # a local edit's blend mask over the source, per prompt
    condition: Path | None = None  # a structure-guided edit's condition frames

    def save(self) -> None:
        """Add it to its folder's result.json (in place of an earlier edit of the same name), atomically, under a
        lock on the folder: what the app and other readers take the outputs from."""
        def plain(value):
            if isinstance(value, (Path, Fraction)):
                return str(value)
            if isinstance(value, range):
                return [value.start, value.stop, value.step]
            return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value

        entry = {item.name: plain(getattr(self, item.name)) for item in fields(self)}
        descriptor = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # two edits into one folder: neither loses the other's entry
            kept = [old for old in _result_entries(self.folder) if old.get("side_by_side") != entry["side_by_side"]]
            with atomic_path(result_file(self.folder)) as path:
                path.write_text(json.dumps([*kept, entry], indent=1))
        finally:
            os.close(descriptor)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EditResult:
        """The newest edit written to `folder`."""
        return cls.load_all(folder)[-1]

    @classmethod
    def load_all(cls, folder: str | os.PathLike) -> list[EditResult]:
        """Every edit written to `folder`, the oldest first."""
        def path(value: str | None) -> Path | None:
            return None if value is None else Path(value)

        return [cls(folder=Path(data["folder"]), videos=[Path(p) for p in data["videos"]],
                    gifs=[Path(p) for p in data["gifs"]], side_by_side=Path(data["side_by_side"]),
                    size=tuple(data["size"]), fps=Fraction(data["fps"]), frames=range(*data["frames"]),
                    span=tuple(data["span"]), windows=data["windows"], cached_latent=path(data["cached_latent"]),
                    with_audio=data["with_audio"], frame_folders=[Path(p) for p in data["frame_folders"]],
                    metrics=path(data["metrics"]), variable_rate=data["variable_rate"],
                    inversion=path(data.get("inversion")), masks=[Path(p) for p in data.get("masks", [])],
                    condition=path(data.get("condition")))
                for data in _result_entries(folder)]


def _result_entries(folder: str | os.PathLike) -> list[dict]:
    """result.json's entries ([] before the first edit; an earlier version's single edit as one entry)."""
    try:
        data = json.loads(result_file(folder).read_text())
    except FileNotFoundError:
        return []
    return data if isinstance(data, list) else [data]


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
    def base_model_file(self) -> Path:
        return self.folder / "base_model.json"

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

    def load_pipeline(self, dtype: torch.dtype) -> TuneAVideoPipeline:
        """The tuned pipeline, on the CPU in `dtype`, loaded by class whatever model_index.json names (the original
        code's runs name a module diffusers cannot import: `pipelines.loading`)."""
        try:
            return load_tuned_pipeline(self.folder, dtype)
        except Exception as err:  # damaged weights surface as OSError, ValueError, RuntimeError or SafetensorError
            raise RunError(f"{self.folder}: its tuned model cannot be loaded ({first_line(err)}); re-run the training "
                           "(or resume it from its last checkpoint with resume_from_checkpoint=latest)") from err

    def load_tokenizer(self) -> CLIPTokenizer:
        """The run's tokenizer alone: a local edit's words are checked with it before any model loads."""
        try:
            return CLIPTokenizer.from_pretrained(self.folder, subfolder="tokenizer")
        except Exception as err:  # a damaged file surfaces as OSError, ValueError (JSON) or the tokenizers' Exception
            raise RunError(f"{self.folder / 'tokenizer'}: the run's tokenizer cannot be loaded ({first_line(err)}); "
                           "re-run the training to save the model again") from err

    def num_train_timesteps(self) -> int:
        """The tuned scheduler's timesteps: the most steps an edit or an inversion can take."""
        try:
            return diffusers.DDIMScheduler.load_config(self.folder, subfolder="scheduler")["num_train_timesteps"]
        except (OSError, ValueError, KeyError) as err:
            raise RunError(f"{self.folder / 'scheduler'}: the run's scheduler config cannot be read "
                           f"({first_line(err)}); re-run the training to save the model again") from err

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

    def check_base_model(self, record: dict) -> None:
        """A resumed run must be tuned from the files its base_model.json names (`record`: what it is tuned from
        now), or its weights would be a mix of two bases."""
        if self.base_model_file.is_file() and json.loads(self.base_model_file.read_text()) != record:
            raise RunError(f"{self.base_model_file}: the base model or a LoRA file changed since this run started; "
                           "restore them, or start again with overwrite=true")

    def write_base_model(self, record: dict) -> None:
        """base_model.json: what the run is tuned from (`tuneavideo.base_model.BaseModel.record`)."""
        with atomic_path(self.base_model_file) as path:
            path.write_text(json.dumps(record, indent=1))

    def clip(self, cfg: TrainConfig) -> Clip:
        """The clip the run was tuned on (`cfg` is the run's config)."""
        try:
            return Clip(cfg.train_data.video_path, cfg.train_data.fps)
        except VideoReadError as err:
            raise RunError(f"{err} (the source clip, train_data.video_path in {self.config_file})") from err

    def unet_config(self) -> FrozenDict:
        """The tuned UNet's config (its widths, its text width), read without loading any weights."""
        return FrozenDict(UNet2DConditionModel.load_config(self.folder, subfolder="unet"))

    def inversion_cache(self, cfg: TrainConfig, clip: Clip, size: tuple[int, int], frames: range,
                        windows: list[Window], num_inv_steps: int, control: list | None = None,
                        validation_control: bool = True) -> Path:
        """Where the inversion of `frames` of `clip` at `size` in `windows` is cached. The tuned window inverted as
        validation does it (under the structure guidance the run was tuned under: `validation_control`) is the run's
        own validation latent; any other is keyed by everything it depends on: the clip's files, the tuned weights,
        the size, the frames, the windows, the steps and the structure guidance `control` (`structure_key`)."""
        data, validation = cfg.train_data, cfg.validation_data
        tuned = tuned_window(clip.info.num_frames, data.n_sample_frames, data.sample_start_idx,
                             data.sample_frame_rate, clip.path)
        if (frames == tuned and len(windows) == 1 and validation.use_inv_latent and validation_control
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
        if control:  # keys of inversions without control stay what they were
            key["control"] = control
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / "inv_latents" / f"span-{digest}.pt"

    @staticmethod
    def read_inversion(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The cached inversion at `path` when it can be read and has `shape`, else None (the clip is inverted)."""
        if not path.is_file():
            return None
        try:
            latent = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or foreign file: torch raises many types
            logger.warning(f"note: {path} cannot be read ({first_line(err)}); inverting the clip again")
            return None
        if not isinstance(latent, torch.Tensor) or tuple(latent.shape) != shape:
            logger.info(f"{path} is not a latent of shape {shape}; inverting the clip again")
            return None
        if not torch.isfinite(latent).all():  # an edit from it would be black
            logger.warning(f"note: {path} holds values that are not finite (NaN or infinite); inverting the clip "
                           "again")
            return None
        return latent.float()

    # --- progress --------------------------------------------------------------------------------------------------

    def progress(self, since: float = 0.0) -> Progress | None:
        """What progress.json says, or None when that is unknown: before a training wrote it, when it was written
        before `since` (a time.time(): a reader that started a training ignores what an earlier one left), or when
        it cannot be read (truncated, not JSON, a value of the wrong type). Keys it does not know (a newer
        version's) are ignored."""
        try:
            values = json.loads(self.progress_file.read_text())
            known = {f.name for f in fields(Progress)}
            progress = Progress(**{key: value for key, value in values.items() if key in known})
        except (OSError, ValueError, TypeError, AttributeError):  # JSON and UTF-8 errors are ValueErrors
            return None
        return progress if _well_formed(progress) and progress.updated >= since else None

    def write_progress(self, progress: Progress) -> None:
        with atomic_path(self.progress_file) as path:
            path.write_text(json.dumps(asdict(progress), indent=1))


def _well_formed(progress: Progress) -> bool:
    """Whether every value of a `Progress` read from a file has its field's type (readers format them)."""
    def number(value, optional: bool = True) -> bool:
        return (value is None and optional) or (isinstance(value, (int, float)) and not isinstance(value, bool))

    return (isinstance(progress.state, str) and isinstance(progress.step, int) and isinstance(progress.total, int)
            and all(number(value) for value in (progress.loss, progress.learning_rate, progress.seconds_per_step,
                                                progress.eta_seconds))
            and number(progress.updated, optional=False)
            and all(isinstance(text, str) for text in (progress.sample, progress.message) if text is not None)
            and isinstance(progress.history, list)
            and all(isinstance(entry, list) and len(entry) == 3 and all(map(number, entry))
                    for entry in progress.history))


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
