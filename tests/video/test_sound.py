"""Tests for tuneavideo.video.sound: the source's sound for an edit, cut on the media timeline and muxed back.

Sources are made here: pictures that say their index (`tests.helpers.index_frames`) at 10 fps, and sound that says
its time: a 200 -> 2000 Hz chirp of 3 s (or one tone per second), put on the timeline with ffmpeg's ``-itsoffset``
so that the sound starts 0.4 s after the pictures, or the pictures 0.4 s after the sound. The sound cut for an
edit must be the sound playing over its pictures: it correlates with the known chirp at the known offset, where a cut
by sample position (ignoring when each stream starts) does not.
"""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from tests.helpers import ffmpeg, index_frames, probe, write_frames_mp4
from tuneavideo.video.readers import Clip, VideoReadError
from tuneavideo.video.sound import extract_audio, has_audio, mux_audio, source_span
from tuneavideo.video.writers import write_mp4

RATE = 48_000
SOURCE_FPS = 10
OFFSET = 0.4  # seconds between the start of the pictures and of the sound
CHIRP_S, CHIRP_HZ = 3.0, (200.0, 2000.0)
TONES = (440.0, 1000.0, 1760.0)  # one per second: the frequency says which second was cut


def chirp(times: np.ndarray) -> np.ndarray:
    """The chirp at `times` (seconds from its start); 0 outside it."""
    f0, f1 = CHIRP_HZ
    phase = 2 * np.pi * (f0 * times + (f1 - f0) / (2 * CHIRP_S) * times**2)
    return np.where((times >= 0) & (times < CHIRP_S), 0.5 * np.sin(phase), 0.0)


def tones(times: np.ndarray) -> np.ndarray:
    freq = np.asarray(TONES)[np.clip(times.astype(int), 0, len(TONES) - 1)]
    return 0.5 * np.sin(2 * np.pi * freq * times)


def write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, RATE)
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2") / 32768


def decoded_audio(path: Path) -> np.ndarray:
    """Every decoded sample of the first audio stream (mono), in order, as a naive reader gets them."""
    with av.open(str(path)) as container:
        return np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)]).astype(np.float64)


def start_times(path: Path) -> tuple[float, float]:
    """(video, audio) stream start times in seconds, as the demuxer reports them."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        return float(video.start_time * video.time_base), float(audio.start_time * audio.time_base)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[np.argmax(spectrum)])


def mux_source(folder: Path, name: str, video_s: float, sound: np.ndarray, *, video_offset: float = 0.0,
               sound_offset: float = 0.0) -> Path:
    """A SOURCE_FPS video of `video_s` seconds and AAC `sound`, each shifted on the timeline by its offset."""
    pictures = write_frames_mp4(folder / f"{name} pictures.mp4", index_frames(int(video_s * SOURCE_FPS)), SOURCE_FPS)
    wav = write_wav(folder / f"{name}.wav", sound)
    out = folder / f"{name}.mp4"
    ffmpeg("-itsoffset", video_offset, "-i", pictures, "-itsoffset", sound_offset, "-i", wav, "-map", "0:v",
           "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-b:a", "192k", out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    seconds = np.arange(int(CHIRP_S * RATE)) / RATE
    silent = folder / "silent.mp4"
    write_mp4(index_frames(20), silent, SOURCE_FPS)
    return {
        "tones": mux_source(folder, "tones", 3.0, tones(seconds)),
        "short sound": mux_source(folder, "short", 3.0, tones(seconds[: int(1.5 * RATE)])),
        "sound late": mux_source(folder, "sound late", 3.0, chirp(seconds), sound_offset=OFFSET),
        "video late": mux_source(folder, "video late", 3.0, chirp(seconds), video_offset=OFFSET),
        "silent": silent,
    }


# The span -----------------------------------------------------------------------------------------------------------


def test_source_span():
    assert source_span(0, 8, 1, 8.0) == (0.0, 1.0)
    start, end = source_span(10, 8, 3, 30.0)
    assert start == pytest.approx(1 / 3) and end == pytest.approx(34 / 30)
    assert source_span(5, 10, 1, 10.0, start_time=0.4) == pytest.approx((0.9, 1.9))  # on the source's timeline
    for bad in [(0, 0, 1, 30.0), (0, 8, 1, 0.0), (-1, 8, 1, 30.0), (0, 8, 0, 30.0), (0, 8, 1, float("nan"))]:
        with pytest.raises(ValueError, match="invalid span"):
            source_span(*bad)


def test_has_audio(sources):
    assert has_audio(sources["tones"]) and not has_audio(sources["silent"])


# The sound on the timeline ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sound late", "video late"])
def test_sources_start_apart(sources, name):
    # The fixture does what the tests below rely on: the streams really start OFFSET apart.
    video, audio = start_times(sources[name])
    # AAC's 1024 priming samples put the sound's first packet 21 ms before its first sound, when it starts late
    expected = (0.0, OFFSET - 1024 / RATE) if name == "sound late" else (OFFSET, 0.0)
    assert (video, audio) == pytest.approx(expected, abs=1e-3)
    assert Clip(sources[name]).info.start_time == pytest.approx(video, abs=1e-6)


@pytest.mark.parametrize("name", ["sound late", "video late"])
@pytest.mark.parametrize(("first_frame", "num_frames", "stride"), [(5, 10, 1), (12, 8, 1), (2, 8, 3)])
def test_extract_audio_gives_the_sound_playing_over_the_pictures(sources, tmp_path, name, first_frame, num_frames,
                                                                 stride):
    source = sources[name]
    clip = Clip(source)
    video_start, sound_start = (0.0, OFFSET) if name == "sound late" else (OFFSET, 0.0)
    start, end = source_span(first_frame, num_frames, stride, float(clip.info.fps), clip.info.start_time)
    assert start == pytest.approx(video_start + first_frame / SOURCE_FPS)
    out = tmp_path / "span.wav"
    assert extract_audio(source, out, start, end) == str(out)
    cut = read_wav(out)
    assert len(cut) == round((end - start) * RATE)
    # What plays over those pictures: the chirp at the timeline's times, shifted by when the sound starts.
    expected = chirp(start + np.arange(len(cut)) / RATE - sound_start)
    assert correlation(cut, expected) > 0.99
    # Cut by sample position (the frames' seconds into the sound, ignoring when either stream starts): 0.4 s off.
    by_position = decoded_audio(source)[round(first_frame / SOURCE_FPS * RATE) :][: len(cut)]
    assert abs(correlation(by_position, expected)) < 0.1
    if name == "video late":  # and ignoring only the pictures' start time is as wrong
        extract_audio(source, out, *source_span(first_frame, num_frames, stride, float(clip.info.fps)))
        assert abs(correlation(read_wav(out), expected)) < 0.1


@pytest.mark.parametrize(("name", "span", "silent_s"), [
    ("sound late", (0.0, 0.8), (0.0, OFFSET - 0.05)),  # the first pictures, before the sound starts
    ("video late", (2.6, 3.4), (0.45, 0.8)),  # the last pictures, after the sound ends (3.0 on the timeline)
    ("video late", (3.1, 3.4), (0.0, 0.3)),  # entirely after the sound
])
def test_extract_audio_is_silent_where_the_source_has_no_sound(sources, tmp_path, name, span, silent_s):
    out = tmp_path / "span.wav"
    extract_audio(sources[name], out, *span)
    cut = read_wav(out)
    assert len(cut) == round((span[1] - span[0]) * RATE)
    quiet = cut[round(silent_s[0] * RATE) : round(silent_s[1] * RATE)]
    assert len(quiet) > 0 and np.abs(quiet).max() < 1e-3
    sound_start = OFFSET if name == "sound late" else 0.0
    expected = chirp(span[0] + np.arange(len(cut)) / RATE - sound_start)
    if np.abs(expected).max() > 0:
        assert correlation(cut, expected) > 0.99


def test_extract_audio_span_before_the_timeline(sources, tmp_path):
    # A start below 0 (some files' timelines start there): silence until 0, then the sound.
    out = tmp_path / "span.wav"
    extract_audio(sources["video late"], out, -0.2, 0.5)
    cut = read_wav(out)
    assert len(cut) == round(0.7 * RATE) and np.abs(cut[: round(0.2 * RATE)]).max() == 0
    assert correlation(cut, chirp(-0.2 + np.arange(len(cut)) / RATE)) > 0.99


def test_extract_audio_span(sources, tmp_path):
    out = tmp_path / "span.wav"
    assert extract_audio(sources["tones"], out, 1.0, 2.0) == str(out)
    samples = read_wav(out)
    assert len(samples) == RATE
    assert dominant_hz(samples) == pytest.approx(TONES[1], abs=2)


def test_extract_audio_rejects_bad_requests(sources, tmp_path):
    assert extract_audio(sources["silent"], tmp_path / "none.wav", 0.0, 1.0) is None
    with pytest.raises(ValueError, match="extract_audio writes WAV"):
        extract_audio(sources["tones"], tmp_path / "x.m4a", 0.0, 1.0)
    for start, end in [(1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="need start < end"):
            extract_audio(sources["tones"], tmp_path / "x.wav", start, end)
    assert not list(tmp_path.iterdir())


# Muxing -------------------------------------------------------------------------------------------------------------


def edited(tmp_path: Path, num_frames: int, fps: float) -> Path:
    """A silent stand-in for an edit: `num_frames` frames at `fps`."""
    path = tmp_path / "edited.mp4"
    write_mp4(255 - index_frames(num_frames), path, fps)
    return path


@pytest.mark.parametrize("name", ["sound late", "video late"])
def test_mux_audio_puts_the_sound_of_the_pictures_on_the_edit(sources, tmp_path, name):
    clip = Clip(sources[name])
    start, end = source_span(12, 8, 1, float(clip.info.fps), clip.info.start_time)
    out = tmp_path / "with sound.mp4"
    assert mux_audio(edited(tmp_path, 8, SOURCE_FPS), sources[name], out, start, end) is True
    info = probe(out)
    assert (info["frames"], info["fps"], info["codec"], info["pix_fmt"]) == (8, SOURCE_FPS, "h264", "yuv420p")
    assert abs(info["audio_seconds"] - 0.8) < 1 / SOURCE_FPS
    sound = decoded_audio(out)[: round(0.8 * RATE)]
    sound_start = OFFSET if name == "sound late" else 0.0
    expected = chirp(start + np.arange(len(sound)) / RATE - sound_start)
    assert correlation(sound, expected) > 0.99
    wrong = chirp(12 / SOURCE_FPS + np.arange(len(sound)) / RATE)  # the sound at the frames' position in the sound
    assert abs(correlation(sound, wrong)) < 0.1


@pytest.mark.parametrize(("start", "tone"), [(0.0, TONES[0]), (1.0, TONES[1]), (2.0, TONES[2])])
def test_mux_audio_uses_the_requested_span(sources, tmp_path, start, tone):
    out = tmp_path / "with sound.mp4"
    assert mux_audio(edited(tmp_path, 10, SOURCE_FPS), sources["tones"], out, start, start + 1.0) is True
    samples = decoded_audio(out)
    assert abs(len(samples) / RATE - 1.0) < 1 / SOURCE_FPS
    # Skip the edges: AAC smears the tone switch of the neighbouring span a little.
    assert dominant_hz(samples[int(0.1 * RATE) : int(0.9 * RATE)]) == pytest.approx(tone, abs=5)
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"


@pytest.mark.parametrize(("num_frames", "fps"), [(5, 10), (10, 12.5), (16, 8)])
def test_mux_audio_cuts_longer_sound_to_the_video(sources, tmp_path, num_frames, fps):
    out = tmp_path / "out.mp4"
    assert mux_audio(edited(tmp_path, num_frames, fps), sources["tones"], out, 0.0, 3.0)
    info = probe(out)
    assert info["frames"] == num_frames and info["fps"] == pytest.approx(fps)
    assert abs(info["audio_seconds"] - num_frames / fps) < 1 / fps


def test_mux_audio_pads_shorter_sound_with_silence(sources, tmp_path):
    out = tmp_path / "out.mp4"
    # The span [1, 3) only has 0.5 s of sound: the source's sound stops at 1.5 s.
    assert mux_audio(edited(tmp_path, 20, SOURCE_FPS), sources["short sound"], out, 1.0, 3.0)
    samples = decoded_audio(out)
    assert abs(len(samples) / RATE - 2.0) < 1 / SOURCE_FPS
    assert dominant_hz(samples[int(0.05 * RATE) : int(0.45 * RATE)]) == pytest.approx(TONES[1], abs=5)
    tail = samples[int(0.7 * RATE) :]
    assert np.sqrt(np.mean(tail**2)) < 1e-3 < np.sqrt(np.mean(samples[: int(0.4 * RATE)] ** 2))


def test_mux_audio_silent_source_copies_video(sources, tmp_path, caplog):
    video = edited(tmp_path, 8, 8)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="tuneavideo.video.sound"):
        assert mux_audio(video, sources["silent"], out, 0.0, 1.0) is False
    assert out.read_bytes() == video.read_bytes()
    assert len(caplog.records) == 1 and "has no audio" in caplog.records[0].getMessage()


def test_mux_audio_failure_keeps_existing_output(sources, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(VideoReadError, match="no such video file"):
        mux_audio(tmp_path / "missing.mp4", sources["tones"], out, 0.0, 1.0)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="cannot be read as a video"):
        mux_audio(tmp_path / "broken.mp4", sources["tones"], out, 0.0, 1.0)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4", "out.mp4"]
