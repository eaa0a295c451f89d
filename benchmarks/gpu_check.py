"""Every GPU figure README "Memory and speed" still lacks, in one run of under 8 minutes, written as JSON.

    bash benchmarks/gpu_check.sh gpu_check.json             # one NVIDIA GPU (see gpu_check.sh for the wheels)
    python -m benchmarks.gpu_check --tiny /tmp/check.json   # the tests' tiny model on the CPU: checks this script

SD 1.x at real size with random weights, fp16, 512x512, each job in a fresh process (`benchmarks.benchmark`):
- `train_step`: one tuning step of 24 frames, its peak memory, and 500 steps estimated as 500 such steps;
- `denoise_step`: one classifier-free-guided UNet call on 24 frames;
- `edit`: an edit of 24 frames (one window), 50 inversion + 50 sampling steps, measured whole;
- `controlled_edit`: the same edit under one SD 1.5-size ControlNet (inversion under control too; target: under
  12 GB, VideoGrain's 15.9 GB the mark to beat);
- `max_frames_24gb`: the most frames whose training step fits a 24 GB card (its peak reserved memory at most
  `budget_gib`): the line through the peaks at 8 and 24 frames, solved for the budget, then that frame count
  measured (and, if it does not fit, the count the measured point gives, measured once more);
- `long_clip`: 10 s of 30 fps video, every 2nd frame (150 frames) in windows of 24, 50 + 50 steps. First an
  estimate: VAE encoding and decoding of all 150 frames measured, only the first steps of inversion and sampling
  run and the rest extrapolated linearly (each step costs the same: one UNet call per window). Then, last, and only
  if the estimate fits in what is left of the 8 minutes, the whole edit (`whole`); `estimated` says which figures
  `seconds` and `peak_gb` are.

- `local_edit`, `local_null_edit`: a local edit (Video-P2P's attention control with a local blend) of the same 24
  frames, 50 + 50 steps, with DDIM inversion (`--inversion ddim`, Video-P2P's `--fast`) and with null-text inversion
  (its default), last, in what is left of the time.

Peak memory is `torch.cuda.max_memory_allocated` (GiB) after the warm-up; `reserved_gb` is what PyTorch's caching
allocator held. The JSON is rewritten after every job, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .benchmark import format_row, measure

GB = 1e9 / 2**30  # one GB (10^9 bytes) in the GiB the benchmark reports


@dataclass(frozen=True)
class Plan:
    """What the check measures, and where."""

    model: str
    device: str
    dtype: str
    size: int
    frames: int  # of the training step, the denoising step and the edit
    fit_frames: int  # the second frame count of the training-memory line
    long_frames: int  # of the long clip
    window: int  # frames per UNet call in the long clip
    steps: int  # inversion steps, and as many sampling steps, of an edit
    measured_steps: int  # of the long clip's, the rest extrapolated
    budget_gib: float  # the memory a 24 GB card leaves to PyTorch
    max_frames_cap: int  # the largest frame count the training-memory search will try
    warmup: int
    repeat: int
    time_budget_s: float


GPU = Plan(model="sd1", device="cuda", dtype="fp16", size=512, frames=24, fit_frames=8, long_frames=150, window=24,
           steps=50, measured_steps=4, budget_gib=23.0, max_frames_cap=512, warmup=2, repeat=5,
           time_budget_s=8 * 60)
# the same logic on the CPU in seconds: figures without meaning, every key present
TINY = Plan(model="tiny", device="cpu", dtype="fp32", size=64, frames=4, fit_frames=2, long_frames=10, window=4,
            steps=3, measured_steps=2, budget_gib=1.0, max_frames_cap=8, warmup=0, repeat=1, time_budget_s=8 * 60)
LONG_CLIP = dict(video_seconds=10, fps=30, stride=2)  # 150 frames
TARGETS = dict(long_clip_peak_gb=12, long_clip_seconds=180, train_500_steps_s=120, train_peak_gb=12,
               controlled_edit_peak_gb=12)
TRAIN_STEPS = 500
MIN_JOB_S = 20  # no job is started with less of the time budget left
PROCESS_S = 30  # a job's own start: Python, torch and diffusers imported, the models built


def extrapolate(step_seconds: list[float], steps: int) -> float:
    """Seconds of `steps` steps from the first ones measured: the first as measured (it holds one-time costs), every
    later one as the mean of the later ones measured."""
    steady = step_seconds[1:] or step_seconds
    return sum(step_seconds) + (steps - len(step_seconds)) * sum(steady) / len(steady)


def largest_fitting(points: list[tuple[int, float]], budget: float, cap: int) -> int:
    """The most frames whose memory stays within `budget` on the line through the two `(frames, memory)` points, at
    least 1 and at most `cap`."""
    (f0, m0), (f1, m1) = points
    slope = (m1 - m0) / (f1 - f0)
    if slope <= 0:
        return cap
    return max(1, min(cap, math.floor(f1 + (budget - m1) / slope)))


def figures(row: dict, *keys: str) -> dict:
    """The measured figures of a benchmark row (or its error)."""
    if "error" in row:
        return dict(frames=row["frames"], error=row["error"])
    kept = ("frames", "size", "seconds", "peak_gb", "reserved_gb", "tflops_per_s") + keys
    return {key: row[key] for key in kept if key in row}


class Check:
    """Runs the plan's jobs one by one within its time budget, writing the report after each."""

    def __init__(self, plan: Plan, path: Path):
        import diffusers
        import torch

        self.plan, self.path, self.start = plan, path, time.monotonic()
        card = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU"
        self.report = dict(
            device=card, torch=torch.__version__, diffusers=diffusers.__version__, model=plan.model,
            dtype=plan.dtype, date=datetime.date.today().isoformat(), tiny=plan.model == "tiny",
            plan=asdict(plan), targets=TARGETS,
        )

    def job(self, job: str, frames: int, **overrides) -> dict:
        plan = self.plan
        spec = dict(job=job, attention="sdpa", allocator="mallopt", frames=frames, size=plan.size, model=plan.model,
                    device=plan.device, dtype=plan.dtype, warmup=plan.warmup, repeat=plan.repeat, window=None,
                    steps=1, compile=False) | overrides
        left = plan.time_budget_s - (time.monotonic() - self.start)
        if left < MIN_JOB_S:
            row = dict(spec, error="skipped: the time budget is spent")
        else:
            row = measure(spec, timeout=left)
        print(format_row(row), flush=True)
        return row

    def save(self, key: str, value: dict) -> None:
        self.report[key] = value
        self.report.pop("elapsed_s", None)  # kept last
        self.report["elapsed_s"] = time.monotonic() - self.start
        self.path.write_text(json.dumps(self.report, indent=2))

    def run(self) -> dict:
        plan = self.plan
        train = self.job("train", plan.frames)
        estimate = {} if "error" in train else dict(
            estimate_500_steps_s=TRAIN_STEPS * train["seconds"],
            meets_targets=(TRAIN_STEPS * train["seconds"] <= TARGETS["train_500_steps_s"]
                           and train["peak_gb"] <= TARGETS["train_peak_gb"] * GB),
        )
        self.save("train_step", figures(train) | estimate)
        self.save("denoise_step", figures(self.job("denoise", plan.frames)))
        edit = self.job("edit", plan.frames, window=plan.frames, steps=plan.steps)
        self.save("edit", figures(edit, "windows", "steps", "encode_s", "invert_s", "denoise_s", "decode_s",
                                  "weights_gb"))
        controlled = self.job("edit", plan.frames, window=plan.frames, steps=plan.steps, controlnets=1)
        self.save("controlled_edit", figures(controlled, "windows", "steps", "encode_s", "invert_s", "denoise_s",
                                             "decode_s", "weights_gb", "controlnets") | (
            {} if "error" in controlled else
            dict(meets_targets=controlled["peak_gb"] <= TARGETS["controlled_edit_peak_gb"] * GB)))
        long_clip = self.long_clip_estimate()
        self.save("long_clip", long_clip)
        self.save("max_frames_24gb", self.max_frames(train))
        self.save("long_clip", self.long_clip_whole(long_clip))
        for job in ("local", "local-null"):  # last: a local edit, DDIM then null-text inversion, in what time is left
            row = self.job(job, plan.frames, window=plan.frames, steps=plan.steps)
            self.save(f"{job.replace('-', '_')}_edit", figures(row, "windows", "steps", "encode_s", "local_s",
                                                                 "decode_s", "weights_gb"))
        return self.report

    def long_clip_estimate(self) -> dict:
        """The long clip from its first steps: encode and decode measured, the other steps extrapolated."""
        plan = self.plan
        result = dict(LONG_CLIP, frames=plan.long_frames, size=plan.size, window=plan.window,
                      overlap=plan.window // 4, steps=plan.steps, measured_steps=plan.measured_steps)
        row = self.job("edit", plan.long_frames, window=plan.window, steps=plan.measured_steps)
        if "error" in row:
            return result | figures(row)
        seconds = (row["encode_s"] + extrapolate(row["invert_step_s"], plan.steps)
                   + extrapolate(row["denoise_step_s"], plan.steps) + row["decode_s"])
        result["windows"] = row["windows"]
        result["estimate"] = dict(
            seconds=seconds, peak_gb=row["peak_gb"], measured_seconds=row["seconds"],
            encode_s=row["encode_s"], decode_s=row["decode_s"], invert_step_s=row["invert_step_s"],
            denoise_step_s=row["denoise_step_s"],
            method=(f"encode and decode of all frames measured; {plan.measured_steps} inversion and sampling steps "
                    f"measured, the other {plan.steps - plan.measured_steps} of each extrapolated as the mean of "
                    "the measured steps after the first; peak memory as measured (an edit keeps one latent of the "
                    "clip whatever its steps)"),
        )
        return result

    def long_clip_whole(self, result: dict) -> dict:
        """The long clip edited whole (all steps) when the estimate says the time budget allows it; the figures
        taken are the measured ones then, else the estimate's."""
        plan = self.plan
        if "estimate" not in result:
            return result
        left = plan.time_budget_s - (time.monotonic() - self.start)
        needed = result["estimate"]["seconds"] + PROCESS_S
        if needed > left:
            whole = dict(skipped=f"estimated {needed:.0f} s, {left:.0f} s of the time budget left")
        else:
            row = self.job("edit", plan.long_frames, window=plan.window, steps=plan.steps)
            whole = figures(row, "encode_s", "invert_s", "denoise_s", "decode_s")
        taken = result["estimate"] if "seconds" not in whole else whole
        return result | dict(
            whole=whole, estimated=taken is result["estimate"], seconds=taken["seconds"], peak_gb=taken["peak_gb"],
            meets_targets=(taken["seconds"] <= TARGETS["long_clip_seconds"]
                           and taken["peak_gb"] <= TARGETS["long_clip_peak_gb"] * GB),
        )

    def max_frames(self, train: dict) -> dict:
        plan = self.plan
        memory = "reserved_gb" if plan.device == "cuda" else "peak_gb"
        result = dict(budget_gib=plan.budget_gib, size=plan.size, memory=memory, cap=plan.max_frames_cap)
        rows = [self.job("train", plan.fit_frames, warmup=1, repeat=1), train]
        if any("error" in row for row in rows):
            return result | dict(error="; ".join(row["error"] for row in rows if "error" in row))
        points = sorted((row["frames"], row[memory]) for row in rows)
        checked = []
        for _ in range(2):  # the line's answer, then (if it did not fit) the one its measured point gives
            frames = largest_fitting(points, plan.budget_gib, plan.max_frames_cap)
            if any(frames == done["frames"] for done in checked):
                break
            row = self.job("train", frames, warmup=1, repeat=1)
            checked.append(figures(row) | ({} if "error" in row else dict(fits=row[memory] <= plan.budget_gib)))
            if "error" in row or checked[-1]["fits"]:
                break
            points = [points[0], (frames, row[memory])]
        fitting = [done["frames"] for done in checked if done.get("fits")]
        return result | dict(line=[dict(frames=f, gib=m) for f, m in points], checked=checked,
                             largest_frames=max(fitting) if fitting else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", default="gpu_check.json", help="where the figures go")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model on the CPU (checks this script)")
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else GPU
    if plan.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; --tiny checks this script on the CPU")
    report = Check(plan, Path(args.json)).run()
    print(json.dumps(report, indent=2))
    print(f"wrote {args.json} in {report['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
