"""Which frames are tuned and edited, at what size (tuneavideo/video/frames.py), and the shipped sample clip.

The test clip's frame i has its left half at grey level ``8 * i`` and its right half at ``255 - 8 * i``
(`tests.helpers.index_frames`), so decoded pixels tell which source frame was sampled.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from tests.helpers import ROOT, SAMPLE_CLIP, frame_indices, write_frames_mp4, write_index_clip
from tuneavideo.video.frames import (
    ClipTooShortError,
    clip_size,
    decode_frames,
    even_crop,
    fit_size,
    sample_frame_indices,
    shown_at_constant_rate,
    tuned_window,
    window_starts,
)
from tuneavideo.video.readers import Clip, FramesMissingError, VideoInfo

NUM_FRAMES, FPS, WIDTH, HEIGHT = 30, 12, 64, 48


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Clip:
    path = tmp_path_factory.mktemp("clips") / "index clip.mp4"  # a space in the name on purpose
    return Clip(write_index_clip(path, NUM_FRAMES, FPS, WIDTH, HEIGHT))


# Frame index sampling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_frames, n, start, rate, expected",
    [
        (30, 5, 0, 1, [0, 1, 2, 3, 4]),
        (30, 5, 3, 4, [3, 7, 11, 15, 19]),
        (30, 15, 0, 2, list(range(0, 30, 2))),  # exactly fits: last index 28
        (91, 24, 0, 2, list(range(0, 48, 2))),  # original man-skiing clip and config
        (10, 1, 9, 5, [9]),
    ],
)
def test_sample_frame_indices_and_tuned_window(num_frames, n, start, rate, expected):
    assert sample_frame_indices(num_frames, n, start, rate) == expected
    # the original's one window, as a range of source indices
    window = tuned_window(num_frames, n, start, rate)
    assert isinstance(window, range) and list(window) == expected


def test_short_clip_error_says_what_fits():
    for call in (sample_frame_indices, tuned_window):
        with pytest.raises(ClipTooShortError) as info:
            call(30, 24, 0, 2, path="data/x.mp4")
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("data/x.mp4: has 30 frames")
        assert "n_sample_frames=24" in message and "sample_frame_rate=2" in message
        assert "n_sample_frames<=15" in message  # range(0, 30, 2) has 15 entries
        assert "sample_frame_rate<=1" in message  # 24 frames at rate 1 need indices 0..23
        assert "sample_start_idx<=" not in message  # no start index makes 24 frames at rate 2 fit


def test_short_clip_error_suggests_earlier_start():
    with pytest.raises(ClipTooShortError, match=r"sample_start_idx<=11$"):
        tuned_window(30, 10, 15, 2)  # needs frame 33; starting at 11 ends at the last frame, 29


def test_impossible_sampling_settings():
    with pytest.raises(ValueError, match="sample_frame_rate >= 1"):
        sample_frame_indices(30, 4, 0, 0)


def test_start_past_end():
    with pytest.raises(ClipTooShortError, match=r"sample_start_idx=30 is past its end; use sample_start_idx<=29$"):
        tuned_window(30, 1, 30, 1)


# Random windows ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 5, 30, 31])
@pytest.mark.parametrize(("n", "start", "rate"), [(1, 0, 1), (4, 0, 1), (4, 2, 3), (8, 0, 4), (5, 7, 2)])
@pytest.mark.parametrize("end", [None, 10, 20, 40])
def test_window_starts_cover_exactly_the_windows_that_fit(num_frames, n, start, rate, end):
    limit = num_frames if end is None else min(end, num_frames)
    fitting = [s for s in range(start, num_frames) if s + (n - 1) * rate < limit]
    if fitting:
        starts = window_starts(num_frames, n, start, rate, end)
        assert isinstance(starts, range) and list(starts) == fitting
        assert list(tuned_window(num_frames, n, start, rate)) == list(range(starts[0], starts[0] + n * rate, rate))
    else:
        with pytest.raises(ClipTooShortError):
            window_starts(num_frames, n, start, rate, end)


def test_window_starts_too_short_says_what_fits():
    with pytest.raises(ClipTooShortError) as info:
        window_starts(30, 24, 0, 2, None, "data/x.mp4")
    assert str(info.value) == ("data/x.mp4: has 30 frames but n_sample_frames=24, sample_start_idx=0, "
                               "sample_frame_rate=2 needs frame 46; use n_sample_frames<=15 or sample_frame_rate<=1")
    # sample_end_idx, not the clip (100 frames), is what is too short: the message must not say the clip has 20 frames
    with pytest.raises(ClipTooShortError) as info:
        window_starts(100, 8, 4, 3, 20, "data/x.mp4")
    assert str(info.value) == ("data/x.mp4 up to sample_end_idx=20: has 20 frames but n_sample_frames=8, "
                               "sample_start_idx=4, sample_frame_rate=3 needs frame 25; use n_sample_frames<=6 or "
                               "sample_frame_rate<=2")
    assert list(window_starts(100, 8, 4, 3, 26)) == [4]


# Sizes -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, long_side, expected",
    [
        ((256, 256), 512, (512, 512)),  # square stays square
        ((718, 718), 64, (64, 64)),
        ((1920, 1080), 512, (512, 288)),  # 16:9, exactly
        ((1080, 1920), 512, (288, 512)),  # portrait
        ((1280, 720), 768, (768, 432)),
        ((1920, 1080), 192, (192, 112)),  # 108 rounds (half up) to 112: even_crop cuts the rest
        ((640, 480), 500, (496, 376)),  # the long side rounds down to a multiple of 8; 372 half up to 376
        ((4000, 100), 512, (512, 16)),  # 12.8 rounds to 16
        ((4000, 10), 512, (512, 8)),  # at least one multiple on each side
        ((64, 48), 4, (8, 8)),
    ],
)
def test_fit_size(source, long_side, expected):
    assert fit_size(*source, long_side) == expected
    assert all(side % 8 == 0 for side in expected)


def test_fit_size_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        fit_size(0, 10, 512)


@pytest.mark.parametrize(
    "source, configured, expected",
    [
        ((480, 480), (480, 480), (480, 480)),  # the configured aspect: the configured size, not fit_size's 448x448
        ((256, 256), (512, 512), (512, 512)),
        ((1920, 1080), (512, 288), (512, 288)),  # 16:9 with a 16:9 config
        ((1280, 720), (512, 288), (512, 288)),
        ((1920, 1080), (512, 512), (512, 288)),  # other aspects keep their own: fit_size at the long side
        ((640, 480), (512, 512), (512, 384)),
        ((1080, 1920), (512, 288), (288, 512)),  # portrait clip, landscape config
        ((1170, 2532), (512, 512), (240, 512)),  # a phone's 9:19.5
        ((480, 480), (512, 288), (512, 512)),
    ],
)
def test_clip_size(source, configured, expected):
    assert clip_size(*source, *configured) == expected
    if source[0] * configured[1] != source[1] * configured[0]:
        assert expected == fit_size(*source, max(configured))


@pytest.mark.parametrize(
    "source, size, expected",
    [
        ((1920, 1080), (512, 288), None),  # the same aspect: nothing cut
        ((1920, 1080), (192, 112), (34, 0, 1851, 1080)),  # 1080 * 192/112 = 1851 columns kept: 34 and 35 cut
        ((1080, 1920), (112, 192), (0, 34, 1080, 1851)),
        ((1170, 2532), (240, 512), (0, 18, 1170, 2496)),  # 9:19.5 at 512: 1170 * 512/240 = 2496 rows kept
        ((640, 480), (496, 376), (3, 0, 633, 480)),
    ],
)
def test_even_crop(source, size, expected):
    crop = even_crop(*source, size)
    assert crop == expected
    if crop is not None:
        x, y, width, height = crop
        assert abs(width / height - size[0] / size[1]) < 1e-3  # the size's aspect
        assert abs((source[0] - width - 2 * x)) <= 1 and abs(source[1] - height - 2 * y) <= 1  # evenly from both


def square_clip(path, width: int, height: int) -> Clip:
    """One grey frame with a white square of a third of the short side in the middle."""
    frame = np.full((1, height, width, 3), 64, np.uint8)
    side = min(width, height) // 3
    top, left = (height - side) // 2, (width - side) // 2
    frame[:, top : top + side, left : left + side] = 255
    return Clip(write_frames_mp4(path, frame, 12))


@pytest.mark.parametrize("source", [(320, 180), (180, 320), (234, 506)], ids=["16:9", "9:16", "9:19.5"])
def test_frames_are_never_squashed_at_any_long_side_the_app_offers(tmp_path, source):
    clip = square_clip(tmp_path / "square.mp4", *source)
    for long_side in range(64, 1025, 64):  # the page's "Size (long side, px)" choices
        width, height = clip_size(*source, long_side, long_side)
        frame = next(decode_frames(clip, range(1), (width, height), lambda num_frames: None))
        assert frame.shape == (height, width, 3) and max(width, height) == long_side
        # the frame's shape is the source's to the nearest multiple of 8
        assert abs(min(width, height) - long_side * min(source) / max(source)) <= 4
        # and its picture is not squashed: the square's extent across and down (its mass along the middle row and
        # column, which bilinear scaling keeps) agree within 2 %
        white = np.clip((frame[..., 1].astype(float) - 64) / (255 - 64), 0, 1)
        across, down = white[height // 2].sum(), white[:, width // 2].sum()
        assert across / down == pytest.approx(1, rel=0.02), (long_side, across, down)


# Decoding the tuned frames -------------------------------------------------------------------------------------------


def test_decode_frames_streams_the_window_at_the_size(clip):
    window = tuned_window(clip.info.num_frames, 5, 3, 4)
    frames = decode_frames(clip, window, (40, 32), lambda num_frames: None)
    first = next(frames)  # a generator: frames come one by one
    assert first.shape == (32, 40, 3) and first.dtype == np.uint8
    assert frame_indices(np.stack([first, *frames])) == [3, 7, 11, 15, 19]


def test_decode_frames_past_the_end_of_an_intact_clip(clip):
    # A check that does not raise leaves the reader's error (the truncated-file case is in test_readers.py).
    frames = decode_frames(clip, range(0, 36, 4), (WIDTH, HEIGHT), lambda num_frames: None)
    with pytest.raises(FramesMissingError, match=r"has 30 frames, cannot read frame 32$"):
        assert frame_indices(np.stack([next(frames) for _ in range(8)])) == list(range(0, 32, 4))
        next(frames)


# Shipped sample clip -----------------------------------------------------------------------------------------------


def test_sample_clip_has_video_and_audio():
    assert SAMPLE_CLIP.stat().st_size < 300 * 1024
    assert Clip(SAMPLE_CLIP).info == VideoInfo(48, Fraction(24), 256, 256, 0.0)
    with av.open(str(SAMPLE_CLIP)) as container:
        (video,) = container.streams.video
        (audio,) = container.streams.audio
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) == pytest.approx(2.0, abs=0.1)
        # The track is a real tone, not silence.
        samples = np.concatenate([frame.to_ndarray().ravel() for frame in container.decode(audio)])
    assert np.abs(samples).max() > 0.1


@pytest.mark.e2e
def test_make_sample_clip_script(tmp_path):
    output = tmp_path / "clip.mp4"
    script = ROOT / "data" / "make_sample_clip.py"
    subprocess.run([sys.executable, str(script), "--output", str(output), "--num_frames", "12", "--size", "64"],
                   check=True, capture_output=True)
    clip = Clip(output)
    assert clip.info == VideoInfo(12, Fraction(24), 64, 64, 0.0)
    frames = clip.read([0, 11])
    # The disk moves: first and last frames differ.
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 5



def test_frames_of_a_variable_rate_are_repeated_to_their_own_times_at_a_constant_rate():
    # 3 frames 1/30 s apart, then 2 frames 1/15 s apart, the last shown for 1/10 s
    rate, repeats = shown_at_constant_rate([0, 1 / 30, 2 / 30, 4 / 30, 6 / 30], 9 / 30)
    assert rate == 30 and repeats == [1, 1, 2, 2, 3]
    starts = np.cumsum([0, *repeats[:-1]]) / float(rate)
    np.testing.assert_allclose(starts, [0, 1 / 30, 2 / 30, 4 / 30, 6 / 30])  # each frame appears at its own time
    # a constant rate stays itself, one slot per frame
    assert shown_at_constant_rate([i / 12 for i in range(5)], 5 / 12) == (12, [1] * 5)
