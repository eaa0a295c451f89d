"""Writing one edit's files: every video's MP4 (with the source's sound), GIF and JPEG frames, the side-by-side of
the source and every video, a local edit's source branch and blend masks, a guided edit's conditions, at one
constant rate (frame j written `repeats[j]` times: a variable-rate source shown at its frames' times).

Everything is written into a hidden staging folder of the edit folder (`.edit-<pid>-<hex>.tmp`) and moved in
together by `commit`, so a crash, Ctrl-C, SIGKILL or full disk leaves the earlier files as they were; the caller
writes the edit's index (result.json) after that, last. A new writer first sweeps what killed edits left there:
staging folders and `$TMPDIR/tav-edit-<pid>-*` scratch folders of processes that are gone, and the hidden
per-file temporaries (`.<name>.<hex>.tmp.mp4|gif`) and day-old `$TMPDIR/tav-edit-*` folders of earlier versions.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import DiskFullError, remove, staged
from .writers import Mp4Writer, grid_frames, side_by_side, write_gif

GIF_MAX_FRAMES = 128  # longer edits get no GIF: a GIF is held whole in memory and grows to hundreds of MB
JPEG_QUALITY = 95  # of the JPEG frames; Pillow's default, 75, visibly blurs fine texture
MASK_TINT = np.array([255, 0, 0], dtype=np.float32)  # red, half over the masked pixels
STAGING = re.compile(r"\.edit-(\d+)-[0-9a-f]+\.tmp")  # an edit being written by process <pid>
SCRATCH = re.compile(r"tav-edit-(\d+)-.+")  # $TMPDIR/tav-edit-<pid>-*: the sound of an edit of process <pid>
OLD_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp\.(mp4|gif)")  # an earlier version's per-file temporary
OLD_AUDIO_AGE = 24 * 3600  # seconds after which an earlier version's $TMPDIR/tav-edit-* is taken to be left over


def upsampled(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A latent-size mask `(frames, h, w)` -> bool `(frames, H, W)` at `size` (H, W), nearest."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].bool().cpu().numpy()


def mask_overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`frame` `(H, W, 3)` uint8 with the pixels of `mask` `(H, W)` tinted half red."""
    out = frame.astype(np.float32)
    out[mask] = (out[mask] + MASK_TINT) / 2
    return out.round().astype(np.uint8)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def sweep(folder: Path) -> None:
    """Remove what killed edits left in `folder` (and earlier versions in the temporary folder)."""
    for path in folder.glob(".*"):
        staging = STAGING.fullmatch(path.name)
        if (staging and not alive(int(staging[1]))) or OLD_TEMPORARY.fullmatch(path.name):
            remove(path)
    for path in Path(tempfile.gettempdir()).glob("tav-edit-*"):
        scratch = SCRATCH.fullmatch(path.name)
        with contextlib.suppress(OSError):
            if (not alive(int(scratch[1])) if scratch else time.time() - path.stat().st_mtime > OLD_AUDIO_AGE):
                remove(path)


class EditWriter:
    """One edit's files, staged and moved in together (see the module docstring). Use as a context manager: the
    staging folder is removed on leaving it, whatever happened; `commit` moves the files in first. `scratch` is a
    folder for what is not an output (the span's sound), in the temporary folder, removed with it."""

    def __init__(self, folder: Path, fps: Fraction, repeats: list[int]) -> None:
        self.folder, self.fps, self.repeats = folder, fps, repeats
        self._moves: list[tuple[Path, Path]] = []  # (staged, final), in writing order

    def __enter__(self) -> EditWriter:
        sweep(self.folder)
        self.staging = self.folder / f".edit-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
        self.staging.mkdir()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"tav-edit-{os.getpid()}-"))
        self._stack = ExitStack()
        self._stack.enter_context(staged(self.staging, self._disk_full))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self._stack.__exit__(kind, error, traceback)
        finally:
            remove(self.staging)
            remove(self.scratch)
        if isinstance(error, DiskFullError):  # a file's own message names the staging folder: name the edit's
            raise DiskFullError(self._disk_full) from error

    @property
    def _disk_full(self) -> str:
        return (f"no space left on the disk of {self.folder} while writing an edit; free space and run again (files "
                "written before are kept)")

    def path(self, final: Path) -> Path:
        """Where to write the file or folder that becomes `final` on `commit`."""
        self._moves.append((self.staging / final.name, final))
        return self._moves[-1][0]

    def staged(self, final: Path) -> Path:
        """Where the file that becomes `final` is, until `commit`."""
        return dict((end, start) for start, end in self._moves)[final]

    def write_videos(self, chunks: Iterable[np.ndarray], source: Iterator[np.ndarray], videos: list[Path],
                     comparison: Path | None, audio: str | None, gif: bool, frame_folders: list[Path]) -> list[Path]:
        """Decoded chunks `(videos, 3, frames, h, w)` in [0, 1], streamed: one MP4 per video, with `gif` a GIF each
        when short (returned), with `frame_folders` every frame as a JPEG, and the side-by-side of the `source`
        frames and every video (`comparison`)."""
        num_frames = sum(self.repeats)
        gifs = [video.with_suffix(".gif") for video in videos] if gif and len(self.repeats) <= GIF_MAX_FRAMES else []
        gif_frames: list[list[np.ndarray]] = [[] for _ in gifs]
        jpegs = [self.path(folder) for folder in frame_folders]
        for folder in jpegs:
            folder.mkdir()
        with ExitStack() as stack:
            writers = [stack.enter_context(Mp4Writer(self.path(path), self.fps, audio, num_frames))
                       for path in videos]
            side = stack.enter_context(Mp4Writer(self.path(comparison), self.fps, audio, num_frames)) \
                if comparison else None
            first = 0
            for chunk in chunks:
                decoded = [grid_frames(torch.from_numpy(video[None])) for video in chunk]
                times = self.repeats[first : first + chunk.shape[2]]
                for k, frames in enumerate(decoded):
                    for offset, (frame, count) in enumerate(zip(frames, times)):
                        for _ in range(count):
                            writers[k].write(frame)
                            if gifs:
                                gif_frames[k].append(frame)
                        if jpegs:
                            Image.fromarray(frame).save(jpegs[k] / f"{first + offset:05d}.jpg", quality=JPEG_QUALITY)
                if side is not None:
                    shown = side_by_side([np.stack([next(source) for _ in times]), *decoded])
                    for frame, count in zip(shown, times):
                        for _ in range(count):
                            side.write(frame)
                first += chunk.shape[2]
        for path, frames in zip(gifs, gif_frames):
            write_gif(np.stack(frames), self.path(path), self.fps)
        return gifs

    def write_frames(self, frames: Iterable[np.ndarray], path: Path) -> None:
        """One silent MP4 of `frames` `(H, W, 3)` uint8, one per edited frame (streamed), e.g. the conditions."""
        with Mp4Writer(self.path(path), self.fps) as writer:
            for frame, count in zip(frames, self.repeats):
                for _ in range(count):
                    writer.write(frame)

    def write_masks(self, source: Iterable[np.ndarray], masks: list[torch.Tensor], paths: list[Path]) -> None:
        """One MP4 per mask `(frames, h, w)` at latent size: the `source` frames (streamed) with it over them."""
        with ExitStack() as stack:
            writers = [stack.enter_context(Mp4Writer(self.path(path), self.fps)) for path in paths]
            for j, (frame, count) in enumerate(zip(source, self.repeats)):
                for writer, mask in zip(writers, masks):
                    shown = mask_overlay(frame, upsampled(mask[j : j + 1], frame.shape[:2])[0])
                    for _ in range(count):
                        writer.write(shown)

    def write_text(self, final: Path, text: str) -> None:
        self.path(final).write_text(text)

    def commit(self) -> None:
        """Move every staged file in, replacing earlier ones of the same names."""
        for staged_path, final in self._moves:
            if final.is_dir() and not final.is_symlink():
                remove(final)
            os.replace(staged_path, final)
