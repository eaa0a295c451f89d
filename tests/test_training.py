"""One-shot tuning end to end on the tiny model: outputs, tuned-parameter file, the original's frames, random
windows, resume, two processes, bf16 on the CPU, learning."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import ROOT, train_in_process
from tuneavideo.config import load_config
from tuneavideo.video.readers import Clip
from tuneavideo.editing import EditOptions, edit
from tuneavideo.pipelines.inversion import sampling_scheduler
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.training import TrainingWindows, validate
from tuneavideo.tuned_parameters import apply_tuned_parameters


def launch(config, *overrides, processes=1):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--multi_gpu", "--main_process_port", "29517"] if processes > 1 else ["--mixed_precision", "no"]
    command += [str(ROOT / "train_tuneavideo.py"), f"--config={config}", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


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


def test_two_processes_train_together(tmp_path, run_config):
    run = tmp_path / "run"
    result = launch(run_config(run), processes=2)
    assert "2 process(es)" in result.stderr + result.stdout
    assert {p.name for p in (run / "checkpoint-2").glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (run / "unet" / "config.json").exists() and (run / "tuned_parameters.safetensors").exists()


@pytest.mark.parametrize("window", ["fixed", "random"])
def test_resumed_run_ends_with_the_same_weights(window, tmp_path, run_config):
    def run(output_dir, steps, *extra):
        config = run_config(tmp_path / output_dir, f"{output_dir}.yaml", validation_steps=100)
        train_in_process(load_config(config, [f"max_train_steps={steps}", "checkpointing_steps=2",
                                              f"train_data.window={window}", *extra]))
        return UNet3DConditionModel.from_pretrained(tmp_path / output_dir, subfolder="unet").state_dict()

    straight = run("straight", 4)
    stopped = run("resumed", 2)
    resumed = run("resumed", 4, "resume_from_checkpoint=latest")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(v, stopped[k]) for k, v in straight.items())  # steps 3 and 4 did something


def test_loss_falls_when_overfitting_the_clip(tiny_sd, tmp_path, run_config):
    config = run_config(tmp_path / "run", validation_steps=1000)
    cfg = load_config(config, ["max_train_steps=80", "learning_rate=1e-2", "checkpointing_steps=1000",
                               "gradient_checkpointing=False", "trainable_modules=[attn1,attn2,attn_temp,ff]"])
    train_in_process(cfg)

    from diffusers import DDPMScheduler

    pipe = TuneAVideoPipeline.from_pretrained(tmp_path / "run")
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    data = cfg.train_data
    clip = Clip(data.video_path)
    latents = pipe.encode_video(clip.frames((64, 64), 0, 12, 3)).mean
    with torch.no_grad():
        text = pipe.encode_prompt(data.prompt, "cpu", do_classifier_free_guidance=False)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((16, *latents.shape[1:]), generator=generator)
        timesteps = torch.linspace(50, 950, 16).long()
        noisy = scheduler.add_noise(latents.expand(16, -1, -1, -1, -1), noise, timesteps)

        def loss(unet):
            return torch.nn.functional.mse_loss(unet(noisy, timesteps, text.expand(16, -1, -1)).sample, noise).item()

        before = loss(UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"))
        after = loss(pipe.unet)
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
    assert np.array_equal(frames, original.asnumpy())


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
            latents = windows.sample(posterior, batch_size=2)
            for clip in latents:
                first = round(float(clip[0, 0].mean()))
                assert torch.allclose(clip[0, :, 0, 0], first + 3 * torch.arange(4.0), atol=1e-3)
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
    result = edit(half, EditOptions(["a red ball"], num_inference_steps=3, num_inv_steps=3, audio=False))
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


@pytest.mark.skipif(bool(__import__("importlib").util.find_spec("bitsandbytes")), reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_stops_with_one_line(tmp_path, run_config):
    from tuneavideo.errors import UserError

    cfg = load_config(run_config(tmp_path / "run"), ["use_8bit_adam=true"])
    with pytest.raises(UserError, match="use_8bit_adam: true needs bitsandbytes") as error:
        train_in_process(cfg)
    assert "pip install bitsandbytes" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoint-1").exists()
