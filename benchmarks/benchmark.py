"""Speed and memory of the real-size inflated UNet and VAE (random weights, no download), CPU or CUDA.

    python -m benchmarks.benchmark                                   # default grid on this machine's device
    python -m benchmarks.benchmark --jobs train --frames 4 24 --sizes 512 --attention sdpa plain
    python -m benchmarks.benchmark --jobs train --frames 4 --sizes 512 --allocator mallopt default
    python -m benchmarks.benchmark --jobs edit --frames 4 10 --window 4 --sizes 256
    python -m benchmarks.benchmark --model sd2 --device cuda --dtype fp16 --json results.json

Jobs: `train` (one step of the training's own `TrainingStep`: default trainable modules, gradient checkpointing, the
diffusion loss, accelerate's mixed precision, AdamW step), `denoise` (one classifier-free-guided UNet call, batch
2), `invert` (one inversion UNet call, batch 1), `vae` (encode + decode the clip frame by frame), `edit` (what
`tuneavideo.editing` does with a clip of `--frames` frames in windows of `--window` frames: VAE-encode the frames as
they stream in, `--steps` DDIM inversion steps and `--steps` guided sampling steps over every window, decode the
result a few frames at a time; run once, its phases and steps timed one by one; a warm-up runs each model once at
the edit's shapes). `--attention sdpa-dup` keeps SDPA but gathers sparse-causal keys as the original did (duplicates
for frames 0 and 1). `--attention plain` swaps every attention to plain maths (softmax of an explicit score matrix,
sparse-causal keys duplicated for frames 0 and 1): the original's computation without xformers, so both are compared
in one run. `--allocator mallopt` runs a job after `tuneavideo.cli.release_freed_memory()`, as the CLIs do on the
CPU; `default` leaves glibc's allocator as it is. `--model tiny` is the tests' tiny SD (for quick checks of this
script, not for figures).

Each job runs in a fresh process, so its peak memory (RSS on CPU, `torch.cuda.max_memory_allocated` on GPU, in GiB)
is its own. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SD_UNET = dict(
    sample_size=64,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def model_configs(model: str) -> dict:
    """The UNet (2D, as shipped in `unet/config.json`), VAE and text encoder configs of `model`: SD 1.x or 2.x at
    real size, or the tests' tiny SD."""
    if model == "tiny":
        from tuneavideo.tiny import TINY_TEXT_CONFIG, tiny_unet_config, tiny_vae_config

        return dict(unet=tiny_unet_config(), vae=tiny_vae_config(), text=TINY_TEXT_CONFIG)
    unet, text = {
        # (UNet keys that differ, text encoder: CLIP ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x)
        "sd1": (dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
                dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     hidden_act="quick_gelu")),
        "sd2": (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                     hidden_act="gelu")),
    }[model]
    return dict(unet={**SD_UNET, **unet}, vae=SD_VAE, text=dict(vocab_size=49408, **text))


MODELS = ["sd1", "sd2", "tiny"]
JOBS = ["train", "denoise", "invert", "vae", "edit", "local", "local-null"]
EDITS = ("edit", "local", "local-null")  # jobs that run a whole edit: a plain one, a local one (DDIM, null-text)
ALLOCATORS = ["mallopt", "default"]
UNET_GFLOP_PER_FRAME_512 = 677  # forward of the SD 1.x UNet on one 64x64 latent
EDIT_PROMPT = "a jeep car is moving on the snow"
# a local edit: the source prompt, the target and the blend word (with the edit's default guidance, as the others)
LOCAL_SOURCE, LOCAL_TARGET, LOCAL_BLEND = "a car is moving on the snow", EDIT_PROMPT, ("car", "car")


def build_unet(model: str, attention: str, dtype):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tuneavideo.models.attention import SparseCausalAttnProcessor
    from tuneavideo.models.unet import UNet3DConditionModel

    unet = UNet3DConditionModel.from_config(UNet3DConditionModel.config_from_2d(model_configs(model)["unet"]))
    if attention == "plain":
        unet.set_default_attn_processor()
    elif attention == "sdpa-dup":
        # SDPA, but sparse-causal keys and values gathered as the original did: [frame 0, frame i-1] for every
        # frame, duplicates for frames 0 and 1 included (measures the de-duplication of the default processor)
        unet.set_attn_processor(
            {name: SparseCausalAttnProcessor(AttnProcessor2_0()) if ".attn1." in name else AttnProcessor2_0()
             for name in unet.attn_processors}
        )
    return unet.to(dtype=dtype)


def build_vae(model: str, dtype):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**model_configs(model)["vae"]).to(dtype=dtype).eval()
    vae.enable_slicing()  # one frame at a time, as every edit and the training's validation run it
    return vae


def build_pipeline(model: str, attention: str, dtype, folder: str):
    """A `TuneAVideoPipeline` of `model` at random weights with SD's DDIM scheduler; its tokenizer (character-level,
    so no download) is written to `folder`."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
    from tuneavideo.tiny import SD_SCHEDULER_CONFIG, text_encoder_config, write_tokenizer

    tokenizer = write_tokenizer(folder)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, **model_configs(model)["text"])).to(dtype=dtype)
    pipe = TuneAVideoPipeline(build_vae(model, dtype), text_encoder, tokenizer, build_unet(model, attention, dtype),
                              DDIMScheduler.from_config(SD_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_frames(num_frames: int, size: int) -> Iterator:
    """uint8 frames `(size, size, 3)`, made one at a time as a decoder would give them."""
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(num_frames):
        yield rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


class Clock:
    """Seconds since the last `lap`, the device synchronised first so that GPU work is counted where it is done."""

    def __init__(self, device):
        import torch

        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.synchronize()
        self.last = time.perf_counter()

    def lap(self) -> float:
        self.synchronize()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def edit_job(args, device, dtype) -> tuple[Callable[[], None], Callable[[], dict]]:
    """The `edit`, `local` and `local-null` jobs: a warm-up (each model once at the edit's shapes: first calls are
    slower) and the edit, which returns its phases' seconds, every step's seconds and the size of the weights
    (`weights_gb`: the part of the peak that does not depend on the clip). A local edit (`local`: DDIM inversion,
    `local-null`: null-text inversion) samples the source and the target together under attention control with a
    local blend; its inversion, null-text inversion and sampling are `local_s`, every step of them `local_step_s`."""
    import torch

    from tuneavideo.pipelines.edit import invert, sample
    from tuneavideo.pipelines.windows import plan_windows
    from tuneavideo.request import EditRequest, LocalEdit

    job, frames, size = args.jobs[0], args.frames[0], args.sizes[0]
    with tempfile.TemporaryDirectory(prefix="tav-bench-") as folder:
        pipe = build_pipeline(args.model, args.attention[0], dtype, folder).to(device)
    windows = plan_windows(frames, args.window)
    models = (pipe.unet, pipe.vae, pipe.text_encoder)
    weights_gb = sum(p.numel() * p.element_size() for model in models for p in model.parameters()) / 2**30

    def warmup() -> None:
        # every model once at the shapes the edit runs: one frame through the VAE, one window through the UNet
        # unguided (inversion, batch 1) and guided (batch 2; a local edit's source and target, batch 4)
        latent = pipe.encode_video(random_frames(1, size)).mean
        pipe.decode_latents(latent)
        for batch in (1, 2) if job == "edit" else (1, 2, 4):
            sample = torch.randn(batch, 4, len(windows[0].frames), size // 8, size // 8, device=device, dtype=dtype)
            text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
            with torch.no_grad():
                pipe.unet(sample, torch.tensor([500], device=device), text)

    def run() -> dict:
        clock = Clock(device)
        latent = pipe.encode_video(random_frames(frames, size)).mean
        figures = dict(encode_s=clock.lap(), weights_gb=weights_gb)
        if job == "edit":
            invert_steps, denoise_steps = [], []
            latent = invert(pipe, latent, args.steps, args.window,
                            callback=lambda *_: invert_steps.append(clock.lap()))
            clock.lap()
            edited = sample(pipe, latent, [EDIT_PROMPT], args.steps, EditRequest().guidance, args.steps,
                            window_size=args.window, callback=lambda *_: denoise_steps.append(clock.lap()))
            figures.update(invert_s=sum(invert_steps), denoise_s=sum(denoise_steps), invert_step_s=invert_steps,
                           denoise_step_s=denoise_steps)
        else:
            local = LocalEdit(blend_words=LOCAL_BLEND, inversion="null-text" if job == "local-null" else "ddim")
            plan = local.plan(pipe.tokenizer, [LOCAL_TARGET], LOCAL_SOURCE)
            steps = []
            guidance = EditRequest([LOCAL_TARGET], local=local).guidance
            out = plan.invert_and_edit(pipe, latent, [LOCAL_TARGET], args.steps, args.steps, guidance,
                                  args.window, None, lambda *_: steps.append(clock.lap()))
            edited = torch.cat([out.source, out.targets])  # both branches are decoded: the edit and inversion.mp4
            figures.update(local_s=sum(steps) + clock.lap(), local_step_s=steps)
        clock.lap()
        for _ in pipe.decode_chunks(edited):  # as the edit decodes: a few frames at a time
            pass
        return dict(figures, decode_s=clock.lap())

    return warmup, run


def unet_job(args, device, dtype) -> Callable[[], dict | None]:
    """One step of `train` (the shipped `tuneavideo.training_step.TrainingStep`: it returns the step's `loss`),
    `denoise` or `invert`."""
    import torch

    frames, size, job = args.frames[0], args.sizes[0], args.jobs[0]
    latent = size // 8
    unet = build_unet(args.model, args.attention[0], torch.float32 if job == "train" else dtype).to(device)
    if args.compile:
        unet.forward = torch.compile(unet.forward)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    sample = torch.randn(1, 4, frames, latent, latent, device=device, dtype=dtype)
    if job == "train":
        return train_step(unet, device, dtype, sample.float(), text.float())
    unet.eval()
    batch = 2 if job == "denoise" else 1
    sample, text = sample.expand(batch, -1, -1, -1, -1), text.expand(batch, -1, -1)

    def step():
        with torch.no_grad():
            unet(sample, torch.tensor([500], device=device), text)

    return step


def train_step(unet, device, dtype, latents, text) -> Callable[[], dict]:
    """The training's own step on `unet` (float32): the default trainable modules, gradient checkpointing, SD's
    noise schedule, AdamW at the default learning rate, `dtype` as accelerate's mixed precision."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from tuneavideo.tiny import SD_SCHEDULER_CONFIG
    from tuneavideo.training_step import TrainingStep, make_optimizer
    from tuneavideo.tuned_parameters import trainable_parameter_names

    unet.requires_grad_(False)
    names = set(trainable_parameter_names(unet, ["attn1.to_q", "attn2.to_q", "attn_temp"]))
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name in names)
    unet.enable_gradient_checkpointing()
    precision = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    optimizer = make_optimizer([p for p in unet.parameters() if p.requires_grad], learning_rate=3e-5)
    step = TrainingStep.prepare(accelerator, unet, DDPMScheduler.from_config(SD_SCHEDULER_CONFIG), optimizer,
                                get_scheduler("constant", optimizer), max_grad_norm=1.0)
    return lambda: dict(loss=step(latents, text).mean().item())


def vae_job(args, device, dtype) -> Callable[[], None]:
    import torch

    vae = build_vae(args.model, dtype).to(device)
    clip = torch.rand(args.frames[0], 3, args.sizes[0], args.sizes[0], device=device, dtype=dtype) * 2 - 1

    def step():
        with torch.no_grad():
            vae.decode(vae.encode(clip).latent_dist.mean).sample

    return step


def run_job(args) -> dict:
    """One measurement in this process; returns seconds and peak memory (and, for `edit`, its phases)."""
    import torch

    if args.allocator[0] == "mallopt":
        from tuneavideo.cli import release_freed_memory

        release_freed_memory()
    if args.model == "tiny":
        torch.set_num_threads(1)  # its ops are too small to share; on a busy machine threads only wait for each other
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    job = args.jobs[0]
    with device:  # weights are made (and randomly initialised) on the device: much faster on a GPU
        if job in EDITS:
            warmup, step = edit_job(args, device, dtype)
        else:
            step = vae_job(args, device, dtype) if job == "vae" else unet_job(args, device, dtype)
            warmup = step
    compiled = args.compile and job in ("train", "denoise", "invert")
    for _ in range(max(args.warmup, 1) if compiled else args.warmup):  # a compiled UNet's first call compiles
        warmup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(device)
    repeat = 1 if job in EDITS else args.repeat  # an edit's steps are its repeats
    details = [step() for _ in range(repeat)][-1]
    result = dict(seconds=clock.lap() / repeat, **(details or {}))
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    flop_factor = {"train": 4, "denoise": 2, "invert": 1}.get(job)  # forward, recompute, 2x backward
    if flop_factor and args.model == "sd1":
        tflop = flop_factor * args.frames[0] * UNET_GFLOP_PER_FRAME_512 * (args.sizes[0] / 512) ** 2 / 1000
        result["tflops_per_s"] = tflop / result["seconds"]
    return result


def child_command(spec: dict) -> list[str]:
    """The command measuring `spec` (one value per option: job, frames, size, ...) in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.benchmark", "--child", "--jobs", spec["job"]]
    command += ["--frames", str(spec["frames"]), "--sizes", str(spec["size"]), "--steps", str(spec["steps"])]
    for option in ("model", "attention", "allocator", "device", "dtype", "warmup", "repeat"):
        command += [f"--{option}", str(spec[option])]
    command += ["--window", str(spec["window"])] if spec.get("window") else []
    return command + (["--compile"] if spec.get("compile") else [])


def child_environment() -> dict:
    """This environment without glibc's allocator settings, so that `--allocator` alone decides them."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}


def measure(spec: dict, timeout: float | None = None) -> dict:
    """`spec` with the figures of its job (or `error`), measured in a fresh process; on the CPU `load` is the
    1-minute load average when it started; an edit's `windows` is its UNet calls per step."""
    row = dict(spec, load=round(os.getloadavg()[0], 2)) if spec["device"] == "cpu" else dict(spec)
    if spec["job"] in EDITS:
        from tuneavideo.pipelines.windows import plan_windows

        row["windows"] = len(plan_windows(spec["frames"], spec.get("window")))
    try:
        done = subprocess.run(child_command(spec), capture_output=True, text=True, cwd=ROOT,
                              env=child_environment(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {timeout:.0f} s")
    if done.returncode == 0:
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    else:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        row["error"] = "killed (out of memory?)" if done.returncode < 0 else lines[-1]
    return row


def format_row(row: dict) -> str:
    """One line of the table: the job, its settings and its figures."""
    windows = row.get("windows", "-")
    start = (f"{row['job']:8} {row['attention']:9} {row['allocator']:9} {row['frames']:>6} {row['size']:>5} "
             f"{windows:>7}")
    if "error" in row:
        return f"{start}   failed: {row['error']}"
    tflops = f"{row['tflops_per_s']:8.2f}" if "tflops_per_s" in row else f"{'-':>8}"
    line = f"{start} {row['seconds']:9.2f} {row['peak_gb']:8.2f} {tflops} {row.get('load', '-'):>5}"
    if row["job"] in EDITS:
        phases = ("encode", "invert", "denoise", "decode") if row["job"] == "edit" else ("encode", "local", "decode")
        line += "   " + ", ".join(f"{phase} {row[phase + '_s']:.1f}" for phase in phases)
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the device-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=["train", "denoise", "invert", "vae"])
    parser.add_argument("--frames", nargs="+", type=int, default=[4, 8], help="frames of the clip")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="height = width of the frames")
    parser.add_argument("--model", choices=MODELS, default="sd1")
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "sdpa-dup", "plain"], default=["sdpa"])
    parser.add_argument("--allocator", nargs="+", choices=ALLOCATORS, default=["mallopt"],
                        help="mallopt: tuneavideo.cli.release_freed_memory() first, as the CLIs do on the CPU "
                        "(freed activation buffers go back to the system); default: glibc as it is")
    parser.add_argument("--window", type=int, default=None,
                        help="edit: frames per UNet call (default: the whole clip in one window)")
    parser.add_argument("--steps", type=int, default=1, help="edit: DDIM inversion steps, and as many sampling steps")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default fp32 on CPU, fp16 on GPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 0 on CPU, 2 on GPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs (default 1 on CPU, 5 on GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet of train, denoise and invert (compile time not counted)")
    parser.add_argument("--json", default="benchmark-results.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("frames", "sizes", "steps", "window"):
        values = getattr(args, name)
        if any(value is not None and value < 1 for value in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name} must be positive")
    if any(size % 8 for size in args.sizes):
        parser.error("--sizes must be multiples of 8")

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.device == "cuda" else 0)
    args.repeat = args.repeat if args.repeat is not None else (5 if args.device == "cuda" else 1)
    return args


def specs(args: argparse.Namespace) -> Iterator[dict]:
    """Every measurement the options ask for: jobs x attentions x allocators x frames x sizes."""
    common = dict(model=args.model, device=args.device, dtype=args.dtype, warmup=args.warmup, repeat=args.repeat,
                  window=args.window, steps=args.steps, compile=args.compile)
    for job in args.jobs:
        attentions = args.attention if job != "vae" else ["sdpa"]
        for attention, allocator, frames, size in itertools.product(attentions, args.allocator, args.frames,
                                                                     args.sizes):
            yield dict(job=job, attention=attention, allocator=allocator, frames=frames, size=size, **common)


def header(args: argparse.Namespace) -> str:
    import torch

    card = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    compiled = ", torch.compile" if args.compile else ""
    return (f"{args.model} on {args.device} ({card}), {args.dtype}, torch {torch.__version__}{compiled}\n"
            f"{'job':8} {'attention':9} {'allocator':9} {'frames':>6} {'size':>5} {'windows':>7} {'seconds':>9} "
            f"{'peak GB':>8} {'TFLOP/s':>8} {'load':>5}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_job(args)))
        return
    print(header(args), flush=True)
    rows = []
    for spec in specs(args):
        rows.append(measure(spec))
        print(format_row(rows[-1]), flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
