"""Bad video files: each ends in frames or in one clear error naming the file, for every reader.

A table of bad inputs (missing file, a directory, text, random bytes, images, audio-only files, zero-frame videos) is
run through ``video_info``, ``read_video_frames`` and ``TuneAVideoDataset`` with each reader; truncated and damaged
MP4s may decode (fewer frames, or all) or fail with VideoReadError, and when fewer frames decode than the file lists,
the count reported (and used by ClipTooShortError) is the decodable one.

The clips are made here with the ffmpeg binary of imageio-ffmpeg (``testsrc``: 64x48, 30 frames, 12 fps, H.264).
"""

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import av
import imageio.v2 as iio
import imageio_ffmpeg
import numpy as np
import pytest

from tuneavideo.data.dataset import (
    VIDEO_BACKENDS,
    ClipTooShortError,
    TuneAVideoDataset,
    VideoReadError,
    backend_available,
    read_video_frames,
    video_info,
)

REPO = Path(__file__).resolve().parents[1]
NUM_FRAMES, FPS, WIDTH, HEIGHT = 30, 12, 64, 48
# Every message says what to do about the problem, in one of these words.
ACTIONS = ("give ", "check ", "re-encode", "copy ", "use ", "sample fewer")




BACKENDS = [name if backend_available(name) else pytest.param(name, marks=pytest.mark.skip("not installed"))
            for name in VIDEO_BACKENDS]


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args], check=True)


def encode_clip(path: Path, *extra: str, frames: int = NUM_FRAMES) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={WIDTH}x{HEIGHT}:rate={FPS}", "-frames:v", str(frames),
           "-c:v", "libx264", "-g", "8", "-pix_fmt", "yuv420p", *extra, str(path))
    return path


def mp4_boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level MP4 boxes: type -> (start, end) byte offsets."""
    boxes, start = {}, 0
    while start + 8 <= len(data):
        size = int.from_bytes(data[start : start + 4], "big")
        boxes[data[start + 4 : start + 8]] = (start, start + size)
        start += size
    return boxes


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Every test file, by name, made once for the module."""
    root = tmp_path_factory.mktemp("bad videos")  # a space in the path on purpose
    files: dict[str, Path] = {}

    def add(name: str, data: bytes) -> None:
        files[name] = root / name
        files[name].write_bytes(data)

    # Two layouts of the same clip: the index ("moov") after the frames (ffmpeg's default) or before them.
    files["moov last.mp4"] = encode_clip(root / "moov last.mp4")
    files["moov first.mp4"] = encode_clip(root / "moov first.mp4", "-movflags", "+faststart")
    files["one frame.mp4"] = encode_clip(root / "one frame.mp4", frames=1)
    for name in ("moov last.mp4", "moov first.mp4"):
        data = files[name].read_bytes()
        for percent in (10, 50, 90):
            add(f"{name[:-4]} cut {percent}%.mp4", data[: len(data) * percent // 100])
        # 300 random bytes in the middle: inside the frame data for "moov last", inside the index for "moov first".
        middle = len(data) // 2
        noise = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
        add(f"{name[:-4]} damaged.mp4", data[:middle] + noise + data[middle + 300 :])
    # Frame 20's data starts with an impossible NAL unit length: every packet is present, but decoding stops there.
    data = bytearray(files["moov last.mp4"].read_bytes())
    with av.open(str(files["moov last.mp4"])) as container:
        positions = [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size]
    data[positions[20] : positions[20] + 4] = b"\xff\xff\xff\xff"
    add("moov last frame 20 damaged.mp4", bytes(data))
    header = files["moov first.mp4"].read_bytes()
    add("header only.mp4", header[: mp4_boxes(header)[b"moov"][1]])  # lists 30 frames, holds none
    # The frame table claims 0xCB000000 (3.4 billion) frames for its first entry: raw decord 0.6.0 aborts the
    # interpreter on this (C++ std::bad_alloc); found by tests/test_fuzz.py.
    patched = bytearray(header)
    stts = patched.find(b"stts")
    patched[stts + 12 : stts + 16] = (0xCB000000).to_bytes(4, "big")
    add("billions of frames.mp4", bytes(patched))

    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={WIDTH}x{HEIGHT}:rate={FPS}", "-frames:v", "0", str(root / "zero.avi"))
    files["zero frames.avi"] = root / "zero.avi"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac", str(root / "audio.m4a"))
    files["audio only.m4a"] = root / "audio.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", str(root / "audio.wav"))
    files["audio only.wav"] = root / "audio.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac", "-f", "mp4", str(root / "audio.mp4"))
    files["audio only.mp4"] = root / "audio.mp4"

    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, : WIDTH // 2] = 200
    for kind, suffix in (("png", ".png"), ("png", ".mp4"), ("jpeg", ".jpg"), ("jpeg", ".mp4")):
        path = root / f"{kind} image{suffix}"
        iio.imwrite(path, image, format=kind.replace("jpeg", "jpg") if suffix == ".mp4" else None)
        files[f"{kind} image{suffix}"] = path
    add("text.mp4", b"this is not a video\n")
    add("random bytes.mp4", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add("empty.mp4", b"")
    files["a directory.mp4"] = root / "a directory.mp4"
    files["a directory.mp4"].mkdir()
    files["missing.mp4"] = root / "missing.mp4"
    return files


def check_message(error: Exception, path: Path, pattern: str) -> None:
    """One line, starting with the file's path, matching ``pattern`` and saying what to do."""
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert any(action in message for action in ACTIONS), f"no advice in {message!r}"


def make_dataset(path: Path, backend: str, n_sample_frames: int = 1) -> TuneAVideoDataset:
    return TuneAVideoDataset(path, "a clip", 64, 64, n_sample_frames, 0, 1, backend=backend, keep_aspect=True)


NOT_DECODABLE = r"cannot be read as a video"
# name -> what the message says, for every reader or per reader where they differ (imageio-ffmpeg only reports that
# FFmpeg could not read the file's metadata, where PyAV names the missing stream or frames).
REJECTED: dict[str, str | dict[str, str]] = {
    "missing.mp4": r"no such video file; check the path",
    "a directory.mp4": r"is a directory, not a video file",
    "empty.mp4": r"is empty \(0 bytes\)",
    "text.mp4": NOT_DECODABLE,
    "random bytes.mp4": NOT_DECODABLE,
    "png image.png": r"is a PNG image, not a video",
    "png image.mp4": r"is a PNG image, not a video",
    "jpeg image.jpg": r"is a JPEG image, not a video",
    "jpeg image.mp4": r"is a JPEG image, not a video",
    "audio only.m4a": {"decord": r"has no video stream", "pyav": r"has no video stream", "imageio": NOT_DECODABLE},
    "audio only.wav": {"decord": r"has no video stream", "pyav": r"has no video stream", "imageio": NOT_DECODABLE},
    "audio only.mp4": {"decord": r"has no video stream", "pyav": r"has no video stream", "imageio": NOT_DECODABLE},
    "zero frames.avi": {"decord": r"has no decodable video frames", "pyav": r"has no decodable video frames",
                        "imageio": NOT_DECODABLE},
    "header only.mp4": {"decord": r"has no decodable video frames", "pyav": r"has no decodable video frames",
                        "imageio": NOT_DECODABLE},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(REJECTED))
def test_bad_file_is_rejected(media, name, backend):
    path = media[name]
    pattern = REJECTED[name] if isinstance(REJECTED[name], str) else REJECTED[name][backend]
    calls: dict[str, Callable[[], object]] = {
        "video_info": lambda: video_info(path, backend),
        "read one frame": lambda: read_video_frames(path, [0], backend),
        "read all frames": lambda: read_video_frames(path, None, backend),
        "dataset": lambda: make_dataset(path, backend),
    }
    for call in calls.values():
        with pytest.raises(VideoReadError) as info:
            call()
        check_message(info.value, path, pattern)


CUT_OR_DAMAGED = [f"moov {where} {what}.mp4" for where in ("last", "first")
                  for what in ("cut 10%", "cut 50%", "cut 90%", "damaged")] + ["moov last frame 20 damaged.mp4"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CUT_OR_DAMAGED)
def test_truncated_or_damaged_mp4_decodes_or_fails_clearly(media, name, backend):
    path = media[name]
    try:
        info = video_info(path, backend)
    except VideoReadError as err:
        check_message(err, path, r"cannot be read as a video|no decodable video frames|cannot be decoded")
        info = None
    try:
        frames = read_video_frames(path, None, backend)
    except VideoReadError as err:
        check_message(err, path, r"cannot be read as a video|no decodable video frames|cannot be decoded|"
                                 r"decoding failed")
        frames = None
    if frames is not None:
        assert frames.dtype == np.uint8 and frames.shape[1:] == (HEIGHT, WIDTH, 3)
        assert 1 <= len(frames) <= NUM_FRAMES
    if info is not None:
        assert (info.width, info.height) == (WIDTH, HEIGHT)
        assert 1 <= info.num_frames <= NUM_FRAMES
        if "cut" in name and frames is not None:
            assert info.num_frames == len(frames), "the frame count must be the decodable one"
    # Asking for every frame the file lists: all of them, or an error that is accurate about what there is.
    try:
        dataset = make_dataset(path, backend, n_sample_frames=NUM_FRAMES)
    except ClipTooShortError as err:
        assert info is not None and frames is not None
        fewer = info.num_frames if info.num_frames < NUM_FRAMES else len(frames)
        check_message(err, path, rf"has {fewer} frames but n_sample_frames={NUM_FRAMES}")
    except VideoReadError as err:
        check_message(err, path, r"cannot be read|no decodable|cannot be decoded|decoding failed")
    else:
        assert dataset[0]["pixel_values"].shape[0] == NUM_FRAMES


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_clip_reports_the_frames_that_decode(media, backend):
    path = media["moov first cut 90%.mp4"]  # the index lists 30 frames; the data of the last ones is cut off
    decodable = len(read_video_frames(path, None, backend))
    assert 1 <= decodable < NUM_FRAMES
    assert video_info(path, backend).num_frames == decodable
    with pytest.raises(ClipTooShortError) as info:
        make_dataset(path, backend, n_sample_frames=NUM_FRAMES)
    check_message(info.value, path, rf"has {decodable} frames but n_sample_frames={NUM_FRAMES}.*"
                                    rf"use n_sample_frames<={decodable}")
    assert make_dataset(path, backend, n_sample_frames=decodable).frames.shape[0] == decodable


def test_frames_that_stop_decoding_give_an_accurate_short_clip_error(media):
    # All packets are present (so the listed 30 frames are believed) but decoding fails part-way: the dataset's error
    # must count the frames that decode, not the 30 listed.
    path = media["moov last frame 20 damaged.mp4"]
    assert video_info(path, "pyav").num_frames == NUM_FRAMES
    decodable = len(read_video_frames(path, None, "pyav"))
    assert 1 <= decodable < NUM_FRAMES
    with pytest.raises(VideoReadError, match=rf"decoding stops after {decodable} frames .*sample fewer frames"):
        read_video_frames(path, [NUM_FRAMES - 1], "pyav")
    with pytest.raises(ClipTooShortError) as info:
        make_dataset(path, "pyav", n_sample_frames=NUM_FRAMES)
    check_message(info.value, path, rf"has {decodable} frames .* \(only {decodable} of the {NUM_FRAMES} frames it "
                                    r"lists decode: the file is truncated or damaged\)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frame_video(media, backend):
    path = media["one frame.mp4"]
    assert video_info(path, backend).num_frames == 1
    assert read_video_frames(path, None, backend).shape == (1, HEIGHT, WIDTH, 3)
    assert make_dataset(path, backend, n_sample_frames=1)[0]["pixel_values"].shape[0] == 1
    with pytest.raises(ClipTooShortError) as info:
        make_dataset(path, backend, n_sample_frames=24)
    check_message(info.value, path, r"has 1 frame but n_sample_frames=24,.*; use n_sample_frames<=1$")


def test_frame_table_listing_billions_of_frames_does_not_crash(media):
    # In a subprocess (one for all readers: each start imports torch): should the guard in front of decord regress,
    # decord aborts the interpreter rather than raising.
    code = (
        "import sys; from tuneavideo.data.dataset import read_video_frames, video_info\n"
        "for backend in sys.argv[2:]:\n"
        "    print(backend, *video_info(sys.argv[1], backend), *read_video_frames(sys.argv[1], None, backend).shape)"
    )
    backends = [name for name in VIDEO_BACKENDS if backend_available(name)]
    result = subprocess.run([sys.executable, "-c", code, str(media["billions of frames.mp4"]), *backends],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    # The frames are intact: every reader decodes all 30 (decord's is handed to PyAV, which counts what decodes).
    expected = [f"{name} {NUM_FRAMES} {float(FPS)} {WIDTH} {HEIGHT} {NUM_FRAMES} {HEIGHT} {WIDTH} 3"
                for name in backends]
    assert result.stdout.splitlines() == expected, result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_48_pixels_wide_reads_with_every_reader(tmp_path, backend):
    # decord 0.6.0 fails on this valid clip ("from_size == to_size (6144 vs. 4608)"); its reader falls back to PyAV.
    path = encode_clip(tmp_path / "narrow.mp4", "-vf", "scale=48:32", frames=5)
    assert tuple(video_info(path, backend)) == (5, float(FPS), 48, 32)
    assert read_video_frames(path, [4, 0], backend).shape == (2, 32, 48, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_whose_frame_size_changes_reads_at_one_size(tmp_path, backend):
    # Two H.264 streams of different sizes joined into one (as joined or cut-together files can be).
    parts = []
    for size in ("64x48", "32x32"):
        part = tmp_path / f"{size}.h264"
        ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate={FPS}", "-frames:v", "5", "-c:v", "libx264",
               "-pix_fmt", "yuv420p", "-bsf:v", "h264_mp4toannexb", str(part))
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.h264"
    joined.write_bytes(b"".join(parts))
    path = tmp_path / "joined.mp4"
    ffmpeg("-i", str(joined), "-c", "copy", str(path))
    info = video_info(path, backend)
    assert (info.width, info.height) == (64, 48)
    frames = read_video_frames(path, None, backend)  # PyAV used to fail here stacking frames of two sizes
    assert len(frames) >= 5 and frames.shape[1:] == (48, 64, 3)
