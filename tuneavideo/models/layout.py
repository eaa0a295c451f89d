"""Tensor layouts of clips, in one place: the UNet and the pipeline work on `(batch, channels, frames, h, w)`, image
layers on `(batch*frames, channels, h, w)`, readers and writers on uint8 frames `(frames, H, W, 3)`."""

from __future__ import annotations

import numpy as np
import torch


def fold_frames(hidden_states: torch.Tensor) -> torch.Tensor:
    """`(batch, channels, frames, h, w)` -> `(batch*frames, channels, h, w)`, frames inner."""
    batch, channels, frames, height, width = hidden_states.shape
    return hidden_states.transpose(1, 2).reshape(batch * frames, channels, height, width)


def unfold_frames(hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`(batch*frames, channels, h, w)` -> `(batch, channels, frames, h, w)`."""
    return hidden_states.unflatten(0, (-1, num_frames)).transpose(1, 2)


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames `(frames, H, W, 3)` -> a clip `(1, 3, frames, H, W)` in [-1, 1], as the original scaled them
    (`x / 127.5 - 1`)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
