"""Typed training configuration: one schema with every default, and ``load_config``.

The original project passed ``OmegaConf.load(config)`` straight into ``main(**cfg)``, so a typo surfaced as an
"unexpected keyword" (or not at all inside ``train_data``/``validation_data``) and types were never checked. Here the
dataclasses below are the schema: YAML files hold only what differs per clip, unknown keys and wrong types fail at load
time with a one-line :class:`ConfigError`, and ``train()`` receives real dataclass instances.

The LOVEU-TGVE benchmark's configs load as written: its ``train_data.num_frames`` / ``frame_rate`` are read as
``n_sample_frames`` / ``sample_frame_rate`` with a random window each step, and ``validation_data.prompts`` may map
edit types to prompts.

Usage::

    cfg = load_config("configs/man-skiing.yaml", ["max_train_steps=300", "train_data.n_sample_frames=16"])
"""

import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from .errors import UserError, first_line
from .models.attention import SPATIAL_ATTENTION

# accelerate's spellings; None defers to the `accelerate config` default.
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
WINDOW_CHOICES = ("fixed", "random")
# The LOVEU-TGVE benchmark's names for two train_data keys (its configs load unchanged).
TRAIN_DATA_ALIASES = {"num_frames": "n_sample_frames", "frame_rate": "sample_frame_rate"}


class ConfigError(UserError):
    """A config file or override is invalid; the message is one line naming the source and the full key."""


@dataclass
class TrainDataConfig:
    """The training clip and how frames are sampled from it."""

    video_path: str  # a video file, or a folder of frame images
    prompt: str
    # The clip's frames are resized to width x height when the clip has that aspect ratio (the original squashed any
    # clip to it); a clip of another aspect ratio keeps its own, long side max(width, height), sides multiples of 64.
    width: int = 512
    height: int = 512
    n_sample_frames: int = 8
    sample_start_idx: int = 0
    sample_frame_rate: int = 1  # take every n-th source frame
    # fixed: the one window of n_sample_frames at sample_start_idx (the original); random: every step tunes on a
    # window whose start is drawn among all that fit in [sample_start_idx, sample_end_idx).
    window: str = "fixed"
    sample_end_idx: int | None = None  # None: the end of the clip
    fps: float | None = None  # frame rate of a folder of frames (None: 24); a video file has its own


@dataclass
class ValidationDataConfig:
    """Sampling settings for the periodic validation videos."""

    # A list of prompts, or a mapping of names to prompts (LOVEU-TGVE: style, object, background, multiple); with a
    # mapping each sample is saved under its name.
    prompts: Any
    video_length: int | None = None  # None: train_data.n_sample_frames, which it must equal with use_inv_latent
    # accepted for compatibility and not used: samples have the tuned frames' size (train_data's, aspect kept)
    width: int = 512
    height: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    use_inv_latent: bool = True
    num_inv_steps: int = 50
    negative_prompt: str | None = None


@dataclass
class TrainConfig:
    """All keys of the original project's configs (same names, same defaults as its ``main()``), plus a few new ones."""

    pretrained_model_path: str
    output_dir: str
    train_data: TrainDataConfig
    validation_data: ValidationDataConfig
    validation_steps: int = 100
    trainable_modules: list[str] = field(default_factory=lambda: ["attn1.to_q", "attn2.to_q", "attn_temp"])
    train_batch_size: int = 1
    max_train_steps: int = 500
    learning_rate: float = 3e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    checkpointing_steps: int = 500
    resume_from_checkpoint: str | None = None  # a checkpoint-N path or "latest"
    mixed_precision: str | None = "fp16"
    use_8bit_adam: bool = False
    enable_xformers_memory_efficient_attention: bool = True
    seed: int | None = None
    # New in this port.
    overwrite: bool = False  # allow writing into a non-empty output_dir
    checkpoints_total_limit: int | None = None  # keep at most this many checkpoint-N dirs (None: keep all)
    spatial_attention: str = "sparse_causal"  # attn1's frames: sparse_causal (Tune-A-Video), first_frame (Video-P2P)


def validation_prompts(cfg: ValidationDataConfig) -> list[tuple[str | None, str]]:
    """``(name, prompt)`` pairs of ``cfg.prompts``; the name is None for a plain list of prompts."""
    if isinstance(cfg.prompts, dict):
        return list(cfg.prompts.items())
    return [(None, prompt) for prompt in cfg.prompts]


# Everything OmegaConf and PyYAML raise on bad text, keys or values (OmegaConf lets some of Python's own through:
# TypeError for a mapping given to a list, IndexError for some bracket typos, RecursionError for deep nesting).
_LOAD_ERRORS = (OmegaConfBaseException, yaml.YAMLError, OSError, UnicodeError, TypeError, IndexError, RecursionError)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Merge the schema defaults, the YAML file at ``path`` and dotlist ``overrides`` into a :class:`TrainConfig`.

    Args:
        path: YAML file in the original project's format (read by OmegaConf, so ``3e-5`` is a float, not a string).
        overrides: ``key=value`` strings applied last, e.g. ``["max_train_steps=300", "seed=null"]``.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type, missing required value or an impossible value.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ConfigError(f"config file not found: {source}")
    merged = OmegaConf.structured(TrainConfig)
    # the file, then each override on its own, so that an error names the one at fault
    updates = [(source, lambda: _read_file(source))]
    updates += [(f"override {item!r}", lambda item=item: OmegaConf.from_dotlist([item])) for item in overrides]
    for where, read in updates:
        update = None
        try:
            update = _as_written(read())
            merged = OmegaConf.merge(merged, update)
        except (ConfigError, *_LOAD_ERRORS) as err:
            raise _config_error(err, where, update) from err
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, source, None) from err
    if cfg.validation_data.video_length is None:  # as many frames as are tuned on
        cfg.validation_data.video_length = cfg.train_data.n_sample_frames
    _check_values(cfg, source)
    return cfg


def _read_file(source: str) -> DictConfig:
    with open(source, encoding="utf-8") as file:
        # The top-level node only, nothing constructed: OmegaConf.load fails obscurely on a plain value at the top.
        root = yaml.compose(file, Loader=yaml.SafeLoader)
    if root is not None and not isinstance(root, yaml.MappingNode):
        shape = "a list" if isinstance(root, yaml.SequenceNode) else f"the single value {root.value[:60]!r}"
        raise ConfigError(f"top level must be a mapping of keys such as in configs/*.yaml, got {shape}")
    return OmegaConf.load(source)


def _as_written(update: DictConfig) -> DictConfig:
    """Read values as their author meant them: `mixed_precision: no` is "no", not YAML 1.1's False, and the
    LOVEU-TGVE names `num_frames` / `frame_rate` are `n_sample_frames` / `sample_frame_rate` with random windows."""
    if not OmegaConf.is_interpolation(update, "mixed_precision") and update.get("mixed_precision") is False:
        update.mixed_precision = "no"
    data = update.get("train_data")
    if isinstance(data, DictConfig):
        for alias, name in TRAIN_DATA_ALIASES.items():
            if alias in data:
                if name in data:
                    raise ConfigError(f"train_data.{alias} and train_data.{name} name the same setting; give one")
                data[name] = data.pop(alias)
                if name == "n_sample_frames":
                    data.setdefault("window", "random")
    return update


def _config_error(err: Exception, where: str, update: object) -> ConfigError:
    """One line naming ``where`` (the file or the override), the full key, what was given and what is allowed."""
    if isinstance(err, ConfigError):
        return ConfigError(f"{where}: {err}")
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) and key:
        parent, name = _resolve(key)
        valid = [f.name for f in dataclasses.fields(parent)] if parent else []
        if name in valid:  # the key is fine; the error is below it (e.g. the empty key in "train_data..width=1")
            return ConfigError(f"{where}: {first_line(err)} (under {key!r})")
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}" if valid else ""
        return ConfigError(f"{where}: unknown key {key!r}{hint}")
    if isinstance(err, MissingMandatoryValue) and key:
        return ConfigError(f"{where}: missing required value '{key}'")
    if isinstance(err, ValidationError) and key:
        return ConfigError(f"{where}: '{key}' expects {_expected_type(key)}; {first_line(err)}")
    if isinstance(err, TypeError) and isinstance(update, DictConfig):  # OmegaConf names no key here
        if key := _mapping_for_list(OmegaConf.to_container(update)):
            return ConfigError(f"{where}: '{key}' expects {_expected_type(key)}, got a mapping; give the whole list, "
                               f"e.g. {key}=['a','b']")
        return ConfigError(f"{where}: a list and a mapping cannot replace each other here; write the value in the "
                           "same shape as the config file, or change the file")
    if isinstance(err, OSError):
        return ConfigError(f"{where}: cannot be read ({err.strerror or err}); check its permissions")
    if isinstance(err, UnicodeDecodeError):
        return ConfigError(f"{where}: is not UTF-8 text (byte {err.start} is invalid); save it as UTF-8")
    if isinstance(err, RecursionError):
        return ConfigError(f"{where}: keys are nested too deeply to be a config; compare it with configs/*.yaml")
    if isinstance(err, yaml.YAMLError):
        return ConfigError(f"{where}: invalid YAML: {' '.join(str(err).split())}")
    return ConfigError(f"{where}: {first_line(err)}; write key=value with keys such as in configs/*.yaml")


def _mapping_for_list(update: object, cls: type = TrainConfig, key: str = "") -> str:
    """The first full key where the plain container ``update`` holds a mapping for a list field of ``cls``."""
    hints = typing.get_type_hints(cls)
    for name, value in update.items() if isinstance(update, dict) else ():
        hint, full_key = hints.get(name), f"{key}.{name}" if key else str(name)
        if typing.get_origin(hint) is list and isinstance(value, dict):
            return full_key
        if dataclasses.is_dataclass(hint) and (found := _mapping_for_list(value, hint, full_key)):
            return found
    return ""


def _resolve(full_key: str) -> tuple[type | None, str]:
    """Return (dataclass holding the last key of ``full_key``, that key), or (None, key) if not under the schema."""
    *parents, name = re.sub(r"\[\d+\]", "", full_key).split(".")
    cls: type | None = TrainConfig
    for part in parents:
        hint = typing.get_type_hints(cls).get(part) if cls else None
        cls = hint if dataclasses.is_dataclass(hint) else None
    return cls, name


def _expected_type(full_key: str) -> str:
    parent, name = _resolve(full_key)
    hint = typing.get_type_hints(parent).get(name) if parent else None
    if hint is None:
        return "a different type"
    if full_key.endswith("]"):  # a list element: report the element type
        hint = typing.get_args(hint)[0]
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def _check_values(cfg: TrainConfig, source: str) -> None:
    """Reject values that type-check but cannot work, before any model is loaded."""
    td, vd = cfg.train_data, cfg.validation_data
    positive_keys = ["max_train_steps", "train_batch_size", "gradient_accumulation_steps", "validation_steps",
                     "checkpointing_steps", "train_data.n_sample_frames", "train_data.sample_frame_rate",
                     "validation_data.video_length", "validation_data.num_inference_steps",
                     "validation_data.num_inv_steps"]
    checks = [(key, _get(cfg, key) >= 1, "must be >= 1") for key in positive_keys]
    prompts = [prompt for _, prompt in validation_prompts(vd)] if _prompts_shape_ok(vd.prompts) else None
    checks += [
        # The VAE downsamples by 8, so pixel sizes must divide into whole latents.
        ("train_data.width", td.width > 0 and td.width % 8 == 0, "must be a positive multiple of 8"),
        ("train_data.height", td.height > 0 and td.height % 8 == 0, "must be a positive multiple of 8"),
        ("train_data.sample_start_idx", td.sample_start_idx >= 0, "must be >= 0"),
        ("train_data.sample_end_idx", td.sample_end_idx is None or td.sample_end_idx > td.sample_start_idx,
         "must be greater than train_data.sample_start_idx, or null for the end of the clip"),
        ("train_data.window", td.window in WINDOW_CHOICES, f"must be one of {', '.join(WINDOW_CHOICES)}"),
        ("train_data.fps", td.fps is None or (math.isfinite(td.fps) and td.fps > 0), "must be > 0, or null"),
        ("train_data.prompt", bool(td.prompt.strip()), "must describe the clip, e.g. 'a man is skiing'"),
        ("validation_data.prompts", prompts is not None,
         "must be a list of prompts, or a mapping of names to prompts (e.g. style: ..., object: ...)"),
        ("validation_data.prompts", prompts is None or all(p.strip() for p in prompts),
         "must not hold an empty prompt"),
        ("validation_data.guidance_scale", math.isfinite(vd.guidance_scale), "must be a finite number"),
        ("learning_rate", cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate), "must be > 0"),
        ("trainable_modules", len(cfg.trainable_modules) > 0 and all(isinstance(m, str) for m in cfg.trainable_modules),
         "must name at least one module, e.g. ['attn1.to_q']"),
        ("mixed_precision", cfg.mixed_precision in (*MIXED_PRECISION_CHOICES, None),
         f"must be one of {', '.join(MIXED_PRECISION_CHOICES)} or null"),
        ("spatial_attention", cfg.spatial_attention in SPATIAL_ATTENTION,
         f"must be one of {', '.join(SPATIAL_ATTENTION)}"),
        ("checkpoints_total_limit", cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit >= 1,
         "must be >= 1 or null"),
        # The inverted latent has n_sample_frames frames; sampling it at another length fails (original issue #58).
        ("validation_data.video_length", not vd.use_inv_latent or vd.video_length == td.n_sample_frames,
         f"must equal train_data.n_sample_frames={td.n_sample_frames} when use_inv_latent is true"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{source}: {key}={_get(cfg, key)!r} {rule}")


def _prompts_shape_ok(prompts: object) -> bool:
    """A non-empty list of strings, or a non-empty mapping of names to strings."""
    if isinstance(prompts, dict):
        return bool(prompts) and all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(p, str) for p in prompts)


def _get(cfg: TrainConfig, dotted_key: str) -> object:
    for part in dotted_key.split("."):
        cfg = getattr(cfg, part)
    return cfg
