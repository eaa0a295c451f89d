"""Shared fixtures: a tiny random Stable Diffusion folder and the inflated UNet built from it. Offline, CPU."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental hub call fails loudly

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import ControlNetModel, DDIMScheduler

from tests.helpers import SAMPLE_CLIP, train_in_process
from tuneavideo.config import load_config
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.tiny import make_tiny_sd, tiny_controlnet

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny random SD 1.x-layout folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_controlnet_path(tiny_sd, tmp_path_factory):
    """Path of a tiny ControlNet folder for the tiny SD, with random (non-zero) output convolutions."""
    path = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    tiny_controlnet(tiny_sd, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd2_controlnet_path(tiny_sd, tmp_path_factory):
    """Path of a tiny ControlNet of another base model than the tiny SD's (a 32-wide text encoder, not 16)."""
    path = tmp_path_factory.mktemp("sd2") / "controlnet"
    ControlNetModel.from_config({**tiny_controlnet(tiny_sd).config, "cross_attention_dim": 32}).save_pretrained(path)
    return path


@pytest.fixture
def unet3d(tiny_sd):
    """The tiny SD UNet inflated with `from_pretrained_2d`, temporal layers given non-zero weights.

    With the zero-initialised temporal output projection the temporal branch would be a no-op, hiding bugs in it.
    """
    torch.manual_seed(1)
    unet = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet").eval()
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "attn_temp.to_out" in name:
                parameter.normal_(0, 0.3)
    return unet


@pytest.fixture
def pipe(tiny_sd, unet3d):
    """The tiny pipeline with `unet3d` and a DDIM scheduler, no progress bars."""
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=unet3d)
    pipe.scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def clip_inputs():
    """A function giving random latents `(batch, 4, frames, size, size)`, timesteps and text for a UNet."""

    def make(unet, batch=1, frames=5, size=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, unet.config.in_channels, frames, size, size, generator=generator)
        text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator)
        return sample, timestep, text

    return make


@pytest.fixture
def run_config(tiny_sd, tmp_path):
    """A function writing a training config for the tiny model on the sample clip (4 frames of 64x64, two
    validation prompts, 3 DDIM steps, 2 training steps) with top-level `overrides`; returns its path."""

    def write(output_dir, name="config.yaml", video=SAMPLE_CLIP, prompt="a ball is moving", **overrides) -> Path:
        text = f"""
pretrained_model_path: "{tiny_sd}"
output_dir: "{output_dir}"
train_data:
  video_path: "{video}"
  prompt: "{prompt}"
  n_sample_frames: 4
  width: 64
  height: 64
  sample_start_idx: 0
  sample_frame_rate: 3
validation_data:
  prompts:
    - "a red ball is moving"
    - "a cat, cartoon style"
  video_length: 4
  width: 64
  height: 64
  num_inference_steps: 3
  num_inv_steps: 3
  guidance_scale: 12.5
"""
        top = dict(learning_rate="3e-5", max_train_steps=2, checkpointing_steps=2, validation_steps=2, seed=33,
                   mixed_precision="fp16", enable_xformers_memory_efficient_attention=True)
        top.update(overrides)
        text += "".join(f"{key}: {value}\n" for key, value in top.items())
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def fresh_accelerate_state():
    """Tests that tune in-process through the CLI: accelerate keeps one process-wide state, reset around each."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def tuned_run(tiny_sd, tmp_path_factory) -> Path:
    """A finished one-step run on the sample clip (its inversion cached with 3 steps)."""
    folder = tmp_path_factory.mktemp("tuned")
    config = folder / "config.yaml"
    config.write_text(f"""
pretrained_model_path: "{tiny_sd}"
output_dir: "{folder / 'run'}"
train_data: {{video_path: "{SAMPLE_CLIP}", prompt: "a ball is moving", n_sample_frames: 4, width: 64, height: 64,
             sample_frame_rate: 3}}
validation_data: {{prompts: ["a red ball"], num_inference_steps: 3, num_inv_steps: 3}}
max_train_steps: 1
checkpointing_steps: 1000
seed: 33
mixed_precision: "no"
""")
    return train_in_process(load_config(config))
