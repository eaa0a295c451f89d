"""DDIM inversion of a clip latent (the structure guidance for Tune-A-Video edits), and the sampling scheduler that
starts where an inversion ended."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, SchedulerMixin

from .windows import fuse_windows, plan_windows

logger = logging.getLogger(__name__)


@torch.no_grad()
def ddim_inversion(
    pipeline: DiffusionPipeline,
    ddim_scheduler: SchedulerMixin,
    video_latent: torch.Tensor,
    num_inv_steps: int,
    prompt: str = "",
    window_size: int | None = None,
    window_overlap: int | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    keep_all: bool = True,
) -> list[torch.Tensor]:
    """Run deterministic DDIM backwards from a clean clip latent to noise.

    `video_latent` is `(batch, 4, frames, h, w)`, already multiplied by the VAE's scaling factor. The UNet is
    conditioned on `prompt` (the original always used the empty prompt) without guidance. Returns the
    `num_inv_steps + 1` latents from clean to noisiest (timesteps 1, 21, ..., 981 for 50 steps with SD's
    scheduler); sample from the last one with a DDIM scheduler of the same step count. With `keep_all=False` only
    the last is kept (a one-item list): a long clip's latents at every step add up.

    The update is the original's `next_step`, done by diffusers' `DDIMInverseScheduler` built from the sampling
    scheduler's config (keeping its `set_alpha_to_one=False`, `steps_offset=1` and `prediction_type`), so
    v-prediction models invert correctly too. A clip longer than `window_size` frames is inverted in the
    overlapping windows the pipeline samples it with (`tuneavideo.pipelines.windows`); `callback(i, t, latent)` is called
    after every step.
    """
    inverse = inverse_scheduler(ddim_scheduler, num_inv_steps, video_latent.device)
    unet = pipeline.unet
    embedding = pipeline.encode_prompt(
        [prompt] * video_latent.shape[0], video_latent.device, do_classifier_free_guidance=False
    ).to(unet.dtype)
    num_frames = video_latent.shape[2]
    windows = plan_windows(num_frames, window_size, window_overlap)
    latent = video_latent.clone()
    latents = [latent]
    with pipeline.progress_bar(total=len(inverse.timesteps) * len(windows)) as progress_bar:
        for i, t in enumerate(inverse.timesteps):

            def predict(frames: list[int]) -> torch.Tensor:
                # the UNet runs in its own dtype; the update stays in the latent's (float32 latents are accurate)
                window = latent[:, :, frames].to(unet.dtype)
                noise_pred = unet(window, t, encoder_hidden_states=embedding).sample.to(latent.dtype)
                progress_bar.update()
                return noise_pred

            latent = inverse.step(fuse_windows(predict, latent, windows), t, latent).prev_sample
            if keep_all:
                latents.append(latent)
            else:
                latents = [latent]
            if callback is not None:
                callback(i, t, latent)
    return latents


def inverse_scheduler(
    ddim_scheduler: SchedulerMixin, num_inv_steps: int, device: torch.device | str | None = None
) -> DDIMInverseScheduler:
    """The `DDIMInverseScheduler` `ddim_inversion` steps with, timesteps set; its last timestep is the noise level
    of the inverted latent (981 for SD's scheduler and 50 steps)."""
    known = inspect.signature(DDIMInverseScheduler.__init__).parameters
    config = {key: value for key, value in ddim_scheduler.config.items() if key in known}
    inverse = DDIMInverseScheduler.from_config({**config, "clip_sample": False})
    inverse.set_timesteps(num_inv_steps, device=device)
    return inverse


def sampling_scheduler(scheduler: DDIMScheduler, num_inference_steps: int, num_inv_steps: int) -> DDIMScheduler:
    """A DDIM scheduler for `num_inference_steps` steps whose first timestep is the noise level of a latent inverted
    in `num_inv_steps`.

    With as many steps as the inversion had (the default, and the original's only way) that is `scheduler` itself.
    Otherwise the two grids start at different timesteps (951 for 20 steps, 981 for 50): the sampler would then
    misread how noisy the latent is. With SD's "leading" spacing the grid can be shifted (`steps_offset`) to start
    where the inversion ended whenever `num_inference_steps <= num_inv_steps`; else a note says so and the grid is
    kept.
    """
    target = int(inverse_scheduler(scheduler, num_inv_steps).timesteps[-1])
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(num_inference_steps)
    first = int(sampler.timesteps[0])
    if first == target:
        return sampler
    offset = sampler.config.steps_offset + target - first
    if sampler.config.timestep_spacing == "leading" and offset >= 0:
        return DDIMScheduler.from_config(scheduler.config, steps_offset=offset)
    logger.warning(f"note: sampling in {num_inference_steps} steps starts at timestep {first}, but the latent "
                   f"inverted in {num_inv_steps} steps is at {target}; the edit may follow the source less closely "
                   "(use num_inference_steps <= num_inv_steps)")
    return sampler
