"""Video-P2P's own edit configs (`configs/*-p2p.yaml`, read by `tuneavideo.p2p_config`), run as its
`run_videop2p.py --config CONFIG [--fast]` runs them: its frames (`read_p2p_frames`), its attention control and
inversion (the config as a `request.LocalEdit`), and its outputs in `<run>/results/`: `inversion[_fast].gif` (the
source branch) and `<save_name>[_fast].gif` at its 250 ms a frame, with MP4s and the blend mask's MP4 beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from .errors import UserError
from .p2p_config import load_p2p_config, read_p2p_frames
from .pipelines.loading import is_base_model
from .request import LOCAL_GUIDANCE_SCALE, LocalEdit
from .run import INVERSION, MASK, Run
from .video.edit_writer import EditWriter

P2P_FPS = Fraction(4)  # Video-P2P's GIFs: 250 ms a frame
P2P_SIZE = 512  # Video-P2P's frames: the centre square at 512x512


@dataclass
class P2PResult:
    """What `edit_p2p` wrote, all in `<run>/results/`."""

    folder: Path
    gifs: list[Path]  # inversion[_fast].gif, <save_name>[_fast].gif: Video-P2P's own outputs
    videos: list[Path]  # the same as MP4s
    mask: Path | None  # <save_name>[_fast].mask.mp4 with a blend word


def edit_p2p(config: str | os.PathLike, fast: bool = False, num_inference_steps: int = 50, num_inv_steps: int = 50,
             guidance_scale: float = LOCAL_GUIDANCE_SCALE, spatial_attention: str | None = None,
             size: int | None = None, null_text_iterations: int = LocalEdit.null_text_iterations) -> P2PResult:
    """Run a Video-P2P edit config as its `run_videop2p.py --config CONFIG [--fast]` does: its frames, its
    attention control, null-text inversion unless `fast`, and its outputs (plus MP4s). Its fixed 50 sampling and
    50 inversion steps and 7.5 guidance can be changed; `spatial_attention` sets the UNet's frame rule for folders
    tuned by Video-P2P's own code (whose UNet config cannot say), e.g. "first_frame". `size` (None:
    `P2P_SIZE`) and `null_text_iterations` are Video-P2P's fixed 512 and 10 unless given (for quick checks)."""
    cfg = load_p2p_config(config)
    if cfg.pretrained_model_path is None:
        raise UserError(f"{config}: missing pretrained_model_path (the tuned run folder)")
    run = Run(cfg.pretrained_model_path)
    if not run.finished:
        raise UserError(f"{config}: pretrained_model_path {run.folder} holds no tuned model "
                        "(model_index.json); tune first")
    if is_base_model(run.folder):
        raise UserError(f"{config}: pretrained_model_path {run.folder} is a base model, not a tuned run; tune it on "
                        "the clip first (train_tuneavideo.py) and give the run's output_dir")
    local = cfg.local_edit(fast, null_text_iterations)
    local.check(num_inference_steps, num_inv_steps)
    tokenizer = run.load_tokenizer()
    plan = local.plan(tokenizer, [cfg.target_prompt], cfg.source_prompt)
    frames = read_p2p_frames(cfg.image_path, cfg.video_len, size or P2P_SIZE)
    cuda = torch.cuda.is_available()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32) if cuda \
        else torch.float32
    pipe = run.load_pipeline(dtype).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    if spatial_attention is not None:
        pipe.unet.set_spatial_attention(spatial_attention)
    clean = pipe.encode_video(frames).mean
    # Video-P2P inverts with its `prompt` (its configs repeat prompts[0]); the source branch samples prompts[0]
    latents = plan.invert_and_edit(pipe, clean, [cfg.target_prompt], num_inference_steps, num_inv_steps,
                                   guidance_scale, None, None, lambda *_: None, cfg.inversion_prompt)
    folder = run.p2p_results
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_fast" if fast else ""
    stems = [f"{INVERSION}{suffix}", f"{cfg.save_name}{suffix}"]
    videos = [folder / f"{stem}.mp4" for stem in stems]
    mask = folder / f"{stems[1]}.{MASK}.mp4" if latents.masks[0] is not None else None
    with EditWriter(folder, P2P_FPS, [1] * len(frames)) as writer:
        gifs = [gif for latent, video in zip((latents.source, latents.targets), videos)
                for gif in writer.write_videos([pipe.decode_latents(latent)], iter(()), [video], None, None, True, [])]
        if mask is not None:
            writer.write_masks(frames, latents.masks, [mask])
        writer.commit()
    return P2PResult(folder, gifs, videos, mask)
