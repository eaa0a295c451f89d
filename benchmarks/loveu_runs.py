"""One video of the LOVEU-TGVE 2023 benchmark: its config pointed at this data and output, its tuning, its edits in
the submission layout and their scores. Each step is skipped when its result is on disk (`benchmarks/loveu.py`
runs these for every video of every process).

Where things go, for the config `CONFIGS/<set>/<video>.yaml` (the benchmark's `configs/loveu-tgve-2023` tree):

    DATA/<set>/480p_frames/<video>/*.jpg          the frames tuned and edited (the configs' own `video_path` assumes
                                                  the benchmark's ./data folder; the mapping here replaces it)
    OUT/configs/<set>/<video>.yaml                the config as tuned (every override and path resolved)
    OUT/runs/<set>/<video>/                       the tuning run (train_tuneavideo.py's output_dir), tune.log, edits/
    OUT/submission/<set>/<video>/<type>/00000.jpg the edit of each prompt type (style, object, background, multiple)
    OUT/results/<set>/<video>.json                what was edited with which settings, and the scores
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from tuneavideo.atomic import atomic_path
from tuneavideo.checkpointing import remove_checkpoints
from tuneavideo.config import TrainConfig, load_config, validation_prompts
from tuneavideo.video.readers import Clip
from tuneavideo.editing import edit
from tuneavideo.request import EditRequest
from tuneavideo.errors import UserError
from tuneavideo.evaluate import Evaluator, read_frames
from tuneavideo.run import Run
from tuneavideo.training import TrainingWindows

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train_tuneavideo.py"
SETS = ("DAVIS_480p", "youtube_480p", "videvo_480p")  # the benchmark's order
FRAMES_FOLDER = "480p_frames"
# keys the benchmark sets for every video; an override of one would be silently replaced
OWN_KEYS = {"output_dir": "--output", "pretrained_model_path": "--pretrained-model",
            "train_data.video_path": "--data", "resume_from_checkpoint": "rerunning", "overwrite": "rerunning"}
# launcher variables that make accelerate join a process group (torchrun's and accelerate launch's own)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_")


@dataclass(frozen=True)
class Video:
    """One config of the benchmark's tree, `configs/<set>/<name>.yaml`."""

    set: str
    name: str
    config: Path

    @property
    def id(self) -> str:
        return f"{self.set}/{self.name}"


def set_order(name: str) -> tuple[int, str]:
    """The benchmark's sets in its order, any other after them by name."""
    return (SETS.index(name), "") if name in SETS else (len(SETS), name)


def find_videos(configs: Path, only: list[str] | None = None) -> list[Video]:
    """Every `<set>/<video>.yaml` under `configs` (sets in the benchmark's order, videos by name), those matching a
    pattern of `only` (`SET`, or `SET/VIDEO`, shell wildcards) when given."""
    if not configs.is_dir():
        raise UserError(f"--configs {configs}: no such folder; give the benchmark's configs/loveu-tgve-2023 (git "
                        "clone https://github.com/showlab/loveu-tgve-2023)")
    videos = [Video(path.parent.name, path.stem, path) for path in configs.glob("*/*.yaml")]
    if not videos:
        nested = " (it holds loveu-tgve-2023/: give that folder)" if (configs / "loveu-tgve-2023").is_dir() else ""
        raise UserError(f"--configs {configs}: no <set>/<video>.yaml in it{nested}; give the benchmark's "
                        "configs/loveu-tgve-2023")
    if only:
        videos = [v for v in videos if any(fnmatch.fnmatch(v.id, p) or fnmatch.fnmatch(v.set, p) for p in only)]
        if not videos:
            raise UserError(f"--only {' '.join(only)}: matches no <set>/<video> under {configs}")
    return sorted(videos, key=lambda v: (set_order(v.set), v.name))


@dataclass(frozen=True)
class Layout:
    """Where a benchmark run under `output` keeps each video's files (see the module docstring)."""

    output: Path

    def config(self, video: Video) -> Path:
        return self.output / "configs" / video.set / f"{video.name}.yaml"

    def run(self, video: Video) -> Path:
        return self.output / "runs" / video.set / video.name

    def submission(self, video: Video) -> Path:
        return self.output / "submission" / video.set / video.name

    def record(self, video: Video) -> Path:
        return self.output / "results" / video.set / f"{video.name}.json"


def frames_folder(data: Path, video: Video) -> Path:
    """The video's frames in the dataset as unpacked from loveu-tgve-2023.zip."""
    return data / video.set / FRAMES_FOLDER / video.name


def check_overrides(overrides: list[str]) -> None:
    """Refuse `KEY=VALUE` overrides of the keys `video_config` sets itself, which would be silently replaced."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise UserError(f"override {item!r}: the benchmark sets {key} itself (use {OWN_KEYS[key]})")


def video_config(video: Video, data: Path, layout: Layout, overrides: list[str],
                 pretrained_model: str | None = None) -> TrainConfig:
    """The benchmark's config of `video` with `overrides`, tuning on its frames under `data` into its run folder.

    Validation runs only at the last step, where it writes the inversion the edits reuse (the configs' validation
    every 100 steps would sample the four prompts five times for nothing); one checkpoint is kept while tuning.
    """
    cfg = load_config(video.config, overrides)
    frames = frames_folder(data, video)
    if not frames.is_dir():
        raise UserError(f"{video.config}: its frames {frames} are missing; unpack loveu-tgve-2023.zip and give its "
                        "loveu-tgve-2023 folder as --data")
    if not isinstance(cfg.validation_data.prompts, dict):
        raise UserError(f"{video.config}: validation_data.prompts must map edit types (style, object, background, "
                        "multiple) to prompts, as the benchmark's configs do")
    cfg.train_data.video_path = str(frames.resolve())
    try:  # enough frames for the settings (the folder is listed, nothing decoded): fails now, not hours later
        TrainingWindows.plan(Clip(frames, cfg.train_data.fps), cfg)
    except UserError as err:
        raise UserError(f"{video.config}: {err}") from err
    cfg.output_dir = str(layout.run(video).resolve())
    # absolute paths: a rerun from another folder is the same run
    cfg.pretrained_model_path = str(Path(pretrained_model or cfg.pretrained_model_path).resolve())
    cfg.validation_steps = cfg.max_train_steps
    cfg.checkpoints_total_limit = 1
    cfg.resume_from_checkpoint = "latest"  # an interrupted tuning continues; a fresh one starts at step 0
    return cfg


def single_process_environment(device_type: str, device_index: int | None,
                               environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a tuning of one process: without the launcher's variables (with them, accelerate would
    join this launch's process group and the processes would tune each other's videos together), on this
    process's GPU when it has one of several."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(LAUNCH_PREFIXES)}
    if device_type == "cuda" and device_index is not None:
        visible = [part.strip() for part in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[device_index] if visible else str(device_index)
    return env


def tune(video: Video, cfg: TrainConfig, layout: Layout, env: dict[str, str]) -> bool:
    """Tune `video` unless its run is finished (an unfinished one continues from its checkpoint): `python
    train_tuneavideo.py` in `env`, its output in the run's tune.log, how it ended in its progress.json. Returns
    whether it tuned."""
    run = Run(cfg.output_dir)
    if run.config_file.is_file():
        _check_same_tuning(video, cfg, run)
        if run.finished:
            remove_checkpoints(run)  # left by a stop between the end of the tuning and their removal
            return False
    config = layout.config(video)
    with atomic_path(config) as path:
        path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    run.folder.mkdir(parents=True, exist_ok=True)
    log_path = run.folder / "tune.log"
    started = time.time()
    with open(log_path, "a") as log:  # appended to: an interrupted tuning's log goes on
        child = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), f"--config={config}"], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.wait()  # it had the Ctrl-C too: it saves a checkpoint after its current step
            raise KeyboardInterrupt(f"{video.id} stopped with a checkpoint; run the same command to continue")
        finally:
            if child.poll() is None:  # stopped otherwise (SIGTERM from the launcher, a second Ctrl-C)
                child.terminate()
                child.wait()
    if code != 0:
        progress = run.progress(since=started)
        ended = progress.message if progress and progress.message else f"exit status {code}"
        raise UserError(f"{video.id}: tuning failed: {ended} (whole log: {log_path})")
    remove_checkpoints(run)  # only an unfinished tuning needs one
    return True


def _check_same_tuning(video: Video, cfg: TrainConfig, run: Run) -> None:
    """A run folder tuned with other settings is not reused, nor replaced: its tuning may have cost an hour."""
    try:
        done = load_config(run.config_file)
    except UserError as err:
        raise UserError(f"{video.id}: {err}; remove {run.folder} to tune it again") from err
    ignored = {"resume_from_checkpoint", "overwrite"}
    old, new = _flat(done), _flat(cfg)
    changed = [key for key in sorted(old.keys() | new.keys()) if key not in ignored and old.get(key) != new.get(key)]
    if changed:
        what = "; ".join(f"{key}: {old.get(key)!r} there, {new.get(key)!r} now" for key in changed[:3])
        raise UserError(f"{video.id}: {run.folder} was tuned with other settings ({what}); remove that folder to tune "
                        "it again, or choose another --output")


def _flat(cfg: TrainConfig) -> dict[str, object]:
    flat = {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict) and key in ("train_data", "validation_data"):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# Edits and scores. A video's record (OUT/results/<set>/<video>.json) holds, per edit type, the prompt and the
# settings it was edited with, and its scores with the digest of the frames scored and the models that scored them.


def load_record(video: Video, layout: Layout, num_frames: int) -> dict:
    path = layout.record(video)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update({"set": video.set, "video": video.name, "config": str(video.config),
                   "run": str(layout.run(video)), "num_frames": num_frames})
    record.setdefault("edits", {})
    return record


def save_record(video: Video, layout: Layout, record: dict) -> None:
    with atomic_path(layout.record(video)) as path:
        path.write_text(json.dumps(record, indent=1))


def edit_settings(cfg: TrainConfig) -> dict:
    """What an edit depends on besides its prompt: the sampling settings, and which tuning (its tuned tensors'
    size and time: a video tuned again must be edited again)."""
    validation = cfg.validation_data
    tuned_file = os.stat(Run(cfg.output_dir).tuned_parameters)
    return {"num_inference_steps": validation.num_inference_steps, "guidance_scale": validation.guidance_scale,
            "num_inv_steps": validation.num_inv_steps, "negative_prompt": validation.negative_prompt,
            "seed": cfg.seed if cfg.seed is not None else 0, "num_frames": cfg.train_data.n_sample_frames,
            "tuned": [tuned_file.st_size, tuned_file.st_mtime_ns]}


def frame_names(num_frames: int) -> list[str]:
    return [f"{index:05d}.jpg" for index in range(num_frames)]


def edits_done(record: dict, folder: Path, prompt: str, settings: dict) -> bool:
    """Whether `folder` holds exactly the frames of an edit of `prompt` made with `settings`."""
    done = record["edits"].get(folder.name)
    if done is None or done.get("prompt") != prompt or done.get("settings") != settings:
        return False
    return folder.is_dir() and sorted(p.name for p in folder.glob("*.jpg")) == frame_names(settings["num_frames"])


def make_edits(video: Video, cfg: TrainConfig, layout: Layout, record: dict) -> list[str]:
    """Edit every prompt type of `video` whose frames are not all in the submission; returns the types edited.

    One `edit` of the tuned frames for the missing prompts (the inversion is the run's own); each edit's JPEG
    folder is recorded, then moved into the submission, so a folder there is always complete."""
    settings = edit_settings(cfg)
    submission = layout.submission(video)
    missing = [(kind, prompt) for kind, prompt in validation_prompts(cfg.validation_data)
               if not edits_done(record, submission / kind, prompt, settings)]
    if not missing:
        return []
    validation = cfg.validation_data
    options = EditRequest(prompts=[prompt for _, prompt in missing], negative_prompt=validation.negative_prompt,
                          num_inference_steps=validation.num_inference_steps, guidance_scale=validation.guidance_scale,
                          num_inv_steps=validation.num_inv_steps, audio=False, jpeg_frames=True, gif=False)
    try:
        result = edit(cfg.output_dir, options)
    except UserError as err:
        raise UserError(f"{video.id}: {err}") from err
    for (kind, prompt), folder in zip(missing, result.frame_folders):
        written = sorted(p.name for p in folder.glob("*.jpg"))
        if written != frame_names(settings["num_frames"]):
            raise RuntimeError(f"{video.id}: the {kind} edit wrote {len(written)} frames, not the "
                               f"{settings['num_frames']} tuned")
        record["edits"][kind] = {"prompt": prompt, "settings": settings, "frames": str(submission / kind),
                                 "scores": None}
        save_record(video, layout, record)
        with atomic_path(submission / kind) as target:
            os.replace(folder, target)
    return [kind for kind, _ in missing]


def frames_digest(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.jpg")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def unscored(record: dict, models: dict[str, str]) -> list[str]:
    """The edit types of `record` without scores of their current frames by `models`."""
    return [kind for kind, done in record["edits"].items()
            if not (done.get("scores") and done["scores"].get("models") == models
                    and done["scores"].get("digest") == frames_digest(Path(done["frames"])))]


def score_edits(video: Video, layout: Layout, record: dict, evaluator: Evaluator, models: dict[str, str]) -> None:
    """Score every edit of `record` not scored yet (`unscored`), and save the record."""
    for kind in unscored(record, models):
        done = record["edits"][kind]
        folder = Path(done["frames"])
        scores = evaluator.score(read_frames(folder), done["prompt"])
        done["scores"] = {**dataclasses.asdict(scores), "digest": frames_digest(folder), "models": models}
        save_record(video, layout, record)
