"""Run folders tuned by the original code (diffusers 0.11.1 names `["models", "UNet3DConditionModel"]` in their
`model_index.json`) open by class: the same weights as the folder holds, and through `inference.py --model`,
`--p2p-config` and the web app (tests/app/test_app.py) the same edits as our own layout of those weights gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import inference
from tests.helpers import diffusers_errors, write_as_diffusers_0_11
from tuneavideo import p2p_edit
from tuneavideo.cli import run_cli
from tuneavideo.evaluate import read_frames
from tuneavideo.pipelines.loading import load_tuned_pipeline
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline

STEPS = ["--num-inference-steps", "2", "--num-inv-steps", "2"]


@pytest.fixture(scope="module")
def original_run(tuned_run, tmp_path_factory) -> Path:
    return write_as_diffusers_0_11(tuned_run, tmp_path_factory.mktemp("original") / "run")


def test_the_folder_is_one_todays_diffusers_cannot_open_by_its_index(original_run):
    with pytest.raises(Exception, match="models"):
        TuneAVideoPipeline.from_pretrained(original_run)


def test_a_run_folder_of_diffusers_0_11_loads_by_class_with_the_weights_it_holds(original_run):
    with diffusers_errors() as errors:
        pipe = load_tuned_pipeline(original_run)
    assert errors == []  # its .bin weights asked for as such: no "An error occurred while trying to fetch ..."
    assert isinstance(pipe.scheduler, DDIMScheduler)  # built from the saved PNDM config, as the original's validation
    assert (pipe.scheduler.config.steps_offset, pipe.scheduler.config.set_alpha_to_one) == (1, False)
    unet = torch.load(original_run / "unet" / "diffusion_pytorch_model.bin")
    assert pipe.unet.state_dict().keys() == unet.keys()
    assert all(torch.equal(value, unet[key]) for key, value in pipe.unet.state_dict().items())
    new_names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    vae = {}
    for key, value in torch.load(original_run / "vae" / "diffusion_pytorch_model.bin").items():
        for old, new in new_names.items():
            key = key.replace(old, new)
        vae[key] = value
    assert pipe.vae.state_dict().keys() == vae.keys()
    assert all(torch.equal(value, vae[key]) for key, value in pipe.vae.state_dict().items())
    text = torch.load(original_run / "text_encoder" / "pytorch_model.bin")
    loaded = pipe.text_encoder.state_dict()
    assert loaded.keys() == text.keys() - {"text_model.embeddings.position_ids"}  # a buffer no longer saved
    assert all(torch.equal(value, text[key]) for key, value in loaded.items())
    assert pipe.tokenizer("a ball").input_ids == load_tuned_pipeline(original_run).tokenizer("a ball").input_ids


def test_inference_model_edits_it_as_our_layout_of_the_same_weights(original_run, tuned_run, tmp_path):
    for run, out in ((original_run, tmp_path / "original"), (tuned_run, tmp_path / "ours")):
        run_cli(inference.main, "inference.py", ["--model", str(run), "--prompt", "a red ball is moving", *STEPS,
                                                 "--output-dir", str(out), "--no-audio"])
    edited, expected = (np.stack(read_frames(folder / "a red ball is moving.mp4"))
                        for folder in (tmp_path / "original", tmp_path / "ours"))
    assert edited.shape == (4, 64, 64, 3) and np.array_equal(edited, expected)


def test_a_videop2p_config_opens_it(original_run, tmp_path, monkeypatch, capsys):
    run = shutil.copytree(original_run, tmp_path / "run")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(1, 5):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(frames / f"{i}.jpg")
    config = tmp_path / "p2p.yaml"
    config.write_text(f"pretrained_model_path: {run}\nimage_path: {frames}\nprompt: a ball is moving\n"
                      "prompts: [a ball is moving, a red ball is moving]\nblend_word: [ball, ball]\n"
                      "save_name: red\nvideo_len: 4\n")
    monkeypatch.setattr(p2p_edit, "P2P_SIZE", 64)  # Video-P2P's 512x512 takes minutes on the CPU
    run_cli(inference.main, "inference.py", ["--p2p-config", str(config), "--fast", *STEPS,
                                             "--spatial-attention", "first_frame"])
    assert "red_fast.gif" in capsys.readouterr().out
    for name in ("inversion_fast.mp4", "red_fast.mp4", "red_fast.mask.mp4"):
        assert np.stack(read_frames(run / "results" / name)).shape == (4, 64, 64, 3)

