"""Bad input, interruptions and disk faults: one-line errors, nothing lost, runs that resume exactly."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_tuneavideo
from tuneavideo.checkpointing import list_checkpoints
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.training import train
from tuneavideo.tuned_parameters import FILENAME

ROOT = Path(__file__).resolve().parents[1]


def write_clip(path: Path, frames: int) -> Path:
    import imageio.v3 as iio

    video = np.stack([np.full((32, 32, 3), 8 * i, np.uint8) for i in range(frames)])
    iio.imwrite(path, video, fps=8, codec="libx264", plugin="pyav")
    return path


def bad_inputs(tmp_path: Path, tiny_sd: Path) -> dict:
    """name -> (what to do to the config: a function of (run_config, tmp_path) returning the CLI args,
    words the one-line message must contain)."""
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "text.mp4").write_text("this is not a video\n" * 20)
    (clips / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(clips / "image.png")
    valid = ROOT / "data" / "sample.mp4"
    (clips / "truncated.mp4").write_bytes(valid.read_bytes()[: valid.stat().st_size // 10])
    audio = clips / "audio.m4a"
    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=1", "-c:a", "aac", str(audio)],
        check=True,
    )
    write_clip(clips / "one-frame.mp4", 1)
    write_clip(clips / "short.mp4", 6)
    not_sd = tmp_path / "not-sd"
    (not_sd / "vae").mkdir(parents=True)
    wrong_shapes = tmp_path / "wrong-shapes"
    shutil.copytree(tiny_sd, wrong_shapes)
    config = json.loads((wrong_shapes / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 16, 32, 32]
    (wrong_shapes / "unet" / "config.json").write_text(json.dumps(config))
    existing = tmp_path / "existing-run"
    existing.mkdir()
    (existing / "config.yaml").write_text("# an earlier run\n")
    (existing / "unet").mkdir()

    return {
        "missing video": (dict(video=clips / "missing.mp4"), ["missing.mp4"]),
        "text file": (dict(video=clips / "text.mp4"), ["text.mp4"]),
        "random bytes": (dict(video=clips / "noise.mp4"), ["noise.mp4"]),
        "an image": (dict(video=clips / "image.png"), ["image.png"]),
        "audio only": (dict(video=clips / "audio.m4a"), ["audio.m4a"]),
        "truncated mp4": (dict(video=clips / "truncated.mp4"), ["truncated.mp4"]),
        "one frame": (dict(video=clips / "one-frame.mp4"), ["one-frame.mp4", "1 frame"]),
        "too short": (dict(video=clips / "short.mp4"), ["short.mp4", "6 frames", "n_sample_frames"]),
        "unusable size": (dict(args=["train_data.width=100"]), ["train_data.width", "multiple of 8"]),
        "missing model": (dict(args=[f"pretrained_model_path={tmp_path / 'nowhere'}"]), ["nowhere", "download_models.sh"]),
        "not a model": (dict(args=[f"pretrained_model_path={not_sd}"]), ["not-sd", "not a Stable Diffusion"]),
        "wrong shapes": (dict(args=[f"pretrained_model_path={wrong_shapes}"]), ["wrong-shapes", "unet"]),
        "empty prompt": (dict(prompt=""), ["train_data.prompt"]),
        "unknown key": (dict(args=["train_data.n_sample_frame=4"]), ["n_sample_frame", "n_sample_frames"]),
        "wrong type": (dict(args=["max_train_steps=many"]), ["max_train_steps"]),
        "earlier run": (dict(output_dir=existing), ["existing-run", "resume_from_checkpoint=latest", "overwrite=true"]),
    }


CASES = [
    "missing video", "text file", "random bytes", "an image", "audio only", "truncated mp4", "one frame", "too short",
    "unusable size", "missing model", "not a model", "wrong shapes", "empty prompt", "unknown key", "wrong type",
    "earlier run",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_one_line_error(case, tiny_sd, tmp_path, run_config, capsys, fresh_accelerate_state):
    change, words = bad_inputs(tmp_path, tiny_sd)[case]
    output_dir = change.get("output_dir", tmp_path / "run")
    kwargs = {k: v for k, v in change.items() if k in ("video", "prompt")}
    config = run_config(output_dir, **kwargs)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_tuneavideo.main, "train_tuneavideo.py", [f"--config={config}", *change.get("args", [])])
    message = str(exit_info.value.code)
    assert message.startswith("train_tuneavideo.py: error: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    if case == "earlier run":  # refused, and the earlier run is untouched
        assert (output_dir / "config.yaml").read_text() == "# an earlier run\n"


def test_a_missing_prompt_names_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pretrained_model_path: m\noutput_dir: o\ntrain_data: {video_path: v.mp4}\nvalidation_data: {prompts: [a]}\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_tuneavideo.main, "train_tuneavideo.py", [f"--config={config}"])
    assert "train_data.prompt" in str(exit_info.value.code)


def test_the_process_prints_no_traceback_unless_asked(tmp_path, run_config):
    config = run_config(tmp_path / "run", video=tmp_path / "missing.mp4")
    command = [sys.executable, str(ROOT / "train_tuneavideo.py"), f"--config={config}"]
    quiet = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("train_tuneavideo.py: error: ")
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_long_prompt_warns_with_the_dropped_words(tiny_sd, caplog):
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"))
    words = "a man is skiing " + "zz " * 40 + "on the moon"  # 'zz ' is 3 tokens: past 77 in all
    with caplog.at_level("WARNING"):
        pipe.encode_prompt(words, "cpu", do_classifier_free_guidance=False)
    assert "dropped" in caplog.text and "on the moon" in caplog.text


def test_an_inverted_latent_of_the_wrong_shape_names_both_shapes(tiny_sd):
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"))
    with pytest.raises(ValueError) as error:
        pipe("a cat", video_length=4, height=64, width=64, latents=torch.randn(1, 4, 3, 8, 8), num_inference_steps=2)
    assert "(1, 4, 3, 8, 8)" in str(error.value) and "(1, 4, 4, 8, 8)" in str(error.value)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, run_config, monkeypatch, fresh_accelerate_state):
    import tuneavideo.training as training

    real_loss, calls = training._diffusion_loss, {"n": 0}

    def overflow_at_step_4(*args):  # what an fp16 overflow looks like to the loop
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(training, "_diffusion_loss", overflow_at_step_4)
    config = run_config(tmp_path / "run", max_train_steps=6, checkpointing_steps=1, validation_steps=100)
    with pytest.raises(Exception) as error:
        train(load_config(config))
    message = str(error.value)
    assert "the loss became nan at step 4" in message and "bf16" in message and "checkpoint-3" in message
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / "run" / FILENAME).exists()


def _launch(config, *overrides):
    command = [sys.executable, str(ROOT / "train_tuneavideo.py"), f"--config={config}", *overrides]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run: Path) -> dict:
    return UNet3DConditionModel.from_pretrained(run, subfolder="unet").state_dict()


def _kill_when(config, ready) -> None:
    process = _launch(config)
    deadline = time.time() + 120
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.parametrize("moment", ["after the first checkpoint", "while a checkpoint is written"])
def test_a_killed_run_resumes_to_the_same_weights(moment, tmp_path, run_config):
    settings = dict(max_train_steps=5, checkpointing_steps=1, validation_steps=100)
    straight = run_config(tmp_path / "straight", "straight.yaml", **settings)
    assert _launch(straight).wait(timeout=300) == 0

    run = tmp_path / "killed"
    config = run_config(run, "killed.yaml", **settings)
    if moment == "after the first checkpoint":
        _kill_when(config, lambda: (run / "checkpoint-1").exists())
    else:
        _kill_when(config, lambda: any(run.glob(".checkpoint-*.tmp")) and (run / "checkpoint-1").exists())
    assert not (run / FILENAME).exists()  # it really died mid-run
    assert all((path / "optimizer.bin").exists() for path in list_checkpoints(run))  # no half checkpoint listed
    resumed = _launch(config, "resume_from_checkpoint=latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    expected, got = _weights(tmp_path / "straight"), _weights(run)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path, run_config):
    run = tmp_path / "run"
    config = run_config(run, max_train_steps=200, checkpointing_steps=1000, validation_steps=1000)
    process = _launch(config)
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if (run / "logs").exists() and any((run / "logs").rglob("events.out.tfevents.*")):
            break
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps in
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in stderr
    saved = list_checkpoints(run)
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 200
    assert f"saved {saved[0].name}" in stderr and "resume_from_checkpoint=latest" in stderr


def test_a_full_disk_leaves_no_half_written_checkpoint(tmp_path, run_config, monkeypatch, fresh_accelerate_state):
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save
    calls = {"n": 0}

    def save_then_fill_the_disk(obj, path, *args, **kwargs):
        calls["n"] += 1
        if "checkpoint-4" in str(path):
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_then_fill_the_disk)
    run = tmp_path / "run"
    config = run_config(run, max_train_steps=6, checkpointing_steps=2, validation_steps=100)
    with pytest.raises(Exception) as error:
        train(load_config(config))
    assert "no space left" in str(error.value) and "checkpoint-2" in str(error.value)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert not list(run.glob(".checkpoint-*"))  # the temporary folder is gone too

    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    train(load_config(config, ["resume_from_checkpoint=latest"]))
    assert (run / FILENAME).exists() and [p.name for p in list_checkpoints(run)][-1] == "checkpoint-6"


def test_a_full_disk_never_leaves_a_half_written_tuned_parameters_file(unet3d, tmp_path, monkeypatch):
    import tuneavideo.tuned_parameters as tuned

    target = tmp_path / FILENAME
    tuned.save_tuned_parameters(unet3d, target, ["attn1.to_q"])
    before = target.read_bytes()

    def fill_the_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tuned, "save_file", fill_the_disk)
    with pytest.raises(OSError):
        tuned.save_tuned_parameters(unet3d, target, ["attn1.to_q", "attn_temp"])
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [FILENAME]
