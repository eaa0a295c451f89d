"""Condition frames for ControlNets (tuneavideo/video/conditions.py): canny is OpenCV's, depth is a transformers
depth-estimation pipeline's output, a condition video gives its frames for the source frames edited, and every bad
input is one line saying what it needs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil, pipeline

from tests.helpers import SAMPLE_CLIP, frame_indices, index_frames, write_index_clip
from tuneavideo.video.conditions import (
    ConditionError,
    canny,
    condition_clip,
    depth,
    depth_estimator,
    hold,
    make_condition,
)
from tuneavideo.video.readers import Clip


def sample_frames(count=3, size=(64, 64)):
    return list(Clip(SAMPLE_CLIP).frames(size, 0, count))


def test_canny_is_opencv_canny_of_each_frame_at_the_default_thresholds():
    frames = sample_frames()
    edges = list(canny(iter(frames)))
    assert len(edges) == 3
    for frame, edge in zip(frames, edges):
        expected = cv2.Canny(frame, 100, 200)
        assert edge.shape == (64, 64, 3) and edge.dtype == np.uint8
        assert all(np.array_equal(edge[:, :, c], expected) for c in range(3))
        assert 0 < np.count_nonzero(expected) < expected.size  # the ball has edges, the frame is not all edge
    low = next(canny(iter(frames), 10, 20))
    assert np.array_equal(low[:, :, 0], cv2.Canny(frames[0], 10, 20))
    assert np.count_nonzero(low) > np.count_nonzero(edges[0])


@pytest.mark.parametrize("low, high, message", [(200, 100, "need 0 <= low <= high, got 200 and 100"),
                                                (-1, 100, "need 0 <= low <= high"),
                                                ("x", 100, "'x' is not a number")])
def test_bad_canny_thresholds_are_one_line(low, high, message):
    with pytest.raises(ConditionError, match=message) as err:
        next(canny(iter(sample_frames(1)), low, high))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory):
    """A tiny random DPT depth estimator folder, as `download_models.sh --controlnet depth` writes a real one."""
    folder = tmp_path_factory.mktemp("checkpoints") / "dpt-large"
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                       backbone_out_indices=[0, 1, 2, 3])
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_depth_is_the_estimators_depth_map_at_the_frames_size(tiny_depth):
    frames = sample_frames(2, (64, 48))
    estimator = depth_estimator(checkpoints=tiny_depth.parent)
    maps = list(depth(iter(frames), estimator))
    reference = pipeline("depth-estimation", model=str(tiny_depth))
    for frame, found in zip(frames, maps):
        expected = np.asarray(reference(Image.fromarray(frame))["depth"])
        assert found.shape == (48, 64, 3) and found.dtype == np.uint8
        assert all(np.array_equal(found[:, :, c], expected) for c in range(3))
    assert maps[0].std() > 0


def test_depth_without_the_estimator_names_the_download_command(tmp_path):
    with pytest.raises(ConditionError, match=r"no depth estimator in .*dpt-large; download it with "
                                             r"\./download_models\.sh --controlnet depth"):
        depth_estimator(checkpoints=tmp_path)
    (tmp_path / "dpt-large").mkdir()
    (tmp_path / "dpt-large" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConditionError, match="is not a depth estimator .*download one with"):
        depth_estimator(checkpoints=tmp_path)


def test_a_condition_video_gives_the_frames_of_the_source_frames_edited(tmp_path):
    path = write_index_clip(tmp_path / "pose.mp4", num_frames=20, width=64, height=48)
    frames = list(condition_clip(path, range(2, 14, 3), (64, 48), (32, 24)))
    assert [f.shape for f in frames] == [(24, 32, 3)] * 4
    expected = list(Clip(path).frames((32, 24), 2, 14, 3))
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected))
    assert frame_indices(np.stack(list(condition_clip(path, range(2, 14, 3), (64, 48), (64, 48))))) == [2, 5, 8, 11]
    # a folder of frames at the edit's size (the source is 128x96)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(index_frames(6, 32, 24)):
        Image.fromarray(frame).save(folder / f"{index + 1}.png")
    found = list(condition_clip(folder, range(0, 6, 2), (128, 96), (32, 24)))
    assert frame_indices(np.stack(found)) == [0, 2, 4]


def test_a_condition_video_that_does_not_fit_is_one_line(tmp_path):
    path = write_index_clip(tmp_path / "pose.mp4", num_frames=10, width=64, height=48)
    with pytest.raises(ConditionError, match=r"has 10 frames; this edit needs one per source frame up to frame 12 "
                                             r"\(13 frames\)"):
        condition_clip(path, range(0, 13, 3), (64, 48), (64, 48))
    with pytest.raises(ConditionError, match=r"is 64x48; a condition needs the source clip's size \(128x96\) or "
                                             r"the edit's \(32x32\)"):
        condition_clip(path, range(0, 4), (128, 96), (32, 32))
    with pytest.raises(ConditionError, match="condition 'edges': not canny or depth, nor an existing condition video"):
        make_condition("edges", lambda: iter([]), range(4), (64, 48), (64, 48))


def test_make_condition_dispatches_and_hold_keeps_frames_off_the_heap(tmp_path):
    frames = sample_frames(4)
    edges = make_condition("canny", lambda: iter(frames), range(4), (64, 64), (64, 64), canny_thresholds=(50, 150))
    held = hold(edges, 4, (64, 64))
    assert isinstance(held, np.memmap) and held.shape == (4, 64, 64, 3)
    for frame, edge in zip(frames, held):
        assert np.array_equal(edge[:, :, 0], cv2.Canny(frame, 50, 150))
    with pytest.raises(ValueError, match="expected 5 condition frames, got 4"):
        hold(iter(frames), 5, (64, 64))
