"""The web app's files and its contract with the two command-line tools.

Everything the app writes lives under `Workspace.root` (./outputs by default), in folders whose names it generates
(never from user text):

- `<root>/<run>/` is one tuning job: the training `output_dir` (a `tuneavideo.run.Run`), plus the app's own
  `tune.yaml` (the config it hands to `train_tuneavideo.py`), `source.<ext>` (the clip, copied under that name),
  `job.json` and `log.txt`;
- `<root>/<run>/edits/<edit>/` (under `Run.edits`) is one editing job: its `request.json` (the `EditRequest`
  handed whole to `inference.py --request`), the edit's files, and its `job.json` and `log.txt`.

Jobs run as subprocesses of `train_tuneavideo.py` and `inference.py`: the CLIs start them, so a job outlives the
browser tab that started it. What they did comes back through files, never through their printed lines: a tuning's
`progress.json` (`Run.progress`), an edit's `result.json` (`EditResult.load`). The two `*_command` functions below
are the only place that knows the CLIs' flags; an edit's settings never become flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..base_model import SINGLE_FILE_SUFFIXES
from ..checks import check_sd_folder
from ..config import load_config
from ..video.frames import tuned_window
from ..video.readers import IMAGE_SUFFIXES, Clip, VideoInfo
from ..editing import plan_edit
from ..errors import UserError
from ..evaluate import evaluation_models
from ..request import EditRequest
from ..run import Run, request_file
from ..tiny import make_tiny_sd, tiny_unet_config

REPO = Path(__file__).resolve().parents[2]
TUNE_CONFIG = "tune.yaml"
TINY_MODEL = "tiny-sd"  # what `python -m tuneavideo.demo` writes too
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif")


@dataclass(frozen=True)
class Workspace:
    """Where the app reads base models and clips and writes jobs, and the limits it puts on uploads."""

    root: Path
    checkpoints: Path
    data: Path
    max_upload_bytes: int = 200 * 2**20
    max_clip_seconds: float = 60.0
    repo: Path = REPO  # holds train_tuneavideo.py and inference.py
    python: str = sys.executable

    def base_models(self) -> dict[str, Path]:
        """Stable Diffusion folders under `checkpoints`, and single-file checkpoints (`.safetensors`, `.ckpt`) there,
        by name; anything else there is left out (a file's keys are read when a run starts)."""
        found = {}
        for path in sorted(self.checkpoints.glob("*")):
            if path.is_dir():
                try:
                    check_sd_folder(path)
                except UserError:
                    continue
            elif path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                continue
            found[path.name] = path
        return found

    def loras(self) -> dict[str, Path]:
        """LoRA files in `checkpoints/loras/` (A1111's `models/Lora`), by name: a fixed list the page offers."""
        return {path.name: path for path in sorted(self.checkpoints.glob("loras/*.safetensors"))}

    def controlnets(self) -> dict[str, Path]:
        """ControlNet folders under `checkpoints` (diffusers' layout, as `download_models.sh --controlnet` writes
        them), by name: a fixed list the page offers."""
        found = {}
        for config in sorted(self.checkpoints.glob("*/config.json")):
            try:
                kind = json.loads(config.read_text()).get("_class_name")
            except (OSError, ValueError, AttributeError):
                continue
            if kind == "ControlNetModel":
                found[config.parent.name] = config.parent
        return found

    def ensure_base_model(self) -> Path | None:
        """With no Stable Diffusion folder under `checkpoints`, write the tiny random one (as the demo does).

        Returns the folder written, or None when a model was already there.
        """
        if self.base_models():
            return None
        return make_tiny_sd(self.checkpoints / TINY_MODEL)

    def clips(self) -> dict[str, Path]:
        """Video files and folders of frame images in `data` by name: a fixed list the page offers, so no user text
        becomes a path."""
        return {path.name: path for path in sorted(self.data.glob("*"))
                if path.suffix.lower() in VIDEO_SUFFIXES
                or (path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()))}

    def can_evaluate(self) -> bool:
        """Whether edit jobs (run from the repository) find the scoring models, in its checkpoints/ (where
        `./download_models.sh --eval` puts them) or the Hugging Face cache: then edits are scored."""
        try:
            evaluation_models(checkpoints=self.repo / "checkpoints")
        except UserError:
            return False
        return True

    def runs(self) -> dict[str, Path]:
        """Finished runs (folders of `root` holding a tuned model) by folder name, the newest to finish first."""
        finished = [run for run in map(Run, self.root.glob("*/")) if run.finished]
        newest = sorted(finished, key=lambda run: run.model_index.stat().st_mtime, reverse=True)
        return {run.folder.name: run.folder for run in newest}

    def new_folder(self, parent: Path | None = None, prefix: str = "") -> Path:
        """A fresh folder under `parent` (default `root`) named from the time and a random suffix."""
        parent = parent or self.root
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            folder = parent / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder


def is_random_model(folder: str | Path) -> bool:
    """Whether `folder` is the tiny random model of `tuneavideo.tiny` (its UNet widths), whose output is noise."""
    try:
        config = json.loads((Path(folder) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("block_out_channels") == list(tiny_unet_config()["block_out_channels"])


# --- tuning -----------------------------------------------------------------------------------------------------


@dataclass
class TuneSettings:
    """The settings the Tune tab edits; `write_tune_config` maps them onto the training config's keys."""

    prompt: str
    max_train_steps: int
    n_sample_frames: int
    sample_frame_rate: int  # "stride": take every n-th source frame
    sample_start_idx: int
    size: int  # the long side in pixels (train_data.width and height); the clip's aspect ratio is kept
    learning_rate: float
    seed: int
    sample_prompt: str  # the validation prompt; empty: the tuning prompt (a reconstruction)
    sample_steps: int  # DDIM steps of the validation samples and of their inversion
    validation_steps: int  # a validation sample (and a checkpoint) every this many steps, and at the end
    loras: tuple[Path, ...] = ()  # LoRA files fused into the base model (from `Workspace.loras`)
    lora_scale: float = 1.0  # of every one of them


# Values for the preset buttons (the prompt and sample prompt stay the user's), in the order of the Tune tab's fields.
# "paper" is the original's configs/man-skiing.yaml; "quick" is a short look at a clip.
PRESETS: dict[str, dict[str, int | float]] = {
    "quick": dict(max_train_steps=100, n_sample_frames=8, sample_frame_rate=2, sample_start_idx=0, size=256,
                  learning_rate=3e-5, seed=33, sample_steps=20, validation_steps=100),
    "paper": dict(max_train_steps=500, n_sample_frames=24, sample_frame_rate=2, sample_start_idx=0, size=512,
                  learning_rate=3e-5, seed=33, sample_steps=50, validation_steps=100),
}


def read_clip(path: Path) -> VideoInfo:
    """What `path` holds as a clip, or the reader's one-line error naming the clip by its upload name (not the
    server's copy of the upload)."""
    try:
        return Clip(path).info
    except UserError as err:
        raise UserError(str(err).replace(str(path), f"the clip {path.name!r}")) from err


def check_clip(path: Path, settings: TuneSettings, max_seconds: float) -> None:
    """Refuse a clip that is not a video, is longer than `max_seconds` or too short for `settings` (an upload too
    large never gets here: Gradio refuses it, by the app's `max_file_size`).

    The messages are the readers' one-line errors or name the limit, so the page can show them as they are.
    """
    info = read_clip(path)
    seconds = float(info.num_frames / info.fps)
    if seconds > max_seconds:
        raise UserError(f"the clip is {seconds:.1f} s long; the limit is {max_seconds:g} s (cut it, then upload it)")
    tuned_window(info.num_frames, settings.n_sample_frames, settings.sample_start_idx, settings.sample_frame_rate,
                 f"the clip {path.name!r}")


def write_tune_config(folder: Path, base_model: Path, clip: Path, settings: TuneSettings) -> Path:
    """Write `folder/tune.yaml`, a training config whose output_dir is `folder` itself, and check it loads."""
    for text in (settings.prompt, settings.sample_prompt):
        if "${" in text:  # OmegaConf would read it as an interpolation
            raise UserError("a prompt cannot contain '${'")
    prompt = settings.prompt.strip()
    config = {
        "pretrained_model_path": str(base_model.resolve()),
        "output_dir": str(folder.resolve()),
        "train_data": {
            "video_path": str(clip.resolve()), "prompt": prompt, "n_sample_frames": settings.n_sample_frames,
            "width": settings.size, "height": settings.size, "sample_start_idx": settings.sample_start_idx,
            "sample_frame_rate": settings.sample_frame_rate,
        },
        "validation_data": {
            "prompts": [settings.sample_prompt.strip() or prompt], "video_length": settings.n_sample_frames,
            "num_inference_steps": settings.sample_steps, "num_inv_steps": settings.sample_steps,
        },
        "max_train_steps": settings.max_train_steps,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "validation_steps": settings.validation_steps,
        # a checkpoint with every sample, only the newest kept: a crashed or killed run resumes from there
        "checkpointing_steps": settings.validation_steps,
        "checkpoints_total_limit": 1,
        "loras": [{"path": str(path.resolve()), "scale": settings.lora_scale} for path in settings.loras],
    }
    path = folder / TUNE_CONFIG
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    load_config(path)  # a bad value fails here, as a one-line ConfigError, not minutes later in the job
    return path


def prepare_tune(workspace: Workspace, base_model: Path, clip: Path, settings: TuneSettings) -> tuple[Path, list[str]]:
    """Check the clip, make the run folder, copy the clip into it and write its config.

    Returns the run folder and the command that tunes it. `clip` may be an upload whose name is the user's: it is
    only read, and copied as `source<suffix>`.
    """
    if not settings.prompt.strip():
        raise UserError("describe the clip in the prompt, e.g. 'a man is skiing'")
    check_clip(clip, settings, workspace.max_clip_seconds)
    folder = workspace.new_folder()
    try:
        if clip.is_dir():  # a folder of frames
            source = folder / "source"
            shutil.copytree(clip, source)
        else:
            source = folder / f"source{clip.suffix.lower() if clip.suffix.lower() in VIDEO_SUFFIXES else '.mp4'}"
            shutil.copyfile(clip, source)
        config = write_tune_config(folder, base_model, source, settings)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, tune_command(workspace, config)


def tune_command(workspace: Workspace, config: Path, resume: bool = False) -> list[str]:
    """`train_tuneavideo.py` on the app's config; resuming is the same config with resume_from_checkpoint=latest."""
    command = [workspace.python, str(workspace.repo / "train_tuneavideo.py"), f"--config={config}"]
    return command + ["resume_from_checkpoint=latest"] if resume else command


# --- editing ----------------------------------------------------------------------------------------------------


def run_defaults(run: Path) -> dict[str, int | bool | str]:
    """Edit settings that fit `run`: its validation steps (so its cached inversion is reused), its seed and stride,
    its tuned prompt (a local edit's source prompt) and whether it was tuned from the tiny random model ("random")."""
    cfg = Run(run).config()
    steps = cfg.validation_data.num_inv_steps
    return dict(num_inference_steps=steps, num_inv_steps=steps, seed=cfg.seed or 0,
                stride=cfg.train_data.sample_frame_rate, prompt=cfg.train_data.prompt,
                random=is_random_model(cfg.pretrained_model_path))


def prepare_edit(workspace: Workspace, run_name: str, request: EditRequest) -> tuple[Path, list[str]]:
    """Check the run and the request as `inference.py` does (`plan_edit`: no model is loaded), make the edit's
    folder under the run and write the request there (scored when the scoring models are there); returns the folder
    and the edit command."""
    run = workspace.runs().get(run_name)
    if run is None:
        raise UserError(f"there is no finished run named {run_name!r}; pick one from the list")
    prompts = [prompt.strip() for prompt in request.prompts if prompt.strip()]
    if not prompts:
        raise UserError("give at least one prompt (one per line)")
    folder = workspace.new_folder(Run(run).edits, prefix="edit-")
    request = dataclasses.replace(request, prompts=prompts, output_dir=str(folder), evaluate=workspace.can_evaluate())
    try:
        plan_edit(run, request)
    except UserError:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # leave no empty edits/ behind either
            folder.parent.rmdir()
        raise
    return folder, edit_command(workspace, run, request.save(request_file(folder)))


def edit_command(workspace: Workspace, run: Path, request: Path) -> list[str]:
    """The `inference.py` command of the edit whose `EditRequest` is the file `request`."""
    return [workspace.python, str(workspace.repo / "inference.py"), f"--model={run}", f"--request={request}"]


def metrics_markdown(path: Path) -> str:
    """The figures `inference.py --evaluate` wrote, as a table (empty when there are none); a local edit's PSNR
    outside its blend mask in a last column ("-" where there is none: the source, a mask over every pixel)."""
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    psnr = any("psnr_outside_mask" in record for record in records)
    rows = ["| video | frame consistency | text alignment | PickScore |" + (" PSNR outside the mask |" if psnr else ""),
            "|---|---|---|---|" + ("---|" if psnr else "")]
    for record in records:
        for name, figures in ((record["video"], record), ("source", record["source"])):
            row = (f"| {name} | {figures['frame_consistency']:.2f} | {figures['text_alignment']:.2f} | "
                   f"{figures['pickscore']:.2f} |")
            if psnr:
                value = figures.get("psnr_outside_mask")
                row += " - |" if value is None else f" {value:.2f} dB |"
            rows.append(row)
    return "**LOVEU-TGVE figures** (the source's for the same prompt below each edit)\n\n" + "\n".join(rows)
