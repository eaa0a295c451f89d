"""Local edits (Video-P2P) inside `tuneavideo.editing`, around `pipelines.local_edit` (the options, their checks,
the inversion and the controlled sampling): what only a local edit writes, the source branch decoded
(`inversion.mp4`, how well the clip was recovered) and each edit's blend mask over the source frames
(`<prompt>.mask.mp4`).

Video-P2P's own edit configs run through `edit_p2p`: its frames (`read_p2p_frames`), its outputs in
`<run>/results/` (`inversion[_fast].gif`, `<save_name>[_fast].gif`, at its 250 ms a frame) and our MP4s beside them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from .errors import UserError
from .p2p_config import load_p2p_config, read_p2p_frames
from .pipelines.local_edit import GUIDANCE_SCALE, LocalEdit, LocalLatents, invert_and_edit, plan_local
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from .run import Run
from .video.writers import Mp4Writer, grid_frames, write_gif, write_mp4

INVERSION = "inversion"  # file stem of the source branch's video
MASK_SUFFIX = ".mask"  # <prompt>.mask.mp4: the blend mask over the source
P2P_FPS = 4  # Video-P2P's GIFs: 250 ms a frame
P2P_SIZE = 512  # Video-P2P's frames: the centre square at 512x512
# Video-P2P's editing builds its own UNet, whose spatial attention is its FrameAttention, whatever folder it loads
P2P_SPATIAL_ATTENTION = "first_frame"
MASK_TINT = np.array([255, 0, 0], dtype=np.float32)  # red, half over the masked pixels


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
    latents: LocalLatents  # the final latents of the source branch and the edit, and the edit's last mask
    frames: list[np.ndarray]  # each GIF's frames `(frames, H, W, 3)` uint8, as they went into it


def p2p_spatial_attention(run: str | os.PathLike) -> str:
    """The frame rule a Video-P2P config edits the tuned `run` with: the one its UNet config records (runs tuned
    here record theirs), else Video-P2P's own, first-frame attention (a folder tuned by Tune-A-Video's or Video-P2P's
    code records none; Video-P2P's editing uses first-frame attention on any folder)."""
    config = json.loads((Path(run) / "unet" / "config.json").read_text())
    return config.get("spatial_attention", P2P_SPATIAL_ATTENTION)


def edit_p2p(config: str | os.PathLike, fast: bool = False, num_inference_steps: int = 50, num_inv_steps: int = 50,
             guidance_scale: float = GUIDANCE_SCALE, spatial_attention: str | None = None,
             size: int | None = None, null_text_iterations: int = 10) -> P2PResult:
    """Run a Video-P2P edit config as its `run_videop2p.py --config CONFIG [--fast]` does: its frames, its
    attention control, null-text inversion unless `fast`, and its outputs (plus MP4s). Its fixed 50 sampling and
    50 inversion steps and 7.5 guidance can be changed; `spatial_attention` sets the UNet's frame rule (None:
    `p2p_spatial_attention`, first-frame attention for folders tuned by the original code). `size` (None:
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
    pipe.unet.set_spatial_attention(spatial_attention or p2p_spatial_attention(run.folder))
    clean = pipe.encode_video(frames).mean
    # Video-P2P inverts with its `prompt` (its configs repeat prompts[0]); the source branch samples prompts[0]
    latents = invert_and_edit(pipe, clean, plan, [cfg.target_prompt], num_inference_steps, num_inv_steps,
                              guidance_scale, None, None, lambda *_: None, cfg.inversion_prompt)
    folder = run.p2p_results
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_fast" if fast else ""
    stems = [f"{INVERSION}{suffix}", f"{cfg.save_name}{suffix}"]
    gifs, videos = [folder / f"{stem}.gif" for stem in stems], [folder / f"{stem}.mp4" for stem in stems]
    written = []
    for latent, gif, video in zip((latents.source, latents.targets), gifs, videos):
        decoded = grid_frames(torch.from_numpy(pipe.decode_latents(latent)))
        write_gif(decoded, gif, P2P_FPS)
        write_mp4(decoded, video, P2P_FPS)
        written.append(decoded)
    mask = None
    if latents.masks[0] is not None:
        mask = folder / f"{stems[1]}{MASK_SUFFIX}.mp4"
        write_masks(frames, latents.masks, [mask], P2P_FPS, [1] * len(frames))
    return P2PResult(folder, gifs, videos, mask, latents, written)
