"""Shared fixtures: a tiny random Stable Diffusion folder and the inflated UNet built from it. Offline, CPU."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental hub call fails loudly

import pytest
import torch

from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.tiny import make_tiny_sd

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny random SD 1.x-layout folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


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
def clip_inputs():
    """A function giving random latents `(batch, 4, frames, size, size)`, timesteps and text for a UNet."""

    def make(unet, batch=1, frames=5, size=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, unet.config.in_channels, frames, size, size, generator=generator)
        text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator)
        return sample, timestep, text

    return make
