"""The LOVEU-TGVE 2023 benchmark command end to end, offline on the CPU: two of the benchmark's own configs
(tests/loveu_configs, copied unchanged from showlab/loveu-tgve-2023 at d75589f) over a generated stand-in of its
dataset, with the tiny random SD model and tiny CLIP/PickScore models; one process and two, resuming, bad input.
The stand-in runs override size, frames and steps on the command line, as a quick run of the real data would."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPProcessor

from benchmarks.loveu import BASELINE, config_overrides, main, parse_args
from benchmarks.loveu_runs import (
    Layout,
    find_videos,
    frames_folder,
    load_record,
    make_edits,
    single_process_environment,
    video_config,
)
from tests.helpers import ROOT, train_in_process
from tests.test_evaluate import image_processor, tiny_clip
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.evaluate import Evaluator, read_frames
from tuneavideo.tiny import write_tokenizer

pytestmark = pytest.mark.e2e  # the tools run as processes

CONFIGS = ROOT / "tests" / "loveu_configs"
TYPES = ["style", "object", "background", "multiple"]
VIDEOS = {"DAVIS_480p": "gold-fish", "youtube_480p": "salsa"}
FIGURES = ("frame_consistency", "text_alignment", "pickscore")
# a quick run: 4 of the stand-in's frames at 64x64, one tuning step, 2 DDIM steps
QUICK = ["--max-train-steps", "1", "--num-frames", "4", "--num-inference-steps", "2", "--num-inv-steps", "2",
         "train_data.width=64", "train_data.height=64"]


def write_frames(folder: Path, num_frames: int, size: int, shift: int = 0) -> Path:
    """JPEG frames 00000.jpg ... of a gradient with a bar moving across it, as the benchmark's frame folders are."""
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:size, 0:size]
    for index in range(num_frames):
        frame = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 60)], axis=-1)
        left = (index * size // 8 + shift) % size
        frame[:, left : left + size // 8] = 250
        Image.fromarray(frame.astype(np.uint8)).save(folder / f"{index:05d}.jpg")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A stand-in of the unpacked dataset: <set>/480p_frames/<video>/*.jpg, 6 and 5 frames of 64x64."""
    root = tmp_path_factory.mktemp("loveu-data")
    for (name, video), frames in zip(VIDEOS.items(), (6, 5)):
        write_frames(root / name / "480p_frames" / video, frames, 64, shift=3 * frames)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP and PickScore stand-ins (as tests/test_evaluate.py builds them); the CLIP's processor serves
    PickScore too."""
    root = tmp_path_factory.mktemp("scorers")
    tokenizer = write_tokenizer(root / "tokenizer")
    tiny_clip(0, tokenizer, 8, 100.0).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(root / "clip")
    tiny_clip(1, tokenizer, 12, 20.0).save_pretrained(root / "pickscore")
    return {"clip_model": root / "clip", "pickscore_model": root / "pickscore", "pickscore_processor": root / "clip"}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from two threads, and on a loaded 2-core machine two spinning OpenMP threads make a
    tiny UNet call 100 times slower; the tuning subprocesses inherit OMP_NUM_THREADS."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def benchmark_args(data: Path, output: Path, tiny_sd: Path, models: dict, *extra: str) -> list[str]:
    model_options = [item for key, path in models.items() for item in (f"--{key.replace('_', '-')}", str(path))]
    return ["--data", str(data), "--configs", str(CONFIGS), "--output", str(output), "--pretrained-model",
            str(tiny_sd), *model_options, *QUICK, *extra]


def run_main(argv: list[str]) -> str:
    """`main` in this process (one process, like `python -m benchmarks.loveu`); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    return printed.getvalue()


@pytest.fixture(scope="module")
def one_process(data, tiny_sd, models, one_thread, tmp_path_factory) -> tuple[Path, str, str, int]:
    """The whole benchmark run by one process, first with a damaged frame in salsa (the second video), then,
    repaired, again: its output folder, what the second run printed, the first run's error, and the modification
    time of gold-fish's tuned tensors after the first run."""
    root = tmp_path_factory.mktemp("loveu-one")
    shutil.copytree(data, root / "data")
    damaged = root / "data" / "youtube_480p" / "480p_frames" / "salsa" / "00002.jpg"
    damaged.write_bytes(b"not a JPEG")
    argv = benchmark_args(root / "data", root / "out", tiny_sd, models)
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, "python -m benchmarks.loveu", argv)
    tuned = (root / "out" / "runs" / "DAVIS_480p" / "gold-fish" / "tuned_parameters.safetensors").stat().st_mtime_ns
    shutil.copy(data / "youtube_480p" / "480p_frames" / "salsa" / "00002.jpg", damaged)
    return root / "out", run_main(argv), str(stopped.value.code), tuned


def jpegs(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.jpg"))


def test_a_failed_video_stops_the_run_in_one_line_and_a_rerun_goes_on(one_process):
    output, printed, error, tuned = one_process
    assert error.startswith("python -m benchmarks.loveu: error: youtube_480p/salsa: tuning failed: ")
    assert "00002.jpg: cannot be read as an image" in error and "tune.log" in error and "\n" not in error
    # the rerun went on from there: gold-fish, done before the failure, was neither tuned nor edited again
    assert (output / "runs" / "DAVIS_480p" / "gold-fish" / "tuned_parameters.safetensors").stat().st_mtime_ns == tuned
    assert "DAVIS_480p/gold-fish: tuned already" in printed and "DAVIS_480p/gold-fish: edited already" in printed
    assert "youtube_480p/salsa: edited style, object, background, multiple" in printed


def test_one_process_writes_the_submission_results_and_table(one_process, models):
    output, printed, _, _ = one_process
    results = json.loads((output / "results.json").read_text())
    videos = {(record["set"], record["video"]): record for record in results["videos"]}
    assert set(videos) == set(VIDEOS.items())
    for (set_name, video), record in videos.items():
        prompts = load_config(CONFIGS / set_name / f"{video}.yaml").validation_data.prompts
        assert record["num_frames"] == 4 and record["process"] == [0, 1]
        assert {kind: edit["prompt"] for kind, edit in record["edits"].items()} == prompts
        for kind in TYPES:
            folder = output / "submission" / set_name / video / kind
            assert jpegs(folder) == [f"{i:05d}.jpg" for i in range(4)]  # exactly the tuned frames, in order
            with Image.open(folder / "00003.jpg") as image:
                assert (image.format, image.size) == ("JPEG", (64, 64))
        means = {f: sum(record["edits"][kind]["scores"][f] for kind in TYPES) / 4 for f in FIGURES}
        assert record["mean"] == pytest.approx(means, abs=1e-9)

    # the JPEGs are the edit's frames in order: each is closest to the same frame of the edit's MP4
    edit = videos["DAVIS_480p", "gold-fish"]["edits"]["object"]
    submitted = np.stack(read_frames(output / "submission" / "DAVIS_480p" / "gold-fish" / "object")).astype(float)
    mp4 = np.stack(read_frames(output / "runs" / "DAVIS_480p" / "gold-fish" / "edits" / f"{edit['prompt']}.mp4"))
    distances = np.abs(submitted[:, None] - mp4[None].astype(float)).mean(axis=(2, 3, 4))
    assert list(distances.argmin(axis=1)) == [0, 1, 2, 3] and distances.diagonal().max() < 12

    # the scores are the evaluator's on the submitted frames, each with its own prompt
    evaluator = Evaluator(**models)
    edit = videos["youtube_480p", "salsa"]["edits"]["object"]
    scores = evaluator.score(read_frames(output / "submission" / "youtube_480p" / "salsa" / "object"), edit["prompt"])
    assert [edit["scores"][f] for f in FIGURES] == pytest.approx([getattr(scores, f) for f in FIGURES], abs=1e-6)

    # per set and overall: the mean over the edits (run_eval.py's), here also the mean of the per-video figures
    summary = results["summary"]
    for name, group in [(s, [videos[s, v]]) for s, v in VIDEOS.items()] + [("all", list(videos.values()))]:
        edits = [edit for record in group for edit in record["edits"].values()]
        assert (summary[name]["videos"], summary[name]["edits"]) == (len(group), 4 * len(group))
        for figure in FIGURES:
            expected = sum(edit["scores"][figure] for edit in edits) / len(edits)
            assert summary[name][figure] == pytest.approx(expected, abs=1e-9)
            assert summary[name][figure] == pytest.approx(np.mean([r["mean"][figure] for r in group]), abs=1e-9)
    assert results["baseline"] == BASELINE
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()}
    for name in [*VIDEOS, "all"]:
        assert rows[name][1:3] == [str(summary[name]["videos"]), str(summary[name]["edits"])]
        assert rows[name][3:] == [f"{summary[name][f]:.2f}" for f in FIGURES]
    assert rows["Tune-A-Video"][-3:] == ["92.40", "27.12", "20.36"] and "published leaderboard" in printed
    assert "Not comparable with the published figures: 2 of the benchmark's 76 videos" in printed


def test_a_second_run_tunes_nothing_and_redoes_only_a_deleted_edit(one_process, tiny_sd, models):
    output = one_process[0]
    gone = output / "submission" / "DAVIS_480p" / "gold-fish" / "object"
    before = {path: path.read_bytes() for path in (output / "submission").rglob("*.jpg")}
    stamps = {path: path.stat().st_mtime_ns for path in before}
    runs = output / "runs"
    tuned = {path: path.stat().st_mtime_ns for path in runs.glob("*/*/tuned_parameters.safetensors")}
    logs = {path: path.read_bytes() for path in runs.glob("*/*/tune.log")}
    results = json.loads((output / "results.json").read_text())
    shutil.rmtree(gone)

    printed = run_main(benchmark_args(output.parent / "data", output, tiny_sd, models))
    assert {p: p.stat().st_mtime_ns for p in tuned} == tuned and len(tuned) == 2  # no tuning again
    assert {p: p.read_bytes() for p in logs} == logs
    assert jpegs(gone) == [f"{i:05d}.jpg" for i in range(4)]
    redone = {path for path in before if path.stat().st_mtime_ns != stamps[path]}
    assert redone == set(gone.glob("*.jpg"))  # that edit only
    assert all(path.read_bytes() == content for path, content in before.items())  # deterministic: the same frames
    again = json.loads((output / "results.json").read_text())
    assert again["summary"] == results["summary"]
    for line in ("DAVIS_480p/gold-fish: tuned already", "youtube_480p/salsa: tuned already",
                 "DAVIS_480p/gold-fish: edited object\n", "youtube_480p/salsa: edited already"):
        assert line in printed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_share_the_videos_and_the_first_prints_the_table(one_process, data, tiny_sd, models,
                                                                       tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "benchmarks.loveu",
               *benchmark_args(data, output, tiny_sd, models)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("LOVEU-TGVE 2023") == 1  # one table, from the first process

    results = json.loads((output / "results.json").read_text())
    processes = {record["video"]: record["process"] for record in results["videos"]}
    assert processes == {"gold-fish": [0, 2], "salsa": [1, 2]}  # round robin over the sorted videos
    for set_name, video in VIDEOS.items():
        log = (output / "runs" / set_name / video / "tune.log").read_text()
        assert "1 process(es) on cpu" in log  # each video tuned by one process, not by both together
        assert "Loading pipeline components" not in log and "[RANK" not in log  # no library chatter
        for kind in TYPES:
            assert jpegs(output / "submission" / set_name / video / kind) == [f"{i:05d}.jpg" for i in range(4)]
    # the same work as one process did: the same figures
    alone = json.loads((one_process[0] / "results.json").read_text())
    for name, figures in alone["summary"].items():
        assert [results["summary"][name][f] for f in FIGURES] == pytest.approx([figures[f] for f in FIGURES],
                                                                               abs=1e-4)


@pytest.mark.parametrize("change, expected", [
    (lambda a: a.update(data="missing"), "--data {tmp}/missing: no such folder"),
    (lambda a: a.update(only="nothing*"), "--only nothing*: matches no <set>/<video>"),
    (lambda a: a.update(model="{tmp}/no-model"), "pretrained_model_path {tmp}/no-model: no such folder"),
    (lambda a: a.update(clip="{tmp}/no-clip"), "--clip-model {tmp}/no-clip: no such folder, nor in the Hugging"),
    (lambda a: a.update(extra=["output_dir=elsewhere"]), "override 'output_dir=elsewhere': the benchmark sets"),
    (lambda a: a.update(extra=["max_train_stepz=3"]), "Did you mean: 'max_train_steps'?"),
    (lambda a: a.update(extra=["--max-train-steps", "0"]), "--max-train-steps must be >= 1, got 0"),
    (lambda a: a.update(extra=["--num-frames", "5"]), ("gold-fish.yaml: {tmp}/loveu-tgve-2023/DAVIS_480p/"
                                                       "480p_frames/gold-fish: has 4 frames but n_sample_frames=5")),
    (lambda a: a.update(data="."), "--data {tmp}: holds the folder loveu-tgve-2023; give that folder as --data"),
    (lambda a: a.update(only="youtube_480p"), ("youtube_480p/salsa.yaml: its frames {tmp}/loveu-tgve-2023/"
                                                "youtube_480p/480p_frames/salsa are missing")),
])
def test_bad_input_is_one_line_before_any_work(change, expected, tmp_path, tiny_sd, models):
    write_frames(tmp_path / "loveu-tgve-2023" / "DAVIS_480p" / "480p_frames" / "gold-fish", 4, 64)  # no salsa
    options = {"data": "loveu-tgve-2023", "only": "DAVIS_480p", "model": str(tiny_sd),
               "clip": str(models["clip_model"]), "extra": []}
    change(options)
    argv = ["--data", str(tmp_path / options["data"]), "--configs", str(CONFIGS), "--output", str(tmp_path / "out"),
            "--pretrained-model", options["model"].format(tmp=tmp_path), "--clip-model",
            options["clip"].format(tmp=tmp_path), "--only", options["only"], "--num-frames", "4", *options["extra"]]
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, "python -m benchmarks.loveu", argv)
    message = str(stopped.value.code)
    assert expected.format(tmp=tmp_path) in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing was started


def test_the_benchmark_configs_load_unchanged_and_point_at_the_data(tmp_path):
    videos = find_videos(CONFIGS)
    assert [v.id for v in videos] == ["DAVIS_480p/gold-fish", "youtube_480p/salsa"]  # the benchmark's set order
    assert [v.id for v in find_videos(CONFIGS, ["youtube*"])] == ["youtube_480p/salsa"]
    for video, frames in zip(videos, (32, 128)):
        cfg = load_config(video.config)
        data = cfg.train_data
        assert (data.n_sample_frames, data.sample_frame_rate, data.window, data.width, data.height) == (
            frames, 1, "random", 480, 480)
        assert list(cfg.validation_data.prompts) == TYPES
        # the configs' own video_path assumes the benchmark's ./data; the benchmark maps names onto --data
        assert data.video_path == f"./data/loveu-tgve-2023/{video.set}/480p_frames/{video.name}"
        folder = write_frames(frames_folder(tmp_path / "data", video), frames, 8)  # the video's own count, tiny
        mapped = video_config(video, tmp_path / "data", Layout(tmp_path / "out"), [])
        assert mapped.train_data.video_path == str(folder.resolve())
        assert mapped.output_dir == str((tmp_path / "out" / "runs" / video.set / video.name).resolve())
        # the config's base model without --pretrained-model (./checkpoints/...: relative to where it runs)
        assert mapped.pretrained_model_path == str(Path(cfg.pretrained_model_path).resolve())
        assert (mapped.max_train_steps, mapped.validation_steps) == (500, 500)  # validated once, at the end


def test_frame_overrides():
    # --num-frames tunes one fixed window, the first N frames, which the edit then covers
    overrides = config_overrides(parse_args(["--data", "d", "--configs", "c", "--num-frames", "2"]))
    cfg = load_config(CONFIGS / "DAVIS_480p" / "gold-fish.yaml", overrides)
    assert (cfg.train_data.n_sample_frames, cfg.train_data.window, cfg.validation_data.video_length) == (2, "fixed", 2)
    # the benchmark's own spelling works as an override too (only a file giving both names is refused)
    cfg = load_config(CONFIGS / "DAVIS_480p" / "gold-fish.yaml", ["train_data.num_frames=3"])
    assert (cfg.train_data.n_sample_frames, cfg.train_data.window) == (3, "random")


@pytest.mark.parametrize("set_name", list(VIDEOS))
def test_a_benchmark_config_tunes_and_edits_at_its_own_480x480(set_name, tmp_path, tiny_sd, one_thread):
    video = next(v for v in find_videos(CONFIGS) if v.set == set_name)
    data = tmp_path / "data"
    write_frames(frames_folder(data, video), 2, 480)
    layout = Layout(tmp_path / "out")
    # one DDIM step and no classifier-free guidance (a UNet call of 2 frames at 60x60 takes a second or two here)
    overrides = config_overrides(parse_args(["--data", str(data), "--configs", str(CONFIGS), "--num-frames", "2",
                                             "--max-train-steps", "1", "--num-inference-steps", "1",
                                             "--num-inv-steps", "1", "validation_data.guidance_scale=1"]))
    cfg = video_config(video, data, layout, overrides, str(tiny_sd))
    train_in_process(cfg)
    latent = torch.load(layout.run(video) / "inv_latents" / "ddim_latent-1.pt")
    assert latent.shape == (1, 4, 2, 60, 60)  # 480x480 frames, 8x smaller latents
    record = load_record(video, layout, 2)
    assert make_edits(video, cfg, layout, record) == TYPES
    for kind in TYPES:
        folder = layout.submission(video) / kind
        assert jpegs(folder) == ["00000.jpg", "00001.jpg"]
        with Image.open(folder / "00001.jpg") as image:
            assert image.size == (480, 480)
    assert not list((layout.run(video) / "edits").glob("*.gif"))  # no GIF: only the JPEGs are scored
    assert make_edits(video, cfg, layout, record) == []  # done


def test_a_tuning_of_one_process_leaves_the_launch_behind():
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                "TORCHELASTIC_RUN_ID": "none", "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1",
                "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,6"}
    env = single_process_environment("cuda", 1, launched)
    assert env == {"OMP_NUM_THREADS": "1", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "6"}  # its own GPU, as cuda:0
    assert single_process_environment("cuda", 1, {"PATH": "/bin"})["CUDA_VISIBLE_DEVICES"] == "1"
    assert single_process_environment("cpu", None, launched) == {"OMP_NUM_THREADS": "1", "PATH": "/bin",
                                                                 "CUDA_VISIBLE_DEVICES": "4,6"}
