"""Reading a clip: a video file, or a folder of frame images, as uint8 RGB frames.

A video file's frames are resized inside FFmpeg's filter graph, `scale=W:H:flags=bilinear` then `format=rgb24`,
which is what the original's `decord.VideoReader(path, width=W, height=H)` ran, so tuning sees the original's pixels
(tests/video/test_readers.py compares with decord). A folder of frames (the LOVEU-TGVE and Video-P2P layouts) is read in
the order of the numbers in the file names (`1.jpg, 2.jpg, ..., 10.jpg`, as `ffmpeg -i clip.mp4 %d.jpg` writes them)
and resized as Video-P2P resized its folders, by Pillow's bicubic `Image.resize`. Frames stream: a long clip is
resized as it is decoded, never held at its native size.

Frames come out the way players show them. A phone held upright stores landscape frames and a display matrix saying
how to turn them (-90, 90 or 180 degrees, sometimes mirrored); its frames are turned and flipped as FFmpeg's own
player does (`Orientation`) before they are resized, and `VideoInfo`'s width and height are the shown ones. Pixels
that are not square (a sample aspect ratio other than 1:1) are shown at their displayed width too. A JPEG frame in a
folder is turned by its EXIF orientation, as image viewers do. The original's decord ignored all three.

Every bad input ends in a one-line `VideoReadError` that names the file and says what to do.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError, first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FOLDER_FPS = Fraction(24)  # frame rate of a folder of frames when none is given

# What to do about a file that does not decode.
_FIX = "check that it plays in a video player, or re-encode it (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4)"


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
    # a variable-frame-rate file (phones): every frame's presentation time in seconds; None at a constant rate, where
    # frame i is shown at start_time + i / fps
    times: tuple[float, ...] | None = None

    def time(self, index: int) -> float:
        """Seconds on the source's timeline at which frame `index` is shown (`index == num_frames`: the clip's end)."""
        if self.times is None:
            return self.start_time + index / self.fps
        if index < len(self.times):
            return self.times[index]
        last = self.times[-1] - self.times[-2] if len(self.times) > 1 else 1 / self.fps
        return self.times[-1] + (index - len(self.times) + 1) * last


@dataclass(frozen=True)
class Orientation:
    """How a player turns a video file's stored frames to show them, read from a frame's display matrix.

    The matrix maps a stored pixel (x, y) to the shown (a x + c y, b x + d y) (FFmpeg's `libavutil/display.h`;
    a, b, c, d its first, second, fourth and fifth entries); phones write quarter turns and mirrors, where each of
    a, b, c, d is 0, 1 or -1. Other angles are taken to the nearest quarter turn.
    """

    transpose: bool = False  # rows become columns (a quarter turn, with the flips below)
    hflip: bool = False  # then mirrored left to right
    vflip: bool = False  # then mirrored top to bottom

    @classmethod
    def of(cls, frame: av.VideoFrame) -> Orientation:
        matrix = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
        if matrix is None:
            return cls()
        a, b, _, c, d = np.frombuffer(bytes(matrix), dtype=np.int32)[:5].tolist()
        if abs(b) > abs(a):  # x' = c y, y' = b x
            return cls(True, c < 0, b < 0)
        return cls(False, a < 0, d < 0)

    def shown_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.transpose else (width, height)

    def filters(self) -> list[tuple[str, str | None]]:
        """FFmpeg filters (name, arguments) that turn a stored frame into the shown one."""
        return ([("transpose", "cclock_flip")] if self.transpose else []) + \
            ([("hflip", None)] if self.hflip else []) + ([("vflip", None)] if self.vflip else [])


class Clip:
    """A clip on disk, opened once: `info` at once, frames streamed at any size with `frames` or `read`.

    `path` is a video file or a folder of frame images (sorted by the numbers in their names, then by name, all of one
    size); a folder plays at `fps` (default 24), a video file at its own rate.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction | None = None) -> None:
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.images = image_files(self.path)
            width, height = load_image(self.images[0]).size
            rate = Fraction(fps if fps is not None else FOLDER_FPS).limit_denominator(1001)
            self.info = VideoInfo(len(self.images), rate, width, height)
        else:
            self.images = None
            self.info = _video_info(_checked_file(self.path))

    def frames(self, size: tuple[int, int] | None = None, start: int = 0, stop: int | None = None,
               step: int = 1, crop: tuple[int, int, int, int] | None = None) -> Iterator[np.ndarray]:
        """Frames `start, start + step, ...` before `stop` (the clip's end if None), `(H, W, 3)` uint8 RGB at `size`
        (width, height; the clip's own if None), as shown (`Orientation`). `crop` (x, y, width, height of the shown
        frame) takes that part of each frame before it is resized; None: the whole frame.

        Raises:
            FramesMissingError: after the frames that decode, when decoding ends before `stop`.
        """
        if stop is not None and stop <= start:
            return
        # Frames are scaled once picked, and a folder's images loaded only then; decoding ends at frame `stop - 1`.
        size = size or (self.info.width, self.info.height)
        if self.images is not None:
            source, scale = range(len(self.images)), lambda index: self._folder_frame(index, size, crop)
        else:
            source, scale = _video_frames(self.path), _scaler(size, crop)
        count, stopped = 0, None
        try:
            for count, frame in enumerate(itertools.islice(source, stop), 1):
                if count > start and (count - 1 - start) % step == 0:
                    yield scale(frame)
        except _DecodingStopped as err:
            stopped = str(err)
        missing = start if count <= start else start - (start - count) // step * step  # the first index not given
        if count == 0:
            raise VideoReadError(f"{self.path}: has no decodable video frames{f' ({stopped})' if stopped else ''}; "
                                 f"it is empty, truncated or damaged: {_FIX}")
        if stop is not None and missing < stop:
            if stopped is None:
                raise FramesMissingError(f"{self.path}: has {frames_text(count)}, cannot read frame {missing}", count)
            raise FramesMissingError(
                f"{self.path}: decoding stops after {frames_text(count)} ({stopped}), so frame {missing} cannot be "
                f"read; the file is truncated or damaged: sample fewer frames, or {_FIX}", count)

    def read(self, indices: Sequence[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """Frames `indices` (any order) as `(frames, H, W, 3)` uint8."""
        first, stop = min(indices), max(indices) + 1
        found = {i: frame for i, frame in zip(range(first, stop), self.frames(size, first, stop)) if i in indices}
        return np.stack([found[i] for i in indices])

    def _folder_frame(self, index: int, size: tuple[int, int], crop: tuple[int, int, int, int] | None) -> np.ndarray:
        """Image `index` of a folder, checked to be the size of the first, at `size` by Pillow's bicubic resize
        (Video-P2P's `Image.open(file).convert("RGB").resize((width, height))`; its own size: the pixels unchanged)
        of `crop` (x, y, width, height) or the whole image."""
        file, width, height = self.images[index], self.info.width, self.info.height
        image = load_image(file)
        if image.size != (width, height):
            raise VideoReadError(f"{self.path}: frame images differ in size ({self.images[0].name} is {width}x"
                                 f"{height}, {file.name} is {image.width}x{image.height}); give frames of one size")
        box = None if crop is None else (crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])
        return np.asarray(image.resize(size, Image.Resampling.BICUBIC, box))


class _DecodingStopped(Exception):
    """A decoding error part-way through a stream: the frames before it are what a damaged file holds."""


def _scaler(size: tuple[int, int], crop: tuple[int, int, int, int] | None) -> Callable[[av.VideoFrame], np.ndarray]:
    """A function giving a frame as `(H, W, 3)` uint8 RGB at `size` (width, height) through FFmpeg's filter graph:
    the first frame's `Orientation` (transpose, hflip, vflip, as FFmpeg's player inserts them), `crop=w:h:x:y` when
    asked, `scale=W:H:flags=bilinear` then `format=rgb24` (one frame out for each in), built for the first frame's
    size and pixel format (a damaged header may not state the format)."""
    graph = None

    def scale(frame: av.VideoFrame) -> np.ndarray:
        nonlocal graph
        if graph is None:
            graph = av.filter.Graph()
            source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                      time_base=Fraction(1, 1000))  # timestamps only pass through
            turns = [graph.add(name, args) for name, args in Orientation.of(frame).filters()]
            cut = [graph.add("crop", "{2}:{3}:{0}:{1}".format(*crop))] if crop is not None else []
            nodes = (source, *turns, *cut, graph.add("scale", f"{size[0]}:{size[1]}:flags=bilinear"),
                     graph.add("format", "rgb24"), graph.add("buffersink"))
            graph.link_nodes(*nodes).configure()
        graph.push(frame)
        return graph.pull().to_ndarray()

    return scale


def _video_frames(path: str) -> Iterator[av.VideoFrame]:
    """Every frame of the first video stream of `path`, at the header's size, up to a decoding error."""
    with _open(path) as container:
        stream = container.streams.video[0]
        # Slice threads, not frame threads: after a decoding error, which of the frames in flight in frame threads
        # come out depends on the core count, and a damaged file must give the same frames on every machine.
        stream.thread_type = "SLICE"
        # A stream may change size part-way (joined clips); every frame is brought to the header's size.
        native = stream.codec_context.width, stream.codec_context.height
        try:
            for frame in container.decode(stream):
                yield frame if (frame.width, frame.height) == native else frame.reformat(*native)
        except av.FFmpegError as err:
            raise _DecodingStopped(_reason(err)) from err


def image_files(folder: str) -> list[Path]:
    try:
        files = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    except OSError as err:
        raise VideoReadError(f"{folder}: cannot be listed ({err.strerror or err}); check its permissions") from err
    if not files:
        raise VideoReadError(f"{folder}: is a folder with no frame images ({', '.join(IMAGE_SUFFIXES)}); give a video "
                             "file or a folder of frames")
    # by the numbers in the names, so that 2.jpg comes before 10.jpg, then by name
    return sorted(files, key=lambda p: ([int(number) for number in re.findall(r"\d+", p.name)], p.name))


def load_image(file: Path) -> Image.Image:
    try:
        with Image.open(file) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # as shown: turned by its EXIF orientation
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise VideoReadError(f"{file}: cannot be read as an image ({first_line(err)}); re-export the frame or remove "
                             "it from the folder") from err


def _checked_file(path: str) -> str:
    """`path` if it is a readable, non-empty file, else a VideoReadError saying why."""
    if not os.path.isfile(path):  # missing, a broken link, or a pipe/device that the decoder could block on
        raise VideoReadError(f"{path}: no such video file; check the path")
    try:
        with open(path, "rb") as file:
            head = file.read(1)
    except OSError as err:
        raise VideoReadError(f"{path}: cannot be opened ({err.strerror or err}); check its permissions") from err
    if not head:
        raise VideoReadError(f"{path}: is empty (0 bytes); copy or export the video again")
    return path


def _reason(err: av.FFmpegError) -> str:
    """FFmpeg's words for what went wrong ("Invalid data found when processing input"), without the error number
    and file name that PyAV's message adds ("[Errno 1094995529] ...: 'path'"): the message names the file itself."""
    return err.strerror or first_line(err)


def _open(path: str) -> av.container.InputContainer:
    try:
        # metadata_errors="replace": a damaged text tag (title, encoder) must not stop the frames from being read
        container = av.open(path, metadata_errors="replace")
    except av.FFmpegError as err:
        raise VideoReadError(f"{path}: cannot be read as a video ({_reason(err)}); {_FIX}") from err
    # FFmpeg opens a still image (png_pipe, jpeg_pipe, bmp_pipe, ... or image2) as a one-frame "video"; a clip of one
    # still is never what was meant.
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):
        container.close()
        kind = "still" if name == "image2" else name.removesuffix("_pipe").upper().replace("WEBP", "WebP")
        raise VideoReadError(f"{path}: is a {kind} image, not a video; give a video file (e.g. .mp4) of the clip, "
                             "or a folder of frames")
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
        stamps = []
        try:
            for packet in container.demux(stream):
                if packet.size > 0:  # empty packets only flush the decoder
                    stamps.append(packet.pts)
        except av.FFmpegError:
            pass  # truncated or damaged: the packets before the fault are what the file holds
        size = stream.codec_context.width, stream.codec_context.height
        pixel = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio  # None or 0/1: square
        time_base = stream.time_base
    if pixel:  # not square: shown at the displayed width
        size = round(size[0] * pixel), size[1]
    if not stamps:
        raise VideoReadError(f"{path}: has no decodable video frames; it is empty, truncated or damaged: {_FIX}")
    fps = Fraction(rate).limit_denominator(1001)
    times = None if None in stamps else _variable_times(sorted(stamps), time_base, fps)
    return VideoInfo(len(stamps), fps, *_orientation(path).shown_size(*size), start_time=start, times=times)


def _orientation(path: str) -> Orientation:
    """The `Orientation` of the first frame of `path` (FFmpeg puts the stream's display matrix on every frame);
    none where no frame decodes (reading the frames then says why)."""
    with _open(path) as container:
        try:
            for frame in container.decode(container.streams.video[0]):
                return Orientation.of(frame)
        except av.FFmpegError:
            pass
    return Orientation()


def _variable_times(stamps: list[int], time_base: Fraction, fps: Fraction) -> tuple[float, ...] | None:
    """The frames' presentation times in seconds when they stray from a constant `fps` by half a frame or more
    (a variable-frame-rate file), else None. Packets' stamps, sorted, are the frames' presentation order."""
    times = [float(stamp * time_base) for stamp in stamps]
    steady = all(abs(t - times[0] - i / fps) < 0.5 / fps for i, t in enumerate(times))
    return None if steady else tuple(times)
