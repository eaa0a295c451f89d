"""Tensor layouts of clips (tuneavideo/models/layout.py): frames folded into the batch and back, uint8 frames to
[-1, 1]."""

import numpy as np
import torch

from tests.helpers import index_frames
from tuneavideo.models.layout import fold_frames, frames_to_video, unfold_frames

NUM_FRAMES, WIDTH, HEIGHT = 30, 64, 48

def test_frames_to_video_is_x_over_127_5_minus_1():
    frames = index_frames(NUM_FRAMES, WIDTH, HEIGHT)
    video = frames_to_video(frames)
    assert video.shape == (1, 3, NUM_FRAMES, HEIGHT, WIDTH) and video.dtype == torch.float32
    expected = torch.from_numpy(frames.astype(np.float32)).permute(3, 0, 1, 2)[None] / 127.5 - 1.0
    torch.testing.assert_close(video, expected, rtol=0, atol=0)
    assert video[0, :, 0, :, : WIDTH // 2].max() == -1.0  # frame 0: the left half is black
    assert video[0, :, 0, :, WIDTH // 2 :].min() == 1.0  # and the right half white
    assert frames_to_video(np.array([[[[0, 255, 51]]]], np.uint8)).flatten().tolist() == torch.tensor(
        [-1.0, 1.0, 51 / 127.5 - 1.0]).tolist()  # in float32


def test_fold_frames_puts_frames_inner_and_unfolds_back():
    hidden_states = torch.randn(2, 3, 4, 5, 6)
    folded = fold_frames(hidden_states)
    assert folded.shape == (8, 3, 5, 6)
    for batch in range(2):
        for frame in range(4):
            assert torch.equal(folded[batch * 4 + frame], hidden_states[batch, :, frame])
    assert torch.equal(unfold_frames(folded, 4), hidden_states)
