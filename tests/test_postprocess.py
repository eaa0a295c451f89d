"""Tests for tuneavideo.postprocess: audio span maths, extraction and muxing onto edited clips.

All clips are generated here: frames via write_mp4, a tone track via the ``wave`` module, muxed with the ffmpeg
binary that imageio-ffmpeg ships.
"""

from __future__ import annotations

import logging
import subprocess
import wave
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest

from tuneavideo.postprocess import extract_audio, has_audio, mux_audio, source_span
from tuneavideo.video_io import write_mp4

RATE = 48_000
SOURCE_FPS = 10
# One tone per second of the source, so the frequency tells which span was cut.
TONES = (440.0, 1000.0, 1760.0)


def _frames(n: int, size: int = 32) -> np.ndarray:
    return np.stack([np.full((size, size, 3), (7 * i) % 256, np.uint8) for i in range(n)])


def _write_tone(path: Path, seconds: float) -> None:
    t = np.arange(int(seconds * RATE)) / RATE
    freq = np.asarray(TONES)[np.minimum(t.astype(int), len(TONES) - 1)]
    samples = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(samples.tobytes())


def _source(folder: Path, name: str, video_s: float, audio_s: float) -> Path:
    """A SOURCE_FPS video of ``video_s`` seconds with an AAC tone track of ``audio_s`` seconds."""
    silent, tone, out = folder / f"{name}-silent.mp4", folder / f"{name}.wav", folder / f"{name}.mp4"
    write_mp4(_frames(int(video_s * SOURCE_FPS)), silent, SOURCE_FPS)
    _write_tone(tone, audio_s)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(silent), "-i", str(tone)]
    subprocess.run(cmd + ["-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", str(out)], check=True)
    return out


def _audio(path: Path) -> tuple[np.ndarray, int]:
    """Decoded mono float samples (edit lists applied by the decoder) and the sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = []
        for frame in container.decode(stream):
            data = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels) interleaved
            chunks.append(data[0] if frame.format.is_planar else data[0, :: frame.layout.nb_channels])
        return np.concatenate(chunks).astype(np.float64), stream.rate


def _video_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)) / float(stream.average_rate)


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    silent = folder / "silent.mp4"
    write_mp4(_frames(20), silent, SOURCE_FPS)
    return {
        "source": _source(folder, "source", video_s=3.0, audio_s=3.0),
        "short_audio": _source(folder, "short", video_s=3.0, audio_s=1.5),
        "silent": silent,
    }


def test_source_span():
    assert source_span(0, 8, 1, 8.0) == (0.0, 1.0)
    start, end = source_span(10, 8, 3, 30.0)
    assert start == pytest.approx(1 / 3) and end == pytest.approx(34 / 30)
    with pytest.raises(ValueError):
        source_span(0, 0, 1, 30.0)
    with pytest.raises(ValueError):
        source_span(0, 8, 1, 0.0)


def test_has_audio(clips):
    assert has_audio(clips["source"]) and not has_audio(clips["silent"])


def test_extract_audio_span(clips, tmp_path):
    out = tmp_path / "span.wav"
    assert extract_audio(clips["source"], out, 1.0, 2.0) == str(out)
    samples, rate = _audio(out)
    assert rate == RATE
    assert len(samples) / rate == pytest.approx(1.0, abs=0.01)
    assert _dominant_hz(samples, rate) == pytest.approx(TONES[1], abs=5)
    whole = extract_audio(clips["source"], tmp_path / "all.m4a", 0.5)  # end None -> rest of the audio
    assert whole is not None and len(_audio(Path(whole))[0]) / RATE == pytest.approx(2.5, abs=0.05)


def test_extract_audio_silent_source_writes_nothing(clips, tmp_path):
    assert extract_audio(clips["silent"], tmp_path / "none.wav") is None
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="suffix|use one of"):
        extract_audio(clips["source"], tmp_path / "x.txt")


@pytest.mark.parametrize(("start", "tone"), [(0.0, TONES[0]), (1.0, TONES[1]), (2.0, TONES[2])])
def test_mux_audio_uses_the_requested_span(clips, tmp_path, start, tone):
    edited = tmp_path / "edited.mp4"
    write_mp4(_frames(10), edited, SOURCE_FPS)  # 1 s, as edited from 10 source frames at rate 1
    out = tmp_path / "with_audio.mp4"
    assert mux_audio(edited, clips["source"], out, start, start + 1.0) is True
    samples, rate = _audio(out)
    assert len(samples) / rate == pytest.approx(_video_duration(out), abs=1 / SOURCE_FPS)
    # Skip the edges: AAC smears the tone switch of the neighbouring span a little.
    middle = samples[int(0.1 * rate) : int(0.9 * rate)]
    assert _dominant_hz(middle, rate) == pytest.approx(tone, abs=5)
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.codec_context.pix_fmt, audio.codec_context.name) == (
            "h264",
            "yuv420p",
            "aac",
        )


@pytest.mark.parametrize(("n_frames", "fps"), [(5, 10), (10, 12.5), (16, 8)])
def test_mux_audio_cuts_longer_audio_to_video(clips, tmp_path, n_frames, fps):
    edited = tmp_path / "edited.mp4"
    write_mp4(_frames(n_frames), edited, fps)
    out = tmp_path / "out.mp4"
    assert mux_audio(edited, clips["source"], out, 0.0, 3.0)
    duration = _video_duration(out)
    assert duration == pytest.approx(n_frames / fps, abs=1e-6)
    samples, rate = _audio(out)
    assert len(samples) / rate == pytest.approx(duration, abs=1 / fps)
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert float(audio.duration * audio.time_base) == pytest.approx(duration, abs=1 / fps)


def test_mux_audio_pads_shorter_audio_with_silence(clips, tmp_path):
    edited = tmp_path / "edited.mp4"
    write_mp4(_frames(20), edited, SOURCE_FPS)  # 2 s of video
    out = tmp_path / "out.mp4"
    # The span [1, 3) only has 0.5 s of sound: the source's audio stops at 1.5 s.
    assert mux_audio(edited, clips["short_audio"], out, 1.0, 3.0)
    samples, rate = _audio(out)
    assert len(samples) / rate == pytest.approx(_video_duration(out), abs=1 / SOURCE_FPS)
    assert _dominant_hz(samples[int(0.05 * rate) : int(0.45 * rate)], rate) == pytest.approx(TONES[1], abs=5)
    tail = samples[int(0.7 * rate) :]
    assert np.sqrt(np.mean(tail**2)) < 1e-3 < np.sqrt(np.mean(samples[: int(0.4 * rate)] ** 2))


def test_mux_audio_silent_source_copies_video(clips, tmp_path, caplog):
    edited = tmp_path / "edited.mp4"
    write_mp4(_frames(8), edited, 8)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="tuneavideo.postprocess"):
        assert mux_audio(edited, clips["silent"], out, 0.0, 1.0) is False
    assert out.read_bytes() == edited.read_bytes()
    assert len(caplog.records) == 1 and "no audio" in caplog.records[0].getMessage()
    with av.open(str(out)) as container:
        assert not container.streams.audio


def test_mux_audio_failure_keeps_existing_output(clips, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises((FileNotFoundError, av.FFmpegError)):
        mux_audio(tmp_path / "missing.mp4", clips["source"], out, 0.0, 1.0)
    edited = tmp_path / "edited.mp4"
    write_mp4(_frames(8), edited, 8)
    with pytest.raises(ValueError, match="past the end"):
        mux_audio(edited, clips["source"], out, 5.0, 6.0)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.mp4", "out.mp4"]
