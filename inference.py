"""Edit a tuned clip from new prompts.

    python inference.py --model outputs/man-skiing --prompt "spider man is skiing on the beach, cartoon style"
    python inference.py --config configs/man-skiing.yaml --prompt "a panda is skiing" --prompt "a man is surfing"
    python inference.py --model outputs/man-skiing --prompt "a panda is skiing" --span all --stride 1
    python inference.py --model outputs/rabbit-jump --control refine --prompt "a origami rabbit is jumping on the
        grass" --blend rabbit --reweight origami=2          # a local edit (Video-P2P's attention control)
    python inference.py --model outputs/man-skiing --prompt "a panda is skiing" \
        --controlnet checkpoints/control_v11p_sd15_canny --condition canny      # structure guidance
    python inference.py --model outputs/man-skiing --request request.json   # every setting from a file
    python inference.py --p2p-config configs/rabbit-jump-p2p.yaml [--fast]   # a Video-P2P edit config

Writes, per prompt, `<prompt>.mp4` (H.264 with the source's sound over the same span) and, for edits of at most 128
frames, `<prompt>.gif`, plus `<prompts>.side-by-side.mp4` (the source and every edit), with ControlNets
`<prompts>.condition.mp4` (what they follow), and `result.json`, to
<run>/edits unless --output-dir says otherwise. By default the edit covers the tuned frames; --span all edits the
whole clip, in overlapping windows. Each flag is a field of `tuneavideo.request.EditRequest` (its default and help
are the field's); --request reads them all from a JSON file of those fields, as the web app writes it.
Bad input ends with a one-line error; add --debug (or set TUNEAVIDEO_DEBUG=1) for the traceback, --verbose (or
TUNEAVIDEO_VERBOSE=1) for the libraries' own logs, progress bars and warnings.
"""

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path

from tuneavideo.base_model import parse_lora
from tuneavideo.cli import OneLineArgumentParser, run_cli
from tuneavideo.config import ControlNetConfig, load_config
from tuneavideo.editing import edit
from tuneavideo.errors import UserError
from tuneavideo.models.unet import SPATIAL_ATTENTION
from tuneavideo.p2p_edit import edit_p2p
from tuneavideo.request import (
    EditRequest,
    LocalEdit,
    parse_blend_words,
    parse_reweights,
    parse_span,
    parse_thresholds,
)
from tuneavideo.run import Run

# the request's fields whose flags are not their names: the one place the command line names them
FLAGS = {"prompts": "--prompt", "blend_words": "--blend", "reweights": "--reweight", "audio": "--no-audio",
         "gif": "--no-gif", "loras": "--lora", "controlnets": "--controlnet",
         "controlnet_inversion": "--no-controlnet-inversion"}
# text -> value, of fields that are not numbers (of a list field: of each item)
PARSERS = {"span": parse_span, "blend_words": parse_blend_words, "loras": parse_lora,
           "canny_thresholds": parse_thresholds}
METAVARS = {"prompts": "PROMPT", "reweights": "WORD=FACTOR", "blend_words": "WORD", "loras": "FILE[:SCALE]",
            "canny_thresholds": "LOW:HIGH"}
NOT_FLAGS = ("local", "controlnets")  # the local edit's settings and each ControlNet's are flags of their own


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def flag_names(message: str) -> str:
    """A request's message, its `field` names as the command line's flags."""
    names = {item.name for kind in (EditRequest, LocalEdit) for item in dataclasses.fields(kind)}
    return re.sub(r"`(\w+)`", lambda match: flag(match[1]) if match[1] in names else match[0], message)


def argument(parse: typing.Callable[[str], object]) -> typing.Callable[[str], object]:
    """`parse` as an argparse type: its own one-line message, in flag names."""
    if parse in (int, float, str):
        return parse

    def parsed(text: str) -> object:
        try:
            return parse(text)
        except UserError as err:  # argparse shows an ArgumentTypeError's own words
            raise argparse.ArgumentTypeError(flag_names(str(err))) from None

    parsed.__name__ = parse.__name__
    return parsed


def add_fields(group, kind: type) -> None:
    """A flag per field of `kind`, with the field's help; every default None (given: the field's default)."""
    hints = typing.get_type_hints(kind)
    for item in dataclasses.fields(kind):
        if item.name in NOT_FLAGS:
            continue
        hint, help = hints[item.name], item.metadata["help"]
        optional = isinstance(hint, types.UnionType)
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] if optional else [hint]
        if hint is bool:
            group.add_argument(flag(item.name), dest=item.name, action="store_const", const=not item.default,
                               help=f"not this: {help}" if item.default else help)
        elif typing.get_origin(kinds[0]) in (list, dict):
            group.add_argument(flag(item.name), dest=item.name, action="append", help=help,
                               type=argument(PARSERS.get(item.name, str)),
                               metavar=METAVARS.get(item.name, item.name.upper()))
        else:
            parse = PARSERS.get(item.name, kinds[0] if kinds[0] in (int, float) else str)
            group.add_argument(flag(item.name), dest=item.name, type=argument(parse), help=help,
                               metavar=METAVARS.get(item.name, item.name.upper()))


def parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--model", help="the tuned run folder (a training output_dir), e.g. outputs/man-skiing")
    run.add_argument("--config", help="the training config; its output_dir is the run folder")
    run.add_argument("--p2p-config", help="a Video-P2P edit config (configs/*-p2p.yaml): its prompts, words and "
                     "run folder; writes to <run>/results/ as Video-P2P does")
    parser.add_argument("--request", type=Path, help="every edit setting from this JSON file (the fields of "
                        "tuneavideo.request.EditRequest); no other edit flag then")
    add_fields(parser, EditRequest)
    add_fields(parser.add_argument_group("local edits (Video-P2P's attention control)"), LocalEdit)
    structure = parser.add_argument_group("structure guidance (repeatable: the n-th --condition and --controlnet-scale "
                                          "go with the n-th --controlnet)")
    structure.add_argument("--controlnet", action="append", metavar="MODEL",
                           help="a ControlNet: a diffusers folder, an original-format file or a hub id (default: the "
                                "one the run was tuned under, if any)")
    structure.add_argument("--condition", action="append", help="canny or depth (made from the source clip), or your "
                           "own condition video or folder of frames, one per source frame (default: canny)")
    structure.add_argument("--controlnet-scale", action="append", type=float, metavar="SCALE",
                           help="how strongly it guides (default: 1.0)")
    structure.add_argument("--no-controlnet", action="store_true",
                           help="no structure guidance, not even the ControlNet the run was tuned under")
    p2p = parser.add_argument_group("Video-P2P's edit configs")
    p2p.add_argument("--fast", action="store_true", help="with --p2p-config: DDIM inversion only (Video-P2P's)")
    p2p.add_argument("--spatial-attention", choices=SPATIAL_ATTENTION, default=None,
                     help="with --p2p-config: the tuned UNet's frame rule (default: the one its config records, "
                          "else first_frame, as Video-P2P's editing uses)")
    return parser


def given(args: argparse.Namespace, kind: type) -> dict:
    """The fields of `kind` given on the command line."""
    values = {item.name: getattr(args, item.name, None) for item in dataclasses.fields(kind)}
    values = {name: value for name, value in values.items() if value is not None and name not in NOT_FLAGS}
    if "reweights" in values:
        try:
            values["reweights"] = parse_reweights(values["reweights"])
        except UserError as err:
            raise UserError(flag_names(str(err))) from err
    return values


def parse_args(argv: list[str]) -> tuple[Path, EditRequest]:
    """The run folder and the edit request `argv` asks for (checked further by `tuneavideo.editing.plan_edit`)."""
    return edit_request(parser().parse_args(argv))


def edit_request(args: argparse.Namespace) -> tuple[Path, EditRequest]:
    if args.fast or args.spatial_attention:
        raise UserError("--fast and --spatial-attention go with --p2p-config; use --inversion ddim for a fast edit")
    fields, local = given(args, EditRequest), given(args, LocalEdit)
    controlnets = controlnet_settings(args)
    if controlnets is not None:
        fields["controlnets"] = controlnets
    if args.request is not None:
        if fields or local:
            raise UserError(f"--request holds every edit setting; leave out {flag([*fields, *local][0])}")
        return run_folder(args.model, args.config), EditRequest.load(args.request)
    if "control" not in local and local:
        raise UserError(f"{', '.join(flag(name) for name in local)}: local edit settings need --control replace or "
                        "refine")
    try:
        request = EditRequest(**fields, local=LocalEdit(**local) if local else None)
        request.check()
    except UserError as err:
        raise UserError(flag_names(str(err))) from err
    return run_folder(args.model, args.config), request


def controlnet_settings(args: argparse.Namespace) -> list[ControlNetConfig] | None:
    """The ControlNets of --controlnet, --condition and --controlnet-scale (paired in order), [] with --no-controlnet,
    None (the run's own) when none is given."""
    models, conditions, scales = args.controlnet or [], args.condition or [], args.controlnet_scale or []
    if args.no_controlnet:
        if models or conditions or scales:
            raise UserError("--no-controlnet: leave out --controlnet, --condition and --controlnet-scale")
        return []
    for name, values in (("--condition", conditions), ("--controlnet-scale", scales)):
        if values and len(values) != len(models):
            raise UserError(f"{name}: given {len(values)} times for {len(models)} --controlnet; give one per "
                            "--controlnet, in the same order (or none for the default)")
    if not models:
        return None
    return [ControlNetConfig(model, condition, scale) for model, condition, scale in
            zip(models, conditions or ["canny"] * len(models), scales or [1.0] * len(models))]


def run_folder(model: str | None, config: str | None) -> Path:
    """The run folder named by `model`, or the `output_dir` of the training config `config`, checked to be finished."""
    return Run(model if model is not None else load_config(config).output_dir).check_finished().folder


def p2p(args: argparse.Namespace) -> None:
    """A Video-P2P edit config, with its fixed 50/50/7.5 steps and guidance unless given."""
    if args.prompts or args.control or args.request:
        raise UserError("--p2p-config gives the prompts and the control itself; leave out --prompt, --control and "
                        "--request")
    settings = {name: value for name, value in given(args, EditRequest).items()
                if name in ("num_inference_steps", "num_inv_steps", "guidance_scale")}
    result = edit_p2p(args.p2p_config, args.fast, spatial_attention=args.spatial_attention, **settings)
    print(f"wrote the Video-P2P edit to {result.folder}:")
    for path in [*result.gifs, *result.videos, *([result.mask] if result.mask else [])]:
        print(f"  {path}")


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.p2p_config:
        return p2p(args)
    run, request = edit_request(args)
    try:
        result = edit(run, request)
    except UserError as err:
        raise UserError(flag_names(str(err)) if args.request is None else str(err)) from err
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
