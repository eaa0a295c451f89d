"""Frame-wise convolutions and the inflated ResNet block.

Every tensor here is a clip latent of layout `(batch, channels, frames, height, width)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import fold_frames, unfold_frames


class InflatedConv3d(nn.Conv2d):
    """A 2D convolution applied to every frame on its own: no temporal kernel, SD weight shapes."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        num_frames = hidden_states.shape[2]
        return unfold_frames(super().forward(fold_frames(hidden_states)), num_frames)


class Downsample3D(nn.Module):
    """Stride-2 frame-wise convolution (SD's `downsamplers.0.conv`)."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.conv = InflatedConv3d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class Upsample3D(nn.Module):
    """Nearest 2x spatial upsampling of every frame, then a frame-wise 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = InflatedConv3d(channels, out_channels or channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int, int] | None = None) -> torch.Tensor:
        dtype = hidden_states.dtype
        # nearest interpolation has no bf16 kernel on some torch builds; the original upcast too
        if dtype == torch.bfloat16:
            hidden_states = hidden_states.float()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        else:
            # `(frames, h, w)` of the skip connection, for latents whose size is not a multiple of 8
            hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        return self.conv(hidden_states.to(dtype))


class ResnetBlock3D(nn.Module):
    """SD's ResNet block on clips.

    Both GroupNorms see the 5-D tensor, so their statistics are pooled over all frames of a clip (as in the
    original): generating a different number of frames than were tuned changes the statistics.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int = 1280,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = InflatedConv3d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = InflatedConv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = InflatedConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(F.silu(self.norm1(input_tensor)))
        # one time embedding per clip, broadcast over frames and pixels
        hidden_states = hidden_states + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        hidden_states = self.conv2(self.dropout(F.silu(self.norm2(hidden_states))))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor
