"""Tune Stable Diffusion on one clip.

    python train_tuneavideo.py --config=configs/man-skiing.yaml
    python train_tuneavideo.py --config=configs/man-skiing.yaml max_train_steps=300 train_data.n_sample_frames=16
    accelerate launch -q --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        train_tuneavideo.py --config=configs/man-skiing.yaml                     # several GPUs

Everything after `--config` is a `key=value` override of the config file (see tuneavideo/config.py for every key).
Bad input ends with a one-line error; add --debug (or set TUNEAVIDEO_DEBUG=1) for the traceback, --verbose (or
TUNEAVIDEO_VERBOSE=1) for the libraries' own logs, progress bars and warnings.
"""

import argparse

from tuneavideo.cli import OneLineArgumentParser, run_cli
from tuneavideo.config import load_config
from tuneavideo.training import train


def main(argv: list[str]) -> None:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/man-skiing.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_train_steps=300")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    run_cli(main, "train_tuneavideo.py")
