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

The control plugs into the pipeline's one denoising loop twice: as the UNet's attention processors (inside
`attention_control`) and as its step-end hook (`TuneAVideoPipeline(..., callback_on_step_end=control)`), which moves
it to the next step and applies its `LocalBlend`, if any, to the latents.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention

from .prompt_alignment import PromptEdit
from .windows import Window, fuse_windows


def mask_map_size(latent_height: int, latent_width: int) -> tuple[int, int]:
    """The spatial size of the UNet level whose cross-attention maps make the mask: two stride-2 downsamplings
    (each `ceil(n / 2)`) below the latent, so any size and aspect ratio works."""
    return tuple(math.ceil(math.ceil(n / 2) / 2) for n in (latent_height, latent_width))


def blend_masks(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """The local-blend mask from the blend words' accumulated maps `(2, frames, mh, mw)` (source, target): each
    max-pooled (3x3, stride 1), resized (nearest) to the latent `size`, divided by its frame's maximum and
    thresholded; the union of the two, `(frames, h, w)` bool."""
    masks = F.interpolate(F.max_pool2d(maps, 3, stride=1, padding=1), size=size, mode="nearest")
    masks = masks / masks.amax(dim=(2, 3), keepdim=True) > threshold
    return masks[0] | masks[1]


class LocalBlend:
    """Video-P2P's local blend of a batch `[source, target]`: after every step from step `start_step + 1` on
    (counting from 1), the target's latents outside the mask are the source's,
    `target = source + mask * (target - source)`.

    The mask (`blend_masks`, `threshold`) comes from the blend words' maps summed over the steps so far; a frame's
    maps of one step are those of the windows (`windows`, the pipeline's) that hold it, weighted as its noise
    predictions are (`fuse_windows`). `mask` is the last one applied, `(frames, h, w)` bool (None before the first).
    """

    def __init__(self, windows: list[Window], start_step: int, threshold: float):
        self.windows = windows
        self.start_step = start_step
        self.threshold = threshold
        self.maps = None  # (source/target, 1, frames, mh, mw), summed over the steps
        self.mask = None

    def __call__(self, step: int, latents: torch.Tensor, window_maps: list[torch.Tensor]) -> torch.Tensor:
        """`latents` `(2, 4, frames, h, w)` after step `step`, blended in place; `window_maps` the maps of each
        window's UNet call of this step, in window order, `(2, frames of the window, mh, mw)`."""
        if self.maps is None:
            self.maps = torch.zeros(2, 1, latents.shape[2], *window_maps[0].shape[-2:], device=latents.device)
        calls = iter(window_maps)
        self.maps += fuse_windows(lambda frames: next(calls).unsqueeze(1), self.maps, self.windows)
        if step + 1 > self.start_step:
            self.mask = blend_masks(self.maps.squeeze(1), latents.shape[-2:], self.threshold)
            latents[1] = latents[0] + self.mask.to(latents) * (latents[1] - latents[0])
        return latents


class AttentionControl:
    """What the controlled processors do at the current denoising `step`, the blend words' maps they gather, and,
    as the pipeline's step-end hook, the `local_blend` (None: none) those maps drive."""

    def __init__(
        self,
        edit: PromptEdit,
        num_steps: int,
        map_size: tuple[int, int],
        cross_replace_steps: float = 0.2,
        self_replace_steps: float = 0.5,
        local_blend: LocalBlend | None = None,
    ):
        self.edit = edit
        self.cross_steps = int(cross_replace_steps * (num_steps + 1))
        self.self_steps = int(self_replace_steps * num_steps)
        self.map_size = map_size
        self.local_blend = local_blend
        self.step = 0
        self._maps = None  # sum over this call's mask layers of the blend words' maps, (2, frames, queries)
        self._layers = 0
        self._call_maps = []  # the blend words' maps of each UNet call of this step (`take_maps`), in call order

    def __call__(self, pipeline: DiffusionPipeline, step: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        """The pipeline's step-end hook (`callback_on_step_end`, given "latents"): the next UNet calls are of step
        `step + 1`; with a local blend, the latents blended by this step's maps."""
        self.step = step + 1
        window_maps, self._call_maps = self._call_maps, []
        if self.local_blend is None:
            return {}
        return {"latents": self.local_blend(step, callback_kwargs["latents"], window_maps)}

    def end_call(self) -> None:
        """After each UNet call (a forward hook of `attention_control`): keep the call's blend-word maps."""
        if self._maps is not None:
            self._call_maps.append(self.take_maps())

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
    """`unet`'s `attn2` and `attn_temp` modules run through `control` inside the block, and `control.end_call()`
    follows every UNet call; their own processors are restored after it."""
    hooked = {name: module for name, module in unet.named_modules() if name.endswith((".attn2", ".attn_temp"))}
    saved = {name: module.processor for name, module in hooked.items()}
    call_ends = unet.register_forward_hook(lambda *_: control.end_call())
    try:
        for name, module in hooked.items():
            module.set_processor(ControlledAttnProcessor(control, temporal=name.endswith(".attn_temp")))
        yield control
    finally:
        call_ends.remove()
        for name, module in hooked.items():
            module.set_processor(saved[name])
