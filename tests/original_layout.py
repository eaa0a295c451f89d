"""Write a diffusers Stable Diffusion 1.x or 2.x folder as one checkpoint file in the original (CompVis / A1111 /
Stability) layout, the layout community checkpoints ship in; the key names are those of diffusers' conversion scripts
(`scripts/convert_diffusers_to_original_stable_diffusion.py`), for any `layers_per_block`; a 2.x text encoder in
OpenCLIP's layout (`cond_stage_model.model.transformer.resblocks.*`, query, key and value in one `in_proj`). Tests
only."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextModel

# a ResNet's layers: diffusers' name -> the original's
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(levels: int, layers: int) -> dict[str, str]:
    """Block prefixes: diffusers' -> the original's `input_blocks` / `middle_block` / `output_blocks` numbering."""
    names = {}
    for i in range(levels):
        for j in range(layers):
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (layers + 1) + j + 1}.0."
            names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (layers + 1) + j + 1}.1."
        names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        for j in range(layers + 1):
            names[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (layers + 1) + j}.0."
            names[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (layers + 1) + j}.1."
        # the upsampler follows the level's last block, after its attention when it has one
        names[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{1 if i == 0 else 2}."
    names["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        names[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return names


def _rename(key: str, prefixes: dict[str, str], layers: dict[str, str]) -> str:
    prefix = next(p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p))
    rest = key[len(prefix):]
    for new, old in layers.items():
        if rest.startswith(new + "."):
            rest = old + rest[len(new):]
    return prefixes[prefix] + rest


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    prefixes = unet_prefixes(len(unet.config.block_out_channels), unet.config.layers_per_block)
    return {"model.diffusion_model." + (fixed[key] if key in fixed else _rename(key, prefixes, RESNET)): value
            for key, value in unet.state_dict().items()}


def vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(vae.config.block_out_channels)
    prefixes = {"encoder.mid_block.resnets.0.": "encoder.mid.block_1.", "encoder.mid_block.resnets.1.":
                "encoder.mid.block_2.", "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.",
                "decoder.mid_block.resnets.0.": "decoder.mid.block_1.", "decoder.mid_block.resnets.1.":
                "decoder.mid.block_2.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        # the original numbers the decoder's levels from the lowest resolution up
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{levels - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    result = {}
    for key, value in vae.state_dict().items():
        if key in fixed:
            result["first_stage_model." + fixed[key]] = value
            continue
        renamed = _rename(key, prefixes, {**VAE_RESNET, **VAE_ATTENTION})
        if ".attn_1." in renamed and value.ndim == 2:  # the original's attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        result["first_stage_model." + renamed] = value
    return result


def open_clip_to_original(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD 2.x's text encoder in OpenCLIP's layout (the inverse of diffusers' `convert_open_clip_checkpoint`)."""
    prefix = "cond_stage_model.model."
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    result = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
              prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
              prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
              prefix + "ln_final.bias": state.pop("final_layer_norm.bias")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for layer in range(text_encoder.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            result[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
            for name, original in names.items():
                result[f"{theirs}{original}.{kind}"] = state.pop(f"{ours}{name}.{kind}")
    assert not state, f"not converted: {sorted(state)}"
    return result


def write_original_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """The UNet, VAE and text encoder of the diffusers folder `folder` as one `.safetensors` at `path`; a text
    encoder as wide as SD 2.x's (1024) in OpenCLIP's layout, as 2.x checkpoints hold it."""
    folder = Path(folder)
    tensors = {**unet_to_original(UNet2DConditionModel.from_pretrained(folder, subfolder="unet")),
               **vae_to_original(AutoencoderKL.from_pretrained(folder, subfolder="vae"))}
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    if text_encoder.config.hidden_size == 1024:
        tensors.update(open_clip_to_original(text_encoder))
    else:  # transformers 5 dropped CLIPTextModel's `text_model.` level, which the original layout's names keep
        tensors.update({"cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): value
                        for key, value in text_encoder.state_dict().items()})
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return Path(path)
