"""Reading clips with `Clip` (tuneavideo/video/readers.py): a video file or a folder of frame images.

* The frames are the original's: decord's `VideoReader(path, width=W, height=H)` pixels, exactly, at every size.
* Every bad input ends in one line naming the file and saying what to do; truncated and damaged MP4s give exactly
  the frames pinned here (all of them equal to the intact clip's), or fail with the message pinned here.
* Frame folders read like videos, in the order of the numbers in their file names (then by name), the same pixels as
  the video they came from, resized as Video-P2P resized them (Pillow's bicubic `Image.resize`).

The clips are made here with the ffmpeg binary of imageio-ffmpeg (``testsrc``: 64x48, 30 frames, 12 fps, H.264 with
B-frames and a keyframe every 8 frames).
"""

from __future__ import annotations

import re
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    FFMPEG,
    MARKER,
    PHONE_TIMES,
    SAMPLE_CLIP,
    assert_same_pixels,
    ffmpeg,
    frame_indices,
    index_frames,
    marker_corner,
    marker_frames,
    watchdog,
    write_frames_mp4,
    write_index_clip,
    write_phone_clip,
    write_vfr_clip,
)
from tuneavideo.video.frames import ClipTooShortError, decode_frames, fit_size, tuned_window
from tuneavideo.video.readers import Clip, FramesMissingError, VideoInfo, VideoReadError

try:
    import decord
except ImportError:  # the reference reader of the original; the rest of the file does not need it
    decord = None

NUM_FRAMES, FPS, WIDTH, HEIGHT = 30, 12, 64, 48
# Every message says what to do about the problem, in one of these words.
ACTIONS = ("give ", "check ", "re-encode", "copy ", "use ", "sample fewer", "remove ")


def encode_clip(path: Path, *extra: str, frames: int = NUM_FRAMES) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={WIDTH}x{HEIGHT}:rate={FPS}", "-frames:v", frames,
           "-c:v", "libx264", "-g", "8", "-pix_fmt", "yuv420p", *extra, path)
    return path


def mp4_boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level MP4 boxes: type -> (start, end) byte offsets."""
    boxes, start = {}, 0
    while start + 8 <= len(data):
        size = int.from_bytes(data[start : start + 4], "big")
        boxes[data[start + 4 : start + 8]] = (start, start + size)
        start += size
    return boxes


def all_frames(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    return np.stack(list(Clip(path).frames(size)))


def check_message(error: Exception, path: Path | str, pattern: str) -> None:
    """One line, starting with the path, matching `pattern` and saying what to do."""
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert any(action in message for action in ACTIONS), f"no advice in {message!r}"




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
        # 300 random bytes in the middle of the file: they land in a keyframe's data (frame 16, or 8 with the index
        # first, which moves the frames back).
        middle = len(data) // 2
        noise = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
        add(f"{name[:-4]} damaged.mp4", data[:middle] + noise + data[middle + 300 :])
    # The 21st packet (frame 19: B-frames come after the frame they lean on) starts with an impossible NAL unit length:
    # every packet is present, but decoding stops there.
    data = bytearray(files["moov last.mp4"].read_bytes())
    with av.open(str(files["moov last.mp4"])) as container:
        positions = [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size]
    data[positions[20] : positions[20] + 4] = b"\xff\xff\xff\xff"
    add("moov last frame 19 damaged.mp4", bytes(data))
    header = files["moov first.mp4"].read_bytes()
    add("header only.mp4", header[: mp4_boxes(header)[b"moov"][1]])  # lists 30 frames, holds none
    # The frame table claims 0xCB000000 (3.4 billion) frames for its first entry: decord 0.6.0 aborted the interpreter
    # on this (C++ std::bad_alloc); found by tests/test_fuzz.py.
    patched = bytearray(header)
    stts = patched.find(b"stts")
    patched[stts + 12 : stts + 16] = (0xCB000000).to_bytes(4, "big")
    add("billions of frames.mp4", bytes(patched))

    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={WIDTH}x{HEIGHT}:rate={FPS}", "-frames:v", "0", root / "zero.avi")
    files["zero frames.avi"] = root / "zero.avi"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac", root / "audio.m4a")
    files["audio only.m4a"] = root / "audio.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", root / "audio.wav")
    files["audio only.wav"] = root / "audio.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac", "-f", "mp4", root / "audio.mp4")
    files["audio only.mp4"] = root / "audio.mp4"

    image = Image.fromarray(index_frames(1)[0])
    for kind, suffix in (("PNG", ".png"), ("PNG", ".mp4"), ("JPEG", ".jpg"), ("JPEG", ".mp4"), ("BMP", ".bmp"),
                         ("BMP", ".mp4"), ("WEBP", ".webp")):
        name = f"{kind.lower()} image{suffix}"
        image.save(root / name, format=kind)
        files[name] = root / name
    add("text.mp4", b"this is not a video\n")
    add("random bytes.mp4", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add("empty.mp4", b"")
    files["a directory.mp4"] = root / "a directory.mp4"
    files["a directory.mp4"].mkdir()
    files["missing.mp4"] = root / "missing.mp4"
    return files


@pytest.fixture(scope="module")
def index_clip(tmp_path_factory) -> Path:
    return write_index_clip(tmp_path_factory.mktemp("clips") / "index clip.mp4", NUM_FRAMES, FPS, WIDTH, HEIGHT)


@pytest.fixture(scope="module")
def wide_clip(tmp_path_factory) -> Path:
    """A 16:9 clip with detail in every frame (160x90, 12 frames, 24 fps): resizing shows in its pixels."""
    path = tmp_path_factory.mktemp("clips") / "wide.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x90:rate=24", "-frames:v", 12, "-c:v", "libx264",
           "-pix_fmt", "yuv420p", path)
    return path


# The original's pixels -------------------------------------------------------------------------------------------

SIZES = {"square": (64, 64), "fit_size of 16:9": fit_size(1920, 1080, 512), "odd": (77, 45), "native": None}


@pytest.mark.skipif(decord is None, reason="decord is not importable: it is the reference for the original's pixels")
@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("which", ["sample clip", "wide clip"])
def test_frames_equal_decords(which, size, wide_clip):
    path = SAMPLE_CLIP if which == "sample clip" else wide_clip
    clip = Clip(path)
    width, height = size or (clip.info.width, clip.info.height)
    reference = decord.VideoReader(str(path), width=width, height=height) if size else decord.VideoReader(str(path))
    assert clip.info.num_frames == len(reference) and clip.info.fps == Fraction(reference.get_avg_fps())
    ours = np.stack(list(clip.frames(size)))
    assert ours.shape == (len(reference), height, width, 3) and ours.dtype == np.uint8
    assert_same_pixels(ours, reference.get_batch(list(range(len(reference)))).asnumpy())
    indices = [5, 0, 11, 5]  # any order, repeats
    assert_same_pixels(clip.read(indices, size), reference.get_batch(indices).asnumpy())


# Frame selection -------------------------------------------------------------------------------------------------


def test_info(index_clip):
    info = Clip(index_clip).info
    assert info == VideoInfo(NUM_FRAMES, Fraction(FPS), WIDTH, HEIGHT, 0.0)
    assert isinstance(info.fps, Fraction)


def test_frames_are_the_requested_ones(index_clip):
    clip = Clip(index_clip)
    assert frame_indices(all_frames(index_clip)) == list(range(NUM_FRAMES))
    assert frame_indices(np.stack(list(clip.frames(start=3, stop=20, step=4)))) == [3, 7, 11, 15, 19]
    assert frame_indices(np.stack(list(clip.frames(start=28, stop=32, step=4)))) == [28]  # 32 is not asked for
    assert frame_indices(clip.read([20, 0, 5, 5])) == [20, 0, 5, 5]
    # Left and right halves kept their levels (255 - 8 i on the right): width and height were not swapped.
    right = clip.read([3], (40, 32))[0, 4:-4, 24:]
    assert abs(float(right.mean()) - (255 - 8 * 3)) < 3


def test_frames_past_the_end(index_clip):
    clip = Clip(index_clip)
    given = []
    with pytest.raises(FramesMissingError, match=r"index clip.mp4: has 30 frames, cannot read frame 32$") as info:
        given.extend(clip.frames(start=28, stop=40, step=4))
    assert frame_indices(np.stack(given)) == [28] and info.value.num_frames == NUM_FRAMES
    with pytest.raises(FramesMissingError, match=r"has 30 frames, cannot read frame 30$"):
        clip.read([0, 30])


# Bad files -------------------------------------------------------------------------------------------------------

NOT_DECODABLE = r"cannot be read as a video \(.*Invalid data found when processing input.*\); check that it plays"
REJECTED = {
    "missing.mp4": r"no such video file; check the path$",
    "a directory.mp4": r"is a folder with no frame images \(.jpg, .jpeg, .png, .bmp, .webp\); give a video file",
    "empty.mp4": r"is empty \(0 bytes\); copy or export the video again$",
    "text.mp4": NOT_DECODABLE,
    "random bytes.mp4": NOT_DECODABLE,
    "png image.png": r"is a PNG image, not a video; give a video file",
    "png image.mp4": r"is a PNG image, not a video; give a video file",
    "jpeg image.jpg": r"is a JPEG image, not a video; give a video file",
    "jpeg image.mp4": r"is a JPEG image, not a video; give a video file",
    "bmp image.bmp": r"is a BMP image, not a video; give a video file",  # not a video of 1 frame
    "bmp image.mp4": r"is a BMP image, not a video; give a video file",
    "webp image.webp": r"is a WebP image, not a video; give a video file",
    "audio only.m4a": r"has no video stream \(audio only, or a damaged file\); give a file with video$",
    "audio only.wav": r"has no video stream \(audio only, or a damaged file\); give a file with video$",
    "audio only.mp4": r"has no video stream \(audio only, or a damaged file\); give a file with video$",
    "zero frames.avi": r"has no decodable video frames; it is empty, truncated or damaged: check that it plays",
    "header only.mp4": r"has no decodable video frames; it is empty, truncated or damaged: check that it plays",
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_bad_file_is_rejected(media, name):
    with pytest.raises(VideoReadError) as info:
        Clip(media[name])
    check_message(info.value, media[name], REJECTED[name])


# name -> (frames the file lists, frames that decode), or what the error opening it says. Every frame that decodes
# equals the intact clip's, except those of DAMAGED_FRAMES.
TRUNCATED_OR_DAMAGED: dict[str, tuple[int, int] | str] = {
    # The index is at the end of the file: with it cut off, wholly or in part, nothing can be read.
    "moov last cut 10%.mp4": NOT_DECODABLE,
    "moov last cut 50%.mp4": NOT_DECODABLE,
    "moov last cut 90%.mp4": r"cannot be read as a video \(.*End of file.*\); check that it plays",
    "moov first cut 10%.mp4": NOT_DECODABLE,  # the cut is inside the index
    # The last packet is cut part-way: the frames before the error decode, less those the decoder still held back
    # to put B-frames in display order (2 here).
    "moov first cut 50%.mp4": (9, 6),
    "moov first cut 90%.mp4": (25, 22),
    # Noise in a keyframe's data: the decoder conceals it, and the damage ends at the next keyframe.
    "moov last damaged.mp4": (30, 30),
    "moov first damaged.mp4": (30, 30),
    # Every packet is present, but frame 19's does not decode: frames 0-17 do (the decoder held 18 back).
    "moov last frame 19 damaged.mp4": (30, 18),
}
DAMAGED_FRAMES = {"moov last damaged.mp4": range(16, 24), "moov first damaged.mp4": range(8, 16)}


@pytest.fixture(scope="module")
def intact(media) -> dict[str, np.ndarray]:
    return {name: all_frames(media[name]) for name in ("moov last.mp4", "moov first.mp4")}


@pytest.mark.parametrize("name", list(TRUNCATED_OR_DAMAGED))
def test_truncated_or_damaged_mp4(media, intact, name):
    path, outcome = media[name], TRUNCATED_OR_DAMAGED[name]
    if isinstance(outcome, str):
        with pytest.raises(VideoReadError) as info:
            Clip(path)
        check_message(info.value, path, outcome)
        return
    listed, decodable = outcome
    clip = Clip(path)
    assert clip.info == VideoInfo(listed, Fraction(FPS), WIDTH, HEIGHT, 0.0)
    frames = all_frames(path)  # to the end: where decoding ends, without an error
    assert frames.shape == (decodable, HEIGHT, WIDTH, 3)
    reference = intact["moov first.mp4" if "first" in name else "moov last.mp4"]
    differ = [i for i in range(decodable) if not np.array_equal(frames[i], reference[i])]
    assert differ == list(DAMAGED_FRAMES.get(name, []))
    # One frame more than decodes: an error that says how many do, and why.
    with pytest.raises(FramesMissingError) as info:
        clip.read([decodable])
    assert info.value.num_frames == decodable
    if decodable < listed:
        check_message(info.value, path, rf"decoding stops after {decodable} frames \(.*Invalid data found when "
                                        rf"processing input.*\), so frame {decodable} cannot be read; the file is "
                                        r"truncated or damaged: sample fewer frames")
    else:
        assert str(info.value) == f"{path}: has {decodable} frames, cannot read frame {decodable}"


@pytest.mark.parametrize(("name", "listed", "decodable"), [("moov first cut 90%.mp4", 25, 22),
                                                           ("moov last frame 19 damaged.mp4", 30, 18)])
def test_clip_that_stops_decoding_gives_an_accurate_short_clip_error(media, intact, name, listed, decodable):
    # The file lists more frames (packets) than decode: a window that needs them all fails saying how many decode
    # and which settings fit those; a window within them reads.
    clip = Clip(media[name])
    assert clip.info.num_frames == listed

    def check(num_frames: int) -> range:
        return tuned_window(num_frames, listed, 0, 1, clip.path)

    with pytest.raises(ClipTooShortError) as info:
        list(decode_frames(clip, check(listed), (WIDTH, HEIGHT), check))
    check_message(info.value, clip.path, rf"has {decodable} frames but n_sample_frames={listed}, .*; use "
                                         rf"n_sample_frames<={decodable} .*\(only {decodable} of the {listed} "
                                         r"frames it lists decode: the file is truncated or damaged\)$")
    reference = intact["moov first.mp4" if "first" in name else "moov last.mp4"]
    window = range(decodable - 7, decodable, 3)
    frames = np.stack(list(decode_frames(clip, window, (WIDTH, HEIGHT), check)))
    assert np.array_equal(frames, reference[window.start : window.stop : window.step])
    # A check that finds the frames enough (it does not raise) leaves the reader's own error.
    with pytest.raises(FramesMissingError, match=rf"decoding stops after {decodable} frames"):
        list(decode_frames(clip, range(listed), (WIDTH, HEIGHT), lambda num_frames: None))


def test_one_frame_video(media):
    clip = Clip(media["one frame.mp4"])
    assert clip.info.num_frames == 1
    assert all_frames(clip.path).shape == (1, HEIGHT, WIDTH, 3)
    with pytest.raises(FramesMissingError, match=r"has 1 frame, cannot read frame 1$"):
        clip.read([0, 1])
    with pytest.raises(ClipTooShortError) as info:
        tuned_window(clip.info.num_frames, 24, 0, 1, clip.path)
    check_message(info.value, clip.path, r"has 1 frame but n_sample_frames=24,.*; use n_sample_frames<=1$")


def test_frame_table_listing_billions_of_frames_reads_every_frame(media, intact):
    # decord aborted the interpreter on this file; PyAV counts the packets and decodes them all, in well under a second.
    with watchdog(30):
        clip = Clip(media["billions of frames.mp4"])
        frames = all_frames(clip.path)
    assert clip.info == VideoInfo(NUM_FRAMES, Fraction(FPS), WIDTH, HEIGHT, 0.0)
    assert np.array_equal(frames, intact["moov first.mp4"])


def test_clip_48_pixels_wide(tmp_path):
    # decord 0.6.0 fails on this valid clip ("from_size == to_size (6144 vs. 4608)").
    path = write_index_clip(tmp_path / "narrow.mp4", num_frames=5, width=48, height=32)
    clip = Clip(path)
    assert clip.info == VideoInfo(5, Fraction(12), 48, 32, 0.0)
    assert frame_indices(clip.read([4, 0])) == [4, 0]
    assert clip.read([2], (64, 64)).shape == (1, 64, 64, 3)


def test_clip_whose_frame_size_changes_reads_at_one_size(tmp_path):
    # Two H.264 streams of different sizes joined into one, as cut-together files can be: frames 0-4 at 64x48, then
    # frames 5-9 at 32x32.
    joined = tmp_path / "joined.h264"
    for first, width, height in ((0, 64, 48), (5, 32, 32)):
        frames = index_frames(10, width, height)[first : first + 5]
        ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", FPS, "-i", "pipe:0",
               "-c:v", "libx264", "-bf", 0, "-pix_fmt", "yuv420p", "-f", "h264", tmp_path / "part.h264",
               input=frames.tobytes())
        with joined.open("ab") as out:
            out.write((tmp_path / "part.h264").read_bytes())
    path = tmp_path / "joined.mp4"
    ffmpeg("-r", FPS, "-i", joined, "-c", "copy", path)
    clip = Clip(path)
    assert clip.info == VideoInfo(10, Fraction(FPS), 64, 48, 0.0)
    frames = all_frames(path)
    assert frames.shape == (10, 48, 64, 3)
    assert frame_indices(frames) == list(range(10))
    right = frames[5:, 8:-8, 40:].reshape(5, -1).mean(axis=1)  # the right halves, away from the edge
    assert np.abs(right - [255 - 8 * i for i in range(5, 10)]).max() < 3
    assert frame_indices(np.stack(list(clip.frames((40, 40))))) == list(range(10))


# Frame folders ---------------------------------------------------------------------------------------------------


def write_folder(folder: Path, frames: np.ndarray, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for frame, name in zip(frames, names):
        Image.fromarray(frame).save(folder / name)
    return folder


def test_folder_is_read_in_the_order_of_the_numbers_in_the_names(tmp_path):
    # Written in index order under names whose text order is another; other files and folders are ignored.
    names = ["frame_2.png", "frame_10.png", "frame_1.png", "b.PNG", "a.jpg", "frame_1b.png"]
    folder = write_folder(tmp_path / "frames", index_frames(6), names)
    (folder / "notes.txt").write_text("not a frame")
    (folder / "sub.png").mkdir()
    clip = Clip(folder)
    assert clip.info == VideoInfo(6, Fraction(24), WIDTH, HEIGHT, 0.0)
    # no number first, then 1, 1 (by name: "frame_1.png" < "frame_1b.png"), 2, 10
    order = [names.index(name) for name in ["a.jpg", "b.PNG", "frame_1.png", "frame_1b.png", "frame_2.png",
                                             "frame_10.png"]]
    assert frame_indices(np.stack(list(clip.frames()))) == order
    assert frame_indices(clip.read([5, 0])) == [order[5], order[0]]


def test_a_folder_that_ffmpeg_wrote_with_numbers_plays_in_order(tmp_path):
    # `ffmpeg -i clip.mp4 %d.jpg` (and Video-P2P's data folders): 1.jpg, 2.jpg, ..., 10.jpg, 11.jpg, 12.jpg
    clip = write_index_clip(tmp_path / "clip.mp4", 12)
    folder = tmp_path / "frames"
    folder.mkdir()
    ffmpeg("-i", clip, "-q:v", "2", folder / "%d.jpg")
    assert sorted(p.name for p in folder.iterdir())[:4] == ["1.jpg", "10.jpg", "11.jpg", "12.jpg"]  # text order
    assert frame_indices(np.stack(list(Clip(folder).frames()))) == list(range(12))


@pytest.mark.parametrize(("fps", "expected"), [(None, Fraction(24)), (12.5, Fraction(25, 2)), (8, Fraction(8)),
                                               (30000 / 1001, Fraction(30000, 1001))])
def test_folder_fps(tmp_path, fps, expected):
    folder = write_folder(tmp_path / "frames", index_frames(2), ["0.png", "1.png"])
    assert Clip(folder, fps).info.fps == expected


def test_folder_has_the_pixels_of_its_video_and_is_resized_as_video_p2p_did(tmp_path, wide_clip):
    folder = tmp_path / "frames"
    folder.mkdir()
    ffmpeg("-i", wide_clip, folder / "%03d.png")
    clip = Clip(folder)
    assert clip.info == VideoInfo(12, Fraction(24), 160, 90, 0.0)
    assert_same_pixels(np.stack(list(clip.frames())), all_frames(wide_clip))  # PNGs of the ffmpeg binary
    files = sorted(folder.iterdir())
    for width, height in [(77, 45), fit_size(160, 90, 512)]:
        # Video-P2P's tuneavideo/data/dataset.py: Image.open(file).convert('RGB').resize((width, height)), whose
        # default filter is bicubic
        expected = np.stack([np.asarray(Image.open(f).convert("RGB").resize((width, height))) for f in files])
        resized = np.stack(list(clip.frames((width, height))))
        assert np.array_equal(resized, expected)
        # not the video files' filter: FFmpeg's bilinear scale gives other pixels
        filtered = subprocess.run([FFMPEG, "-v", "error", "-i", folder / "%03d.png", "-vf",
                                   f"scale={width}:{height}:flags=bilinear,format=rgb24", "-f", "rawvideo", "-"],
                                  capture_output=True, check=True).stdout
        assert not np.array_equal(resized, np.frombuffer(filtered, np.uint8).reshape(12, height, width, 3))


def test_folder_of_mixed_sizes(tmp_path):
    folder = write_folder(tmp_path / "frames", index_frames(2), ["a.png", "b.png"])
    Image.fromarray(index_frames(1, 32, 32)[0]).save(folder / "c.png")
    clip = Clip(folder)
    with pytest.raises(VideoReadError) as info:
        list(clip.frames())
    check_message(info.value, folder, r"frame images differ in size \(a.png is 64x48, c.png is 32x32\); give frames "
                                      "of one size$")


@pytest.mark.parametrize("broken", ["a.png", "c.jpg"])
def test_folder_with_an_unreadable_image(tmp_path, broken):
    folder = write_folder(tmp_path / "frames", index_frames(3), ["a.png", "b.png", "c.jpg"])
    (folder / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(VideoReadError) as info:
        list(Clip(folder).frames())  # the first image is opened at once, the others as they are read
    check_message(info.value, folder / broken, r"cannot be read as an image \(.+\); re-export the frame or remove it "
                                               "from the folder$")


def test_folder_loads_only_the_requested_images(tmp_path):
    folder = write_folder(tmp_path / "frames", index_frames(7), [f"{i}.png" for i in range(7)])
    for unread in (1, 2, 4, 5, 6):
        (folder / f"{unread}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert frame_indices(np.stack(list(Clip(folder).frames(start=0, stop=6, step=3)))) == [0, 3]


def test_empty_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "notes.txt").write_text("no frames here")
    with pytest.raises(VideoReadError) as info:
        Clip(folder)
    check_message(info.value, folder, r"is a folder with no frame images \(.jpg, .jpeg, .png, .bmp, .webp\); give a "
                                      "video file or a folder of frames$")




def test_a_variable_frame_rate_file_gives_every_frame_its_presentation_time(tmp_path):
    clip = Clip(write_vfr_clip(tmp_path / "phone.mp4", index_frames(30), PHONE_TIMES))
    assert clip.info.num_frames == 30 and clip.info.times is not None
    np.testing.assert_allclose(clip.info.times, PHONE_TIMES, atol=1e-4)
    assert [clip.info.time(i) for i in (0, 15, 29)] == pytest.approx([0, 0.5, 0.5 + 14 / 15], abs=1e-4)
    assert clip.info.time(30) == pytest.approx(1.5, abs=1e-4)  # the end: one more frame at the last frame's rate
    assert frame_indices(np.stack(list(clip.frames()))) == list(range(30))  # frames still in presentation order


def test_a_constant_rate_file_has_no_frame_times_to_keep():
    info = Clip(SAMPLE_CLIP).info
    assert info.times is None
    assert info.time(info.num_frames) == pytest.approx(info.start_time + info.num_frames / info.fps)


# Phone clips: frames as players show them ----------------------------------------------------------------------

# (degrees counter-clockwise, mirrored) -> where a player shows the stored top-left corner: turned first, then
# mirrored left to right (ffmpeg's -display_rotation and -display_hflip).
SHOWN_CORNER = {(0, False): "top-left", (-90, False): "top-right", (90, False): "bottom-left",
                (180, False): "bottom-right", (0, True): "top-right", (-90, True): "top-left",
                (90, True): "bottom-right", (180, True): "bottom-left"}


@pytest.fixture(scope="module")
def marker_clip(tmp_path_factory) -> Path:
    """64x48 (stored), 4 frames, a red square in the stored top-left corner."""
    return write_frames_mp4(tmp_path_factory.mktemp("clips") / "marker.mp4", marker_frames(4, WIDTH, HEIGHT))


@pytest.mark.parametrize(("rotation", "hflip"), list(SHOWN_CORNER), ids=[f"{r}{' hflip' if h else ''}"
                                                                          for r, h in SHOWN_CORNER])
def test_phone_clips_are_read_as_players_show_them(tmp_path, marker_clip, rotation, hflip):
    path = write_phone_clip(tmp_path / "phone.mp4", marker_clip, rotation, hflip)
    clip = Clip(path)
    shown = (HEIGHT, WIDTH) if rotation in (90, -90) else (WIDTH, HEIGHT)
    assert (clip.info.width, clip.info.height) == shown
    frames = np.stack(list(clip.frames()))
    assert frames.shape == (4, shown[1], shown[0], 3)
    assert {marker_corner(frame) for frame in frames} == {SHOWN_CORNER[rotation, hflip]}
    # the ffmpeg binary turns the frames as its player does (autorotate): the same pixels
    player = subprocess.run([FFMPEG, "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                            capture_output=True, check=True).stdout
    assert_same_pixels(frames, np.frombuffer(player, np.uint8).reshape(frames.shape))
    # resized (and cut) in the shown orientation: the size asked for is the shown frame's
    small = clip.read([0, 3], (shown[0] // 2, shown[1] // 2))
    assert small.shape == (2, shown[1] // 2, shown[0] // 2, 3) and marker_corner(small[0]) == SHOWN_CORNER[rotation,
                                                                                                          hflip]


def test_crop_takes_that_part_of_the_shown_frame(tmp_path, marker_clip):
    phone = Clip(write_phone_clip(tmp_path / "phone.mp4", marker_clip, -90))  # shown 48x64, the square top right
    whole = np.stack(list(phone.frames()))
    right_half = np.stack(list(phone.frames(crop=(24, 0, 24, 64), size=(24, 64))))
    assert_same_pixels(right_half, whole[:, :, 24:])
    folder = write_folder(tmp_path / "frames", marker_frames(2), ["0.png", "1.png"])
    cut = np.stack(list(Clip(folder).frames((16, 16), crop=(0, 0, 32, 32))))  # the top-left quarter, halved
    assert marker_corner(cut[0]) == "top-left" and cut[0, :6, :6, 0].min() > 200  # 12 px square, halved: 6 px


def test_non_square_pixels_are_shown_at_their_displayed_width(tmp_path, marker_clip):
    path = tmp_path / "anamorphic.mp4"  # 64x48 stored, pixels twice as wide as tall: shown 128x48
    ffmpeg("-i", marker_clip, "-vf", "setsar=2", "-c:v", "libx264", "-pix_fmt", "yuv420p", path)
    clip = Clip(path)
    assert (clip.info.width, clip.info.height) == (128, 48)
    frame = clip.read([0])[0]
    assert frame.shape == (48, 128, 3)
    red = np.argwhere(frame[..., 0].astype(int) - frame[..., 1] > 100)
    assert red[:, 1].max() + 1 == pytest.approx(2 * MARKER, abs=2) and red[:, 0].max() + 1 == pytest.approx(MARKER,
                                                                                                            abs=2)


def test_jpeg_frames_are_turned_by_their_exif_orientation(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(marker_frames(2)):
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to show", as a phone held upright writes
        Image.fromarray(frame).save(folder / f"{i}.jpg", exif=exif, quality=95)
    clip = Clip(folder)
    assert (clip.info.width, clip.info.height) == (HEIGHT, WIDTH)
    assert marker_corner(clip.read([1])[0]) == "top-right"
