"""Structure guidance for an edit or a run: from settings (`ControlNetConfig`: a ControlNet, a condition, a scale) to
the loaded ControlNets, the condition frames of the frames edited, and what the pipeline takes.

The order is the one-line-errors order: every condition and ControlNet is checked (unknown condition, a ControlNet
that cannot be loaded or does not fit the base model) before any frame is decoded or any condition computed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, MultiControlNetModel

from .config import ControlNetConfig
from .pipelines.controlnet import ControlError, check_fits, load_controlnet
from .video.conditions import (
    CANNY_THRESHOLDS,
    CONDITIONS,
    check_canny_thresholds,
    depth_estimator,
    hold,
    make_condition,
)


@dataclass
class Structure:
    """The ControlNets of an edit with the condition frames of its frames (held off the heap), one per ControlNet."""

    settings: list[ControlNetConfig]
    controlnets: list[ControlNetModel]
    conditions: list[np.ndarray]  # per ControlNet, `(frames, H, W, 3)` uint8, memory-mapped
    canny_thresholds: tuple[float, float]

    @property
    def controlnet(self) -> ControlNetModel | MultiControlNetModel:
        """What the pipeline's `controlnet` is set to."""
        return self.controlnets[0] if len(self.controlnets) == 1 else MultiControlNetModel(self.controlnets)

    def pipeline_arguments(self) -> dict:
        """The pipeline's structure guidance arguments (`conditioning_frames`, `controlnet_conditioning_scale`)."""
        single = len(self.conditions) == 1
        scales = [setting.scale for setting in self.settings]
        return dict(conditioning_frames=self.conditions[0] if single else self.conditions,
                    controlnet_conditioning_scale=scales[0] if single else scales)

    def key(self) -> list:
        """`structure_key` of this guidance."""
        return structure_key(self.settings, self.canny_thresholds)

    def condition_video(self) -> Iterator[np.ndarray]:
        """Frames showing every condition of each edited frame, side by side (`<name>.condition.mp4`)."""
        for index in range(len(self.conditions[0])):
            yield np.concatenate([np.asarray(condition[index]) for condition in self.conditions], axis=1)


def check_structure(settings: list[ControlNetConfig], canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS) -> None:
    """The settings alone: known conditions (or existing condition files), scales, thresholds.

    Raises:
        ControlError, ConditionError: one line naming the setting.
    """
    for setting in settings:
        if setting.condition not in CONDITIONS and not os.path.exists(setting.condition):
            raise ControlError(f"condition {setting.condition!r}: not {' or '.join(CONDITIONS)}, nor an existing "
                               "condition video or folder of frames")
        scale = setting.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0 or math.isinf(scale):
            raise ControlError(f"scale {scale!r} of ControlNet {setting.model}: must be a finite number >= 0 (1.0 as "
                               "ControlNets are trained)")
    check_canny_thresholds(*canny_thresholds)


def prepare_structure(
    settings: list[ControlNetConfig],
    unet_config,
    frames: range,
    source: Callable[[], Iterable[np.ndarray]],
    source_size: tuple[int, int],
    size: tuple[int, int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS,
    checkpoints: str | os.PathLike = "checkpoints",
) -> Structure:
    """Load and check every ControlNet of `settings` against the base UNet's config, then make the conditions of
    source frames `frames` at `size` (`source()` gives those frames decoded at `size`; a condition file is read at
    its own frames), each held in a memory-mapped file.

    Raises:
        ControlError, ConditionError, VideoReadError: one line naming what does not fit, before any frame is made.
    """
    check_structure(settings, canny_thresholds)
    controlnets = []
    for setting in settings:
        controlnet = load_controlnet(setting.model, torch_dtype=dtype)
        check_fits(controlnet, unet_config, f"--controlnet {setting.model}")
        controlnets.append(controlnet.to(device).eval())
    conditions = []
    for setting in settings:
        made = make_condition(setting.condition, source, frames, source_size, size, canny_thresholds,
                              estimator=lambda: depth_estimator(checkpoints=checkpoints, device=device))
        conditions.append(hold(made, len(frames), size))
    return Structure(list(settings), controlnets, conditions, tuple(canny_thresholds))


def structure_key(settings: list[ControlNetConfig], canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS) -> list:
    """What an inversion under `settings` depends on, for a cache key, known before any model loads: each
    ControlNet's weights (path, size, time), its condition (a condition file's too) and scale, the canny thresholds."""
    return [[_identity(setting.model), _identity(setting.condition) if setting.condition not in CONDITIONS
             else setting.condition, setting.scale] for setting in settings] + [list(canny_thresholds)]


def _identity(path: str) -> list:
    """A file's or folder's absolute path, size and time (a folder's newest file), for cache keys; a hub id as is."""
    if not os.path.exists(path):
        return [path]
    files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
    stats = [os.stat(file) for file in files]
    return [os.path.abspath(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]

