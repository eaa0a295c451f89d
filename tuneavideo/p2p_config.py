"""Video-P2P's edit configs (`configs/*-p2p.yaml` of dvlab-research/Video-P2P) and its frames.

A config holds the keys its `run_videop2p.py` `main()` takes; `load_p2p_config` reads one into a `P2PConfig`, with a
one-line `ConfigError` for anything that cannot work. `read_p2p_frames` reads its `image_path` as it does: the
first `video_len` images sorted by the number in their names, centre-cropped to a square, resized to 512x512.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from .config import ConfigError
from .errors import first_line
from .request import LocalEdit
from .run import INVERSION
from .video.readers import VideoReadError, frames_text, image_files, load_image
from .video.writers import PROMPT_NAME_BYTES, prompt_file_name

# every key of Video-P2P's main(), besides its --fast flag
P2P_KEYS = ("pretrained_model_path", "image_path", "prompt", "prompts", "blend_word", "eq_params", "save_name",
            "is_word_swap", "cross_replace_steps", "self_replace_steps", "video_len", "mixed_precision")
P2P_MIXED_PRECISION = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class P2PConfig:
    """One Video-P2P edit: the source clip and prompt, the target prompt, and how attention is controlled."""

    image_path: str  # folder of frames
    source_prompt: str  # `prompts[0]`: the source branch
    target_prompt: str  # `prompts[1]`: the edit
    inversion_prompt: str  # `prompt`: what the clip is inverted with (Video-P2P's configs repeat prompts[0])
    # these have the names and defaults of `request.LocalEdit`'s, which `local_edit` makes of them
    control: str  # "replace" (`is_word_swap: true`, same word count) or "refine"
    blend_words: tuple[str, str] | None = None  # `blend_word`: (word of the source prompt, of the target prompt)
    reweights: dict[str, float] = field(default_factory=dict)  # `eq_params`: target prompt word -> factor
    cross_replace_steps: float = LocalEdit.cross_replace_steps
    self_replace_steps: float = LocalEdit.self_replace_steps
    video_len: int = 8
    save_name: str = "edit"
    pretrained_model_path: str | None = None  # the tuned run folder
    mixed_precision: str = "fp32"

    def local_edit(self, fast: bool, null_text_iterations: int = LocalEdit.null_text_iterations) -> LocalEdit:
        """The config's attention control: DDIM inversion with `fast` (its --fast), else null-text."""
        return LocalEdit(self.control, self.source_prompt, self.blend_words, self.reweights,
                         self.cross_replace_steps, self.self_replace_steps,
                         inversion="ddim" if fast else "null-text", null_text_iterations=null_text_iterations)


def load_p2p_config(path: str | os.PathLike) -> P2PConfig:
    """Read a Video-P2P `*-p2p.yaml` (with OmegaConf, as it does).

    Raises:
        ConfigError: a missing or unreadable file, bad YAML, an unknown or missing key, or a value that cannot work
            (prompts not `[source, target]`, a blend or reweighted word not in its prompt, a word swap between
            prompts of different lengths, a step fraction outside [0, 1], ...).
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ConfigError(f"Video-P2P config not found: {source}")
    try:
        values = OmegaConf.to_container(OmegaConf.load(source), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, OSError, UnicodeError) as err:
        raise ConfigError(f"{source}: cannot be read as YAML ({first_line(err)})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: must be a mapping of keys such as image_path, prompts, is_word_swap")

    def fail(key: str, rule: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={values.get(key)!r} {rule}")

    unknown = [key for key in values if key not in P2P_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; Video-P2P configs take {', '.join(P2P_KEYS)}")
    if "image_path" not in values:
        raise ConfigError(f"{source}: missing image_path (the folder of the source clip's frames)")
    prompts = values.get("prompts")
    if not (isinstance(prompts, list) and len(prompts) == 2 and all(isinstance(p, str) and p.strip() for p in prompts)):
        raise fail("prompts", "must be a list of two prompts: [source, target]")
    source_prompt, target_prompt = prompts
    is_word_swap = values.get("is_word_swap", False)
    if not isinstance(is_word_swap, bool):
        raise fail("is_word_swap", "must be true (swap words) or false (refine: add or change words)")
    if is_word_swap and len(source_prompt.split(" ")) != len(target_prompt.split(" ")):
        raise fail("is_word_swap", "needs prompts with the same number of words; set it to false to refine")

    blend_words = values.get("blend_word")
    if blend_words is not None:
        if not (isinstance(blend_words, list) and len(blend_words) == 2
                and all(isinstance(word, str) for word in blend_words)):
            raise fail("blend_word", "must be a list of two words: [word of the source prompt, word of the target]")
        for word, prompt in zip(blend_words, prompts):
            if word not in prompt.split(" "):
                raise fail("blend_word", f"names {word!r}, which is not a word of {prompt!r}")
        blend_words = tuple(blend_words)

    eq_params = values.get("eq_params") or {}
    words = eq_params.get("words", []) if isinstance(eq_params, dict) else None
    factors = eq_params.get("values", []) if isinstance(eq_params, dict) else None
    if not (isinstance(words, list) and isinstance(factors, list) and len(words) == len(factors)
            and all(isinstance(w, str) for w in words)
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors)):
        raise fail("eq_params", "must be {words: [...], values: [...]}, one number per word")
    for word in words:
        if word not in target_prompt.split(" "):
            raise fail("eq_params", f"reweights {word!r}, which is not a word of the target prompt {target_prompt!r}")

    numbers = {"cross_replace_steps": LocalEdit.cross_replace_steps,
               "self_replace_steps": LocalEdit.self_replace_steps}
    for key in numbers:
        value = values.get(key, numbers[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise fail(key, "must be a fraction of the steps in [0, 1]")
        numbers[key] = float(value)
    video_len = values.get("video_len", 8)
    if isinstance(video_len, bool) or not isinstance(video_len, int) or video_len < 1:
        raise fail("video_len", "must be a whole number of frames >= 1")
    mixed_precision = values.get("mixed_precision", "fp32")
    if mixed_precision not in P2P_MIXED_PRECISION:
        raise fail("mixed_precision", f"must be one of {', '.join(P2P_MIXED_PRECISION)}")
    for key in ("image_path", "prompt", "save_name", "pretrained_model_path"):
        if key in values and not isinstance(values[key], str):
            raise fail(key, "must be a string")
    # a config comes from anyone: its save_name names files in <run>/results/, never a path, and not the inversion's
    save_name = values.get("save_name", "edit")
    if save_name != prompt_file_name(save_name):
        raise fail("save_name", f"must be a plain file name (no folders, no control characters, not . or .., at most "
                   f"{PROMPT_NAME_BYTES} bytes)")
    if save_name in (INVERSION, f"{INVERSION}_fast"):
        raise fail("save_name", f"would overwrite the inversion's own files ({INVERSION}[_fast].gif); choose "
                   "another name")

    return P2PConfig(
        image_path=values["image_path"],
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        inversion_prompt=values.get("prompt", source_prompt),
        control="replace" if is_word_swap else "refine",
        blend_words=blend_words,
        reweights={word: float(factor) for word, factor in zip(words, factors)},
        video_len=video_len,
        save_name=save_name,
        pretrained_model_path=values.get("pretrained_model_path"),
        mixed_precision=mixed_precision,
        **numbers,
    )


def read_p2p_frames(image_path: str | os.PathLike, video_len: int = 8, size: int = 512) -> np.ndarray:
    """The frames Video-P2P edits: the first `video_len` images of the folder in the order of the numbers in their
    names, each centre-cropped to a square and resized to `size` x `size` with Pillow (bicubic, Pillow's default),
    as uint8 `(video_len, size, size, 3)`. (Its tuning sorts by number too; its edit script sorts names as text,
    which agrees for its clips, `1.jpg` ... `8.jpg`, and would put `10.jpg` before `2.jpg`.)

    Raises:
        VideoReadError: no such folder, no images in it, fewer than `video_len`, or one that does not decode.
    """
    folder = os.fspath(image_path)
    if not os.path.isdir(folder):
        raise VideoReadError(f"{folder}: no such folder of frames; check image_path")
    files = image_files(folder)  # in the order of the numbers in the names
    if len(files) < video_len:
        raise VideoReadError(f"{folder}: holds {frames_text(len(files))}, fewer than video_len={video_len}")
    frames = []
    for file in files[:video_len]:
        image = load_image(file)
        width, height = image.size
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = image.crop((left, top, left + side, top + side))
        frames.append(np.asarray(square.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(frames)
