"""Typed training configuration: one schema with every default, and ``load_config``.

The original project passed ``OmegaConf.load(config)`` straight into ``main(**cfg)``, so a typo surfaced as an
"unexpected keyword" (or not at all inside ``train_data``/``validation_data``) and types were never checked. Here the
dataclasses below are the schema: YAML files hold only what differs per clip, unknown keys and wrong types fail at load
time with a one-line :class:`ConfigError`, and ``train()`` receives real dataclass instances.

Usage::

    cfg = load_config("configs/man-skiing.yaml", ["max_train_steps=300", "train_data.n_sample_frames=16"])
"""

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from .errors import UserError

# accelerate's spellings; None defers to the `accelerate config` default.
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")


class ConfigError(UserError):
    """A config file or override is invalid; the message is one line naming the source and the full key."""


@dataclass
class TrainDataConfig:
    """The single training clip and how frames are sampled from it."""

    video_path: str
    prompt: str
    # max(width, height) is the long side; frames keep the clip's aspect ratio, sides multiples of 64 (fit_size)
    width: int = 512
    height: int = 512
    n_sample_frames: int = 24
    sample_start_idx: int = 0
    sample_frame_rate: int = 1  # take every n-th source frame


@dataclass
class ValidationDataConfig:
    """Sampling settings for the periodic validation videos."""

    prompts: list[str]
    video_length: int = 24  # must equal train_data.n_sample_frames when sampling from the inverted latent
    # not used: samples are made at the tuned frames' size (train_data's, aspect kept); kept so old configs load
    width: int = 512
    height: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 12.5
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
    try:
        with open(source, encoding="utf-8") as file:
            # The top-level node only, nothing constructed: OmegaConf.load fails on a plain value at the top (a bare
            # OSError for "4", an AssertionError for "'true'", whose string it parses as YAML again), so refuse those.
            root = yaml.compose(file, Loader=yaml.SafeLoader)
        if root is not None and not isinstance(root, yaml.MappingNode):
            shape = "a list" if isinstance(root, yaml.SequenceNode) else f"the single value {root.value[:60]!r}"
            raise ConfigError(f"{source}: top level must be a mapping of keys such as in configs/*.yaml, got {shape}")
        file_cfg = OmegaConf.load(source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(err).split())}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: is not UTF-8 text (byte {err.start} is invalid); save it as UTF-8") from err
    except OSError as err:  # e.g. no read permission
        raise ConfigError(f"{source}: cannot be read ({err.strerror or err}); check its permissions") from err
    except RecursionError as err:  # yaml.compose recurses per nesting level; no config nests that deep
        raise ConfigError(f"{source}: is nested too deeply to be a config; compare it with configs/*.yaml") from err
    except OmegaConfBaseException as err:  # e.g. a null or list key, which no config can hold
        raise ConfigError(f"{source}: {_first_line(err)}; keys must be names such as in configs/*.yaml") from err
    if not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"{source}: top level must be a mapping of keys, got a {type(file_cfg).__name__}")
    override_cfg = OmegaConf.create()
    for item in overrides:  # one at a time, so a malformed value names its own override
        try:
            override_cfg = OmegaConf.merge(override_cfg, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"override {item!r}: {' '.join(str(err).split())}") from err
        except UnicodeError as err:  # undecodable bytes in a command-line argument arrive as lone surrogates
            raise ConfigError(f"override {item!r}: is not valid text ({err.reason}); retype it") from err
        except TypeError as err:  # OmegaConf.merge's bare error for a list meeting a mapping at the same key
            raise ConfigError(f"override {item!r}: sets a list and a mapping at the same key as an earlier "
                              "override; give each key one shape") from err
        except RecursionError as err:  # a key nested thousands deep; no config key is
            raise ConfigError(f"override {item!r}: key is nested too deeply") from err
        except IndexError as err:  # OmegaConf's key parser fails on some bracket typos, e.g. "[=1"
            raise ConfigError(f"override {item!r}: cannot parse the key; write key=value, e.g. seed=33") from err

    merged = _merge(OmegaConf.structured(TrainConfig), _fix_yaml_no(file_cfg), source)
    merged = _merge(merged, _fix_yaml_no(override_cfg), f"{source} + overrides")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _to_config_error(err, source) from err
    _check_list_items(cfg, source)
    _check_values(cfg, source)
    return cfg


def _fix_yaml_no(cfg: DictConfig) -> DictConfig:
    """Map ``mixed_precision: no`` back to "no": YAML 1.1 reads a bare ``no`` as the boolean False."""
    # An interpolation is left alone: resolving it here, before the merge, could only fail.
    if not OmegaConf.is_interpolation(cfg, "mixed_precision") and cfg.get("mixed_precision") is False:
        cfg.mixed_precision = "no"
    return cfg


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    """``OmegaConf.merge`` with its multi-line errors turned into a one-line :class:`ConfigError` naming ``source``."""
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise _to_config_error(err, source) from err
    except TypeError as err:  # OmegaConf's bare error for a mapping given to a list field; it names no key
        key = _mapping_for_list(OmegaConf.to_container(update))
        where = f"'{key}' expects {_expected_type(key)}, got a mapping" if key else "a mapping is given for a list"
        raise ConfigError(f"{source}: {where}; give the whole list, e.g. {key or 'key'}=['a','b']") from err
    except RecursionError as err:  # keys nested thousands deep; no config key is
        raise ConfigError(f"{source}: keys are nested too deeply") from err


def _mapping_for_list(update: object, cls: type = TrainConfig, key: str = "") -> str | None:
    """The first full key where the plain container ``update`` holds a mapping for a list field of ``cls``."""
    if not isinstance(update, dict):
        return None
    hints = typing.get_type_hints(cls)
    for name, value in update.items():
        hint, full_key = hints.get(name), f"{key}.{name}" if key else str(name)
        if typing.get_origin(hint) is list and isinstance(value, dict):
            return full_key
        if dataclasses.is_dataclass(hint) and (found := _mapping_for_list(value, hint, full_key)) is not None:
            return found
    return None


def _to_config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = err.full_key or ""
    if isinstance(err, ConfigKeyError) and key:
        parent, name = _resolve(key)
        valid = [f.name for f in dataclasses.fields(parent)] if parent else []
        if name in valid:  # the key is fine; the error is below it (e.g. the empty key in "train_data..width=1")
            return ConfigError(f"{source}: {_first_line(err)} (under {key!r})")
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}" if valid else ""
        # repr: a key typed by the user may hold a newline or other control characters; the message stays one line.
        return ConfigError(f"{source}: unknown key {key!r}{hint}")
    if isinstance(err, MissingMandatoryValue) and key:
        return ConfigError(f"{source}: missing required value '{key}'")
    if isinstance(err, ValidationError) and key:
        return ConfigError(f"{source}: '{key}' expects {_expected_type(key)}; {_first_line(err)}")
    return ConfigError(f"{source}: {_first_line(err)}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _resolve(full_key: str) -> tuple[type | None, str]:
    """Return (dataclass holding the last key of ``full_key``, that key), or (None, key) if not under the schema."""
    *parents, name = re.sub(r"\[\d+\]", "", full_key).split(".")
    cls: type | None = TrainConfig
    for part in parents:
        hints = typing.get_type_hints(cls) if cls else {}
        cls = hints.get(part) if dataclasses.is_dataclass(hints.get(part)) else None
    return cls, name


def _expected_type(full_key: str) -> str:
    parent, name = _resolve(full_key)
    hint = typing.get_type_hints(parent).get(name) if parent else None
    if hint is None:
        return "a different type"
    if full_key.endswith("]"):  # a list element: report the element type
        hint = typing.get_args(hint)[0]
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def _check_list_items(cfg: object, source: str, prefix: str = "") -> None:
    """Reject list items of the wrong type: OmegaConf lets a ``list[str]`` field hold nested lists and mappings."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(hint):
            _check_list_items(value, source, f"{prefix}{name}.")
        elif typing.get_origin(hint) is list:
            (item_type,) = typing.get_args(hint)
            for index, item in enumerate(value):
                if not isinstance(item, item_type):
                    raise ConfigError(f"{source}: '{prefix}{name}[{index}]' expects {item_type.__name__}, got "
                                      f"{item!r}; quote it if it is meant as text")


def _check_values(cfg: TrainConfig, source: str) -> None:
    """Reject values that type-check but cannot work, before any model is loaded."""
    td, vd = cfg.train_data, cfg.validation_data
    positive_keys = ["max_train_steps", "train_batch_size", "gradient_accumulation_steps", "validation_steps",
                     "checkpointing_steps", "train_data.n_sample_frames", "train_data.sample_frame_rate",
                     "validation_data.video_length", "validation_data.num_inference_steps",
                     "validation_data.num_inv_steps"]
    checks = [(key, _get(cfg, key) >= 1, "must be >= 1") for key in positive_keys]
    # The VAE downsamples by 8, so pixel sizes must divide into whole latents.
    checks += [(f"{section}.{dim}", _get(cfg, f"{section}.{dim}") > 0 and _get(cfg, f"{section}.{dim}") % 8 == 0,
                "must be a positive multiple of 8")
               for section in ("train_data", "validation_data") for dim in ("width", "height")]
    checks += [
        ("train_data.sample_start_idx", td.sample_start_idx >= 0, "must be >= 0"),
        ("train_data.prompt", bool(td.prompt.strip()), "must describe the clip, e.g. 'a man is skiing'"),
        ("validation_data.prompts", all(p.strip() for p in vd.prompts), "must not hold an empty prompt"),
        ("learning_rate", cfg.learning_rate > 0, "must be > 0"),
        ("trainable_modules", len(cfg.trainable_modules) > 0, "must name at least one module"),
        ("mixed_precision", cfg.mixed_precision in (*MIXED_PRECISION_CHOICES, None),
         f"must be one of {', '.join(MIXED_PRECISION_CHOICES)} or null"),
        ("checkpoints_total_limit", cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit >= 1,
         "must be >= 1 or null"),
        # The inverted latent has n_sample_frames frames; sampling it at another length fails (original issue #58).
        ("validation_data.video_length", not vd.use_inv_latent or vd.video_length == td.n_sample_frames,
         f"must equal train_data.n_sample_frames={td.n_sample_frames} when use_inv_latent is true"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{source}: {key}={_get(cfg, key)!r} {rule}")


def _get(cfg: TrainConfig, dotted_key: str) -> object:
    for part in dotted_key.split("."):
        cfg = getattr(cfg, part)
    return cfg
