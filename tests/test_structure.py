"""Structure guidance of an edit (tuneavideo/structure.py): settings checked, ControlNets loaded and fitted before any
condition is made; conditions of the frames edited; the pipeline's arguments; the condition video; the cache key."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from diffusers import ControlNetModel, MultiControlNetModel, UNet2DConditionModel

from tests.helpers import SAMPLE_CLIP, frame_indices, write_index_clip
from tuneavideo.config import ControlNetConfig
from tuneavideo.errors import UserError
from tuneavideo.structure import prepare_structure
from tuneavideo.video.readers import Clip


def frames_of(frames: range, size=(64, 64)):
    return lambda: Clip(SAMPLE_CLIP).frames(size, frames.start, frames.stop, frames.step)


def test_canny_and_a_condition_video_for_the_frames_edited(tiny_sd, tiny_controlnet_path, tmp_path):
    unet = UNet2DConditionModel.load_config(tiny_sd, subfolder="unet")
    poses = write_index_clip(tmp_path / "pose.mp4", num_frames=12, width=64, height=64)
    frames = range(2, 11, 4)
    settings = [ControlNetConfig(str(tiny_controlnet_path), "canny", 0.7),
                ControlNetConfig(str(tiny_controlnet_path), str(poses), 0.3)]
    structure = prepare_structure(settings, type("Config", (), unet), frames, frames_of(frames), (64, 64), (64, 64),
                                  canny_thresholds=(50, 150))
    decoded = list(frames_of(frames)())
    assert [np.array_equal(c[:, :, 0], cv2.Canny(f, 50, 150)) for c, f in zip(structure.conditions[0], decoded)] == [
        True] * 3
    assert frame_indices(np.asarray(structure.conditions[1])) == [2, 6, 10]
    assert isinstance(structure.controlnet, MultiControlNetModel)
    arguments = structure.pipeline_arguments()
    assert arguments["controlnet_conditioning_scale"] == [0.7, 0.3] and len(arguments["conditioning_frames"]) == 2
    video = list(structure.condition_video())
    assert [frame.shape for frame in video] == [(64, 128, 3)] * 3  # each condition beside the other
    one = prepare_structure(settings[:1], type("Config", (), unet), frames, frames_of(frames), (64, 64), (64, 64))
    assert isinstance(one.controlnet, ControlNetModel)
    assert one.pipeline_arguments()["controlnet_conditioning_scale"] == 0.7
    # the cache key follows the weights, the condition and the scale
    key = one.key()
    assert prepare_structure([ControlNetConfig(str(tiny_controlnet_path), "canny", 0.5)], type("Config", (), unet),
                             frames, frames_of(frames), (64, 64), (64, 64)).key() != key
    weights = next(tiny_controlnet_path.glob("diffusion_pytorch_model*"))
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert one.key() != key


@pytest.mark.parametrize("case", ["unknown condition", "other base", "missing model", "negative scale",
                                  "bad thresholds", "short condition video"])
def test_what_does_not_fit_is_one_line_before_any_condition_is_made(case, tiny_sd, tiny_controlnet_path,
                                                                     sd2_controlnet_path, tmp_path):
    unet = type("Config", (), UNet2DConditionModel.load_config(tiny_sd, subfolder="unet"))
    short = write_index_clip(tmp_path / "short.mp4", num_frames=5, width=64, height=64)
    model, condition, scale, thresholds = str(tiny_controlnet_path), "canny", 1.0, (100, 200)
    expected = {"unknown condition": "condition 'pose': not canny or depth, nor an existing condition video",
                "other base": "is made for a 32-wide text encoder but this model is 16-wide",
                "missing model": "--controlnet nowhere: cannot load a ControlNet",
                "negative scale": "scale -1.0 of ControlNet .*: must be a finite number >= 0",
                "bad thresholds": "canny thresholds: need 0 <= low <= high, got 200 and 100",
                "short condition video": "has 5 frames; this edit needs one per source frame up to frame 10"}[case]
    if case == "unknown condition":
        model, condition = "nowhere", "pose"  # the condition is checked before the model is loaded
    elif case == "other base":
        model = str(sd2_controlnet_path)
    elif case == "missing model":
        model = "nowhere"
    elif case == "negative scale":
        scale = -1.0
    elif case == "bad thresholds":
        thresholds = (200, 100)
    else:
        condition = str(short)
    made = []

    def source():
        made.append(True)
        return frames_of(range(0, 11, 5))()

    with pytest.raises(UserError, match=expected) as err:
        prepare_structure([ControlNetConfig(model, condition, scale)], unet, range(0, 11, 5), source, (64, 64),
                          (64, 64), canny_thresholds=thresholds)
    assert "\n" not in str(err.value) and not made
