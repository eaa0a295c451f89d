"""Down, mid and up blocks of the inflated UNet, with SD's attribute names so SD weights load by name.

Every block keeps a `gradient_checkpointing` flag that `ModelMixin.enable_gradient_checkpointing` sets, together
with `_gradient_checkpointing_func` (non-reentrant by default in diffusers). Non-reentrant checkpointing gives
gradients to trainable layers even when the block's inputs need none; the original's reentrant checkpointing did
not, and silently froze the six down-block transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import Downsample3D, ResnetBlock3D, Upsample3D
from .transformer_3d import Transformer3DModel


class _CheckpointedBlock(nn.Module):
    gradient_checkpointing = False

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)


def _transformers(
    count: int,
    heads: int,
    cross_attention_dim: int,
    out_channels: int,
    resnet_groups: int = 32,
    use_linear_projection: bool = False,
    upcast_attention: bool = False,
    **_,
) -> nn.ModuleList:
    # SD's `attention_head_dim` config value is the number of heads; each head gets channels / heads
    return nn.ModuleList(
        [
            Transformer3DModel(
                heads, out_channels // heads, out_channels, cross_attention_dim, resnet_groups,
                use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
            )
            for _ in range(count)
        ]
    )


class DownBlock3D(_CheckpointedBlock):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        **_,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_groups, resnet_eps)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, padding=downsample_padding)]) if add_downsample else None

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        output_states = ()
        for index, resnet in enumerate(self.resnets):
            hidden_states = self._run(resnet, hidden_states, temb)
            if hasattr(self, "attentions"):
                hidden_states = self._run(self.attentions[index], hidden_states, encoder_hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class CrossAttnDownBlock3D(DownBlock3D):
    """`DownBlock3D` with a transformer after every ResNet."""

    def __init__(self, *, num_attention_heads: int = 8, cross_attention_dim: int = 1280, **kwargs):
        super().__init__(**kwargs)
        self.attentions = _transformers(len(self.resnets), num_attention_heads, cross_attention_dim, **kwargs)


class UpBlock3D(_CheckpointedBlock):
    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        add_upsample: bool = True,
        **_,
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
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        upsample_size: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        for index, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - index]
            hidden_states = self._run(resnet, torch.cat([hidden_states, skip], dim=1), temb)
            if hasattr(self, "attentions"):
                hidden_states = self._run(self.attentions[index], hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock3D(UpBlock3D):
    """`UpBlock3D` with a transformer after every ResNet."""

    def __init__(self, *, num_attention_heads: int = 8, cross_attention_dim: int = 1280, **kwargs):
        super().__init__(**kwargs)
        self.attentions = _transformers(len(self.resnets), num_attention_heads, cross_attention_dim, **kwargs)


class UNetMidBlock3DCrossAttn(_CheckpointedBlock):
    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        num_attention_heads: int = 8,
        cross_attention_dim: int = 1280,
        **transformer_kwargs,
    ):
        super().__init__()
        resnet = dict(temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps, output_scale_factor=output_scale_factor)
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels, **resnet), ResnetBlock3D(in_channels, **resnet)])
        self.attentions = _transformers(
            1, num_attention_heads, cross_attention_dim, in_channels, resnet_groups, **transformer_kwargs
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self._run(self.resnets[0], hidden_states, temb)
        hidden_states = self._run(self.attentions[0], hidden_states, encoder_hidden_states)
        return self._run(self.resnets[1], hidden_states, temb)


DOWN_BLOCKS = {"CrossAttnDownBlock3D": CrossAttnDownBlock3D, "DownBlock3D": DownBlock3D}
UP_BLOCKS = {"CrossAttnUpBlock3D": CrossAttnUpBlock3D, "UpBlock3D": UpBlock3D}
MID_BLOCKS = {"UNetMidBlock3DCrossAttn": UNetMidBlock3DCrossAttn}


def get_block(kind: dict[str, type], name: str, **kwargs) -> nn.Module:
    """Build a block by its config name (`CrossAttnDownBlock3D`, ...), with a clear error for unknown names."""
    if name not in kind:
        raise ValueError(f"unsupported block type {name!r}; expected one of {sorted(kind)}")
    return kind[name](**kwargs)
