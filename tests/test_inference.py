"""Editing a tuned run (`inference.py`, `tuneavideo.editing`) on the tiny model and clips made here.

Three tiny runs of one training step each: the sample clip (square, sound, 24 fps), a 16:9 clip with sound at
30000/1001 fps and a silent square clip at 12.5 fps. The edits are checked by decoding what was written.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDIMScheduler
from PIL import Image

import inference
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.data.dataset import TuneAVideoDataset, fit_size
from tuneavideo.editing import EditOptions, edit, invert_source, sampling_scheduler
from tuneavideo.inversion import inverse_scheduler
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.tiny import SD_SCHEDULER_CONFIG
from tuneavideo.training import train
from tuneavideo.video_io import read_video, write_mp4

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CLIP = ROOT / "data" / "sample.mp4"
NTSC = Fraction(30000, 1001)
FAST = dict(steps=3, inv_steps=3)  # the runs' validation_data.num_inv_steps, so their cached latent fits


def make_clip(path: Path, width: int, height: int, fps: Fraction, num_frames: int, sound: bool) -> Path:
    """A clip whose frames all differ (a bar moving over a gradient), with a 440 Hz tone when `sound`."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i] = np.stack([np.broadcast_to(x, (height, width)), np.full((height, width), 40.0),
                              np.full((height, width), 200.0)], axis=-1).astype(np.uint8)
        left = i * width // num_frames
        frames[i, :, left : left + width // 8] = 255
    wav = None
    if sound:
        wav = path.with_suffix(".wav")
        rate = 48_000
        t = np.arange(int(rate * num_frames / fps + rate)) / rate  # a second longer than the picture
        with wave.open(str(wav), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes((0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    write_mp4(frames, path, fps, audio_path=wav)
    return path


def tune(folder: Path, tiny_sd: Path, video: Path, long_side: int, start: int, rate: int) -> Path:
    """One training step on 4 frames of `video`; validation (3 DDIM steps) caches the inverted latent."""
    config = folder / f"{folder.name}.yaml"
    config.write_text(f"""
pretrained_model_path: "{tiny_sd}"
output_dir: "{folder / 'run'}"
train_data: {{video_path: "{video}", prompt: "a ball is moving", n_sample_frames: 4, width: {long_side},
             height: {long_side}, sample_start_idx: {start}, sample_frame_rate: {rate}}}
validation_data: {{prompts: ["a red ball"], video_length: 4, num_inference_steps: 3, num_inv_steps: 3}}
max_train_steps: 1
validation_steps: 1
checkpointing_steps: 1000
seed: 33
mixed_precision: "no"
enable_xformers_memory_efficient_attention: false
""")
    AcceleratorState._reset_state(True)
    try:
        return train(load_config(config))
    finally:
        AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def runs(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    clips = tmp_path_factory.mktemp("clips")
    wide = make_clip(clips / "wide.mp4", 192, 108, NTSC, 20, sound=True)
    silent = make_clip(clips / "silent.mp4", 64, 64, Fraction(25, 2), 8, sound=False)
    return {
        "square": tune(tmp_path_factory.mktemp("square"), tiny_sd, SAMPLE_CLIP, 64, 0, 3),
        "wide": tune(tmp_path_factory.mktemp("wide"), tiny_sd, wide, 128, 2, 2),
        "silent": tune(tmp_path_factory.mktemp("silent"), tiny_sd, silent, 64, 1, 1),
    }


def probe(path: Path) -> dict:
    """Frame count, size, fps and codecs of a video file, and its audio length from the decoded samples."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        info = dict(frames=sum(1 for _ in container.decode(video)), fps=Fraction(video.average_rate),
                    size=(video.codec_context.width, video.codec_context.height), codec=video.codec_context.name,
                    pix_fmt=video.codec_context.pix_fmt, audio_seconds=None)
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(audio))
            info["audio_seconds"] = samples / audio.rate
    return info


def check_video(path: Path, frames: int, size: tuple[int, int], fps: Fraction, sound: bool) -> None:
    info = probe(path)
    assert (info["frames"], info["size"], info["fps"]) == (frames, size, fps)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    if sound:
        assert info["audio_seconds"] == pytest.approx(frames / fps, abs=float(1 / fps))
    else:
        assert info["audio_seconds"] is None


def check_gif(path: Path, frames: int, size: tuple[int, int], fps: Fraction) -> None:
    with Image.open(path) as gif:
        assert (gif.n_frames, gif.size) == (frames, size)
        total = 0
        for index in range(gif.n_frames):
            gif.seek(index)
            total += gif.info["duration"]
    assert total == pytest.approx(frames * 1000 / fps, abs=10)


def test_cli_edits_the_sample_clip_with_its_sound(runs):
    run = runs["square"]
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(run), "--prompt", "a red ball is moving",
               "--prompt", "a cat, cartoon style", "--steps", "3", "--inv-steps", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using the run's inverted latent" in result.stderr
    edits = run / "edits"
    fps = Fraction(24, 3)  # sample.mp4 is 24 fps, every 3rd frame tuned
    for prompt in ("a red ball is moving", "a cat, cartoon style"):
        check_video(edits / f"{prompt}.mp4", 4, (64, 64), fps, sound=True)
        check_gif(edits / f"{prompt}.gif", 4, (64, 64), fps)
        assert str(edits / f"{prompt}.mp4") in result.stdout
    check_video(edits / "side-by-side.mp4", 4, (3 * 64, 64), fps, sound=True)
    # the left third of the side-by-side is the source's tuned frames
    source = TuneAVideoDataset(SAMPLE_CLIP, "", 64, 64, 4, 0, 3, keep_aspect=True).frames.permute(0, 2, 3, 1).numpy()
    left = read_video(edits / "side-by-side.mp4")[0][:, :, :64].astype(int)
    assert np.abs(left - source).mean() < 6


def test_a_wide_clip_keeps_its_aspect_ratio_frame_rate_and_sound(runs, tmp_path):
    run = runs["wide"]
    size = fit_size(192, 108, 128)
    assert size == (128, 64)  # landscape stays landscape (16:9 to the nearest multiples of 64)
    with Image.open(run / "samples" / "sample-1" / "a red ball.gif") as sample:
        assert sample.size == size  # training's validation samples at the tuned size too
    result = edit(run, EditOptions(prompts=["a red ball"], output_dir=tmp_path, **FAST))
    fps = NTSC / 2
    assert (result.size, result.fps) == (size, fps)
    assert result.span == pytest.approx((2 / NTSC, (2 + 4 * 2) / NTSC))  # the tuned frames 2, 4, 6, 8 and their strides
    assert result.cached_latent == run / "inv_latents" / "ddim_latent-1.pt" and result.with_audio
    check_video(tmp_path / "a red ball.mp4", 4, size, fps, sound=True)
    check_gif(tmp_path / "a red ball.gif", 4, size, fps)
    check_video(tmp_path / "side-by-side.mp4", 4, (2 * size[0], size[1]), fps, sound=True)


def test_a_silent_source_gives_silent_videos_and_a_note(runs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tuneavideo.editing"):
        result = edit(runs["silent"], EditOptions(prompts=["a red ball"], output_dir=tmp_path, **FAST))
    notes = [r.getMessage() for r in caplog.records if "no sound" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert result.fps == Fraction(25, 2) and not result.with_audio
    check_video(tmp_path / "a red ball.mp4", 4, (64, 64), Fraction(25, 2), sound=False)
    check_video(tmp_path / "side-by-side.mp4", 4, (128, 64), Fraction(25, 2), sound=False)


def test_no_audio_skips_the_sound(runs, tmp_path, caplog):
    options = EditOptions(prompts=["a cat"], output_dir=tmp_path, audio=False, steps=2, inv_steps=2)
    with caplog.at_level(logging.INFO, logger="tuneavideo.editing"):
        result = edit(runs["square"], options)
    assert not result.with_audio and not [r for r in caplog.records if "no sound" in r.getMessage()]
    assert result.cached_latent is None  # the run inverted in 3 steps, this edit wants 2: inverted again
    check_video(tmp_path / "a cat.mp4", 4, (64, 64), Fraction(8), sound=False)


def test_seeded_edits_are_reproducible(runs, tmp_path):
    def frames(seed: int, name: str) -> list[np.ndarray]:
        options = EditOptions(prompts=["a cat"], seed=seed, eta=1.0, num_videos_per_prompt=2,
                              output_dir=tmp_path / name, audio=False, **FAST)
        return [read_video(path)[0] for path in edit(runs["square"], options).videos]

    first, again, other = frames(7, "first"), frames(7, "again"), frames(8, "other")
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])  # eta > 0: the two videos of a prompt differ


def test_inverting_here_gives_the_latent_training_cached(runs):
    # same frames, VAE posterior mean, final UNet and step count: the cache is what an edit would compute
    run = runs["square"]
    pipe = TuneAVideoPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    source = TuneAVideoDataset(SAMPLE_CLIP, "", 64, 64, 4, 0, 3, keep_aspect=True)
    latent = invert_source(pipe, source, DDIMScheduler.from_config(pipe.scheduler.config), 3)
    torch.testing.assert_close(latent, torch.load(run / "inv_latents" / "ddim_latent-1.pt"), rtol=1e-4, atol=1e-4)


def test_sampling_starts_at_the_inverted_noise_level(caplog):
    scheduler = DDIMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
    for steps, inv_steps in [(50, 50), (20, 50), (3, 3), (7, 10)]:
        sampler = sampling_scheduler(scheduler, steps, inv_steps)
        sampler.set_timesteps(steps)
        assert int(sampler.timesteps[0]) == int(inverse_scheduler(scheduler, inv_steps).timesteps[-1])
        assert len(sampler.timesteps) == steps and int(sampler.timesteps[-1]) >= 0
    unchanged = sampling_scheduler(scheduler, 50, 50)
    unchanged.set_timesteps(50)
    assert unchanged.timesteps[0] == 981  # the original's grid when the step counts agree
    with caplog.at_level(logging.WARNING, logger="tuneavideo.editing"):
        sampling_scheduler(scheduler, 50, 20)  # more sampling steps than inversion steps cannot start at 951
    assert "--steps <= --inv-steps" in caplog.text


@pytest.mark.parametrize("case", ["missing", "no config", "config without run"])
def test_a_run_that_is_not_there_is_a_one_line_error(tmp_path, case, capsys):
    if case == "missing":
        args = ["--model", str(tmp_path / "nope")]
    elif case == "no config":
        (tmp_path / "empty").mkdir()
        args = ["--model", str(tmp_path / "empty")]
    else:
        config = tmp_path / "c.yaml"
        config.write_text(f'pretrained_model_path: x\noutput_dir: "{tmp_path / "never"}"\n'
                          'train_data: {video_path: v.mp4, prompt: p}\nvalidation_data: {prompts: [q]}\n')
        args = ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference.main, "inference.py", [*args, "--prompt", "a cat"])
    message = str(exit_info.value.code)
    assert message.startswith("inference.py: error: ") and "\n" not in message
    assert ("config.yaml" in message) if case == "no config" else ("no such run folder" in message)
