"""No-GPU, no-download demo: write a tiny random SD model, tune it on the bundled sample clip, then edit the whole
clip, every second of it with its sound; then a local edit, and an edit guided by a tiny random ControlNet on the
clip's canny edges.

    python -m tuneavideo.demo                      # uses configs/demo.yaml
    python -m tuneavideo.demo max_train_steps=10   # with overrides

Random weights give noise, not pictures: this shows the whole job (tuning, inversion, validation videos,
checkpoints, saved model, a windowed whole-clip edit with sound, a local edit of the ball with its mask video, a
canny-guided edit with its condition video) running in about two minutes on two idle CPU cores (107 s measured,
README's figure; on a machine shared with other work it takes longer).
"""

import logging
from pathlib import Path

from .checks import check_sd_folder
from .cli import run_cli
from .config import ControlNetConfig, load_config
from .editing import edit
from .errors import UserError
from .request import EditRequest, LocalEdit
from .run import Run
from .tiny import make_tiny_sd, tiny_controlnet
from .training import train

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TINY_CONTROLNET = "tiny-controlnet"  # beside the tiny model in ./checkpoints, where the web app finds ControlNets
logger = logging.getLogger(__name__)


def main(overrides: list[str]) -> None:
    cfg = load_config(DEMO_CONFIG, ["overwrite=true", *overrides])
    try:
        check_sd_folder(cfg.pretrained_model_path)
    except UserError:
        logger.info(f"writing the tiny random model to {cfg.pretrained_model_path}")
        make_tiny_sd(cfg.pretrained_model_path)
    run = Run(train(cfg))
    steps = cfg.validation_data.num_inv_steps  # the run's own (20 in demo.yaml): quick on the CPU
    whole = edit(run.folder, EditRequest(["a red ball is moving"], num_inference_steps=steps, num_inv_steps=steps,
                                         span=(None, None), output_dir=run.edits / "whole-clip"))
    # a local edit (Video-P2P): only where the ball is, DDIM inversion (null-text's optimisation is slow on a CPU)
    local = edit(run.folder, EditRequest(["a red ball is moving"], num_inference_steps=steps, num_inv_steps=steps,
                                         output_dir=run.edits / "local",
                                         local=LocalEdit("refine", blend_words=("ball", "ball"), inversion="ddim")))
    # structure guidance: a ControlNet on the clip's canny edges (random weights: it steers, but towards nothing learnt)
    controlnet = Path(cfg.pretrained_model_path).parent / TINY_CONTROLNET
    if not (controlnet / "config.json").is_file():
        logger.info(f"writing a tiny random ControlNet to {controlnet}")
        tiny_controlnet(cfg.pretrained_model_path, seed=0).save_pretrained(controlnet)
    guided = edit(run.folder, EditRequest(["a red ball is moving"], num_inference_steps=steps, num_inv_steps=steps,
                                          output_dir=run.edits / "canny",
                                          controlnets=[ControlNetConfig(str(controlnet), "canny")]))
    print(f"demo run written to {run.folder}: samples in {run.samples}; the whole clip "
          f"({len(whole.frames)} frames at {float(whole.fps):g} fps, {whole.windows} windows, "
          f"{'with' if whole.with_audio else 'without'} sound) edited into {whole.folder}; a local edit of the ball, "
          f"with its mask video, in {local.folder}")
    print(f"its mask video ({', '.join(path.name for path in local.masks)}) is red where the local edit may change "
          "the picture, and here that is the whole frame: a model of random weights has learnt no ball to find, so "
          "its attention to the word 'ball' is spread over every pixel; with Stable Diffusion's weights the mask "
          "follows the ball")
    print(f"an edit guided by a ControlNet on the clip's canny edges, with its condition video "
          f"({guided.condition.name}), in {guided.folder}")


if __name__ == "__main__":
    run_cli(main, "python -m tuneavideo.demo")
