"""Video readers: decord, PyAV or imageio-ffmpeg, chosen once, each turning any failure into `VideoReadError`.

Frames come back at the clip's native size as uint8 RGB; every bad file (missing, not a video, an image, audio only,
truncated, damaged) ends in a one-line `VideoReadError` that names the file and says what to do.
"""

import importlib
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ..errors import UserError

# Reader names in order of preference, and the modules each needs: decord is only handed files PyAV has checked, as
# decord can abort the interpreter on a damaged file (see the readers below).
VIDEO_BACKENDS = ("decord", "pyav", "imageio")
_BACKEND_MODULES = {"decord": ("decord", "av"), "pyav": ("av",), "imageio": ("imageio_ffmpeg",)}


class VideoReadError(UserError):
    """A file is missing or cannot be decoded as a video; the message is one line naming the file."""


def frames_text(count: int) -> str:
    """``"1 frame"``, ``"2 frames"``: error messages quote frame counts, often of one-frame clips."""
    return f"{count} frame{'' if count == 1 else 's'}"


class VideoInfo(NamedTuple):
    """Basic facts about a video stream."""

    num_frames: int
    fps: float
    width: int
    height: int


def select_backend(preferred: str | None = None) -> str:
    """Return the reader to use: ``preferred`` if given, else the first importable of decord, PyAV, imageio-ffmpeg.

    Raises:
        ImportError: ``preferred`` (or, without it, every reader) cannot be imported.
    """
    if preferred is not None and preferred not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {preferred!r}; choose from {', '.join(VIDEO_BACKENDS)}")
    for name in (preferred,) if preferred else VIDEO_BACKENDS:
        try:
            for module in _BACKEND_MODULES[name]:
                importlib.import_module(module)
        except ImportError:
            continue
        return name
    if preferred:
        wanted = f"{preferred} (needs the modules {', '.join(_BACKEND_MODULES[preferred])})"
    else:
        wanted = "any of " + ", ".join(module for modules in _BACKEND_MODULES.values() for module in modules[:1])
    raise ImportError(f"no video reader available: install {wanted}")


def backend_available(name: str) -> bool:
    """Whether the reader `name` (one of `VIDEO_BACKENDS`) can be used here."""
    try:
        select_backend(name)
    except ImportError:
        return False
    return True


def video_info(path: str | os.PathLike, backend: str | None = None) -> VideoInfo:
    """Return ``(num_frames, fps, width, height)`` of the first video stream of ``path``."""
    path = _checked_path(path)
    info = _backend_functions(select_backend(backend))[1](path)
    if not (math.isfinite(info.fps) and info.fps > 0):  # a damaged header; saved samples need a real rate
        raise VideoReadError(f"{path}: video stream has no usable frame rate ({info.fps}); {_FIX}")
    return info


def read_video_frames(
    path: str | os.PathLike, indices: Sequence[int] | None = None, backend: str | None = None
) -> np.ndarray:
    """Decode frames ``indices`` (all frames if None) at native size.

    Returns:
        uint8 array ``(frames, height, width, 3)``, RGB, in the order of ``indices``.
    """
    path = _checked_path(path)
    if indices is not None and len(indices) == 0:
        raise ValueError("indices must name at least one frame (or be None for all frames)")
    return _backend_functions(select_backend(backend))[0](path, None if indices is None else list(indices))


# Readers. Each takes a checked path (and a list of indices or None) and raises VideoReadError naming the file.
#
# Found by fuzzing (tests/test_fuzz.py; regression test in tests/test_bad_videos.py): decord 0.6.0 aborts the whole
# interpreter (an uncatchable C++ std::bad_alloc) on an MP4 whose sample table lists billions of frames, as it sizes its
# frame index from that list. PyAV and imageio-ffmpeg raise ordinary exceptions (or run FFmpeg in a subprocess) on the
# same files. So decord is only handed files that PyAV opens and whose listed frame count matches the packets actually
# present, and when decord then fails to decode (damaged data, or its own bugs) the file is read with PyAV instead.

ReadFn = Callable[[str, list[int] | None], np.ndarray]
InfoFn = Callable[[str], VideoInfo]

# What to do about a file that does not decode; the same hint for every reader.
_FIX = "check that it plays in a video player, or re-encode it (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4)"

# Still images that FFmpeg would open as a one-frame "video"; a clip of one still is never what was meant.
_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")
)


class FramesMissingError(VideoReadError):
    """A requested frame is past the last one that decodes; ``num_frames`` (>= 1) is how many frames do."""

    def __init__(self, message: str, num_frames: int) -> None:
        super().__init__(message)
        self.num_frames = num_frames


def _checked_path(path: str | os.PathLike) -> str:
    """``path`` as a string if it is a readable file that is not a still image, else a VideoReadError saying why."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise VideoReadError(f"{path}: is a directory, not a video file; give the path of a video file")
    if not os.path.isfile(path):  # missing, a broken link, or a pipe/device that the readers could block on
        raise VideoReadError(f"{path}: no such video file; check the path")
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as err:  # e.g. no read permission
        raise VideoReadError(f"{path}: cannot be opened ({err.strerror or err}); check its permissions") from err
    if not head:
        raise VideoReadError(f"{path}: is empty (0 bytes); copy or export the video again")
    kind = next((name for signature, name in _IMAGE_SIGNATURES if head.startswith(signature)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind is not None:
        raise VideoReadError(f"{path}: is a {kind} image, not a video; give a video file (e.g. .mp4) of the clip")
    return path


def _backend_functions(name: str) -> tuple[ReadFn, InfoFn]:
    match name:
        case "decord":
            return _read_decord, _info_decord
        case "pyav":
            return _read_pyav, _info_pyav
        case "imageio":
            return _read_imageio, _info_imageio
    raise ValueError(f"unknown video backend {name!r}")


def _detail(err: Exception) -> str:
    """The first line of ``err``'s message, without decord's ``[12:00:00] /src/file.cc:123: `` log prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _not_a_video(path: str, err: Exception) -> VideoReadError:
    return VideoReadError(f"{path}: cannot be read as a video ({_detail(err)}); {_FIX}")


def _no_frames(path: str, stopped: str | None) -> VideoReadError:
    why = f" ({stopped})" if stopped else ""
    return VideoReadError(f"{path}: has no decodable video frames{why}; it is empty, truncated or damaged: {_FIX}")


def _take(path: str, frames: dict[int, np.ndarray], indices: list[int], count: int, stopped: str | None) -> np.ndarray:
    """Stack ``frames`` in ``indices`` order; the streaming readers call this after decoding ``count`` frames.

    ``stopped`` is why decoding ended before the end of the stream (None if it did not), for the error message.
    """
    if count == 0:
        raise _no_frames(path, stopped)
    missing = [i for i in indices if i not in frames]
    if not missing:
        return np.stack([frames[i] for i in indices])
    if stopped is None:
        raise FramesMissingError(f"{path}: has {frames_text(count)}, cannot read frame {missing[0]}", count)
    raise FramesMissingError(
        f"{path}: decoding stops after {frames_text(count)} ({stopped}), so frame {missing[0]} cannot be read; the file "
        f"is truncated or damaged: sample fewer frames, or {_FIX}",
        count,
    )


def _open_decord(path: str):
    import decord

    try:
        # No width/height here (unlike the original): resizing is done by resize_frames for every backend alike.
        return decord.VideoReader(path)
    except (RuntimeError, decord.DECORDError) as err:  # decord raises both for unreadable input
        raise _not_a_video(path, err) from err


def _decord_is_safe(path: str) -> bool:
    """Whether decord may open ``path``: PyAV opens it and its listed frame count matches the packets present.

    Raises:
        VideoReadError: PyAV cannot open ``path`` as a video.
    """
    with _open_pyav(path) as container:
        listed = container.streams.video[0].frames
        return listed > 0 and _packets_match(container, listed)


def _read_decord(path: str, indices: list[int] | None) -> np.ndarray:
    import decord

    if not _decord_is_safe(path):
        return _read_pyav(path, indices)
    reader = _open_decord(path)
    wanted = list(range(len(reader))) if indices is None else indices
    if not wanted:
        raise _no_frames(path, None)
    if max(wanted) >= len(reader):
        raise FramesMissingError(f"{path}: has {frames_text(len(reader))}, cannot read frame {max(wanted)}", len(reader))
    try:
        # asnumpy() instead of decord.bridge.set_bridge("torch"): the bridge is process-wide state.
        return reader.get_batch(wanted).asnumpy()
    except (RuntimeError, decord.DECORDError):
        # Damaged frame data (PyAV returns the frames before it), or one of decord's own failures on valid files
        # (e.g. any 48-pixel-wide clip): PyAV reads the file or raises the error that says what is wrong.
        return _read_pyav(path, indices)


def _info_decord(path: str) -> VideoInfo:
    import decord

    if not _decord_is_safe(path):
        return _info_pyav(path)
    reader = _open_decord(path)
    try:
        height, width = reader[0].shape[:2]
    except (RuntimeError, decord.DECORDError):  # as in _read_decord: PyAV reads the file or says what is wrong
        return _info_pyav(path)
    return VideoInfo(len(reader), float(reader.get_avg_fps()), width, height)


def _open_pyav(path: str):
    import av

    try:
        # metadata_errors="replace": a damaged text tag (title, encoder) must not stop the frames from being read.
        container = av.open(path, metadata_errors="replace")
    except av.FFmpegError as err:
        raise _not_a_video(path, err) from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream (audio only, or a damaged file); give a file with video")
    context = container.streams.video[0].codec_context
    if context is None or context.width <= 0 or context.height <= 0:  # no decoder for the codec, or a damaged header
        container.close()
        raise VideoReadError(f"{path}: its video stream cannot be decoded (unknown codec or damaged header); {_FIX}")
    return container


def _packets_match(container, listed: int) -> bool:
    """Whether the first video stream of ``container`` holds exactly ``listed`` packets (demuxing only, no decoding)."""
    import av

    count = 0
    try:
        for packet in container.demux(container.streams.video[0]):
            count += packet.size > 0  # empty packets only flush the decoder
            if count > listed:
                return False
    except av.FFmpegError:  # truncated or damaged: the listed count cannot be trusted
        return False
    return count == listed


def _decode_pyav(container, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int, str | None]:
    """Decode the first video stream, keeping the frames in ``wanted`` (all if None; none, just counting, if empty).

    Returns:
        The kept frames by index, how many frames were decoded, and why decoding stopped before the end of the stream
        (None if it did not). A decoding error ends the stream instead of failing the read: the frames before it are
        what a truncated or damaged file holds, and their count is what ClipTooShortError should report.
    """
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    # A stream may change size part-way (e.g. joined clips); scale every frame to the size the header gives, which
    # video_info reports, as FFmpeg (so imageio-ffmpeg and decord) does, rather than return frames of mixed sizes.
    width, height = stream.codec_context.width, stream.codec_context.height
    frames: dict[int, np.ndarray] = {}
    count = 0
    try:
        for frame in container.decode(stream):
            if wanted is None or count in wanted:
                frames[count] = frame.to_ndarray(width=width, height=height, format="rgb24")
            count += 1
            if wanted and len(frames) == len(wanted):
                break  # no need to decode the rest of the clip
    except av.FFmpegError as err:
        return frames, count, _detail(err)
    return frames, count, None


def _read_pyav(path: str, indices: list[int] | None) -> np.ndarray:
    with _open_pyav(path) as container:
        frames, count, stopped = _decode_pyav(container, None if indices is None else set(indices))
    return _take(path, frames, sorted(frames) if indices is None else indices, count, stopped)


def _info_pyav(path: str) -> VideoInfo:
    with _open_pyav(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoReadError(f"{path}: video stream has no frame rate; {_FIX}")
        width, height, listed = stream.codec_context.width, stream.codec_context.height, stream.frames
        if listed > 0 and _packets_match(container, listed):
            return VideoInfo(listed, float(rate), width, height)
    # No frame count stored (e.g. WebM), or one the file does not hold (truncated): count the frames that decode.
    with _open_pyav(path) as container:
        _, num_frames, stopped = _decode_pyav(container, set())
    if num_frames == 0:
        raise _no_frames(path, stopped)
    return VideoInfo(num_frames, float(rate), width, height)


def _open_imageio(path: str):
    import imageio.v2 as iio

    try:
        return iio.get_reader(path, format="ffmpeg")
    except (OSError, RuntimeError) as err:  # OSError: ffmpeg found no stream; RuntimeError: no plugin accepts it
        raise _not_a_video(path, err) from err


def _decode_imageio(reader, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int, str | None]:
    """Like :func:`_decode_pyav`, for an imageio-ffmpeg reader (which runs FFmpeg in a subprocess)."""
    frames: dict[int, np.ndarray] = {}
    count = 0
    try:
        for frame in reader.iter_data():
            if wanted is None or count in wanted:
                frames[count] = np.asarray(frame)
            count += 1
            if wanted and len(frames) == len(wanted):
                break
    except (OSError, RuntimeError) as err:  # FFmpeg exited early or sent a partial frame
        return frames, count, _detail(err)
    return frames, count, None


def _read_imageio(path: str, indices: list[int] | None) -> np.ndarray:
    reader = _open_imageio(path)
    try:
        frames, count, stopped = _decode_imageio(reader, None if indices is None else set(indices))
    finally:
        reader.close()
    return _take(path, frames, sorted(frames) if indices is None else indices, count, stopped)


def _info_imageio(path: str) -> VideoInfo:
    reader = _open_imageio(path)
    try:
        meta = reader.get_meta_data()
        width, height = meta["size"]
        # meta["nframes"] is only an estimate (duration x fps, or inf); count_frames() decodes to count exactly.
        try:
            num_frames = reader.count_frames()
        except (RuntimeError, ValueError):
            # RuntimeError: FFmpeg gave up on a file with many bad frames; ValueError: imageio-ffmpeg could not parse
            # FFmpeg's report ("time=N/A"). Either way, count the frames that do decode.
            _, num_frames, _ = _decode_imageio(reader, set())
    finally:
        reader.close()
    if num_frames == 0:
        raise _no_frames(path, None)
    return VideoInfo(num_frames, float(meta["fps"]), width, height)
