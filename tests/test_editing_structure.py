"""Edits under structure guidance (`EditRequest.controlnets`, `inference.py --controlnet`): the condition video frame
for frame with the edit, inversions cached per guidance, a run's own ControlNet used unless told otherwise, bad input
in one line. The guidance itself (against diffusers' ControlNet pipelines) is tested in tests/pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import (
    PHONE_TIMES,
    SAMPLE_CLIP,
    edit_cli,
    index_frames,
    probe,
    train_in_process,
    write_index_clip,
    write_vfr_clip,
)
from tuneavideo.config import ControlNetConfig, load_config
from tuneavideo.editing import edit, plan_edit
from tuneavideo.evaluate import read_frames
from tuneavideo.request import EditRequest, LocalEdit
from tuneavideo.run import EditResult, Run
from tuneavideo.video.readers import Clip


def quick(prompts: list[str], output_dir: Path, **settings) -> EditRequest:
    return EditRequest(prompts, num_inference_steps=2, num_inv_steps=2, output_dir=str(output_dir), **settings)


def canny_net(path: Path, scale: float = 0.8) -> list[ControlNetConfig]:
    return [ControlNetConfig(str(path), "canny", scale)]


@pytest.fixture(scope="module")
def guided_run(tiny_sd, tiny_controlnet_path, tmp_path_factory) -> Path:
    """A one-step run tuned under the tiny ControlNet on canny edges, of a variable-frame-rate clip (30 fps, then
    15), its validation latent inverted under the same guidance in 2 steps."""
    folder = tmp_path_factory.mktemp("guided")
    clip = write_vfr_clip(folder / "phone.mp4", index_frames(30, 64, 64), PHONE_TIMES)
    (folder / "config.yaml").write_text(f"""
pretrained_model_path: "{tiny_sd}"
output_dir: "{folder / 'run'}"
train_data: {{video_path: "{clip}", prompt: "a ball is moving", n_sample_frames: 4, width: 64, height: 64}}
validation_data: {{prompts: ["a red ball"], num_inference_steps: 2, num_inv_steps: 2}}
controlnet: {{model: "{tiny_controlnet_path}", condition: canny, scale: 0.8}}
max_train_steps: 1
checkpointing_steps: 1000
seed: 33
mixed_precision: "no"
""")
    return train_in_process(load_config(folder / "config.yaml"))


def test_a_whole_clip_edit_under_a_controlnet_writes_its_canny_edges_frame_for_frame(tuned_run, tiny_controlnet_path,
                                                                                      tmp_path):
    guided = edit(tuned_run, quick(["a cat"], tmp_path / "guided", span=(None, None), window=4,
                                   controlnets=canny_net(tiny_controlnet_path)))
    plain = edit(tuned_run, quick(["a cat"], tmp_path / "plain", span=(None, None), window=4, controlnets=[]))
    assert guided.windows > 1 and plain.condition is None
    assert guided.condition == tmp_path / "guided" / "a cat.condition.mp4"
    assert json.loads((tmp_path / "guided" / "result.json").read_text())[0]["condition"] == str(guided.condition)
    assert EditResult.load(tmp_path / "guided") == guided  # as the app reads it back
    conditions = read_frames(guided.condition)
    assert probe(guided.condition)["fps"] == guided.fps and len(conditions) == len(guided.frames)
    frames = guided.frames
    source = Clip(SAMPLE_CLIP).frames(guided.size, frames.start, frames.stop, frames.step)
    edges = np.stack([cv2.Canny(frame, 100, 200) for frame in source]).astype(np.float32)
    shown = np.stack(conditions)[..., 0].astype(np.float32)
    assert np.corrcoef(edges.ravel(), shown.ravel())[0, 1] > 0.9  # the edges, through H.264
    # the random ControlNet moves the edit
    assert np.abs(np.stack(read_frames(guided.videos[0])).astype(float)
                  - np.stack(read_frames(plain.videos[0]))).mean() > 1


def test_each_guidance_inverts_into_its_own_cache(tuned_run, tiny_controlnet_path, tmp_path):
    def cache(**settings) -> Path:
        return plan_edit(tuned_run, quick(["a cat"], tmp_path, span=(None, None), **settings)).cache

    plain = cache(controlnets=[])
    assert cache() == plain  # the run was tuned without one
    guided = cache(controlnets=canny_net(tiny_controlnet_path))
    assert len({plain, guided, cache(controlnets=canny_net(tiny_controlnet_path, 0.5)),
                cache(controlnets=canny_net(tiny_controlnet_path), canny_thresholds=(50.0, 150.0))}) == 4
    assert cache(controlnets=canny_net(tiny_controlnet_path), controlnet_inversion=False) == plain


def test_a_local_edit_under_a_controlnet_writes_its_conditions(tuned_run, tiny_controlnet_path, tmp_path):
    result = edit(tuned_run, quick(["a cat"], tmp_path, controlnets=canny_net(tiny_controlnet_path),
                                   local=LocalEdit("refine", inversion="ddim")))
    assert len(read_frames(result.condition)) == len(result.frames) == 4
    assert len(read_frames(result.inversion)) == 4


def test_a_run_tuned_under_a_controlnet_edits_under_it_unless_told_otherwise(guided_run, tmp_path):
    run = Run(guided_run)
    cfg = run.config()
    own = edit(guided_run, quick(["a cat"], tmp_path / "own"))
    assert own.condition is not None
    assert own.cached_latent == run.validation_latent(cfg.max_train_steps)  # inverted under the same guidance
    plain = edit(guided_run, quick(["a cat"], tmp_path / "plain", controlnets=[]))
    assert plain.condition is None and plain.cached_latent is None  # the validation latent is a guided one
    # an inversion without guidance, then sampled under the run's: the plain edit's inversion, reused
    loose = edit(guided_run, quick(["a cat"], tmp_path / "loose", controlnet_inversion=False))
    assert loose.condition is not None
    assert loose.cached_latent == plan_edit(guided_run, quick(["a cat"], tmp_path, controlnets=[])).cache
    assert np.abs(np.stack(read_frames(own.videos[0])).astype(float)
                  - np.stack(read_frames(loose.videos[0]))).mean() > 0


def test_the_condition_video_of_a_variable_rate_clip_keeps_the_edits_frame_times(guided_run, tmp_path):
    result = edit(guided_run, quick(["a cat"], tmp_path, span=(None, None), stride=1))
    assert result.variable_rate
    written = probe(result.videos[0])["frames"]
    assert written > len(result.frames)  # the 15 fps part is shown at the constant rate, each frame twice
    assert probe(result.condition)["frames"] == written and probe(result.condition)["fps"] == result.fps


# arguments (`{controlnet}`, `{sd2}`, `{tmp}` filled in) -> words the one-line message must contain
BAD_STRUCTURE = {
    "unknown condition": (["--controlnet", "{controlnet}", "--condition", "pose"],
                          ["--controlnet condition 'pose'", "not canny or depth"]),
    "negative scale": (["--controlnet", "{controlnet}", "--controlnet-scale", "-1"], ["scale -1.0", ">= 0"]),
    "scale not a number": (["--controlnet", "{controlnet}", "--controlnet-scale", "nan"], ["scale nan", ">= 0"]),
    "scale of words": (["--controlnet", "{controlnet}", "--controlnet-scale", "big"], ["invalid float value"]),
    "condition without a controlnet": (["--condition", "canny"], ["--condition: given 1 times for 0 --controlnet"]),
    "bad thresholds": (["--controlnet", "{controlnet}", "--canny-thresholds", "200:100"],
                       ["--canny-thresholds 200:100", "low <= high"]),
    "thresholds of words": (["--canny-thresholds", "low"], ["--canny-thresholds", "LOW:HIGH"]),
    "none and one": (["--no-controlnet", "--controlnet", "{controlnet}"], ["--no-controlnet: leave out"]),
    "missing model": (["--controlnet", "{tmp}/nowhere"], ["nowhere: cannot load a ControlNet",
                                                          "./download_models.sh --controlnet"]),
    "another base": (["--controlnet", "{sd2}"], ["is made for", "use a ControlNet for"]),
    "short condition video": (["--controlnet", "{controlnet}", "--condition", "{tmp}/short.mp4", "--span", "all"],
                              ["short.mp4: has 5 frames", "up to frame 45 (46 frames)"]),
    "condition of another size": (["--controlnet", "{controlnet}", "--condition", "{tmp}/small.mp4"],
                                  ["small.mp4: is 32x32", "source clip's size"]),
    "depth without the estimator": (["--controlnet", "{controlnet}", "--condition", "depth"],
                                    ["no depth estimator", "./download_models.sh --controlnet depth"]),
}


@pytest.mark.parametrize("case", BAD_STRUCTURE)
def test_bad_structure_guidance_is_one_line_and_writes_no_video(case, tuned_run, tiny_controlnet_path,
                                                                sd2_controlnet_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./checkpoints holds no depth estimator
    write_index_clip(tmp_path / "short.mp4", num_frames=5, width=64, height=64)
    write_index_clip(tmp_path / "small.mp4", num_frames=30, width=32, height=32)
    args, words = BAD_STRUCTURE[case]
    filled = [arg.format(controlnet=tiny_controlnet_path, sd2=sd2_controlnet_path, tmp=tmp_path) for arg in args]
    status, message = edit_cli(tuned_run, "--prompt", "a cat", "--output-dir", str(tmp_path / "edits"), *filled)
    assert status == 1 and message.startswith("inference.py: error: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    written = list((tmp_path / "edits").glob("*")) if (tmp_path / "edits").exists() else []
    assert [path.name for path in written if not path.name.endswith(".progress.json")] == []
