"""`TuneAVideoPipeline`: text-to-video sampling with a tuned inflated UNet (inference only)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, deprecate, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ..models.layout import fold_frames, frames_to_video, unfold_frames
from ..models.unet import UNet3DConditionModel
from .windows import blend, plan_windows

logger = logging.get_logger(__name__)


@dataclass
class TuneAVideoPipelineOutput(BaseOutput):
    """`videos`: `(batch, 3, frames, height, width)` float32 in [0, 1], a torch tensor or a numpy array."""

    videos: torch.Tensor | np.ndarray


def truncated_text(tokenizer: CLIPTokenizer, prompt: str) -> str:
    """The end of `prompt` that the text encoder never sees (past its `model_max_length` tokens), or ""."""
    ids = tokenizer(prompt, truncation=False).input_ids
    kept = tokenizer.model_max_length - 1  # the last kept position holds the end-of-text token
    return tokenizer.decode(ids[kept:-1]).strip() if len(ids) > tokenizer.model_max_length else ""


class TuneAVideoPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Sample clips from prompts with Stable Diffusion's VAE and text encoder and a tuned `UNet3DConditionModel`.

    For edits, pass `latents=` the DDIM-inverted latent of the source clip and a DDIM scheduler whose grid starts at
    its noise level: `tuneavideo.pipelines.edit` does both (`invert`, then `sample`). One inverted latent of batch 1
    serves every prompt and every `num_videos_per_prompt`. LoRAs load by name into the UNet (which keeps the image
    UNet's names) and the text encoder with diffusers' `load_lora_weights` (`tuneavideo.base_model.fuse_loras`).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet3DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        # As the original (and diffusers' SD pipelines) did: a scheduler config from before `steps_offset` and
        # `clip_sample` were set gives DDIM another timestep grid or x0 clipping, i.e. other samples than the model
        # was made for; such a config is corrected with a warning.
        for key, default, wanted in (("steps_offset", 1, 1), ("clip_sample", False, False)):
            found = getattr(scheduler.config, key, default)
            if found != wanted:
                deprecate(f"{key}={found}", "1.0.0", f"The configuration file of this scheduler: {scheduler} sets (or "
                          f"defaults) `{key}` to {found}; it should be {wanted}, which is used instead. Please "
                          "update the config accordingly, as leaving it might lead to incorrect results.",
                          standard_warn=False)
                scheduler.register_to_config(**{key: wanted})
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8

    def enable_vae_slicing(self) -> None:
        """Decode one frame at a time (kept for callers of the original; same as `pipe.vae.enable_slicing()`)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_videos_per_prompt: int = 1,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
    ) -> torch.Tensor:
        """Text embeddings `(2*batch*n, tokens, dim)` ordered [unconditional, conditional], or the conditional half."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeddings = self._embed(prompts, device, truncate_warning=True)
        if do_classifier_free_guidance:
            if negative_prompt is None:
                negative = [""] * len(prompts)
            elif isinstance(negative_prompt, str):
                negative = [negative_prompt] * len(prompts)
            else:
                negative = list(negative_prompt)
                if len(negative) != len(prompts):
                    raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
            embeddings = torch.cat([self._embed(negative, device), embeddings])
        # each prompt's embedding repeated for its videos: [p0, p0, p1, p1, ...]
        return embeddings.repeat_interleave(num_videos_per_prompt, dim=0)

    def _embed(self, prompts: list[str], device: torch.device, truncate_warning: bool = False) -> torch.Tensor:
        max_length = self.tokenizer.model_max_length
        inputs = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        if truncate_warning:
            for prompt in prompts:
                dropped = truncated_text(self.tokenizer, prompt)
                if dropped:
                    logger.warning(f"the text encoder reads at most {max_length} tokens; dropped: {dropped!r}")
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = inputs.attention_mask.to(device)
        return self.text_encoder(inputs.input_ids.to(device), attention_mask=attention_mask)[0]

    @torch.no_grad()
    def encode_video(self, frames: Iterable[np.ndarray], chunk_size: int = 8) -> DiagonalGaussianDistribution:
        """uint8 frames `(H, W, 3)` of one clip, any number, streamed -> the VAE posterior of its latent, already
        multiplied by the VAE's scaling factor: `.mean` (or `.sample()`) is what the UNet takes, `(1, 4, frames, h,
        w)`, float32. The mirror of `decode_latents`; `chunk_size` frames are in memory at once."""
        scale = self.vae.config.scaling_factor
        chunks = []
        for chunk in _batched(frames, chunk_size):
            video = frames_to_video(np.stack(chunk)).to(self.vae.device, self.vae.dtype)
            moments = self.vae.encode(fold_frames(video)).latent_dist.parameters
            mean, logvar = unfold_frames(moments, len(chunk)).float().chunk(2, dim=1)
            chunks.append(torch.cat([mean * scale, logvar + 2 * math.log(scale)], dim=1))
        return DiagonalGaussianDistribution(torch.cat(chunks, dim=2))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk_size: int | None = None) -> np.ndarray:
        """Latent clips `(batch, 4, frames, h, w)` -> float32 numpy videos `(batch, 3, frames, H, W)` in [0, 1],
        `chunk_size` frames through the VAE at once (None: all). The mirror of `encode_video`."""
        return np.concatenate(list(self.decode_chunks(latents, chunk_size or latents.shape[2])), axis=2)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, chunk_size: int = 8) -> Iterator[np.ndarray]:
        """`decode_latents` `chunk_size` frames at a time, each chunk `(batch, 3, frames, H, W)` given as soon as it
        is decoded: a long clip's decoded video need never be in memory whole."""
        scale = self.vae.config.scaling_factor
        for first in range(0, latents.shape[2], chunk_size):
            chunk = latents[:, :, first : first + chunk_size]
            video = unfold_frames(self.vae.decode(fold_frames(chunk / scale)).sample, chunk.shape[2])
            yield (video / 2 + 0.5).clamp(0, 1).cpu().float().numpy()

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape[1:]) != tuple(shape[1:]) or latents.shape[0] not in (1, shape[0]):
                raise ValueError(
                    f"latents of shape {tuple(latents.shape)} do not fit this request, which needs "
                    f"{tuple(shape)} (batch 1 is repeated): check video_length, height and width"
                )
            latents = latents.to(device=device, dtype=dtype).expand(shape).contiguous()
        return latents * self.scheduler.init_noise_sigma

    def check_inputs(self, prompt, height: int, width: int, callback_steps: int) -> None:
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError(f"`prompt` must be a non-empty string or list of strings, got {prompt!r}")
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        if not isinstance(callback_steps, int) or callback_steps <= 0:
            raise ValueError(f"`callback_steps` must be a positive integer, got {callback_steps!r}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        video_length: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "tensor",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        window_size: int | None = None,
        window_overlap: int | None = None,
    ) -> TuneAVideoPipelineOutput | torch.Tensor | np.ndarray:
        """Generate `num_videos_per_prompt` clips per prompt.

        `video_length`, `height` and `width` default to the shape of `latents` when given, else to the UNet's
        sample size. A clip longer than `window_size` frames (the tuned `n_sample_frames`) is denoised in
        overlapping windows of that size (`tuneavideo.pipelines.windows`; `window_overlap` defaults to a quarter window);
        invert it with the same windows. Returns `.videos` `(batch, 3, frames, height, width)` in [0, 1]: a torch
        tensor for `output_type="tensor"` (or "pt"), numpy for "np"; for "latent", the final latents
        `(batch, 4, frames, h, w)` undecoded (decode them with `decode_latents` or, a few frames at a time,
        `decode_chunks`).
        """
        if latents is not None:
            video_length = video_length or latents.shape[2]
            height = height or latents.shape[3] * self.vae_scale_factor
            width = width or latents.shape[4] * self.vae_scale_factor
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if video_length is None:
            raise ValueError("`video_length` is required when no `latents` are given")
        self.check_inputs(prompt, height, width, callback_steps)
        if output_type not in ("tensor", "pt", "np", "latent"):
            raise ValueError(f"`output_type` must be 'tensor', 'pt', 'np' or 'latent', got {output_type!r}")
        windows = plan_windows(video_length, window_size, window_overlap)
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 1. text embeddings, [unconditional, conditional]
        text_embeddings = self.encode_prompt(
            prompt, device, num_videos_per_prompt, negative_prompt, do_classifier_free_guidance
        )

        # 2. timesteps and starting latents
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (
            batch_size * num_videos_per_prompt,
            self.unet.config.in_channels,
            video_length,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        latents = self.prepare_latents(shape, text_embeddings.dtype, device, generator, latents)
        step_kwargs = self._step_kwargs(generator, eta)

        # 3. denoising loop with classifier-free guidance, window by window
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps) * len(windows)) as progress_bar:
            for i, t in enumerate(timesteps):

                def predict(frames: list[int]) -> torch.Tensor:
                    window = latents[:, :, frames]
                    model_input = torch.cat([window] * 2) if do_classifier_free_guidance else window
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    noise_pred = self.unet(model_input, t, encoder_hidden_states=text_embeddings).sample
                    progress_bar.update()
                    if do_classifier_free_guidance:
                        noise_uncond, noise_text = noise_pred.to(latents.dtype).chunk(2)
                        return noise_uncond + guidance_scale * (noise_text - noise_uncond)
                    return noise_pred.to(latents.dtype)

                noise_pred = blend(predict, latents, windows)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
                if callback is not None and i % callback_steps == 0:
                    callback(i, t, latents)

        # 4. decode
        if output_type == "latent":
            video = latents
        else:
            video = self.decode_latents(latents)
            if output_type in ("tensor", "pt"):
                video = torch.from_numpy(video)
        self.maybe_free_model_hooks()
        if not return_dict:
            return video
        return TuneAVideoPipelineOutput(videos=video)

    def _step_kwargs(self, generator, eta: float) -> dict:
        # only DDIM-like schedulers take `eta` and `generator`
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs


def _batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last may be shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
