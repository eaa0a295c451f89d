"""The spatial transformer of SD, inflated: sparse-causal self-attention, cross-attention, feed-forward, then
attention over time."""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from .layout import fold_frames, unfold_frames
from .attention import SparseCausalAttention


class BasicTransformerBlock(nn.Module):
    """One Tune-A-Video transformer block on tokens `(batch*frames, tokens, dim)`.

    Sub-layers, each pre-normed and residual: sparse-causal self-attention (`attn1`), cross-attention to the text
    (`attn2`), GEGLU feed-forward (`ff`), and last, self-attention across frames at every spatial position
    (`attn_temp`, with its own LayerNorm and no positional encoding: frame order reaches it only through attn1).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        dropout: float = 0.0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        attention = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout, bias=False)
        self.attn1 = SparseCausalAttention(query_dim=dim, upcast_attention=upcast_attention, **attention)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            query_dim=dim, cross_attention_dim=cross_attention_dim, upcast_attention=upcast_attention, **attention
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)
        self.attn_temp = Attention(query_dim=dim, upcast_attention=upcast_attention, **attention)
        self.norm_temp = nn.LayerNorm(dim)
        # Zero the temporal output projection, weight and bias, so an untuned inflated model is the image model on
        # every frame. The original zeroed only the weight and left the bias at its random default, so its
        # temporal branch added a small constant per channel at initialisation.
        nn.init.zeros_(self.attn_temp.to_out[0].weight)
        nn.init.zeros_(self.attn_temp.to_out[0].bias)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), num_frames=num_frames)
        hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states)
        hidden_states = hidden_states + self.ff(self.norm3(hidden_states))

        # (batch*frames, tokens, dim) -> (batch*tokens, frames, dim): a sequence over time per position
        batch_frames, tokens, dim = hidden_states.shape
        hidden_states = hidden_states.unflatten(0, (-1, num_frames)).transpose(1, 2).reshape(-1, num_frames, dim)
        hidden_states = hidden_states + self.attn_temp(self.norm_temp(hidden_states))
        return hidden_states.unflatten(0, (-1, tokens)).transpose(1, 2).reshape(batch_frames, tokens, dim)


class Transformer3DModel(nn.Module):
    """SD's `Transformer2DModel` applied to every frame of a clip `(batch, channels, frames, height, width)`.

    Its GroupNorm runs per frame (frames folded into the batch), unlike the ResNet GroupNorms.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        cross_attention_dim: int,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, num_attention_heads, attention_head_dim, cross_attention_dim, dropout, upcast_attention
                )
            ]
        )

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        num_frames = hidden_states.shape[2]
        hidden_states = fold_frames(hidden_states)
        batch_frames, _, height, width = hidden_states.shape
        # the text conditions every frame of its clip: (batch, text tokens, dim) -> (batch*frames, ...)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)

        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)

        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, num_frames)

        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.transpose(1, 2).unflatten(2, (height, width))
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states.contiguous())
        return unfold_frames(hidden_states + residual, num_frames)
