"""The tuned parameters alone: a small file that turns the base model into the tuned one.

Tuning touches only the modules named in `trainable_modules` (74 M of 909 M parameters for SD 1.x). This file holds
those tensors and every layer that inflation added (`attn_temp`, `norm_temp`: not in the base model, and randomly
initialised when untuned); `apply_tuned_parameters` loads them into a UNet inflated from the base model with
`UNet3DConditionModel.from_pretrained_2d`, which then equals the tuned UNet exactly.

With `tuning: lora` the pretrained modules among `trainable_modules` (Tune-A-Video's: the spatial query projections
`attn1.to_q`, `attn2.to_q`) keep their weights and train a PEFT LoRA adapter each (`add_lora_adapters`, as diffusers'
`train_text_to_image_lora.py` does with `unet.add_adapter(LoraConfig(...))`); the temporal layers, which have no
pretrained weights to stay close to, train fully. The file then holds the adapters' tensors, the temporal layers and
the adapter's config (metadata `lora`), and `apply_tuned_parameters` adds the adapter, loads it and fuses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import UserError
from .models.unet import TEMPORAL_KEY


LORA_ADAPTER = "tuned"  # the adapter's name in the UNet and in the tensor names of tuning: lora


def trainable_parameter_names(unet: torch.nn.Module, trainable_modules: list[str]) -> list[str]:
    """Names of the parameters of every module whose qualified name ends with one of `trainable_modules` (with LoRA
    adapters: the adapters' and the temporal layers', not the frozen weights an adapter wraps)."""
    prefixes = tuple(name + "." for name in _modules(unet, trainable_modules))
    return [name for name, _ in unet.named_parameters() if name.startswith(prefixes) and ".base_layer." not in name]


def lora_targets(unet: torch.nn.Module, trainable_modules: list[str]) -> list[str]:
    """The linear and convolution layers inside the pretrained (not temporal) modules of `trainable_modules`, by
    full name: what tuning: lora adapts (for Tune-A-Video's modules, every attn1.to_q and attn2.to_q)."""
    pretrained = [name for name in _modules(unet, trainable_modules) if TEMPORAL_KEY not in name + "."]
    return [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
            and any(name == outer or name.startswith(outer + ".") for outer in pretrained)]


def add_lora_adapters(unet, trainable_modules: list[str], rank: int, alpha: float | None = None) -> LoraConfig:
    """Add a trainable LoRA adapter of `rank` to every layer of `lora_targets` (B starts at zero, so the model is
    unchanged until it trains; scale `alpha / rank`, 1 with alpha None); returns its config."""
    targets = lora_targets(unet, trainable_modules)
    if not targets:
        raise UserError(f"tuning: lora adapts pretrained layers, and trainable_modules {trainable_modules} names none "
                        "(the temporal layers train fully); add e.g. attn1.to_q, or use tuning: full")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config, adapter_name=LORA_ADAPTER)
    return config


def save_tuned_parameters(unet: torch.nn.Module, path: str | os.PathLike, trainable_modules: list[str]) -> Path:
    """Write the trainable and temporal tensors of `unet` (float32) to `path`, atomically, with the LoRA adapter's
    config when it has one."""
    parameters = dict(unet.named_parameters())
    names = set(trainable_parameter_names(unet, trainable_modules)) | {n for n in parameters if TEMPORAL_KEY in n}
    tensors = {name: parameters[name].detach().float().cpu().contiguous() for name in sorted(names)}
    metadata = {"trainable_modules": json.dumps(list(trainable_modules))}
    if LORA_ADAPTER in getattr(unet, "peft_config", {}):
        lora = unet.peft_config[LORA_ADAPTER]
        metadata["lora"] = json.dumps({"r": lora.r, "lora_alpha": lora.lora_alpha,
                                       "target_modules": sorted(lora.target_modules)})
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return Path(path)


def apply_tuned_parameters(unet: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load the tensors of a tuned-parameters file into `unet` (inflated from the base model) and return it; a LoRA
    adapter in the file is fused into the weights it adapts."""
    tensors = load_file(os.fspath(path))
    with safe_open(os.fspath(path), "pt") as file:
        lora = (file.metadata() or {}).get("lora")
    if lora:
        unet.add_adapter(LoraConfig(**json.loads(lora)), adapter_name=LORA_ADAPTER)
    parameters = dict(unet.named_parameters())
    unknown = [name for name in tensors if name not in parameters]
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:3]} do not exist in this UNet: was it tuned from another base?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if parameters[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the UNet has {tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)
    if lora:
        unet.fuse_lora(adapter_names=[LORA_ADAPTER])
        unet.unload_lora()
    return unet


def _modules(unet: torch.nn.Module, trainable_modules: list[str]) -> list[str]:
    suffixes = tuple(trainable_modules)
    return [name for name, _ in unet.named_modules() if name.endswith(suffixes)]
