"""`TuneAVideoPipeline`: text-to-video sampling with a tuned inflated UNet (inference only)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, MultiControlNetModel, SchedulerMixin
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, deprecate, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ..models.layout import fold_frames, frames_to_video, unfold_frames
from ..models.unet import UNet3DConditionModel
from .controlnet import StructureGuidance
from .inversion import sampling_scheduler
from .windows import fuse_windows, plan_windows

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

    `controlnet` (optional): diffusers ControlNets (one, a list, or a `MultiControlNetModel`) for structure guidance,
    run frame by frame (`tuneavideo.pipelines.controlnet`); a call given `conditioning_frames` is guided by them.
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"
    _optional_components = ["controlnet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet3DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | None = None,
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
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              controlnet=controlnet)
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
        scheduler: SchedulerMixin | None = None,
    ) -> torch.Tensor:
        """Starting latents of `shape`: seeded noise, or `latents` (batch 1 repeated), scaled by the initial noise
        sigma of `scheduler` (None: the pipeline's)."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape[1:]) != tuple(shape[1:]) or latents.shape[0] not in (1, shape[0]):
                raise ValueError(
                    f"latents of shape {tuple(latents.shape)} do not fit this request, which needs "
                    f"{tuple(shape)} (batch 1 is repeated): check video_length, height and width"
                )
            latents = latents.to(device=device, dtype=dtype).expand(shape).contiguous()
        return latents * (scheduler or self.scheduler).init_noise_sigma

    def structure_guidance(self, conditioning_frames, video_length: int, height: int, width: int,
                           **settings) -> StructureGuidance:
        """The pipeline's ControlNets with `conditioning_frames` (one condition frame per clip frame; a sequence
        per ControlNet for several) and diffusers' ControlNet `settings` (`controlnet_conditioning_scale`,
        `control_guidance_start`, `control_guidance_end`, `guess_mode`; `StructureGuidance.create`), as `__call__`
        takes them, for a clip of `video_length` frames at `height` x `width`: what `__call__` is guided by, and what
        an inversion (`inversion.ddim_inversion`, `null_text.null_text_inversion`) of the same clip takes to run
        under the same control.

        Raises:
            ValueError: the pipeline has no `controlnet`.
            ControlError: a setting is out of range, or the conditions do not fit the clip.
        """
        if self.controlnet is None:
            raise ValueError("`conditioning_frames` need a pipeline with a `controlnet`")
        return StructureGuidance.create(self.controlnet, conditioning_frames, video_length, height, width, **settings)

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
        guidance_scale: float | Sequence[float] = 7.5,
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
        *,
        negative_prompt_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        num_inv_steps: int | None = None,
        latents_dtype: torch.dtype | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        conditioning_frames=None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
    ) -> TuneAVideoPipelineOutput | torch.Tensor | np.ndarray:
        """Generate `num_videos_per_prompt` clips per prompt: the one denoising loop of the package (plain edits,
        training's validation samples and local edits all sample here; what differs is plugged in).

        `video_length`, `height` and `width` default to the shape of `latents` when given, else to the UNet's
        sample size. A clip longer than `window_size` frames (the tuned `n_sample_frames`) is denoised in
        overlapping windows of that size (`tuneavideo.pipelines.windows`; `window_overlap` defaults to a quarter
        window); invert it with the same windows. Returns `.videos` `(batch, 3, frames, height, width)` in [0, 1]: a
        torch tensor for `output_type="tensor"` (or "pt"), numpy for "np"; for "latent", the final latents
        `(batch, 4, frames, h, w)` undecoded (decode them with `decode_latents` or, a few frames at a time,
        `decode_chunks`).

        What can be plugged in:
            guidance_scale: one scale for every prompt, or one per prompt; a prompt whose scale is at most 1 takes
                its conditional prediction unguided (Video-P2P's source branch after a plain DDIM inversion).
            negative_prompt_embeds: the unconditional embeddings `(prompts, tokens, dim)` in place of
                `negative_prompt`'s, or a sequence of them, one per step (null-text inversion's).
            num_inv_steps: `latents` are a DDIM inversion in that many steps: sampling starts at its noise level
                (`inversion.sampling_scheduler`, a DDIM scheduler made from the pipeline's, which is left as it is).
            latents_dtype: the dtype the latents are denoised in (None: the text embeddings', as diffusers'
                pipelines); the UNet still runs in its own.
            callback_on_step_end: diffusers' per-step hook, `callback_on_step_end(pipe, i, t, callback_kwargs)`
                after each scheduler step, given the tensors named in `callback_on_step_end_tensor_inputs`
                (`_callback_tensor_inputs`); the tensors it returns replace them (a local blend returns new
                `latents`). The attention processors set on the UNet (`attention_control`) act on every UNet call.
            callback, callback_steps: the original's `callback(i, t, latents)` every `callback_steps` steps, after
                `callback_on_step_end`.
            conditioning_frames, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                guess_mode: structure guidance by the pipeline's `controlnet`, as diffusers' ControlNet pipelines
                define them (`structure_guidance`): the condition frames, a list of PIL images or uint8 arrays, one
                per clip frame (a list of such lists for several ControlNets); each window's frames are guided by
                their own conditions. None: no structure guidance.
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
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` may name {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        windows = plan_windows(video_length, window_size, window_overlap)
        control = None
        if conditioning_frames is not None:
            control = self.structure_guidance(
                conditioning_frames, video_length, height, width,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                guess_mode=guess_mode)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        device = self._execution_device
        scales = _per_prompt(guidance_scale, len(prompts), "guidance_scale")
        do_classifier_free_guidance = max(scales) > 1.0
        per_step = negative_prompt_embeds is not None and not torch.is_tensor(negative_prompt_embeds)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give `negative_prompt` or `negative_prompt_embeds`, not both")
        if per_step and len(negative_prompt_embeds) != num_inference_steps:
            raise ValueError(f"{len(negative_prompt_embeds)} `negative_prompt_embeds` for {num_inference_steps} "
                             "steps: give one per step, or one tensor for all")

        # 1. text embeddings: [unconditional, conditional], the unconditional half given or made per step
        text_embeddings = self.encode_prompt(prompts, device, num_videos_per_prompt, negative_prompt,
                                             do_classifier_free_guidance and negative_prompt_embeds is None)

        def embeddings_at(step: int) -> torch.Tensor:
            if not do_classifier_free_guidance or negative_prompt_embeds is None:
                return text_embeddings
            negative = negative_prompt_embeds[step] if per_step else negative_prompt_embeds
            negative = negative.to(text_embeddings).repeat_interleave(num_videos_per_prompt, dim=0)
            return torch.cat([negative, text_embeddings])

        # 2. timesteps and starting latents
        scheduler = self.scheduler
        if num_inv_steps is not None:
            scheduler = sampling_scheduler(scheduler, num_inference_steps, num_inv_steps)
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (
            len(prompts) * num_videos_per_prompt,
            self.unet.config.in_channels,
            video_length,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        latents = self.prepare_latents(shape, latents_dtype or text_embeddings.dtype, device, generator, latents,
                                       scheduler)
        step_kwargs = _step_kwargs(scheduler, generator, eta)

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:  # (rows, 1, 1, 1, 1)
            rows = torch.tensor(values, dtype=dtype, device=device).repeat_interleave(num_videos_per_prompt)
            return rows.view(-1, 1, 1, 1, 1)

        # one scale for every row multiplies as a Python number (a half-precision tensor would round it)
        scale = scales[0] if len(set(scales)) == 1 else per_row(scales, latents.dtype)
        unguided = per_row([value <= 1.0 for value in scales], torch.bool)

        # 3. denoising loop with classifier-free guidance, window by window
        with self.progress_bar(total=len(scheduler.timesteps) * len(windows)) as progress_bar:
            for i, t in enumerate(scheduler.timesteps):
                embeddings = embeddings_at(i).to(self.unet.dtype)

                def predict(frames: list[int]) -> torch.Tensor:
                    window = latents[:, :, frames]
                    model_input = torch.cat([window] * 2) if do_classifier_free_guidance else window
                    model_input = scheduler.scale_model_input(model_input, t).to(self.unet.dtype)
                    residuals = {} if control is None else control.residuals(
                        model_input, t, embeddings, frames, i, len(scheduler.timesteps), do_classifier_free_guidance)
                    noise_pred = self.unet(model_input, t, encoder_hidden_states=embeddings, **residuals).sample
                    progress_bar.update()
                    noise_pred = noise_pred.to(latents.dtype)
                    if not do_classifier_free_guidance:
                        return noise_pred
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    guided = noise_uncond + scale * (noise_text - noise_uncond)
                    return torch.where(unguided, noise_text, guided)

                noise_pred = fuse_windows(predict, latents, windows)
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, callback_kwargs).pop("latents", latents)
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


def _per_prompt(value: float | Sequence[float], prompts: int, name: str) -> list[float]:
    """`value` for each of `prompts` prompts: one for all, or one each."""
    values = [value] * prompts if isinstance(value, (int, float)) else list(value)
    if len(values) != prompts:
        raise ValueError(f"{len(values)} values of `{name}` for {prompts} prompts: give one, or one per prompt")
    return values


def _step_kwargs(scheduler: SchedulerMixin, generator, eta: float) -> dict:
    """What `scheduler.step` takes besides the prediction: only DDIM-like schedulers take `eta` and `generator`."""
    parameters = set(inspect.signature(scheduler.step).parameters)
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
