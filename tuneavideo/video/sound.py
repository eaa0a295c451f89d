"""Give an edited Tune-A-Video clip the sound of the source video (the steps ``postprocess.ipynb`` walks through).

An edit covers some frames of the source, every ``stride``-th from ``first_frame`` on, and plays at
``source fps / stride``. To put the source's sound back:

1. ``source_span(...)`` gives the seconds of the source those frames cover, on the source's own timeline
   (presentation time: a camera file's video often starts some milliseconds after, or before, its sound);
2. ``extract_audio(source, out.wav, start, end)`` cuts that span of sound by presentation time, with silence
   where the source has none;
3. ``mux_audio(edited.mp4, source, out.mp4, start, end)`` does both and muxes the sound in, cut or padded to
   exactly the edited video's length.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from ..atomic import atomic_path
from .readers import Clip
from .writers import write_mp4

logger = logging.getLogger(__name__)


def has_audio(video_path: str | os.PathLike[str]) -> bool:
    """True when the file has at least one audio stream."""
    with av.open(os.fspath(video_path)) as container:
        return bool(container.streams.audio)


def source_span(first_frame: int, num_frames: int, stride: int, fps: float, start_time: float = 0.0
                ) -> tuple[float, float]:
    """Seconds ``[start, end)`` on the source's timeline covered by frames ``first_frame, first_frame + stride,
    ...`` (``num_frames`` of them) of a clip whose first frame is shown at ``start_time``.

    Each edited frame stands for ``stride`` source frames, so the span ends one stride after the last one.
    """
    if first_frame < 0 or num_frames < 1 or stride < 1 or not fps > 0:
        raise ValueError(f"invalid span: first_frame={first_frame}, num_frames={num_frames}, stride={stride}, "
                         f"fps={fps}")
    return start_time + first_frame / fps, start_time + (first_frame + num_frames * stride) / fps


def extract_audio(video_path: str | os.PathLike[str], out_path: str | os.PathLike[str], start: float,
                  end: float) -> str | None:
    """Write the sound of ``video_path`` over ``[start, end)`` seconds of its timeline to the WAV ``out_path``.

    Samples are placed by their presentation time, so the span is in sync with the pictures shown over it; where
    the source has no sound (before its sound starts, after it ends) the WAV is silent. The sample rate and
    channel count are kept. Returns the output path, or None (writing nothing) when the source has no audio.
    """
    if not start < end:  # a start before 0 is fine: the timeline of some files starts below 0
        raise ValueError(f"need start < end, got start={start}, end={end}")
    if Path(out_path).suffix.lower() != ".wav":
        raise ValueError(f"extract_audio writes WAV; got {os.fspath(out_path)!r}")
    with av.open(os.fspath(video_path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        # 16-bit interleaved samples, the stream's own rate and channels: a format change only, no resampling
        resampler = av.AudioResampler(format="s16", layout=stream.codec_context.layout, rate=rate)
        span = np.zeros((round((end - start) * rate), channels), np.int16)
        for frame in _decodable(container, stream):
            if frame.time is None:
                continue
            offset = round((frame.time - start) * rate)
            if offset >= len(span):  # frames come in time order: the rest is past the span
                break
            for converted in resampler.resample(frame):
                samples = converted.to_ndarray().reshape(-1, channels)
                _place(span, samples, offset)
                offset += len(samples)
    with atomic_path(out_path) as temporary, wave.open(os.fspath(temporary), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(span.tobytes())
    return os.fspath(out_path)


def _decodable(container: av.container.InputContainer, stream: av.audio.AudioStream) -> Iterator[av.AudioFrame]:
    """The stream's frames; packets that do not decode (a damaged file) are left out, so their time is silent."""
    damaged = 0
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.FFmpegError:
            damaged += 1
    if damaged:
        logger.warning(f"note: {damaged} damaged sound packet(s) of {container.name} are silent")


def _place(span: np.ndarray, samples: np.ndarray, offset: int) -> None:
    """Copy ``samples`` into ``span`` starting at ``offset`` (either may be negative or run past the end)."""
    first, last = max(offset, 0), min(offset + len(samples), len(span))
    if first < last:
        span[first:last] = samples[first - offset : last - offset]


def mux_audio(
    video_path: str | os.PathLike[str],
    audio_source_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    start: float,
    end: float,
) -> bool:
    """Write ``video_path`` with the sound of ``audio_source_path`` over ``[start, end)`` to ``out_path``.

    The sound is cut or padded with silence to the video's exact length (frames / fps) and the result is H.264
    yuv420p + AAC, re-encoded (CRF 18) so that any input ends up browser-safe. When the source has no audio the
    video is copied unchanged and False is returned. An existing ``out_path`` is only replaced once the new file is
    complete.
    """
    # The cut goes to lossless WAV first so the only lossy audio step is the final AAC encode.
    with tempfile.TemporaryDirectory(prefix="tav-audio-") as folder:
        wav = extract_audio(audio_source_path, Path(folder) / "span.wav", start, end)
        if wav is None:
            logger.warning("%s has no audio; copying %s to %s without sound", audio_source_path, video_path, out_path)
            with atomic_path(out_path) as tmp:
                shutil.copyfile(video_path, tmp)
            return False
        clip = Clip(video_path)
        write_mp4(np.stack(list(clip.frames())), out_path, clip.info.fps, wav)
    return True
