"""The tuned parameters alone: a small file that turns the base model into the tuned one.

Tuning touches only the modules named in `trainable_modules` (74 M of 909 M parameters for SD 1.x). This file holds
those tensors and every layer that inflation added (`attn_temp`, `norm_temp`: not in the base model, and randomly
initialised when untuned); `apply_tuned_parameters` loads them into a UNet inflated from the base model with
`UNet3DConditionModel.from_pretrained_2d`, which then equals the tuned UNet exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .models.unet import TEMPORAL_KEY


def trainable_parameter_names(unet: torch.nn.Module, trainable_modules: list[str]) -> list[str]:
    """Names of the parameters of every module whose qualified name ends with one of `trainable_modules`."""
    suffixes = tuple(trainable_modules)
    modules = [name for name, _ in unet.named_modules() if name.endswith(suffixes)]
    prefixes = tuple(name + "." for name in modules)
    return [name for name, _ in unet.named_parameters() if name.startswith(prefixes)]


def save_tuned_parameters(unet: torch.nn.Module, path: str | os.PathLike, trainable_modules: list[str]) -> Path:
    """Write the trainable and temporal tensors of `unet` (float32) to `path`, atomically."""
    parameters = dict(unet.named_parameters())
    names = set(trainable_parameter_names(unet, trainable_modules)) | {n for n in parameters if TEMPORAL_KEY in n}
    tensors = {name: parameters[name].detach().float().cpu().contiguous() for name in sorted(names)}
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata={"trainable_modules": json.dumps(list(trainable_modules))})
    return Path(path)


def apply_tuned_parameters(unet: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load the tensors of a tuned-parameters file into `unet` (inflated from the base model) and return it."""
    tensors = load_file(os.fspath(path))
    parameters = dict(unet.named_parameters())
    unknown = [name for name in tensors if name not in parameters]
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:3]} do not exist in this UNet: was it tuned from another base?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if parameters[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the UNet has {tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)
    return unet
