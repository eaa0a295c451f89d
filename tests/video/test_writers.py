"""Tests for tuneavideo.video.writers: grid layout, value conversion, GIF timing, browser-safe MP4 output streamed by
`Mp4Writer` (atomic: nothing under the final name unless complete) and the sound cut to the picture's length.

MP4s are read back with `Clip`, the package's one reader, and probed with PyAV (`tests.helpers.probe`).
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from tests.helpers import ffmpeg, frame_indices, index_frames, probe
from tuneavideo.video.readers import Clip
from tuneavideo.video.writers import (
    Mp4Writer,
    gif_durations_ms,
    grid_frames,
    make_grid,
    save_videos_grid,
    side_by_side,
    write_gif,
    write_mp4,
)


def _videos(b: int, t: int, h: int, w: int) -> torch.Tensor:
    """(b, 3, t, h, w) clips whose every frame is one flat colour, distinct per (video, frame)."""
    videos = torch.zeros(b, 3, t, h, w)
    for i in range(b):
        for j in range(t):
            videos[i, :, j] = torch.tensor([(i + 1) / (b + 1), j / t, 0.5])[:, None, None]
    return videos


# ---------------------------------------------------------------- make_grid


def test_make_grid_positions_match_hand_computed_layout():
    b, h, w = 5, 4, 6
    images = torch.stack([torch.full((3, h, w), float(k + 1)) for k in range(b)])
    grid = make_grid(images, columns=2, padding=2)
    # xmaps = 2 columns, ymaps = 3 rows; cells are (h+2) x (w+2) = 6 x 8 plus a 2 px border on top/left.
    assert grid.shape == (3, 3 * 6 + 2, 2 * 8 + 2)
    expected_offsets = [(2, 2), (2, 10), (8, 2), (8, 10), (14, 2)]
    canvas = torch.zeros_like(grid)
    for k, (top, left) in enumerate(expected_offsets):
        assert torch.all(grid[:, top : top + h, left : left + w] == k + 1)
        canvas[:, top : top + h, left : left + w] = k + 1
    # Everything else (padding and the empty sixth cell) is zero.
    assert torch.equal(grid, canvas)


def test_make_grid_default_columns_and_padding():
    images = torch.rand(6, 3, 5, 7)
    grid = make_grid(images)  # 4 per row -> 2 rows
    assert grid.shape == (3, 2 * 7 + 2, 4 * 9 + 2)
    assert torch.equal(grid[:, 9:14, 2:9], images[4])
    no_pad = make_grid(images, columns=3, padding=0)
    assert no_pad.shape == (3, 10, 21)
    assert torch.equal(no_pad[:, 5:10, 14:21], images[5])


def test_make_grid_single_image_unpadded_and_gray_to_rgb():
    image = torch.rand(1, 3, 5, 7)
    assert torch.equal(make_grid(image), image[0])
    gray = torch.rand(1, 1, 5, 7)
    out = make_grid(gray)
    assert out.shape == (3, 5, 7)
    assert all(torch.equal(out[c], gray[0, 0]) for c in range(3))
    gray_batch = make_grid(torch.rand(2, 1, 5, 7))
    assert gray_batch.shape == (3, 9, 20)


def test_make_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        make_grid(torch.rand(3, 5, 7))
    with pytest.raises(ValueError):
        make_grid(torch.rand(2, 3, 5, 7), columns=0)


# ---------------------------------------------------------------- value conversion


def test_grid_frames_rounds_clamps_and_zeroes_nan():
    values = [0.49 / 255, 0.51 / 255, 0.999 / 255, 1.49 / 255, 254.51 / 255, 1.7, -0.3, float("nan"), float("inf")]
    expected = [0, 1, 1, 1, 255, 255, 0, 0, 255]
    videos = torch.tensor(values).view(1, 1, 1, 1, -1)  # b=1 -> no grid padding, gray -> rgb
    frames = grid_frames(videos)
    assert frames.dtype == np.uint8 and frames.shape == (1, 1, len(values), 3)
    assert frames[0, 0, :, 0].tolist() == expected
    assert np.array_equal(frames[..., 0], frames[..., 2])


def test_grid_frames_rescale_and_layout():
    videos = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 1, 3)
    assert grid_frames(videos, rescale=True)[0, 0, :, 0].tolist() == [0, 128, 255]  # 127.5 rounds half to even
    frames = grid_frames(_videos(3, 4, 6, 5), columns=2)
    assert frames.shape == (4, 2 * 8 + 2, 2 * 7 + 2, 3)
    assert frames[:, 0, :].max() == 0 and frames[:, :, 0].max() == 0  # padding stays black
    assert frames[2, 10, 2].tolist() == [round(0.75 * 255), round(0.5 * 255), 128]  # video 2, frame 2


def test_grid_frames_accepts_half_precision():
    videos = torch.full((1, 3, 2, 4, 4), 0.5, dtype=torch.bfloat16)
    assert np.all(grid_frames(videos) == 128)


# ---------------------------------------------------------------- GIF


def test_gif_durations_average_to_exact_frame_time():
    assert gif_durations_ms(4, 8) == [130, 120, 130, 120]
    assert gif_durations_ms(3, 10) == [100, 100, 100]
    durations = gif_durations_ms(100, 12.5)
    assert set(durations) == {80}
    ntsc = gif_durations_ms(300, 30000 / 1001)
    assert abs(sum(ntsc) - 300 * 1001 / 30) <= 5 and all(d % 10 == 0 for d in ntsc)


def test_save_videos_grid_gif(tmp_path):
    path = tmp_path / "nested" / "dir" / "sample.gif"
    save_videos_grid(_videos(2, 6, 16, 20), str(path), fps=8)
    with Image.open(path) as gif:
        assert gif.n_frames == 6
        assert gif.size == (2 * 22 + 2, 16 + 4)
        assert gif.info["loop"] == 0
        durations, pixels = [], []
        for frame in ImageSequence.Iterator(gif):
            durations.append(frame.info["duration"])
            pixels.append(frame.convert("RGB").getpixel((2 + 22 + 5, 2 + 5)))
    assert sum(durations) == 6 * 125 and all(abs(d - 125) <= 5 for d in durations)
    # Second video, flat colours: GIF palettes hold them exactly.
    assert [p[1] for p in pixels] == [round(j / 6 * 255) for j in range(6)]
    assert all(p[0] == round(2 / 3 * 255) for p in pixels)
    assert not [p.name for p in path.parent.iterdir() if p.name != "sample.gif"]  # no temp files left


def test_write_gif_above_50_fps_keeps_every_kth_frame_at_real_speed(tmp_path):
    frames = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(12)])
    write_gif(frames, tmp_path / "fast.gif", 120)  # 3 frames of 120 fps per GIF frame of 40 fps
    with Image.open(tmp_path / "fast.gif") as gif:
        assert gif.n_frames == 4
        durations, firsts = [], []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
            firsts.append(np.asarray(gif.convert("RGB"))[0, 0, 0])
    assert sum(durations) == 100 and firsts == [0, 30, 60, 90]


# ---------------------------------------------------------------- MP4


def test_save_videos_grid_mp4_pads_to_even_size(tmp_path):
    path = tmp_path / "out" / "sample.mp4"
    save_videos_grid(_videos(1, 9, 15, 21), str(path), fps=8)
    assert probe(path) == dict(frames=9, fps=8, size=(22, 16), codec="h264", pix_fmt="yuv420p", audio_seconds=None)
    clip = Clip(path)
    frames = np.stack(list(clip.frames()))
    assert clip.info.fps == 8 and frames.shape == (9, 16, 22, 3)
    # Colour survives the yuv420p round trip (flat colours: only the BT.709 conversion error remains).
    expected = grid_frames(_videos(1, 9, 15, 21))[:, 7, 10].astype(int)
    assert np.abs(frames[:, 7, 10].astype(int) - expected).max() <= 6
    # The padding row/column repeats the edge instead of adding a black line.
    assert np.abs(frames[:, 15].astype(int) - frames[:, 14].astype(int)).max() <= 6


def test_save_videos_grid_columns(tmp_path):
    # n_rows is the original's name for the videos per row: 3 videos, 2 per row -> 2 rows of 2 cells
    save_videos_grid(_videos(3, 2, 6, 8), str(tmp_path / "grid.gif"), n_rows=2)
    with Image.open(tmp_path / "grid.gif") as gif:
        assert gif.size == (2 * 10 + 2, 2 * 8 + 2)


@pytest.mark.parametrize(("fps", "rate"), [(12.5, Fraction(25, 2)), (30000 / 1001, Fraction(30000, 1001))])
def test_write_mp4_fractional_fps_is_exact(tmp_path, fps, rate):
    frames = np.stack([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(10)])
    path = tmp_path / "frac.mp4"
    write_mp4(frames, path, fps)
    info = probe(path)
    assert info["fps"] == rate and info["frames"] == 10 and info["size"] == (48, 32)
    assert Clip(path).info.fps == rate
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) == pytest.approx(10 / rate, abs=1e-3)


def test_save_videos_grid_rejects_other_suffix(tmp_path):
    bad = tmp_path / "clip.avi"
    with pytest.raises(ValueError, match="clip.avi"):
        save_videos_grid(_videos(1, 2, 4, 4), str(bad))
    assert not bad.exists()


def test_write_mp4_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(np.zeros((2, 4, 4, 3), np.float32), tmp_path / "a.mp4", 8)
    with pytest.raises(ValueError):
        write_mp4(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "a.mp4", 0)
    assert not list(tmp_path.iterdir())


def _index_video(num_frames: int = 24) -> np.ndarray:
    return index_frames(num_frames, 48, 32)


def test_mp4_writer_streams_frames_one_by_one(tmp_path):
    path = tmp_path / "streamed.mp4"
    with Mp4Writer(path, 12) as writer:
        for count, frame in enumerate(_index_video(), 1):
            writer.write(frame)
            assert writer.count == count
        # the encoder is running and the file is not there yet: only a temporary one beside it
        assert writer._process.poll() is None
        assert not path.exists() and len(list(tmp_path.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["streamed.mp4"]
    assert probe(path) == dict(frames=24, fps=12, size=(48, 32), codec="h264", pix_fmt="yuv420p", audio_seconds=None)
    assert frame_indices(np.stack(list(Clip(path).frames()))) == list(range(24))


def test_mp4_writer_rejects_frames_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="frame 1 is 32x48, the video is 48x32"), Mp4Writer(tmp_path / "a.mp4", 8) as w:
        w.write(_index_video(1)[0])
        w.write(np.zeros((48, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames were written"), Mp4Writer(tmp_path / "b.mp4", 8):
        pass
    with pytest.raises(ValueError, match="needs its num_frames"):
        Mp4Writer(tmp_path / "c.mp4", 8, audio_path=tmp_path / "sound.wav")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("interruption", [RuntimeError("the model failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_mp4_writer_interrupted_leaves_nothing_behind(tmp_path, interruption, existing):
    path = tmp_path / "edit.mp4"
    if existing:
        path.write_bytes(b"the previous edit")
    with pytest.raises(type(interruption)), Mp4Writer(path, 8) as writer:
        for frame in _index_video(5):
            writer.write(frame)
        encoder = writer._process
        raise interruption
    assert encoder.poll() is not None  # ffmpeg was stopped, not left running
    if existing:
        assert path.read_bytes() == b"the previous edit"
    assert [p.name for p in tmp_path.iterdir()] == (["edit.mp4"] if existing else [])


@pytest.fixture(scope="module")
def tone(tmp_path_factory):
    """A 440 Hz tone of 3 s (amplitude 1/8), 44.1 kHz mono WAV."""
    path = tmp_path_factory.mktemp("sound") / "tone.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=3", path)
    return path


@pytest.mark.parametrize(("num_frames", "fps", "sound_s"), [(24, 12, 3.0), (10, 12.5, 3.0), (30, 8, 3.0),
                                                            (16, 8, 0.5)])
def test_write_mp4_with_sound_as_long_as_the_picture(tmp_path, tone, num_frames, fps, sound_s):
    sound = tone
    if sound_s < 3:  # shorter than the picture: padded with silence
        sound = tmp_path / "short.wav"
        ffmpeg("-i", tone, "-t", sound_s, sound)
    path = tmp_path / "with sound.mp4"
    write_mp4(_index_video(num_frames), path, fps, audio_path=sound)
    info = probe(path)
    assert (info["frames"], info["fps"], info["codec"]) == (num_frames, Fraction(fps), "h264")
    assert abs(info["audio_seconds"] - num_frames / fps) < 1 / fps
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio)])
    loud = np.abs(samples[: int(0.4 * audio.rate)]).max()
    spectrum = np.abs(np.fft.rfft(samples[: int(0.4 * audio.rate)]))
    assert loud > 0.1 and np.fft.rfftfreq(int(0.4 * audio.rate), 1 / audio.rate)[spectrum.argmax()] == 440
    if sound_s < num_frames / fps:
        assert np.abs(samples[int((sound_s + 0.1) * audio.rate) :]).max() < 0.01  # silence after the sound ends


def test_mp4_writer_with_sound_needs_the_frames_it_announced(tmp_path, tone):
    path = tmp_path / "short.mp4"
    message = "3 frames were written, not the num_frames=8 that the sound was cut to"
    with pytest.raises(ValueError, match=message), Mp4Writer(path, 8, tone, num_frames=8) as writer:
        for frame in _index_video(3):
            writer.write(frame)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- side_by_side


def test_side_by_side_resizes_to_common_height():
    a = np.full((3, 10, 8, 3), 50, np.uint8)
    b = np.full((3, 20, 10, 3), 200, np.uint8)
    out = side_by_side([a, b])
    assert out.shape == (3, 20, 16 + 10, 3)
    assert np.all(out[:, :, :16] == 50) and np.all(out[:, :, 16:] == 200)
    assert np.array_equal(side_by_side([b]), b)


def test_side_by_side_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same number of frames"):
        side_by_side([np.zeros((3, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)])
    with pytest.raises(ValueError):
        side_by_side([])
