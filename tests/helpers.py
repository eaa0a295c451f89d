"""Helpers shared by the tests: paths, an ffmpeg runner, clips whose pixels say which frame they are, an MP4 probe.

Import as ``from tests.helpers import ...`` (pytest puts the repository root on ``sys.path``: ``pythonpath`` in
pyproject.toml).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest

from tuneavideo.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CLIP = ROOT / "data" / "sample.mp4"
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()  # no system ffmpeg is needed: imageio-ffmpeg ships one
INDEX_STEP = 8  # grey-level step per frame index in `index_frames`
PHONE_TIMES = [i / 30 for i in range(16)] + [15 / 30 + (i + 1) / 15 for i in range(14)]  # 30 fps, then 15 fps


def ffmpeg(*args: object, input: bytes | None = None) -> None:
    """Run the ffmpeg binary with `args` (made strings), overwriting outputs; a failure raises with ffmpeg's errors."""
    command = [FFMPEG, "-y", "-v", "error", "-nostdin", *map(str, args)]
    result = subprocess.run(command, input=input, capture_output=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.decode(errors='replace')[-2000:]}")


def index_frames(num_frames: int = 30, width: int = 64, height: int = 48) -> np.ndarray:
    """`(num_frames, height, width, 3)` uint8 frames whose pixels give their index: frame i has its left half at grey
    level ``8 * i`` and its right half at ``255 - 8 * i`` (so a swap of left and right, or of frames, shows)."""
    if num_frames * INDEX_STEP > 255:
        raise ValueError(f"at most {255 // INDEX_STEP + 1} frames have distinct grey levels, asked for {num_frames}")
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, :, : width // 2] = INDEX_STEP * i
        frames[i, :, width // 2 :] = 255 - INDEX_STEP * i
    return frames


def frame_indices(frames: np.ndarray) -> list[int]:
    """The index of each `index_frames` frame in `(f, H, W, 3)` uint8 `frames`, from the middle of its left half."""
    height, width = frames.shape[1:3]
    middle = frames[:, height // 4 : 3 * height // 4, width // 8 : 3 * width // 8]
    return [round(float(f.mean()) / INDEX_STEP) for f in middle]


def assert_same_pixels(ours: np.ndarray, reference: np.ndarray, levels: int = 2) -> None:
    """The same uint8 frames as `reference`, decoded by another build of FFmpeg (decord's, or the ffmpeg binary's):
    equal here, but its colour conversion and scaling may take other SIMD paths on another CPU, so up to `levels`
    grey levels apart. A wrong filter, size, colour matrix or frame is tens of levels off."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16)).max()
    assert difference <= levels, f"frames differ by up to {difference} grey levels"


def write_frames_mp4(path: Path, frames: np.ndarray, fps: float | Fraction = 12, *extra: object) -> Path:
    """Encode uint8 RGB `frames` as H.264 yuv420p, crf 0 (lossless in YUV), with the ffmpeg binary itself,
    independent of the package's writers; `extra` output options go before the path."""
    height, width = frames.shape[1:3]
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0",
           "-c:v", "libx264", "-crf", "0", "-pix_fmt", "yuv420p", *extra, path, input=frames.tobytes())
    return path


def write_index_clip(path: Path, num_frames: int = 30, fps: int = 12, width: int = 64, height: int = 48) -> Path:
    """An H.264 MP4 of `index_frames` (flat grey levels come back within YUV rounding)."""
    return write_frames_mp4(path, index_frames(num_frames, width, height), fps)


def probe(path: Path) -> dict:
    """Frame count (decoded), fps, size, codec, pixel format of a video file, and its audio length in seconds from
    the decoded samples (None without audio)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        info = dict(frames=sum(1 for _ in container.decode(video)), fps=Fraction(video.average_rate),
                    size=(video.codec_context.width, video.codec_context.height), codec=video.codec_context.name,
                    pix_fmt=video.codec_context.pix_fmt, audio_seconds=None)
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            info["audio_seconds"] = sum(frame.samples for frame in container.decode(audio)) / audio.rate
    return info


@contextlib.contextmanager
def watchdog(seconds: float):
    """Fail (TimeoutError) instead of hanging when the block runs longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def small_disk(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` for the block (root only; skipped where mounting is refused)."""
    path.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip() or 'not root'}): {path}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def train_in_process(cfg):
    """`train(cfg)` in this process; accelerate keeps one process-wide state, so it is reset before and after."""
    from accelerate.state import AcceleratorState

    from tuneavideo.training import train

    AcceleratorState._reset_state(True)
    try:
        return train(cfg)
    finally:
        AcceleratorState._reset_state(True)


def write_vfr_clip(path: Path, frames: np.ndarray, times: list[float], audio_rate: int | None = 16000) -> Path:
    """An H.264 MP4 (crf 0) of uint8 RGB `frames` shown at `times` seconds (a variable frame rate, as phones record),
    with PyAV and explicit presentation stamps; with `audio_rate`, a 440 Hz tone over the whole clip."""
    time_base = Fraction(1, 90000)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.time_base, video.codec_context.time_base = time_base, time_base
        video.options = {"crf": "0", "bf": "0"}
        audio = container.add_stream("aac", rate=audio_rate, layout="mono") if audio_rate else None
        for frame, t in zip(frames, times):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            picture.pts, picture.time_base = round(t / time_base), time_base
            container.mux(video.encode(picture))
        container.mux(video.encode())
        if audio is not None:
            end = times[-1] + (times[-1] - times[-2])
            samples = np.sin(2 * np.pi * 440 * np.arange(round(end * audio_rate)) / audio_rate).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = audio_rate, start
                container.mux(audio.encode(chunk))
            container.mux(audio.encode())
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders left anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


# a stand-in for the `hf` command (no network here): records each call in $CALLS and writes the files it names
FAKE_HF = """#!/usr/bin/env bash
# hf download REPO --local-dir DIR [--include PATTERN]...
echo "$*" >> "$CALLS"
dir="$4"; mkdir -p "$dir"; shift 4
while [ $# -gt 0 ]; do
  case "$2" in
    "*.json") for name in config.json preprocessor_config.json tokenizer.json; do echo '{}' > "$dir/$name"; done ;;
    "*.txt") echo x > "$dir/merges.txt" ;;
    *) echo weights > "$dir/$2" ;;
  esac
  shift 2
done
"""


def fake_hf(folder: Path) -> dict[str, str]:
    """An environment whose `hf` is `FAKE_HF` (in `folder/bin`), recording its calls in `folder/calls`."""
    (folder / "bin").mkdir()
    (folder / "bin" / "hf").write_text(FAKE_HF)
    (folder / "bin" / "hf").chmod(0o755)
    return {**os.environ, "PATH": f"{folder / 'bin'}:{os.environ['PATH']}", "CALLS": str(folder / "calls")}


MARKER = 12  # side of the red square that `marker_frames` puts in the stored top-left corner


def marker_frames(num_frames: int = 4, width: int = 64, height: int = 48) -> np.ndarray:
    """Grey uint8 frames with a red `MARKER`-pixel square in the top-left corner: where a player shows that corner
    is where the square lands."""
    frames = np.full((num_frames, height, width, 3), 128, np.uint8)
    frames[:, :MARKER, :MARKER] = (255, 0, 0)
    return frames


def marker_corner(frame: np.ndarray) -> str:
    """Which corner of an `(H, W, 3)` frame holds the red square: "top-left", "top-right", "bottom-left" or
    "bottom-right" (the one with the reddest corner patch)."""
    height, width = frame.shape[:2]
    patch_h, patch_w = max(1, height // 8), max(1, width // 8)
    corners = {"top-left": frame[:patch_h, :patch_w], "top-right": frame[:patch_h, -patch_w:],
               "bottom-left": frame[-patch_h:, :patch_w], "bottom-right": frame[-patch_h:, -patch_w:]}
    redness = {name: float(p[..., 0].astype(int).mean() - p[..., 1].astype(int).mean()) for name, p in corners.items()}
    best = max(redness, key=redness.get)
    assert redness[best] > 60, f"no red corner: {redness}"
    return best


def write_phone_clip(path: Path, source: Path, rotation: int = 0, hflip: bool = False) -> Path:
    """`source` with a display matrix, as phones write one: the stored frames are to be shown turned `rotation`
    degrees counter-clockwise, then mirrored left to right with `hflip` (ffmpeg's -display_rotation and
    -display_hflip, the stream copied)."""
    ffmpeg("-display_rotation", rotation, *(["-display_hflip"] if hflip else []), "-i", source, "-c", "copy", path)
    return path


def write_as_diffusers_0_11(run: Path, to: Path) -> Path:
    """Copy our finished run folder `run` to `to`, its tuned pipeline laid out exactly as Tune-A-Video's and
    Video-P2P's own training (diffusers 0.11.1, transformers 4.26) saves it: `model_index.json` naming
    `["models", "UNet3DConditionModel"]`, configs marked 0.11.1 without the keys later versions added, `.bin`
    weights (the VAE's attention under its 0.11 names, the text encoder with its `position_ids` buffer), the
    tokenizer's 4.26 config and the base model's PNDM scheduler config. Returns `to`."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    from tuneavideo.tiny import SD_SCHEDULER_CONFIG

    shutil.copytree(run, to, ignore=shutil.ignore_patterns("edits", "unet", "vae", "text_encoder", "tokenizer",
                                                           "scheduler", "model_index.json"))

    def config(component: str, **extra) -> dict:
        found = json.loads((run / component / "config.json").read_text())
        return {key: value for key, value in found.items() if not key.startswith("_")} | extra

    (to / "unet").mkdir()
    unet = config("unet", _class_name="UNet3DConditionModel", _diffusers_version="0.11.1")
    del unet["spatial_attention"]  # ours; the original's UNet has no such key
    (to / "unet" / "config.json").write_text(json.dumps(unet, indent=2))
    torch.save(load_file(run / "unet" / "diffusion_pytorch_model.safetensors"),
               to / "unet" / "diffusion_pytorch_model.bin")

    (to / "vae").mkdir()
    vae = {key: value for key, value in config("vae", _class_name="AutoencoderKL", _diffusers_version="0.11.1").items()
           if key in ("_class_name", "_diffusers_version", "act_fn", "block_out_channels", "down_block_types",
                      "in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "out_channels",
                      "sample_size", "up_block_types")}
    (to / "vae" / "config.json").write_text(json.dumps(vae, indent=2))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    weights = {}
    for key, value in load_file(run / "vae" / "diffusion_pytorch_model.safetensors").items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        weights[key] = value
    torch.save(weights, to / "vae" / "diffusion_pytorch_model.bin")

    (to / "text_encoder").mkdir()
    text = config("text_encoder", architectures=["CLIPTextModel"], torch_dtype="float32",
                  transformers_version="4.26.0")
    del text["dtype"]  # transformers 5's name for torch_dtype
    (to / "text_encoder" / "config.json").write_text(json.dumps(text, indent=2))
    weights = load_file(run / "text_encoder" / "model.safetensors")
    weights["text_model.embeddings.position_ids"] = torch.arange(text["max_position_embeddings"])[None]
    torch.save(weights, to / "text_encoder" / "pytorch_model.bin")

    (to / "tokenizer").mkdir()
    model = json.loads((run / "tokenizer" / "tokenizer.json").read_text())["model"]  # transformers 4.26's files
    (to / "tokenizer" / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (to / "tokenizer" / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")

    def token(text: str) -> dict:
        return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    special = {"bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"), "pad_token": "<|endoftext|>",
               "unk_token": token("<|endoftext|>")}
    (to / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer = {"add_prefix_space": False, **special, "do_lower_case": True, "errors": "replace",
                 "model_max_length": 77, "name_or_path": str(run / "tokenizer"),
                 "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
    (to / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))

    (to / "scheduler").mkdir()
    scheduler = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.11.1", **SD_SCHEDULER_CONFIG,
                 "trained_betas": None}
    (to / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "TuneAVideoPipeline", "_diffusers_version": "0.11.1",
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["models", "UNet3DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (to / "model_index.json").write_text(json.dumps(index, indent=2))
    return to


def edit_cli(run: Path, *args: str) -> tuple[int, str]:
    """Run inference.py on `run` in-process through its CLI; returns (exit status, stderr's last line)."""
    import inference

    try:
        run_cli(inference.main, "inference.py",
                ["--model", str(run), "--num-inference-steps", "3", "--num-inv-steps", "3", *args])
    except SystemExit as exit_info:
        return 1, str(exit_info.code)
    return 0, ""


@contextlib.contextmanager
def diffusers_errors():
    """The messages diffusers logs as errors inside the block (its logger does not propagate, and its handler keeps
    the stream it was made with, so neither caplog nor capfd sees them)."""
    import logging

    logged: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield logged
    finally:
        logger.removeHandler(handler)


def denoising_losses(pipe, base: Path, video_path: str, prompt: str, unets: list, count: int) -> list[float]:
    """Each of `unets`' noise-prediction error on `count` noised copies of the tuned window of `video_path` (4
    frames of 64x64, every 3rd from 0) encoded by `pipe`, with `prompt`: noise seeded 0, timesteps 50 to 950 on
    `base`'s DDPM schedule. How well a tuned UNet has learnt its clip, against the untuned one's."""
    import torch
    from diffusers import DDPMScheduler

    from tuneavideo.video.readers import Clip

    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    latents = pipe.encode_video(Clip(video_path).frames((64, 64), 0, 12, 3)).mean
    with torch.no_grad():
        text = pipe.encode_prompt(prompt, "cpu", do_classifier_free_guidance=False)
        noise = torch.randn((count, *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
        timesteps = torch.linspace(50, 950, count).long()
        noisy = scheduler.add_noise(latents.expand(count, -1, -1, -1, -1), noise, timesteps)
        return [torch.nn.functional.mse_loss(unet(noisy, timesteps, text.expand(count, -1, -1)).sample, noise).item()
                for unet in unets]
