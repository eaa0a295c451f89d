"""No-GPU, no-download demo: write a tiny random SD model, then tune it on the bundled sample clip.

    python -m tuneavideo.demo                      # uses configs/demo.yaml
    python -m tuneavideo.demo max_train_steps=10   # with overrides

Random weights give noise, not pictures: this shows the whole job (tuning, inversion, validation videos,
checkpoints, saved model) running in about a minute on two CPU cores.
"""

import sys
from pathlib import Path

from .config import load_config
from .tiny import make_tiny_sd
from .training import train

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(overrides: list[str]) -> None:
    cfg = load_config(DEMO_CONFIG, ["overwrite=true", *overrides])
    if not (Path(cfg.pretrained_model_path) / "model_index.json").exists():
        make_tiny_sd(cfg.pretrained_model_path)
    output_dir = train(cfg)
    print(f"demo run written to {output_dir}: samples in {output_dir / 'samples'}")


if __name__ == "__main__":
    main(sys.argv[1:])
