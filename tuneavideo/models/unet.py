"""`UNet3DConditionModel`: Stable Diffusion's UNet inflated to clips, as in Tune-A-Video.

Config keys, state-dict keys and numerics follow the original Tune-A-Video model, so its configs and tuned
checkpoints load unchanged (798 tensors for SD 1.x: SD's 686 plus `attn_temp`/`norm_temp` in each of the 16
transformer blocks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .attention import SPATIAL_ATTENTION, SparseCausalAttention
from .resnet import InflatedConv3d
from .unet_blocks import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS, TransformerSettings, get_block

TEMPORAL_KEY = "_temp."  # every parameter that inflation adds: `attn_temp.*` and `norm_temp.*`


@dataclass
class UNet3DConditionOutput(BaseOutput):
    """`sample`: the predicted noise (or v), `(batch, channels, frames, height, width)`."""

    sample: torch.Tensor


class UNet3DConditionModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    """The inflated SD UNet on latent clips `(batch, 4, frames, height/8, width/8)`.

    Its constructor takes the original project's config keys (those of diffusers 0.11's 2D UNet, with 3D block
    names) and one more, `spatial_attention` (see `set_spatial_attention`; a config without it is Tune-A-Video's
    "sparse_causal"). Features SD never used (class embeddings, dual or only-cross attention, scale-shift time
    embedding) are refused rather than half-supported.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        mid_block_type: str = "UNetMidBlock3DCrossAttn",
        up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        only_cross_attention: bool = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        attention_head_dim: int | tuple[int, ...] = 8,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        spatial_attention: str = "sparse_causal",
    ):
        super().__init__()
        unsupported = {
            "only_cross_attention": any(only_cross_attention)
            if isinstance(only_cross_attention, (list, tuple))
            else bool(only_cross_attention),
            "dual_cross_attention": dual_cross_attention,
            "class_embed_type": class_embed_type is not None or num_class_embeds is not None,
            "resnet_time_scale_shift": resnet_time_scale_shift != "default",
            "act_fn": act_fn != "silu",
        }
        if any(unsupported.values()):
            raise ValueError(f"UNet3DConditionModel does not support {[k for k, v in unsupported.items() if v]}")
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        self.sample_size = sample_size
        heads = [attention_head_dim] * len(down_block_types) if isinstance(attention_head_dim, int) else list(attention_head_dim)

        self.conv_in = InflatedConv3d(in_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        time_embed_dim = block_out_channels[0] * 4
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)

        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_groups=norm_num_groups)

        def transformers(num_heads: int) -> TransformerSettings:
            return TransformerSettings(num_heads, cross_attention_dim, norm_num_groups, use_linear_projection,
                                       upcast_attention)

        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, name in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(
                get_block(
                    DOWN_BLOCKS,
                    name,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    num_layers=layers_per_block,
                    add_downsample=i < len(block_out_channels) - 1,
                    downsample_padding=downsample_padding,
                    transformers=transformers(heads[i]),
                    **common,
                )
            )

        self.mid_block = get_block(
            MID_BLOCKS,
            mid_block_type,
            in_channels=block_out_channels[-1],
            output_scale_factor=mid_block_scale_factor,
            transformers=transformers(heads[-1]),
            **common,
        )

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        reversed_heads = list(reversed(heads))
        output_channel = reversed_channels[0]
        for i, name in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(
                get_block(
                    UP_BLOCKS,
                    name,
                    in_channels=reversed_channels[min(i + 1, len(block_out_channels) - 1)],
                    prev_output_channel=prev_output_channel,
                    out_channels=output_channel,
                    num_layers=layers_per_block + 1,
                    add_upsample=i < len(block_out_channels) - 1,
                    transformers=transformers(reversed_heads[i]),
                    **common,
                )
            )

        # statistics over all frames of a clip, like the ResNet GroupNorms
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = InflatedConv3d(block_out_channels[0], out_channels, 3, padding=1)
        self.set_spatial_attention(spatial_attention)

    def set_spatial_attention(self, rule: str) -> None:
        """Where every frame's spatial self-attention (`attn1`) takes its keys and values: "sparse_causal"
        (Tune-A-Video: frames 0 and i-1) or "first_frame" (Video-P2P: frame 0 only). Kept in the config, so a
        saved model keeps it; set it on a model tuned by Video-P2P's own code, whose config cannot say.

        Raises:
            ValueError: an unknown rule.
        """
        if rule not in SPATIAL_ATTENTION:
            raise ValueError(f"spatial_attention must be one of {', '.join(SPATIAL_ATTENTION)}, got {rule!r}")
        for module in self.modules():
            if isinstance(module, SparseCausalAttention):
                module.spatial_attention = rule
        self.register_to_config(spatial_attention=rule)

    def set_default_attn_processor(self) -> None:
        """Plain-maths attention everywhere (sparse-causal where it was); the reference for other backends."""
        self.set_attn_processor(AttnProcessor())

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        """Predict noise for `sample` `(batch, channels, frames, h, w)` given text `(batch, tokens, dim)`.

        `down_block_additional_residuals` (one per skip connection of the down path) and
        `mid_block_additional_residual` are a ControlNet's outputs, 5-D like `sample`; as in diffusers'
        `UNet2DConditionModel`, each down residual is added to its skip after the whole down pass and the mid residual
        to the mid block's output. Both or neither.
        """
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual go together")
        # latents whose size is not a multiple of the total upsampling factor need explicit upsample sizes
        upsample_factor = 2 ** (len(self.up_blocks) - 1)
        forward_upsample_size = any(size % upsample_factor != 0 for size in sample.shape[-2:])

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        # one time embedding per clip; Timesteps returns float32, so cast to the model's dtype
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))

        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            sample, block_skips = block(sample, emb, encoder_hidden_states)
            skips += block_skips
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down block residuals, got {len(down_block_additional_residuals)}"
                )
            skips = tuple(skip + residual for skip, residual in zip(skips, down_block_additional_residuals))

        sample = self.mid_block(sample, emb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            block_skips = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            sample = block(sample, block_skips, emb, encoder_hidden_states, upsample_size)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if not return_dict:
            return (sample,)
        return UNet3DConditionOutput(sample=sample)

    @classmethod
    def from_pretrained_2d(
        cls,
        pretrained_model_path: str | os.PathLike,
        subfolder: str | None = None,
        spatial_attention: str = "sparse_causal",
        **kwargs,
    ) -> "UNet3DConditionModel":
        """Inflate a Stable Diffusion 1.x/2.x UNet folder (`.bin` or `.safetensors`, fp16 variants via `variant=`).

        Takes every SD weight by name and initialises the temporal layers (`attn_temp`, `norm_temp`), whose output
        projection is zero, so the result equals the image model on a clip of identical frames.
        `spatial_attention` is the frame rule of `set_spatial_attention`. `kwargs` go to
        `UNet2DConditionModel.from_pretrained` (`variant`, `torch_dtype`, ...).
        """
        unet_2d = UNet2DConditionModel.from_pretrained(pretrained_model_path, subfolder=subfolder, **kwargs)
        return cls.from_2d(unet_2d, spatial_attention, name=str(pretrained_model_path))

    @classmethod
    def from_2d(cls, unet_2d: UNet2DConditionModel, spatial_attention: str = "sparse_causal",
                name: str = "the image UNet") -> "UNet3DConditionModel":
        """Inflate a loaded Stable Diffusion 1.x/2.x `UNet2DConditionModel` (see `from_pretrained_2d`); `name` is
        what an error calls it."""
        model = cls.from_config({**cls.config_from_2d(unet_2d.config), "spatial_attention": spatial_attention})
        state_dict = unet_2d.state_dict()
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        bad_missing = [key for key in missing if TEMPORAL_KEY not in key]
        if unexpected or bad_missing:
            raise ValueError(
                f"{name}: not a 4-level Stable Diffusion UNet (unexpected keys {unexpected[:3]}, "
                f"missing keys {bad_missing[:3]})"
            )
        dtype = next(iter(state_dict.values())).dtype
        return model if dtype == model.dtype else model.to(dtype=dtype)

    @classmethod
    def config_from_2d(cls, config_2d: dict) -> dict:
        """The 3D config for a 2D SD UNet config: the 3D block names, and only the keys this model knows."""
        known = set(cls._get_init_keys(cls)) - {"self"}
        config = {key: value for key, value in dict(config_2d).items() if key in known}
        # newer configs spell the head count `num_attention_heads`; older ones misname it `attention_head_dim`
        if config_2d.get("num_attention_heads") is not None:
            config["attention_head_dim"] = config_2d["num_attention_heads"]
        levels = len(config_2d["block_out_channels"])
        config["down_block_types"] = ["CrossAttnDownBlock3D"] * (levels - 1) + ["DownBlock3D"]
        config["up_block_types"] = ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * (levels - 1)
        config["mid_block_type"] = "UNetMidBlock3DCrossAttn"
        return config

