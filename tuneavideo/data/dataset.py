"""The single training clip: decode once, sample frames, resize, scale to [-1, 1].

Three interchangeable readers (decord, PyAV, imageio-ffmpeg) decode at the clip's native size; resizing is done here
in torch so every reader yields the same frames. Reading itself is in `readers.py`. The original used decord only, resized inside the decoder, re-decoded
the clip on every step and silently returned fewer frames when the clip was too short; all three are fixed here.
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UserError
from .readers import (
    VIDEO_BACKENDS,
    FramesMissingError,
    VideoInfo,
    VideoReadError,
    backend_available,
    frames_text,
    read_video_frames,
    select_backend,
    video_info,
)

__all__ = [
    "VIDEO_BACKENDS", "ClipTooShortError", "backend_available", "TuneAVideoDataset", "VideoInfo", "VideoReadError", "fit_size",
    "read_video_frames", "resize_frames", "sample_frame_indices", "select_backend", "video_info",
]

class ClipTooShortError(UserError):
    """The clip has fewer frames than the sampling settings ask for; the message says which settings would fit."""


def sample_frame_indices(
    num_frames: int, n_sample_frames: int, sample_start_idx: int = 0, sample_frame_rate: int = 1, path: str = "clip"
) -> list[int]:
    """Indices ``range(sample_start_idx, num_frames, sample_frame_rate)[:n_sample_frames]``, all of them or an error.

    Raises:
        ClipTooShortError: fewer than ``n_sample_frames`` indices fit; the message names settings that would fit.
    """
    if n_sample_frames < 1 or sample_frame_rate < 1 or sample_start_idx < 0:
        raise ValueError(f"need n_sample_frames >= 1, sample_frame_rate >= 1 and sample_start_idx >= 0, got "
                         f"{n_sample_frames}, {sample_frame_rate}, {sample_start_idx}")
    if sample_start_idx >= num_frames:
        raise ClipTooShortError(
            f"{path}: has {frames_text(num_frames)}, so sample_start_idx={sample_start_idx} is past its end; "
            f"use sample_start_idx<={num_frames - 1}"
        )
    indices = list(range(sample_start_idx, num_frames, sample_frame_rate))[:n_sample_frames]
    if len(indices) == n_sample_frames:
        return indices
    last_needed = sample_start_idx + (n_sample_frames - 1) * sample_frame_rate
    fits = [f"n_sample_frames<={len(indices)}"]
    max_rate = (num_frames - 1 - sample_start_idx) // (n_sample_frames - 1)  # n_sample_frames >= 2 here
    if max_rate >= 1:
        fits.append(f"sample_frame_rate<={max_rate}")
    max_start = num_frames - 1 - (n_sample_frames - 1) * sample_frame_rate
    if max_start >= 0:
        fits.append(f"sample_start_idx<={max_start}")
    raise ClipTooShortError(
        f"{path}: has {frames_text(num_frames)} but n_sample_frames={n_sample_frames}, "
        f"sample_start_idx={sample_start_idx}, sample_frame_rate={sample_frame_rate} needs frame {last_needed}; use "
        + " or ".join(fits)
    )


def fit_size(source_width: int, source_height: int, long_side: int = 512, multiple: int = 64) -> tuple[int, int]:
    """The ``(width, height)`` to tune and edit a ``source_width`` x ``source_height`` clip at, keeping its aspect.

    Both sides are multiples of ``multiple`` (64: the VAE's 8x and the UNet's three 2x downsamplings must divide
    them). The long side is ``long_side`` rounded down to a multiple (at least one multiple), the short side the
    nearest multiple to the source's ratio (at least one multiple). A square source gives ``(L, L)``, as before;
    16:9 at 512 gives ``(512, 320)``.
    """
    if min(source_width, source_height, long_side, multiple) <= 0:
        raise ValueError(f"sizes must be positive, got source {source_width}x{source_height}, long side {long_side}, "
                         f"multiple {multiple}")
    long = max(multiple, long_side // multiple * multiple)
    ratio = min(source_width, source_height) / max(source_width, source_height)
    short = max(multiple, math.floor(long * ratio / multiple + 0.5) * multiple)  # half rounds up, not to even
    return (long, short) if source_width >= source_height else (short, long)


def resize_frames(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Resize ``(frames, H, W, 3)`` uint8 to exactly ``width`` x ``height`` (aspect ratio not kept, as in the original).

    Returns:
        uint8 tensor ``(frames, 3, height, width)``.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if video.shape[-2:] == (height, width):
        return video.contiguous()
    # Antialiased bilinear avoids the aliasing of plain bilinear when downscaling (e.g. 718 -> 512 source clips).
    resized = F.interpolate(video.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    # Back to uint8 so the values match what a decoder-side resize gave the original (x / 127.5 - 1 of integers).
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class TuneAVideoDataset(Dataset):
    """One video and its prompt, as a dataset of length 1.

    The clip is decoded, sampled and resized once in ``__init__`` (so a too-short clip fails before training starts)
    and kept as uint8; ``__getitem__`` only converts it.

    With ``keep_aspect`` (what training and editing use) the frames are resized to
    ``fit_size(source width, source height, max(width, height))``, so a non-square clip is not squashed; without it
    to exactly ``width`` x ``height``, as the original did. ``self.width`` and ``self.height`` hold the size used.

    Items are ``{"pixel_values": float32 (frames, 3, height, width) in [-1, 1], "prompt_ids": prompt_ids}``;
    ``prompt_ids`` is left out while it is None (it can be assigned after construction, as the original did).
    """

    def __init__(
        self,
        video_path: str | os.PathLike,
        prompt: str,
        width: int,
        height: int,
        n_sample_frames: int,
        sample_start_idx: int,
        sample_frame_rate: int,
        prompt_ids: torch.Tensor | None = None,
        *,
        backend: str | None = None,
        keep_aspect: bool = False,
    ) -> None:
        self.video_path = os.fspath(video_path)
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.backend = select_backend(backend)
        info = video_info(self.video_path, self.backend)
        self.source_fps = info.fps  # sampled clip plays at source_fps / sample_frame_rate
        self.frame_indices = sample_frame_indices(
            info.num_frames, n_sample_frames, sample_start_idx, sample_frame_rate, self.video_path
        )
        if keep_aspect:
            width, height = fit_size(info.width, info.height, max(width, height))
        self.width, self.height = width, height
        try:
            frames = read_video_frames(self.video_path, self.frame_indices, self.backend)
        except FramesMissingError as err:
            if err.num_frames >= info.num_frames:
                raise
            # The file lists more frames than decode (truncated or damaged): say what fits the frames that do.
            note = (f" (only {err.num_frames} of the {info.num_frames} frames it lists decode: the file is truncated "
                    "or damaged)")
            try:
                sample_frame_indices(err.num_frames, n_sample_frames, sample_start_idx, sample_frame_rate,
                                     self.video_path)
            except ClipTooShortError as short:
                raise ClipTooShortError(f"{short}{note}") from err
            raise  # not reached: a frame index was past the decodable ones, so the sampling above cannot fit
        self.frames = resize_frames(frames, width, height)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index != 0:
            raise IndexError(f"TuneAVideoDataset has one item, got index {index}")
        item = {"pixel_values": self.frames.float() / 127.5 - 1.0}
        if self.prompt_ids is not None:
            item["prompt_ids"] = self.prompt_ids
        return item

