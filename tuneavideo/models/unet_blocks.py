"""Down, mid and up blocks of the inflated UNet, with SD's attribute names so SD weights load by name.

A "CrossAttn" block is the plain one with a transformer after every ResNet (`TransformerSettings`); the config's block
names choose which (`get_block`).

Every block keeps a `gradient_checkpointing` flag that `ModelMixin.enable_gradient_checkpointing` sets, together
with `_gradient_checkpointing_func` (non-reentrant by default in diffusers). Non-reentrant checkpointing gives
gradients to trainable layers even when the block's inputs need none; the original's reentrant checkpointing did
not, and silently froze the six down-block transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .resnet import Downsample3D, ResnetBlock3D, Upsample3D
from .transformer_3d import Transformer3DModel


@dataclass(frozen=True)
class TransformerSettings:
    """The settings every transformer of a cross-attention block is built with (`build` makes them)."""

    num_attention_heads: int  # SD's `attention_head_dim` config value is the head count; a head gets channels / heads
    cross_attention_dim: int
    norm_num_groups: int
    use_linear_projection: bool
    upcast_attention: bool

    def build(self, count: int, channels: int) -> nn.ModuleList:
        heads = self.num_attention_heads
        return nn.ModuleList(
            Transformer3DModel(heads, channels // heads, channels, self.cross_attention_dim, self.norm_num_groups,
                               self.use_linear_projection, self.upcast_attention)
            for _ in range(count)
        )


class _CheckpointedBlock(nn.Module):
    gradient_checkpointing = False

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)


class DownBlock3D(_CheckpointedBlock):
    """ResNets (each followed by a transformer when `transformers` is given), then a stride-2 downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        resnet_eps: float,
        resnet_groups: int,
        add_downsample: bool,
        downsample_padding: int,
        transformers: TransformerSettings | None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_groups, resnet_eps)
            for i in range(num_layers)
        )
        self.attentions = transformers.build(num_layers, out_channels) if transformers else None
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, padding=downsample_padding)]) if add_downsample else None

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        output_states = ()
        for index, resnet in enumerate(self.resnets):
            hidden_states = self._run(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self._run(self.attentions[index], hidden_states, encoder_hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class UpBlock3D(_CheckpointedBlock):
    """ResNets over the skip connections (each followed by a transformer when `transformers` is given), then a 2x
    upsampler."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        resnet_eps: float,
        resnet_groups: int,
        add_upsample: bool,
        transformers: TransformerSettings | None,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            # the last resnet takes the skip connection of the block input, the others the block's own width
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(
                ResnetBlock3D(resnet_in_channels + skip_channels, out_channels, temb_channels, resnet_groups, resnet_eps)
            )
        self.resnets = nn.ModuleList(resnets)
        self.attentions = transformers.build(num_layers, out_channels) if transformers else None
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        upsample_size: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        for index, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - index]
            hidden_states = self._run(resnet, torch.cat([hidden_states, skip], dim=1), temb)
            if self.attentions is not None:
                hidden_states = self._run(self.attentions[index], hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock3DCrossAttn(_CheckpointedBlock):
    """ResNet, transformer, ResNet."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        resnet_eps: float,
        resnet_groups: int,
        output_scale_factor: float,
        transformers: TransformerSettings,
    ):
        super().__init__()
        resnet = dict(temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps, output_scale_factor=output_scale_factor)
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels, **resnet), ResnetBlock3D(in_channels, **resnet)])
        self.attentions = transformers.build(1, in_channels)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self._run(self.resnets[0], hidden_states, temb)
        hidden_states = self._run(self.attentions[0], hidden_states, encoder_hidden_states)
        return self._run(self.resnets[1], hidden_states, temb)


# config name -> (class, whether it has transformers)
DOWN_BLOCKS = {"CrossAttnDownBlock3D": (DownBlock3D, True), "DownBlock3D": (DownBlock3D, False)}
UP_BLOCKS = {"CrossAttnUpBlock3D": (UpBlock3D, True), "UpBlock3D": (UpBlock3D, False)}
MID_BLOCKS = {"UNetMidBlock3DCrossAttn": (UNetMidBlock3DCrossAttn, True)}


def get_block(kind: dict[str, tuple[type, bool]], name: str, transformers: TransformerSettings, **kwargs) -> nn.Module:
    """Build a block by its config name (`CrossAttnDownBlock3D`, ...), with a clear error for unknown names."""
    if name not in kind:
        raise ValueError(f"unsupported block type {name!r}; expected one of {sorted(kind)}")
    block, attends = kind[name]
    return block(**kwargs, transformers=transformers if attends else None)
