"""The single training clip: decode once, sample frames, resize, scale to [-1, 1].

Three interchangeable readers (decord, PyAV, imageio-ffmpeg) decode at the clip's native size; resizing is done here
in torch so every reader yields the same frames. The original used decord only, resized inside the decoder, re-decoded
the clip on every step and silently returned fewer frames when the clip was too short; all three are fixed here.
"""

import importlib
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UserError

# Reader names in order of preference, and the module each needs.
VIDEO_BACKENDS = ("decord", "pyav", "imageio")
_BACKEND_MODULES = {"decord": "decord", "pyav": "av", "imageio": "imageio_ffmpeg"}


class VideoReadError(UserError):
    """A file is missing or cannot be decoded as a video; the message is one line naming the file."""


class ClipTooShortError(UserError):
    """The clip has fewer frames than the sampling settings ask for; the message says which settings would fit."""


class VideoInfo(NamedTuple):
    """Basic facts about a video stream."""

    num_frames: int
    fps: float
    width: int
    height: int


def select_backend(preferred: str | None = None) -> str:
    """Return the reader to use: ``preferred`` if given, else the first importable of decord, PyAV, imageio-ffmpeg.

    Raises:
        ImportError: ``preferred`` (or, without it, every reader) cannot be imported.
    """
    if preferred is not None and preferred not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {preferred!r}; choose from {', '.join(VIDEO_BACKENDS)}")
    for name in (preferred,) if preferred else VIDEO_BACKENDS:
        try:
            importlib.import_module(_BACKEND_MODULES[name])
        except ImportError:
            continue
        return name
    wanted = preferred or "any of " + ", ".join(_BACKEND_MODULES.values())
    raise ImportError(f"no video reader available: install {wanted}")


def video_info(path: str | os.PathLike, backend: str | None = None) -> VideoInfo:
    """Return ``(num_frames, fps, width, height)`` of the first video stream of ``path``."""
    path = _checked_path(path)
    return _backend_functions(select_backend(backend))[1](path)


def read_video_frames(
    path: str | os.PathLike, indices: Sequence[int] | None = None, backend: str | None = None
) -> np.ndarray:
    """Decode frames ``indices`` (all frames if None) at native size.

    Returns:
        uint8 array ``(frames, height, width, 3)``, RGB, in the order of ``indices``.
    """
    path = _checked_path(path)
    if indices is not None and len(indices) == 0:
        raise ValueError("indices must name at least one frame (or be None for all frames)")
    return _backend_functions(select_backend(backend))[0](path, None if indices is None else list(indices))


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
            f"{path}: has {num_frames} frames, so sample_start_idx={sample_start_idx} is past its end; "
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
        f"{path}: has {num_frames} frames but n_sample_frames={n_sample_frames}, sample_start_idx={sample_start_idx}, "
        f"sample_frame_rate={sample_frame_rate} needs frame {last_needed}; use " + " or ".join(fits)
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
        frames = read_video_frames(self.video_path, self.frame_indices, self.backend)
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


# Readers. Each takes a checked path (and a list of indices or None) and raises VideoReadError naming the file.

ReadFn = Callable[[str, list[int] | None], np.ndarray]
InfoFn = Callable[[str], VideoInfo]


def _checked_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such video file")
    return path


def _backend_functions(name: str) -> tuple[ReadFn, InfoFn]:
    match name:
        case "decord":
            return _read_decord, _info_decord
        case "pyav":
            return _read_pyav, _info_pyav
        case "imageio":
            return _read_imageio, _info_imageio
    raise ValueError(f"unknown video backend {name!r}")


def _not_a_video(path: str, err: Exception) -> VideoReadError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return VideoReadError(f"{path}: cannot be read as a video ({detail})")


def _take(path: str, frames: dict[int, np.ndarray], indices: list[int], count: int) -> np.ndarray:
    """Stack ``frames`` in ``indices`` order; the streaming readers call this after decoding ``count`` frames."""
    missing = [i for i in indices if i not in frames]
    if missing:
        raise VideoReadError(f"{path}: has {count} frames, cannot read frame {missing[0]}")
    return np.stack([frames[i] for i in indices])


def _open_decord(path: str):
    import decord

    try:
        # No width/height here (unlike the original): resizing is done by resize_frames for every backend alike.
        return decord.VideoReader(path)
    except (RuntimeError, decord.DECORDError) as err:  # decord raises both for unreadable input
        raise _not_a_video(path, err) from err


def _read_decord(path: str, indices: list[int] | None) -> np.ndarray:
    reader = _open_decord(path)
    if indices is None:
        indices = list(range(len(reader)))
    if indices and max(indices) >= len(reader):
        raise VideoReadError(f"{path}: has {len(reader)} frames, cannot read frame {max(indices)}")
    # asnumpy() instead of decord.bridge.set_bridge("torch"): the bridge is process-wide state.
    return reader.get_batch(indices).asnumpy()


def _info_decord(path: str) -> VideoInfo:
    reader = _open_decord(path)
    height, width = reader[0].shape[:2]
    return VideoInfo(len(reader), float(reader.get_avg_fps()), width, height)


def _open_pyav(path: str):
    import av

    try:
        container = av.open(path)
    except av.FFmpegError as err:
        raise _not_a_video(path, err) from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream")
    return container


def _read_pyav(path: str, indices: list[int] | None) -> np.ndarray:
    wanted = None if indices is None else set(indices)
    frames: dict[int, np.ndarray] = {}
    count = 0
    with _open_pyav(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            if wanted is None or count - 1 in wanted:
                frames[count - 1] = frame.to_ndarray(format="rgb24")
            if wanted is not None and len(frames) == len(wanted):
                break  # no need to decode the rest of the clip
    return _take(path, frames, sorted(frames) if indices is None else indices, count)


def _info_pyav(path: str) -> VideoInfo:
    with _open_pyav(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if rate is None:
            raise VideoReadError(f"{path}: video stream has no frame rate")
        # Some containers (e.g. WebM) do not store a frame count; count by decoding then.
        num_frames = stream.frames or sum(1 for _ in container.decode(stream))
        return VideoInfo(num_frames, float(rate), stream.codec_context.width, stream.codec_context.height)


def _open_imageio(path: str):
    import imageio.v2 as iio

    try:
        return iio.get_reader(path, format="ffmpeg")
    except (OSError, RuntimeError) as err:  # OSError: ffmpeg found no stream; RuntimeError: no plugin accepts it
        raise _not_a_video(path, err) from err


def _read_imageio(path: str, indices: list[int] | None) -> np.ndarray:
    wanted = None if indices is None else set(indices)
    frames: dict[int, np.ndarray] = {}
    count = 0
    reader = _open_imageio(path)
    try:
        for count, frame in enumerate(reader.iter_data(), start=1):
            if wanted is None or count - 1 in wanted:
                frames[count - 1] = np.asarray(frame)
            if wanted is not None and len(frames) == len(wanted):
                break
    finally:
        reader.close()
    return _take(path, frames, sorted(frames) if indices is None else indices, count)


def _info_imageio(path: str) -> VideoInfo:
    reader = _open_imageio(path)
    try:
        meta = reader.get_meta_data()
        width, height = meta["size"]
        # meta["nframes"] is only an estimate (duration x fps, or inf); count_frames() decodes to count exactly.
        return VideoInfo(reader.count_frames(), float(meta["fps"]), width, height)
    finally:
        reader.close()
