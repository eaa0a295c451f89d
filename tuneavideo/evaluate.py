"""Score edited videos with the LOVEU-TGVE 2023 metrics, computed as the benchmark's `scripts/run_eval.py` does.

    python -m tuneavideo.evaluate outputs/run/edits/*.mp4 --prompt "a panda is skiing" --source data/man-skiing.mp4
    python -m tuneavideo.evaluate edit.gif frames_folder/ --prompt "a cat" --prompt "a dog" --json

Every frame is resized to 480x480 with Pillow (the benchmark's frames are 480x480 JPEGs it resizes again), then goes
through each model's own processor (CLIP: shortest side to 224, centre crop 224). Figures, per video:
  frame_consistency             CLIP ViT-L/14 image embeddings: mean cosine similarity of every ordered pair of
                                distinct frames, x100 (the leaderboard's scale)
  frame_consistency_neighbours  the same over consecutive frames only
  text_alignment                CLIP ViT-L/14 `logits_per_image` of the prompt (100 x cosine), mean over frames
  pickscore                     PickScore_v1: logit_scale.exp() x cosine(prompt, frame), mean over frames
Models come from ./checkpoints/<name> when `./download_models.sh --eval` has put them there, else from the hub cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BaseImageProcessor, CLIPModel, PreTrainedTokenizerBase

from .cli import OneLineArgumentParser, run_cli
from .video.edit_writer import upsampled
from .video.readers import Clip
from .errors import UserError, first_line

CLIP_MODEL = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore was trained with this model's processor
FRAME_SIZE = (480, 480)  # (width, height) every frame is resized to before the processors, as in the benchmark
MAX_TEXT_TOKENS = 77  # CLIP's context; longer prompts are cut (the benchmark cuts PickScore's and fails on CLIP's)
DOWNLOAD_HINT = "run ./download_models.sh --eval"

logger = logging.getLogger(__name__)

Frames = Sequence[np.ndarray]  # uint8 RGB (height, width, 3) frames; a (frames, height, width, 3) array is one


# Formulas. Each takes embeddings (frames, dim) as returned by a model's get_*_features and gives the figure.


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1, in float64 so that averaging many cosines adds no rounding of its own."""
    features = features.double()
    return features / features.norm(dim=-1, keepdim=True)


def frame_consistency(image_features: torch.Tensor) -> float:
    """Mean cosine similarity over the F(F-1) ordered pairs of distinct frames, x100; a frame's own is left out."""
    if len(image_features) < 2:
        raise ValueError("frame consistency needs at least 2 frames")
    unit = _unit(image_features)
    similarity = unit @ unit.T
    distinct = ~torch.eye(len(similarity), dtype=torch.bool)
    return 100 * similarity[distinct].mean().item()


def frame_consistency_neighbours(image_features: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames, x100: flicker shows here even when the clip's content holds."""
    if len(image_features) < 2:
        raise ValueError("frame consistency needs at least 2 frames")
    unit = _unit(image_features)
    return 100 * (unit[1:] * unit[:-1]).sum(dim=-1).mean().item()


def text_image_score(text_features: torch.Tensor, image_features: torch.Tensor, logit_scale: float) -> float:
    """Mean over frames of `logit_scale x cosine(text, frame)`: CLIP's `logits_per_image` (scale 100 for ViT-L/14)
    and PickScore alike. Not clamped at 0, unlike CLIPScore, so a prompt the frames contradict scores below 0."""
    cosines = _unit(image_features) @ _unit(text_features).reshape(-1)
    return logit_scale * cosines.mean().item()


@dataclass(frozen=True)
class VideoScores:
    """The figures of one video for one prompt (see the module docstring)."""

    num_frames: int
    frame_consistency: float
    frame_consistency_neighbours: float
    text_alignment: float
    pickscore: float


@dataclass(frozen=True)
class EncodedFrames:
    """A video's image embeddings from both models, so that several prompts can be scored without re-encoding."""

    clip: torch.Tensor  # (frames, clip projection dim), on the CPU
    pickscore: torch.Tensor  # (frames, PickScore projection dim), on the CPU


@dataclass(frozen=True)
class ClipEncoder:
    """A CLIP-architecture model with the image processor and tokenizer its scores are defined with."""

    model: CLIPModel
    image_processor: BaseImageProcessor
    tokenizer: PreTrainedTokenizerBase
    batch_size: int

    @classmethod
    def load(cls, name: str, model_path: str | os.PathLike, processor_path: str | os.PathLike, device: torch.device,
             batch_size: int) -> ClipEncoder:
        """Load from local folders or hub ids. The image processor is the Pillow one whatever is installed: the
        torchvision one resizes differently, and the benchmark's figures were taken with Pillow's."""
        logger.info(f"loading the {name} model {model_path}")
        try:
            model = CLIPModel.from_pretrained(model_path).to(device).eval()
            image_processor = AutoImageProcessor.from_pretrained(processor_path, backend="pil")
            tokenizer = AutoTokenizer.from_pretrained(processor_path)
        except (OSError, ValueError) as err:  # what transformers raises for missing, partial or foreign folders/ids
            what = model_path if model_path == processor_path else f"{model_path} (processor {processor_path})"
            raise UserError(f"cannot load the {name} model {what}: {first_line(err)}; {DOWNLOAD_HINT}, or give the "
                            f"model's folder") from err
        return cls(model, image_processor, tokenizer, batch_size)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected image embeddings (frames, dim) on the CPU, `batch_size` frames per model call."""
        features = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.image_processor(images=images[start : start + self.batch_size], return_tensors="pt")
            pixel_values = pixels.pixel_values.to(self.model.device)
            features.append(self.model.get_image_features(pixel_values=pixel_values).pooler_output.float().cpu())
        return torch.cat(features)

    @torch.inference_mode()
    def encode_text(self, prompt: str) -> torch.Tensor:
        """Projected text embedding (1, dim) on the CPU, the prompt cut at 77 tokens."""
        tokens = self.tokenizer([prompt], truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
        return self.model.get_text_features(**tokens.to(self.model.device)).pooler_output.float().cpu()

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()


def default_model(hub_id: str, checkpoints: str | os.PathLike = "checkpoints") -> str:
    """`<checkpoints>/<name>` when `download_models.sh --eval` wrote it there (./checkpoints), else the hub id (the
    hub cache)."""
    local = Path(checkpoints) / hub_id.split("/")[-1]
    return str(local) if local.is_dir() else hub_id


def evaluation_models(clip_model: str | None = None, pickscore_model: str | None = None,
                      pickscore_processor: str | None = None,
                      checkpoints: str | os.PathLike = "checkpoints") -> dict[str, str]:
    """The scoring models, as `Evaluator`'s arguments: each the one given, else `default_model`'s, and each a local
    folder or a hub id already in the Hugging Face cache, else a one-line error. Checked before hours of work."""
    models = {"clip_model": clip_model or default_model(CLIP_MODEL, checkpoints),
              "pickscore_model": pickscore_model or default_model(PICKSCORE_MODEL, checkpoints),
              "pickscore_processor": pickscore_processor or default_model(PICKSCORE_PROCESSOR, checkpoints)}
    for option, name in models.items():
        if Path(name).is_dir():
            continue
        file = "preprocessor_config.json" if option == "pickscore_processor" else "config.json"
        try:
            cached = isinstance(try_to_load_from_cache(name, file), str)
        except ValueError:  # not a hub id either (huggingface_hub's validation error)
            cached = False
        if not cached:
            raise UserError(f"--{option.replace('_', '-')} {name}: no such folder, nor in the Hugging Face cache; "
                            f"{DOWNLOAD_HINT}, or give the model's folder")
    return models


class Evaluator:
    """The three LOVEU-TGVE models, loaded once; `score(frames, prompt)` gives a video's figures.

    Runs without gradients in float32 on `device` (default: CUDA when available, else CPU), `batch_size` frames per
    model call. Model arguments are local folders or hub ids; None picks `default_model` of the benchmark's.
    """

    def __init__(
        self,
        clip_model: str | os.PathLike | None = None,
        pickscore_model: str | os.PathLike | None = None,
        pickscore_processor: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        clip_model = clip_model or default_model(CLIP_MODEL)
        self.clip = ClipEncoder.load("CLIP", clip_model, clip_model, self.device, batch_size)
        self.pickscore = ClipEncoder.load(
            "PickScore",
            pickscore_model or default_model(PICKSCORE_MODEL),
            pickscore_processor or default_model(PICKSCORE_PROCESSOR),
            self.device,
            batch_size,
        )

    def encode_frames(self, frames: Frames) -> EncodedFrames:
        """Both models' embeddings of the frames, each first resized to 480x480 as the benchmark does."""
        images = [_resized(frame) for frame in frames]
        return EncodedFrames(clip=self.clip.encode_images(images), pickscore=self.pickscore.encode_images(images))

    def score_encoded(self, encoded: EncodedFrames, prompt: str) -> VideoScores:
        return VideoScores(
            num_frames=len(encoded.clip),
            frame_consistency=frame_consistency(encoded.clip),
            frame_consistency_neighbours=frame_consistency_neighbours(encoded.clip),
            text_alignment=text_image_score(self.clip.encode_text(prompt), encoded.clip, self.clip.logit_scale),
            pickscore=text_image_score(
                self.pickscore.encode_text(prompt), encoded.pickscore, self.pickscore.logit_scale
            ),
        )

    def score(self, frames: Frames, prompt: str) -> VideoScores:
        """The figures of uint8 RGB frames (at least 2, any size) for `prompt`."""
        return self.score_encoded(self.encode_frames(frames), prompt)

    def score_edit(self, source: list[np.ndarray], videos: list[Path], names: list[Path], prompts: list[str],
                   repeats: list[int], masks: list[torch.Tensor | None] | None = None) -> list[dict]:
        """An edit's figures (its `<prompts>.metrics.json`): each video's (read back from its MP4, as `python -m
        tuneavideo.evaluate` would) for its prompt and the `source` frames' over the same frames for the same
        prompt; for a local edit's video with a blend mask (latent size) also `psnr_outside_mask`, its PSNR against
        the source outside the mask (dB). Frame j of the source is shown `repeats[j]` times in the videos."""
        encoded = self.encode_frames(source)
        records = []
        for k, (video, name, prompt) in enumerate(zip(videos, names, prompts)):
            edited = read_frames(video)
            record = {"video": name.name, "prompt": prompt, **asdict(self.score(edited, prompt)),
                      "source": asdict(self.score_encoded(encoded, prompt))}
            if masks is not None and masks[k] is not None:
                shown = np.repeat(np.stack(source), repeats, axis=0)
                outside = np.repeat(upsampled(masks[k], source[0].shape[:2]), repeats, axis=0)
                record["psnr_outside_mask"] = psnr_outside(np.stack(edited), shown, outside)
            records.append(record)
        return records


def psnr_outside(edit: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR (dB, peak 255) of `edit` against `source` (`(frames, H, W, 3)` uint8) over the pixels outside `mask`
    `(frames, H, W)`: how much of what should stay did stay. None when the mask covers every pixel."""
    outside = ~mask
    if not outside.any():
        return None
    error = (edit.astype(np.float64) - source.astype(np.float64))[outside]
    mse = float(np.mean(error**2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _resized(frame: np.ndarray) -> Image.Image:
    """A uint8 RGB frame as a 480x480 image, by Pillow's default filter (bicubic), as the benchmark resizes."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected uint8 (height, width, 3) RGB frames, got {frame.dtype} {frame.shape}")
    return Image.fromarray(frame).resize(FRAME_SIZE)


def read_frames(path: str | os.PathLike) -> list[np.ndarray]:
    """Frames of a video file (MP4, GIF or anything else FFmpeg reads) or a folder of frame images sorted by name, as
    uint8 RGB arrays at their own size; at least 2, as frame consistency needs pairs."""
    frames = list(Clip(path).frames())
    if len(frames) < 2:
        raise UserError(f"{path}: has {len(frames)} frame; frame consistency needs at least 2 frames")
    return frames


def check_input(path: str | os.PathLike) -> None:
    """Fail before the models take their time to load on a missing path, an empty folder, or a file whose first
    frame does not decode; reads no more than that (a long list of edits need not fit in memory at once)."""
    Clip(path).read([0])


TABLE_COLUMNS = ("frames", "consistency", "neighbours", "text", "pickscore")


def _table_row(name: str, scores: VideoScores, prompt: str) -> str:
    figures = (scores.frame_consistency, scores.frame_consistency_neighbours, scores.text_alignment, scores.pickscore)
    return f"{name:<40} {scores.num_frames:>11d} " + " ".join(f"{x:>11.2f}" for x in figures) + f"  {prompt}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m tuneavideo.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("edits", nargs="+", metavar="EDIT", help="an edited video: MP4 (or other video), GIF, or "
                        "a folder of frame images (JPEG/PNG, sorted by name)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="the edit's prompt: once for all edits, or once per edit in the same order")
    parser.add_argument("--source", help="the source clip, also scored (with each edit's prompt) for comparison")
    parser.add_argument("--clip-model", help=f"CLIP folder or hub id (default: {CLIP_MODEL})")
    parser.add_argument("--pickscore-model", help=f"PickScore folder or hub id (default: {PICKSCORE_MODEL})")
    parser.add_argument("--pickscore-processor", help=f"PickScore's processor (default: {PICKSCORE_PROCESSOR})")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per edit instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if len(args.prompt) not in (1, len(args.edits)):
        raise UserError(f"{len(args.edits)} edits but {len(args.prompt)} prompts; give one --prompt for all "
                        f"edits or one per edit")
    prompts = args.prompt * len(args.edits) if len(args.prompt) == 1 else args.prompt
    for path in [*args.edits, *([args.source] if args.source else [])]:
        check_input(path)
    evaluator = Evaluator(args.clip_model, args.pickscore_model, args.pickscore_processor)
    source = evaluator.encode_frames(read_frames(args.source)) if args.source else None
    if not args.json:
        print(f"{'video':<40} " + " ".join(f"{name:>11}" for name in TABLE_COLUMNS) + "  prompt")
    for path, prompt in zip(args.edits, prompts):
        scores = evaluator.score(read_frames(path), prompt)
        source_scores = evaluator.score_encoded(source, prompt) if source is not None else None
        if args.json:
            record = {"video": path, "prompt": prompt, **asdict(scores)}
            if source_scores is not None:
                record["source"] = {"video": args.source, **asdict(source_scores)}
            print(json.dumps(record), flush=True)
            continue
        print(_table_row(path, scores, prompt))
        if source_scores is not None:
            print(_table_row(f"  source {args.source}", source_scores, prompt))


if __name__ == "__main__":
    run_cli(main, "python -m tuneavideo.evaluate")
