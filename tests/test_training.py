"""One-shot tuning end to end on the tiny model: outputs, tuned-parameter file, the original's frames, random
windows, resume, two processes, bf16 on the CPU, learning."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_tuneavideo
from tests.helpers import (
    ROOT,
    SAMPLE_CLIP,
    assert_same_pixels,
    denoising_losses,
    diffusers_errors,
    ffmpeg,
    index_frames,
    leftovers,
    small_disk,
    train_in_process,
)
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.editing import edit
from tuneavideo.request import EditRequest
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.inversion import sampling_scheduler
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.run import Run
from tuneavideo.tiny import tiny_controlnet
from tuneavideo.training import TrainingWindows, validate
from tuneavideo.tuned_parameters import apply_tuned_parameters
from tuneavideo.video.readers import Clip
from tuneavideo.video.writers import write_mp4


def launch(config, *overrides, processes=1):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--multi_gpu", "--main_process_port", "29517"] if processes > 1 else ["--mixed_precision", "no"]
    command += [str(ROOT / "train_tuneavideo.py"), f"--config={config}", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.e2e
def test_accelerate_launch_writes_every_output(tiny_sd, tmp_path, run_config):
    run = tmp_path / "run"
    result = launch(run_config(run))
    assert "trainable parameters: " in result.stderr + result.stdout
    assert "training in float32" in result.stderr + result.stdout  # fp16 asked for on a CPU: warned, not failed

    assert load_config(run / "config.yaml").max_train_steps == 2
    assert "# diffusers " in (run / "config.yaml").read_text()
    latent = torch.load(run / "inv_latents" / "ddim_latent-2.pt")
    assert latent.shape == (1, 4, 4, 8, 8) and torch.isfinite(latent).all()
    for prompt in ("a red ball is moving", "a cat, cartoon style"):
        with Image.open(run / "samples" / "sample-2" / f"{prompt}.gif") as gif:
            assert gif.size == (64, 64) and gif.n_frames == 4
        frames = Clip(run / "samples" / "sample-2" / f"{prompt}.mp4").read(range(4))
        assert frames.shape == (4, 64, 64, 3)
    with Image.open(run / "samples" / "sample-2.gif") as grid:
        assert grid.size == (2 + 2 * 66, 64 + 4) and grid.n_frames == 4
    assert (run / "checkpoint-2" / "optimizer.bin").exists()
    assert any((run / "logs").rglob("events.out.tfevents.*"))
    progress = json.loads((run / "progress.json").read_text())
    assert (progress["state"], progress["step"], progress["total"], progress["eta_seconds"]) == ("finished", 2, 2, 0)
    assert progress["sample"] == str(run / "samples" / "sample-2" / "a red ball is moving.mp4")
    assert math.isfinite(progress["loss"]) and progress["learning_rate"] == 3e-5 and progress["message"] is None
    assert [(step, lr) for step, _, lr in progress["history"]] == [(1, 3e-5), (2, 3e-5)]
    assert progress["history"][-1][1] == progress["loss"]

    pipe = TuneAVideoPipeline.from_pretrained(run)
    assert isinstance(pipe.unet, UNet3DConditionModel) and isinstance(pipe.scheduler, DDIMScheduler)
    video = pipe("a cat", latents=latent, num_inference_steps=3).videos
    assert video.shape == (1, 3, 4, 64, 64)

    # the small tuned-parameters file on top of the base model is the saved UNet
    tuned = UNet3DConditionModel.from_pretrained(run, subfolder="unet")
    rebuilt = apply_tuned_parameters(UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"), run / "tuned_parameters.safetensors")
    for (name, expected), (_, value) in zip(tuned.state_dict().items(), rebuilt.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    base = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet").state_dict()
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base[k]) and "attn_temp" not in k]
    assert changed and all(k.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) for k in changed)


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["accelerate launch", "--num-processes"])
def test_two_processes_train_together(launcher, tmp_path, run_config):
    run = tmp_path / "run"
    if launcher == "accelerate launch":
        result = launch(run_config(run), processes=2)
    else:  # README's command: the script starts its processes itself
        result = subprocess.run([sys.executable, str(ROOT / "train_tuneavideo.py"), f"--config={run_config(run)}",
                                 "--num-processes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr + result.stdout
    assert {p.name for p in (run / "checkpoint-2").glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (run / "unet" / "config.json").exists() and (run / "tuned_parameters.safetensors").exists()


def test_loss_falls_when_overfitting_the_clip(tiny_sd, tmp_path, run_config):
    config = run_config(tmp_path / "run", validation_steps=1000)
    cfg = load_config(config, ["max_train_steps=80", "learning_rate=1e-2", "checkpointing_steps=1000",
                               "gradient_checkpointing=False", "trainable_modules=[attn1,attn2,attn_temp,ff]"])
    train_in_process(cfg)
    pipe = TuneAVideoPipeline.from_pretrained(tmp_path / "run")
    untuned = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet")
    before, after = denoising_losses(pipe, tiny_sd, cfg.train_data.video_path, cfg.train_data.prompt,
                                     [untuned, pipe.unet], 16)
    assert after < 0.9 * before, (before, after)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("decord"), reason="decord (the original's reader) "
                    "is not installed")
@pytest.mark.parametrize("overrides", [[], ["train_data.width=200", "train_data.height=120",
                                           "train_data.sample_start_idx=5"]])
def test_a_run_tunes_on_the_original_frames(overrides, run_config, tmp_path):
    # the original decoded with decord.VideoReader(path, width=W, height=H), resizing inside FFmpeg
    import decord

    cfg = load_config(run_config(tmp_path / "run"), overrides)
    clip = Clip(cfg.train_data.video_path)
    windows = TrainingWindows.plan(clip, cfg)
    frames = np.stack(list(windows.decode(clip)))
    width, height = windows.size
    original = decord.VideoReader(str(clip.path), width=width, height=height).get_batch(list(windows.decoded))
    assert frames.shape == (4, height, width, 3)
    assert_same_pixels(frames, original.asnumpy())


def test_random_windows_cover_every_start_and_follow_the_seed(run_config, tmp_path):
    cfg = load_config(run_config(tmp_path / "run"), ["train_data.window=random", "train_data.sample_start_idx=2",
                                                     "train_data.sample_end_idx=40"])
    windows = TrainingWindows.plan(Clip(cfg.train_data.video_path), cfg)
    # 4 frames 3 apart within [2, 40): windows start at 2..30 (the last one is frames 30, 33, 36, 39); frames 2..39
    # are encoded once
    assert windows.decoded == range(2, 40) and len(windows.starts) == 29
    # a posterior whose mean is the frame index (and no spread): a sample shows which window it came from
    index = torch.arange(len(windows.decoded), dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 4, -1, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([index, torch.full_like(index, -30.0)], dim=1))

    def starts(seed: int, steps: int = 600) -> list[int]:
        torch.manual_seed(seed)
        drawn = []
        for _ in range(steps // 2):
            latents, positions = windows.sample(posterior, batch_size=2)
            for clip, frames in zip(latents, positions, strict=True):
                first = round(float(clip[0, 0].mean()))
                assert torch.allclose(clip[0, :, 0, 0], first + 3 * torch.arange(4.0), atol=1e-3)
                assert frames == [first + 3 * i for i in range(4)]  # the positions of the frames it holds
                drawn.append(first)
        return drawn

    drawn = starts(33)
    assert sorted(set(drawn)) == list(range(29))  # every start that fits, and only those (positions from frame 2)
    counts = np.bincount(drawn, minlength=29)
    assert counts.min() > 0.4 * counts.mean() and counts.max() < 1.6 * counts.mean()  # spread evenly
    assert starts(33) == drawn and starts(34) != drawn


def _logged(run, tag: str = "loss") -> list[float]:
    """The value of `tag` at every step, as the run logged it to TensorBoard."""
    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_the_learning_rate_schedule_counts_optimizer_steps_under_accumulation(tmp_path, run_config):
    """`linear` with 2 warm-up steps over 4 steps of 2 accumulated batches each: up in 2 steps, down to 0 at the end."""
    config = run_config(tmp_path / "run", max_train_steps=4, gradient_accumulation_steps=2, lr_scheduler="linear",
                        lr_warmup_steps=2, learning_rate="1e-4", validation_steps=100, checkpointing_steps=100)
    train_in_process(load_config(config))
    assert _logged(tmp_path / "run", "lr") == pytest.approx([0.5e-4, 1e-4, 0.5e-4, 0.0])


def test_bf16_on_the_cpu_trains_resumes_and_edits(tmp_path, run_config):
    def tune(name, precision, steps, *extra):
        config = run_config(tmp_path / name, f"{name}.yaml", mixed_precision=precision, validation_steps=100)
        train_in_process(load_config(config, [f"max_train_steps={steps}", "checkpointing_steps=2", *extra]))
        return tmp_path / name

    full = tune("float32", "no", 4)
    half = tune("bf16", "bf16", 2)
    trainable = load_file(half / "checkpoint-2" / "model.safetensors")
    assert trainable and all(t.dtype == torch.float32 for t in trainable.values())  # master weights stay float32
    half = tune("bf16", "bf16", 4, "resume_from_checkpoint=latest")
    losses, reference = _logged(half), _logged(full)
    assert len(losses) == len(reference) == 4 and all(math.isfinite(v) for v in losses)
    # the same noise and timesteps (same seed): the losses differ by bf16 rounding only
    assert losses == pytest.approx(reference, rel=0.05)
    assert losses != reference  # bf16 did run
    result = edit(half, EditRequest(["a red ball"], num_inference_steps=3, num_inv_steps=3, audio=False))
    assert len(Clip(result.videos[0]).read(range(4))) == 4


def test_frozen_weights_in_half_precision_still_train_in_float32(unet3d, clip_inputs):
    from tuneavideo.training_step import cast_frozen_parameters
    from tuneavideo.tuned_parameters import trainable_parameter_names

    names = set(trainable_parameter_names(unet3d, ["attn1.to_q", "attn2.to_q", "attn_temp"]))
    unet3d.requires_grad_(False)
    for name, parameter in unet3d.named_parameters():
        parameter.requires_grad_(name in names)
    cast_frozen_parameters(unet3d, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in unet3d.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in names)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in names)

    sample, timestep, text = clip_inputs(unet3d, frames=3)
    unet3d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = unet3d(sample, timestep, text).sample
    torch.nn.functional.mse_loss(prediction.float(), sample).backward()
    for name, parameter in unet3d.named_parameters():
        if name in names:
            assert parameter.grad is not None and parameter.grad.dtype == torch.float32 and parameter.grad.abs().sum() > 0


def test_validation_samples_from_the_inverted_noise_level(pipe, tmp_path, run_config):
    """With fewer sampling than inversion steps, validation samples as an edit does: from the inverted latent's
    noise level (`sampling_scheduler`), and the pipeline keeps its own scheduler afterwards."""
    cfg = load_config(run_config(tmp_path / "run"), ["validation_data.num_inference_steps=2",
                                                     "validation_data.num_inv_steps=4", "validation_data.prompts=[a]"])
    clean = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = pipe.scheduler
    samples = validate(pipe, clean, cfg, 1, fps=8)
    assert pipe.scheduler is scheduler
    inverted = torch.load(tmp_path / "run" / "inv_latents" / "ddim_latent-1.pt")

    def sample(sampler):
        pipe.scheduler = sampler
        return pipe("a", video_length=4, num_inference_steps=2, guidance_scale=12.5, latents=inverted).videos

    torch.testing.assert_close(samples, sample(sampling_scheduler(scheduler, 2, 4)), rtol=1e-5, atol=1e-5)
    assert (samples - sample(scheduler)).abs().max() > 1e-3  # the plain 2-step grid starts elsewhere


def test_a_run_tuned_with_the_first_frame_rule_is_saved_with_it(tmp_path, run_config):
    config = run_config(tmp_path / "run", mixed_precision="no", max_train_steps=1, validation_steps=100)
    run = train_in_process(load_config(config, ["spatial_attention=first_frame"]))
    unet = UNet3DConditionModel.from_pretrained(run, subfolder="unet")
    assert unet.config.spatial_attention == "first_frame"
    assert {m.spatial_attention for name, m in unet.named_modules() if name.endswith(".attn1")} == {"first_frame"}


def test_the_loss_targets_the_noise_or_v_and_refuses_other_prediction_types(tiny_sd, unet3d, clip_inputs):
    from diffusers import DDPMScheduler

    from tuneavideo.errors import UserError
    from tuneavideo.training_step import diffusion_loss

    latents, _, text = clip_inputs(unet3d, batch=2, frames=3)
    text = text[:1]  # one prompt for every clip, as in training
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler", prediction_type=prediction_type)
        torch.manual_seed(0)
        with torch.no_grad():
            loss = diffusion_loss(unet3d, scheduler, latents, text)
            # by hand, from the same draws: the noise, then one timestep per clip
            torch.manual_seed(0)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (2,))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            expected = torch.nn.functional.mse_loss(unet3d(noisy, timesteps, text.expand(2, -1, -1)).sample, target)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler", prediction_type="sample")
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        diffusion_loss(unet3d, scheduler, latents, text)


def test_the_loss_under_control_adds_the_controlnets_residuals_of_each_clips_frames(tiny_sd, unet3d, clip_inputs):
    from diffusers import DDPMScheduler

    from tuneavideo.pipelines.controlnet import StructureGuidance
    from tuneavideo.training_step import diffusion_loss

    latents, _, text = clip_inputs(unet3d, batch=2, frames=3)
    text = text[:1]
    conditions = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    rows = [[0, 1, 2], [3, 4, 5]]

    def loss(controlnet) -> torch.Tensor:
        guidance = StructureGuidance.create(controlnet, conditions, 6, 64, 64, controlnet_conditioning_scale=0.8)
        torch.manual_seed(0)
        with torch.no_grad():
            return diffusion_loss(unet3d, scheduler, latents, text, lambda noisy, timesteps, embeddings:
                                  guidance.residuals(noisy, timesteps, embeddings, rows, 0, 1, False))

    torch.manual_seed(0)
    with torch.no_grad():
        plain = diffusion_loss(unet3d, scheduler, latents, text)
        # by hand, from the same draws: the residuals of each clip's own frames at its own timestep
        torch.manual_seed(0)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (2,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        controlnet = tiny_controlnet(tiny_sd, seed=1)
        guidance = StructureGuidance.create(controlnet, conditions, 6, 64, 64, controlnet_conditioning_scale=0.8)
        predictions = [unet3d(noisy[i : i + 1], timesteps[i : i + 1], text,
                              **guidance.residuals(noisy[i : i + 1], timesteps[i], text, rows[i], 0, 1, False)).sample
                       for i in range(2)]
        expected = torch.nn.functional.mse_loss(torch.cat(predictions), noise)
    assert torch.equal(loss(tiny_controlnet(tiny_sd)), plain)  # zero residuals: the plain loss, exactly
    controlled = loss(controlnet)
    torch.testing.assert_close(controlled, expected, rtol=1e-5, atol=1e-7)
    assert abs(controlled - plain) > 1e-4


def test_a_run_tuned_under_a_controlnet_keeps_it_in_its_config(tmp_path, run_config, tiny_controlnet_path):
    config = run_config(tmp_path / "plain", mixed_precision="no", max_train_steps=2, validation_steps=100,
                        learning_rate="1e-2")
    plain = train_in_process(load_config(config))
    controlled = train_in_process(load_config(config, [f"output_dir={tmp_path / 'controlled'}",
                                                       f"controlnet.model={tiny_controlnet_path}",
                                                       "controlnet.condition=canny", "controlnet.scale=0.5"]))
    kept = Run(controlled).config().controlnet
    assert (kept.model, kept.condition, kept.scale) == (str(tiny_controlnet_path), "canny", 0.5)
    assert Run(plain).config().controlnet is None
    tuned, tuned_plain = load_file(controlled / TUNED), load_file(plain / TUNED)
    assert tuned.keys() == tuned_plain.keys()
    assert any(not torch.equal(tuned[key], tuned_plain[key]) for key in tuned)  # same seed, other gradients
    # the validation inverted the tuned window under the ControlNet, with the clip's canny edges
    from tuneavideo.pipelines.edit import invert
    from tuneavideo.video.conditions import canny

    controlnet = ControlNetModel.from_pretrained(tiny_controlnet_path)
    pipe = TuneAVideoPipeline.from_pretrained(controlled, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    frames = list(Clip(SAMPLE_CLIP).frames((64, 64), 0, 10, 3))
    clean = pipe.encode_video(frames).mean
    control = dict(conditioning_frames=list(canny(frames)), controlnet_conditioning_scale=0.5)
    saved = torch.load(Run(controlled).validation_latent(2))
    torch.testing.assert_close(saved, invert(pipe, clean, 3, control=control), rtol=1e-4, atol=1e-4)
    assert (saved - invert(pipe, clean, 3)).abs().max() > 1e-3


@pytest.mark.skipif(bool(__import__("importlib").util.find_spec("bitsandbytes")), reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_stops_with_one_line(tmp_path, run_config):
    from tuneavideo.errors import UserError

    cfg = load_config(run_config(tmp_path / "run"), ["use_8bit_adam=true"])
    with pytest.raises(UserError, match="use_8bit_adam: true needs bitsandbytes") as error:
        train_in_process(cfg)
    assert "pip install bitsandbytes" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoint-1").exists()


# Bad input, interruptions and full disks (one-line errors, runs that resume exactly) ---------------------------


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
    controlnet = tiny_controlnet(tiny_sd)  # an SD 2.x-width ControlNet: another text encoder width
    wider = ControlNetModel.from_config({**controlnet.config, "cross_attention_dim": 32})
    wider.save_pretrained(root / "sd2-controlnet")
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
    "negative seed": (dict(args=["seed=-1"]), ["seed=-1", "from 0 to 4294967295"]),
    "seed too large": (dict(args=[f"seed={2**80}"]), [f"seed={2**80}", "from 0 to 4294967295"]),
    "missing controlnet": (dict(args=["controlnet.model={bad}/nowhere"]),
                           ["controlnet.model", "nowhere", "--controlnet canny"]),
    "controlnet of another base": (dict(args=["controlnet.model={bad}/sd2-controlnet"]),
                                   ["sd2-controlnet", "cross-attention width 32, not 16"]),
    "unknown condition": (dict(args=["controlnet.model={bad}/sd2-controlnet", "controlnet.condition=edges"]),
                          ["controlnet.condition", "'edges'", "canny"]),
    "negative control scale": (dict(args=["controlnet.model=x", "controlnet.scale=-1"]), ["controlnet.scale=-1.0"]),
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


@pytest.mark.e2e
def test_the_process_prints_no_traceback_unless_asked(tmp_path, run_config):
    config = run_config(tmp_path / "run", video=tmp_path / "missing.mp4")
    command = [sys.executable, str(ROOT / "train_tuneavideo.py"), f"--config={config}"]
    quiet = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("train_tuneavideo.py: error: ")
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


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


@pytest.mark.parametrize("case", [
    "stopped at a checkpoint", "stopped at a checkpoint, random windows",
    pytest.param("killed after a checkpoint", marks=pytest.mark.e2e),
    pytest.param("killed while a checkpoint is written", marks=pytest.mark.e2e),
])
def test_an_interrupted_run_resumes_to_the_same_weights(case, tmp_path, run_config):
    """A run stopped after a checkpoint, or killed (SIGKILL) after one or while one is written, resumed with
    resume_from_checkpoint=latest, ends with the weights of a run that was never interrupted: one machine, one code
    path, so bit for bit."""
    killed = case.startswith("killed")
    settings = dict(max_train_steps=4, checkpointing_steps=1 if killed else 2, validation_steps=100)
    window = ["train_data.window=random"] if "random" in case else []
    straight, run = tmp_path / "straight", tmp_path / "resumed"
    config = run_config(run, "resumed.yaml", **settings)
    if killed:  # each run a process of its own, as a user's
        assert _launch(run_config(straight, "straight.yaml", **settings)).wait(timeout=300) == 0
        if "after" in case:
            _kill_when(config, lambda: (run / "checkpoint-1").exists())
        else:
            _kill_when(config, lambda: any(run.glob(".checkpoint-*.tmp")) and (run / "checkpoint-1").exists())
        assert not (run / TUNED).exists()  # it really died mid-run
        assert all((path / "optimizer.bin").exists() for path in Run(run).checkpoints())  # no half checkpoint listed
        resumed = _launch(config, "resume_from_checkpoint=latest")
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    else:
        train_in_process(load_config(run_config(straight, "straight.yaml", **settings), window))
        train_in_process(load_config(config, ["max_train_steps=2", *window]))
        stopped = _weights(run)
        train_in_process(load_config(config, ["resume_from_checkpoint=latest", *window]))
        assert any(not torch.equal(v, stopped[k]) for k, v in _weights(straight).items())  # steps 3, 4 did something
    expected, got = _weights(straight), _weights(run)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


def test_a_base_with_bin_weights_tunes_and_saves_without_diffusers_errors(tmp_path, run_config, tiny_sd):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = tmp_path / "bin-sd"  # weights as older downloads hold them: .bin, no safetensors
    shutil.copytree(tiny_sd, base)
    for subfolder, model_class in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = model_class.from_pretrained(base, subfolder=subfolder)
        for file in (base / subfolder).glob("*.safetensors"):
            file.unlink()
        model.save_pretrained(base / subfolder, safe_serialization=False)
    cfg = load_config(run_config(tmp_path / "run", max_train_steps=1, checkpointing_steps=1000,
                                 validation_steps=1000))
    cfg.pretrained_model_path = str(base)
    with diffusers_errors() as errors:
        train_in_process(cfg)
    assert (tmp_path / "run" / "model_index.json").exists()
    assert errors == []  # no "An error occurred while trying to fetch ..." on loading or saving


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_damaged_checkpoint_is_named_before_anything_is_touched_and_latest_falls_back(tmp_path, run_config, caplog):
    run = tmp_path / "run"
    config = run_config(run, max_train_steps=2, checkpointing_steps=1, validation_steps=100)
    train_in_process(load_config(config))
    model = run / "checkpoint-2" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated, as by a full disk or a copy
    before = _files(run)

    def refused(resume: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(train_tuneavideo.main, "train_tuneavideo.py",
                    [f"--config={config}", f"resume_from_checkpoint={resume}"])
        assert _files(run) == before  # config.yaml and progress.json (finished) untouched, nothing written
        return str(exit_info.value.code)

    message = refused(str(run / "checkpoint-2"))
    assert message.startswith("train_tuneavideo.py: error: ") and "\n" not in message
    assert f"{run / 'checkpoint-2'} is damaged (model.safetensors: " in message
    assert f"resume from {run / 'checkpoint-1'} instead" in message

    optimizer = run / "checkpoint-1" / "optimizer.bin"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(saved[:-100])
    before = _files(run)
    message = refused("latest")
    assert "checkpoint-2 is damaged" in message and "no earlier checkpoint is complete" in message
    assert "overwrite=true" in message and "\n" not in message

    optimizer.write_bytes(saved)  # checkpoint-1 complete again: latest resumes from it, and says so in one line
    with caplog.at_level("INFO", logger="tuneavideo"):
        train_in_process(load_config(config, ["resume_from_checkpoint=latest"]))
    assert f"{run / 'checkpoint-2'} is damaged (model.safetensors: " in caplog.text
    assert "resuming from checkpoint-1, the newest complete checkpoint" in caplog.text
    assert f"resuming from {run / 'checkpoint-1'}" in caplog.text
    assert json.loads((run / "progress.json").read_text())["state"] == "finished"
    assert load_file(model)  # checkpoint-2 was saved again, whole


def test_resuming_with_a_truncated_progress_file_goes_on(tmp_path, run_config):
    run = tmp_path / "run"
    config = run_config(run, max_train_steps=2, checkpointing_steps=1, validation_steps=100)
    train_in_process(load_config(config, ["max_train_steps=1"]))
    progress = run / "progress.json"
    progress.write_bytes(progress.read_bytes()[:40])
    train_in_process(load_config(config, ["resume_from_checkpoint=latest"]))
    written = json.loads(progress.read_text())
    assert (written["state"], written["step"]) == ("finished", 2)
    assert [entry[0] for entry in written["history"]] == [2]  # the steps before it were unknown


def test_a_validation_prompt_longer_than_a_file_name_is_cut_by_utf8_bytes(tmp_path, run_config):
    long = "🔴⚽" * 40  # 80 characters, 280 bytes of UTF-8
    config = run_config(tmp_path / "run", max_train_steps=1, validation_steps=1)
    run = Run(train_in_process(load_config(config, [f"validation_data.prompts=['{long}']"])))
    sample = run.sample(1, long)
    assert long.startswith(sample.stem) and len(sample.stem.encode()) == 200
    assert sample.is_file() and sample.with_suffix(".gif").is_file()
    assert json.loads(run.progress_file.read_text())["sample"] == str(sample)
