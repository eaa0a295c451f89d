"""The base model a run is tuned from: a Stable Diffusion folder in diffusers' layout, or one SD 1.x/2.x checkpoint
file in the original (A1111 / civitai) layout, with LoRAs fused into it.

A single file is read by diffusers' `StableDiffusionPipeline.from_single_file`, offline: every component's config,
the tokenizer and the scheduler come from a local diffusers folder (`pretrained_model_config`; by default the SD 1.5
or 2.1 configs that `./download_models.sh --configs` fetches, chosen from the file's keys), never from the hub.
LoRAs (kohya / A1111 or diffusers format) go through diffusers' `load_lora_weights` (PEFT underneath) and are fused
into the image UNet and the text encoder before the UNet is inflated, as Tune-A-Video's maintainer advised
(Tune-A-Video #66); `fuse_loras` fuses them the same way, by name, into a tuned pipeline's inflated UNet, which keeps
the image UNet's names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTextModel, CLIPTokenizer

from .checks import check_sd_folder
from .config import LoraFile
from .errors import UserError, first_line
from .models.unet import UNet3DConditionModel
from .pipelines.loading import safetensors_in
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# the architecture of a single file, by the family diffusers reads from its keys: the folders
# `./download_models.sh --configs` writes (configs and tokenizer only, a few hundred kB)
DEFAULT_CONFIGS = {"v1": "./checkpoints/configs/stable-diffusion-v1-5",
                   "v2": "./checkpoints/configs/stable-diffusion-2-1"}
FAMILY_NAMES = {"v1": "SD 1.x", "v2": "SD 2.x"}
# the original layout's three models: UNet, VAE, CLIP text encoder
SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class BaseModelError(UserError):
    """The base model or a LoRA cannot be used; the message is one line naming the file."""


def checkpoint_family(path: Path) -> str:
    """"v1" or "v2": the Stable Diffusion family of a single-file checkpoint, read from its keys (diffusers' rules).

    Raises:
        BaseModelError: unreadable, not Stable Diffusion, or another family (SDXL, SD3, inpainting, ...).
    """
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        family = infer_diffusers_model_type(checkpoint)
    except Exception as err:  # safetensors, pickle and torch each raise their own types for a damaged file
        raise BaseModelError(f"pretrained_model_path {path}: cannot be read as a checkpoint ({first_line(err)})"
                             ) from err
    if family not in FAMILY_NAMES:
        raise BaseModelError(f"pretrained_model_path {path}: a {family} checkpoint, which Tune-A-Video cannot "
                             "inflate; give a Stable Diffusion 1.x or 2.x one (SDXL, SD3 and inpainting models are "
                             "not supported)")
    if not all(any(key.startswith(prefix) for key in checkpoint) for prefix in SD_PREFIXES):
        raise BaseModelError(f"pretrained_model_path {path}: not a Stable Diffusion checkpoint (it lacks the UNet, VAE "
                             "or text encoder of the original layout: model.diffusion_model.*, first_stage_model.*, "
                             "cond_stage_model.*)")
    return family


def file_hash(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_loras(loras: Sequence[LoraFile], option: str = "loras") -> None:
    """Every LoRA file exists; `option` names them in an error: "loras" (the tune config's), or "`loras`" (an edit request's)."""
    for index, lora in enumerate(loras):
        if not Path(lora.path).is_file():
            where = f"{option}[{index}].path" if option == "loras" else option
            raise BaseModelError(f"{where} {lora.path}: no such file; give a LoRA .safetensors file")


def parse_lora(text: str) -> LoraFile:
    """`FILE` or `FILE:SCALE` (the scale a number; 1 when left out)."""
    path, _, scale = text.rpartition(":")
    try:
        return LoraFile(path, float(scale)) if path else LoraFile(text)
    except ValueError:
        return LoraFile(text)


@dataclass(frozen=True)
class BaseModel:
    """Where the base model's weights (`path`) and architecture (`config`, the same folder for a diffusers folder)
    are, and the LoRAs fused into it. `resolve` checks it all before any model is loaded."""

    path: Path
    config: Path
    loras: tuple[LoraFile, ...] = ()

    @classmethod
    def resolve(cls, path: str, config: str | None = None, loras: Sequence[LoraFile] = ()) -> BaseModel:
        """Check `pretrained_model_path`, `pretrained_model_config` and `loras` (a single file's keys are read).

        Raises:
            BaseModelError / UserError: one line naming the file at fault and what to do.
        """
        check_loras(loras)
        source = Path(path)
        if source.is_dir() or source.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            return cls(check_sd_folder(source), source, tuple(loras))
        if not source.is_file():
            raise BaseModelError(f"pretrained_model_path {source}: no such file; give a Stable Diffusion .safetensors "
                                 "or .ckpt file, or a diffusers folder")
        family = checkpoint_family(source)
        folder = Path(config or DEFAULT_CONFIGS[family])
        if not (folder / "model_index.json").is_file():
            advice = ("fetch it once with ./download_models.sh --configs" if config is None else
                      "give the diffusers folder of the checkpoint's architecture")
            raise BaseModelError(f"pretrained_model_config {folder}: no {FAMILY_NAMES[family]} diffusers config folder "
                                 f"there (model_index.json) for {source}; {advice}")
        return cls(source, folder, tuple(loras))

    def image_pipeline(self) -> StableDiffusionPipeline:
        """The image model, LoRAs fused, with a DDIM scheduler, on the CPU."""
        # imported here: importing it makes transformers print a note (no torchvision) before the CLI quiets it
        from diffusers import StableDiffusionPipeline

        if self.path.is_dir():
            pipeline = StableDiffusionPipeline(
                vae=_load(partial(AutoencoderKL.from_pretrained, use_safetensors=safetensors_in(self.path, "vae")),
                          self.path, "vae"),
                text_encoder=_load(CLIPTextModel.from_pretrained, self.path, "text_encoder"),
                tokenizer=_load(CLIPTokenizer.from_pretrained, self.path, "tokenizer"),
                unet=_load(partial(UNet2DConditionModel.from_pretrained,
                                   use_safetensors=safetensors_in(self.path, "unet")), self.path, "unet"),
                scheduler=self.scheduler(DDIMScheduler), **NO_SAFETY_CHECKER)
        else:
            try:
                pipeline = StableDiffusionPipeline.from_single_file(
                    str(self.path), config=str(self.config), local_files_only=True,
                    scheduler=self.scheduler(DDIMScheduler), **NO_SAFETY_CHECKER)
            except Exception as err:  # diffusers' conversion raises many types on a file that does not fit
                raise BaseModelError(f"pretrained_model_path {self.path}: cannot be loaded with the architecture of "
                                     f"{self.config} ({first_line(err)}); give the matching pretrained_model_config"
                                     ) from err
        fuse_loras(pipeline, self.loras)
        return pipeline

    def video_pipeline(self, spatial_attention: str = "sparse_causal") -> TuneAVideoPipeline:
        """The image model, LoRAs fused, inflated to clips (untuned temporal layers), with a DDIM scheduler."""
        image = self.image_pipeline()
        return TuneAVideoPipeline(vae=image.vae, text_encoder=image.text_encoder, tokenizer=image.tokenizer,
                                  unet=UNet3DConditionModel.from_2d(image.unet, spatial_attention, str(self.path)),
                                  scheduler=image.scheduler)

    def scheduler(self, scheduler_class):
        """A scheduler of `scheduler_class` from the base model's scheduler config."""
        return _load(scheduler_class.from_pretrained, self.config, "scheduler")

    def record(self) -> dict:
        """What a run says it was tuned from: the base model, its config folder, and each LoRA's path, SHA-256 and
        scale (the hash tells a resumed run that a file changed)."""
        return {"pretrained_model_path": str(self.path), "pretrained_model_config": str(self.config),
                "loras": [{**asdict(lora), "sha256": file_hash(lora.path)} for lora in self.loras]}


def fuse_loras(pipeline: StableDiffusionPipeline | TuneAVideoPipeline, loras: Sequence[LoraFile]) -> None:
    """Fuse each LoRA, times its scale, into `pipeline`'s UNet and text encoder (those of its layers it names).

    Raises:
        BaseModelError: a file that is not a LoRA, or whose layers do not fit this model (another family's).
    """
    for index, lora in enumerate(loras):
        adapter = f"lora_{index}"
        try:
            pipeline.load_lora_weights(lora.path, adapter_name=adapter)
        except Exception as err:  # diffusers, PEFT and safetensors raise many types on a foreign file
            pipeline.unload_lora_weights()
            raise BaseModelError(f"{lora.path}: not a LoRA of this Stable Diffusion model ({first_line(err)}); give a "
                                 "kohya / A1111 or diffusers LoRA made for the same family (SD 1.x or 2.x)") from err
        if not any(isinstance(module, BaseTunerLayer) and adapter in module.lora_A
                   for model in (pipeline.unet, pipeline.text_encoder) for module in model.modules()):
            pipeline.unload_lora_weights()
            raise BaseModelError(f"{lora.path}: none of its layers are in this model: a LoRA for another family "
                                 "(SDXL, SD3, ...)? Give one made for SD 1.x or 2.x as the base model is")
        pipeline.fuse_lora(components=["unet", "text_encoder"], lora_scale=lora.scale, adapter_names=[adapter])
        pipeline.unload_lora_weights()


def _load(loader, base: Path, subfolder: str):
    """Load one component of a diffusers folder; a broken or mismatched file becomes a one-line error."""
    try:
        return loader(base, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"{base / subfolder}: cannot load it as a Stable Diffusion {subfolder} ({first_line(err)}); "
            "download the model again with ./download_models.sh"
        ) from err
