"""Prompt-to-Prompt attention control on the inflated UNet, as Video-P2P applies it.

`attention_control(unet, control)` installs `ControlledAttnProcessor`s on every cross-attention (`attn2`) and
temporal attention (`attn_temp`) of a `UNet3DConditionModel` and restores the UNet's own processors on exit; the
spatial sparse-causal `attn1` keeps its processor (Video-P2P hooks only its `CrossAttention` modules, which are
these two). The UNet then runs on a batch of four clips, `[unconditional source, unconditional target,
conditional source, conditional target]`; only the conditional pair is controlled:

- cross-attention, for steps `< int(cross_replace_steps * (steps + 1))` (the rows of Video-P2P's alpha table):
  the target's maps are made from the source's by the `PromptEdit` (word swap or refinement), then reweighted;
  later the target keeps its own maps;
- temporal attention, for steps `< int(self_replace_steps * steps)`: the target's maps are the source's.

Probabilities are a per-row softmax (`Attention.get_attention_scores`); Video-P2P's softmax subtracts the max of the
whole tensor, whose rows can underflow to 0/0 where attention is sharp, and equals this one wherever it is finite.

For the local blend the control keeps only the blend words' maps: at the cross-attentions whose queries are the
latent two downsamplings down (`mask_map_size`, the 16x16 level at 512x512, as Video-P2P's mask; at SD's layout that is
`down_blocks.2` and `up_blocks.1`), each map, after its edit, is summed over the blend words' tokens and averaged
over heads, then over those layers, per frame: `(2, frames, h, w)` per UNet call (`take_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention

from .prompt_alignment import PromptEdit


def mask_map_size(latent_height: int, latent_width: int) -> tuple[int, int]:
    """The spatial size of the UNet level whose cross-attention maps make the mask: two stride-2 downsamplings
    (each `ceil(n / 2)`) below the latent, so any size and aspect ratio works."""
    return tuple(math.ceil(math.ceil(n / 2) / 2) for n in (latent_height, latent_width))


class AttentionControl:
    """What the controlled processors do at the current denoising `step` (set by the sampler before each UNet
    call), and the blend words' maps they gather."""

    def __init__(
        self,
        edit: PromptEdit,
        num_steps: int,
        map_size: tuple[int, int],
        cross_replace_steps: float = 0.2,
        self_replace_steps: float = 0.5,
    ):
        self.edit = edit
        self.cross_steps = int(cross_replace_steps * (num_steps + 1))
        self.self_steps = int(self_replace_steps * num_steps)
        self.map_size = map_size
        self.step = 0
        self._maps = None  # sum over this call's mask layers of the blend words' maps, (2, frames, queries)
        self._layers = 0

    def cross(self, probs: torch.Tensor, heads: int) -> torch.Tensor:
        """Cross-attention probabilities `(4*frames*heads, queries, text tokens)`, edited in place."""
        clips = probs.unflatten(0, (2, 2, -1, heads))  # (uncond/cond, source/target, frames, heads, q, k)
        source, target = clips[1, 0], clips[1, 1]
        if self.step < self.cross_steps:
            edit = self.edit
            mapping, alphas, reweight = (x.to(probs) for x in (edit.mapping, edit.alphas, edit.reweight))
            clips[1, 1] = ((source @ mapping) * alphas + target * (1 - alphas)) * reweight
        if self.edit.blend is not None and probs.shape[1] == math.prod(self.map_size):
            # Video-P2P's store holds the maps after their edit (it keeps a view of the edited tensor)
            words = self.edit.blend.to(probs.device, torch.float32)
            maps = torch.einsum("bfhqk,bk->bfq", clips[1].float(), words) / heads
            self._maps = maps if self._maps is None else self._maps + maps
            self._layers += 1
        return probs

    def temporal(self, probs: torch.Tensor) -> torch.Tensor:
        """Temporal attention probabilities `(4*positions*heads, frames, frames)`, edited in place."""
        if self.step < self.self_steps:
            clips = probs.unflatten(0, (2, 2, -1))
            clips[1, 1] = clips[1, 0]
        return probs

    def take_maps(self) -> torch.Tensor:
        """The blend words' maps of the UNet call just made, `(2, frames, h, w)` (source, target), averaged over
        heads and mask layers; the gathered maps are then cleared."""
        maps = (self._maps / self._layers).unflatten(-1, self.map_size)
        self._maps, self._layers = None, 0
        return maps


class ControlledAttnProcessor:
    """Plain attention (diffusers' `AttnProcessor` maths) whose probabilities pass through an `AttentionControl`."""

    def __init__(self, control: AttentionControl, temporal: bool):
        self.control = control
        self.temporal = temporal

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self.control.temporal(probs) if self.temporal else self.control.cross(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](hidden_states))


@contextmanager
def attention_control(unet: torch.nn.Module, control: AttentionControl) -> Iterator[AttentionControl]:
    """`unet`'s `attn2` and `attn_temp` modules run through `control` inside the block; their own processors are
    restored after it."""
    hooked = {name: module for name, module in unet.named_modules() if name.endswith((".attn2", ".attn_temp"))}
    saved = {name: module.processor for name, module in hooked.items()}
    try:
        for name, module in hooked.items():
            module.set_processor(ControlledAttnProcessor(control, temporal=name.endswith(".attn_temp")))
        yield control
    finally:
        for name, module in hooked.items():
            module.set_processor(saved[name])
