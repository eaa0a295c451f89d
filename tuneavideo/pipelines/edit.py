"""A Tune-A-Video edit on the pipeline: `invert` a clip's latent with DDIM, then `sample` prompts from that inverted
latent. Editing, the training's validation and the benchmarks all run these two; the two stay apart so that the
inverted latent can be cached between them (and sampled more than one way). `progress_steps` counts the progress
calls of an edit, plain or local (`local_edit.invert_and_edit`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .inversion import ddim_inversion
from .pipeline_tuneavideo import TuneAVideoPipeline

Callback = Callable[[int, int, torch.Tensor], None]


def invert(pipe: TuneAVideoPipeline, source: torch.Tensor, num_inv_steps: int, window_size: int | None = None,
           window_overlap: int | None = None, callback: Callback | None = None) -> torch.Tensor:
    """The DDIM inversion of `source` (a clean latent `(1, 4, frames, h, w)`, e.g. `encode_video(...).mean`) in
    `num_inv_steps` steps of the pipeline's scheduler, in the windows the clip is sampled with: the noisiest latent
    only. `callback(i, t, latent)` follows every step."""
    return ddim_inversion(pipe, pipe.scheduler, source, num_inv_steps, window_size=window_size,
                          window_overlap=window_overlap, callback=callback, keep_all=False)[-1]


@torch.no_grad()
def sample(
    pipe: TuneAVideoPipeline,
    latent: torch.Tensor | None,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    num_inv_steps: int | None = None,
    negative_prompt: str | None = None,
    num_videos_per_prompt: int = 1,
    eta: float = 0.0,
    seed: int = 0,
    window_size: int | None = None,
    window_overlap: int | None = None,
    callback: Callback | None = None,
    **shape: int,
) -> torch.Tensor:
    """Every prompt's latent clips `(len(prompts) * num_videos_per_prompt, 4, frames, h, w)`, in prompt order,
    sampled from `latent`, the inversion in `num_inv_steps` steps (None: as many as `num_inference_steps`), or, with
    `latent` None, from seeded noise of `shape` (the pipeline's `video_length`, `height`, `width`).

    Sampling starts at the inverted latent's noise level (the pipeline's `num_inv_steps`). Each prompt gets its own
    generator seeded `seed`, so a prompt's clips do not depend on the prompts before it. `callback(i, t, latents)`
    follows every step of every prompt.
    """
    return torch.cat([
        pipe(prompt, latents=latent, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
             negative_prompt=negative_prompt, num_videos_per_prompt=num_videos_per_prompt, eta=eta,
             generator=torch.Generator(pipe.device).manual_seed(seed), output_type="latent", callback=callback,
             window_size=window_size, window_overlap=window_overlap,
             num_inv_steps=None if latent is None else num_inv_steps or num_inference_steps, **shape).videos
        for prompt in prompts
    ])


def progress_steps(num_prompts: int, num_inference_steps: int, num_inv_steps: int = 0,
                   inversion: str | None = None) -> int:
    """How many times an edit's `progress` is called: once per step of each phase, i.e. each inversion step
    (`num_inv_steps`; 0 when a cached inversion is used), each null-text step (`inversion="null-text"`), and each
    sampling step of each of `num_prompts` prompts (`invert` and `sample`, or `local_edit.invert_and_edit`)."""
    return num_inv_steps * (2 if inversion == "null-text" else 1) + num_inference_steps * num_prompts
