"""Reading a clip: a video file, or a folder of frame images, as uint8 RGB frames.

One path for every clip. Frames are resized inside FFmpeg's filter graph, `scale=W:H:flags=bilinear` then
`format=rgb24`, which is what the original's `decord.VideoReader(path, width=W, height=H)` ran, so tuning sees the
original's pixels (tests/test_readers.py compares with decord). A folder of frames (the LOVEU-TGVE layout) goes
through the same filter. Frames stream: a long clip is resized as it is decoded, never held at its native size.

Every bad input ends in a one-line `VideoReadError` that names the file and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FOLDER_FPS = Fraction(24)  # frame rate of a folder of frames when none is given

# What to do about a file that does not decode.
_FIX = "check that it plays in a video player, or re-encode it (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4)"
# Still images that FFmpeg would open as a one-frame "video"; a clip of one still is never what was meant.
_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
                     (b"MM\x00*", "TIFF"))


class VideoReadError(UserError):
    """A clip is missing or cannot be decoded; the message is one line naming the file."""


class FramesMissingError(VideoReadError):
    """Decoding ended before a requested frame; `num_frames` (>= 1) frames did decode."""

    def __init__(self, message: str, num_frames: int) -> None:
        super().__init__(message)
        self.num_frames = num_frames


def frames_text(count: int) -> str:
    """``"1 frame"``, ``"2 frames"``: messages quote frame counts, often of one-frame clips."""
    return f"{count} frame{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class VideoInfo:
    """What a clip's header says, before any frame is decoded."""

    num_frames: int  # frames the file lists (its video packets; a folder: its images); fewer may decode
    fps: Fraction
    width: int
    height: int
    start_time: float = 0.0  # presentation time of the first frame, in seconds: sound is cut relative to it


class Clip:
    """A clip on disk, opened once: `info` at once, frames streamed at any size with `frames` or `read`.

    `path` is a video file or a folder of frame images (sorted by name, all of one size); a folder plays at `fps`
    (default 24), a video file at its own rate.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction | None = None) -> None:
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.images = _image_files(self.path)
            height, width = _load_image(self.images[0]).shape[:2]
            rate = Fraction(fps if fps is not None else FOLDER_FPS).limit_denominator(1001)
            self.info = VideoInfo(len(self.images), rate, width, height)
        else:
            self.images = None
            self.info = _video_info(_checked_file(self.path))

    def frames(self, size: tuple[int, int] | None = None, start: int = 0, stop: int | None = None,
               step: int = 1) -> Iterator[np.ndarray]:
        """Frames `start, start + step, ...` before `stop` (the clip's end if None), `(H, W, 3)` uint8 RGB at `size`
        (width, height; the clip's own if None).

        Raises:
            FramesMissingError: after the frames that decode, when decoding ends before `stop`.
        """
        decoded = self._decode(size)
        for index, frame in enumerate(decoded):
            if stop is not None and index >= stop:
                return
            if index >= start and (index - start) % step == 0:
                yield frame
        count = decoded.count
        first_missing = start if count <= start else start - (start - count) // step * step
        if count == 0 or (stop is not None and first_missing < stop):
            raise self._missing(first_missing, decoded)

    def read(self, indices: Sequence[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """Frames `indices` (any order) as `(frames, H, W, 3)` uint8."""
        wanted, found = set(indices), {}
        decoded = self._decode(size)
        for index, frame in enumerate(decoded):
            if index in wanted:
                found[index] = frame
                if len(found) == len(wanted):
                    return np.stack([found[i] for i in indices])
        raise self._missing(min(wanted - set(found)), decoded)

    def _decode(self, size: tuple[int, int] | None) -> _Decoded:
        size = size or (self.info.width, self.info.height)
        if self.images is not None:
            return _Decoded(_folder_frames(self.path, self.images, size))
        return _Decoded(_video_frames(self.path, size))

    def _missing(self, index: int, decoded: _Decoded) -> VideoReadError:
        count, stopped = decoded.count, decoded.stopped
        if count == 0:
            return _no_frames(self.path, stopped)
        if stopped is None:
            return FramesMissingError(f"{self.path}: has {frames_text(count)}, cannot read frame {index}", count)
        return FramesMissingError(
            f"{self.path}: decoding stops after {frames_text(count)} ({stopped}), so frame {index} cannot be read; "
            f"the file is truncated or damaged: sample fewer frames, or {_FIX}", count)


class _DecodingStopped(Exception):
    """A decoding error part-way through a stream: the frames before it are what a damaged file holds."""


class _Decoded:
    """Frames from a decoder, counting them and keeping why decoding ended early (`stopped`; None if it did not)."""

    def __init__(self, frames: Iterator[np.ndarray]) -> None:
        self._frames = frames
        self.count = 0
        self.stopped: str | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for frame in self._frames:
                self.count += 1
                yield frame
        except _DecodingStopped as err:
            self.stopped = str(err)


class _Scaler:
    """Frames to `(H, W, 3)` uint8 RGB at `size` (width, height) through the FFmpeg filter graph
    `buffer -> scale=W:H:flags=bilinear -> format=rgb24 -> buffersink`, built for the first frame's size and pixel
    format (a damaged header may not state the format)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.graph: av.filter.Graph | None = None

    def __call__(self, frame: av.VideoFrame) -> Iterator[np.ndarray]:
        if self.graph is None:
            self.graph = av.filter.Graph()
            source = self.graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                           time_base=Fraction(1, 1000))  # timestamps only pass through
            nodes = (source, self.graph.add("scale", f"{self.size[0]}:{self.size[1]}:flags=bilinear"),
                     self.graph.add("format", "rgb24"), self.graph.add("buffersink"))
            self.graph.link_nodes(*nodes).configure()
        self.graph.push(frame)
        while True:
            try:
                yield self.graph.pull().to_ndarray()
            except (av.BlockingIOError, av.EOFError):
                return


def _video_frames(path: str, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Every frame of the first video stream of `path`, at `size` (width, height), up to a decoding error."""
    with _open(path) as container:
        stream = container.streams.video[0]
        # Slice threads, not frame threads: after a decoding error, which of the frames in flight in frame threads
        # come out depends on the core count, and a damaged file must give the same frames on every machine.
        stream.thread_type = "SLICE"
        # A stream may change size part-way (joined clips); every frame is first brought to the header's size.
        native = stream.codec_context.width, stream.codec_context.height
        scaled = _Scaler(size)
        last = None  # pts of the last frame given
        try:
            for frame in container.decode(stream):
                last = frame.pts
                yield from scaled(_at_size(frame, native))
            return
        except av.FFmpegError as err:
            stopped = err
        # The decoder still holds frames decoded before the error (B-frames wait there to be put in display order):
        # give those that follow on without a gap, as frame indices must stay the source's.
        for frame in _flushed(stream.codec_context):
            if not _next_frame(stream, last, frame.pts):
                break
            last = frame.pts
            yield from scaled(_at_size(frame, native))
        raise _DecodingStopped(_detail(stopped)) from stopped


def _at_size(frame: av.VideoFrame, size: tuple[int, int]) -> av.VideoFrame:
    return frame if (frame.width, frame.height) == size else frame.reformat(*size)


def _flushed(context: av.CodecContext) -> list[av.VideoFrame]:
    """The frames a decoder still holds (none if it cannot give them)."""
    try:
        return context.decode(None)
    except av.FFmpegError:
        return []


def _next_frame(stream: av.VideoStream, last: int | None, pts: int | None) -> bool:
    """Whether the frame at `pts` is the one after the frame at `last` (the stream's first if None)."""
    if pts is None:
        return False
    if last is None:
        return pts == stream.start_time
    rate = stream.average_rate or stream.guessed_rate
    return bool(rate and stream.time_base) and round((pts - last) * stream.time_base * rate) == 1


def _folder_frames(folder: str, images: list[Path], size: tuple[int, int]) -> Iterator[np.ndarray]:
    scaled, first = _Scaler(size), None
    for pts, file in enumerate(images):
        pixels = _load_image(file)
        first = pixels.shape if first is None else first
        if pixels.shape != first:
            raise VideoReadError(f"{folder}: frame images differ in size ({images[0].name} is {first[1]}x{first[0]}, "
                                 f"{file.name} is {pixels.shape[1]}x{pixels.shape[0]}); give frames of one size")
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = pts
        yield from scaled(frame)


def _image_files(folder: str) -> list[Path]:
    try:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as err:
        raise VideoReadError(f"{folder}: cannot be listed ({err.strerror or err}); check its permissions") from err
    if not files:
        raise VideoReadError(f"{folder}: is a folder with no frame images ({', '.join(IMAGE_SUFFIXES)}); give a video "
                             "file or a folder of frames")
    return files


def _load_image(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise VideoReadError(f"{file}: cannot be read as an image ({_detail(err)}); re-export the frame or remove "
                             "it from the folder") from err


def _checked_file(path: str) -> str:
    """`path` if it is a readable file that is not a still image, else a VideoReadError saying why."""
    if not os.path.isfile(path):  # missing, a broken link, or a pipe/device that the decoder could block on
        raise VideoReadError(f"{path}: no such video file; check the path")
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as err:
        raise VideoReadError(f"{path}: cannot be opened ({err.strerror or err}); check its permissions") from err
    if not head:
        raise VideoReadError(f"{path}: is empty (0 bytes); copy or export the video again")
    kind = next((name for signature, name in _IMAGE_SIGNATURES if head.startswith(signature)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind is not None:
        raise VideoReadError(f"{path}: is a {kind} image, not a video; give a video file (e.g. .mp4) of the clip, "
                             "or a folder of frames")
    return path


def _open(path: str) -> av.container.InputContainer:
    try:
        # metadata_errors="replace": a damaged text tag (title, encoder) must not stop the frames from being read
        container = av.open(path, metadata_errors="replace")
    except av.FFmpegError as err:
        raise VideoReadError(f"{path}: cannot be read as a video ({_detail(err)}); {_FIX}") from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream (audio only, or a damaged file); give a file with video")
    context = container.streams.video[0].codec_context
    if context is None or context.width <= 0 or context.height <= 0:  # no decoder for the codec, or a bad header
        container.close()
        raise VideoReadError(f"{path}: its video stream cannot be decoded (unknown codec or damaged header); {_FIX}")
    return container


def _video_info(path: str) -> VideoInfo:
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoReadError(f"{path}: video stream has no usable frame rate; {_FIX}")
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        # Count the packets actually present (demuxing, no decoding): a header's frame count can be absent (WebM),
        # wrong (truncated files) or absurd (a damaged table listing billions of frames).
        count = 0
        try:
            for packet in container.demux(stream):
                count += packet.size > 0  # empty packets only flush the decoder
        except av.FFmpegError:
            pass  # truncated or damaged: the packets before the fault are what the file holds
        size = stream.codec_context.width, stream.codec_context.height
    if count == 0:
        raise _no_frames(path, None)
    return VideoInfo(count, Fraction(rate).limit_denominator(1001), *size, start_time=start)


def _no_frames(path: str, stopped: str | None) -> VideoReadError:
    why = f" ({stopped})" if stopped else ""
    return VideoReadError(f"{path}: has no decodable video frames{why}; it is empty, truncated or damaged: {_FIX}")


def _detail(err: Exception) -> str:
    """The first line of `err`'s message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
