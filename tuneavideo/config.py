"""The training configuration: the schema (every default, each field with its check) and ``load_config``.

OmegaConf merges the YAML file, then each ``key=value`` override, onto the dataclasses below: unknown keys (with its
"did you mean") and wrong types fail at load time, not late or never as in the original's ``main(**cfg)``; then each
field's check runs. Every failure is one :class:`ConfigError` line naming the source and the full key.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import UserError, first_line
from .video.conditions import CONDITIONS

# The LOVEU-TGVE benchmark's names for two train_data keys; its num_frames also means a random window each step.
TRAIN_DATA_ALIASES = {"num_frames": "n_sample_frames", "frame_rate": "sample_frame_rate"}


class ConfigError(UserError):
    """A config file or override is invalid; the message is one line naming the source and the full key."""


def checked(default: Any, test: Callable[[Any], bool], rule: str, **kwargs: Any) -> Any:
    """A field whose value must pass ``test``; ``rule`` ends the message "key=value must be ..." when it does not."""
    return field(default=default, metadata={"check": (test, rule)}, **kwargs)


def at_least(default: Any, low: int = 1) -> Any:
    return checked(default, lambda value: value >= low, f"must be >= {low}")


def one_of(*choices: str | None) -> Any:  # the first is the default
    names = ", ".join("null" if choice is None else choice for choice in choices)
    return checked(choices[0], lambda value: value in choices, f"must be one of {names}")


MAX_SEED = 2**32 - 1  # the largest seed every generator takes: accelerate's set_seed seeds numpy, whose are 32-bit
PIXELS = dict(test=lambda value: value > 0 and value % 8 == 0, rule="must be a positive multiple of 8")  # VAE: 8x


@dataclass
class TrainDataConfig:
    """The training clip and how frames are sampled from it."""

    video_path: str  # a video file, or a folder of frame images (in the order of the numbers in their names)
    prompt: str = checked(MISSING, str.strip, "must describe the clip, e.g. 'a man is skiing'")
    # a clip of this aspect ratio is resized to it; another keeps its own (the original squashed it), long side
    # max(width, height), sides multiples of 8, the leftover rows or columns cut evenly (frames.clip_size)
    width: int = checked(512, **PIXELS)
    height: int = checked(512, **PIXELS)
    n_sample_frames: int = at_least(8)  # 8: the original dataset's default
    sample_start_idx: int = at_least(0, low=0)
    sample_frame_rate: int = at_least(1)  # take every n-th source frame
    # fixed: the one window at sample_start_idx (the original); random: each step, one in [start, sample_end_idx)
    window: str = one_of("fixed", "random")
    sample_end_idx: int | None = None  # None: the end of the clip
    fps: float | None = checked(None, lambda fps: fps is None or fps > 0 and math.isfinite(fps),  # a folder's; None: 24
                                "must be > 0, or null")


@dataclass
class ValidationDataConfig:
    """Sampling settings for the periodic validation videos."""

    # a list of prompts, or a mapping of names to prompts (LOVEU-TGVE: style, object, ...): samples saved by name
    prompts: Any = checked(MISSING, lambda p: isinstance(p, list | dict) and len(p) > 0 and all(
        isinstance(text, str) and text.strip() for text in ([*p, *p.values()] if isinstance(p, dict) else p)),
        "must be a list of prompts, or a mapping of names to prompts (e.g. style: ..., object: ...), none empty")
    # None: train_data.n_sample_frames, which it must equal with use_inv_latent (the inverted latent has that many)
    video_length: int | None = at_least(None)
    width: int = 512  # width and height: accepted for old configs and not used; samples have the tuned frames' size
    height: int = 512
    num_inference_steps: int = at_least(50)
    guidance_scale: float = checked(7.5, math.isfinite, "must be a finite number")  # 7.5: the original pipeline's
    use_inv_latent: bool = True  # sample from the clip's DDIM inversion, not from noise
    num_inv_steps: int = at_least(50)
    negative_prompt: str | None = None


@dataclass
class LoraFile:
    """A LoRA fused into the base model before inflation (kohya / A1111 or diffusers format, `.safetensors`)."""

    path: str
    scale: float = checked(1.0, math.isfinite, "must be a finite number")  # 1: the LoRA as trained


@dataclass
class ControlNetConfig:
    """Tuning under structure guidance (ControlVideo's): the UNet learns with a frozen ControlNet's residuals of the
    clip's conditions added, so its tuned weights need not learn what the ControlNet supplies; the run's config keeps
    it, and edits of the run use it unless told otherwise."""

    model: str  # a diffusers ControlNet folder or hub id, or an original-format file (README: "Structure guidance")
    # canny or depth (made from the clip), or a condition video or folder, one frame per source frame
    condition: str = checked("canny", lambda c: c in CONDITIONS or os.path.exists(c),
                             f"must be {' or '.join(CONDITIONS)}, or an existing condition video or folder of frames")
    # 1.0: as ControlNets are trained, and as ControlVideo tunes
    scale: float = checked(1.0, lambda s: math.isfinite(s) and s >= 0, "must be a number >= 0")


@dataclass
class TrainConfig:
    """All keys of the original project's configs (same names, same defaults as its ``main()``), plus a few new ones."""

    # what to tune and where to write
    pretrained_model_path: str  # a Stable Diffusion folder in diffusers' layout, or one SD 1.x/2.x .safetensors/.ckpt
    output_dir: str
    train_data: TrainDataConfig
    validation_data: ValidationDataConfig
    overwrite: bool = False  # new: allow writing into a non-empty output_dir
    # new: with a single-file model, the diffusers folder whose configs (and tokenizer) describe its architecture;
    # None: ./checkpoints/configs/stable-diffusion-v1-5 or -2-1 by the file's keys (./download_models.sh --configs)
    pretrained_model_config: str | None = None
    loras: list[LoraFile] = field(default_factory=list)  # new: LoRAs fused into the base model, in order
    # the model: what trains, and which frames a frame's self-attention sees
    trainable_modules: list[str] = checked(MISSING, bool, "must name at least one module, e.g. ['attn1.to_q']",
                                           default_factory=lambda: ["attn1.to_q", "attn2.to_q", "attn_temp"])
    # new: full (Tune-A-Video's: the trainable modules' weights), or lora: PEFT LoRA adapters on the pretrained
    # modules among them, while new temporal layers (attn_temp) still train fully (they have no pretrained weights)
    tuning: str = one_of("full", "lora")
    lora_rank: int = at_least(4)  # 4: diffusers' train_text_to_image_lora.py default
    lora_alpha: float | None = checked(None, lambda a: a is None or a > 0 and math.isfinite(a),
                                       "must be > 0, or null")  # None: lora_rank (a scale of 1)
    # new: sparse_causal, frames 0 and i-1 (Tune-A-Video); first_frame, frame 0 only (Video-P2P); saved with the UNet
    spatial_attention: str = one_of("sparse_causal", "first_frame")
    controlnet: ControlNetConfig | None = None  # new: tune under a ControlNet (null: without, as the original)
    # AdamW
    learning_rate: float = checked(3e-5, lambda lr: math.isfinite(lr) and lr > 0, "must be > 0")
    scale_lr: bool = False  # multiply learning_rate by the effective batch size
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    train_batch_size: int = at_least(1)
    gradient_accumulation_steps: int = at_least(1)
    # schedule, in optimizer steps
    max_train_steps: int = at_least(500)
    lr_scheduler: str = "constant"  # a name diffusers' get_scheduler knows
    lr_warmup_steps: int = 0
    validation_steps: int = at_least(100)
    checkpointing_steps: int = at_least(500)
    # new: keep at most this many checkpoint-N folders (None: keep all)
    checkpoints_total_limit: int | None = checked(None, lambda n: n is None or n >= 1, "must be >= 1 or null")
    resume_from_checkpoint: str | None = None  # a checkpoint-N path or "latest"
    # system
    mixed_precision: str | None = one_of("fp16", "bf16", "no", None)  # accelerate's names; null: its config's
    use_8bit_adam: bool = False  # needs bitsandbytes
    gradient_checkpointing: bool = True
    enable_xformers_memory_efficient_attention: bool = True  # without xformers, torch's SDPA (the same maths)
    seed: int | None = checked(None, lambda seed: seed is None or 0 <= seed <= MAX_SEED,
                               f"must be a whole number from 0 to {MAX_SEED} (2**32 - 1), or null")


def validation_prompts(cfg: ValidationDataConfig) -> list[tuple[str | None, str]]:
    """``(name, prompt)`` pairs of ``cfg.prompts``; the name is None for a plain list of prompts."""
    return list(cfg.prompts.items()) if isinstance(cfg.prompts, dict) else [(None, p) for p in cfg.prompts]


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """The schema's defaults, then the YAML file at ``path`` (read by OmegaConf, so ``3e-5`` is a float), then each
    ``key=value`` of ``overrides`` (e.g. ``"seed=null"``), as a checked :class:`TrainConfig`; else a ConfigError."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ConfigError(f"config file not found: {source}")
    merged = OmegaConf.structured(TrainConfig)
    updates = [(source, lambda: _read_file(source))]  # each on its own, so that an error names the one at fault
    updates += [(f"override {item!r}", lambda item=item: OmegaConf.from_dotlist([item])) for item in overrides]
    for where, read in updates:
        try:  # OmegaConf lets TypeError (a mapping for a list), IndexError and RecursionError (deep nesting) through
            merged = OmegaConf.merge(merged, _as_written(read()))
        except (UserError, OmegaConfBaseException, yaml.YAMLError, OSError, UnicodeError, TypeError, IndexError,
                RecursionError) as err:
            raise _error(err, where) from err
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # a missing required value, a bad interpolation
        raise _error(err, source) from err
    td, vd = cfg.train_data, cfg.validation_data
    vd.video_length = td.n_sample_frames if vd.video_length is None else vd.video_length
    sections = [("", cfg), ("train_data.", td), ("validation_data.", vd)]
    sections += [(f"loras[{index}].", lora) for index, lora in enumerate(cfg.loras)]
    sections += [("controlnet.", cfg.controlnet)] if cfg.controlnet is not None else []
    for prefix, section in sections:
        for item in dataclasses.fields(section):
            test, rule = item.metadata.get("check", (lambda _: True, ""))
            if not test(value := getattr(section, item.name)):
                raise ConfigError(f"{source}: {prefix}{item.name}={value!r} {rule}")
    if td.sample_end_idx is not None and td.sample_end_idx <= td.sample_start_idx:
        raise ConfigError(f"{source}: train_data.sample_end_idx={td.sample_end_idx} must be > sample_start_idx="
                          f"{td.sample_start_idx}, or null for the end of the clip")
    if vd.use_inv_latent and vd.video_length != td.n_sample_frames:  # sampling fails otherwise (original issue #58)
        raise ConfigError(f"{source}: validation_data.video_length={vd.video_length} must equal "
                          f"train_data.n_sample_frames={td.n_sample_frames} when use_inv_latent is true")
    return cfg


def _read_file(source: str) -> DictConfig:
    with open(source, encoding="utf-8") as file:  # the top node only: OmegaConf.load fails obscurely on a plain value
        if not isinstance(yaml.compose(file, Loader=yaml.SafeLoader), yaml.MappingNode | None):
            raise ConfigError("top level must be a mapping of keys such as in configs/*.yaml")
    return OmegaConf.load(source)


def _as_written(update: DictConfig) -> DictConfig:
    """Values as their author meant them: `mixed_precision: no` is "no", not YAML 1.1's False, and the LOVEU-TGVE
    names `num_frames` / `frame_rate` are `n_sample_frames` / `sample_frame_rate`, `num_frames` with random windows."""
    if not OmegaConf.is_interpolation(update, "mixed_precision") and update.get("mixed_precision") is False:
        update.mixed_precision = "no"
    data = update.get("train_data")
    for alias, name in TRAIN_DATA_ALIASES.items() if isinstance(data, DictConfig) else ():
        if alias in data and name in data:
            raise ConfigError(f"train_data.{alias} and train_data.{name} name the same setting; give one")
        if alias in data:
            data[name] = data.pop(alias)
            if name == "n_sample_frames":
                data.setdefault("window", "random")
    return update


def _error(err: Exception, where: str) -> ConfigError:
    """One line: ``where`` (file or override), the full key, OmegaConf's message (given, allowed, did you mean)."""
    key, text = getattr(err, "full_key", None), first_line(err)
    if isinstance(err, yaml.YAMLError):
        text = f"invalid YAML: {' '.join(str(err).split())}"
    if isinstance(err, ConfigKeyError) and "Did you mean" not in text and dataclasses.is_dataclass(err.object_type):
        text += f"; valid keys here: {', '.join(item.name for item in dataclasses.fields(err.object_type))}"
    if isinstance(err, TypeError):  # OmegaConf names no key; these three are the schema's only lists
        text = ("a list and a mapping cannot replace each other: trainable_modules and loras are lists, and "
                "validation_data.prompts keeps the shape the file gives it")
    return ConfigError(f"{where}: {key!r}: {text}" if key else f"{where}: {text}")
