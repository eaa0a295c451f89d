"""Edit a tuned clip from new prompts: the logic behind `inference.py`.

A run folder (a training `output_dir`) holds everything an edit needs: `config.yaml` says which clip, which frames
and what size were tuned; `unet/`, `vae/`, ... is the tuned pipeline with its DDIM scheduler; `inv_latents/` holds
the DDIM inversion of the clip made at the end of tuning. `edit` reuses that latent when it fits (or inverts the
clip itself), samples every prompt from it and writes, per prompt, an MP4 with the source's sound over the same
span and a GIF, plus one side-by-side MP4 of the source and every edit, all at the sampled frames' real frame rate
(source fps / `sample_frame_rate`), so picture and sound stay in sync.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from .config import TrainConfig, load_config
from .data.dataset import TuneAVideoDataset, VideoReadError
from .errors import UserError
from .inversion import ddim_inversion, inverse_scheduler
from .models.resnet import unfold_frames
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from .postprocess import extract_audio, source_span
from .video_io import grid_frames, prompt_file_name, side_by_side, write_gif, write_mp4

logger = logging.getLogger(__name__)

SIDE_BY_SIDE = "side-by-side"  # file stem of the source-and-every-edit comparison


class EditError(UserError):
    """The run folder or the options cannot give an edit; the message is one line."""


@dataclass
class EditOptions:
    """What to make from a run. The defaults are the original project's: 50 DDIM steps, guidance 12.5, 50 inversion
    steps, no negative prompt, deterministic DDIM (eta 0)."""

    prompts: list[str]
    negative_prompt: str | None = None
    seed: int | None = None  # None: the run's seed (0 if it had none)
    steps: int = 50
    guidance_scale: float = 12.5
    inv_steps: int = 50
    num_videos_per_prompt: int = 1
    eta: float = 0.0  # 0: deterministic, so the seed changes nothing; > 0 adds seeded noise at every step
    output_dir: str | os.PathLike | None = None  # None: <run>/edits
    audio: bool = True


@dataclass
class EditResult:
    """What `edit` wrote and how."""

    folder: Path
    videos: list[Path]  # one MP4 per prompt and video, in prompt order
    gifs: list[Path]
    side_by_side: Path
    size: tuple[int, int]  # (width, height) of every edit
    fps: Fraction
    span: tuple[float, float]  # seconds [start, end) of the source the edits cover
    cached_latent: Path | None  # the run's inverted latent when reused; None when the clip was inverted here
    with_audio: bool  # whether the MP4s carry the source's sound


def run_folder(model: str | os.PathLike | None = None, config: str | os.PathLike | None = None) -> Path:
    """The run folder named by `model`, or the `output_dir` of the training config `config`, checked to be finished.

    Raises:
        EditError: neither or both given, no such folder, or no `config.yaml` / tuned model in it.
        ConfigError: `config` cannot be loaded.
    """
    if (model is None) == (config is None):
        raise EditError("name the tuned run with either --model (its folder) or --config (its training config)")
    run = Path(model) if model is not None else Path(load_config(config).output_dir)
    if not run.is_dir():
        raise EditError(f"{run}: no such run folder (tune first: accelerate launch train_tuneavideo.py --config=...)")
    if not (run / "config.yaml").is_file():
        raise EditError(f"{run}: has no config.yaml, so it is not the output_dir of a training run")
    if not (run / "model_index.json").is_file():
        raise EditError(f"{run}: has no tuned model (model_index.json) yet; did the training run finish?")
    return run


def edit(run: str | os.PathLike, options: EditOptions) -> EditResult:
    """Edit the clip tuned in `run` with every prompt of `options`; see the module docstring for the outputs."""
    run = run_folder(run)
    names = _check(options)
    cfg = load_config(run / "config.yaml")
    data = cfg.train_data
    source = _source_clip(cfg, run)
    width, height, num_frames = source.width, source.height, len(source.frame_indices)
    source_fps = Fraction(source.source_fps).limit_denominator(1001)  # e.g. 30000/1001, not 29.97002997
    fps = source_fps / data.sample_frame_rate  # the sampled frames' real timing
    span = source_span(data.sample_start_idx, num_frames, data.sample_frame_rate, float(source_fps))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = TuneAVideoPipeline.from_pretrained(run, dtype=dtype).to(device)
    pipe.enable_vae_slicing()  # one frame at a time through the VAE: the whole clip at once is a memory spike
    run_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if max(options.steps, options.inv_steps) > run_scheduler.config.num_train_timesteps:
        raise EditError(f"--steps and --inv-steps can be at most {run_scheduler.config.num_train_timesteps}")

    latent_shape = (1, pipe.unet.config.in_channels, num_frames, height // pipe.vae_scale_factor,
                    width // pipe.vae_scale_factor)
    cached = run / "inv_latents" / f"ddim_latent-{cfg.max_train_steps}.pt"
    latent = _cached_latent(cached, cfg, options.inv_steps, latent_shape)
    if latent is None:
        cached = None
        latent = invert_source(pipe, source, run_scheduler, options.inv_steps)
    pipe.scheduler = sampling_scheduler(run_scheduler, options.steps, options.inv_steps)

    seed = options.seed if options.seed is not None else cfg.seed if cfg.seed is not None else 0
    if options.num_videos_per_prompt > 1 and options.eta == 0:
        logger.warning("note: with eta 0 DDIM is deterministic, so the videos of a prompt are alike; "
                       "use --eta > 0 for variations")
    folder = Path(options.output_dir) if options.output_dir is not None else run / "edits"
    folder.mkdir(parents=True, exist_ok=True)
    videos, gifs, edits = [], [], []
    with tempfile.TemporaryDirectory(prefix="tav-edit-") as tmp:
        audio = _span_audio(data.video_path, span, Path(tmp)) if options.audio else None
        for prompt, name in zip(options.prompts, names):
            # a generator per prompt, so a prompt's edit does not depend on the prompts before it
            generator = torch.Generator(device).manual_seed(seed)
            pipe.set_progress_bar_config(desc=f"Editing {prompt!r}")
            video = pipe(
                prompt, latents=latent, num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
                negative_prompt=options.negative_prompt, num_videos_per_prompt=options.num_videos_per_prompt,
                eta=options.eta, generator=generator,
            ).videos
            for index in range(video.shape[0]):
                frames = grid_frames(video[index : index + 1])
                stem = name if video.shape[0] == 1 else f"{name}-{index}"
                videos.append(folder / f"{stem}.mp4")
                write_mp4(frames, videos[-1], fps, audio_path=audio)
                gifs.append(folder / f"{stem}.gif")
                write_gif(frames, gifs[-1], fps)
                edits.append(frames)
        original = source.frames.permute(0, 2, 3, 1).numpy()  # the tuned frames, already at the edit size
        comparison = folder / f"{SIDE_BY_SIDE}.mp4"
        write_mp4(side_by_side([original, *edits]), comparison, fps, audio_path=audio)
    return EditResult(folder, videos, gifs, comparison, (width, height), fps, span, cached, audio is not None)


@torch.no_grad()
def invert_source(
    pipe: TuneAVideoPipeline, source: TuneAVideoDataset, scheduler: DDIMScheduler, inv_steps: int
) -> torch.Tensor:
    """DDIM inversion of the tuned frames as training does it: the VAE posterior mean, float32 latents.

    Returns the noisiest latent `(1, 4, frames, h/8, w/8)`, float32.
    """
    pixels = source[0]["pixel_values"].to(pipe.device, pipe.vae.dtype)
    mean = pipe.vae.encode(pixels).latent_dist.mean
    clean = unfold_frames(mean.float(), pixels.shape[0]) * pipe.vae.config.scaling_factor
    pipe.set_progress_bar_config(desc=f"Inverting the source ({inv_steps} DDIM steps)")
    return ddim_inversion(pipe, scheduler, clean, inv_steps)[-1]


def sampling_scheduler(scheduler: DDIMScheduler, steps: int, inv_steps: int) -> DDIMScheduler:
    """A DDIM scheduler for `steps` steps whose first timestep is the noise level of a latent inverted in `inv_steps`.

    With as many steps as the inversion had (the default, and the original's only way) that is `scheduler` itself.
    Otherwise the two grids start at different timesteps (951 for 20 steps, 981 for 50): the sampler would then
    misread how noisy the latent is. With SD's "leading" spacing the grid can be shifted (`steps_offset`) to start
    where the inversion ended whenever `steps <= inv_steps`; else a note says so and the grid is kept.
    """
    target = int(inverse_scheduler(scheduler, inv_steps).timesteps[-1])
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps)
    first = int(sampler.timesteps[0])
    if first == target:
        return sampler
    offset = sampler.config.steps_offset + target - first
    if sampler.config.timestep_spacing == "leading" and offset >= 0:
        return DDIMScheduler.from_config(scheduler.config, steps_offset=offset)
    logger.warning(f"note: sampling in {steps} steps starts at timestep {first}, but the latent inverted in "
                   f"{inv_steps} steps is at {target}; the edit may follow the source less closely "
                   "(use --steps <= --inv-steps)")
    return sampler


def _check(options: EditOptions) -> list[str]:
    """Reject options that cannot work before any model is loaded; returns each prompt's file stem."""
    if not options.prompts or not all(isinstance(p, str) and p.strip() for p in options.prompts):
        raise EditError("give at least one non-empty --prompt")
    for name, value in (("--steps", options.steps), ("--inv-steps", options.inv_steps),
                        ("--num-videos-per-prompt", options.num_videos_per_prompt)):
        if value < 1:
            raise EditError(f"{name} must be >= 1, got {value}")
    if options.eta < 0:
        raise EditError(f"--eta must be >= 0, got {options.eta}")
    names = [prompt_file_name(prompt) for prompt in options.prompts]
    clashes = sorted({n for n in names if names.count(n) > 1 or n == SIDE_BY_SIDE})
    if clashes:
        raise EditError(f"prompts would overwrite each other's files (or the side-by-side): {clashes}")
    return names


def _source_clip(cfg: TrainConfig, run: Path) -> TuneAVideoDataset:
    """The frames the run was tuned on, at the size it was tuned at (the source's aspect ratio kept)."""
    data = cfg.train_data
    try:
        return TuneAVideoDataset(
            data.video_path, data.prompt, data.width, data.height, data.n_sample_frames, data.sample_start_idx,
            data.sample_frame_rate, keep_aspect=True,
        )
    except VideoReadError as err:
        raise EditError(f"{err} (the source clip, train_data.video_path in {run / 'config.yaml'})") from err


def _cached_latent(path: Path, cfg: TrainConfig, inv_steps: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The run's inverted latent when it is the one this edit would compute, else None.

    It fits when made with the final UNet (step `max_train_steps`), in `inv_steps` steps and of `shape` (a run tuned
    before frames kept their aspect ratio has a latent of another size).
    """
    if not cfg.validation_data.use_inv_latent or inv_steps != cfg.validation_data.num_inv_steps or not path.is_file():
        return None
    latent = torch.load(path, map_location="cpu")
    if tuple(latent.shape) != shape:
        logger.info(f"{path} has shape {tuple(latent.shape)}, this edit needs {shape}; inverting the clip again")
        return None
    logger.info(f"using the run's inverted latent {path}")
    return latent.float()


def _span_audio(video_path: str, span: tuple[float, float], folder: Path) -> str | None:
    """The source's sound over `span` as a WAV in `folder`, or None, with a one-line note, when it has none there."""
    try:
        wav = extract_audio(video_path, folder / "span.wav", *span)
    except ValueError as err:  # the sound track ends before the span starts
        logger.warning(f"note: no sound over the edited span ({err}); the MP4s are silent")
        return None
    if wav is None:
        logger.warning(f"note: {video_path} has no sound; the MP4s are silent")
    return wav
