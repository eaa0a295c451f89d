"""The benchmark scripts: option handling, the tiny model through every new job, and gpu_check.sh on the CPU.

These check that the scripts run and report what they claim to; the figures themselves (real size) come from running
the scripts, never from tests.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.state import AcceleratorState

from benchmarks import benchmark, gpu_check
from tests.helpers import ROOT
from tuneavideo.pipelines.windows import plan_windows


def child_args(*options: str):
    """Options of a child measurement of the tiny model on the CPU, glibc's allocator left alone."""
    return benchmark.parse_args(["--child", "--model", "tiny", "--sizes", "64", "--allocator", "default", *options])


@pytest.fixture
def tiny_job():
    """Run a tiny job in this process, each with a fresh accelerate state (the train job makes an `Accelerator`);
    the thread count it sets (1) is put back afterwards."""
    threads = torch.get_num_threads()

    def run(*options):
        AcceleratorState._reset_state(True)
        return benchmark.run_job(child_args(*options))

    yield run
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


def test_bad_options_are_refused():
    for bad in (["--allocator", "tcmalloc"], ["--sizes", "100"], ["--frames", "0"], ["--window", "0"],
                ["--jobs", "edit", "--steps", "0"], ["--jobs", "sample"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)


def test_grid_and_child_command_round_trip():
    args = benchmark.parse_args(["--jobs", "vae", "edit", "--frames", "4", "10", "--sizes", "256", "--window", "4",
                                 "--attention", "sdpa", "plain", "--allocator", "mallopt", "default", "--steps", "3"])
    specs = list(benchmark.specs(args))
    # vae: 1 attention x 2 allocators x 2 frame counts; edit: 2 x 2 x 2
    assert len(specs) == 4 + 8
    assert {spec["attention"] for spec in specs if spec["job"] == "vae"} == {"sdpa"}
    spec = specs[-1]
    command = benchmark.child_command(spec)
    assert command[1:4] == ["-m", "benchmarks.benchmark", "--child"]
    child = benchmark.parse_args(command[3:])
    assert (child.jobs, child.frames, child.sizes, child.window, child.steps) == (["edit"], [10], [256], 4, 3)
    assert (child.attention, child.allocator, child.model) == (["plain"], ["default"], "sd1")


def test_child_environment_leaves_the_allocator_to_the_option(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    environment = benchmark.child_environment()
    assert "MALLOC_MMAP_THRESHOLD_" not in environment and "GLIBC_TUNABLES" not in environment
    assert environment["PATH"] == os.environ["PATH"]


MALLOPT_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    from tuneavideo.cli import release_freed_memory

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "mallopt":
        release_freed_memory()
    libc.free(libc.malloc(8 << 20))  # by default, freeing an mmapped block raises glibc's threshold above it
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblkhd - before >= 2 << 20)  # whether the 2 MiB block is mmapped
""")


@pytest.mark.e2e
@pytest.mark.parametrize("allocator, mmapped", [("default", "False"), ("mallopt", "True")])
def test_mallopt_serves_large_blocks_from_mmap(allocator, mmapped):
    """What `--allocator mallopt` relies on: after `release_freed_memory()` a 2 MiB block is mmapped (so freeing it
    returns it to the system), where glibc's default, its threshold raised, takes it from the heap."""
    done = subprocess.run([sys.executable, "-c", MALLOPT_PROBE, allocator], capture_output=True, text=True, cwd=ROOT,
                          env=benchmark.child_environment())
    if "mallinfo2" in done.stderr:
        pytest.skip("not glibc >= 2.33")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == mmapped


@pytest.mark.e2e
def test_tiny_edit_runs_every_window_and_step(tiny_job):
    result = tiny_job("--jobs", "edit", "--frames", "10", "--window", "4", "--steps", "2")
    assert len(result["invert_step_s"]) == len(result["denoise_step_s"]) == 2
    phases = [result[f"{phase}_s"] for phase in ("encode", "invert", "denoise", "decode")]
    assert all(seconds > 0 for seconds in phases) and sum(phases) <= result["seconds"]
    assert 0 < result["weights_gb"] < result["peak_gb"]


@pytest.mark.parametrize("job, phases", [("local", 2), ("local-null", 3)])
def test_tiny_local_edit_runs_inversion_null_text_and_sampling(tiny_job, job, phases):
    row = tiny_job("--jobs", job, "--frames", "6", "--window", "4", "--steps", "2")
    # one progress call per step of each phase: DDIM inversion, (null-text inversion,) controlled sampling
    assert len(row["local_step_s"]) == phases * 2
    assert row["local_s"] >= sum(row["local_step_s"]) > 0 and row["decode_s"] > 0 and row["encode_s"] > 0


@pytest.mark.e2e
def test_tiny_train_step_is_the_trainings_step(tiny_job):
    """The job runs `tuneavideo.training_step.TrainingStep` and reports its loss; the mixed precision is the
    accelerator's: bf16 gives nearly the loss of float32 (the same seed draws the same noise and timestep), not it."""
    full = tiny_job("--jobs", "train", "--frames", "3")
    half = tiny_job("--jobs", "train", "--frames", "3", "--dtype", "bf16")
    assert full["seconds"] > 0 and full["peak_gb"] > 0
    assert math.isfinite(full["loss"]) and full["loss"] > 0
    assert half["loss"] == pytest.approx(full["loss"], rel=0.05) and half["loss"] != full["loss"]


@pytest.mark.e2e
def test_measure_runs_jobs_in_fresh_processes(tmp_path, monkeypatch):
    """Each job runs in a process of its own (the GPU machine gets diffusers, peft, omegaconf, PyAV and imageio-ffmpeg
    as wheels: benchmarks/gpu_wheels.sh)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = benchmark.parse_args(["--model", "tiny", "--jobs", "edit", "train", "local", "--frames", "6", "--sizes",
                                 "64", "--window", "4", "--allocator", "default", "--steps", "2"])
    edit, train, local = [benchmark.measure(spec) for spec in benchmark.specs(args)]
    assert not [row["error"] for row in (edit, train, local) if "error" in row]
    assert edit["windows"] == 2 and 0 < edit["weights_gb"] < edit["peak_gb"] and train["peak_gb"] > 0
    assert local["windows"] == 2 and len(local["local_step_s"]) == 2 + 2  # 2 inversion steps, then 2 sampling steps
    assert benchmark.format_row(edit).split()[:6] == ["edit", "sdpa", "default", "6", "64", "2"]


def test_extrapolation_keeps_the_first_step_and_repeats_the_later_ones():
    assert gpu_check.extrapolate([5.0, 1.0, 3.0], 10) == pytest.approx(5 + 1 + 3 + 7 * 2)
    assert gpu_check.extrapolate([2.0], 4) == pytest.approx(8)


def test_largest_fitting_frame_count():
    # 1 GiB per frame over 4 GiB: 20 frames reach 24 GiB
    assert gpu_check.largest_fitting([(8, 12.0), (24, 28.0)], 24.0, 512) == 20
    assert gpu_check.largest_fitting([(8, 12.0), (24, 28.0)], 24.0, 16) == 16
    assert gpu_check.largest_fitting([(8, 30.0), (24, 46.0)], 24.0, 512) == 2
    assert gpu_check.largest_fitting([(8, 40.0), (24, 56.0)], 24.0, 512) == 1  # none fits: 1 is still tried
    assert gpu_check.largest_fitting([(2, 0.5), (4, 0.5)], 1.0, 8) == 8  # no growth: the cap


def fake_measure(spec: dict, timeout: float) -> dict:
    """A benchmark row without running anything: a training step's memory grows as 0.3 + 0.02 x frames^2 GiB (so a
    line through two points underestimates it), an edit's steps take 1 s per window and its VAE 0.1 s per frame."""
    row = dict(spec, seconds=0.5, peak_gb=0.3 + 0.02 * spec["frames"] ** 2)
    if spec["job"] == "edit":
        windows = len(plan_windows(spec["frames"], spec["window"]))
        steps = [float(windows)] * spec["steps"]
        row.update(windows=windows, encode_s=0.1 * spec["frames"], decode_s=0.1 * spec["frames"], invert_step_s=steps,
                   denoise_step_s=steps, invert_s=sum(steps), denoise_s=sum(steps), weights_gb=0.1,
                   seconds=0.2 * spec["frames"] + 2 * sum(steps))
    elif spec["job"] in ("local", "local-null"):  # inversion (null-text: twice), then source and target together
        steps = [1.0] * spec["steps"] * (3 if spec["job"] == "local-null" else 2)
        row.update(windows=1, encode_s=0.1 * spec["frames"], decode_s=0.2 * spec["frames"], local_step_s=steps,
                   local_s=sum(steps), weights_gb=0.1, seconds=0.3 * spec["frames"] + sum(steps))
    return row


def test_gpu_check_report_from_its_jobs(tmp_path, monkeypatch):
    """The check's own logic, its jobs faked: the 500-step estimate, the long clip extrapolated from its first steps
    (then measured whole, as time allows) and the search for the largest training step within the memory budget."""
    monkeypatch.setattr(gpu_check, "measure", fake_measure)
    plan = dataclasses.replace(gpu_check.TINY, max_frames_cap=64)
    report = gpu_check.Check(plan, tmp_path / "check.json").run()
    assert json.loads((tmp_path / "check.json").read_text()) == report
    assert report["train_step"]["estimate_500_steps_s"] == 250
    long_clip = report["long_clip"]  # 10 frames: 4 windows of 4; 3 steps, 2 measured
    assert long_clip["estimate"]["seconds"] == pytest.approx(1 + 3 * 4 + 3 * 4 + 1)
    assert not long_clip["estimated"] and long_clip["seconds"] == pytest.approx(2 + 2 * 3 * 4)
    # memory 0.38 at 2 frames and 0.62 at 4: the line says 7 (1.28 GiB, over 1.0), the line through 7 says 5 (0.8)
    fit = report["max_frames_24gb"]
    assert [(done["frames"], done["fits"]) for done in fit["checked"]] == [(7, False), (5, True)]
    assert fit["largest_frames"] == 5
    # last, a local edit of the check's frames with each inversion
    assert (report["local_edit"]["local_s"], report["local_null_edit"]["local_s"]) == (2 * plan.steps, 3 * plan.steps)
    assert list(report)[-3:] == ["local_edit", "local_null_edit", "elapsed_s"]
    # after the plain edit, the same edit under one ControlNet
    assert report["controlled_edit"]["controlnets"] == 1 and list(report).index("controlled_edit") == list(
        report).index("edit") + 1


@pytest.mark.e2e
@pytest.mark.slow
def test_gpu_check_tiny_on_the_cpu_writes_every_figure(tmp_path):
    """The whole GPU check at the tiny size on the CPU (about a minute: six fresh processes)."""
    path = tmp_path / "check.json"
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", str(path)], check=True, cwd=tmp_path,
                   env=dict(os.environ, PYTHON=sys.executable))
    report = json.loads(path.read_text())
    figures = ("train_step", "denoise_step", "edit", "controlled_edit", "long_clip", "max_frames_24gb", "local_edit",
               "local_null_edit")
    assert set(figures) <= set(report) and report["tiny"]
    assert not [key for key in figures if "error" in report[key]]
    assert {"seconds", "peak_gb", "estimate_500_steps_s", "meets_targets"} <= set(report["train_step"])
    assert report["edit"]["steps"] == gpu_check.TINY.steps and report["edit"]["windows"] == 1
    long_clip = report["long_clip"]
    estimate, whole = long_clip["estimate"], long_clip["whole"]
    assert long_clip["windows"] == 4 and len(estimate["invert_step_s"]) == gpu_check.TINY.measured_steps
    assert estimate["seconds"] > sum(estimate["invert_step_s"]) + sum(estimate["denoise_step_s"])
    # the tiny edit fits the time budget, so it is also run whole, and those figures are taken
    assert not long_clip["estimated"] and long_clip["seconds"] == whole["seconds"]
    assert {"seconds", "peak_gb", "invert_s", "denoise_s"} <= set(whole) and "meets_targets" in long_clip
    assert report["max_frames_24gb"]["largest_frames"] == gpu_check.TINY.max_frames_cap


def test_tiny_lora_tune_step_trains_adapters_and_reports_the_smaller_artefact(tiny_job):
    """lora-tune is the training's step with `tuning: lora`, with fewer tuned tensors to save than full tuning (the
    query weights become rank-2 adapters; the temporal layers are saved whole by both)."""
    full = tiny_job("--jobs", "train", "--frames", "3")
    lora = tiny_job("--jobs", "lora-tune", "--frames", "3", "--lora-rank", "2")
    assert math.isfinite(lora["loss"]) and lora["loss"] > 0 and lora["seconds"] > 0 and lora["peak_gb"] > 0
    assert 0 < lora["tuned_mb"] < full["tuned_mb"]
    spec, = benchmark.specs(benchmark.parse_args(["--jobs", "lora-tune", "--frames", "3", "--sizes", "64",
                                                  "--lora-rank", "2"]))
    child = benchmark.parse_args(benchmark.child_command(spec)[3:])
    assert (child.jobs, child.lora_rank) == (["lora-tune"], 2)


@pytest.mark.e2e
def test_tiny_edit_under_a_controlnet_runs_inversion_and_sampling_under_it(tiny_job):
    args = benchmark.parse_args(["--jobs", "edit", "vae", "--controlnets", "0", "1", "--frames", "4", "--sizes", "64"])
    assert [(spec["job"], spec["controlnets"]) for spec in benchmark.specs(args)] == [
        ("edit", 0), ("edit", 1), ("vae", 0)]  # ControlNets only for edits
    assert benchmark.child_command(dict(list(benchmark.specs(args))[1]))[-2:] == ["--controlnets", "1"]
    plain = tiny_job("--jobs", "edit", "--frames", "6", "--window", "4", "--steps", "2")
    controlled = tiny_job("--jobs", "edit", "--frames", "6", "--window", "4", "--steps", "2", "--controlnets", "2")
    assert len(controlled["invert_step_s"]) == len(controlled["denoise_step_s"]) == 2
    assert controlled["weights_gb"] > plain["weights_gb"]  # two ControlNets' weights on top
