"""Video-P2P's configs: its rabbit-jump edit config through `load_p2p_config`, its tune config through
`load_config`, the one-line errors, and its frames read as it reads them."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneavideo.config import ConfigError, load_config
from tuneavideo.errors import UserError
from tuneavideo.p2p_config import P2P_KEYS, P2PConfig, load_p2p_config, read_p2p_frames
from tuneavideo.request import LocalEdit
from tuneavideo.video.readers import VideoReadError

CONFIGS = Path(__file__).parent / "p2p_configs"
RABBIT = (CONFIGS / "rabbit-jump-p2p.yaml").read_text()


def write(tmp_path, text, name="edit-p2p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_videop2p_rabbit_edit_config_loads():
    cfg = load_p2p_config(CONFIGS / "rabbit-jump-p2p.yaml")
    assert cfg == P2PConfig(
        image_path="./data/rabbit",
        source_prompt="a rabbit is jumping on the grass",
        target_prompt="a origami rabbit is jumping on the grass",
        inversion_prompt="a rabbit is jumping on the grass",
        control="refine",
        blend_words=("rabbit", "rabbit"),
        reweights={"origami": 2.0},
        cross_replace_steps=0.2,
        self_replace_steps=0.5,
        video_len=8,
        save_name="origami",
        pretrained_model_path="./outputs/rabbit-jump",
        mixed_precision="fp32",
    )


def test_a_config_is_the_request_s_local_edit_with_its_names_and_defaults(tmp_path):
    cfg = load_p2p_config(CONFIGS / "rabbit-jump-p2p.yaml")
    assert cfg.local_edit(fast=True) == LocalEdit("refine", "a rabbit is jumping on the grass", ("rabbit", "rabbit"),
                                                  {"origami": 2.0}, 0.2, 0.5, inversion="ddim")
    assert cfg.local_edit(fast=False, null_text_iterations=3).inversion == "null-text"
    defaults = load_p2p_config(write(tmp_path, 'image_path: f\nprompts: ["a cat", "a dog"]\n')).local_edit(False)
    assert defaults == LocalEdit(source_prompt="a cat")  # Video-P2P's defaults are the request's


def test_videop2p_rabbit_tune_config_loads_unchanged_as_a_tune_a_video_config():
    cfg = load_config(CONFIGS / "rabbit-jump-tune.yaml")
    assert cfg.train_data.video_path == "./data/rabbit" and cfg.train_data.n_sample_frames == 8
    assert cfg.train_data.prompt == "a rabbit is jumping on the grass"
    assert cfg.validation_data.prompts == ["a origami rabbit is jumping on the grass"]
    assert (cfg.learning_rate, cfg.max_train_steps, cfg.seed) == (3e-5, 500, 33)
    assert cfg.trainable_modules == ["attn1.to_q", "attn2.to_q", "attn_temp"]
    # the file cannot say that Video-P2P tuned with its first-frame attention
    assert cfg.spatial_attention == "sparse_causal"
    assert load_config(CONFIGS / "rabbit-jump-tune.yaml", ["spatial_attention=first_frame"]).spatial_attention \
        == "first_frame"


def test_every_key_of_videop2p_main_is_taken(tmp_path):
    text = """
pretrained_model_path: run
image_path: frames
prompt: "a car is driving on the road"
prompts: ["a car is driving on the road", "a car is driving on the railway"]
blend_word: [road, railway]
eq_params: {words: [railway], values: [2]}
save_name: railway
is_word_swap: True
cross_replace_steps: 0.8
self_replace_steps: 0.7
video_len: 6
mixed_precision: fp16
"""
    cfg = load_p2p_config(write(tmp_path, text))
    assert set(P2P_KEYS) == {line.split(":")[0] for line in text.strip().splitlines()}
    assert cfg.control == "replace" and cfg.blend_words == ("road", "railway") and cfg.reweights == {"railway": 2.0}
    assert (cfg.cross_replace_steps, cfg.self_replace_steps, cfg.video_len, cfg.mixed_precision) == (0.8, 0.7, 6,
                                                                                                     "fp16")


def test_optional_keys_take_videop2p_defaults(tmp_path):
    cfg = load_p2p_config(write(tmp_path, 'image_path: f\nprompts: ["a cat", "a dog"]\n'))
    assert (cfg.inversion_prompt, cfg.control, cfg.blend_words, cfg.reweights) == ("a cat", "refine", None, {})
    assert (cfg.cross_replace_steps, cfg.self_replace_steps, cfg.video_len) == (0.2, 0.5, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.replace('image_path: "./data/rabbit"\n', ""), "missing image_path"),
        (lambda t: t + "\nguidance_scale: 7.5\n", "unknown key 'guidance_scale'; Video-P2P configs take "
         + ", ".join(P2P_KEYS)),
        (lambda t: t.replace('  - "a origami rabbit is jumping on the grass"\n', ""),
         "prompts=['a rabbit is jumping on the grass'] must be a list of two prompts: [source, target]"),
        (lambda t: t.replace("prompts:\n  -", "prompts:\n  source:").replace('\n  - "a origami', '\n  target: "a'),
         "prompts={'source': 'a rabbit is jumping on the grass', 'target': 'a rabbit is jumping on the grass'} must "
         "be a list of two prompts: [source, target]"),
        (lambda t: t.replace("is_word_swap: False", "is_word_swap: True"),
         "needs prompts with the same number of words"),
        (lambda t: t.replace("  - 'rabbit'\n  - 'rabbit'", "  - 'rabbit'\n  - 'hare'"),
         "names 'hare', which is not a word of 'a origami rabbit is jumping on the grass'"),
        (lambda t: t.replace('    - "origami"', '    - "paper"'),
         "reweights 'paper', which is not a word of the target"),
        (lambda t: t.replace("    - 2", "    - two"), "must be {words: [...], values: [...]}, one number per word"),
        (lambda t: t + "\ncross_replace_steps: 2\n", "cross_replace_steps=2 must be a fraction of the steps in [0, 1]"),
        (lambda t: t + "\nvideo_len: 0\n", "video_len=0 must be a whole number of frames >= 1"),
        (lambda t: t + "\nmixed_precision: fp8\n", "mixed_precision='fp8' must be one of fp32, fp16, bf16"),
        (lambda t: t.replace('save_name: "origami"', 'save_name: "../../../../elsewhere/x"'),
         "save_name='../../../../elsewhere/x' must be a plain file name (no folders"),
        (lambda t: t.replace('save_name: "origami"', 'save_name: "sub/dir/x"'), "save_name='sub/dir/x' must be a plain"),
        (lambda t: t.replace('save_name: "origami"', 'save_name: ".."'), "save_name='..' must be a plain file name"),
        (lambda t: t.replace('save_name: "origami"', f'save_name: "{"x" * 201}"'), "at most 200 bytes"),
        (lambda t: t.replace('save_name: "origami"', 'save_name: "inversion"'),
         "save_name='inversion' would overwrite the inversion's own files"),
        (lambda t: t.replace('save_name: "origami"', 'save_name: "inversion_fast"'), "would overwrite the inversion"),
        (lambda t: "[1, 2]", "must be a mapping of keys"),
        (lambda t: "a: [", "cannot be read as YAML"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_file_and_key(tmp_path, change, message):
    path = write(tmp_path, change(RABBIT))
    with pytest.raises(ConfigError) as info:
        load_p2p_config(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    assert isinstance(info.value, UserError)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="Video-P2P config not found: .*nope.yaml"):
        load_p2p_config(tmp_path / "nope.yaml")


def _frame(index, width=40, height=24):
    """A frame whose colours say its index, with a left-to-right ramp that a wrong crop would show."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 10 * index
    image[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    image[..., 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return image


def test_frames_are_read_in_number_order_centre_cropped_and_resized_with_pillow(tmp_path):
    folder = tmp_path / "rabbit"
    folder.mkdir()
    for index in range(1, 13):  # 1.jpg ... 12.jpg, PNG data so the pixels are exact
        Image.fromarray(_frame(index)).save(folder / f"{index}.jpg", format="PNG")
    (folder / "notes.txt").write_text("not a frame")
    frames = read_p2p_frames(folder, video_len=10, size=32)
    assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
    # 10.jpg after 9.jpg (a text sort would give 1, 10, 11, 12, 2, ...)
    assert [int(round(f[..., 0].mean() / 10)) for f in frames] == list(range(1, 11))
    # Video-P2P's load_512_seq: the centre square, then Pillow's default resize
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(_frame(3)[:, 8:32])).resize((32, 32)))
    assert np.array_equal(frames[2], expected)
    # a portrait frame is cropped from its middle rows
    Image.fromarray(_frame(1, width=24, height=40)).save(folder / "1.jpg", format="PNG")
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(_frame(1, width=24, height=40)[8:32])).resize((32, 32)))
    assert np.array_equal(read_p2p_frames(folder, 1, size=32)[0], expected)


def test_the_default_is_eight_frames_of_512(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(1, 9):
        Image.fromarray(_frame(index)).save(folder / f"{index}.jpg")
    assert read_p2p_frames(folder).shape == (8, 512, 512, 3)


def test_too_few_frames_or_no_folder_is_one_line(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(_frame(1)).save(folder / "1.jpg")
    with pytest.raises(VideoReadError, match="holds 1 frame, fewer than video_len=8"):
        read_p2p_frames(folder)
    with pytest.raises(VideoReadError, match="no such folder of frames"):
        read_p2p_frames(tmp_path / "missing")
