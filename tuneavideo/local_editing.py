"""Local edits (Video-P2P) inside `tuneavideo.editing`: the options, their checks before any model loads, the
inversion (DDIM with the source prompt, then null-text inversion unless `--inversion ddim`, Video-P2P's `--fast`),
every target prompt sampled with the source branch under attention control, and what only a local edit writes:
the source branch decoded (`inversion.mp4`, how well the clip was recovered) and each edit's blend mask over the
source frames (`<prompt>.mask.mp4`).

Video-P2P's own edit configs run through `edit_p2p`: its frames (`read_p2p_frames`), its outputs in
`<run>/results/` (`inversion[_fast].gif`, `<save_name>[_fast].gif`, at its 250 ms a frame) and our MP4s beside them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from .errors import UserError
from .p2p_config import load_p2p_config, read_p2p_frames
from .pipelines.inversion import ddim_inversion, sampling_scheduler
from .pipelines.local_edit import sample_local_edit
from .pipelines.null_text import null_text_inversion
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from .pipelines.prompt_alignment import CONTROLS, PromptControlError, PromptEdit, check_fraction, prompt_edit
from .run import Run
from .video.writers import Mp4Writer, grid_frames, write_gif, write_mp4

INVERSIONS = ("null-text", "ddim")  # ddim: Video-P2P's --fast
GUIDANCE_SCALE = 7.5  # Video-P2P's, the default with attention control
INVERSION = "inversion"  # file stem of the source branch's video
MASK_SUFFIX = ".mask"  # <prompt>.mask.mp4: the blend mask over the source
P2P_FPS = 4  # Video-P2P's GIFs: 250 ms a frame
P2P_SIZE = 512  # Video-P2P's frames: the centre square at 512x512
MASK_TINT = np.array([255, 0, 0], dtype=np.float32)  # red, half over the masked pixels


@dataclass
class LocalEdit:
    """Attention control for every prompt of an edit (`EditOptions.local`); defaults are Video-P2P's."""

    control: str = "refine"  # "replace": swap words one for one; "refine": add or change words
    source_prompt: str | None = None  # the source branch; None: the tuned prompt
    blend: tuple[str, str] | None = None  # (word of the source prompt, word of each target): local blend
    reweight: dict[str, float] = field(default_factory=dict)  # word of the targets -> attention factor
    cross_replace_steps: float = 0.2
    self_replace_steps: float = 0.5
    blend_start: float = 0.2
    mask_threshold: float = 0.3
    inversion: str = "null-text"  # or "ddim"
    null_text_iterations: int = 10  # most optimiser iterations per step of null-text inversion (Video-P2P's 10)


@dataclass
class LocalPlan:
    """A checked local edit: the source prompt and each target prompt's `PromptEdit`."""

    local: LocalEdit
    source_prompt: str
    edits: list[PromptEdit]


def plan_local(tokenizer: CLIPTokenizer, local: LocalEdit, prompts: list[str], tuned_prompt: str,
               num_inference_steps: int, num_inv_steps: int) -> LocalPlan:
    """Check `local` against the prompts and step counts (one-line `PromptControlError`s)."""
    if local.control not in CONTROLS:
        raise PromptControlError(f"--control must be one of {', '.join(CONTROLS)}, got {local.control!r}")
    if local.inversion not in INVERSIONS:
        raise PromptControlError(f"--inversion must be one of {', '.join(INVERSIONS)}, got {local.inversion!r}")
    if local.inversion == "null-text" and num_inference_steps != num_inv_steps:
        raise PromptControlError(f"--inversion null-text gives one embedding per inversion step: give "
                                 f"--num-inference-steps equal to --num-inv-steps ({num_inference_steps} != "
                                 f"{num_inv_steps}), or use --inversion ddim")
    for option, value in (("--cross-replace-steps", local.cross_replace_steps),
                          ("--self-replace-steps", local.self_replace_steps), ("--blend-start", local.blend_start)):
        check_fraction(value, option)
    check_fraction(local.mask_threshold, "--mask-threshold", exclusive=True)
    source = local.source_prompt or tuned_prompt
    edits = [prompt_edit(tokenizer, source, prompt, local.control, local.reweight, local.blend) for prompt in prompts]
    return LocalPlan(local, source, edits)


@dataclass
class LocalLatents:
    """The source branch `(1, 4, frames, h, w)`, every target `(prompts, 4, frames, h, w)` and each target's last
    blend mask `(frames, h, w)` bool at latent size (None without local blend)."""

    source: torch.Tensor
    targets: torch.Tensor
    masks: list[torch.Tensor | None]


def invert_and_edit(pipe: TuneAVideoPipeline, clean: torch.Tensor, plan: LocalPlan, prompts: list[str],
                    num_inference_steps: int, num_inv_steps: int, guidance_scale: float, window: int | None,
                    overlap: int | None, progress: Callable[..., None],
                    inversion_prompt: str | None = None) -> LocalLatents:
    """Invert the clean latent `clean` as Video-P2P does (DDIM conditioned on `inversion_prompt`, by default the
    source prompt, then, in null-text mode, one optimised unconditional embedding per step for `guidance_scale`),
    then sample every prompt with the source branch. `progress()` is called once per step of each phase (per window
    step of all windows)."""
    local = plan.local
    null_text = local.inversion == "null-text"
    inversion_prompt = inversion_prompt or plan.source_prompt
    latents = ddim_inversion(pipe, pipe.scheduler, clean, num_inv_steps, prompt=inversion_prompt,
                             window_size=window, window_overlap=overlap, callback=progress, keep_all=null_text)
    uncond = None
    if null_text:
        steps_done = []

        def step(i: int) -> None:  # called per UNet call; the bar moves once per step
            if i not in steps_done:
                steps_done.append(i)
                progress()

        text = pipe.encode_prompt([inversion_prompt], clean.device, do_classifier_free_guidance=False)
        uncond = null_text_inversion(pipe, latents, text, guidance_scale, local.null_text_iterations,
                                     window_size=window, window_overlap=overlap, callback=step)
    scheduler = pipe.scheduler
    pipe.scheduler = sampling_scheduler(scheduler, num_inference_steps, num_inv_steps)
    try:
        outputs = [
            sample_local_edit(pipe, latents[-1], plan.source_prompt, prompt, edit, num_inference_steps,
                              guidance_scale, uncond, local.cross_replace_steps, local.self_replace_steps,
                              local.blend_start, local.mask_threshold, window, overlap, progress)
            for prompt, edit in zip(prompts, plan.edits)
        ]
    finally:
        pipe.scheduler = scheduler
    # the source branch does not depend on the target: every prompt's is the same
    return LocalLatents(outputs[0].source, torch.cat([out.target for out in outputs]), [out.masks for out in outputs])


def work(windows: int, num_inference_steps: int, num_inv_steps: int, prompts: int, local: LocalEdit) -> int:
    """Progress-bar units of `invert_and_edit`: window steps of the inversion, null-text, and every prompt."""
    inversion = num_inv_steps * (2 if local.inversion == "null-text" else 1)
    return windows * (inversion + num_inference_steps * prompts)


def upsampled(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A latent-size mask `(frames, h, w)` -> bool `(frames, H, W)` at `size` (H, W), nearest."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].bool().cpu().numpy()


def mask_overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`frame` `(H, W, 3)` uint8 with the pixels of `mask` `(H, W)` tinted half red."""
    out = frame.astype(np.float32)
    out[mask] = (out[mask] + MASK_TINT) / 2
    return out.round().astype(np.uint8)


def write_masks(source: Iterable[np.ndarray], masks: list[torch.Tensor], paths: list[Path], fps,
                repeats: list[int]) -> None:
    """One MP4 per mask: the `source` frames (streamed) with that mask over them, frame j written `repeats[j]`
    times, as the edits are."""
    with ExitStack() as stack:
        writers = [stack.enter_context(Mp4Writer(path, fps)) for path in paths]
        for j, (frame, count) in enumerate(zip(source, repeats)):
            for writer, mask in zip(writers, masks):
                shown = mask_overlay(frame, upsampled(mask[j : j + 1], frame.shape[:2])[0])
                for _ in range(count):
                    writer.write(shown)


def write_latent_video(pipe: TuneAVideoPipeline, latent: torch.Tensor, path: Path, fps, repeats: list[int],
                       audio: str | None = None) -> None:
    """Decode `latent` `(1, 4, frames, h, w)` a few frames at a time into an MP4 at `path`."""
    with Mp4Writer(path, fps, audio, sum(repeats)) as writer:
        first = 0
        for chunk in pipe.decode_chunks(latent):
            frames = grid_frames(torch.from_numpy(chunk))
            for frame, count in zip(frames, repeats[first : first + len(frames)]):
                for _ in range(count):
                    writer.write(frame)
            first += len(frames)


def psnr_outside(edit: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR (dB, peak 255) of `edit` against `source` (`(frames, H, W, 3)` uint8) over the pixels outside `mask`
    `(frames, H, W)`: how much of what should stay did stay. None when the mask covers every pixel."""
    outside = ~mask
    if not outside.any():
        return None
    error = (edit.astype(np.float64) - source.astype(np.float64))[outside]
    mse = float(np.mean(error**2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# --- Video-P2P's edit configs ------------------------------------------------------------------------------------


@dataclass
class P2PResult:
    """What `edit_p2p` wrote, all in `<run>/results/`."""

    folder: Path
    gifs: list[Path]  # inversion[_fast].gif, <save_name>[_fast].gif: Video-P2P's own outputs
    videos: list[Path]  # the same as MP4s
    mask: Path | None  # <save_name>[_fast].mask.mp4 with a blend word


def edit_p2p(config: str | os.PathLike, fast: bool = False, num_inference_steps: int = 50, num_inv_steps: int = 50,
             guidance_scale: float = GUIDANCE_SCALE, spatial_attention: str | None = None,
             size: int | None = None, null_text_iterations: int = 10) -> P2PResult:
    """Run a Video-P2P edit config as its `run_videop2p.py --config CONFIG [--fast]` does: its frames, its
    attention control, null-text inversion unless `fast`, and its outputs (plus MP4s). Its fixed 50 sampling and
    50 inversion steps and 7.5 guidance can be changed; `spatial_attention` sets the UNet's frame rule for folders
    tuned by Video-P2P's own code (whose UNet config cannot say), e.g. "first_frame". `size` (None:
    `P2P_SIZE`) and `null_text_iterations` are Video-P2P's fixed 512 and 10 unless given (for quick checks)."""
    from .editing import _load_pipeline  # editing imports this module

    cfg = load_p2p_config(config)
    if cfg.pretrained_model_path is None:
        raise UserError(f"{config}: missing pretrained_model_path (the tuned run folder)")
    run = Run(cfg.pretrained_model_path)
    if not run.finished:
        raise UserError(f"{config}: pretrained_model_path {run.folder} holds no tuned model "
                        "(model_index.json); tune first")
    local = LocalEdit(cfg.control, cfg.source_prompt, cfg.blend_words, cfg.reweights, cfg.cross_replace_steps,
                      cfg.self_replace_steps, inversion="ddim" if fast else "null-text",
                      null_text_iterations=null_text_iterations)
    tokenizer = CLIPTokenizer.from_pretrained(run.folder, subfolder="tokenizer")
    plan = plan_local(tokenizer, local, [cfg.target_prompt], cfg.source_prompt, num_inference_steps, num_inv_steps)
    frames = read_p2p_frames(cfg.image_path, cfg.video_len, size or P2P_SIZE)
    cuda = torch.cuda.is_available()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32) if cuda \
        else torch.float32
    pipe = _load_pipeline(run.folder, dtype).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    if spatial_attention is not None:
        pipe.unet.set_spatial_attention(spatial_attention)
    clean = pipe.encode_video(frames).mean
    # Video-P2P inverts with its `prompt` (its configs repeat prompts[0]); the source branch samples prompts[0]
    latents = invert_and_edit(pipe, clean, plan, [cfg.target_prompt], num_inference_steps, num_inv_steps,
                              guidance_scale, None, None, lambda *_: None, cfg.inversion_prompt)
    folder = run.p2p_results
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_fast" if fast else ""
    stems = [f"{INVERSION}{suffix}", f"{cfg.save_name}{suffix}"]
    gifs, videos = [folder / f"{stem}.gif" for stem in stems], [folder / f"{stem}.mp4" for stem in stems]
    for latent, gif, video in zip((latents.source, latents.targets), gifs, videos):
        decoded = grid_frames(torch.from_numpy(pipe.decode_latents(latent)))
        write_gif(decoded, gif, P2P_FPS)
        write_mp4(decoded, video, P2P_FPS)
    mask = None
    if latents.masks[0] is not None:
        mask = folder / f"{stems[1]}{MASK_SUFFIX}.mp4"
        write_masks(frames, latents.masks, [mask], P2P_FPS, [1] * len(frames))
    return P2PResult(folder, gifs, videos, mask)
