"""Editing a tuned run (`inference.py`, `tuneavideo.editing`) on the tiny model and clips made here.

Four tiny runs of one training step each: the sample clip (square, sound, 24 fps), a 16:9 clip with sound at
30000/1001 fps, a silent square clip at 12.5 fps and a 30 fps clip of 1.5 s with a chirp for whole-clip edits.
Edits are checked by decoding what was written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import inference
from tests.helpers import (
    PHONE_TIMES,
    ROOT,
    SAMPLE_CLIP,
    edit_cli,
    ffmpeg,
    frame_indices,
    index_frames,
    leftovers,
    probe,
    small_disk,
    train_in_process,
    write_vfr_clip,
)
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.editing import edit, plan_edit
from tuneavideo.evaluate import read_frames
from tuneavideo.request import EditRequest, LocalEdit, RequestError
from tuneavideo.run import EditResult, Run
from tuneavideo.pipelines.inversion import ddim_inversion, inverse_scheduler, sampling_scheduler
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.tiny import SD_SCHEDULER_CONFIG
from tuneavideo.edit_progress import PHASES, EditProgress
from tuneavideo.video.frames import fit_size
from tuneavideo.video.readers import Clip
from tuneavideo.video.writers import write_mp4

NTSC = Fraction(30000, 1001)
FAST = dict(num_inference_steps=3, num_inv_steps=3)  # the runs' validation_data.num_inv_steps: their cache fits
RATE = 48_000


def chirp(seconds: float) -> np.ndarray:
    """`seconds` of a tone rising by 600 Hz a second from 200 Hz: any two moments of it differ, so a shifted cut
    shows."""
    t = np.arange(int(RATE * seconds)) / RATE
    return 0.5 * np.sin(2 * np.pi * (200 * t + 300 * t**2))


def make_clip(path: Path, width: int, height: int, fps: Fraction, num_frames: int, sound: bool) -> Path:
    """A clip whose frames all differ (a bar moving over a gradient), with a chirp a second longer than the
    picture when `sound`."""
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
        with wave.open(str(wav), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(RATE)
            out.writeframes((chirp(float(num_frames / fps) + 1) * 32767).astype("<i2").tobytes())
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
validation_data: {{prompts: ["a red ball"], num_inference_steps: 3, num_inv_steps: 3}}
max_train_steps: 1
validation_steps: 1
checkpointing_steps: 1000
seed: 33
mixed_precision: "no"
enable_xformers_memory_efficient_attention: false
""")
    return train_in_process(load_config(config))


@pytest.fixture(scope="module")
def runs(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    clips = tmp_path_factory.mktemp("clips")
    wide = make_clip(clips / "wide.mp4", 192, 108, NTSC, 20, sound=True)
    silent = make_clip(clips / "silent.mp4", 64, 64, Fraction(25, 2), 8, sound=False)
    thirty = make_clip(clips / "thirty.mp4", 64, 64, Fraction(30), 45, sound=True)
    phone = write_vfr_clip(clips / "phone.mp4", index_frames(30, 64, 64), PHONE_TIMES)
    return {
        "phone": tune(tmp_path_factory.mktemp("phone"), tiny_sd, phone, 64, 0, 1),
        "square": tune(tmp_path_factory.mktemp("square"), tiny_sd, SAMPLE_CLIP, 64, 0, 3),
        "wide": tune(tmp_path_factory.mktemp("wide"), tiny_sd, wide, 128, 2, 2),
        "silent": tune(tmp_path_factory.mktemp("silent"), tiny_sd, silent, 64, 1, 1),
        "thirty": tune(tmp_path_factory.mktemp("thirty"), tiny_sd, thirty, 64, 0, 2),
    }


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


def sound_of(path: Path) -> np.ndarray:
    """The first audio stream of `path` as mono float samples at RATE."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        chunks = [out.to_ndarray().ravel() for frame in container.decode(audio=0) for out in resampler.resample(frame)]
    return np.concatenate(chunks)


@pytest.mark.e2e
def test_cli_edits_the_sample_clip_with_its_sound(runs):
    run = runs["square"]
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(run), "--prompt", "a red ball is moving",
               "--prompt", "a cat, cartoon style", "--num-inference-steps", "3", "--num-inv-steps", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using the run's inverted latent" in result.stderr
    edits = run / "edits"
    fps = Fraction(24, 3)  # sample.mp4 is 24 fps, every 3rd frame tuned
    for prompt in ("a red ball is moving", "a cat, cartoon style"):
        check_video(edits / f"{prompt}.mp4", 4, (64, 64), fps, sound=True)
        check_gif(edits / f"{prompt}.gif", 4, (64, 64), fps)
        assert str(edits / f"{prompt}.mp4") in result.stdout
    side = edits / "a red ball is moving+a cat, cartoon style.side-by-side.mp4"
    assert str(side) in result.stdout
    check_video(side, 4, (3 * 64, 64), fps, sound=True)
    # the left third of the side-by-side is the source's tuned frames
    source = Clip(SAMPLE_CLIP).read([0, 3, 6, 9], (64, 64)).astype(int)
    left = Clip(side).read(range(4))[:, :, :64].astype(int)
    assert np.abs(left - source).mean() < 6


def test_a_wide_clip_keeps_its_aspect_ratio_frame_rate_and_sound(runs, tmp_path, monkeypatch):
    from tuneavideo.edit_progress import EditProgressWriter

    phases, phase = [], EditProgressWriter.phase
    monkeypatch.setattr(EditProgressWriter, "phase", lambda report, name: (phases.append(name), phase(report, name)))
    run = runs["wide"]
    size = fit_size(192, 108, 128)
    assert size == (128, 72)  # landscape stays landscape, 16:9 exactly (multiples of 8)
    with Image.open(run / "samples" / "sample-1" / "a red ball.gif") as sample:
        assert sample.size == size  # training's validation samples at the tuned size too
    result = edit(run, EditRequest(prompts=["a red ball"], output_dir=tmp_path, **FAST))
    fps = NTSC / 2
    assert (result.size, result.fps, result.frames) == (size, fps, range(2, 10, 2))
    assert result.span == pytest.approx((2 / NTSC, (2 + 4 * 2) / NTSC))  # the tuned frames 2, 4, 6, 8 and strides
    assert result.cached_latent == run / "inv_latents" / "ddim_latent-1.pt" and result.with_audio
    # result.json beside the outputs holds all of it
    assert EditResult.load(tmp_path) == result and (tmp_path / "result.json").is_file()
    [written] = json.loads((tmp_path / "result.json").read_text())
    assert (written["fps"], written["frames"], written["videos"]) == ("15000/1001", [2, 10, 2],
                                                                      [str(tmp_path / "a red ball.mp4")])
    check_video(tmp_path / "a red ball.mp4", 4, size, fps, sound=True)
    check_gif(tmp_path / "a red ball.gif", 4, size, fps)
    check_video(tmp_path / "a red ball.side-by-side.mp4", 4, (2 * size[0], size[1]), fps, sound=True)
    # how it went, in its own progress file: the run's inversion reused, so no inverting
    progress = EditProgress.load(tmp_path)
    assert (tmp_path / "a red ball.progress.json").is_file() and phases == ["editing", "writing the videos"]
    assert (progress.phase, progress.done, progress.total) == ("done", 3, 3)  # 1 window x 3 steps (FAST)


def test_a_silent_source_gives_silent_videos_and_a_note(runs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tuneavideo.editing"):
        result = edit(runs["silent"], EditRequest(prompts=["a red ball"], output_dir=tmp_path, **FAST))
    notes = [r.getMessage() for r in caplog.records if "no sound" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert result.fps == Fraction(25, 2) and not result.with_audio
    check_video(tmp_path / "a red ball.mp4", 4, (64, 64), Fraction(25, 2), sound=False)
    check_video(tmp_path / "a red ball.side-by-side.mp4", 4, (128, 64), Fraction(25, 2), sound=False)


def test_no_audio_skips_the_sound(runs, tmp_path, caplog):
    options = EditRequest(prompts=["a cat"], output_dir=tmp_path, audio=False, num_inference_steps=2, num_inv_steps=2)
    with caplog.at_level(logging.INFO, logger="tuneavideo.editing"):
        result = edit(runs["square"], options)
    assert not result.with_audio and not [r for r in caplog.records if "no sound" in r.getMessage()]
    assert result.cached_latent is None  # the run inverted in 3 steps, this edit wants 2: inverted again
    check_video(tmp_path / "a cat.mp4", 4, (64, 64), Fraction(8), sound=False)


def test_seeded_edits_are_reproducible(runs, tmp_path):
    def frames(seed: int, name: str) -> list[np.ndarray]:
        options = EditRequest(prompts=["a cat"], seed=seed, eta=1.0, num_videos_per_prompt=2,
                              output_dir=tmp_path / name, audio=False, **FAST)
        return [Clip(path).read(range(4)).astype(int) for path in edit(runs["square"], options).videos]

    first, again, other = frames(7, "first"), frames(7, "again"), frames(8, "other")
    # separately loaded models may round differently (their kernels can differ), so not bit for bit
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(first, again))
    assert np.abs(first[0] - other[0]).mean() > 1
    assert np.abs(first[0] - first[1]).mean() > 1  # eta > 0: the two videos of a prompt differ


def test_inverting_here_gives_the_latent_training_cached(runs):
    # same frames, VAE posterior mean, final UNet and step count: the cache is what an edit would compute
    run = runs["square"]
    pipe = TuneAVideoPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    source = pipe.encode_video(Clip(SAMPLE_CLIP).frames((64, 64), 0, 12, 3)).mean
    latent = ddim_inversion(pipe, DDIMScheduler.from_config(pipe.scheduler.config), source, 3)[-1]
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
    with caplog.at_level(logging.WARNING, logger="tuneavideo.pipelines.inversion"):
        sampling_scheduler(scheduler, 50, 20)  # more sampling steps than inversion steps cannot start at 951
    assert "num_inference_steps <= num_inv_steps" in caplog.text


@pytest.mark.parametrize("case", ["missing", "no config", "config without run"])
def test_a_run_that_is_not_there_is_a_one_line_error(tmp_path, case):
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


# Whole clips -----------------------------------------------------------------------------------------------------


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    length = min(len(a), len(b))
    return float(np.corrcoef(a[:length], b[:length])[0, 1])


@pytest.mark.e2e
@pytest.mark.parametrize("span, stride, frames", [("all", 1, range(0, 45)), ("0.5:1.2", 2, range(15, 36, 2))])
def test_a_span_of_a_30_fps_clip_is_edited_with_its_sound(runs, tmp_path, span, stride, frames):
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(runs["thirty"]), "--prompt", "a red ball",
               "--span", span, "--stride", str(stride), "--output-dir", str(tmp_path), "--num-inference-steps", "3",
               "--num-inv-steps", "3", "--window", "8"]  # 8 windows over the whole clip, 3 over the shorter span
    status = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert status.returncode == 0, status.stderr[-3000:]
    fps = Fraction(30, stride)
    check_video(tmp_path / "a red ball.mp4", len(frames), (64, 64), fps, sound=True)
    check_video(tmp_path / "a red ball.side-by-side.mp4", len(frames), (128, 64), fps, sound=True)
    check_gif(tmp_path / "a red ball.gif", len(frames), (64, 64), fps)  # short enough for a GIF
    # the left half of the side-by-side is the span's source frames
    source = Clip(load_config(runs["thirty"] / "config.yaml").train_data.video_path)
    left = Clip(tmp_path / "a red ball.side-by-side.mp4").read(range(len(frames)))[:, :, :64].astype(int)
    assert np.abs(left - source.read(list(frames), (64, 64)).astype(int)).mean() < 6
    # the sound is the source's over exactly the span: the chirp from START on, as long as the picture
    start, seconds = frames.start / 30, len(frames) * stride / 30
    expected = chirp(3)[round(start * RATE) : round((start + seconds) * RATE)]
    heard = sound_of(tmp_path / "a red ball.mp4")
    assert len(heard) == pytest.approx(len(expected), abs=RATE // 30)
    assert correlation(heard, expected) > 0.9


def test_a_span_equal_to_the_tuned_window_is_todays_edit(runs, tmp_path):
    run = runs["square"]
    default = plan_edit(run, EditRequest(["a cat"], **FAST))
    # the tuned frames 0, 3, 6, 9 of the 24 fps sample clip: the span [0, 0.5) s at stride 3, in one window
    spanned = plan_edit(run, EditRequest(["a cat"], span=(Fraction(0), Fraction(1, 2)), stride=3, window=100, **FAST))
    assert spanned.frames == default.frames == range(0, 12, 3)
    assert len(spanned.windows) == len(default.windows) == 1 and spanned.cache == default.cache
    assert default.cache == run / "inv_latents" / "ddim_latent-1.pt"


def test_a_backwards_span_is_refused_whatever_builds_the_options(runs):
    """The app and the benchmark build EditRequest themselves: the span is checked where every edit passes."""
    for span, given in (((Fraction(2), Fraction(1)), "'2:1'"), ((Fraction(-1), None), "'-1:'")):
        with pytest.raises(RequestError, match=f"^`span` {given}: START must be >= 0 and before END$"):
            plan_edit(runs["square"], EditRequest(["a cat"], span=span))


def test_the_span_cache_of_a_frame_folder_changes_when_a_frame_is_replaced(runs, tmp_path):
    """A folder's own time stamp stays when a frame is overwritten in place; the cached inversion must not."""
    run = tmp_path / "run"
    shutil.copytree(runs["square"], run)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(Clip(SAMPLE_CLIP).read(range(16))):  # more than the tuned frames 0-9
        Image.fromarray(frame).save(folder / f"{index:05d}.png")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(SAMPLE_CLIP), str(folder)))
    options = EditRequest(["a cat"], span=(None, None), **FAST)
    before = plan_edit(run, options).cache
    assert before.name.startswith("span-") and plan_edit(run, options).cache == before
    folder_time = folder.stat().st_mtime_ns
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "00005.png")  # in place
    os.utime(folder / "00005.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert folder.stat().st_mtime_ns == folder_time and plan_edit(run, options).cache != before


def test_windowed_reconstruction_is_close_to_the_single_window_one(runs, capsys):
    """DDIM-invert 12 frames and reconstruct them with the source prompt at guidance 1: in windows of 4 frames
    the error may be at most 1.25x that of one window of all 12 (the figures are printed for the record)."""
    run = runs["square"]
    pipe = TuneAVideoPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    source = pipe.encode_video(Clip(SAMPLE_CLIP).frames((64, 64), 0, 24, 2)).mean
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    errors = {}
    for window in (12, 4):
        latent = ddim_inversion(pipe, scheduler, source, 10, window_size=window, window_overlap=1)[-1]
        pipe.scheduler = sampling_scheduler(scheduler, 10, 10)
        rebuilt = pipe("a ball is moving", latents=latent, num_inference_steps=10, guidance_scale=1.0,
                       window_size=window, window_overlap=1, output_type="latent").videos
        errors[window] = float(torch.nn.functional.mse_loss(rebuilt, source))
    with capsys.disabled():
        print(f"\nreconstruction MSE of 12 latent frames: one window {errors[12]:.5f}, windows of 4 {errors[4]:.5f}")
    assert errors[4] <= 1.25 * errors[12]


def test_a_variable_frame_rate_clip_edited_whole_shows_every_frame_at_its_source_time(runs, tmp_path):
    # PHONE_TIMES: 16 frames at 30 fps, then 14 at 15 fps; the edit is written at 30 fps, each frame held until the
    # next one's time
    result = edit(runs["phone"], EditRequest(["a red ball"], span=(None, None), stride=1, window=16, output_dir=tmp_path,
                                             **FAST))
    assert result.variable_rate and result.fps == 30 and result.span == pytest.approx((0, 1.5), abs=1e-4)
    with av.open(str(result.side_by_side)) as container:
        shown = [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    assert len(shown) == 45  # 1.5 s at 30 fps
    for seconds, frame in shown:
        source = max(i for i, t in enumerate(PHONE_TIMES) if t <= seconds + 1e-3)  # on screen in the source then
        assert frame_indices(frame[None, :, :64])[0] == source, f"at {seconds:.3f} s"
    assert probe(result.videos[0])["frames"] == 45
    # the sound: the same 1.5 s (AAC adds up to one 1024-sample frame at 16 kHz)
    assert probe(result.videos[0])["audio_seconds"] == pytest.approx(1.5, abs=0.065)
    with Image.open(result.gifs[0]) as gif:  # the GIF's frames last as long as they are shown
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    assert sum(durations) == pytest.approx(1500, abs=20)


# Bad options, damaged run folders, full disks, Ctrl-C ----------------------------------------------------------


def test_an_edit_that_fills_the_disk_keeps_the_earlier_edits(tuned_run, tmp_path):
    with small_disk(tmp_path / "disk", 2_000_000) as disk:
        edits = disk / "edits"
        assert edit_cli(tuned_run, "--prompt", "a red ball", "--output-dir", str(edits))[0] == 0
        earlier = {p.name: p.read_bytes() for p in edits.iterdir()}
        assert set(earlier) == {"a red ball.mp4", "a red ball.gif", "a red ball.side-by-side.mp4", "result.json",
                                "a red ball.progress.json"}
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(free - 20_000))  # room for a few pages, not for an edit
        status, message = edit_cli(tuned_run, "--prompt", "a green ball", "--prompt", "a blue ball",
                                   "--output-dir", str(edits))
        assert status == 1 and message.startswith(f"inference.py: error: no space left on the disk of {edits} while")
        assert "\n" not in message and "free space and run again" in message
        assert leftovers(edits) == []  # beside the earlier files at most the new edit's progress file (failed)
        assert {p.name for p in edits.iterdir()} - set(earlier) <= {"a green ball+a blue ball.progress.json"}
        for name, data in earlier.items():  # the earlier edit is whole: nothing of the new one was moved in
            assert (edits / name).read_bytes() == data


def test_edits_sharing_a_folder_keep_each_other_s_files(tuned_run, tmp_path):
    out, steps = tmp_path / "edits", dict(num_inference_steps=1, num_inv_steps=1, audio=False)
    local = EditRequest(["a red ball is moving"], local=LocalEdit(blend_words=("ball", "ball"), inversion="ddim"),
                        output_dir=out, **steps)
    first = edit(tuned_run, local)
    kept = {path.name: path.read_bytes() for path in out.iterdir() if path.name != "result.json"}
    assert {"a red ball is moving.inversion.mp4", "a red ball is moving.side-by-side.mp4"} <= set(kept)
    # a plain edit whose prompt is "inversion": its own files, and the local edit's are untouched
    second = edit(tuned_run, EditRequest(["inversion", "a cat"], output_dir=out, **steps))
    assert second.side_by_side == out / "inversion+a cat.side-by-side.mp4" and (out / "inversion.mp4").is_file()
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    assert EditResult.load_all(out) == [first, second] and EditResult.load(out) == second
    again = edit(tuned_run, local)  # the same edit again replaces its own files and its entry
    assert EditResult.load_all(out) == [second, again]


@pytest.mark.e2e
def test_a_killed_edit_leaves_the_earlier_edit_whole_and_the_next_one_sweeps_its_leftovers(tuned_run, tmp_path):
    out = tmp_path / "edits"
    assert edit_cli(tuned_run, "--prompt", "a cat", "--output-dir", str(out))[0] == 0
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(tuned_run), "--prompt", "a dog",
               "--span", "all", "--stride", "1", "--window", "8", "--num-inference-steps", "1", "--num-inv-steps", "1",
               "--jpeg-frames", "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # its first frames are written (JPEGs, whole) while its MP4s are still being encoded: between files
    while not list(out.glob(".edit-*.tmp/a dog/00005.jpg")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the edit ended before it could be killed between files"
    assert list(out.glob(".edit-*.tmp/a dog/00000.jpg"))  # staged out of sight...
    kept = {path.name: path.read_bytes() for path in out.iterdir() if not path.name.startswith(".")}
    # beside the earlier files, only the killed edit's progress file, whole, as it was last written
    assert json.loads(kept.pop("a dog.progress.json"))["phase"] in PHASES and kept == earlier
    assert EditResult.load_all(out)[0].videos == [out / "a cat.mp4"]  # ...and the index is the earlier one
    assert edit_cli(tuned_run, "--prompt", "a cow", "--output-dir", str(out))[0] == 0
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # the killed edit's leftovers are gone
    assert all((out / name).read_bytes() == data for name, data in earlier.items() if name != "result.json")
    assert [result.videos for result in EditResult.load_all(out)] == [[out / "a cat.mp4"], [out / "a cow.mp4"]]


# inference.py: bad options and bad run folders ------------------------------------------------------------------

# arguments (`{run}`, `{tmp}` filled in) -> words the one-line message must contain
BAD_EDIT_OPTIONS = {
    "nan guidance": (["--guidance-scale", "nan"], ["--guidance-scale", "finite"]),
    "infinite guidance": (["--guidance-scale", "inf"], ["--guidance-scale", "finite"]),
    "negative eta": (["--eta", "-1"], ["--eta", ">= 0"]),
    "nan eta": (["--eta", "nan"], ["--eta"]),
    "zero steps": (["--num-inference-steps", "0"], ["--num-inference-steps", ">= 1"]),
    "too many steps": (["--num-inv-steps", "1001"], ["--num-inv-steps 1001", "at most 1000"]),
    "text for a number": (["--stride", "two"], ["--stride", "invalid int value: 'two'"]),
    "zero stride": (["--stride", "0"], ["--stride", ">= 1"]),
    "one-frame window": (["--window", "1"], ["--window", ">= 2"]),
    "overlap as large as the window": (["--span", "all", "--window", "4", "--overlap", "3"], ["--overlap 3", "overlap"]),
    "backwards span": (["--span", "2:1"], ["--span", "'2:1'", "before END"]),
    "span of words": (["--span", "start:end"], ["--span", "START:END"]),
    "span past the clip": (["--span", "10:"], ["--span holds no frame", "2.00 s"]),
    "empty prompt": (["--prompt", " "], ["non-empty --prompt"]),
    "prompts clash": (["--prompt", "a/b", "--prompt", "a_b"], ["overwrite each other"]),
    "missing run": (["--model", "{tmp}/nowhere"], ["nowhere", "no such run folder"]),
    "output dir is a file": (["--output-dir", "{tmp}/a-file"], ["a-file", "is a file"]),
    "output dir cannot be created": (["--output-dir", "{tmp}/a-file/edits"], ["a-file/edits", "cannot be created"]),
    "unknown option": (["--steps", "3"], ["unrecognized arguments: --steps"]),
}


@pytest.mark.parametrize("case", BAD_EDIT_OPTIONS)
def test_bad_edit_options_are_a_one_line_error(case, tuned_run, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    args, words = BAD_EDIT_OPTIONS[case]
    if "--prompt" not in args:
        args = ["--prompt", "a cat", *args]
    status, message = edit_cli(tuned_run, *(arg.format(run=tuned_run, tmp=tmp_path) for arg in args))
    assert status == 1 and message.startswith("inference.py: error: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert not (tuned_run / "edits").exists()  # refused before writing anything


def damage(path: Path) -> None:
    """Overwrite the middle of `path` with garbage, as a bad disk or an interrupted copy would."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data[: len(data) * 2 // 3]))


# a file of the run folder -> words the one-line message must contain
DAMAGED_RUN_FILES = {
    "config.yaml": ["config.yaml", "re-run the training"],
    "unet/diffusion_pytorch_model.safetensors": ["cannot be loaded", "re-run the training"],
    "vae/diffusion_pytorch_model.safetensors": ["cannot be loaded", "re-run the training"],
    "scheduler/scheduler_config.json": ["scheduler", "cannot be read"],
    "tokenizer/tokenizer.json": ["cannot be loaded", "re-run the training"],
}  # model_index.json only marks a run finished: the pipeline loads by class (`pipelines.loading`)


@pytest.mark.parametrize("name", DAMAGED_RUN_FILES)
def test_a_damaged_run_folder_is_a_one_line_error_and_keeps_earlier_edits(name, tuned_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    edits = run / "edits"
    edits.mkdir()
    (edits / "earlier.mp4").write_bytes(b"an earlier edit")
    damage(run / name)
    status, message = edit_cli(run, "--prompt", "a cat")
    assert status == 1 and message.startswith("inference.py: error: ") and "\n" not in message
    for word in DAMAGED_RUN_FILES[name]:
        assert word in message, (word, message)
    assert [p.name for p in edits.iterdir() if not p.name.endswith(".progress.json")] == ["earlier.mp4"]
    assert (edits / "earlier.mp4").read_bytes() == b"an earlier edit"
    progress = EditProgress.load(edits)  # written once the plan was checked: then how it failed
    assert progress is None or (progress.phase == "failed" and progress.message in message)


def test_a_missing_source_clip_names_the_config_key(tuned_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(SAMPLE_CLIP), str(tmp_path / "moved.mp4")))
    status, message = edit_cli(run, "--prompt", "a cat")
    assert status == 1 and "moved.mp4: no such video file" in message and "train_data.video_path" in message


def _run_with_source(tuned_run: Path, folder: Path, clip: Path) -> Path:
    """A copy of `tuned_run` in `folder` whose config names `clip` as its source, with an earlier edit in it."""
    run = folder / "run"
    shutil.copytree(tuned_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(SAMPLE_CLIP), str(clip)))
    (run / "edits").mkdir()
    (run / "edits" / "earlier.mp4").write_bytes(b"an earlier edit")
    return run


def test_a_truncated_source_clip_is_a_one_line_error_and_keeps_earlier_edits(tuned_run, tmp_path):
    whole = tmp_path / "index first.mp4"
    ffmpeg("-i", SAMPLE_CLIP, "-c", "copy", "-movflags", "+faststart", whole)  # lists every frame before the data
    clip = tmp_path / "truncated.mp4"
    clip.write_bytes(whole.read_bytes()[: whole.stat().st_size * 9 // 10])  # the last frames' data is gone
    run = _run_with_source(tuned_run, tmp_path, clip)
    status, message = edit_cli(run, "--prompt", "a cat", "--span", "all", "--stride", "1")
    assert status == 1 and message.startswith(f"inference.py: error: {clip}: the edit needs frame ")
    assert "\n" not in message and "give a shorter --span" in message and "truncated or damaged" in message
    assert message.count(" decode") == 1, message  # how many frames decode is said once
    assert sorted(p.name for p in (run / "edits").iterdir()) == ["a cat.progress.json", "earlier.mp4"]
    assert EditProgress.load(run / "edits").phase == "failed"  # what the page shows


def test_damaged_sound_in_the_source_is_silence_in_the_edit(tuned_run, tmp_path, caplog):
    clip = tmp_path / "damaged.mp4"
    shutil.copyfile(SAMPLE_CLIP, clip)
    damage(clip)  # its pictures still decode (the decoder conceals the damage); some sound packets do not
    run = _run_with_source(tuned_run, tmp_path, clip)
    with caplog.at_level("WARNING"):
        status, _ = edit_cli(run, "--prompt", "a cat", "--span", "all")
    assert status == 0 and "damaged sound packet(s) of" in caplog.text
    assert probe(run / "edits" / "a cat.mp4")["audio_seconds"] > 0


def test_a_damaged_cached_inversion_is_inverted_again(tuned_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    (cached,) = (run / "inv_latents").glob("ddim_latent-*.pt")
    damage(cached)
    with caplog.at_level("WARNING"):
        assert edit_cli(run, "--prompt", "a cat")[0] == 0
    assert "cannot be read" in caplog.text and "inverting the clip again" in caplog.text
    assert torch.load(cached).shape == (1, 4, 4, 8, 8)  # replaced by a good one


# inference.py, given a real Ctrl-C (SIGINT to itself) as its 10th frame is written to an MP4: at a known point of
# the writing, where polling its folder from outside raced the writing on a busy machine
CTRL_C_WHILE_WRITING = """
import os, signal, sys
sys.path.insert(0, sys.argv.pop(1))
from tuneavideo.video.writers import Mp4Writer
write, written = Mp4Writer.write, []
def write_then_interrupt(self, frame):
    written.append(frame)
    if len(written) == 10:
        os.kill(os.getpid(), signal.SIGINT)
    write(self, frame)
Mp4Writer.write = write_then_interrupt
import inference
from tuneavideo.cli import run_cli
run_cli(inference.main, "inference.py", sys.argv[1:])
"""


@pytest.mark.e2e
def test_ctrl_c_during_an_edit_leaves_no_file_behind(tuned_run, tmp_path):
    # the whole sample clip, every frame: its 48 frames are decoded and streamed to the encoders and writers
    out = tmp_path / "edits"
    command = [sys.executable, "-c", CTRL_C_WHILE_WRITING, str(ROOT), "--model", str(tuned_run), "--prompt", "a cat",
               "--span", "all", "--stride", "1", "--window", "8", "--num-inference-steps", "1", "--num-inv-steps", "1",
               "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == "inference.py: interrupted"
    assert out.is_dir() and leftovers(out) == [] and not list(out.glob("*.mp4")) and not list(out.glob("*.gif"))


def test_prompts_longer_than_a_file_name_are_cut_by_utf8_bytes_before_the_model_loads(tuned_run, tmp_path):
    edits = tmp_path / "edits"
    cjk, emoji = "一只红色的球在草地上滚动" * 8, "🔴⚽" * 40  # 96 characters, 288 bytes; 80 characters, 280 bytes
    status, message = edit_cli(tuned_run, "--prompt", cjk, "--prompt", emoji, "--output-dir", str(edits), "--no-audio")
    assert (status, message) == (0, "")
    names = sorted(path.name for path in edits.iterdir())
    assert all(len(name.encode()) <= 255 for name in names) and not leftovers(edits)
    result = EditResult.load(edits)
    for video, prompt in zip(result.videos, (cjk, emoji)):
        stem = video.stem
        assert prompt.startswith(stem) and 195 <= len(stem.encode()) <= 200, stem  # whole characters only
        assert probe(video)["frames"] == 4 and video.with_suffix(".gif").is_file()
    earlier = {name: (edits / name).read_bytes() for name in names}
    # two prompts alike in their first 200 bytes would share files: refused before the model loads
    status, message = edit_cli(tuned_run, "--prompt", cjk + "，晚上", "--prompt", cjk + "，早上", "--output-dir",
                               str(edits))
    assert status == 1 and "would overwrite each other's files" in message and "\n" not in message
    assert {path.name: path.read_bytes() for path in edits.iterdir()} == earlier


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_cached_inversion_that_is_not_finite_is_inverted_again(value, tuned_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    (cached,) = (run / "inv_latents").glob("ddim_latent-*.pt")
    good = torch.load(cached)
    bad = good.clone()
    bad[0, 0, 1, 2, 3] = value  # the right shape, one value off: the whole edit would be black
    torch.save(bad, cached)
    with caplog.at_level("WARNING"):
        assert edit_cli(run, "--prompt", "a cat", "--no-audio") == (0, "")
    assert f"note: {cached} holds values that are not finite" in caplog.text
    assert "inverting the clip again" in caplog.text
    replaced = torch.load(cached)
    assert replaced.shape == good.shape and torch.isfinite(replaced).all()
    torch.testing.assert_close(replaced, good, rtol=1e-4, atol=1e-4)  # this run inverted the clip as it did
    assert EditResult.load(run / "edits").cached_latent is None
    assert np.stack(read_frames(run / "edits" / "a cat.mp4")).std() > 1  # not a black (or flat) edit


@pytest.mark.parametrize("args, option", [
    (["--prompt", os.fsdecode(b"a \xff\xfe ball")], "--prompt 'a \\xff\\xfe ball'"),
    (["--prompt", "a cat", "--negative-prompt", os.fsdecode(b"blur\xe9")], "--negative-prompt 'blur\\xe9'"),
    (["--prompt", "a red ball is moving", "--control", "refine", "--source-prompt", os.fsdecode(b"a \xff ball")],
     "--source-prompt 'a \\xff ball'"),
], ids=["prompt", "negative-prompt", "source-prompt"])
def test_prompt_bytes_that_are_not_utf8_are_one_line_before_any_model_loads(args, option, tuned_run, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(Run, "load_pipeline", lambda *_: pytest.fail("the model was loaded"))
    status, message = edit_cli(tuned_run, *args, "--output-dir", str(tmp_path / "edits"))
    assert status == 1 and message == f"inference.py: error: {option}: is not UTF-8 text; give it in UTF-8"
    assert not (tmp_path / "edits").exists()


@pytest.mark.parametrize("seed", [-1, 2**32, 2**80])
def test_a_seed_out_of_range_is_one_line_before_any_model_loads(seed, tuned_run, tmp_path, monkeypatch):
    monkeypatch.setattr(Run, "load_pipeline", lambda *_: pytest.fail("the model was loaded"))
    status, message = edit_cli(tuned_run, "--prompt", "a cat", "--seed", str(seed), "--output-dir",
                               str(tmp_path / "edits"))
    assert status == 1 and "\n" not in message
    assert message == f"inference.py: error: --seed must be a whole number from 0 to 4294967295 (2**32 - 1), got {seed}"
    assert not (tmp_path / "edits").exists()
