"""A tiny, randomly initialised Stable Diffusion folder for tests and the no-GPU demo (no download needed).

It has the real SD 1.x layout (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json`)
and SD's 4-level UNet topology and scheduler config, with every width shrunk, so every code path that runs on
real weights runs on it. Random weights produce noise, not pictures.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

if TYPE_CHECKING:
    from diffusers import ControlNetModel

# Stable Diffusion v1-4's scheduler config (its `scheduler/scheduler_config.json`)
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)

TEXT_DIM = 16


def tiny_unet_config(sample_size: int = 8) -> dict:
    """SD 1.x's UNet topology (3 cross-attention down blocks, 1 plain; mirrored up) at a tiny width."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def tiny_vae_config(sample_size: int = 8) -> dict:
    """SD's VAE topology (four levels, so one latent pixel is 8x8 image pixels) at a tiny width."""
    return dict(
        block_out_channels=(8, 8, 16, 16),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=sample_size * 8,
    )


TINY_TEXT_CONFIG = dict(hidden_size=TEXT_DIM, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)


def text_encoder_config(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextConfig:
    """A CLIP text encoder config of `sizes` (`hidden_size`, ...; `vocab_size` defaults to the tokenizer's) whose
    positions and special tokens are `tokenizer`'s."""
    return CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **sizes},
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_tokenizer(path: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (letters, digits, punctuation; no merges) written from a vocab file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.'!?-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length)
    if len(tokenizer) <= 2:
        raise RuntimeError("the tiny CLIP tokenizer did not read its vocabulary")
    tokenizer.save_pretrained(path)
    return tokenizer


def make_tiny_sd(path: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny random SD 1.x-layout model folder at `path` and return it."""
    path = Path(path)
    tokenizer = write_tokenizer(path / "tokenizer")

    torch.manual_seed(seed)
    UNet2DConditionModel(**tiny_unet_config(sample_size)).save_pretrained(path / "unet")
    torch.manual_seed(seed)
    AutoencoderKL(**tiny_vae_config(sample_size)).save_pretrained(path / "vae")
    torch.manual_seed(seed)
    CLIPTextModel(text_encoder_config(tokenizer, **TINY_TEXT_CONFIG)).save_pretrained(path / "text_encoder")
    # written as SD ships it: DDIM schedulers built from this file must see `clip_sample: false`
    (path / "scheduler").mkdir(exist_ok=True)
    scheduler_config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", **SD_SCHEDULER_CONFIG}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path


# the hint encoder's widths: three stride-2 convolutions, so a condition image maps to the latent size (1/8), as SD's
TINY_HINT_CHANNELS = (4, 8, 8, 8)


def tiny_controlnet(sd_path: str | Path, seed: int | None = None) -> ControlNetModel:
    """A ControlNet for the tiny SD at `sd_path`, made the way ControlNets start training
    (`ControlNetModel.from_unet`: the UNet's encoder, zero output convolutions, so its residuals are exactly zero);
    with `seed`, those convolutions and the hint encoder's last one random, so that it steers (as a trained one)."""
    # imported here: tests/fixtures/videop2p/make_reference.py imports this module on diffusers 0.11.1, before
    # ControlNets
    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_HINT_CHANNELS)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                controlnet.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for parameter in (p for module in zero for p in module.parameters()):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return controlnet.eval()
