"""Give an edited Tune-A-Video clip the sound of the source video (the steps ``postprocess.ipynb`` walks through).

Tune-A-Video trains on ``n_sample_frames`` frames taken every ``sample_frame_rate`` frames from
``sample_start_idx`` on, and writes silent videos. To put the source's sound back:

1. ``source_span(...)`` gives the seconds of the source those frames cover;
2. ``mux_audio(edited.mp4, source.mp4, out.mp4, start, end)`` cuts that span of audio and muxes it in, making the
   audio exactly as long as the edited video.

The sound stays in sync only if the edited video was saved at ``source_fps / sample_frame_rate`` fps (then both
last ``n_frames * sample_frame_rate / source_fps`` s); at another fps the audio is cut or padded, not stretched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import av
from moviepy import AudioFileClip

from tuneavideo.atomic import atomic_path
from tuneavideo.video_io import read_video, write_mp4

logger = logging.getLogger(__name__)

# moviepy picks libfdk_aac for .m4a, which common ffmpeg builds lack, so choose encoders ourselves.
_AUDIO_CODECS = {
    ".wav": "pcm_s16le",
    ".m4a": "aac",
    ".aac": "aac",
    ".mp3": "libmp3lame",
    ".flac": "flac",
    ".ogg": "libvorbis",
}


def _audio_info(path: str | os.PathLike[str]) -> tuple[int, float] | None:
    """Return (sample rate, duration in s) of the first audio stream, or None when there is none."""
    with av.open(os.fspath(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            # Some containers (e.g. raw streams) only know the overall duration, in microseconds.
            duration = container.duration / av.time_base
        else:
            raise ValueError(f"cannot tell how long the audio in {path} is")
        return stream.rate, duration


def has_audio(video_path: str | os.PathLike[str]) -> bool:
    """True when the file has at least one audio stream."""
    return _audio_info(video_path) is not None


def source_span(
    sample_start_idx: int, n_frames: int, sample_frame_rate: int, source_fps: float
) -> tuple[float, float]:
    """Seconds ``[start, end)`` of the source covered by frames ``start, start + rate, ...`` (``n_frames`` of them).

    Each sampled frame stands for ``sample_frame_rate`` source frames, so the span ends one stride after the last
    sampled frame: ``[start / fps, (start + n_frames * rate) / fps)``.
    """
    if sample_start_idx < 0 or n_frames < 1 or sample_frame_rate < 1 or not source_fps > 0:
        raise ValueError(
            f"invalid sampling: start={sample_start_idx}, n_frames={n_frames}, "
            f"rate={sample_frame_rate}, fps={source_fps}"
        )
    return sample_start_idx / source_fps, (sample_start_idx + n_frames * sample_frame_rate) / source_fps


def extract_audio(
    video_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    start: float = 0.0,
    end: float | None = None,
) -> str | None:
    """Write the audio of ``video_path`` over ``[start, end)`` s to ``out_path`` (format from its suffix).

    ``end`` past the end of the audio is clipped to it. The sample rate is kept; moviepy always decodes to two
    channels, so mono becomes (identical) stereo. Returns the output path, or None (writing nothing) when the
    source has no audio.
    """
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"need 0 <= start < end, got start={start}, end={end}")
    codec = _AUDIO_CODECS.get(Path(out_path).suffix.lower())
    if codec is None:
        raise ValueError(f"unsupported audio output {os.fspath(out_path)!r}: use one of {sorted(_AUDIO_CODECS)}")
    info = _audio_info(video_path)
    if info is None:
        return None
    rate, duration = info
    if start >= duration:
        raise ValueError(f"start={start} s is past the end of the audio in {video_path} ({duration:.3f} s)")
    stop = duration if end is None else min(end, duration)
    # Read at the source's own sample rate: moviepy would otherwise resample everything to 44.1 kHz.
    with AudioFileClip(os.fspath(video_path), fps=rate) as clip:
        stop = min(stop, clip.duration)  # moviepy refuses to cut beyond the duration it parsed itself
        with atomic_path(out_path) as tmp:
            clip.subclipped(start, stop).write_audiofile(os.fspath(tmp), fps=rate, codec=codec, logger=None)
    return os.fspath(out_path)


def mux_audio(
    video_path: str | os.PathLike[str],
    audio_source_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    start: float,
    end: float,
) -> bool:
    """Write ``video_path`` with the audio of ``audio_source_path`` over ``[start, end)`` to ``out_path``.

    The audio is cut or padded with silence to the video's exact length (frames / fps) and the result is H.264
    yuv420p + AAC. The video is re-encoded (CRF 18) so that any input ends up browser-safe. When the source has no
    audio the video is copied unchanged and False is returned. An existing ``out_path`` is only replaced once the
    new file is complete.
    """
    if not has_audio(audio_source_path):
        logger.warning("%s has no audio; copying %s to %s without sound", audio_source_path, video_path, out_path)
        with atomic_path(out_path) as tmp:
            shutil.copyfile(video_path, tmp)
        return False
    frames, fps = read_video(video_path)
    # The cut goes to lossless WAV first so the only lossy audio step is the final AAC encode.
    with tempfile.TemporaryDirectory(prefix="tav-audio-") as tmpdir:
        wav = extract_audio(audio_source_path, Path(tmpdir) / "span.wav", start, end)
        write_mp4(frames, out_path, fps, audio_path=wav)
    return True
