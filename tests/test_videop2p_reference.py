"""Video-P2P's configs give Video-P2P's results: `edit_p2p` (`inference.py --p2p-config`) against what Video-P2P's own
code computed for the same configs on the same model (tests/fixtures/videop2p/, made by its `make_reference.py`):
a tiny SD tuned by Video-P2P's `run_tuning.py` and saved as diffusers 0.11.1 saves it, 4 frames at its 512x512,
5 steps, in fast and null-text modes, with local blend, reweighting, refinement and word swap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tuneavideo.p2p_edit import edit_p2p, p2p_spatial_attention

FIXTURES = Path(__file__).parent / "fixtures" / "videop2p"
MADE = json.loads((FIXTURES / "reference" / "versions.json").read_text())  # its step and iteration counts
SUBSAMPLE = 8  # the reference keeps every 8th pixel of its decoded frames


@pytest.fixture(scope="module")
def videop2p_run(tmp_path_factory) -> Path:
    """A copy of the run folder Video-P2P's tuning wrote, as diffusers 0.11.1 saved it (edits write into
    `<run>/results/`)."""
    run = tmp_path_factory.mktemp("videop2p") / "run"
    shutil.copytree(FIXTURES / "run", run)
    return run


def config_file(case: str, run: Path, folder: Path) -> Path:
    """The fixture's edit config `case` with its paths pointed at `run` and the fixture's frames."""
    config = yaml.safe_load((FIXTURES / "configs" / f"{case}.yaml").read_text())
    config.update(pretrained_model_path=str(run), image_path=str(FIXTURES / "frames"))
    path = folder / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("case, mode", [
    ("refine_blend_reweight", "fast"),
    # the rest take 1.5 minutes each on two cores (null-text optimises through the UNet at 512x512): -m slow
    pytest.param("replace_blend", "fast", marks=pytest.mark.slow),  # a word swap under local blend
    pytest.param("refine_noblend", "fast", marks=pytest.mark.slow),  # the whole frame may change
    pytest.param("refine_blend_reweight", "null_text", marks=pytest.mark.slow),
    pytest.param("replace_blend", "null_text", marks=pytest.mark.slow),
    pytest.param("refine_noblend", "null_text", marks=pytest.mark.slow),
])
def test_videop2p_configs_give_videop2p_results(case, mode, videop2p_run, tmp_path):
    reference = np.load(FIXTURES / "reference" / f"{case}_{mode}.npz")
    config = config_file(case, videop2p_run, tmp_path)
    result = edit_p2p(config, fast=mode == "fast", num_inference_steps=MADE["steps"], num_inv_steps=MADE["steps"],
                      null_text_iterations=MADE["null_text_iterations"])
    suffix = "_fast" if mode == "fast" else ""
    save_name = yaml.safe_load(config.read_text())["save_name"]
    assert [path.name for path in result.gifs] == [f"inversion{suffix}.gif", f"{save_name}{suffix}.gif"]

    # the final latents of the source branch and the edit (|x| about 1.4): as Video-P2P's, but for the fixture's
    # float16 and the two libraries' float arithmetic (measured: 7.7e-3 at most, 1.5e-4 on average)
    ours = torch.cat([result.latents.source, result.latents.targets]).float()
    theirs = torch.from_numpy(reference["final_latents"].astype(np.float32))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 3e-2
    assert (ours - theirs).abs().mean() < 5e-4

    # what the GIFs show, 8-bit: within 1 level on average (ours rounds where Video-P2P truncates: 0.5 of it)
    frames = np.stack(result.frames)[:, :, ::SUBSAMPLE, ::SUBSAMPLE].astype(np.float64)
    expected = reference["frames"].astype(np.float64)
    assert frames.shape == expected.shape
    assert np.abs(frames - expected).mean() <= 1.0
    # and the edit is as far from the source branch as Video-P2P's (21 levels fast, 8 after null-text inversion)
    ours, theirs = np.abs(frames[1] - frames[0]).mean(), np.abs(expected[1] - expected[0]).mean()
    assert theirs > 5 and abs(ours - theirs) < 1.0


def test_videop2p_configs_edit_original_runs_with_first_frame_attention(tmp_path):
    # Video-P2P's editing builds its UNet with first-frame attention whatever folder it loads; a 0.11.1 folder
    # records no rule, a run tuned here records its own
    assert p2p_spatial_attention(FIXTURES / "run") == "first_frame"
    (tmp_path / "unet").mkdir()
    config = json.loads((FIXTURES / "run" / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "spatial_attention": "sparse_causal"}))
    assert p2p_spatial_attention(tmp_path) == "sparse_causal"
