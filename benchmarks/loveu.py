"""Rerun the LOVEU-TGVE 2023 text-guided video editing benchmark with this project: tune on every video, edit it
with its four prompts, write the submission folder and score it with the benchmark's metrics.

    python -m benchmarks.loveu --data data/loveu-tgve-2023 --configs loveu-tgve-2023/configs/loveu-tgve-2023
    accelerate launch --multi_gpu --num_processes 4 -m benchmarks.loveu --data ... --configs ...
    python -m benchmarks.loveu --data ... --configs ... --only DAVIS_480p/gold-fish --max-train-steps 100

For every config `CONFIGS/<set>/<video>.yaml` it tunes on `DATA/<set>/480p_frames/<video>` (train_tuneavideo.py,
one process per video), edits the tuned frames with each prompt of the config (style, object, background,
multiple), writes them as `OUT/submission/<set>/<video>/<type>/00000.jpg ...`, scores each edit (CLIP frame
consistency, CLIP text alignment, PickScore) and prints the leaderboard's table per set and overall, beside the
published Tune-A-Video figures. Everything done is kept: run it again after a stop and it goes on where it was.
Under `accelerate launch` the videos are shared out between the processes; the first prints the table.
`KEY=VALUE` overrides apply to every config (see tuneavideo/config.py), e.g. mixed_precision=bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers.training_utils import free_memory

from benchmarks.loveu_runs import (
    Layout,
    Video,
    check_overrides,
    find_videos,
    load_record,
    make_edits,
    score_edits,
    set_order,
    single_process_environment,
    tune,
    unscored,
    video_config,
)
from tuneavideo.atomic import atomic_path
from tuneavideo.checks import check_sd_folder
from tuneavideo.cli import OneLineArgumentParser, run_cli
from tuneavideo.config import TrainConfig
from tuneavideo.errors import UserError
from tuneavideo.evaluate import CLIP_MODEL, PICKSCORE_MODEL, PICKSCORE_PROCESSOR, Evaluator, evaluation_models
from tuneavideo.progress import progress_bar

NUM_VIDEOS = 76  # in the benchmark: 16 DAVIS, 23 YouTube, 37 Videvo, each with 4 prompts
FIGURES = ("frame_consistency", "text_alignment", "pickscore")
# The original Tune-A-Video on the LOVEU-TGVE 2023 leaderboard (published figures; frame consistency x100).
BASELINE = {"name": "Tune-A-Video", "source": "published LOVEU-TGVE 2023 leaderboard figures",
            "frame_consistency": 92.40, "text_alignment": 27.12, "pickscore": 20.36}
# How long a process that finished its videos waits for the others: shares of a few long videos can differ by hours.
GATHER_TIMEOUT = timedelta(days=7)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m benchmarks.loveu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="the unpacked dataset, holding <set>/480p_frames/<video>/*.jpg (loveu-tgve-2023.zip "
                             "unpacks to a folder loveu-tgve-2023)")
    parser.add_argument("--configs", type=Path, required=True,
                        help="the benchmark's configs/loveu-tgve-2023, holding <set>/<video>.yaml")
    parser.add_argument("--output", type=Path, default=Path("outputs/loveu-tgve-2023"),
                        help="where runs, submission and results go (default: outputs/loveu-tgve-2023)")
    parser.add_argument("--pretrained-model", help="Stable Diffusion folder (default: each config's "
                        "pretrained_model_path, ./checkpoints/stable-diffusion-v1-4)")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="run only SET or SET/VIDEO (shell wildcards; repeatable)")
    parser.add_argument("--max-train-steps", type=int, help="tuning steps (default: the configs' 500)")
    parser.add_argument("--num-frames", type=int,
                        help="tune and edit the first N frames of each video (default: all, the configs' 32 or 128)")
    parser.add_argument("--num-inference-steps", type=int, help="DDIM sampling steps (default: the configs' 50)")
    parser.add_argument("--num-inv-steps", type=int, help="DDIM inversion steps (default: the configs' 50)")
    parser.add_argument("--skip-eval", action="store_true", help="write the submission without scoring it")
    parser.add_argument("--clip-model", help=f"CLIP folder or hub id (default: {CLIP_MODEL})")
    parser.add_argument("--pickscore-model", help=f"PickScore folder or hub id (default: {PICKSCORE_MODEL})")
    parser.add_argument("--pickscore-processor", help=f"PickScore's processor (default: {PICKSCORE_PROCESSOR})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every video")
    args = parser.parse_args(argv)
    for name in ("max_train_steps", "num_frames", "num_inference_steps", "num_inv_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The options as config overrides, then the user's own. `--num-frames` tunes one fixed window, the first N
    frames, so that the edit (of the tuned window) covers exactly the frames tuned."""
    check_overrides(args.overrides)
    named = []
    if args.max_train_steps is not None:
        named.append(f"max_train_steps={args.max_train_steps}")
    if args.num_frames is not None:
        named += [f"train_data.n_sample_frames={args.num_frames}", "train_data.window=fixed"]
    if args.num_inference_steps is not None:
        named.append(f"validation_data.num_inference_steps={args.num_inference_steps}")
    if args.num_inv_steps is not None:
        named.append(f"validation_data.num_inv_steps={args.num_inv_steps}")
    return named + list(args.overrides)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # checks first, in every process alike: bad input fails in seconds, before any tuning
    if not args.data.is_dir():
        raise UserError(f"--data {args.data}: no such folder; download loveu-tgve-2023.zip (see the benchmark's "
                        "README) and give the loveu-tgve-2023 folder it unpacks to")
    videos = find_videos(args.configs, args.only)
    if (args.data / "loveu-tgve-2023").is_dir() and not any((args.data / video.set).is_dir() for video in videos):
        raise UserError(f"--data {args.data}: holds the folder loveu-tgve-2023; give that folder as --data")
    layout = Layout(args.output)
    overrides = config_overrides(args)
    configs = {video: video_config(video, args.data, layout, overrides, args.pretrained_model) for video in videos}
    for base in sorted({cfg.pretrained_model_path for cfg in configs.values()}):
        check_sd_folder(base)
    try:
        models = None if args.skip_eval else evaluation_models(args.clip_model, args.pickscore_model,
                                                               args.pickscore_processor)
    except UserError as err:
        raise UserError(f"{err}, or add --skip-eval") from None

    state = process_state()
    mine = videos[state.process_index :: state.num_processes]
    # the launcher stopping this process (another one failed) stops its tuning subprocess too
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        records = run_share(mine, configs, layout, state)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if models is not None and any(unscored(record, models) for record in records):
        # the scoring models load once, after this process's tunings: on the GPU they would leave those less memory
        evaluator = Evaluator(**models, device=state.device)
        for video, record in progress_bar(list(zip(mine, records)), desc="scoring", unit="video"):
            score_edits(video, layout, record, evaluator, models)
    everything = gather_object(records)
    if state.is_main_process:
        report(everything, layout, args, overrides, models)


def run_share(videos: list[Video], configs: dict[Video, TrainConfig], layout: Layout,
              state: PartialState) -> list[dict]:
    """Tune and edit this process's `videos`, one after the other; returns their records (unscored ones too)."""
    env = single_process_environment(state.device.type, state.device.index)
    records = []
    progress = progress_bar(videos, desc=f"process {state.process_index}" if state.num_processes > 1 else "videos",
                    unit="video", position=state.process_index, dynamic_ncols=True)
    for video in progress:
        cfg = configs[video]
        progress.set_postfix_str(f"tuning {video.id}")
        if not tune(video, cfg, layout, env):
            progress.write(f"{video.id}: tuned already")
        record = load_record(video, layout, cfg.train_data.n_sample_frames)
        record["process"] = [state.process_index, state.num_processes]
        progress.set_postfix_str(f"editing {video.id}")
        try:
            edited = make_edits(video, cfg, layout, record)
        except UserError:
            raise  # one line, naming the video
        except Exception as err:  # a bug keeps its traceback, with the video named under it
            err.add_note(f"while editing {video.id}")
            raise
        free_memory()  # the edit's GPU memory back, before the next tuning (another process) needs it
        progress.write(f"{video.id}: edited {', '.join(edited)}" if edited else f"{video.id}: edited already")
        records.append(record)
    progress.close()
    return records


def process_state() -> PartialState:
    """This process's place among the launched ones (the only one without `accelerate launch`). The processes
    meet only to gather the results, over gloo whatever the device, with a timeout long enough for uneven shares;
    without CUDA, `cpu` makes them CPU workers (accelerate would otherwise run them as unrelated processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return PartialState(cpu=not torch.cuda.is_available(), backend="gloo", timeout=GATHER_TIMEOUT)
    return PartialState()


def edit_means(edits: list[dict]) -> dict[str, float | None]:
    """The mean of each figure over `edits`, as the benchmark's run_eval.py averages (None while one is unscored)."""
    if not edits or not all(edit.get("scores") for edit in edits):
        return dict.fromkeys(FIGURES)
    return {figure: math.fsum(edit["scores"][figure] for edit in edits) / len(edits) for figure in FIGURES}


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per set and overall ("all"), of `records` in the benchmark's order: videos, edits, and each figure's mean over
    the edits."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["set"], []).append(record)
    groups["all"] = records
    summary = {}
    for name, group in groups.items():
        edits = [edit for record in group for edit in record["edits"].values()]
        summary[name] = {"videos": len(group), "edits": len(edits), **edit_means(edits)}
    return summary


def format_table(summary: dict[str, dict]) -> str:
    def row(name: str, videos: object, edits: object, figures: dict) -> str:
        values = [f"{figures[f]:>13.2f}" if figures.get(f) is not None else f"{'-':>13}" for f in FIGURES]
        return f"{name:<40} {videos!s:>6} {edits!s:>6}" + "".join(values)

    lines = [f"{'LOVEU-TGVE 2023':<40} {'videos':>6} {'edits':>6} {'consistency':>13} {'text':>13} {'PickScore':>13}"]
    lines += [row(name, s["videos"], s["edits"], s) for name, s in summary.items()]
    lines.append(row(f"{BASELINE['name']} (published leaderboard)", NUM_VIDEOS, 4 * NUM_VIDEOS, BASELINE))
    return "\n".join(lines)


def report(records: list[dict], layout: Layout, args: argparse.Namespace, overrides: list[str],
           models: dict[str, str] | None) -> None:
    """Print the table and write OUT/results.json: every video's edits and scores, the summary, the baseline."""
    records = sorted(records, key=lambda r: (set_order(r["set"]), r["video"]))
    for record in records:
        record["mean"] = edit_means(list(record["edits"].values()))
    summary = summarize(records)
    with atomic_path(layout.output / "results.json") as path:
        path.write_text(json.dumps({
            "benchmark": "LOVEU-TGVE 2023", "overrides": overrides, "models": models, "summary": summary,
            "baseline": BASELINE, "videos": records,
        }, indent=1))
    print(format_table(summary))
    print("Consistency: CLIP frame consistency x100; text: CLIP text alignment; PickScore: PickScore_v1; the "
          "Tune-A-Video row gives the published leaderboard figures.")
    if args.skip_eval:
        print("Not scored (--skip-eval): run the same command without it to score the submission.")
    if len(records) != NUM_VIDEOS or overrides:
        print(f"Not comparable with the published figures: {len(records)} of the benchmark's {NUM_VIDEOS} videos"
              + (f", with {' '.join(overrides)}" if overrides else "") + ".")
    print(f"Submission: {layout.output / 'submission'}; results: {layout.output / 'results.json'}")


if __name__ == "__main__":
    run_cli(main, "python -m benchmarks.loveu")
