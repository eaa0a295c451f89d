"""Bad input, interruptions and full disks: one-line errors, nothing lost, runs that resume exactly.

The full-disk tests run on a real, small file system (a tmpfs mounted here; CI runs as root), because a full disk
fails differently from a simulated one: `torch.save` raises "unexpected pos", safetensors "No space left on device",
ffmpeg exits with an error status.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_tuneavideo
from tests.helpers import ROOT, SAMPLE_CLIP, ffmpeg, index_frames, probe, small_disk, train_in_process
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.video.readers import Clip
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.run import Run
from tuneavideo.video.writers import write_mp4

TUNED = "tuned_parameters.safetensors"  # the tuned tensors in a run folder


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_sd) -> Path:
    """A folder of bad files and models, made once for every case."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    (root / "noise.mp4").write_bytes(os.urandom(5000))
    Image.new("RGB", (32, 32), "red").save(root / "image.png")
    (root / "truncated.mp4").write_bytes(SAMPLE_CLIP.read_bytes()[: SAMPLE_CLIP.stat().st_size // 10])
    ffmpeg("-f", "lavfi", "-i", "sine=f=440:d=1", "-c:a", "aac", root / "audio.m4a")
    write_mp4(index_frames(1, 32, 32), root / "one-frame.mp4", 8)
    write_mp4(index_frames(6, 32, 32), root / "short.mp4", 8)
    (root / "not-sd" / "vae").mkdir(parents=True)
    shutil.copytree(tiny_sd, root / "wrong-shapes")
    config = json.loads((root / "wrong-shapes" / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 16, 32, 32]
    (root / "wrong-shapes" / "unet" / "config.json").write_text(json.dumps(config))
    return root


# case -> (what to change: a clip or a prompt in the config, or command-line arguments, `{bad}` the `bad` folder),
# words the one-line message must contain
BAD_TRAINING_INPUT = {
    "missing video": (dict(video="missing.mp4"), ["missing.mp4", "no such video file"]),
    "text file": (dict(video="text.mp4"), ["text.mp4", "cannot be read as a video"]),
    "random bytes": (dict(video="noise.mp4"), ["noise.mp4", "cannot be read as a video"]),
    "an image": (dict(video="image.png"), ["image.png", "is a PNG image"]),
    "audio only": (dict(video="audio.m4a"), ["audio.m4a", "no video stream"]),
    "truncated mp4": (dict(video="truncated.mp4"), ["truncated.mp4", "frames"]),
    "one frame": (dict(video="one-frame.mp4"), ["one-frame.mp4", "1 frame"]),
    "too short": (dict(video="short.mp4"), ["short.mp4", "6 frames", "n_sample_frames"]),
    "unusable size": (dict(args=["train_data.width=100"]), ["train_data.width", "multiple of 8"]),
    "missing model": (dict(args=["pretrained_model_path={bad}/nowhere"]), ["nowhere", "download_models.sh"]),
    "not a model": (dict(args=["pretrained_model_path={bad}/not-sd"]), ["not-sd", "not a Stable Diffusion"]),
    "wrong shapes": (dict(args=["pretrained_model_path={bad}/wrong-shapes"]), ["wrong-shapes", "unet"]),
    "empty prompt": (dict(prompt=""), ["train_data.prompt"]),
    "unknown key": (dict(args=["train_data.n_sample_frame=4"]), ["n_sample_frame", "n_sample_frames"]),
    "wrong type": (dict(args=["max_train_steps=many"]), ["max_train_steps"]),
    "unknown option": (dict(args=["--frobnicate"]), ["unrecognized arguments: --frobnicate"]),
}


@pytest.mark.parametrize("case", BAD_TRAINING_INPUT)
def test_bad_training_input_is_a_one_line_error(case, bad, tmp_path, run_config, fresh_accelerate_state):
    change, words = BAD_TRAINING_INPUT[case]
    settings = {"video": bad / change["video"]} if "video" in change else {}
    settings.update({k: v for k, v in change.items() if k == "prompt"})
    args = [arg.format(bad=bad) for arg in change.get("args", [])]
    config = run_config(tmp_path / "run", **settings)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_tuneavideo.main, "train_tuneavideo.py", [f"--config={config}", *args])
    message = str(exit_info.value.code)
    assert message.startswith("train_tuneavideo.py: error: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_an_earlier_run_is_neither_overwritten_nor_resumed_by_accident(tmp_path, run_config):
    existing = tmp_path / "existing-run"
    (existing / "unet").mkdir(parents=True)
    (existing / "config.yaml").write_text("# an earlier run\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_tuneavideo.main, "train_tuneavideo.py", [f"--config={run_config(existing)}"])
    message = str(exit_info.value.code)
    assert all(word in message for word in ("existing-run", "resume_from_checkpoint=latest", "overwrite=true"))
    assert (existing / "config.yaml").read_text() == "# an earlier run\n"


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


def test_a_diverging_run_stops_before_the_bad_step_reaches_a_checkpoint(tmp_path, run_config):
    # a learning rate this large sends the weights to infinity in one step: the next loss is not finite
    config = run_config(tmp_path / "run", max_train_steps=6, checkpointing_steps=1, validation_steps=100,
                        learning_rate="1e30")
    with pytest.raises(Exception) as error:
        train_in_process(load_config(config))
    message = str(error.value)
    assert "the loss became" in message and "at step 2" in message and "bf16" in message
    assert "checkpoint-1 is the last good checkpoint" in message
    assert [p.name for p in Run(tmp_path / "run").checkpoints()] == ["checkpoint-1"]
    assert not (tmp_path / "run" / TUNED).exists()
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert (progress["state"], progress["step"], progress["total"], progress["message"]) == ("failed", 1, 6, message)


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
    assert not (run / TUNED).exists()  # it really died mid-run
    assert all((path / "optimizer.bin").exists() for path in Run(run).checkpoints())  # no half checkpoint listed
    resumed = _launch(config, "resume_from_checkpoint=latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    expected, got = _weights(tmp_path / "straight"), _weights(run)
    for name, value in expected.items():  # one machine, one code path: the promise is bit for bit
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path, run_config):
    run = tmp_path / "run"
    config = run_config(run, max_train_steps=200, checkpointing_steps=1000, validation_steps=1000)
    process = _launch(config)
    deadline, progress = time.time() + 120, None
    while process.poll() is None and time.time() < deadline:  # a few steps in, as progress.json says
        if (run / "progress.json").exists():
            progress = json.loads((run / "progress.json").read_text())
            if progress["step"] >= 3:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    # while it ran: the newest step, its loss and learning rate, the pace and what is left
    assert (progress["state"], progress["total"], progress["learning_rate"]) == ("running", 200, 3e-5)
    assert progress["loss"] > 0 and progress["sample"] is None and progress["message"] is None
    assert progress["seconds_per_step"] > 0
    assert progress["eta_seconds"] == pytest.approx(progress["seconds_per_step"] * (200 - progress["step"]))
    assert process.returncode != 0 and "Traceback" not in stderr
    saved = Run(run).checkpoints()
    step = int(saved[0].name.split("-")[1])
    assert len(saved) == 1 and progress["step"] <= step < 200
    assert f"saved {saved[0].name}" in stderr and "resume_from_checkpoint=latest" in stderr
    stopped = json.loads((run / "progress.json").read_text())
    assert (stopped["state"], stopped["step"]) == ("stopped", step)
    assert stopped["message"] == f"saved {saved[0].name}; continue with resume_from_checkpoint=latest"


# Full disks ------------------------------------------------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders left anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def test_a_checkpoint_that_fills_the_disk_ends_in_one_line(tmp_path, run_config):
    with small_disk(tmp_path / "disk", 1_200_000) as disk:  # room for the run's files and a few checkpoints
        run = disk / "run"
        config = run_config(run, max_train_steps=50, checkpointing_steps=1, validation_steps=1000)
        result = subprocess.run([sys.executable, str(ROOT / "train_tuneavideo.py"), f"--config={config}"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        last_line = result.stderr.strip().splitlines()[-1]
        complete = Run(run).checkpoints()
        assert complete, "no checkpoint fitted: make the disk larger"
        assert last_line.startswith("train_tuneavideo.py: error: no space left on the disk of ")
        assert f"{complete[-1]} is the last complete checkpoint" in last_line
        assert "resume_from_checkpoint=latest" in last_line
        assert leftovers(run) == []
        assert all(sorted(p.name for p in c.iterdir()) == sorted(p.name for p in complete[0].iterdir())
                   for c in complete)  # every listed checkpoint is whole
        assert not (run / TUNED).exists()


def test_a_killed_final_save_leaves_nothing_behind_the_next_one(tmp_path, run_config):
    run = tmp_path / "run"
    (run / ".pipeline.tmp" / "unet").mkdir(parents=True)  # what a run killed while saving its model leaves
    (run / ".pipeline.tmp" / "unet" / "stale.bin").write_bytes(b"stale")
    train_in_process(load_config(run_config(run, max_train_steps=1, checkpointing_steps=1000, validation_steps=1000)))
    assert leftovers(run) == [] and (run / "model_index.json").exists() and not (run / "unet" / "stale.bin").exists()


def _size_on_tmpfs(path: Path) -> int:
    """Bytes `path` takes on a tmpfs: whole pages per file."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


def test_a_final_save_that_fills_the_disk_keeps_the_tuned_tensors(tmp_path, run_config, fresh_accelerate_state):
    settings = dict(max_train_steps=1, checkpointing_steps=1000, validation_steps=1000)
    reference = tmp_path / "reference"
    train_in_process(load_config(run_config(reference, "reference.yaml", **settings)))
    model_files = {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}
    before_model = sum(_size_on_tmpfs(p) for p in reference.iterdir() if p.name not in model_files)
    model = sum(_size_on_tmpfs(reference / name) for name in model_files)
    with small_disk(tmp_path / "disk", before_model + model // 2) as disk:
        run = disk / "run"
        config = run_config(run, "run.yaml", **settings)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(train_tuneavideo.main, "train_tuneavideo.py", [f"--config={config}"])
        message = str(exit_info.value.code)
        assert message.startswith("train_tuneavideo.py: error: no space left on the disk of ") and "\n" not in message
        assert f"the tuned tensors are safe in {run / TUNED}" in message
        assert leftovers(run) == [] and not (run / "model_index.json").exists() and not (run / "unet").exists()
        # the tuned tensors file is whole: it loads and equals the reference run's
        saved, expected = load_file(run / TUNED), load_file(reference / TUNED)
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def edit_cli(run: Path, *args: str) -> tuple[int, str]:
    """Run inference.py on `run` in-process through its CLI; returns (exit status, stderr's last line)."""
    import inference

    try:
        run_cli(inference.main, "inference.py",
                ["--model", str(run), "--num-inference-steps", "3", "--num-inv-steps", "3", *args])
    except SystemExit as exit_info:
        return 1, str(exit_info.code)
    return 0, ""


def test_an_edit_that_fills_the_disk_keeps_the_earlier_edits(tuned_run, tmp_path):
    with small_disk(tmp_path / "disk", 2_000_000) as disk:
        edits = disk / "edits"
        assert edit_cli(tuned_run, "--prompt", "a red ball", "--output-dir", str(edits))[0] == 0
        earlier = {p.name: p.read_bytes() for p in edits.iterdir()}
        assert set(earlier) == {"a red ball.mp4", "a red ball.gif", "side-by-side.mp4", "result.json"}
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(free - 20_000))  # room for a few pages, not for an edit
        status, message = edit_cli(tuned_run, "--prompt", "a green ball", "--prompt", "a blue ball",
                                   "--output-dir", str(edits))
        assert status == 1 and message.startswith("inference.py: error: no space left on the disk of ")
        assert "\n" not in message and "free space and run again" in message
        assert leftovers(edits) == []
        for name, data in earlier.items():  # the earlier edit is whole, except the side-by-side it overwrote...
            if name != "side-by-side.mp4":
                assert (edits / name).read_bytes() == data
        # ...which is the earlier one or a whole new one, never half of one; so is each new edit
        for path in edits.glob("*.mp4"):
            assert len(list(Clip(path).frames())) == 4


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
    "model_index.json": ["cannot be loaded"],
}


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
    assert [p.name for p in edits.iterdir()] == ["earlier.mp4"] and (edits / "earlier.mp4").read_bytes() == b"an earlier edit"


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
    assert [p.name for p in (run / "edits").iterdir()] == ["earlier.mp4"]


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


def test_ctrl_c_during_an_edit_leaves_no_file_behind(tuned_run, tmp_path):
    # the whole sample clip, every frame: its 48 frames are decoded and streamed to the encoders for a while
    out = tmp_path / "edits"
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(tuned_run), "--prompt", "a cat",
               "--span", "all", "--stride", "1", "--window", "8", "--num-inference-steps", "1", "--num-inv-steps", "1",
               "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not leftovers(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert leftovers(out), "the edit ended before it wrote anything: nothing to interrupt"
    process.send_signal(signal.SIGINT)  # while the MP4s are being written
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and stderr.strip().splitlines()[-1] == "inference.py: interrupted"
    assert leftovers(out) == [] and not list(out.glob("*.mp4")) and not list(out.glob("*.gif"))
