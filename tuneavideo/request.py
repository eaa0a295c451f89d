"""What an edit is asked to make: one `EditRequest` (with its `LocalEdit` for Video-P2P's attention control), the one
shape every caller builds: `inference.py` from its flags (each flag's default and help are a field's), a Video-P2P
config (`p2p_config.P2PConfig.request`), the web app (a `request.json` handed whole to `inference.py --request`),
the benchmarks and tests from Python.

Every default is written once, next to its field, with its reason; `check` rejects what cannot work before any
model loads, with one-line `RequestError`s that name the fields in backticks (`` `num_inference_steps` ``), which
the command line turns into its flag names.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .base_model import check_loras
from .config import MAX_SEED, ControlNetConfig, LoraFile
from .errors import UserError
from .pipelines.local_edit import LocalLatents, invert_and_edit
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from .pipelines.prompt_alignment import CONTROLS, PromptEdit, prompt_edit
from .run import SHARED_KINDS
from .structure import check_structure
from .video.conditions import CANNY_THRESHOLDS, check_canny_thresholds
from .video.writers import prompt_file_name

GUIDANCE_SCALE = 12.5  # Tune-A-Video's: its configs' and notebook's edits
LOCAL_GUIDANCE_SCALE = 7.5  # Video-P2P's: its null-text inversion is optimised for it
INVERSIONS = ("null-text", "ddim")  # ddim: Video-P2P's fast mode (its --fast), DDIM inversion only

Span = tuple[Fraction | None, Fraction | None]  # seconds [start, end) of the source; None: its start / its end


class RequestError(UserError):
    """A request that cannot work; the message is one line and names fields in backticks."""


def setting(default, help: str):
    """A field with its default and the help the command line shows for it."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LocalEdit:
    """A local edit (Video-P2P's attention control, Prompt-to-Prompt on a tuned clip): every prompt edits the source
    prompt, re-using its attention maps. The defaults are Video-P2P's (its `run_videop2p.py` and configs)."""

    control: str = setting("refine", "replace: swap words one for one; refine: add or change words")
    source_prompt: str | None = setting(None, "the source branch's prompt (default: the tuned prompt)")
    # (word of the source prompt, word of each prompt): change only where that word is
    blend_words: tuple[str, str] | None = setting(None, "WORD or SOURCE_WORD:TARGET_WORD: change only where that "
                                                        "word is (local blend; default: the whole frame)")
    reweights: dict[str, float] = setting({}, "WORD=FACTOR: scale the attention to a word of the prompt "
                                              "(repeatable; a finite factor, 0 removes the word)")
    cross_replace_steps: float = setting(0.2, "fraction of the steps with the source's cross-attention "
                                              "(default: 0.2, Video-P2P's configs')")
    self_replace_steps: float = setting(0.5, "fraction of the steps with the source's temporal attention "
                                             "(default: 0.5, Video-P2P's configs')")
    # Video-P2P starts its local blend once cross-attention replacement ends (its `start_blend` 0.2)
    blend_start: float = setting(0.2, "fraction of the steps before the local blend starts (default: 0.2)")
    mask_threshold: float = setting(0.3, "the blend word's attention, relative to its peak, that the mask takes, "
                                         "in (0, 1) (default: 0.3, Video-P2P's)")
    inversion: str = setting("null-text", "null-text (default, Video-P2P's; needs as many inference as inversion "
                                          "steps) or ddim (Video-P2P's --fast)")
    null_text_iterations: int = setting(10, "most optimiser iterations per step of null-text inversion "
                                            "(default: 10, Video-P2P's)")

    def plan(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], tuned_prompt: str) -> LocalPlan:
        """The attention control of every prompt (`check`ed settings), its words checked against the prompts with
        `tokenizer` (one-line `PromptControlError`s)."""
        source = self.source_prompt or tuned_prompt
        edits = [prompt_edit(tokenizer, source, prompt, self.control, self.reweights, self.blend_words)
                 for prompt in prompts]
        return LocalPlan(self, source, edits)

    def check(self, num_inference_steps: int, num_inv_steps: int) -> None:
        """Reject settings that cannot work, whatever the prompts (their words are checked by the plan)."""
        for name, choices in (("control", CONTROLS), ("inversion", INVERSIONS)):
            if getattr(self, name) not in choices:
                raise RequestError(f"`{name}` must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.inversion == "null-text" and num_inference_steps != num_inv_steps:
            raise RequestError(f"`inversion` null-text gives one embedding per inversion step: give "
                               f"`num_inference_steps` equal to `num_inv_steps` ({num_inference_steps} != "
                               f"{num_inv_steps}), or `inversion` ddim")
        for name in ("cross_replace_steps", "self_replace_steps", "blend_start", "mask_threshold"):
            value, exclusive = getattr(self, name), name == "mask_threshold"
            inside = 0 < value < 1 if exclusive else 0 <= value <= 1
            if not inside:
                raise RequestError(f"`{name}` must be in {'(0, 1)' if exclusive else '[0, 1]'}, got {value}")
        # any finite factor; a negative one is meant: it turns away from the word (Prompt-to-Prompt's examples use -1)
        for word, factor in self.reweights.items():
            if not math.isfinite(factor):
                raise RequestError(f"`reweights` {word}={factor}: the factor must be a finite number")
        if self.null_text_iterations < 1:
            raise RequestError(f"`null_text_iterations` must be >= 1, got {self.null_text_iterations}")


@dataclass
class LocalPlan:
    """A checked local edit: its settings, the source prompt and each prompt's `PromptEdit`."""

    settings: LocalEdit
    source_prompt: str
    edits: list[PromptEdit]

    def invert_and_edit(self, pipe: TuneAVideoPipeline, clean: torch.Tensor, prompts: list[str],
                        num_inference_steps: int, num_inv_steps: int, guidance_scale: float, window: int | None,
                        overlap: int | None, progress: Callable[..., None], inversion_prompt: str | None = None,
                        control: dict | None = None, control_inversion: bool = True) -> LocalLatents:
        """`pipelines.local_edit.invert_and_edit` of the clean latent `clean` with these settings (`control`: the
        pipeline's structure guidance arguments, for the inversions too with `control_inversion`)."""
        settings = self.settings
        null_text = settings.null_text_iterations if settings.inversion == "null-text" else None
        return invert_and_edit(pipe, clean, self.source_prompt, prompts, self.edits, num_inference_steps,
                               num_inv_steps, guidance_scale, window, overlap, progress, null_text_iterations=null_text,
                               cross_replace_steps=settings.cross_replace_steps,
                               self_replace_steps=settings.self_replace_steps, blend_start=settings.blend_start,
                               mask_threshold=settings.mask_threshold, inversion_prompt=inversion_prompt,
                               control=control, control_inversion=control_inversion)


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (a tokenizer's and a file name's text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class EditRequest:
    """What to make from a run. The defaults are the original Tune-A-Video's edit (50 DDIM steps and 50 inversion
    steps, deterministic DDIM, the tuned window); with `local`, Video-P2P's."""

    prompts: list[str] = setting([], "what the clip should become (repeatable)")
    negative_prompt: str | None = setting(None, "what to steer away from (default: none)")
    seed: int | None = setting(None, "random seed (default: the run's, else 0)")
    num_inference_steps: int = setting(50, "DDIM sampling steps (default: 50, the original's)")
    # None: GUIDANCE_SCALE, or LOCAL_GUIDANCE_SCALE with `local` (`guidance`)
    guidance_scale: float | None = setting(None, f"classifier-free guidance (default: {GUIDANCE_SCALE:g}, "
                                                 f"Tune-A-Video's; {LOCAL_GUIDANCE_SCALE:g}, Video-P2P's, in a "
                                                 "local edit)")
    num_inv_steps: int = setting(50, "DDIM inversion steps (default: 50); a cached inversion with this many is "
                                     "reused")
    num_videos_per_prompt: int = setting(1, "videos per prompt (default: 1)")
    eta: float = setting(0.0, "DDIM eta (default: 0, deterministic); > 0 makes seeded variations")
    span: Span | None = setting(None, "what to edit: all, or START:END seconds of the source, either side "
                                      "optional (default: the tuned frames)")
    stride: int | None = setting(None, "source frames per edited frame; 1 = every frame (default: the tuned "
                                       "sample_frame_rate)")
    window: int | None = setting(None, "frames per UNet call over a long span (default: the tuned "
                                       "n_sample_frames)")
    overlap: int | None = setting(None, "frames shared by neighbouring windows (default: a quarter window)")
    output_dir: str | None = setting(None, "where to write (default: <run>/edits)")  # a Path is taken too
    audio: bool = setting(True, "the MP4s carry the source's sound (default: yes)")
    evaluate: bool = setting(False, "score every edit and the source with the LOVEU-TGVE metrics into "
                                    "<prompts>.metrics.json (needs ./download_models.sh --eval)")
    # the LOVEU-TGVE submission format, scored without the MP4's or the GIF's compression in between
    jpeg_frames: bool = setting(False, "also every edited frame as a JPEG straight from the decoder, "
                                       "<output-dir>/<prompt>/00000.jpg, ...")
    # a GIF costs Pillow seconds per hundred 480x480 frames to quantise
    gif: bool = setting(True, "a GIF of every video of at most 128 frames, too (default: yes)")
    local: LocalEdit | None = setting(None, "attention control (a local edit); None: a plain Tune-A-Video edit")
    # fused by name into the tuned UNet (which keeps the image UNet's layer names) and the text encoder; the clip is
    # then inverted with their weights, not taken from the run's cache
    loras: list[LoraFile] = setting([], "a LoRA (kohya / A1111 or diffusers .safetensors) fused on top of the "
                                        "run's model, times SCALE (default 1; repeatable)")
    # structure guidance (README: "Structure guidance"); None: the ControlNet the run was tuned under, if any
    controlnets: list[ControlNetConfig] | None = setting(None, "ControlNets, each with its condition and scale "
                                                               "(default: the run's own `controlnet:`, if any)")
    # ControlVideo's and VideoGrain's: the sampler then starts from noise made under what it is asked to follow
    controlnet_inversion: bool = setting(True, "invert the clip under the same ControlNets (default: yes)")
    canny_thresholds: tuple[float, float] = setting(CANNY_THRESHOLDS, "LOW:HIGH thresholds of the canny condition "
                                                                      "(default: 100:200, ControlNet's annotator's)")

    @property
    def guidance(self) -> float:
        """The guidance scale the edit uses: the request's, else the default for its kind of edit."""
        if self.guidance_scale is not None:
            return self.guidance_scale
        return LOCAL_GUIDANCE_SCALE if self.local is not None else GUIDANCE_SCALE

    def check(self) -> list[str]:
        """Reject a request that cannot work, before any model loads; returns each video's file stem."""
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise RequestError("give at least one non-empty `prompts`")
        counts = {"num_inference_steps": 1, "num_inv_steps": 1, "num_videos_per_prompt": 1, "stride": 1,
                  "window": 2, "overlap": 0}  # field: smallest allowed (None keeps the default)
        for name, smallest in counts.items():
            value = getattr(self, name)
            if value is not None and value < smallest:
                raise RequestError(f"`{name}` must be >= {smallest}, got {value}")
        if self.span is not None:
            start, end = self.span
            if (start is not None and start < 0) or (start is not None and end is not None and end <= start):
                given = ":".join("" if value is None else f"{float(value):g}" for value in self.span)
                raise RequestError(f"`span` {given!r}: START must be >= 0 and before END")
        texts = [("prompts", prompt) for prompt in self.prompts] + [("negative_prompt", self.negative_prompt)]
        if self.local is not None:
            texts.append(("source_prompt", self.local.source_prompt))
        for name, text in texts:  # Python keeps command-line bytes that are not UTF-8 as lone surrogates
            if text is not None and not is_utf8(text):
                shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise RequestError(f"`{name}` '{shown}': is not UTF-8 text; give it in UTF-8")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise RequestError(f"`seed` must be a whole number from 0 to {MAX_SEED} (2**32 - 1), got {self.seed}")
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise RequestError(f"`guidance_scale` must be a finite number, got {self.guidance_scale}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise RequestError(f"`eta` must be a finite number >= 0, got {self.eta}")
        check_loras(self.loras, "`loras`")
        try:
            check_canny_thresholds(*self.canny_thresholds)
        except UserError as err:
            raise RequestError(f"`canny_thresholds` {self.canny_thresholds[0]:g}:{self.canny_thresholds[1]:g}: "
                               f"{str(err).partition(': ')[2]}") from None
        try:
            check_structure(self.controlnets or [])
        except UserError as err:
            raise RequestError(f"`controlnets` {err}") from None
        for lora in self.loras:
            if not math.isfinite(lora.scale):
                raise RequestError(f"`loras` {lora.path}:{lora.scale}: the scale must be a finite number")
        if self.local is not None:
            for name, off in (("negative_prompt", self.negative_prompt is None), ("eta", self.eta == 0),
                              ("num_videos_per_prompt", self.num_videos_per_prompt == 1)):
                if not off:
                    raise RequestError(f"`{name}` does not apply to a local edit (`control`: one deterministic "
                                       "video per prompt); leave it out")
            self.local.check(self.num_inference_steps, self.num_inv_steps)
            if self.guidance <= 1:  # its source branch is guided against the null-text embeddings
                raise RequestError(f"`guidance_scale` must be above 1 in a local edit, got {self.guidance}")
        names = [prompt_file_name(prompt) for prompt in self.prompts]
        if self.num_videos_per_prompt > 1:
            names = [f"{name}-{index}" for name in names for index in range(self.num_videos_per_prompt)]
        # <stem>.mp4 of a video must not be <edit>.side-by-side.mp4, <edit>.inversion.mp4, <prompt>.mask.mp4, ...
        taken = [name for name in names if names.count(name) > 1 or ("." in name and name.rpartition(".")[2] in
                                                                     SHARED_KINDS)]
        if taken:
            raise RequestError(f"`prompts` would overwrite each other's files (or an edit's side-by-side, inversion, "
                               f"mask or condition: leave out a last .{', .'.join(SHARED_KINDS)}): "
                               f"{sorted(set(taken))}")
        return names

    # --- as a file ---------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the request as JSON (what `inference.py --request` reads)."""
        values = asdict(self)
        values["output_dir"] = None if self.output_dir is None else os.fspath(self.output_dir)
        values["span"] = None if self.span is None else span_text(self.span)
        Path(path).write_text(json.dumps(values, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditRequest:
        """The request in the JSON file at `path`, its keys and types checked (`check` does the rest)."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeError, ValueError) as err:
            raise RequestError(f"{path}: cannot be read as a JSON request ({err})") from err
        return _build(cls, values, str(path))


def _build(kind: type, values: object, source: str):
    """A `kind` (EditRequest, LocalEdit, LoraFile or ControlNetConfig) from the JSON mapping `values`, with every
    key known and typed."""
    if not isinstance(values, dict):
        raise RequestError(f"{source}: must be a mapping of {kind.__name__}'s fields")
    hints = typing.get_type_hints(kind)
    known = {item.name: item for item in fields(kind)}
    unknown = [key for key in values if key not in known]
    if unknown:
        raise RequestError(f"{source}: unknown field {unknown[0]!r}; a request has {', '.join(known)}")
    missing = [name for name, item in known.items()
               if name not in values and item.default is MISSING and item.default_factory is MISSING]
    if missing:
        raise RequestError(f"{source}: `{missing[0]}` is missing")
    built = {}
    for name, value in values.items():
        if name == "span":  # written as `parse_span` reads it
            built[name] = parse_span(value) if isinstance(value, str) else _typed(type(None), value, source, name)
        elif name == "local" and value is not None:
            built[name] = _build(LocalEdit, value, f"{source}: local")
        else:
            built[name] = _typed(hints[name], value, source, name)
    return kind(**built)


def _typed(hint, value, source: str, name: str):
    """`value` as the type `hint` says (int, float, str, bool, optional, list[str], a list of LoraFile or
    ControlNetConfig, dict[str, float], a tuple of two), else a RequestError naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        return _typed(hint, value, source, name)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, type(None)) and type(value) is hint:
        return value
    if origin is list and isinstance(value, list) and args[0] in (LoraFile, ControlNetConfig):
        return [_build(args[0], item, f"{source}: {name}[{index}]") for index, item in enumerate(value)]
    if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if origin is tuple and isinstance(value, list) and len(value) == len(args):
        return tuple(_typed(arg, item, source, name) for arg, item in zip(args, value))
    if origin is dict and isinstance(value, dict) \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
        return {key: float(v) for key, v in value.items()}
    return _bad(source, name, value)


def _bad(source: str, name: str, value):
    raise RequestError(f"{source}: `{name}` cannot be {value!r}")


def parse_span(text: str) -> Span:
    """`all`, or `START:END` in seconds with either side optional (`:4.5`, `2:`, `1.5:3`)."""
    if text.strip() == "all":
        return None, None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (Fraction(part.strip()) if part.strip() else None for part in parts)
    except (ValueError, ZeroDivisionError):
        raise RequestError(f"`span` {text!r}: give all, or START:END in seconds (either side may be left out, "
                           "e.g. 2:5.5 or :4)") from None
    return start, end


def parse_blend_words(text: str) -> tuple[str, str]:
    """`WORD` (the same word in the source prompt and each prompt) or `SOURCE_WORD:TARGET_WORD`."""
    source, _, target = text.partition(":")
    if not source or (":" in text and not target):
        raise RequestError(f"`blend_words` {text!r}: give WORD or SOURCE_WORD:TARGET_WORD")
    return source, target or source


def parse_reweights(items: list[str]) -> dict[str, float]:
    """`WORD=FACTOR` items -> {word: factor}."""
    factors = {}
    for item in items:
        word, _, factor = item.partition("=")
        try:
            factors[word] = float(factor)
        except ValueError:
            word = ""
        if not word:
            raise RequestError(f"`reweights` {item!r}: give WORD=FACTOR, e.g. origami=2")
    return factors


def parse_thresholds(text: str) -> tuple[float, float]:
    """`LOW:HIGH`, the canny thresholds."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise RequestError(f"`canny_thresholds` {text!r}: give LOW:HIGH, e.g. 100:200") from None
    return low, high


def span_text(span: Span) -> str:
    """A span as `parse_span` reads it back."""
    if span == (None, None):
        return "all"
    return ":".join("" if value is None else str(value) for value in span)
