"""Edit a tuned clip from new prompts.

    python inference.py --model outputs/man-skiing --prompt "spider man is skiing on the beach, cartoon style"
    python inference.py --config configs/man-skiing.yaml --prompt "a panda is skiing" --prompt "a man is surfing"
    python inference.py --model outputs/man-skiing --prompt "a panda is skiing" --span all --stride 1
    python inference.py --model outputs/rabbit-jump --control refine --prompt "a origami rabbit is jumping on the
        grass" --blend rabbit --reweight origami=2          # a local edit (Video-P2P's attention control)
    python inference.py --p2p-config configs/rabbit-jump-p2p.yaml [--fast]   # a Video-P2P edit config

Writes, per prompt, `<prompt>.mp4` (H.264 with the source's sound over the same span) and, for edits of at most 128
frames, `<prompt>.gif`, plus `side-by-side.mp4` (the source and every edit), to <run>/edits unless --output-dir says
otherwise. By default the edit covers the tuned frames; --span all edits the whole clip, in overlapping windows.
Bad input ends with a one-line error; add --debug (or set TUNEAVIDEO_DEBUG=1) for the traceback, --verbose (or
TUNEAVIDEO_VERBOSE=1) for the libraries' own logs, progress bars and warnings.
"""

import argparse
from pathlib import Path

from tuneavideo.base_model import parse_lora
from tuneavideo.cli import OneLineArgumentParser, run_cli
from tuneavideo.editing import EditError, EditOptions, Span, edit, parse_span, run_folder
from tuneavideo.errors import UserError
from tuneavideo.local_editing import edit_p2p
from tuneavideo.pipelines.local_edit import GUIDANCE_SCALE, INVERSIONS, LocalEdit
from tuneavideo.models.unet import SPATIAL_ATTENTION
from tuneavideo.pipelines.prompt_alignment import CONTROLS, PromptControlError, parse_blend, parse_reweight


def span(text: str) -> Span:
    try:
        return parse_span(text)
    except EditError as err:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(err)) from None


def blend(text: str) -> tuple[str, str]:
    try:
        return parse_blend(text)
    except PromptControlError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--model", help="the tuned run folder (a training output_dir), e.g. outputs/man-skiing")
    run.add_argument("--config", help="the training config; its output_dir is the run folder")
    run.add_argument("--p2p-config", help="a Video-P2P edit config (configs/*-p2p.yaml): its prompts, words and "
                     "run folder; writes to <run>/results/ as Video-P2P does")
    parser.add_argument("--prompt", action="append", help="what the clip should become (repeatable)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the run's, else 0)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="DDIM sampling steps (default: 50)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: 12.5; 7.5, Video-P2P's, with --control)")
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
    parser.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="FILE[:SCALE]",
                        help="a LoRA (kohya / A1111 or diffusers .safetensors) fused on top of the run's model, times "
                             "SCALE (default 1; repeatable)")
    parser.add_argument("--output-dir", default=None, help="where to write (default: <run>/edits)")
    parser.add_argument("--no-audio", action="store_true", help="write silent MP4s")
    parser.add_argument("--evaluate", action="store_true",
                        help="score every edit and the source with the LOVEU-TGVE metrics into metrics.json (needs "
                             "./download_models.sh --eval)")
    local = parser.add_argument_group("local edits (Video-P2P's attention control)")
    local.add_argument("--control", choices=CONTROLS, default=None,
                       help="replace: swap words one for one; refine: add or change words (default: off)")
    local.add_argument("--source-prompt", default=None, help="the source branch's prompt (default: the tuned prompt)")
    local.add_argument("--blend", type=blend, default=None,
                       help="WORD or SOURCE_WORD:TARGET_WORD: change only where that word is (local blend)")
    local.add_argument("--reweight", action="append", default=[], metavar="WORD=FACTOR",
                       help="scale the attention to a word of the prompt (repeatable)")
    local.add_argument("--cross-replace-steps", type=float, default=0.2,
                       help="fraction of the steps with the source's cross-attention (default: 0.2)")
    local.add_argument("--self-replace-steps", type=float, default=0.5,
                       help="fraction of the steps with the source's temporal attention (default: 0.5)")
    local.add_argument("--blend-start", type=float, default=0.2,
                       help="fraction of the steps before the local blend starts (default: 0.2)")
    local.add_argument("--mask-threshold", type=float, default=0.3,
                       help="the blend word's attention, relative to its peak, that the mask takes, in (0, 1) "
                            "(default: 0.3)")
    local.add_argument("--inversion", choices=INVERSIONS, default="null-text",
                       help="null-text (default; needs --num-inference-steps = --num-inv-steps) or ddim "
                            "(Video-P2P's --fast)")
    local.add_argument("--fast", action="store_true", help="with --p2p-config: DDIM inversion only (Video-P2P's)")
    local.add_argument("--spatial-attention", choices=SPATIAL_ATTENTION, default=None,
                       help="with --p2p-config: the tuned UNet's frame rule, for folders tuned by Video-P2P's own "
                            "code (first_frame), whose config cannot say")
    return parser


def parse_args(argv: list[str]) -> tuple[Path, EditOptions]:
    """The run folder and the edit options `argv` asks for (checked further by `tuneavideo.editing.plan_edit`)."""
    return edit_options(parser().parse_args(argv))


def edit_options(args: argparse.Namespace) -> tuple[Path, EditOptions]:
    if args.fast or args.spatial_attention:
        raise UserError("--fast and --spatial-attention go with --p2p-config; use --inversion ddim for a fast edit")
    if args.prompt is None:
        raise UserError("give at least one --prompt")
    local = None
    if args.control is not None:
        local = LocalEdit(args.control, args.source_prompt, args.blend, parse_reweight(args.reweight),
                          args.cross_replace_steps, args.self_replace_steps, args.blend_start, args.mask_threshold,
                          args.inversion)
    elif args.source_prompt or args.blend or args.reweight:
        raise UserError("--source-prompt, --blend and --reweight need --control replace or refine")
    options = EditOptions(
        prompts=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        num_inv_steps=args.num_inv_steps, num_videos_per_prompt=args.num_videos_per_prompt, eta=args.eta,
        span=args.span, stride=args.stride, window=args.window, overlap=args.overlap, output_dir=args.output_dir,
        audio=not args.no_audio, evaluate=args.evaluate, local=local, loras=args.lora,
    )
    return run_folder(args.model, args.config), options


def p2p(args: argparse.Namespace) -> None:
    """A Video-P2P edit config, with its fixed 50/50/7.5 steps and guidance unless given."""
    if args.prompt or args.control:
        raise UserError("--p2p-config gives the prompts and the control itself; leave out --prompt and --control")
    guidance = args.guidance_scale if args.guidance_scale is not None else GUIDANCE_SCALE
    result = edit_p2p(args.p2p_config, args.fast, args.num_inference_steps, args.num_inv_steps, guidance,
                      args.spatial_attention)
    print(f"wrote the Video-P2P edit to {result.folder}:")
    for path in [*result.gifs, *result.videos, *([result.mask] if result.mask else [])]:
        print(f"  {path}")


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.p2p_config:
        return p2p(args)
    run, options = edit_options(args)
    result = edit(run, options)
    width, height = result.size
    frames = result.frames
    rate = f"{float(result.fps):g} fps" + (" (the source's variable rate: each frame held until the next one's time)"
                                           if result.variable_rate else "")
    print(f"wrote {len(result.videos)} edit(s) of source frames {frames.start}-{frames[-1]} (every {frames.step}), "
          f"{len(frames)} frames at {width}x{height}, {rate}, "
          f"{'with' if result.with_audio else 'without'} sound, to {result.folder}:")
    extra = [*([result.inversion] if result.inversion else []), *result.masks,
             *([result.metrics] if result.metrics else [])]
    for path in [*result.videos, *result.gifs, result.side_by_side, *extra]:
        print(f"  {path}")


if __name__ == "__main__":
    run_cli(main, "inference.py")
