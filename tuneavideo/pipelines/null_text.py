"""Null-text inversion (Mokady et al., arXiv 2211.09794) as Video-P2P runs it on a tuned model.

DDIM inversion without guidance is retraced well only by unguided sampling. Null-text inversion makes *guided*
sampling of the source prompt retrace it too: for every sampling step it optimises the unconditional ("null")
text embedding so that the guided DDIM step from the current latent lands on the inverted latent one step
cleaner, then advances the latent with that embedding. Sampling with the returned embeddings as the unconditional
half (step by step) then reconstructs the source, and an edit branched off it keeps what the source had.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline
from torch.optim import Adam

from .windows import Window, fuse_windows, plan_windows


def null_text_inversion(
    pipeline: DiffusionPipeline,
    latents: list[torch.Tensor],
    prompt_embedding: torch.Tensor,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    window_size: int | None = None,
    window_overlap: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """One optimised unconditional embedding per sampling step, for guided sampling from `latents[-1]`.

    Args:
        pipeline: a `TuneAVideoPipeline`; its UNet, its text encoder (for the empty prompt the optimisation starts
            from) and its scheduler's config (a DDIM scheduler of `len(latents) - 1` steps samples).
        latents: `ddim_inversion(..., keep_all=True)`'s latents `(batch, 4, frames, h, w)`, clean to noisiest.
        prompt_embedding: the source prompt's embedding `(batch, tokens, dim)`, the conditional half.
        guidance_scale: the guidance of the sampling to be retraced (Video-P2P's 7.5).
        num_inner_steps, early_stop_epsilon: Video-P2P's optimisation: at step i, Adam with learning rate
            `1e-2 * (1 - i / 100)`, at most `num_inner_steps` iterations, stopping once the MSE between the guided
            step's result and `latents[-i - 2]` is below `early_stop_epsilon + i * 2e-5`; step i+1 starts from
            step i's embedding.
        window_size, window_overlap: the windows the clip is sampled with (`tuneavideo.pipelines.windows`). The
            loss is over the whole clip, and each iteration's gradient is accumulated window by window (one
            window's graph in memory at a time), so the one embedding per step serves every window.
        callback: called with the step index after every UNet call.

    Returns:
        `len(latents) - 1` float32 embeddings `(batch, tokens, dim)` detached, in sampling order (noisiest first).
    """
    unet = pipeline.unet
    latent = latents[-1]
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(len(latents) - 1, device=latent.device)
    windows = plan_windows(latent.shape[2], window_size, window_overlap)
    batch = latent.shape[0]
    null = pipeline.encode_prompt([""] * batch, latent.device, do_classifier_free_guidance=False).detach().float()
    embeddings = []
    for i, t in enumerate(scheduler.timesteps):

        def predict(embedding: torch.Tensor, frames: list[int]) -> torch.Tensor:
            # the UNet runs in its own dtype; the step and the loss stay in the latent's
            sample = latent[:, :, frames].to(unet.dtype)
            noise_pred = unet(sample, t, encoder_hidden_states=embedding.to(unet.dtype)).sample.to(latent.dtype)
            if callback is not None:
                callback(i)
            return noise_pred

        def guided_step(noise_null: torch.Tensor) -> torch.Tensor:
            return scheduler.step(noise_null + guidance_scale * (noise_text - noise_null), t, latent).prev_sample

        with torch.no_grad():
            noise_text = fuse_windows(lambda frames: predict(prompt_embedding, frames), latent, windows)
        null = null.detach().requires_grad_()
        optimizer = Adam([null], lr=1e-2 * (1 - i / 100))
        for _ in range(num_inner_steps):
            optimizer.zero_grad()
            loss = _loss_backward(predict, guided_step, null, latent, latents[-i - 2], windows)
            optimizer.step()
            if loss < early_stop_epsilon + i * 2e-5:
                break
        null = null.detach()
        embeddings.append(null.clone())
        with torch.no_grad():
            latent = guided_step(fuse_windows(lambda frames: predict(null, frames), latent, windows))
    return embeddings


def _loss_backward(predict, guided_step, null: torch.Tensor, latent: torch.Tensor, target: torch.Tensor,
                   windows: list[Window]) -> float:
    """The MSE between the guided step from `latent` and `target`, over the whole clip; its gradient for `null`
    accumulated into `null.grad`, window by window.

    The fused prediction is a weighted sum of the windows' predictions, so the gradient is the sum over windows of
    each one's vector-Jacobian product with (the loss's gradient for the fused prediction) x (the window's
    weights). That needs the fused prediction first: with several windows a pass without gradients gives it and
    each window is run again with its graph; a single window keeps its one graph.
    """
    single = len(windows) == 1
    graphs = []

    def prediction(frames: list[int]) -> torch.Tensor:
        with torch.set_grad_enabled(single):
            noise_pred = predict(null, frames)
        graphs.append(noise_pred)
        return noise_pred.detach()

    with torch.enable_grad():
        noise_null = fuse_windows(prediction, latent, windows).requires_grad_()
        loss = F.mse_loss(guided_step(noise_null), target)
        loss.backward(inputs=[noise_null])
        for window, graph in zip(windows, graphs):
            noise_pred = graph if single else predict(null, window.frames)
            own = window.frames[window.first_member :]
            weights = window.weights.to(noise_pred.device, noise_pred.dtype).view(1, 1, -1, 1, 1)
            noise_pred[:, :, window.first_member :].backward(noise_null.grad[:, :, own] * weights, inputs=[null])
    return loss.item()
