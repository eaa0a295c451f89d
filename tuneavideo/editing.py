"""Edit a tuned clip from new prompts: the workflow behind `inference.py` (plan, load, invert and sample, write).

A run folder (a training `output_dir`, `tuneavideo.run.Run`) holds everything an edit needs: which clip, frames and
size were tuned, the tuned pipeline, and cached inversions. An `EditRequest` (`tuneavideo.request`) covers a span
of the source (by default the tuned window) at a stride of source frames; the edit inverts those frames (or reuses
the cached inversion), samples every prompt from that latent in overlapping windows of the tuned length, and writes
(`video.edit_writer.EditWriter`, files named by `run.EditFiles`), per prompt, an MP4 with the source's sound over
the same span (and a GIF for short edits), and the side-by-side of the source and every edit, all at source fps /
stride, so picture and sound stay in sync. With `request.local`, every prompt is a local edit of the source prompt
under attention control (Video-P2P), which also writes the source branch decoded and each prompt's blend mask. With
ControlNets (`request.controlnets`, by default the run's own), the clip is inverted and sampled under their structure
guidance (`tuneavideo.structure`), and the edit writes its condition frames.

Memory does not grow with the clip beyond its latents: source frames are resized as they are decoded, and edited
frames are decoded a few at a time and streamed to the encoder.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .base_model import fuse_loras
from .config import ControlNetConfig, TrainConfig
from .edit_progress import EditProgressWriter
from .evaluate import Evaluator
from .pipelines.edit import invert, progress_steps, sample
from .pipelines.windows import Window, plan_windows
from .progress import progress_bar
from .request import EditRequest, LocalPlan, RequestError, Span
from .run import EditFiles, EditResult, Run
from .structure import check_structure, prepare_structure, structure_key
from .video.edit_writer import EditWriter
from .video.frames import ClipTooShortError, clip_size, decode_frames, shown_at_constant_rate, tuned_window
from .video.readers import Clip, frames_text
from .video.sound import extract_audio, source_span
from .video.writers import prompt_file_name

logger = logging.getLogger(__name__)


@dataclass
class EditPlan:
    """Everything an edit needs decided before any model is loaded, with every setting and file checked."""

    run: Run
    cfg: TrainConfig
    request: EditRequest
    files: EditFiles
    clip: Clip
    size: tuple[int, int]  # (width, height): the tuned size
    frames: range  # the source frames edited
    window: int
    windows: list[Window]
    fps: Fraction  # the MP4s' constant rate
    span: tuple[float, float]  # seconds of the source's timeline
    repeats: list[int]  # how often each edited frame is written at `fps` (all 1 but for a variable-rate source)
    variable_rate: bool
    control: LocalPlan | None  # a local edit's attention control, its words checked against the prompts
    structure: list[ControlNetConfig]  # the ControlNets guiding the edit: the request's, else the run's own

    @property
    def cache(self) -> Path:
        """Where the inversion of these frames is cached (`Run.inversion_cache`), keyed by its structure guidance."""
        inverted = self.structure if self.request.controlnet_inversion else []
        key = structure_key(inverted, self.request.canny_thresholds) if inverted else []
        tuned = structure_key([self.cfg.controlnet]) if self.cfg.controlnet else []
        return self.run.inversion_cache(self.cfg, self.clip, self.size, self.frames, self.windows,
                                        self.request.num_inv_steps, key, key == tuned)

    def source_frames(self) -> Iterator[np.ndarray]:
        """The edited frames of the source at the tuned size, streamed."""

        def check(num_frames: int) -> None:
            raise ClipTooShortError(f"{self.clip.path}: the edit needs frame {self.frames[-1]}; give a shorter "
                                    "`span`")

        return decode_frames(self.clip, self.frames, self.size, check)


def plan_edit(run: str | os.PathLike, request: EditRequest) -> EditPlan:
    """Check the run folder, its files and the request, and decide frames, size, windows and files."""
    run = Run(run).check_finished()
    stems = request.check()
    cfg = run.config()
    data = cfg.train_data
    clip = run.clip(cfg)
    stride = request.stride or data.sample_frame_rate
    frames = edit_frames(clip, cfg, request.span, stride)
    window = request.window or data.n_sample_frames
    try:
        windows = plan_windows(len(frames), window, request.overlap)
    except ValueError as err:
        raise RequestError(f"`window` {window} `overlap` {request.overlap}: {err}") from None
    timesteps = run.num_train_timesteps()
    for name in ("num_inference_steps", "num_inv_steps"):
        if getattr(request, name) > timesteps:
            raise RequestError(f"`{name}` {getattr(request, name)}: at most {timesteps} (the model's timesteps)")
    control = None
    if request.local is not None:  # its words checked with the run's tokenizer, before any model loads
        tokenizer = run.load_tokenizer()
        control = request.local.plan(tokenizer, request.prompts, data.prompt)
    structure = request.controlnets if request.controlnets is not None else [c for c in [cfg.controlnet] if c]
    check_structure(structure)  # the run's own: its condition file may be gone since
    folder = output_folder(Path(request.output_dir) if request.output_dir is not None else run.edits)
    files = EditFiles.of(folder, [prompt_file_name(prompt) for prompt in request.prompts], stems)
    size = clip_size(clip.info.width, clip.info.height, data.width, data.height)
    info = clip.info
    if info.times is None:
        span = source_span(frames.start, len(frames), stride, float(info.fps), info.start_time)
        return EditPlan(run, cfg, request, files, clip, size, frames, window, windows, info.fps / stride, span,
                        [1] * len(frames), False, control, structure)
    # a variable frame rate: every edited frame is shown at its source frame's time, at one constant rate
    span = info.time(frames.start), info.time(frames[-1] + stride)
    rate, repeats = shown_at_constant_rate([info.time(i) - span[0] for i in frames], span[1] - span[0])
    return EditPlan(run, cfg, request, files, clip, size, frames, window, windows, rate, span, repeats, True,
                    control, structure)


def edit(run: str | os.PathLike, request: EditRequest) -> EditResult:
    """Edit the clip tuned in `run` with every prompt of `request`; see the module docstring for the outputs. How it
    goes is kept in the edit's own progress file (`EditFiles.progress`, `tuneavideo.edit_progress`)."""
    plan = plan_edit(run, request)
    with EditProgressWriter(plan.files.progress) as report:
        return _edit(plan, request, report)


def _edit(plan: EditPlan, request: EditRequest, report: EditProgressWriter) -> EditResult:
    # the scoring models are loaded first, so that a missing one fails before minutes of editing
    evaluator = Evaluator() if request.evaluate else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    structure = None
    if plan.structure:  # the ControlNets are loaded and fitted before the tuned model, the conditions made
        logger.info(f"loading {len(plan.structure)} ControlNet(s) and making their conditions")
        report.phase("making the conditions")
        info = plan.clip.info
        structure = prepare_structure(plan.structure, plan.run.unet_config(), plan.frames, plan.source_frames,
                                      (info.width, info.height), plan.size, device, dtype, request.canny_thresholds)
        report.phase("loading the model")
    logger.info(f"loading the tuned model {plan.run.folder}")
    pipe = plan.run.load_pipeline(dtype)
    fuse_loras(pipe, request.loras)
    control = None
    if structure:
        pipe.controlnet = structure.controlnet
        control = structure.pipeline_arguments()
    pipe.to(device)
    pipe.vae.enable_slicing()  # one frame at a time through the VAE: the whole clip at once is a memory spike
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole edit instead
    width, height = plan.size
    scale, windows, prompts = pipe.vae_scale_factor, len(plan.windows), request.prompts
    steps, inv_steps = request.num_inference_steps, request.num_inv_steps
    # a local edit inverts with its source prompt (as Video-P2P), an edit with LoRAs with their weights: the plain
    # edit's cache holds neither
    latent = None if plan.control or request.loras else plan.run.read_inversion(
        plan.cache, (1, pipe.unet.config.in_channels, len(plan.frames), height // scale, width // scale))
    reused = latent is not None
    inversion = plan.control.settings.inversion if plan.control else None
    total = windows * progress_steps(len(prompts), steps, 0 if reused else inv_steps, inversion)
    seed = request.seed if request.seed is not None else plan.cfg.seed if plan.cfg.seed is not None else 0
    if request.num_videos_per_prompt > 1 and request.eta == 0:
        logger.warning("note: with eta 0 DDIM is deterministic, so the videos of a prompt are alike; "
                       "use --eta > 0 for variations")
    report.start(total)
    local = None
    with progress_bar(total=total, desc=f"Editing {frames_text(len(plan.frames))} in {windows} window(s)",
              unit="window-step") as bar:
        def progress(*_) -> None:
            bar.update(windows)
            report.step(windows)

        if plan.control:
            report.phase("inverting and editing")
            local = plan.control.invert_and_edit(pipe, pipe.encode_video(plan.source_frames()).mean, prompts, steps,
                                                 inv_steps, request.guidance, plan.window, request.overlap, progress,
                                                 control=control, control_inversion=request.controlnet_inversion)
        elif reused:
            logger.info(f"using the run's inverted latent {plan.cache}")
        else:
            report.phase("inverting")
            latent = invert(pipe, pipe.encode_video(plan.source_frames()).mean, inv_steps, plan.window,
                            request.overlap, progress, control if request.controlnet_inversion else None)
            if not request.loras:
                with atomic_path(plan.cache) as path:
                    torch.save(latent.cpu(), path)
        if not local:
            report.phase("editing")
        edited = local.targets if local else sample(
            pipe, latent, prompts, steps, request.guidance, inv_steps, request.negative_prompt,
            request.num_videos_per_prompt, request.eta, seed, plan.window, request.overlap, progress, control)
    files = plan.files
    with EditWriter(files.folder, plan.fps, plan.repeats) as writer:
        audio = span_audio(plan.clip, plan.span, writer.scratch) if request.audio else None
        logger.info(f"writing the edits to {files.folder}")
        report.phase("writing the videos")
        frame_folders = files.frame_folders() if request.jpeg_frames else []
        gifs = writer.write_videos(pipe.decode_chunks(edited), plan.source_frames(), files.videos(),
                                   files.side_by_side, audio, request.gif, frame_folders)
        result = EditResult(files.folder, files.videos(), gifs, files.side_by_side, plan.size, plan.fps,
                            plan.frames, plan.span, windows, plan.cache if reused else None, audio is not None,
                            frame_folders, variable_rate=plan.variable_rate)
        if local:
            result.inversion = files.inversion
            writer.write_videos(pipe.decode_chunks(local.source), iter(()), [result.inversion], None, audio, False,
                                [])
            blended = [(path, mask) for path, mask in zip(files.masks(), local.masks) if mask is not None]
            result.masks = [path for path, _ in blended]
            writer.write_masks(plan.source_frames(), [mask for _, mask in blended], result.masks)
        if structure:
            result.condition = files.condition
            writer.write_frames(structure.condition_video(), files.condition)
        if evaluator is not None:
            del pipe
            report.phase("scoring")
            videos = [writer.staged(path) for path in result.videos]
            records = evaluator.score_edit(list(plan.source_frames()), videos, result.videos,
                                           [p for p in prompts for _ in range(request.num_videos_per_prompt)],
                                           plan.repeats, local.masks if local else None)
            result.metrics = files.metrics
            writer.write_text(files.metrics, json.dumps(records, indent=2))
        writer.commit()
    result.save()  # last: the index of what is there
    return result


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
        raise RequestError(f"`span` holds no frame of {clip.path} ({frames_text(info.num_frames)}, {length:.2f} s "
                           f"at {float(info.fps):g} fps); give a span within 0:{length:.2f}")
    return frames


def output_folder(folder: Path) -> Path:
    """`folder`, created, checked to be a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise RequestError(f"`output_dir` {folder}: is a file, not a folder; choose another `output_dir`")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RequestError(f"`output_dir` {folder}: cannot be created ({err.strerror or err}); choose another "
                           "`output_dir`") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RequestError(f"`output_dir` {folder}: is not writable; choose another `output_dir`")
    return folder


def span_audio(clip: Clip, span: tuple[float, float], folder: Path) -> str | None:
    """The source's sound over `span` as a WAV in `folder`, or None, with a one-line note, when it has none."""
    if clip.images is not None:
        logger.warning(f"note: {clip.path} is a folder of frames, which has no sound; the MP4s are silent")
        return None
    wav = extract_audio(clip.path, folder / "span.wav", *span)
    if wav is None:
        logger.warning(f"note: {clip.path} has no sound; the MP4s are silent")
    return wav
