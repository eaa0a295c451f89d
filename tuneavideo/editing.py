"""Edit a tuned clip from new prompts: the logic behind `inference.py`.

A run folder (a training `output_dir`) holds everything an edit needs: `config.yaml` says which clip, which frames
and what size were tuned; `unet/`, `vae/`, ... is the tuned pipeline with its DDIM scheduler; `inv_latents/` holds
DDIM inversions of the clip. An edit covers a span of the source (by default the tuned window; `span` picks any
seconds of it, or all of it) at a stride of source frames; it inverts those frames (or reuses the cached inversion),
samples every prompt from that latent in overlapping windows of the tuned length (`tuneavideo.pipelines.windows`),
and writes, per prompt, an MP4 with the source's sound over the same span (and a GIF for short edits), plus one
side-by-side MP4 of the source and every edit, all at source fps / stride, so picture and sound stay in sync. With
`EditOptions.local`, every prompt is a local edit of the source prompt under attention control (Video-P2P,
`tuneavideo.local_editing`), which also writes `inversion.mp4` and each prompt's `<prompt>.mask.mp4`.

Memory does not grow with the clip beyond its latents: source frames are resized as they are decoded, and edited
frames are decoded a few at a time and streamed to the encoder.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from transformers import CLIPTokenizer

from .atomic import atomic_path
from .config import TrainConfig, load_config
from .video.frames import ClipTooShortError, clip_size, decode_frames, shown_at_constant_rate, tuned_window
from .video.readers import Clip, frames_text
from .errors import UserError, first_line
from .edit_progress import EditProgressWriter
from .evaluate import Evaluator, read_frames
from .local_editing import INVERSION, MASK_SUFFIX, psnr_outside, upsampled, write_latent_video, write_masks
from .pipelines.edit import invert, progress_steps, sample
from .pipelines.local_edit import GUIDANCE_SCALE, LocalEdit, LocalPlan, invert_and_edit, plan_local
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from .progress import progress_bar
from .run import Run, metrics_file, result_file
from .video.sound import extract_audio, source_span
from .video.writers import Mp4Writer, grid_frames, prompt_file_name, side_by_side, write_gif
from .pipelines.windows import Window, plan_windows

logger = logging.getLogger(__name__)

SIDE_BY_SIDE = "side-by-side"  # file stem of the source-and-every-edit comparison
GIF_MAX_FRAMES = 128  # longer edits get no GIF: a GIF is held whole in memory and grows to hundreds of MB
JPEG_QUALITY = 95  # of `jpeg_frames`; Pillow's default, 75, visibly blurs fine texture


class EditError(UserError):
    """The run folder or the options cannot give an edit; the message is one line."""


Span = tuple[Fraction | None, Fraction | None]  # seconds [start, end) of the source; None: its start / its end


@dataclass
class EditOptions:
    """What to make from a run. The defaults are the original project's: 50 DDIM steps, guidance 12.5, 50 inversion
    steps, no negative prompt, deterministic DDIM (eta 0), the tuned window; with `local` (attention control),
    Video-P2P's guidance 7.5."""

    prompts: list[str]
    negative_prompt: str | None = None
    seed: int | None = None  # None: the run's seed (0 if it had none)
    num_inference_steps: int = 50
    guidance_scale: float | None = None  # None: 12.5, or 7.5 with `local`
    num_inv_steps: int = 50
    num_videos_per_prompt: int = 1
    eta: float = 0.0  # 0: deterministic, so the seed changes nothing; > 0 adds seeded noise at every step
    span: Span | None = None  # None: the tuned window; (None, None): the whole clip
    stride: int | None = None  # source frames per edited frame; None: the tuned sample_frame_rate
    window: int | None = None  # frames per UNet call; None: the tuned n_sample_frames
    overlap: int | None = None  # frames shared by neighbouring windows; None: a quarter window
    output_dir: str | os.PathLike | None = None  # None: <run>/edits
    audio: bool = True
    evaluate: bool = False  # also score every edit and the source with the LOVEU-TGVE metrics: metrics.json
    # also every edited frame as a JPEG straight from the VAE decoder, <output_dir>/<stem>/00000.jpg, ...: the
    # LOVEU-TGVE submission format, scored without the MP4's or the GIF's compression in between
    jpeg_frames: bool = False
    gif: bool = True  # False: no GIF (Pillow takes seconds per hundred 480x480 frames to quantise one)
    local: LocalEdit | None = None  # attention control (Video-P2P local edits); None: plain Tune-A-Video edits


@dataclass
class EditResult:
    """What `edit` wrote and how."""

    folder: Path
    videos: list[Path]  # one MP4 per prompt and video, in prompt order
    gifs: list[Path]  # empty when the edit is longer than GIF_MAX_FRAMES, or without `gif`
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

    def save(self) -> None:
        """Write it to result.json in `folder`, atomically: what the app and other readers take the outputs from."""
        def plain(value):
            if isinstance(value, (Path, Fraction)):
                return str(value)
            if isinstance(value, range):
                return [value.start, value.stop, value.step]
            return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value

        with atomic_path(result_file(self.folder)) as path:
            path.write_text(json.dumps({f.name: plain(getattr(self, f.name)) for f in fields(self)}, indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EditResult:
        """The result.json of the edit written to `folder`."""
        data = json.loads(result_file(folder).read_text())

        def path(value: str | None) -> Path | None:
            return None if value is None else Path(value)

        return cls(folder=Path(data["folder"]), videos=[Path(p) for p in data["videos"]],
                   gifs=[Path(p) for p in data["gifs"]], side_by_side=Path(data["side_by_side"]),
                   size=tuple(data["size"]), fps=Fraction(data["fps"]), frames=range(*data["frames"]),
                   span=tuple(data["span"]), windows=data["windows"], cached_latent=path(data["cached_latent"]),
                   with_audio=data["with_audio"], frame_folders=[Path(p) for p in data["frame_folders"]],
                   metrics=path(data["metrics"]), variable_rate=data["variable_rate"],
                   inversion=path(data.get("inversion")), masks=[Path(p) for p in data.get("masks", [])])


def parse_span(text: str) -> Span:
    """`all`, or `START:END` in seconds with either side optional (`:4.5`, `2:`, `1.5:3`)."""
    if text.strip() == "all":
        return None, None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (Fraction(part.strip()) if part.strip() else None for part in parts)
    except (ValueError, ZeroDivisionError):
        raise EditError(f"{text!r}: give all, or START:END in seconds (either side may be left out, e.g. 2:5.5 "
                        "or :4)") from None
    return start, end


def run_folder(model: str | os.PathLike | None = None, config: str | os.PathLike | None = None) -> Path:
    """The run folder named by `model`, or the `output_dir` of the training config `config`, checked to be finished.

    Raises:
        EditError: neither or both given.
        RunError: no such folder, or no config or tuned model in it.
        ConfigError: `config` cannot be loaded.
    """
    if (model is None) == (config is None):
        raise EditError("name the tuned run with either --model (its folder) or --config (its training config)")
    return Run(model if model is not None else load_config(config).output_dir).check_finished().folder


@dataclass
class EditPlan:
    """Everything an edit needs decided before any model is loaded, with every option and file checked."""

    run: Path
    cfg: TrainConfig
    options: EditOptions
    names: list[str]  # file stem of each prompt
    clip: Clip
    size: tuple[int, int]  # (width, height): the tuned size
    frames: range  # the source frames edited
    window: int
    windows: list[Window]
    folder: Path
    fps: Fraction  # the MP4s' constant rate
    span: tuple[float, float]  # seconds of the source's timeline
    repeats: list[int] | None = None  # a variable-rate source: how often each edited frame is written at `fps`
    guidance_scale: float = 12.5  # the options' or its default
    local: LocalPlan | None = None  # the checked attention control of a local edit

    @property
    def cache(self) -> Path:
        """Where the inversion of these frames is cached (`Run.inversion_cache`)."""
        return Run(self.run).inversion_cache(self.cfg, self.clip, self.size, self.frames, self.windows,
                                             self.options.num_inv_steps)


def plan_edit(run: str | os.PathLike, options: EditOptions) -> EditPlan:
    """Check the run folder, its files and the options, and decide frames, size, windows and outputs."""
    run = run_folder(run)
    names = check_options(options)
    cfg = Run(run).config()
    data = cfg.train_data
    clip = Run(run).clip(cfg)
    stride = options.stride or data.sample_frame_rate
    frames = edit_frames(clip, cfg, options.span, stride)
    window = options.window or data.n_sample_frames
    try:
        windows = plan_windows(len(frames), window, options.overlap)
    except ValueError as err:
        raise EditError(f"--window {window} --overlap {options.overlap}: {err}") from None
    timesteps = _scheduler_config(run)["num_train_timesteps"]
    for name, steps in (("--num-inference-steps", options.num_inference_steps),
                        ("--num-inv-steps", options.num_inv_steps)):
        if steps > timesteps:
            raise EditError(f"{name} {steps}: at most {timesteps} (the model's timesteps)")
    local = None
    if options.local is not None:  # its words checked with the run's tokenizer, before any model loads
        local = plan_local(CLIPTokenizer.from_pretrained(run, subfolder="tokenizer"), options.local, options.prompts,
                           data.prompt, options.num_inference_steps, options.num_inv_steps)
    guidance = options.guidance_scale if options.guidance_scale is not None else GUIDANCE_SCALE if local else 12.5
    folder = _output_folder(Path(options.output_dir) if options.output_dir is not None else Run(run).edits)
    size = clip_size(clip.info.width, clip.info.height, data.width, data.height)
    info = clip.info
    if info.times is None:
        span = source_span(frames.start, len(frames), stride, float(info.fps), info.start_time)
        return EditPlan(run, cfg, options, names, clip, size, frames, window, windows, folder, info.fps / stride, span,
                        None, guidance, local)
    # a variable frame rate: every edited frame is shown at its source frame's time, at one constant rate
    span = info.time(frames.start), info.time(frames[-1] + stride)
    rate, repeats = shown_at_constant_rate([info.time(i) - span[0] for i in frames], span[1] - span[0])
    return EditPlan(run, cfg, options, names, clip, size, frames, window, windows, folder, rate, span, repeats,
                    guidance, local)


def edit(run: str | os.PathLike, options: EditOptions) -> EditResult:
    """Edit the clip tuned in `run` with every prompt of `options`; see the module docstring for the outputs. How it
    goes is kept in the output folder's edit progress file (`tuneavideo.edit_progress`)."""
    plan = plan_edit(run, options)
    with EditProgressWriter(plan.folder) as report:
        return _edit(plan, options, report)


def _edit(plan: EditPlan, options: EditOptions, report: EditProgressWriter) -> EditResult:
    # the scoring models are loaded first, so that a missing one fails before minutes of editing
    evaluator = Evaluator() if options.evaluate else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logger.info(f"loading the tuned model {plan.run}")
    pipe = _load_pipeline(plan.run, torch.float16 if device.type == "cuda" else torch.float32).to(device)
    pipe.vae.enable_slicing()  # one frame at a time through the VAE: the whole clip at once is a memory spike
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole edit instead
    width, height = plan.size
    cache = plan.cache
    scale = pipe.vae_scale_factor
    # a local edit inverts with its source prompt (as Video-P2P): the plain edit's cache does not hold that
    latent = None if plan.local else _cached_latent(
        cache, (1, pipe.unet.config.in_channels, len(plan.frames), height // scale, width // scale))
    reused = latent is not None
    windows = len(plan.windows)
    total = windows * progress_steps(len(options.prompts), options.num_inference_steps,
                                     0 if reused else options.num_inv_steps, plan.local and plan.local.local.inversion)
    report.start(total)
    cfg = plan.cfg
    seed = options.seed if options.seed is not None else cfg.seed if cfg.seed is not None else 0
    if options.num_videos_per_prompt > 1 and options.eta == 0:
        logger.warning("note: with eta 0 DDIM is deterministic, so the videos of a prompt are alike; "
                       "use --eta > 0 for variations")
    local = None
    with progress_bar(total=total, desc=f"Editing {frames_text(len(plan.frames))} in {windows} window(s)",
              unit="window-step") as bar:
        def progress(*_) -> None:
            bar.update(windows)
            report.step(windows)

        if plan.local:
            report.phase("inverting and editing")
            local = invert_and_edit(pipe, pipe.encode_video(_source_frames(plan)).mean, plan.local, options.prompts,
                                    options.num_inference_steps, options.num_inv_steps, plan.guidance_scale,
                                    plan.window, options.overlap, progress)
        elif reused:
            logger.info(f"using the run's inverted latent {cache}")
        else:
            report.phase("inverting")
            latent = invert(pipe, pipe.encode_video(_source_frames(plan)).mean, options.num_inv_steps,
                            plan.window, options.overlap, progress)
            with atomic_path(cache) as path:
                torch.save(latent.cpu(), path)
        if not local:
            report.phase("editing")
        edited = local.targets if local else sample(
            pipe, latent, options.prompts, options.num_inference_steps, plan.guidance_scale, options.num_inv_steps,
            options.negative_prompt, options.num_videos_per_prompt, options.eta, seed, plan.window, options.overlap,
            progress)
    stems = [name if options.num_videos_per_prompt == 1 else f"{name}-{index}"
             for name in plan.names for index in range(options.num_videos_per_prompt)]
    with tempfile.TemporaryDirectory(prefix="tav-edit-") as tmp:
        audio = _span_audio(plan.clip, plan.span, Path(tmp)) if options.audio else None
        frame_folders = [plan.folder / stem for stem in stems] if options.jpeg_frames else []
        logger.info(f"writing the edits to {plan.folder}")
        report.phase("writing the videos")
        videos, gifs, comparison = _write(pipe, edited, _source_frames(plan), stems, plan.folder,
                                          plan.fps, audio, frame_folders, options.gif, plan.repeats)
        inversion, masks = None, []
        if local:
            repeats = plan.repeats or [1] * len(plan.frames)
            inversion = plan.folder / f"{INVERSION}.mp4"
            write_latent_video(pipe, local.source, inversion, plan.fps, repeats, audio)
            blended = [(stem, mask) for stem, mask in zip(stems, local.masks) if mask is not None]
            masks = [plan.folder / f"{stem}{MASK_SUFFIX}.mp4" for stem, _ in blended]
            write_masks(_source_frames(plan), [mask for _, mask in blended], masks, plan.fps, repeats)
    result = EditResult(plan.folder, videos, gifs, comparison, plan.size, plan.fps, plan.frames, plan.span, windows,
                        cache if reused else None, audio is not None, frame_folders,
                        variable_rate=plan.repeats is not None, inversion=inversion, masks=masks)
    if evaluator is not None:
        del pipe
        prompts = [prompt for prompt in options.prompts for _ in range(options.num_videos_per_prompt)]
        report.phase("scoring")
        result.metrics = _score(evaluator, plan, videos, prompts, local.masks if local else None)
    result.save()
    return result


def _score(evaluator: Evaluator, plan: EditPlan, videos: list[Path], prompts: list[str],
           masks: list[torch.Tensor | None] | None = None) -> Path:
    """`metrics.json` beside the edits: each edit's LOVEU-TGVE figures for its prompt (read back from its MP4, as
    `python -m tuneavideo.evaluate` would), and the source's over the same frames for the same prompt; for a local
    edit with a blend mask also `psnr_outside_mask`, its PSNR against the source outside the mask (dB)."""
    frames = list(_source_frames(plan))
    source = evaluator.encode_frames(frames)
    repeats = plan.repeats or [1] * len(frames)
    records = []
    for k, (video, prompt) in enumerate(zip(videos, prompts)):
        edited = read_frames(video)
        record = {"video": video.name, "prompt": prompt, **asdict(evaluator.score(edited, prompt)),
                  "source": asdict(evaluator.score_encoded(source, prompt))}
        if masks is not None and masks[k] is not None:
            shown = np.repeat(np.stack(frames), repeats, axis=0)
            outside = np.repeat(upsampled(masks[k], frames[0].shape[:2]), repeats, axis=0)
            record["psnr_outside_mask"] = psnr_outside(np.stack(edited), shown, outside)
        records.append(record)
    with atomic_path(metrics_file(plan.folder)) as path:
        path.write_text(json.dumps(records, indent=2))
    return metrics_file(plan.folder)


def edit_frames(clip: Clip, cfg: TrainConfig, span: Span | None, stride: int) -> range:
    """The source frames an edit covers: frames `i` with `START * fps <= i < END * fps`, every `stride`-th from the
    first; without a span, those of the tuned window `[start, start + n_sample_frames * sample_frame_rate)`."""
    info, data = clip.info, cfg.train_data
    if span is None:
        tuned = tuned_window(info.num_frames, data.n_sample_frames, data.sample_start_idx, data.sample_frame_rate,
                             clip.path)
        start, stop = tuned.start, min(info.num_frames, tuned.stop)
    elif info.times is not None:  # by the frames' own times, from the first frame's
        seconds = [t - info.times[0] for t in info.times]
        start = bisect.bisect_left(seconds, span[0]) if span[0] is not None else 0
        stop = bisect.bisect_left(seconds, span[1]) if span[1] is not None else info.num_frames
    else:
        start = math.ceil(span[0] * info.fps) if span[0] is not None else 0
        stop = min(info.num_frames, math.ceil(span[1] * info.fps)) if span[1] is not None else info.num_frames
    frames = range(start, stop, stride)
    if not frames:
        length = float(info.num_frames / info.fps)
        raise EditError(f"--span holds no frame of {clip.path} ({frames_text(info.num_frames)}, {length:.2f} s at "
                        f"{float(info.fps):g} fps); give a span within 0:{length:.2f}")
    return frames


def check_options(options: EditOptions) -> list[str]:
    """Reject options that cannot work before any model is loaded; returns each prompt's file stem."""
    if not options.prompts or not all(isinstance(p, str) and p.strip() for p in options.prompts):
        raise EditError("give at least one non-empty --prompt")
    # option: (value, smallest allowed); None keeps the default
    counts = {"--num-inference-steps": (options.num_inference_steps, 1), "--num-inv-steps": (options.num_inv_steps, 1),
              "--num-videos-per-prompt": (options.num_videos_per_prompt, 1), "--stride": (options.stride, 1),
              "--window": (options.window, 2), "--overlap": (options.overlap, 0)}
    for name, (value, smallest) in counts.items():
        if value is not None and value < smallest:
            raise EditError(f"{name} must be >= {smallest}, got {value}")
    if options.span is not None:
        start, end = options.span
        if (start is not None and start < 0) or (start is not None and end is not None and end <= start):
            given = ":".join("" if value is None else f"{float(value):g}" for value in options.span)
            raise EditError(f"--span {given!r}: START must be >= 0 and before END")
    if options.guidance_scale is not None and not math.isfinite(options.guidance_scale):
        raise EditError(f"--guidance-scale must be a finite number, got {options.guidance_scale}")
    if not (math.isfinite(options.eta) and options.eta >= 0):
        raise EditError(f"--eta must be a finite number >= 0, got {options.eta}")
    if options.local is not None:
        for option, off in (("--negative-prompt", options.negative_prompt is None), ("--eta", options.eta == 0),
                            ("--num-videos-per-prompt", options.num_videos_per_prompt == 1)):
            if not off:
                raise EditError(f"{option} does not apply with --control (a local edit is one deterministic video "
                                "per prompt); leave it out")
    names = [prompt_file_name(prompt) for prompt in options.prompts]
    # a local edit also writes inversion.mp4 and <prompt>.mask.mp4
    taken = {SIDE_BY_SIDE, *((INVERSION, *(f"{n}{MASK_SUFFIX}" for n in names)) if options.local else ())}
    clashes = sorted({n for n in names if names.count(n) > 1 or n in taken})
    if clashes:
        raise EditError(f"prompts would overwrite each other's files (or the side-by-side): {clashes}")
    return names


def _write(pipe: TuneAVideoPipeline, latents: torch.Tensor, source, stems: list[str], folder: Path, fps: Fraction,
           audio: str | None, frame_folders: list[Path], gif: bool,
           repeats: list[int] | None) -> tuple[list[Path], list[Path], Path]:
    """Decode `latents` `(videos, 4, frames, h, w)` a few frames at a time into one MP4 per video (and with `gif` a
    GIF when short), and the side-by-side of the `source` frames and every video, all streamed to the encoder; with
    `frame_folders` (one per video, emptied first), every frame as a JPEG too. With `repeats`, frame j is written
    `repeats[j]` times (a variable-rate source at a constant rate)."""
    repeats = repeats or [1] * latents.shape[2]
    num_frames = sum(repeats)
    for frame_folder in frame_folders:
        shutil.rmtree(frame_folder, ignore_errors=True)  # a longer earlier edit must not leave frames behind
        frame_folder.mkdir(parents=True)
    videos = [folder / f"{stem}.mp4" for stem in stems]
    comparison = folder / f"{SIDE_BY_SIDE}.mp4"
    short = gif and latents.shape[2] <= GIF_MAX_FRAMES
    gif_frames: list[list[np.ndarray]] | None = [[] for _ in stems] if short else None
    with ExitStack() as stack:
        writers = [stack.enter_context(Mp4Writer(path, fps, audio, num_frames)) for path in videos]
        side = stack.enter_context(Mp4Writer(comparison, fps, audio, num_frames))
        source = iter(source)
        first = 0
        for chunk in pipe.decode_chunks(latents):
            decoded = [grid_frames(torch.from_numpy(video[None])) for video in chunk]
            times = repeats[first : first + chunk.shape[2]]
            for k, frames in enumerate(decoded):
                for offset, (frame_of_edit, count) in enumerate(zip(frames, times)):
                    for _ in range(count):
                        writers[k].write(frame_of_edit)
                        if gif_frames is not None:
                            gif_frames[k].append(frame_of_edit)
                    if frame_folders:
                        Image.fromarray(frame_of_edit).save(frame_folders[k] / f"{first + offset:05d}.jpg",
                                                            quality=JPEG_QUALITY)
            for frame_of_all, count in zip(side_by_side([np.stack([next(source) for _ in times]), *decoded]), times):
                for _ in range(count):
                    side.write(frame_of_all)
            first += chunk.shape[2]
    gifs = []
    for stem, frames in zip(stems, gif_frames or []):
        gifs.append(folder / f"{stem}.gif")
        write_gif(np.stack(frames), gifs[-1], fps)
    return videos, gifs, comparison


def _source_frames(plan: EditPlan) -> Iterator[np.ndarray]:
    """The edited frames of the source at the tuned size, streamed."""

    def check(num_frames: int) -> None:
        raise ClipTooShortError(f"{plan.clip.path}: the edit needs frame {plan.frames[-1]}; give a shorter --span")

    return decode_frames(plan.clip, plan.frames, plan.size, check)


def _scheduler_config(run: Path) -> dict:
    try:
        return DDIMScheduler.load_config(run, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise EditError(f"{run / 'scheduler'}: the run's scheduler config cannot be read ({first_line(err)}); "
                        "re-run the training to save the model again") from err


def _load_pipeline(run: Path, dtype: torch.dtype) -> TuneAVideoPipeline:
    try:
        return TuneAVideoPipeline.from_pretrained(run, dtype=dtype)
    except Exception as err:  # damaged weights surface as OSError, ValueError, RuntimeError or SafetensorError
        raise EditError(f"{run}: its tuned model cannot be loaded ({first_line(err)}); re-run the training (or "
                        "resume it from its last checkpoint with resume_from_checkpoint=latest)") from err


def _output_folder(folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise EditError(f"--output-dir {folder}: is a file, not a folder; choose another --output-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EditError(f"--output-dir {folder}: cannot be created ({err.strerror or err}); choose another "
                        "--output-dir") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EditError(f"--output-dir {folder}: is not writable; choose another --output-dir")
    return folder


def _cached_latent(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
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
    return latent.float()


def _span_audio(clip: Clip, span: tuple[float, float], folder: Path) -> str | None:
    """The source's sound over `span` as a WAV in `folder`, or None, with a one-line note, when it has none."""
    if clip.images is not None:
        logger.warning(f"note: {clip.path} is a folder of frames, which has no sound; the MP4s are silent")
        return None
    wav = extract_audio(clip.path, folder / "span.wav", *span)
    if wav is None:
        logger.warning(f"note: {clip.path} has no sound; the MP4s are silent")
    return wav
