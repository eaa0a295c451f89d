"""Tests for tuneavideo.data.dataset and the shipped sample clip.

The test clip is written here with imageio: frame i has its left half at grey level ``8 * i`` and its right half at
``255 - 8 * i``, so the decoded pixels tell which source frame was sampled (and whether left/right survived).
"""

import subprocess
import sys
from pathlib import Path

import imageio.v2 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from tuneavideo.data.dataset import (
    VIDEO_BACKENDS,
    ClipTooShortError,
    TuneAVideoDataset,
    VideoReadError,
    backend_available,
    fit_size,
    read_video_frames,
    resize_frames,
    sample_frame_indices,
    select_backend,
    video_info,
)

REPO = Path(__file__).resolve().parents[1]
NUM_FRAMES, FPS, WIDTH, HEIGHT = 30, 12, 64, 48
STEP = 8  # grey-level step per frame index




INSTALLED = [name for name in VIDEO_BACKENDS if backend_available(name)]
# Parametrize over every reader, skipping (not silently dropping) the ones not installed here.
BACKENDS = [name if name in INSTALLED else pytest.param(name, marks=pytest.mark.skip("not installed"))
            for name in VIDEO_BACKENDS]


def index_frames(num_frames: int = NUM_FRAMES, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, :, : width // 2] = STEP * i
        frames[i, :, width // 2 :] = 255 - STEP * i
    return frames


def decode_indices(frames: np.ndarray) -> list[int]:
    """Recover the source frame index of each (f, H, W, 3) uint8 frame from its left half."""
    width = frames.shape[2]
    return [round(float(f[:, : width // 2].mean()) / STEP) for f in frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "index clip.mp4"  # a space in the name on purpose
    # crf 0: lossless in YUV, so the flat grey levels come back exactly (up to YUV<->RGB rounding).
    writer = iio.get_writer(
        path, format="ffmpeg", fps=FPS, codec="libx264", quality=None, pixelformat="yuv420p",
        macro_block_size=16, output_params=["-crf", "0"],
    )
    for frame in index_frames():
        writer.append_data(frame)
    writer.close()
    return path


def make_dataset(path: Path, **overrides) -> TuneAVideoDataset:
    settings = dict(
        prompt="a test clip", width=40, height=32, n_sample_frames=5, sample_start_idx=3, sample_frame_rate=4
    )
    settings.update(overrides)
    return TuneAVideoDataset(path, **settings)


# Frame index sampling -------------------------------------------------------------------------------------------------


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
def test_sample_frame_indices(num_frames, n, start, rate, expected):
    assert sample_frame_indices(num_frames, n, start, rate) == expected


def test_short_clip_error_says_what_fits():
    with pytest.raises(ClipTooShortError) as info:
        sample_frame_indices(30, 24, 0, 2, path="data/x.mp4")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data/x.mp4: has 30 frames")
    assert "n_sample_frames=24" in message and "sample_frame_rate=2" in message
    assert "n_sample_frames<=15" in message  # range(0, 30, 2) has 15 entries
    assert "sample_frame_rate<=1" in message  # 24 frames at rate 1 need indices 0..23
    assert "sample_start_idx<=" not in message  # no start index makes 24 frames at rate 2 fit


def test_short_clip_error_suggests_earlier_start():
    with pytest.raises(ClipTooShortError, match=r"sample_start_idx<=11$"):
        sample_frame_indices(30, 10, 15, 2)  # needs frame 33; starting at 11 ends at the last frame, 29


def test_impossible_sampling_settings():
    with pytest.raises(ValueError, match="sample_frame_rate >= 1"):
        sample_frame_indices(30, 4, 0, 0)


def test_start_past_end():
    with pytest.raises(ClipTooShortError, match=r"sample_start_idx=30 is past its end; use sample_start_idx<=29"):
        sample_frame_indices(30, 1, 30, 1)


# Dataset ----------------------------------------------------------------------------------------------------------


def test_dataset_samples_the_requested_frames(clip):
    dataset = make_dataset(clip)
    assert len(dataset) == 1
    assert dataset.frame_indices == [3, 7, 11, 15, 19]
    assert dataset.source_fps == pytest.approx(FPS)
    item = dataset[0]
    pixels = item["pixel_values"]
    assert pixels.shape == (5, 3, 32, 40)  # (frames, channels, height, width), resized from 64x48
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    as_uint8 = ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert decode_indices(as_uint8) == [3, 7, 11, 15, 19]
    # The right half holds the complementary level: checks left/right (and so width/height) were not swapped.
    right = as_uint8[:, 4:-4, 24:].astype(float).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(right, [255 - STEP * i for i in (3, 7, 11, 15, 19)], atol=1.5)


def test_dataset_scaling_is_x_over_127_5_minus_1(clip):
    dataset = make_dataset(clip, width=WIDTH, height=HEIGHT, n_sample_frames=NUM_FRAMES, sample_start_idx=0,
                           sample_frame_rate=1)
    pixels = dataset[0]["pixel_values"]
    raw = read_video_frames(clip)
    expected = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    assert pixels[0, :, :, : WIDTH // 2].max() == -1.0  # frame 0 left half is black
    assert pixels[0, :, :, WIDTH // 2 :].min() == 1.0  # and its right half white


def test_dataset_decodes_once(clip, tmp_path):
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(clip.read_bytes())
    dataset = make_dataset(copy)
    first = dataset[0]["pixel_values"]
    copy.unlink()  # a dataset that re-decoded on every __getitem__ would fail now
    torch.testing.assert_close(dataset[0]["pixel_values"], first)


def test_prompt_ids_are_passed_through(clip):
    ids = torch.arange(77)
    item = make_dataset(clip, prompt_ids=ids)[0]
    assert torch.equal(item["prompt_ids"], ids)
    dataset = make_dataset(clip)
    assert "prompt_ids" not in dataset[0]
    dataset.prompt_ids = ids  # assigned after construction, as the original training script did
    assert torch.equal(dataset[0]["prompt_ids"], ids)
    with pytest.raises(IndexError):
        dataset[1]


def test_dataset_rejects_short_clip_at_construction(clip):
    with pytest.raises(ClipTooShortError) as info:
        make_dataset(clip, n_sample_frames=24, sample_start_idx=0, sample_frame_rate=2)
    message = str(info.value)
    assert str(clip) in message and "has 30 frames" in message
    assert "n_sample_frames<=15" in message and "sample_frame_rate<=1" in message


def test_dataloader_batches_the_item(clip):
    loader = torch.utils.data.DataLoader(make_dataset(clip, prompt_ids=torch.zeros(77, dtype=torch.long)))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (1, 5, 3, 32, 40)
    assert batch["prompt_ids"].shape == (1, 77)


def test_resize_frames_is_exact_size_and_keeps_flat_colours():
    frames = np.full((2, 48, 64, 3), 200, np.uint8)
    frames[1] = 17
    out = resize_frames(frames, width=24, height=40)  # upscale one axis, downscale the other
    assert out.shape == (2, 3, 40, 24) and out.dtype == torch.uint8
    assert out[0].unique().tolist() == [200] and out[1].unique().tolist() == [17]


@pytest.mark.parametrize(
    "source, long_side, expected",
    [
        ((256, 256), 512, (512, 512)),  # square stays square: as before the aspect ratio was kept
        ((718, 718), 64, (64, 64)),
        ((1920, 1080), 512, (512, 320)),  # 16:9: 288 rounds (half up) to 320
        ((1080, 1920), 512, (320, 512)),  # portrait
        ((1280, 720), 768, (768, 448)),
        ((640, 480), 500, (448, 320)),  # the long side rounds down to a multiple of 64
        ((4000, 100), 512, (512, 64)),  # at least one multiple on each side
        ((64, 48), 40, (64, 64)),
    ],
)
def test_fit_size(source, long_side, expected):
    assert fit_size(*source, long_side) == expected
    assert all(side % 64 == 0 for side in expected)


def test_fit_size_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        fit_size(0, 10, 512)


def test_dataset_keeps_the_aspect_ratio_when_asked(clip):
    dataset = make_dataset(clip, width=256, height=256, keep_aspect=True)  # the clip is 64x48: 4:3
    assert (dataset.width, dataset.height) == fit_size(WIDTH, HEIGHT, 256) == (256, 192)
    assert dataset[0]["pixel_values"].shape == (5, 3, 192, 256)
    squashed = make_dataset(clip, width=256, height=256)  # the original's exact size
    assert (squashed.width, squashed.height) == (256, 256)


# Readers ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_info(clip, backend):
    info = video_info(clip, backend)
    assert tuple(info) == (NUM_FRAMES, pytest.approx(FPS), WIDTH, HEIGHT)
    assert isinstance(info.fps, float)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_returns_requested_frames_in_order(clip, backend):
    frames = read_video_frames(clip, [20, 0, 5, 5], backend)
    assert frames.shape == (4, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert decode_indices(frames) == [20, 0, 5, 5]
    assert decode_indices(read_video_frames(clip, None, backend)) == list(range(NUM_FRAMES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_rejects_index_past_end(clip, backend):
    with pytest.raises(VideoReadError, match="has 30 frames"):
        read_video_frames(clip, [0, 30], backend)


@pytest.mark.parametrize("path", [REPO / "data" / "sample.mp4", "index clip"])
def test_readers_agree(clip, path):
    path = clip if path == "index clip" else path
    if len(INSTALLED) < 2:
        pytest.skip("needs at least two video readers")
    infos = {b: video_info(path, b) for b in INSTALLED}
    frames = {b: read_video_frames(path, None, b).astype(np.int16) for b in INSTALLED}
    reference = INSTALLED[0]
    for backend in INSTALLED[1:]:
        assert infos[backend] == infos[reference]
        assert frames[backend].shape == frames[reference].shape
        # All three convert YUV to RGB through libswscale; allow a little rounding slack for other builds.
        assert np.abs(frames[backend] - frames[reference]).max() <= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    path = tmp_path / "missing.mp4"
    with pytest.raises(VideoReadError, match="no such video file") as info:
        video_info(path, backend)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(VideoReadError):
        TuneAVideoDataset(path, "p", 32, 32, 1, 0, 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["text", "audio only"])
def test_not_a_video(tmp_path, backend, kind):
    path = tmp_path / "not a video.mp4"
    if kind == "text":
        path.write_text("this is not a video\n")
    else:
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2",
                   "-c:a", "aac", "-f", "mp4", str(path)]
        subprocess.run(command, check=True)
    for call in (lambda: video_info(path, backend), lambda: read_video_frames(path, [0], backend)):
        with pytest.raises(VideoReadError) as info:
            call()
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_select_backend():
    assert select_backend() == INSTALLED[0]
    with pytest.raises(ValueError, match="unknown video backend"):
        select_backend("opencv")


def test_backend_fallback_order(clip, monkeypatch):
    # A None entry in sys.modules makes `import x` raise ImportError, as if x were not installed.
    monkeypatch.setitem(sys.modules, "decord", None)
    if backend_available("pyav"):
        assert select_backend() == "pyav"
        assert make_dataset(clip).frame_indices == [3, 7, 11, 15, 19]
    monkeypatch.setitem(sys.modules, "av", None)
    if backend_available("imageio"):
        assert select_backend() == "imageio"
        assert decode_indices(read_video_frames(clip, [4, 9])) == [4, 9]
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ImportError, match="no video reader available"):
        select_backend()
    with pytest.raises(ImportError, match="install decord"):
        select_backend("decord")


# Shipped sample clip ----------------------------------------------------------------------------------------------


def test_sample_clip_has_video_and_audio():
    av = pytest.importorskip("av")
    path = REPO / "data" / "sample.mp4"
    assert path.stat().st_size < 300 * 1024
    assert tuple(video_info(path)) == (48, pytest.approx(24.0), 256, 256)
    with av.open(str(path)) as container:
        (video,) = container.streams.video
        (audio,) = container.streams.audio
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) == pytest.approx(2.0, abs=0.1)
        # The track is a real tone, not silence.
        samples = np.concatenate([frame.to_ndarray().ravel() for frame in container.decode(audio)])
    assert np.abs(samples).max() > 0.1


def test_make_sample_clip_script(tmp_path):
    output = tmp_path / "clip.mp4"
    script = REPO / "data" / "make_sample_clip.py"
    subprocess.run([sys.executable, str(script), "--output", str(output), "--num_frames", "12", "--size", "64"],
                   check=True, capture_output=True)
    assert tuple(video_info(output)) == (12, pytest.approx(24.0), 64, 64)
    frames = read_video_frames(output, [0, 11])
    # The disk moves: first and last frames differ.
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 5
