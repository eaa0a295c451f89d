"""Which frames of a clip are tuned and edited, and at what size (decoding itself is in `readers.py`).

The original sampled `range(sample_start_idx, num_frames, sample_frame_rate)[:n_sample_frames]` and silently
returned fewer frames from a short clip; here a short clip is an error that says which settings fit. It squashed
every clip to width x height; here a clip keeps its aspect ratio (`clip_size`), and the few rows or columns that
sides in multiples of 8 leave over are cut evenly from both edges (`even_crop`), so frames are never squashed.
"""

from __future__ import annotations

import math
from fractions import Fraction
from collections.abc import Callable, Iterator

import numpy as np

from ..errors import UserError
from .readers import Clip, FramesMissingError, frames_text


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


def tuned_window(num_frames: int, n_sample_frames: int, sample_start_idx: int, sample_frame_rate: int,
                 path: str = "clip") -> range:
    """The original's one window of tuned frames, as a range of source frame indices (checked to fit)."""
    sample_frame_indices(num_frames, n_sample_frames, sample_start_idx, sample_frame_rate, path)
    return range(sample_start_idx, sample_start_idx + n_sample_frames * sample_frame_rate, sample_frame_rate)


def window_starts(num_frames: int, n_sample_frames: int, sample_start_idx: int, sample_frame_rate: int,
                  sample_end_idx: int | None, path: str = "clip") -> range:
    """Every start of a window of `n_sample_frames` frames at `sample_frame_rate` that fits in
    `[sample_start_idx, sample_end_idx)` (the clip's end if None): the random windows of `window: random`."""
    end = num_frames if sample_end_idx is None else min(sample_end_idx, num_frames)
    # the window at sample_start_idx must fit; the message says what would (and when it is sample_end_idx, not the
    # clip, that is too short, says so)
    where = path if end == num_frames else f"{path} up to sample_end_idx={sample_end_idx}"
    sample_frame_indices(end, n_sample_frames, sample_start_idx, sample_frame_rate, where)
    return range(sample_start_idx, end - (n_sample_frames - 1) * sample_frame_rate)


def fit_size(source_width: int, source_height: int, long_side: int = 512, multiple: int = 8) -> tuple[int, int]:
    """The ``(width, height)`` to tune and edit a ``source_width`` x ``source_height`` clip at, keeping its aspect.

    Both sides are multiples of ``multiple`` (8: the VAE's factor, so latents are whole; the UNet takes latents of
    any size, passing its upsamplings the skip connections' sizes). The long side is ``long_side`` rounded down to a
    multiple (at least one multiple), the short side the nearest multiple to the source's ratio (at least one
    multiple). 16:9 at 512 gives ``(512, 288)``; what rounding leaves over is cut by `even_crop`.
    """
    if min(source_width, source_height, long_side, multiple) <= 0:
        raise ValueError(f"sizes must be positive, got source {source_width}x{source_height}, long side {long_side}, "
                         f"multiple {multiple}")
    long = max(multiple, long_side // multiple * multiple)
    ratio = min(source_width, source_height) / max(source_width, source_height)
    short = max(multiple, math.floor(long * ratio / multiple + 0.5) * multiple)  # half rounds up, not to even
    return (long, short) if source_width >= source_height else (short, long)


def clip_size(source_width: int, source_height: int, width: int, height: int) -> tuple[int, int]:
    """The size a clip is tuned and edited at, given the configured `width` x `height` (multiples of 8).

    A clip of the configured aspect ratio is resized to exactly that size, as the original did (a square clip at
    480x480 stays 480x480: the UNet takes any multiple of 8). Any other clip keeps its own aspect ratio rather than
    being squashed: `fit_size` with the long side `max(width, height)`.
    """
    if source_width * height == source_height * width:
        return width, height
    return fit_size(source_width, source_height, max(width, height))


def even_crop(source_width: int, source_height: int, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The middle of a ``source_width`` x ``source_height`` frame with the aspect ratio of `size`, as ``(x, y, width,
    height)``: the rows or columns that `fit_size`'s multiples of 8 leave over, cut evenly from both edges, so that a
    frame is resized without being squashed. None when the aspects agree to the pixel."""
    width, height = size
    if source_width * height > source_height * width:  # the source is wider: columns are cut
        kept = round(source_height * width / height)
        return None if kept >= source_width else ((source_width - kept) // 2, 0, kept, source_height)
    kept = round(source_width * height / width)
    return None if kept >= source_height else (0, (source_height - kept) // 2, source_width, kept)


def decode_frames(clip: Clip, frames: range, size: tuple[int, int],
                  check: Callable[[int], object]) -> Iterator[np.ndarray]:
    """Frames `frames` of `clip` at `size`, streamed, the middle of each cut to the aspect of `size` (`even_crop`).

    A file can list more frames than decode (truncated or damaged); then `check(decodable_count)` raises the
    ClipTooShortError that says which settings fit the frames that do decode, and this adds why.
    """
    try:
        yield from clip.frames(size, frames.start, frames.stop, frames.step,
                               even_crop(clip.info.width, clip.info.height, size))
    except FramesMissingError as err:
        note = (f" (only {err.num_frames} of the {clip.info.num_frames} frames it lists decode: the file is "
                "truncated or damaged)")
        try:
            check(err.num_frames)
        except ClipTooShortError as short:
            raise ClipTooShortError(f"{short}{note}") from err
        raise


def shown_at_constant_rate(times: list[float], end: float) -> tuple[Fraction, list[int]]:
    """A constant frame rate for frames shown at `times` (seconds from the first, increasing) until `end`, and how
    many times each frame is repeated at it, so that each appears at its own time, within half a frame.

    The rate is that of the closest two frames, so no frame is dropped; a variable-frame-rate clip (phones) becomes
    a constant-rate one that players, editors and the sound all agree on.
    """
    gaps = [b - a for a, b in zip(times, times[1:])] or [end - times[0]]
    rate = Fraction(1 / min(gaps)).limit_denominator(1001)
    starts: list[int] = []
    for t in times:
        starts.append(max(round(t * rate), starts[-1] + 1 if starts else 0))
    starts.append(max(round(end * rate), starts[-1] + 1))
    return rate, [b - a for a, b in zip(starts, starts[1:])]
