"""Overlapping windows over a clip longer than the tuned one.

The UNet was tuned on clips of `n_sample_frames` frames: its temporal attention saw that many frames, and its
GroupNorm statistics pool over them. A longer clip is denoised (and inverted) window by window, each window of the
tuned length; every frame's noise prediction is the weighted mean of the windows that hold it, with weights that
fall towards a window's edges (1, 2, ..., 2, 1, as FreeNoise's "pyramid"), so neighbouring windows fade into each
other. Sparse-causal attention keeps one anchor for the whole clip: every window after the first is run with the
clip's frame 0 in front of its own frames (Text2Video-Zero's chunking), so each window attends to the same first
frame and the look set there carries to the last frame. The anchor's prediction in those windows is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """The clip frames one UNet call sees, in order; `frames[first_member:]` are the window's own frames (before
    them, the anchor frame 0), and `weights` their share of each frame's fused prediction."""

    frames: list[int]
    first_member: int
    weights: torch.Tensor  # float64, one per own frame; over all windows, a frame's weights sum to 1


def plan_windows(num_frames: int, size: int | None = None, overlap: int | None = None) -> list[Window]:
    """Windows of `size` frames (None: one window of the whole clip, as without windows; so is a clip of at most
    `size` frames) whose own frames overlap by at least `overlap` frames (None: a quarter window); the last window
    ends at the clip's last frame. Every frame is in at least one window; every window holds `size` frames, so the
    UNet always sees the tuned length.

    Raises:
        ValueError: `size` < 2 or `overlap` outside `[0, size - 2]` for a clip longer than `size`.
    """
    size = size or num_frames
    overlap = size // 4 if overlap is None else overlap
    if num_frames <= size:
        return [Window(list(range(num_frames)), 0, torch.ones(num_frames, dtype=torch.float64))]
    if size < 2 or not 0 <= overlap <= size - 2:
        raise ValueError(f"windows of {size} frames need size >= 2 and 0 <= overlap <= {size - 2}, got {overlap}")
    members = [range(0, size)]
    own = size - 1  # windows after the first hold the anchor and size - 1 frames of their own
    while members[-1].stop < num_frames:
        start = min(members[-1].stop - overlap, num_frames - own)
        members.append(range(start, start + own))
    # pyramid weights 1, 2, ..., 2, 1 over each window's own frames, normalised per frame over windows
    raw = [torch.minimum(torch.arange(1, len(m) + 1), torch.arange(len(m), 0, -1)).double() for m in members]
    total = torch.zeros(num_frames, dtype=torch.float64)
    for frames, weights in zip(members, raw):
        total[frames.start : frames.stop] += weights
    windows = []
    for index, (frames, weights) in enumerate(zip(members, raw)):
        anchor = [] if index == 0 else [0]
        windows.append(Window(anchor + list(frames), len(anchor), weights / total[frames.start : frames.stop]))
    return windows


def fuse_windows(predict: Callable[[list[int]], torch.Tensor], like: torch.Tensor,
                 windows: list[Window]) -> torch.Tensor:
    """The windows' predictions fused into one for the clip, shaped as `like` `(batch, channels, frames, ...)`:
    `predict(frames)` (called once per window, in order) gives the prediction for those frames of the clip,
    `(batch, channels, len(frames), ...)`; each frame's is the weighted sum of its windows'. Noise predictions are
    fused this way, and so are the local blend's attention maps."""
    fused = torch.zeros_like(like)
    for window in windows:
        prediction = predict(window.frames)[:, :, window.first_member :]
        weights = window.weights.to(prediction.device, prediction.dtype).view(1, 1, -1, 1, 1)
        # a frame in one window only has weight 1.0 there: 0 + x * 1.0 is x, bit for bit
        fused[:, :, window.frames[window.first_member :]] += prediction * weights
    return fused
