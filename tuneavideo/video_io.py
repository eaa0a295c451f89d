"""Video grids and file output (GIF / H.264 MP4) for Tune-A-Video results.

Replaces the original ``util.save_videos_grid`` (torchvision ``make_grid`` + ``imageio.mimsave``) with code that
does not need torchvision, rounds instead of truncating, and writes GIF timing that today's Pillow/imageio honour
(see design doc section 4.4 and fault 19).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path

# GIF stores frame delays in 1/100 s and browsers replace delays under 20 ms with ~100 ms, so faster GIFs would
# play *slower*; above this rate a GIF keeps every k-th frame instead, to play at real speed.
GIF_MAX_FPS = 50


def make_grid(videos: torch.Tensor, n_rows: int = 4, padding: int = 2) -> torch.Tensor:
    """Tile a batch of images ``(b, c, h, w)`` into one ``(c, H, W)`` image like ``torchvision.utils.make_grid``.

    ``n_rows`` is, as in torchvision's ``nrow``, the number of images per *row* (i.e. the column count). A single
    image is returned without padding; 1-channel input is repeated to 3 channels; gaps are 0.
    """
    if videos.ndim != 4:
        raise ValueError(f"make_grid expects (b, c, h, w), got shape {tuple(videos.shape)}")
    if n_rows < 1 or padding < 0:
        raise ValueError(f"need n_rows >= 1 and padding >= 0, got n_rows={n_rows}, padding={padding}")
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1)
    b, c, h, w = videos.shape
    if b == 1:
        return videos[0].clone()
    xmaps = min(n_rows, b)
    ymaps = math.ceil(b / xmaps)
    cell_h, cell_w = h + padding, w + padding
    grid = videos.new_zeros((c, ymaps * cell_h + padding, xmaps * cell_w + padding))
    for k in range(b):
        row, col = divmod(k, xmaps)
        top, left = row * cell_h + padding, col * cell_w + padding
        grid[:, top : top + h, left : left + w] = videos[k]
    return grid


def grid_frames(videos: torch.Tensor, rescale: bool = False, n_rows: int = 4) -> np.ndarray:
    """Turn ``(b, c, t, h, w)`` floats into ``(t, H, W, 3)`` uint8 frames, one batch grid per time step.

    Values are in [0, 1] (or [-1, 1] with ``rescale``). Unlike the original (which truncated, so 0.999/255 became
    0 and NaN became garbage) we round half-to-even, clamp to [0, 255] and map NaN to 0.
    """
    if videos.ndim != 5:
        raise ValueError(f"expected videos of shape (b, c, t, h, w), got {tuple(videos.shape)}")
    # float32 on CPU: fp16/bf16 would round 255*x coarsely and numpy has no bf16.
    videos = videos.detach().to(device="cpu", dtype=torch.float32)
    if rescale:
        videos = (videos + 1.0) / 2.0
    frames = []
    for t in range(videos.shape[2]):
        grid = make_grid(videos[:, :, t], n_rows=n_rows)
        frames.append(grid.permute(1, 2, 0))
    scaled = torch.nan_to_num(torch.stack(frames) * 255.0, nan=0.0)
    return scaled.round().clamp(0, 255).to(torch.uint8).numpy()


def save_videos_grid(
    videos: torch.Tensor, path: str, rescale: bool = False, n_rows: int = 4, fps: int | float = 8
) -> None:
    """Save ``(b, c, t, h, w)`` videos as a grid animation: ``.gif`` or H.264 ``.mp4`` chosen by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"unsupported output {path!r}: the suffix must be .gif or .mp4")
    frames = grid_frames(videos, rescale=rescale, n_rows=n_rows)
    if suffix == ".gif":
        write_gif(frames, path, fps)
    else:
        write_mp4(frames, path, fps)


def prompt_file_name(prompt: str) -> str:
    """A prompt as a file name (no suffix): path separators and control characters replaced, at most 200 characters."""
    return re.sub(r"[/\\\x00-\x1f]", "_", prompt).strip()[:200] or "empty-prompt"


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected non-empty (t, h, w, 3) uint8 frames, got {frames.dtype} {frames.shape}")


def _exact_fps(fps: float | Fraction) -> Fraction:
    """Return fps as a fraction so ffmpeg gets e.g. 25/2 or 30000/1001 rather than a rounded decimal."""
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    # NTSC-style rates arrive as floats like 29.97002997; denominators up to 1001 recover the intended ratio.
    return fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)


def gif_durations_ms(n_frames: int, fps: float) -> list[int]:
    """Per-frame GIF delays in ms (multiples of 10) whose running sum tracks ``i * 1000 / fps``.

    GIF delays are centiseconds, so 125 ms (8 fps) is not representable; Pillow would truncate every frame to
    120 ms (4 % too fast). Alternating 130/120 keeps the average and the total length exact.
    """
    step = Fraction(1000) / _exact_fps(fps)
    ends = [math.floor((i * step) / 10 + Fraction(1, 2)) * 10 for i in range(n_frames + 1)]
    return [b - a for a, b in zip(ends, ends[1:])]


def write_gif(frames: np.ndarray, path: str | os.PathLike[str], fps: float) -> None:
    """Write ``(t, h, w, 3)`` uint8 frames as a looping GIF with per-frame delays of ~1000/fps ms.

    Above 50 fps every k-th frame is kept at fps / k, since a GIF cannot play faster.
    """
    _check_frames(frames)
    step = math.ceil(_exact_fps(fps) / GIF_MAX_FPS)
    frames, fps = frames[::step], _exact_fps(fps) / step
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=gif_durations_ms(len(images), fps),
            loop=0,
        )


def write_mp4(
    frames: np.ndarray,
    path: str | os.PathLike[str],
    fps: float | Fraction,
    audio_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write frames as browser-safe MP4 (H.264 yuv420p, BT.709 tagged, faststart), optionally with AAC audio.

    Odd sizes are padded by repeating the last row/column because yuv420p needs even dimensions. The audio track
    is cut or padded with silence to exactly ``len(frames) / fps`` seconds so players do not show a frozen last
    frame or cut the picture short.
    """
    _check_frames(frames)
    rate = _exact_fps(fps)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    t, h, w, _ = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-nostdin"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(rate), "-i", "pipe:0"]
    if audio_path is not None:
        cmd += ["-i", os.fspath(audio_path), "-map", "0:v:0", "-map", "1:a:0"]
    # Convert with the BT.709 matrix and say so in the stream, otherwise players guess and colours shift.
    # Tag via setparams: recent ffmpeg takes colour tags from the filtered frames and drops -color_* flags.
    tags = "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
    cmd += ["-vf", f"scale=out_color_matrix=bt709:out_range=tv,{tags}"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart"]
    if audio_path is not None:
        duration = f"{float(Fraction(t) / rate):.6f}"
        cmd += ["-af", f"apad=whole_dur={duration},atrim=end={duration}", "-c:a", "aac", "-b:a", "192k"]
    with atomic_path(path) as tmp:
        cmd += ["-f", "mp4", os.fspath(tmp)]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-2000:]}")


def read_video(path: str | os.PathLike[str]) -> tuple[np.ndarray, Fraction]:
    """Decode a video file into ``(t, h, w, 3)`` uint8 RGB frames and its average frame rate."""
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = stream.average_rate or stream.guessed_rate
    if not frames or rate is None:
        raise ValueError(f"could not decode frames and frame rate from {path}")
    return np.stack(frames), Fraction(rate)


def side_by_side(videos: list[np.ndarray]) -> np.ndarray:
    """Concatenate equally long ``(t, h, w, 3)`` uint8 clips left to right.

    Clips of different heights are resized to the tallest one (keeping aspect ratio), so no clip loses detail.
    """
    if not videos:
        raise ValueError("side_by_side needs at least one clip")
    for clip in videos:
        _check_frames(clip)
    lengths = {len(clip) for clip in videos}
    if len(lengths) != 1:
        raise ValueError(f"clips must have the same number of frames, got {[len(clip) for clip in videos]}")
    height = max(clip.shape[1] for clip in videos)
    resized = []
    for clip in videos:
        h, w = clip.shape[1:3]
        if h != height:
            size = (max(1, round(w * height / h)), height)
            clip = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.LANCZOS)) for f in clip])
        resized.append(clip)
    return np.concatenate(resized, axis=2)
