"""Local edits (Video-P2P's attention control) through `tuneavideo.editing` and `inference.py`, on the tiny model:
the files written and decoded, a frame of mask per edited frame, windows, the guidance default, the one-line
errors raised before any model loads, and Video-P2P's rabbit-jump configs run unchanged but for paths and steps."""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from tests.helpers import probe, train_in_process
from tuneavideo import local_editing
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.editing import EditOptions, EditResult, _source_frames, edit, plan_edit
from tuneavideo.evaluate import read_frames
from tuneavideo.local_editing import edit_p2p, mask_overlay, psnr_outside, upsampled
from tuneavideo.pipelines.local_edit import LocalEdit

CONFIGS = Path(__file__).parent / "p2p_configs"
STEPS = dict(num_inference_steps=2, num_inv_steps=2)
TARGET = "a red ball is moving"  # the tuned prompt is "a ball is moving"


def local_edit(tuned_run, folder, **options) -> EditResult:
    local = options.pop("local", LocalEdit("refine", blend=("ball", "ball"), inversion="ddim"))
    return edit(tuned_run, EditOptions([TARGET], **{**STEPS, **options}, local=local, output_dir=folder))


def test_a_local_edit_writes_the_edit_its_source_branch_and_its_mask(tuned_run, tmp_path):
    local = LocalEdit("refine", blend=("ball", "ball"), reweight={"red": 2}, null_text_iterations=1)
    result = local_edit(tuned_run, tmp_path / "edit", local=local, num_inference_steps=1, num_inv_steps=1)
    assert result.inversion == tmp_path / "edit" / "inversion.mp4"
    assert result.masks == [tmp_path / "edit" / f"{TARGET}.mask.mp4"]
    count = len(result.frames)
    for path in [*result.videos, result.inversion, *result.masks]:
        info = probe(path)
        assert (info["frames"], info["fps"], info["size"]) == (count, result.fps, result.size), path
    assert result.with_audio and probe(result.inversion)["audio_seconds"] == pytest.approx(count / result.fps, abs=0.05)
    assert EditResult.load(result.folder) == result
    # at 64x64 the mask's map is 2x2, which the 3x3 max pool makes whole: every pixel of the source is tinted
    source = list(_source_frames(plan_edit(tuned_run, EditOptions([TARGET], **STEPS, local=LocalEdit(),
                                                                  output_dir=tmp_path / "edit"))))
    tinted = [mask_overlay(frame, np.ones(frame.shape[:2], bool)) for frame in source]
    shown = read_frames(result.masks[0])
    assert np.abs(np.stack(shown).astype(float) - np.stack(tinted)).mean() < 3


def test_every_edited_frame_of_a_windowed_span_has_a_mask_frame(tuned_run, tmp_path):
    result = local_edit(tuned_run, tmp_path / "edit", span=(None, Fraction(1, 2)), window=3, overlap=1,
                        audio=False)
    assert result.windows > 1
    assert probe(result.masks[0])["frames"] == probe(result.videos[0])["frames"] == len(result.frames)


def test_a_span_of_one_window_equals_the_unwindowed_edit(tuned_run, tmp_path):
    one_step = dict(audio=False, gif=False, num_inference_steps=1, num_inv_steps=1)
    plain = local_edit(tuned_run, tmp_path / "plain", **one_step)
    one = local_edit(tuned_run, tmp_path / "one", window=len(plain.frames) + 3, **one_step)
    assert one.windows == plain.windows == 1
    for a, b in [(plain.videos[0], one.videos[0]), (plain.inversion, one.inversion)]:
        assert a.read_bytes() == b.read_bytes()


def test_guidance_defaults_to_videop2p_with_control_and_stays_12_5_without(tuned_run, tmp_path):
    options = dict(prompts=[TARGET], output_dir=tmp_path, **STEPS)
    assert plan_edit(tuned_run, EditOptions(**options)).guidance_scale == 12.5
    assert plan_edit(tuned_run, EditOptions(**options, local=LocalEdit())).guidance_scale == 7.5
    assert plan_edit(tuned_run, EditOptions(**options, guidance_scale=3.0, local=LocalEdit())).guidance_scale == 3.0
    assert plan_edit(tuned_run, EditOptions(**options, local=LocalEdit())).local.source_prompt == "a ball is moving"


@pytest.mark.parametrize("args, message", [
    (["--control", "replace", "--prompt", "a red ball is moving"], "use control 'refine'"),
    (["--control", "refine", "--prompt", TARGET, "--blend", "cat"], "blend source word 'cat' is not a word"),
    (["--control", "refine", "--prompt", TARGET, "--blend", "ball:cat"], "blend target word 'cat'"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "red"], "reweight 'red': give WORD=FACTOR"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "blue=2"], "reweight word 'blue' is not a word"),
    (["--control", "refine", "--prompt", TARGET, "--mask-threshold", "1"], "mask_threshold must be in (0, 1)"),
    (["--control", "refine", "--prompt", TARGET, "--cross-replace-steps", "1.5"], "cross_replace_steps must be"),
    (["--control", "refine", "--prompt", TARGET, "--num-inv-steps", "3"], "num_inference_steps must equal num_inv_steps"),
    (["--control", "refine", "--prompt", TARGET, "--eta", "0.5"], "--eta does not apply with --control"),
    (["--control", "refine", "--prompt", "inversion"], "would overwrite"),
    (["--blend", "ball", "--prompt", TARGET], "need --control"),
])
def test_bad_local_edit_input_is_one_line_before_any_model_loads(tuned_run, tmp_path, capsys, monkeypatch, args,
                                                                message):
    from tuneavideo import editing

    def no_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(editing, "_load_pipeline", no_model)
    with pytest.raises(SystemExit) as exit:
        run_cli(inference.main, "inference.py", ["--model", str(tuned_run), "--num-inference-steps", "2",
                                                 "--num-inv-steps", "2", "--output-dir", str(tmp_path), *args])
    text = str(exit.value.code)
    assert text.startswith("inference.py: error: ") and "\n" not in text and message in text, text


def test_mask_overlay_tints_only_the_mask_and_psnr_counts_only_outside_it():
    frame = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    shown = mask_overlay(frame, mask)
    assert (shown[2:] == 100).all() and (shown[:2] == [178, 50, 50]).all()  # (100 + 255) / 2, 100 / 2
    up = upsampled(torch.tensor([[[True, False], [False, False]]]), (4, 4))
    assert up.shape == (1, 4, 4) and up[0, :2, :2].all() and up.sum() == 4
    source = np.zeros((1, 4, 4, 3), np.uint8)
    edited = source.copy()
    edited[0, :2] = 255  # changed only inside the mask
    assert psnr_outside(edited, source, mask[None]) == math.inf
    edited[0, 3, 3] = 10  # one pixel outside: MSE = 3 * 100 / (8 * 3)
    assert psnr_outside(edited, source, mask[None]) == pytest.approx(10 * math.log10(255**2 / (300 / 24)))
    assert psnr_outside(edited, source, np.ones((1, 4, 4), bool)) is None


def write_rabbit(folder: Path) -> None:
    """1.jpg ... 8.jpg, wider than tall (so the centre square is taken), each a different shade."""
    folder.mkdir(parents=True)
    for i in range(1, 9):
        x = np.linspace(0, 255, 96, dtype=np.float32)
        image = np.stack([np.broadcast_to(x, (80, 96)), np.full((80, 96), 30.0 * i), np.full((80, 96), 90.0)], -1)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.jpg")


def test_videop2p_rabbit_jump_configs_tune_and_edit_unchanged_but_for_paths_and_steps(tiny_sd, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the configs' ./data/rabbit and ./outputs/rabbit-jump are relative, as there
    write_rabbit(tmp_path / "data" / "rabbit")
    shutil.copy(CONFIGS / "rabbit-jump-p2p.yaml", tmp_path / "rabbit-jump-p2p.yaml")
    small = [f"{part}.{key}={value}" for part in ("train_data", "validation_data")
             for key, value in (("width", 64), ("height", 64))]
    cfg = load_config(CONFIGS / "rabbit-jump-tune.yaml", [
        f"pretrained_model_path={tiny_sd}", "max_train_steps=1", "mixed_precision=no", *small,
        "validation_data.num_inference_steps=2", "validation_data.num_inv_steps=2"])
    run = train_in_process(cfg)
    assert run.resolve() == (tmp_path / "outputs" / "rabbit-jump").resolve()

    monkeypatch.setattr(local_editing, "P2P_SIZE", 64)  # Video-P2P's 512x512 takes minutes on the CPU
    run_cli(inference.main, "inference.py", ["--p2p-config", "rabbit-jump-p2p.yaml", "--fast",
                                             "--num-inference-steps", "1", "--num-inv-steps", "1"])
    results = run / "results"
    assert "origami_fast.gif" in capsys.readouterr().out
    for name in ("inversion_fast", "origami_fast"):
        with Image.open(results / f"{name}.gif") as gif:
            assert (gif.n_frames, gif.size, gif.info["duration"]) == (8, (64, 64), 250)
        assert probe(results / f"{name}.mp4")["frames"] == 8
    assert probe(results / "origami_fast.mask.mp4")["frames"] == 8

    # null-text inversion (Video-P2P's default) through the Python API
    result = edit_p2p("rabbit-jump-p2p.yaml", num_inference_steps=2, num_inv_steps=2, null_text_iterations=1)
    assert [path.name for path in result.gifs] == ["inversion.gif", "origami.gif"]
    for path in result.videos:
        assert probe(path)["frames"] == 8 and probe(path)["size"] == (64, 64)


@pytest.mark.parametrize("text, message", [
    ('prompts: ["a rabbit", "a origami rabbit"]\npretrained_model_path: run\n', "missing image_path"),
    ('image_path: f\nprompts: ["a rabbit"]\npretrained_model_path: run\n', "[source, target]"),
    ('image_path: f\nprompts: ["a", "b"]\nsteps: 3\n', "unknown key 'steps'"),
])
def test_bad_p2p_configs_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad-p2p.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        run_cli(inference.main, "inference.py", ["--p2p-config", str(path)])
    assert message in str(exit.value.code) and "\n" not in str(exit.value.code)
