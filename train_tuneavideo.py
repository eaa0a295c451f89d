"""Tune Stable Diffusion on one clip.

    python train_tuneavideo.py --config=configs/man-skiing.yaml
    python train_tuneavideo.py --config=configs/man-skiing.yaml max_train_steps=300 train_data.n_sample_frames=16
    python train_tuneavideo.py --config=configs/man-skiing.yaml --num-processes 2   # several GPUs

Everything after `--config` is a `key=value` override of the config file (see tuneavideo/config.py for every key).
Bad input ends with a one-line error; add --debug (or set TUNEAVIDEO_DEBUG=1) for the traceback, --verbose (or
TUNEAVIDEO_VERBOSE=1) for the libraries' own logs, progress bars and warnings.
"""

import argparse

from pathlib import Path

from tuneavideo.cli import OneLineArgumentParser, run_cli, run_processes
from tuneavideo.config import load_config
from tuneavideo.errors import UserError
from tuneavideo.training import train


def main(argv: list[str]) -> None:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/man-skiing.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_train_steps=300")
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="train in N processes, one per GPU (CPU workers without CUDA), as `accelerate launch "
                             "--multi_gpu --num_processes N` does (default: 1)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # a bad config is one line before any process starts
    if args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes == 1:
        train(cfg)
    else:
        run_processes(Path(__file__), [f"--config={args.config}", *args.overrides], args.num_processes)


if __name__ == "__main__":
    run_cli(main, "train_tuneavideo.py")
