"""Condition frames for ControlNets, one per source frame, made from the source clip or read from the user's own.

- `canny`: OpenCV's `Canny` on each decoded source frame at the edit's size, as ControlNet's own canny annotator
  (`cv2.Canny(frame, 100, 200)`), the edge map repeated to three channels as diffusers' ControlNet examples do.
- `depth`: a monocular depth estimator through transformers' `depth-estimation` pipeline (DPT, as ControlNet 1.1's
  depth model card uses; Depth Anything works too), read from ./checkpoints where `download_models.sh --controlnet
  depth` puts it; its depth map at the frame's size, three channels.
- a path: a condition video or folder of frames made elsewhere (pose, soft edges, ...), one frame per source frame,
  at the source's size or the edit's, read as the source is read.

Frames stream one at a time; `hold` keeps a clip's conditions in a memory-mapped temporary file, so a long clip's
conditions are not held on the heap while it is edited window by window.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError, first_line
from .readers import Clip

CONDITIONS = ("canny", "depth")  # made from the source clip; anything else names a condition video or folder
CANNY_THRESHOLDS = (100, 200)  # ControlNet's canny annotator's (and ControlVideo's) low and high thresholds
# what ControlNet 1.1's depth model card runs; ./checkpoints/dpt-large once downloaded
DEPTH_ESTIMATOR = "Intel/dpt-large"
DEPTH_DOWNLOAD = "./download_models.sh --controlnet depth"


class ConditionError(UserError):
    """A condition that cannot be made or read; one line naming it and what it needs."""


def check_canny_thresholds(low: float, high: float) -> None:
    """Raises ConditionError unless `0 <= low <= high` (numbers)."""
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ConditionError(f"canny thresholds: {value!r} is not a number")
    if not 0 <= low <= high:
        raise ConditionError(f"canny thresholds: need 0 <= low <= high, got {low} and {high} (default "
                             f"{CANNY_THRESHOLDS[0]} and {CANNY_THRESHOLDS[1]})")


def canny(frames: Iterable[np.ndarray], low: float = CANNY_THRESHOLDS[0],
          high: float = CANNY_THRESHOLDS[1]) -> Iterator[np.ndarray]:
    """Edge maps `(H, W, 3)` uint8 (0 or 255, the same in every channel) of RGB frames `(H, W, 3)` uint8."""
    import cv2  # OpenCV loads only when canny is asked for

    check_canny_thresholds(low, high)
    for frame in frames:
        edges = cv2.Canny(np.ascontiguousarray(frame), low, high)
        yield np.repeat(edges[:, :, None], 3, axis=2)


def depth_estimator(model: str | os.PathLike | None = None, checkpoints: str | os.PathLike = "checkpoints",
                    device: str | None = None) -> Callable[[Image.Image], dict]:
    """transformers' `depth-estimation` pipeline of a local model: `model` (a folder), else
    `<checkpoints>/dpt-large`.

    Raises:
        ConditionError: the folder is missing or holds no depth estimator; names the download command.
    """
    from transformers import pipeline  # loads torch's vision stack only when depth is asked for

    folder = Path(model) if model is not None else Path(checkpoints) / DEPTH_ESTIMATOR.split("/")[-1]
    if not (folder / "config.json").is_file():
        raise ConditionError(f"depth condition: no depth estimator in {folder}; download it with {DEPTH_DOWNLOAD}")
    try:
        return pipeline("depth-estimation", model=str(folder), device=device)
    except (OSError, ValueError, KeyError) as err:
        raise ConditionError(f"depth condition: {folder} is not a depth estimator ({first_line(err)}); download one "
                             f"with {DEPTH_DOWNLOAD}") from err


def depth(frames: Iterable[np.ndarray], estimator: Callable[[Image.Image], dict]) -> Iterator[np.ndarray]:
    """Depth maps `(H, W, 3)` uint8 (near is bright) of RGB frames `(H, W, 3)` uint8, at the frames' size."""
    for frame in frames:
        image = Image.fromarray(np.asarray(frame))
        predicted = estimator(image)["depth"]  # a grey PIL image at the input's size
        if predicted.size != image.size:
            predicted = predicted.resize(image.size, Image.Resampling.BICUBIC)
        yield np.asarray(predicted.convert("RGB"))


def condition_clip(path: str | os.PathLike, frames: range, source_size: tuple[int, int],
                   size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Frames `frames` (source frame indices) of the condition video or folder at `path`, at `size` (width,
    height). It must hold a frame for every source frame up to the last one edited, at the source's size
    (`source_size`) or the edit's (`size`), and is resized as the source is.

    Raises:
        ConditionError: too few frames or another size; says what it needs.
    """
    clip = Clip(path)
    found = clip.info.width, clip.info.height
    if found not in (tuple(source_size), tuple(size)):
        raise ConditionError(f"condition {path}: is {found[0]}x{found[1]}; a condition needs the source clip's size "
                             f"({source_size[0]}x{source_size[1]}) or the edit's ({size[0]}x{size[1]})")
    needed = frames[-1] + 1 if len(frames) else 0
    if clip.info.num_frames < needed:
        raise ConditionError(f"condition {path}: has {clip.info.num_frames} frames; this edit needs one per source "
                             f"frame up to frame {frames[-1]} ({needed} frames)")
    return clip.frames(tuple(size), frames.start, frames.stop, frames.step)


def make_condition(kind: str, source: Callable[[], Iterable[np.ndarray]], frames: range,
                   source_size: tuple[int, int], size: tuple[int, int],
                   canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS,
                   estimator: Callable[[], Callable[[Image.Image], dict]] = depth_estimator) -> Iterator[np.ndarray]:
    """The condition frames of `kind` ("canny", "depth" or a path) for source frames `frames` at `size`, streamed.

    `source()` gives the decoded source frames `frames` at `size`; `estimator()` the depth pipeline (only called
    for "depth").

    Raises:
        ConditionError: an unknown condition (neither canny, depth nor an existing path), or one that does not fit.
    """
    if kind == "canny":
        return canny(source(), *canny_thresholds)
    if kind == "depth":
        return depth(source(), estimator())
    if not os.path.exists(kind):
        raise ConditionError(f"condition {kind!r}: not {' or '.join(CONDITIONS)}, nor an existing condition video or "
                             "folder of frames")
    return condition_clip(kind, frames, source_size, size)


def hold(frames: Iterable[np.ndarray], count: int, size: tuple[int, int]) -> np.ndarray:
    """`count` frames `(H, W, 3)` uint8 at `size` (width, height) in a memory-mapped temporary file (deleted when the
    array is), indexable like a list of frames."""
    width, height = size
    held = np.memmap(tempfile.TemporaryFile(), dtype=np.uint8, mode="w+", shape=(count, height, width, 3))
    written = 0
    for written, frame in enumerate(itertools.islice(frames, count), 1):
        held[written - 1] = frame
    if written != count:
        raise ValueError(f"expected {count} condition frames, got {written}")
    return held
