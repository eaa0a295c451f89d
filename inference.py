"""Edit a tuned clip from new prompts.

    python inference.py --model outputs/man-skiing --prompt "spider man is skiing on the beach, cartoon style"
    python inference.py --config configs/man-skiing.yaml --prompt "a panda is skiing" --prompt "a man is surfing"

Writes, per prompt, `<prompt>.mp4` (H.264 with the source's sound over the same span) and `<prompt>.gif`, plus
`side-by-side.mp4` (the source and every edit), to <run>/edits unless --output-dir says otherwise.
Bad input ends with a one-line error; add --debug (or set TUNEAVIDEO_DEBUG=1) for the traceback.
"""

import argparse
import logging

from tuneavideo.cli import run_cli
from tuneavideo.editing import EditOptions, edit, run_folder


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--model", help="the tuned run folder (a training output_dir), e.g. outputs/man-skiing")
    run.add_argument("--config", help="the training config; its output_dir is the run folder")
    parser.add_argument("--prompt", action="append", required=True, help="what the clip should become (repeatable)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the run's, else 0)")
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM sampling steps (default: 50)")
    parser.add_argument("--guidance-scale", type=float, default=12.5, help="classifier-free guidance (default: 12.5)")
    parser.add_argument("--inv-steps", type=positive_int, default=50,
                        help="DDIM inversion steps (default: 50); the run's cached inversion is reused when it "
                             "has this many")
    parser.add_argument("--num-videos-per-prompt", type=positive_int, default=1, help="videos per prompt (default: 1)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta (default: 0, deterministic); > 0 makes seeded variations")
    parser.add_argument("--output-dir", default=None, help="where to write (default: <run>/edits)")
    parser.add_argument("--no-audio", action="store_true", help="write silent MP4s")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = EditOptions(
        prompts=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, inv_steps=args.inv_steps, num_videos_per_prompt=args.num_videos_per_prompt,
        eta=args.eta, output_dir=args.output_dir, audio=not args.no_audio,
    )
    result = edit(run_folder(args.model, args.config), options)
    width, height = result.size
    print(f"wrote {len(result.videos)} edit(s) at {width}x{height}, {float(result.fps):g} fps, "
          f"{'with' if result.with_audio else 'without'} sound, to {result.folder}:")
    for path in [*result.videos, *result.gifs, result.side_by_side]:
        print(f"  {path}")


if __name__ == "__main__":
    run_cli(main, "inference.py")
