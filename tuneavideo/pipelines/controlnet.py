"""Structure guidance: diffusers' own 2-D ControlNets run frame by frame on a clip, their residuals handed to the
inflated UNet (Make-A-Protagonist's design, so every public SD ControlNet loads unchanged).

Per UNet call, the frames of the window being denoised are folded into the batch (`(batch*frames, ...)`), each with
its own condition image, the text embeddings repeated per frame; the ControlNet's residuals are unfolded back to
`(batch, channels, frames, h, w)` for `UNet3DConditionModel.forward`. Everything else is
`StableDiffusionControlNetPipeline`'s definition: condition images prepared as it prepares `image` (resized to the
output size, RGB in [0, 1]), `controlnet_conditioning_scale` (one per ControlNet), `control_guidance_start/end`
(the fraction of the steps where a ControlNet acts), `guess_mode` (the ControlNet sees the conditional half only and
the unconditional half gets zeros), several ControlNets summed as `MultiControlNetModel` sums them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, MultiControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ..errors import UserError, first_line
from ..models.layout import fold_frames, unfold_frames

# the file suffixes of a ControlNet saved as one file in the original (ldm) format, read by `from_single_file`
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".bin")

# base models by their text encoder's width, for messages about a ControlNet that does not fit
BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


class ControlError(UserError):
    """A ControlNet, a condition or a control setting that cannot be used; one line naming it and what to do."""


def load_controlnet(source: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                    option: str = "--controlnet") -> ControlNetModel:
    """A ControlNet from a diffusers folder or hub id (`from_pretrained`) or one file in the original format
    (`from_single_file`; offline it needs the original's `.yaml` config beside it, as ControlNet 1.1 ships them:
    `control_v11p_sd15_canny.pth` with `control_v11p_sd15_canny.yaml`).

    Raises:
        ControlError: the source is missing or is not a ControlNet; the message names it as `option`.
    """
    source = os.fspath(source)
    path = Path(source)
    try:
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ControlError(f"{option} {source}: a ControlNet file must end in "
                                   f"{', '.join(SINGLE_FILE_SUFFIXES)}; or give a diffusers folder or hub id")
            config = path.with_suffix(".yaml")
            extra = {"original_config": str(config)} if config.is_file() else {}
            return ControlNetModel.from_single_file(source, torch_dtype=torch_dtype, **extra)
        return ControlNetModel.from_pretrained(source, torch_dtype=torch_dtype)
    except ControlError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        hint = ("put its original .yaml config beside it, or convert it to a diffusers folder" if path.is_file()
                else "download one with ./download_models.sh --controlnet canny|depth|<hub id>")
        raise ControlError(f"{option} {source}: cannot load a ControlNet ({first_line(err)}); {hint}") from err


def check_fits(controlnet: ControlNetModel, unet_config, name: str = "the ControlNet") -> None:
    """A ControlNet must be made for the run's base model: the same cross-attention (text) width and the same
    UNet widths, so that its residuals add to the UNet's skips.

    Raises:
        ControlError: it does not fit; says which base each is for.
    """
    theirs, ours = controlnet.config.cross_attention_dim, unet_config.cross_attention_dim
    if theirs != ours:
        raise ControlError(f"{name} is made for {BASES.get(theirs, f'a {theirs}-wide text encoder')} but this model "
                           f"is {BASES.get(ours, f'{ours}-wide')} (cross-attention width {theirs}, not {ours}); use a "
                           f"ControlNet for {BASES.get(ours, 'this base model')}")
    if tuple(controlnet.config.block_out_channels) != tuple(unet_config.block_out_channels):
        raise ControlError(f"{name} has UNet widths {tuple(controlnet.config.block_out_channels)}, this model "
                           f"{tuple(unet_config.block_out_channels)}; use a ControlNet made for this base model")


def check_settings(count: int, scales: Sequence[float], starts: Sequence[float], ends: Sequence[float]) -> None:
    """One scale, start and end per ControlNet; scales finite and not negative; `0 <= start < end <= 1`.

    Raises:
        ControlError: a setting is out of range; names it.
    """
    for name, values in (("controlnet_conditioning_scale", scales), ("control_guidance_start", starts),
                         ("control_guidance_end", ends)):
        if len(values) != count:
            raise ControlError(f"{name}: {len(values)} values for {count} ControlNets; give one per ControlNet")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ControlError(f"{name}: {value!r} is not a number")
    for scale in scales:
        if scale < 0:
            raise ControlError(f"controlnet_conditioning_scale: {scale} is negative; give 0 or more (1.0 as trained)")
    for start, end in zip(starts, ends):
        if not 0 <= start < end <= 1:
            raise ControlError(f"control_guidance_start {start} and control_guidance_end {end}: need "
                               "0 <= start < end <= 1 (fractions of the steps)")


def _per_net(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


@dataclass
class StructureGuidance:
    """ControlNets with their condition frames and settings, for one sampling (or inversion) run.

    `conditions[k]` holds the condition images of ControlNet k, one per clip frame (PIL images or uint8 arrays
    `(H, W, 3)`, any sequence: a memory-mapped array keeps a long clip's conditions off the heap); only the frames of
    the window being denoised are prepared at a time. Build it with `StructureGuidance.create`.
    """

    controlnet: ControlNetModel | MultiControlNetModel
    conditions: list[Sequence]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    height: int
    width: int

    @classmethod
    def create(
        cls,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel],
        conditioning_frames: Sequence,
        num_frames: int,
        height: int,
        width: int,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
    ) -> "StructureGuidance":
        """As `StableDiffusionControlNetPipeline.__call__` takes them: `conditioning_frames` a sequence of frames
        for one ControlNet, or one such sequence per ControlNet; a number for the scale, start or end holds for every
        ControlNet. A ControlNet with `global_pool_conditions` turns `guess_mode` on, as there.

        Raises:
            ControlError: a setting is out of range, or a condition has another number of frames than the clip.
        """
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet) if len(controlnet) > 1 else controlnet[0]
        nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
        conditions = list(conditioning_frames) if len(nets) > 1 else [conditioning_frames]
        if len(conditions) != len(nets):
            raise ControlError(f"conditioning_frames: {len(conditions)} conditions for {len(nets)} ControlNets; "
                               "give one sequence of frames per ControlNet")
        for index, frames in enumerate(conditions):
            if len(frames) != num_frames:
                raise ControlError(f"conditioning_frames: condition {index + 1} has {len(frames)} frames for a clip "
                                   f"of {num_frames}; give one condition frame per clip frame")
        scales = _per_net(controlnet_conditioning_scale, len(nets))
        starts = _per_net(control_guidance_start, len(nets))
        ends = _per_net(control_guidance_end, len(nets))
        check_settings(len(nets), scales, starts, ends)
        guess_mode = guess_mode or nets[0].config.global_pool_conditions
        return cls(controlnet, conditions, [float(s) for s in scales], list(starts), list(ends), guess_mode, height,
                   width)

    @property
    def nets(self) -> list[ControlNetModel]:
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    def step_scales(self, step: int, num_steps: int) -> list[float]:
        """Each ControlNet's scale at step `step` of `num_steps`: its scale while
        `start <= step / num_steps` and `(step + 1) / num_steps <= end`, else 0 (diffusers' `controlnet_keep`)."""
        return [scale * (1.0 - float(step / num_steps < start or (step + 1) / num_steps > end))
                for scale, start, end in zip(self.scales, self.starts, self.ends)]

    def prepare(self, frames: Sequence[int]) -> list[torch.Tensor]:
        """The condition images of clip frames `frames`, per ControlNet `(frames, 3, height, width)` in [0, 1],
        prepared as diffusers prepares a ControlNet's `image` (`VaeImageProcessor` without normalising)."""
        processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
        net = self.nets[0]
        prepared = []
        for condition in self.conditions:
            images = [_image(condition[index]) for index in frames]
            image = processor.preprocess(images, height=self.height, width=self.width).to(dtype=torch.float32)
            prepared.append(image.to(device=net.device, dtype=net.dtype))
        return prepared

    def residuals(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor | int,
        embeddings: torch.Tensor,
        frames: Sequence[int] | Sequence[Sequence[int]],
        step: int,
        num_steps: int,
        guided: bool,
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        """The UNet's extra keyword arguments for one call on `model_input` `(batch, 4, frames, h, w)` (the clip
        frames `frames`, or one list of frames per row of the batch as tuning draws them; already scaled by the
        scheduler) at `timestep` (one, or one per row), with `embeddings` `(batch, tokens, dim)` ordered
        [unconditional, conditional] when `guided` (classifier-free guidance): `down_block_additional_residuals`
        and `mid_block_additional_residual`, 5-D; none at a step where every ControlNet is off."""
        scales = self.step_scales(step, num_steps)
        if not any(scales):
            return {}
        if self.guess_mode and guided:  # the conditional half only; the unconditional half gets zeros
            model_input, embeddings = model_input.chunk(2)[1], embeddings.chunk(2)[1]
        batch, num_frames = model_input.shape[0], model_input.shape[2]
        rows = frames if isinstance(frames[0], Sequence) else [frames] * batch
        net = self.nets[0]
        prepared = [self.prepare(row) for row in rows]
        images = [torch.cat([row[k] for row in prepared]) for k in range(len(self.nets))]  # batch outer, frames inner
        timestep = torch.as_tensor(timestep, device=model_input.device)
        if timestep.ndim == 1 and len(timestep) == batch:  # one per clip: one per frame
            timestep = timestep.repeat_interleave(num_frames)
        multi = isinstance(self.controlnet, MultiControlNetModel)
        down, mid = self.controlnet(
            fold_frames(model_input).to(net.dtype),
            timestep,
            encoder_hidden_states=embeddings.repeat_interleave(num_frames, dim=0).to(net.dtype),
            controlnet_cond=images if multi else images[0],
            conditioning_scale=scales if multi else scales[0],
            guess_mode=self.guess_mode,
            return_dict=False,
        )
        down = [unfold_frames(residual, num_frames).to(model_input.dtype) for residual in down]
        mid = unfold_frames(mid, num_frames).to(model_input.dtype)
        if self.guess_mode and guided:
            down = [torch.cat([torch.zeros_like(residual), residual]) for residual in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def _image(frame) -> Image.Image:
    """A condition frame as the PIL image diffusers' ControlNet pipeline takes."""
    return frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
