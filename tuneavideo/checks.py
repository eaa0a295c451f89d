"""Checks that run before any model is loaded, so bad paths fail at once with a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_sd_folder(path: str | Path) -> Path:
    """`path` must be a local Stable Diffusion folder in diffusers layout (what ./download_models.sh writes)."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(
            f"pretrained_model_path {folder}: no such folder; download the weights with ./download_models.sh "
            "(or point pretrained_model_path at a diffusers Stable Diffusion folder)"
        )
    if not folder.is_dir():
        raise UserError(f"pretrained_model_path {folder}: is a file, neither a Stable Diffusion model folder nor a "
                        ".safetensors / .ckpt checkpoint")
    missing = [name for name in SD_COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise UserError(
            f"pretrained_model_path {folder}: not a Stable Diffusion model folder (no {', '.join(missing)}/); "
            "download one with ./download_models.sh"
        )
    config = folder / "unet" / "config.json"
    try:
        unet_config = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config}: unreadable UNet config ({err}); download the model again") from err
    if not isinstance(unet_config, dict) or len(unet_config.get("block_out_channels", [])) != 4:
        raise UserError(f"{config}: not a 4-level Stable Diffusion 1.x/2.x UNet")
    return folder
