"""A phone clip end to end through the command lines: stored landscape with a display rotation, it is tuned,
validated, inverted and edited upright at its shown (portrait) size, and the side-by-side shows the source upright.
The app's side is in tests/app/test_app.py; the reader's in tests/video/test_readers.py."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, marker_corner, marker_frames, probe, write_frames_mp4, write_phone_clip
from tuneavideo.video.readers import Clip

pytestmark = pytest.mark.e2e  # the tools run as processes


def python(*args) -> None:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_portrait_phone_clip_is_tuned_and_edited_upright(tmp_path, tiny_sd):
    # stored 64x48, shown turned 90 degrees clockwise: 48x64, the red square in the top-right corner
    stored = write_frames_mp4(tmp_path / "stored.mp4", marker_frames(8, 64, 48), 8)
    phone = write_phone_clip(tmp_path / "phone clip.mp4", stored, -90)
    config = tmp_path / "config.yaml"
    config.write_text(f"""
pretrained_model_path: "{tiny_sd}"
output_dir: "{tmp_path / 'run'}"
train_data: {{video_path: "{phone}", prompt: "a red square", n_sample_frames: 4, width: 64, height: 64,
             sample_frame_rate: 2}}
validation_data: {{prompts: ["a blue square"], num_inference_steps: 2, num_inv_steps: 2}}
max_train_steps: 1
validation_steps: 1
seed: 3
""")
    python(ROOT / "train_tuneavideo.py", f"--config={config}")
    run = tmp_path / "run"
    # tuned at the shown size: 48x64 frames, latents 6 wide and 8 high
    assert torch.load(run / "inv_latents" / "ddim_latent-1.pt").shape == (1, 4, 4, 8, 6)
    assert probe(run / "samples" / "sample-1" / "a blue square.mp4")["size"] == (48, 64)

    python(ROOT / "inference.py", f"--model={run}", "--prompt=a green square", "--num-inference-steps=2",
           "--num-inv-steps=2", f"--output-dir={tmp_path / 'edits'}", "--no-audio")
    assert probe(tmp_path / "edits" / "a green square.mp4")["size"] == (48, 64)
    side_by_side = np.stack(list(Clip(tmp_path / "edits" / "a green square.side-by-side.mp4").frames()))
    assert side_by_side.shape == (4, 64, 2 * 48, 3)
    assert {marker_corner(frame[:, :48]) for frame in side_by_side} == {"top-right"}  # the source, upright
