"""Tests for tuneavideo.config: shipped configs, overrides, one-line errors, value checks."""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tuneavideo.config import (
    ConfigError,
    TrainConfig,
    TrainDataConfig,
    ValidationDataConfig,
    load_config,
    validation_prompts,
)

CONFIGS = ROOT / "configs"

# An original-project config written exactly in its style (quoted paths, `3e-5`, `True`/`False`, bare `fp16`).
ORIGINAL_MAN_SKIING = """\
pretrained_model_path: "./checkpoints/stable-diffusion-v1-4"
output_dir: "./outputs/man-skiing"

train_data:
  video_path: "data/man-skiing.mp4"
  prompt: "a man is skiing"
  n_sample_frames: 24
  width: 512
  height: 512
  sample_start_idx: 0
  sample_frame_rate: 2

validation_data:
  prompts:
    - "mickey mouse is skiing on the snow"
    - "spider man is skiing on the beach, cartoon style"
    - "wonder woman, wearing a cowboy hat, is skiing"
    - "a man, wearing pink clothes, is skiing at sunset"
  video_length: 24
  width: 512
  height: 512
  num_inference_steps: 50
  guidance_scale: 12.5
  use_inv_latent: True
  num_inv_steps: 50

learning_rate: 3e-5
train_batch_size: 1
max_train_steps: 500
checkpointing_steps: 1000
validation_steps: 100
trainable_modules:
  - "attn1.to_q"
  - "attn2.to_q"
  - "attn_temp"

seed: 33
mixed_precision: fp16
use_8bit_adam: False
gradient_checkpointing: True
enable_xformers_memory_efficient_attention: True
"""

# Keys of the original train_tuneavideo.main() signature; the schema must hold exactly these plus the new ones.
ORIGINAL_KEYS = {
    "pretrained_model_path", "output_dir", "train_data", "validation_data", "validation_steps", "trainable_modules",
    "train_batch_size", "max_train_steps", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps",
    "gradient_checkpointing", "checkpointing_steps", "resume_from_checkpoint", "mixed_precision", "use_8bit_adam",
    "enable_xformers_memory_efficient_attention", "seed",
}

MINIMAL = """\
pretrained_model_path: ./model
output_dir: ./out
train_data:
  video_path: ./clip.mp4
  prompt: a clip
validation_data:
  prompts: ["a prompt"]
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def expect_error(path: Path, overrides: Sequence[str] = ()) -> str:
    """Load, expect a ConfigError, check it is one line naming the file, and return the message."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# (file, train prompt, sample_frame_rate, n_sample_frames, number of validation prompts, one validation prompt)
SHIPPED = [
    ("car-turn", "a jeep car is moving on the road", 2, 24, 4, "a sports car is moving on the road"),
    ("man-skiing", "a man is skiing", 2, 24, 4, "mickey mouse is skiing on the snow"),
    ("man-surfing", "a man is surfing", 1, 24, 4, "a raccoon is surfing, cartoon style"),
    ("rabbit-watermelon", "a rabbit is eating a watermelon", 2, 24, 4, "a tiger is eating a watermelon"),
    ("woman-talking", "A woman is talking", 1, 16, 3, "A Wonder Woman is talking, cartoon style"),
]


@pytest.mark.parametrize("name, prompt, rate, frames, n_prompts, a_prompt", SHIPPED)
def test_shipped_configs_load_with_original_hyperparameters(name, prompt, rate, frames, n_prompts, a_prompt):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.train_data, TrainDataConfig)
    assert isinstance(cfg.validation_data, ValidationDataConfig)
    assert cfg.pretrained_model_path == "./checkpoints/stable-diffusion-v1-4"
    assert cfg.output_dir == f"./outputs/{name}"
    td, vd = cfg.train_data, cfg.validation_data
    assert (td.video_path, td.prompt) == (f"./data/{name}.mp4", prompt)
    assert (td.width, td.height, td.sample_start_idx) == (512, 512, 0)
    assert (td.n_sample_frames, td.sample_frame_rate) == (frames, rate)
    assert vd.video_length == frames
    assert len(vd.prompts) == n_prompts and a_prompt in vd.prompts
    assert (vd.width, vd.height, vd.num_inference_steps, vd.guidance_scale) == (512, 512, 50, 12.5)
    assert vd.use_inv_latent is True and vd.num_inv_steps == 50
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == pytest.approx(3e-5)
    assert (cfg.train_batch_size, cfg.max_train_steps) == (1, 500)
    assert (cfg.checkpointing_steps, cfg.validation_steps, cfg.seed) == (1000, 100, 33)
    assert cfg.trainable_modules == ["attn1.to_q", "attn2.to_q", "attn_temp"]
    assert type(cfg.trainable_modules) is list
    assert cfg.mixed_precision == "fp16"
    assert cfg.use_8bit_adam is False
    assert cfg.gradient_checkpointing is True and cfg.enable_xformers_memory_efficient_attention is True


def test_schema_has_the_original_keys_plus_the_new_ones():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names == ORIGINAL_KEYS | {"overwrite", "checkpoints_total_limit", "spatial_attention"}


def test_original_config_text_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, ORIGINAL_MAN_SKIING, "man-skiing.yaml"))
    # PyYAML would return "3e-5" as a string; OmegaConf + the float schema must give a float.
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 3e-5
    assert cfg.train_data.video_path == "data/man-skiing.mp4"
    assert cfg.train_data.sample_frame_rate == 2
    assert cfg.trainable_modules == ["attn1.to_q", "attn2.to_q", "attn_temp"]
    assert cfg.mixed_precision == "fp16" and cfg.use_8bit_adam is False
    assert cfg.validation_data.negative_prompt is None


def test_defaults_fill_keys_the_yaml_omits(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.scale_lr) == ("constant", 0, False)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_weight_decay, cfg.adam_epsilon) == (0.9, 0.999, 1e-2, 1e-8)
    assert (cfg.max_grad_norm, cfg.gradient_accumulation_steps) == (1.0, 1)
    assert (cfg.checkpointing_steps, cfg.validation_steps, cfg.max_train_steps) == (500, 100, 500)
    assert cfg.resume_from_checkpoint is None and cfg.seed is None
    assert cfg.overwrite is False and cfg.checkpoints_total_limit is None
    # the original's defaults: its dataset's 8 frames, its pipeline's guidance 7.5; video_length follows the frames
    assert (cfg.train_data.n_sample_frames, cfg.train_data.sample_frame_rate) == (8, 1)
    assert (cfg.validation_data.guidance_scale, cfg.validation_data.video_length) == (7.5, 8)
    assert (cfg.validation_data.use_inv_latent, cfg.validation_data.num_inv_steps) == (True, 50)
    assert (cfg.train_data.window, cfg.train_data.sample_end_idx, cfg.train_data.fps) == ("fixed", None, None)


def test_overrides_apply_last_and_are_typed():
    cfg = load_config(
        CONFIGS / "man-skiing.yaml",
        [
            "max_train_steps=300",
            "train_data.n_sample_frames=16",
            "validation_data.video_length=16",
            "learning_rate=1e-4",
            "seed=null",
            "checkpoints_total_limit=2",
        ],
    )
    assert cfg.max_train_steps == 300
    assert cfg.train_data.n_sample_frames == 16 and cfg.validation_data.video_length == 16
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.seed is None and cfg.checkpoints_total_limit == 2
    assert cfg.train_data.sample_frame_rate == 2  # untouched keys keep the file's value


def test_bare_no_for_mixed_precision_means_no(tmp_path):
    # YAML 1.1 reads a bare `no` as False; accelerate spells "no precision" as "no".
    assert load_config(write(tmp_path, MINIMAL + "mixed_precision: no\n")).mixed_precision == "no"
    assert load_config(write(tmp_path, MINIMAL), ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(write(tmp_path, MINIMAL + "mixed_precision: null\n")).mixed_precision is None


def test_typo_names_full_key_and_suggestion(tmp_path):
    text = ORIGINAL_MAN_SKIING.replace("n_sample_frames: 24", "n_sample_frame: 24")
    message = expect_error(write(tmp_path, text, "x.yaml"))
    assert message.startswith(f"{tmp_path / 'x.yaml'}: 'train_data.n_sample_frame': Key 'n_sample_frame' not in "
                              "'TrainDataConfig'. Did you mean one of: 'n_sample_frames'"), message


def test_top_level_typo_and_unrelated_key(tmp_path):
    message = expect_error(write(tmp_path, MINIMAL + "max_train_step: 10\n"))
    assert "'max_train_step'" in message and "Did you mean: 'max_train_steps'?" in message
    # nothing close: the keys allowed there are listed
    message = expect_error(write(tmp_path, MINIMAL.replace("  prompt: a clip\n", "  prompt: a clip\n  zzz: 1\n")))
    assert "'train_data.zzz': Key 'zzz' not in 'TrainDataConfig'; valid keys here: video_path, prompt, width" in message


def test_typo_in_override_names_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"^override 'max_train_step=10': 'max_train_step': Key 'max_train_step' not "
                                          r"in 'TrainConfig'. Did you mean: 'max_train_steps'\?$"):
        load_config(CONFIGS / "man-skiing.yaml", ["max_train_step=10"])
    with pytest.raises(ConfigError, match=r"'train_data.sample_frame_rte': .*Did you mean one of: 'sample_frame_rate'"):
        load_config(CONFIGS / "man-skiing.yaml", ["train_data.sample_frame_rte=1"])


# OmegaConf's own messages, after the full key: what was given and the type allowed
@pytest.mark.parametrize(
    "extra, expected",
    [
        ("max_train_steps: many\n", "'max_train_steps': Value 'many' of type 'str' could not be converted to Integer"),
        ("learning_rate: fast\n", "'learning_rate': Value 'fast' of type 'str' could not be converted to Float"),
        ("seed: 1.5\n", "'seed': Value '1.5' of type 'float' could not be converted to Integer"),
        ("use_8bit_adam: perhaps\n", "'use_8bit_adam': Value 'perhaps' is not a valid bool"),
        ("trainable_modules: attn1\n", "'trainable_modules': Invalid value assigned: AnyNode is not a ListConfig"),
    ],
)
def test_wrong_type_names_key_given_and_expected_type(tmp_path, extra, expected):
    assert expected in expect_error(write(tmp_path, MINIMAL + extra))


def test_wrong_type_in_nested_section(tmp_path):
    text = MINIMAL.replace("  prompt: a clip\n", "  prompt: a clip\n  n_sample_frames: 2.5\n")
    message = expect_error(write(tmp_path, text))
    assert "'train_data.n_sample_frames': Value '2.5' of type 'float' could not be converted to Integer" in message


def test_malformed_override_is_named():
    with pytest.raises(ConfigError, match=r"^override 'seed=\[': "):
        load_config(CONFIGS / "man-skiing.yaml", ["max_train_steps=3", "seed=["])


def test_wrong_type_in_override():
    with pytest.raises(ConfigError, match=r"^override 'validation_data.guidance_scale=high': "
                                          r"'validation_data.guidance_scale': Value 'high' .* converted to Float$"):
        load_config(CONFIGS / "car-turn.yaml", ["validation_data.guidance_scale=high"])


def test_a_value_of_the_wrong_shape_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'trainable_modules=\{a: b\}': a list and a mapping cannot "
                                          r"replace each other: trainable_modules is a list"):
        load_config(CONFIGS / "car-turn.yaml", ["trainable_modules={a: b}"])
    # validation_data.prompts may be either shape, but an override cannot turn one into the other
    with pytest.raises(ConfigError, match=r"^override 'validation_data.prompts=\{style: a\}': a list and a mapping "
                                          r"cannot replace each other"):
        load_config(CONFIGS / "car-turn.yaml", ["validation_data.prompts={style: a}"])
    assert "trainable_modules is a list" in expect_error(write(tmp_path, MINIMAL + "trainable_modules: {a: b}\n"))


@pytest.mark.parametrize(
    "drop, key",
    [("pretrained_model_path: ./model\n", "pretrained_model_path"), ("  prompt: a clip\n", "train_data.prompt")],
)
def test_missing_required_value_names_key(tmp_path, drop, key):
    message = expect_error(write(tmp_path, MINIMAL.replace(drop, "")))
    assert f"'{key}': Structured config of type" in message and "missing mandatory value" in message


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    assert "invalid YAML" in expect_error(write(tmp_path, "train_data: [\n"))
    assert "must be a mapping" in expect_error(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train_data.n_sample_frames=0", "train_data.n_sample_frames=0"),
        ("train_data.sample_frame_rate=0", "train_data.sample_frame_rate=0"),
        ("mixed_precision=fp32", "mixed_precision='fp32'"),
        ("train_data.width=500", "train_data.width=500"),
        ("train_data.window=sliding", "train_data.window='sliding'"),
        ("train_data.sample_end_idx=0", "train_data.sample_end_idx=0"),
        ("validation_data.guidance_scale=nan", "validation_data.guidance_scale=nan"),
        ("validation_data.video_length=8", "validation_data.video_length=8"),
        ("learning_rate=0", "learning_rate=0.0"),
        ("checkpoints_total_limit=0", "checkpoints_total_limit=0"),
        ("spatial_attention=full", "spatial_attention='full'"),
        ("trainable_modules=[]", "trainable_modules=[]"),
        ("spatial_attention=frame0", "spatial_attention='frame0'"),
    ],
)
def test_obviously_bad_values_are_rejected(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "man-skiing.yaml", [override])
    assert key in str(info.value) and "man-skiing.yaml" in str(info.value)


def test_bad_values_name_key_given_and_allowed():
    for override, message in [
        ("spatial_attention=full", "spatial_attention='full' must be one of sparse_causal, first_frame"),
        ("mixed_precision=fp32", "mixed_precision='fp32' must be one of fp16, bf16, no, null"),
        ("train_data.width=500", "train_data.width=500 must be a positive multiple of 8"),
        ("train_data.sample_end_idx=3",
         "train_data.sample_end_idx=3 must be > sample_start_idx=3, or null for the end of the clip"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(CONFIGS / "man-skiing.yaml", ["train_data.sample_start_idx=3", override])
        assert str(info.value) == f"{CONFIGS / 'man-skiing.yaml'}: {message}"


def test_spatial_attention_defaults_to_tune_a_video_and_takes_video_p2p():
    assert load_config(CONFIGS / "man-skiing.yaml").spatial_attention == "sparse_causal"
    assert load_config(CONFIGS / "man-skiing.yaml", ["spatial_attention=first_frame"]).spatial_attention == "first_frame"


def test_video_length_may_differ_without_inversion():
    cfg = load_config(
        CONFIGS / "man-skiing.yaml", ["validation_data.use_inv_latent=false", "validation_data.video_length=8"]
    )
    assert cfg.validation_data.video_length == 8


def test_validation_width_and_height_are_accepted_and_not_checked():
    # kept so that old configs load; samples have the tuned frames' size
    cfg = load_config(CONFIGS / "man-skiing.yaml", ["validation_data.height=100", "validation_data.width=3"])
    assert (cfg.validation_data.width, cfg.validation_data.height) == (3, 100)


LOVEU_CONFIG = """\
pretrained_model_path: ./checkpoints/stable-diffusion-v1-4
output_dir: ./outputs/loveu-tgve-2023/DAVIS_480p/bmx-rider
train_data:
  video_path: ./data/loveu-tgve-2023/DAVIS_480p/480p_frames/bmx-rider
  prompt: A person does a trick on a BMX bike at a skatepark.
  height: 480
  width: 480
  num_frames: 32
  frame_rate: 1
validation_data:
  prompts:
    style: A person does a trick on a BMX bike at a skatepark, grayscale.
    object: A person does a trick on a unicycle at a skatepark.
  height: 480
  width: 480
  num_inference_steps: 50
  guidance_scale: 12.5
  use_inv_latent: true
  num_inv_steps: 50
learning_rate: 3.0e-05
max_train_steps: 500
checkpointing_steps: 100
validation_steps: 100
seed: 33
mixed_precision: fp16
"""


def test_the_loveu_benchmark_keys_load_as_written(tmp_path):
    cfg = load_config(write(tmp_path, LOVEU_CONFIG))
    td, vd = cfg.train_data, cfg.validation_data
    assert (td.n_sample_frames, td.sample_frame_rate, td.window) == (32, 1, "random")
    assert (td.width, td.height) == (480, 480) and vd.video_length == 32
    assert validation_prompts(vd) == [("style", "A person does a trick on a BMX bike at a skatepark, grayscale."),
                                      ("object", "A person does a trick on a unicycle at a skatepark.")]
    # an explicit window wins over the benchmark's random one
    assert load_config(write(tmp_path, LOVEU_CONFIG), ["train_data.window=fixed"]).train_data.window == "fixed"


def test_an_alias_and_its_name_together_are_refused(tmp_path):
    text = LOVEU_CONFIG.replace("  num_frames: 32\n", "  num_frames: 32\n  n_sample_frames: 8\n")
    assert "train_data.num_frames and train_data.n_sample_frames name the same setting" in expect_error(
        write(tmp_path, text))


@pytest.mark.parametrize("prompts", ["prompts: 3", "prompts: [1, 2]", "prompts: {style: [a]}", "prompts: {}"])
def test_prompts_must_be_a_list_or_a_mapping_of_prompts(tmp_path, prompts):
    message = expect_error(write(tmp_path, MINIMAL.replace('prompts: ["a prompt"]', prompts)))
    assert "validation_data.prompts=" in message and "must be a list of prompts, or a mapping" in message


@pytest.mark.parametrize("seed", [-1, 2**32, 2**80])
def test_a_seed_outside_0_to_2_32_minus_1_is_one_line(tmp_path, seed):
    path = tmp_path / "tune.yaml"
    path.write_text((CONFIGS / "man-skiing.yaml").read_text().replace("seed: 33", f"seed: {seed}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: seed={seed} must be a whole number from 0 to 4294967295 (2**32 - 1), or null"


def test_seeds_0_and_2_32_minus_1_are_taken():
    seeds = [0, 2**32 - 1]
    assert [load_config(CONFIGS / "man-skiing.yaml", [f"seed={seed}"]).seed for seed in seeds] == seeds
