"""The spatial self-attention across frames: the attention processors and the `Attention` module that keeps them.

Inside a transformer block tokens have layout `(batch*frames, tokens, channels)`, frames inner. The queries of
frame i are that frame's own tokens; where its keys and values come from is the module's `spatial_attention` rule:

- `sparse_causal` (Tune-A-Video): the tokens of frame 0 followed by those of frame i-1 (frame 0's "previous" frame
  is itself), the paper's `Q = W_q z_i, K = W_k [z_0, z_(i-1)], V = W_v [z_0, z_(i-1)]`;
- `first_frame` (Video-P2P's `FrameAttention`): the tokens of frame 0 only, `K = W_k z_0, V = W_v z_0`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


SPATIAL_ATTENTION = ("sparse_causal", "first_frame")


def _previous_frame_index(num_frames: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(num_frames, device=device) - 1).clamp(min=0)


def sparse_causal_context(hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """For every frame, its key/value tokens `[frame 0, frame i-1]`.

    `(batch*frames, tokens, channels)` -> `(batch*frames, 2*tokens, channels)`. Because the key and value
    projections are linear, projecting this context equals gathering the projected keys and values.
    """
    hidden_states = hidden_states.unflatten(0, (-1, num_frames))
    first = hidden_states[:, :1].expand_as(hidden_states)
    previous = hidden_states[:, _previous_frame_index(num_frames, hidden_states.device)]
    return torch.cat([first, previous], dim=2).flatten(0, 1)


def first_frame_context(hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """For every frame, its key/value tokens: frame 0's. `(batch*frames, tokens, channels)`, the same shape."""
    hidden_states = hidden_states.unflatten(0, (-1, num_frames))
    return hidden_states[:, :1].expand_as(hidden_states).flatten(0, 1)


class SparseCausalAttnProcessor:
    """The module's frame rule on top of any diffusers processor (plain maths, sliced, xformers, ...).

    The wrapped processor runs as cross-attention whose context is `sparse_causal_context(hidden_states)`, or
    `first_frame_context` under `spatial_attention="first_frame"`.
    """

    def __init__(self, processor=None):
        self.processor = processor if processor is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        if num_frames is None:
            raise ValueError("sparse-causal attention needs `num_frames`")
        frames_context = first_frame_context if attn.spatial_attention == "first_frame" else sparse_causal_context
        context = frames_context(hidden_states, num_frames)
        return self.processor(attn, hidden_states, encoder_hidden_states=context, attention_mask=attention_mask)


class SparseCausalAttnProcessor2_0:
    """The module's frame rule with `F.scaled_dot_product_attention`, the default.

    Keys and values are projected once per frame, not once per use. Frames 0 and 1 attend to `[frame 0, frame 0]`
    in the original; a softmax over a duplicated key set equals the softmax over one copy, so they attend to frame
    0's tokens alone: the same result with half the key/value tokens. Under `first_frame` every frame does.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        if num_frames is None:
            raise ValueError("sparse-causal attention needs `num_frames`")
        if attention_mask is not None:
            raise ValueError("sparse-causal attention does not take an attention mask")
        batch_frames, tokens, _ = hidden_states.shape
        heads = attn.heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            # (batch*frames, tokens, heads*dim) -> (batch, frames, heads, tokens, dim)
            return x.unflatten(-1, (heads, -1)).transpose(1, 2).unflatten(0, (-1, num_frames))

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            # SDPA's fused kernels want 4-D (batch, heads, tokens, dim) inputs
            out = F.scaled_dot_product_attention(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1))
            return out.unflatten(0, query.shape[:2])

        query = split_heads(attn.to_q(hidden_states))
        key = split_heads(attn.to_k(hidden_states))
        value = split_heads(attn.to_v(hidden_states))
        first_key, first_value = key[:, :1], value[:, :1]

        # frames 0 and 1 (every frame under first_frame): keys and values of frame 0 only
        head = num_frames if attn.spatial_attention == "first_frame" else min(num_frames, 2)
        outputs = [attend(query[:, :head], first_key.expand(-1, head, -1, -1, -1), first_value.expand(-1, head, -1, -1, -1))]
        if num_frames > head:
            # frames i >= 2: [frame 0, frame i-1]
            rest = num_frames - 2
            key_rest = torch.cat([first_key.expand(-1, rest, -1, -1, -1), key[:, 1:-1]], dim=3)
            value_rest = torch.cat([first_value.expand(-1, rest, -1, -1, -1), value[:, 1:-1]], dim=3)
            outputs.append(attend(query[:, 2:], key_rest, value_rest))
        hidden_states = torch.cat(outputs, dim=1)

        # (batch, frames, heads, tokens, dim) -> (batch*frames, tokens, heads*dim)
        hidden_states = hidden_states.flatten(0, 1).transpose(1, 2).reshape(batch_frames, tokens, -1)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class SparseCausalAttention(Attention):
    """diffusers `Attention` whose processor always keeps its frame rule, `spatial_attention` (one of
    `SPATIAL_ATTENTION`; the processors read it from here, so setting it switches the rule under any backend).

    Every way of switching backends (`set_attn_processor`, `set_default_attn_processor`,
    `enable_xformers_memory_efficient_attention`, attention slicing) ends in `set_processor`; a processor that
    is not sparse-causal is wrapped here, so the rule can never be dropped silently.
    """

    spatial_attention: str = "sparse_causal"

    def set_processor(self, processor) -> None:
        if not isinstance(processor, (SparseCausalAttnProcessor, SparseCausalAttnProcessor2_0)):
            if type(processor) is AttnProcessor2_0:
                processor = SparseCausalAttnProcessor2_0()
            else:
                processor = SparseCausalAttnProcessor(processor)
        super().set_processor(processor)
