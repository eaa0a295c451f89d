"""Speed and memory of the real-size inflated UNet and VAE (random weights, no download), CPU or CUDA.

    python -m benchmarks.benchmark                                   # default grid on this machine's device
    python -m benchmarks.benchmark --jobs train --frames 4 24 --sizes 512 --attention sdpa plain
    python -m benchmarks.benchmark --model sd2 --device cuda --dtype fp16 --json results.json

Jobs: `train` (one tuning step: default trainable modules, gradient checkpointing, AdamW step), `denoise` (one
classifier-free-guided UNet call, batch 2), `invert` (one inversion UNet call, batch 1), `vae` (encode + decode
the clip frame by frame). `--attention sdpa-dup` keeps SDPA but gathers sparse-causal keys as the original did (duplicates for frames 0
and 1). `--attention plain` swaps every attention to plain maths (softmax of an explicit score
matrix, sparse-causal keys duplicated for frames 0 and 1): the original's computation without xformers, so both
are compared in one run. Each job runs in a fresh process, so its peak memory (RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU) is its own. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SD 1.x and 2.x UNet configs as shipped in their `unet/config.json` (the keys that matter here)
UNET_CONFIGS = {
    "sd1": dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd2": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
}
VAE_CONFIG = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
UNET_GFLOP_PER_FRAME_512 = 677  # forward of the SD 1.x UNet on one 64x64 latent


def build_unet(model: str, attention: str, dtype):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tuneavideo.models.attention import SparseCausalAttnProcessor
    from tuneavideo.models.unet import UNet3DConditionModel

    config = dict(
        sample_size=64,
        block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        **UNET_CONFIGS[model],
    )
    unet = UNet3DConditionModel.from_config(UNet3DConditionModel.config_from_2d(config))
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


def run_job(args) -> dict:
    """One measurement in this process; returns seconds and peak memory."""
    import torch
    import torch.nn.functional as F

    from tuneavideo.tuned_parameters import trainable_parameter_names

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    frames, size = args.frames[0], args.sizes[0]
    latent = size // 8
    text_dim = UNET_CONFIGS[args.model]["cross_attention_dim"]

    if args.jobs[0] == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**VAE_CONFIG).to(device, dtype).eval()
        vae.enable_slicing()
        clip = torch.rand(frames, 3, size, size, device=device, dtype=dtype) * 2 - 1

        def step():
            with torch.no_grad():
                vae.decode(vae.encode(clip).latent_dist.mean).sample

    else:
        unet = build_unet(args.model, args.attention[0], torch.float32 if args.jobs[0] == "train" else dtype)
        unet.to(device)
        text = torch.randn(1, 77, text_dim, device=device, dtype=dtype)
        sample = torch.randn(1, 4, frames, latent, latent, device=device, dtype=dtype)
        if args.jobs[0] == "train":
            unet.requires_grad_(False)
            names = set(trainable_parameter_names(unet, ["attn1.to_q", "attn2.to_q", "attn_temp"]))
            parameters = [p for n, p in unet.named_parameters() if n in names]
            for parameter in parameters:
                parameter.requires_grad_(True)
            if args.device == "cuda" and dtype != torch.float32:
                # frozen weights in half precision, trainable master weights in float32
                for name, parameter in unet.named_parameters():
                    if name not in names:
                        parameter.data = parameter.data.to(dtype)
            unet.enable_gradient_checkpointing()
            unet.train()
            optimizer = torch.optim.AdamW(parameters, lr=3e-5, weight_decay=1e-2)
            text = text.float()

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    prediction = unet(sample.float(), torch.tensor([500], device=device), text).sample
                loss = F.mse_loss(prediction.float(), torch.randn_like(prediction, dtype=torch.float32))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        else:
            unet.eval()
            batch = 2 if args.jobs[0] == "denoise" else 1
            sample, text = sample.expand(batch, -1, -1, -1, -1), text.expand(batch, -1, -1)

            def step():
                with torch.no_grad():
                    unet(sample, torch.tensor([500], device=device), text)

    if args.compile and args.jobs[0] != "vae":
        unet.forward = torch.compile(unet.forward)
        args.warmup = max(args.warmup, 1)  # the first call compiles
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.repeat):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeat
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result = dict(seconds=seconds, peak_gb=peak_gb)
    flop_factor = {"train": 4, "denoise": 2, "invert": 1}.get(args.jobs[0])  # forward, recompute, 2x backward
    if flop_factor and args.model == "sd1":
        tflop = flop_factor * frames * UNET_GFLOP_PER_FRAME_512 * (size / 512) ** 2 / 1000
        result["tflops_per_s"] = tflop / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["train", "denoise", "invert", "vae"])
    parser.add_argument("--frames", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--model", choices=sorted(UNET_CONFIGS), default="sd1")
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "sdpa-dup", "plain"], default=["sdpa"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp32 on CPU, fp16 on GPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 0 on CPU, 2 on GPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs (default 1 on CPU, 5 on GPU)")
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="keep glibc's default allocator settings (by default jobs run with MALLOC_MMAP_THRESHOLD_=1048576, "
        "which returns freed activation buffers to the OS instead of keeping them in the heap)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time not counted)")
    parser.add_argument("--json", default="benchmark-results.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.device == "cuda" else 0)
    args.repeat = args.repeat if args.repeat is not None else (5 if args.device == "cuda" else 1)
    if args.child:
        print(json.dumps(run_job(args)))
        return

    rows = []
    header = f"{'job':8} {'attention':9} {'frames':>6} {'size':>5} {'seconds':>9} {'peak GB':>8} {'TFLOP/s':>8}"
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    malloc = "default malloc" if args.malloc_default else "MALLOC_MMAP_THRESHOLD_=1048576"
    compiled = ", torch.compile" if args.compile else ""
    print(f"{args.model} on {args.device} ({card}), {args.dtype}, torch {torch.__version__}, {malloc}{compiled}")
    print(header)
    for job in args.jobs:
        for attention in args.attention if job != "vae" else ["-"]:
            for frames in args.frames:
                for size in args.sizes:
                    command = [sys.executable, "-m", "benchmarks.benchmark", "--child", "--jobs", job, "--frames", str(frames)]
                    command += ["--sizes", str(size), "--model", args.model, "--device", args.device]
                    command += ["--dtype", args.dtype, "--warmup", str(args.warmup), "--repeat", str(args.repeat)]
                    command += ["--attention", attention if attention != "-" else "sdpa"]
                    command += ["--compile"] if args.compile else []
                    env = dict(os.environ)
                    if not args.malloc_default:
                        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
                    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
                    row = dict(job=job, attention=attention, frames=frames, size=size, model=args.model,
                               device=args.device, dtype=args.dtype)
                    if done.returncode == 0:
                        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                    else:
                        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
                        row["error"] = "killed (out of memory?)" if done.returncode < 0 else lines[-1]
                    rows.append(row)
                    if "error" in row:
                        print(f"{job:8} {attention:9} {frames:>6} {size:>5}   failed: {row['error']}")
                    else:
                        tflops = f"{row['tflops_per_s']:8.2f}" if "tflops_per_s" in row else f"{'-':>8}"
                        print(f"{job:8} {attention:9} {frames:>6} {size:>5} {row['seconds']:9.2f} {row['peak_gb']:8.2f} {tflops}", flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
