"""DDIM inversion of a clip latent: the structure guidance for Tune-A-Video edits."""

from __future__ import annotations

import inspect

import torch
from diffusers import DDIMInverseScheduler, DiffusionPipeline, SchedulerMixin


@torch.no_grad()
def ddim_inversion(
    pipeline: DiffusionPipeline,
    ddim_scheduler: SchedulerMixin,
    video_latent: torch.Tensor,
    num_inv_steps: int,
    prompt: str = "",
) -> list[torch.Tensor]:
    """Run deterministic DDIM backwards from a clean clip latent to noise.

    `video_latent` is `(batch, 4, frames, h, w)`, already multiplied by the VAE's scaling factor. The UNet is
    conditioned on `prompt` (the original always used the empty prompt) without guidance. Returns the
    `num_inv_steps + 1` latents from clean to noisiest (timesteps 1, 21, ..., 981 for 50 steps with SD's
    scheduler); sample from the last one with a DDIM scheduler of the same step count.

    The update is the original's `next_step`, done by diffusers' `DDIMInverseScheduler` built from the sampling
    scheduler's config (keeping its `set_alpha_to_one=False`, `steps_offset=1` and `prediction_type`), so
    v-prediction models invert correctly too.
    """
    inverse = inverse_scheduler(ddim_scheduler, num_inv_steps, video_latent.device)
    unet = pipeline.unet
    embedding = pipeline.encode_prompt(
        [prompt] * video_latent.shape[0], video_latent.device, do_classifier_free_guidance=False
    ).to(unet.dtype)
    latent = video_latent.clone()
    latents = [latent]
    for t in pipeline.progress_bar(inverse.timesteps):
        # the UNet runs in its own dtype; the update stays in the latent's (use float32 latents for accuracy)
        noise_pred = unet(latent.to(unet.dtype), t, encoder_hidden_states=embedding).sample.to(latent.dtype)
        latent = inverse.step(noise_pred, t, latent).prev_sample
        latents.append(latent)
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
