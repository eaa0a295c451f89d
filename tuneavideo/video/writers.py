"""Video grids and file output (GIF / H.264 MP4) for Tune-A-Video results.

Replaces the original ``util.save_videos_grid`` (torchvision ``make_grid`` + ``imageio.mimsave``) with code that
does not need torchvision, rounds instead of truncating, and writes GIF timing that today's Pillow/imageio honour
(see design doc section 4.4 and fault 19).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path

# GIF stores frame delays in 1/100 s and browsers replace delays under 20 ms with ~100 ms, so faster GIFs would
# play *slower*; above this rate a GIF keeps every k-th frame instead, to play at real speed.
GIF_MAX_FPS = 50


def make_grid(videos: torch.Tensor, columns: int = 4, padding: int = 2) -> torch.Tensor:
    """Tile a batch of images ``(b, c, h, w)`` into one ``(c, H, W)`` image like ``torchvision.utils.make_grid``.

    ``columns`` images per row (torchvision's ``nrow``). A single
    image is returned without padding; 1-channel input is repeated to 3 channels; gaps are 0.
    """
    if videos.ndim != 4:
        raise ValueError(f"make_grid expects (b, c, h, w), got shape {tuple(videos.shape)}")
    if columns < 1 or padding < 0:
        raise ValueError(f"need columns >= 1 and padding >= 0, got columns={columns}, padding={padding}")
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1)
    b, c, h, w = videos.shape
    if b == 1:
        return videos[0].clone()
    num_columns = min(columns, b)
    num_rows = math.ceil(b / num_columns)
    cell_h, cell_w = h + padding, w + padding
    grid = videos.new_zeros((c, num_rows * cell_h + padding, num_columns * cell_w + padding))
    for k in range(b):
        row, col = divmod(k, num_columns)
        top, left = row * cell_h + padding, col * cell_w + padding
        grid[:, top : top + h, left : left + w] = videos[k]
    return grid


def grid_frames(videos: torch.Tensor, rescale: bool = False, columns: int = 4) -> np.ndarray:
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
        grid = make_grid(videos[:, :, t], columns=columns)
        frames.append(grid.permute(1, 2, 0))
    scaled = torch.nan_to_num(torch.stack(frames) * 255.0, nan=0.0)
    return scaled.round().clamp(0, 255).to(torch.uint8).numpy()


def save_videos_grid(
    videos: torch.Tensor, path: str, rescale: bool = False, n_rows: int = 4, fps: int | float = 8
) -> None:
    """Save ``(b, c, t, h, w)`` videos as a grid animation: ``.gif`` or H.264 ``.mp4`` chosen by suffix.

    The original's signature: ``n_rows`` is its name for the number of videos per row (the grid's columns).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"unsupported output {path!r}: the suffix must be .gif or .mp4")
    frames = grid_frames(videos, rescale=rescale, columns=n_rows)
    if suffix == ".gif":
        write_gif(frames, path, fps)
    else:
        write_mp4(frames, path, fps)


# The most UTF-8 bytes of a prompt's file name: file systems take 255 bytes a name, and the suffixes a prompt's files
# get take up to 55 more (a video's "-12", ".mask.mp4", an atomic write's leading "." and ".<12 hex>.tmp").
PROMPT_NAME_BYTES = 200


def prompt_file_name(prompt: str) -> str:
    """A prompt as a file name (no suffix): path separators and control characters replaced, a name of dots alone
    (".", "..") made plain, cut to at most PROMPT_NAME_BYTES bytes of UTF-8 at a character boundary."""
    name = re.sub(r"[/\\\x00-\x1f]", "_", prompt).strip()
    name = name.encode("utf-8", "replace")[:PROMPT_NAME_BYTES].decode("utf-8", "ignore").strip()
    return (name.replace(".", "_") if set(name) == {"."} else name) or "empty-prompt"


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


class Mp4Writer:
    """Frames streamed into a browser-safe MP4 (H.264 yuv420p, BT.709 tagged, faststart), optionally with AAC sound.

    Use as a context manager and `write` `(h, w, 3)` uint8 frames one by one: they go straight to the encoder, so a
    long edit is never held in memory. The file appears under `path` only when complete (`atomic_path`); an error or
    Ctrl-C leaves nothing behind. Odd sizes are padded by repeating the last row/column (yuv420p needs even sides).
    With `audio_path`, the sound is cut or padded with silence to exactly `num_frames / fps` seconds, the picture's
    length, so players neither freeze the last frame nor cut the picture short.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float | Fraction,
                 audio_path: str | os.PathLike[str] | None = None, num_frames: int | None = None) -> None:
        if audio_path is not None and num_frames is None:
            raise ValueError("a video with sound needs its num_frames, to cut the sound to the picture's length")
        self.path, self.rate, self.audio_path, self.num_frames = Path(path), _exact_fps(fps), audio_path, num_frames
        self.count = 0
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> Mp4Writer:
        self._stack = contextlib.ExitStack()
        self._temporary = self._stack.enter_context(atomic_path(self.path))
        return self

    def write(self, frame: np.ndarray) -> None:
        _check_frames(frame[None])
        pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else frame
        if self._process is None:
            self._size = frame.shape[:2]
            self._process = subprocess.Popen(self._command(*frame.shape[1::-1]), stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if frame.shape[:2] != self._size:
            raise ValueError(f"frame {self.count} is {frame.shape[1]}x{frame.shape[0]}, the video is "
                             f"{self._size[1]}x{self._size[0]}")
        with contextlib.suppress(BrokenPipeError):  # ffmpeg stopped (a full disk, say): its exit status says why
            self._process.stdin.write(np.ascontiguousarray(frame).tobytes())
        self.count += 1

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self._finish(error)
        except BaseException:
            if not self._stack.__exit__(*sys.exc_info()):
                raise
            return True
        return self._stack.__exit__(kind, error, traceback)

    def _finish(self, error: BaseException | None) -> None:
        process, self._process = self._process, None
        if process is None:
            if error is None:
                raise ValueError(f"{self.path}: no frames were written")
            return
        # the sound was cut to num_frames / fps when the first frame came: other counts would not match it
        miscounted = error is None and self.audio_path is not None and self.count != self.num_frames
        if error is not None or miscounted:
            process.kill()
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        message = process.stderr.read().decode(errors="replace")
        if miscounted:
            process.wait()
            raise ValueError(f"{self.path}: {self.count} frames were written, not the num_frames={self.num_frames} "
                             "that the sound was cut to")
        if process.wait() != 0 and error is None:
            raise OSError(f"ffmpeg failed writing {self.path}: {message[-2000:]}")

    def _command(self, width: int, height: int) -> list[str]:
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-nostdin"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(self.rate),
                "-i", "pipe:0"]
        if self.audio_path is not None:
            cmd += ["-i", os.fspath(self.audio_path), "-map", "0:v:0", "-map", "1:a:0"]
        # Convert with the BT.709 matrix and say so in the stream, otherwise players guess and colours shift.
        # Tag via setparams: recent ffmpeg takes colour tags from the filtered frames and drops -color_* flags.
        tags = "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
        cmd += ["-vf", f"scale=out_color_matrix=bt709:out_range=tv,{tags}"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart"]
        if self.audio_path is not None:
            duration = f"{float(Fraction(self.num_frames) / self.rate):.6f}"
            cmd += ["-af", f"apad=whole_dur={duration},atrim=end={duration}", "-c:a", "aac", "-b:a", "192k"]
        return cmd + ["-f", "mp4", os.fspath(self._temporary)]


def write_mp4(
    frames: np.ndarray,
    path: str | os.PathLike[str],
    fps: float | Fraction,
    audio_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write `(t, h, w, 3)` uint8 frames as an MP4 (see `Mp4Writer`)."""
    _check_frames(frames)
    with Mp4Writer(path, fps, audio_path, len(frames)) as writer:
        for frame in frames:
            writer.write(frame)


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
