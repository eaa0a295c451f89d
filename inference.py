"""Edit a tuned clip from new prompts.

    python inference.py --model outputs/man-skiing --prompt "spider man is skiing on the beach, cartoon style"
    python inference.py --config configs/man-skiing.yaml --prompt "a panda is skiing" --prompt "a man is surfing"
    python inference.py --model outputs/man-skiing --prompt "a panda is skiing" --span all --stride 1

Writes, per prompt, `<prompt>.mp4` (H.264 with the source's sound over the same span) and, for edits of at most 128
frames, `<prompt>.gif`, plus `side-by-side.mp4` (the source and every edit), to <run>/edits unless --output-dir says
otherwise. By default the edit covers the tuned frames; --span all edits the whole clip, in overlapping windows.
Bad input ends with a one-line error; add --debug (or set TUNEAVIDEO_DEBUG=1) for the traceback, --verbose (or
TUNEAVIDEO_VERBOSE=1) for the libraries' own logs, progress bars and warnings.
"""

import argparse
from pathlib import Path

from tuneavideo.cli import OneLineArgumentParser, run_cli
from tuneavideo.editing import EditError, EditOptions, Span, edit, parse_span, run_folder


def span(text: str) -> Span:
    try:
        return parse_span(text)
    except EditError as err:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str]) -> tuple[Path, EditOptions]:
    """The run folder and the edit options `argv` asks for (checked further by `tuneavideo.editing.plan_edit`)."""
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--model", help="the tuned run folder (a training output_dir), e.g. outputs/man-skiing")
    run.add_argument("--config", help="the training config; its output_dir is the run folder")
    parser.add_argument("--prompt", action="append", required=True, help="what the clip should become (repeatable)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the run's, else 0)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="DDIM sampling steps (default: 50)")
    parser.add_argument("--guidance-scale", type=float, default=12.5, help="classifier-free guidance (default: 12.5)")
    parser.add_argument("--num-inv-steps", type=int, default=50,
                        help="DDIM inversion steps (default: 50); a cached inversion with this many is reused")
    parser.add_argument("--num-videos-per-prompt", type=int, default=1, help="videos per prompt (default: 1)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta (default: 0, deterministic); > 0 makes seeded variations")
    parser.add_argument("--span", type=span, default=None,
                        help="what to edit: all, or START:END seconds of the source, either side optional "
                             "(default: the tuned frames)")
    parser.add_argument("--stride", type=int, default=None,
                        help="source frames per edited frame; 1 = every frame (default: the tuned sample_frame_rate)")
    parser.add_argument("--window", type=int, default=None,
                        help="frames per UNet call over a long span (default: the tuned n_sample_frames)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="frames shared by neighbouring windows (default: a quarter window)")
    parser.add_argument("--output-dir", default=None, help="where to write (default: <run>/edits)")
    parser.add_argument("--no-audio", action="store_true", help="write silent MP4s")
    parser.add_argument("--evaluate", action="store_true",
                        help="score every edit and the source with the LOVEU-TGVE metrics into metrics.json (needs "
                             "./download_models.sh --eval)")
    args = parser.parse_args(argv)
    options = EditOptions(
        prompts=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        num_inv_steps=args.num_inv_steps, num_videos_per_prompt=args.num_videos_per_prompt, eta=args.eta,
        span=args.span, stride=args.stride, window=args.window, overlap=args.overlap, output_dir=args.output_dir,
        audio=not args.no_audio, evaluate=args.evaluate,
    )
    return run_folder(args.model, args.config), options


def main(argv: list[str]) -> None:
    run, options = parse_args(argv)
    result = edit(run, options)
    width, height = result.size
    frames = result.frames
    rate = f"{float(result.fps):g} fps" + (" (the source's variable rate: each frame held until the next one's time)"
                                           if result.variable_rate else "")
    print(f"wrote {len(result.videos)} edit(s) of source frames {frames.start}-{frames[-1]} (every {frames.step}), "
          f"{len(frames)} frames at {width}x{height}, {rate}, "
          f"{'with' if result.with_audio else 'without'} sound, to {result.folder}:")
    for path in [*result.videos, *result.gifs, result.side_by_side, *([result.metrics] if result.metrics else [])]:
        print(f"  {path}")


if __name__ == "__main__":
    run_cli(main, "inference.py")
