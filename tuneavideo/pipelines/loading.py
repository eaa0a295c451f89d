"""Load a tuned run folder's pipeline by class, whatever its `model_index.json` names.

Tune-A-Video's and Video-P2P's own training (diffusers 0.11.1) save the tuned pipeline with
`"unet": ["models", "UNet3DConditionModel"]` in `model_index.json`: 0.11.1 records the package folder of a class it
does not know, which today's `DiffusionPipeline.from_pretrained` cannot import. A run folder always holds the same
five components, so each is loaded by its class from its subfolder instead: our `UNet3DConditionModel` for `unet/`
(the original's config keys and `.bin` weights load too), the libraries' classes for the rest, and a
`DDIMScheduler` from `scheduler/` whatever scheduler was saved there (the original saved the base model's PNDM
config; inversion and sampling are DDIM, built from that config as the original's validation did).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from ..models.unet import UNet3DConditionModel
from .pipeline_tuneavideo import TuneAVideoPipeline


def safetensors_in(folder: str | Path, subfolder: str) -> bool:
    """Whether a model component's weights are safetensors. Given to diffusers' `from_pretrained` as
    `use_safetensors`: left unsaid, a folder of `.bin` weights (older downloads) loads too, but only after diffusers
    has logged, as an error, that it found no safetensors file."""
    return any((Path(folder) / subfolder).glob("*.safetensors"))


def load_tuned_pipeline(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TuneAVideoPipeline:
    """The pipeline saved in the run `folder` (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), every
    model in `dtype`. Raises what the libraries raise for a missing or damaged component."""
    return TuneAVideoPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype,
                                          use_safetensors=safetensors_in(folder, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        unet=UNet3DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                  use_safetensors=safetensors_in(folder, "unet")),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def is_base_model(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds an image model's UNet (a base Stable Diffusion folder) rather than a tuned run's. An
    unreadable UNet config is not judged here: loading names it."""
    try:
        config = json.loads((Path(folder) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "UNet2DConditionModel"
