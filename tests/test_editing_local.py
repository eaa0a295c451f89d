"""Local edits (Video-P2P's attention control) through `tuneavideo.editing` and `inference.py`, on the tiny model:
the files written and decoded, a frame of mask per edited frame, windows, the guidance default, the one-line
errors raised before any model loads, and Video-P2P's rabbit-jump configs run unchanged but for paths and steps."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
from tests.helpers import probe, train_in_process
from tuneavideo import p2p_edit
from tuneavideo.cli import run_cli
from tuneavideo.config import load_config
from tuneavideo.editing import edit, plan_edit
from tuneavideo.evaluate import read_frames
from tuneavideo.p2p_edit import edit_p2p
from tuneavideo.request import EditRequest, LocalEdit
from tuneavideo.run import EditResult, Run
from tuneavideo.video.edit_writer import mask_overlay

CONFIGS = Path(__file__).parent / "p2p_configs"
STEPS = dict(num_inference_steps=2, num_inv_steps=2)
TARGET = "a red ball is moving"  # the tuned prompt is "a ball is moving"


def local_edit(tuned_run, folder, **options) -> EditResult:
    local = options.pop("local", LocalEdit("refine", blend_words=("ball", "ball"), inversion="ddim"))
    return edit(tuned_run, EditRequest([TARGET], **{**STEPS, **options}, local=local, output_dir=folder))


def test_a_local_edit_writes_the_edit_its_source_branch_and_its_mask(tuned_run, tmp_path):
    local = LocalEdit("refine", blend_words=("ball", "ball"), reweights={"red": 2}, null_text_iterations=1)
    result = local_edit(tuned_run, tmp_path / "edit", local=local, num_inference_steps=1, num_inv_steps=1)
    assert result.inversion == tmp_path / "edit" / f"{TARGET}.inversion.mp4"
    assert result.masks == [tmp_path / "edit" / f"{TARGET}.mask.mp4"]
    count = len(result.frames)
    for path in [*result.videos, result.inversion, *result.masks]:
        info = probe(path)
        assert (info["frames"], info["fps"], info["size"]) == (count, result.fps, result.size), path
    assert result.with_audio and probe(result.inversion)["audio_seconds"] == pytest.approx(count / result.fps, abs=0.05)
    assert EditResult.load(result.folder) == result
    # at 64x64 the mask's map is 2x2, which the 3x3 max pool makes whole: every pixel of the source is tinted
    source = list(plan_edit(tuned_run, EditRequest([TARGET], **STEPS, local=LocalEdit(),
                                                   output_dir=tmp_path / "edit")).source_frames())
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
    assert EditRequest(**options).guidance == 12.5
    assert EditRequest(**options, local=LocalEdit()).guidance == 7.5
    assert EditRequest(**options, guidance_scale=3.0, local=LocalEdit()).guidance == 3.0
    assert plan_edit(tuned_run, EditRequest(**options, local=LocalEdit())).control.source_prompt == "a ball is moving"


@pytest.mark.parametrize("args, message", [
    (["--control", "replace", "--prompt", "a red ball is moving"], "use control 'refine'"),
    (["--control", "refine", "--prompt", TARGET, "--blend", "cat"], "blend source word 'cat' is not a word"),
    (["--control", "refine", "--prompt", TARGET, "--blend", "ball:cat"], "blend target word 'cat'"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "red"], "--reweight 'red': give WORD=FACTOR"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "blue=2"], "reweight word 'blue' is not a word"),
    (["--control", "refine", "--prompt", TARGET, "--mask-threshold", "1"], "--mask-threshold must be in (0, 1)"),
    (["--control", "refine", "--prompt", TARGET, "--cross-replace-steps", "1.5"], "--cross-replace-steps must be"),
    (["--control", "refine", "--prompt", TARGET, "--num-inv-steps", "3"], "--num-inference-steps equal to"),
    (["--control", "refine", "--prompt", TARGET, "--eta", "0.5"], "--eta does not apply to a local edit"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "red=nan"], "--reweight red=nan: the factor must be"),
    (["--control", "refine", "--prompt", "a.inversion"], "would overwrite"),
    (["--blend", "ball", "--prompt", TARGET], "need --control"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "red=nan"], "reweight red=nan: the factor must be"),
    (["--control", "refine", "--prompt", TARGET, "--reweight", "red=-inf"], "reweight red=-inf: the factor must"),
])
def test_bad_local_edit_input_is_one_line_before_any_model_loads(tuned_run, tmp_path, capsys, monkeypatch, args,
                                                                message):
    def no_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Run, "load_pipeline", no_model)
    with pytest.raises(SystemExit) as exit:
        run_cli(inference.main, "inference.py", ["--model", str(tuned_run), "--num-inference-steps", "2",
                                                 "--num-inv-steps", "2", "--output-dir", str(tmp_path), *args])
    text = str(exit.value.code)
    assert text.startswith("inference.py: error: ") and "\n" not in text and message in text, text


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

    monkeypatch.setattr(p2p_edit, "P2P_SIZE", 64)  # Video-P2P's 512x512 takes minutes on the CPU
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
    ('image_path: f\nprompts: ["a", "b"]\npretrained_model_path: run\nsave_name: ../../elsewhere/x\n',
     "save_name='../../elsewhere/x' must be a plain file name"),
])
def test_bad_p2p_configs_are_one_line(tmp_path, text, message):
    path = tmp_path / "configs" / "bad-p2p.yaml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        run_cli(inference.main, "inference.py", ["--p2p-config", str(path)])
    assert message in str(exit.value.code) and "\n" not in str(exit.value.code)
    assert [p.name for p in tmp_path.rglob("*")] == ["configs", "bad-p2p.yaml"]  # nothing written anywhere


def test_a_videop2p_config_naming_a_base_model_is_one_line_before_any_model_loads(tiny_sd, tmp_path):
    write_rabbit(tmp_path / "rabbit")
    config = tmp_path / "p2p.yaml"
    config.write_text(f"pretrained_model_path: {tiny_sd}\nimage_path: {tmp_path / 'rabbit'}\n"
                      "prompts: [a rabbit is jumping, a origami rabbit is jumping]\n")
    before = sorted(tiny_sd.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference.main, "inference.py", ["--p2p-config", str(config), "--fast"])
    message = str(exit_info.value.code)
    assert message == (f"inference.py: error: {config}: pretrained_model_path {tiny_sd} is a base model, not a tuned "
                       "run; tune it on the clip first (train_tuneavideo.py) and give the run's output_dir")
    assert sorted(tiny_sd.rglob("*")) == before  # no results/ written into it


def test_a_videop2p_config_s_nan_reweight_is_one_line_and_a_negative_one_is_taken(tuned_run, tmp_path, monkeypatch):
    monkeypatch.setattr(Run, "load_pipeline", lambda *_: pytest.fail("the model was loaded"))
    config = tmp_path / "p2p.yaml"
    config.write_text(f"pretrained_model_path: {tuned_run}\nimage_path: {tmp_path}\n"
                      "prompts: [a ball is moving, a red ball is moving]\neq_params: {words: [red], values: [.nan]}\n")
    with pytest.raises(SystemExit) as exit:
        run_cli(inference.main, "inference.py", ["--p2p-config", str(config), "--fast"])
    assert str(exit.value.code).startswith("inference.py: error: ") and "red=nan: the factor must be a finite" in \
        str(exit.value.code) and "\n" not in str(exit.value.code)
    assert not (tuned_run / "results").exists()
    # a negative factor is meant (Prompt-to-Prompt's examples weaken a word with -1): it passes every check
    plan = plan_edit(tuned_run, EditRequest([TARGET], **STEPS, output_dir=tmp_path / "out",
                                            local=LocalEdit("refine", reweights={"red": -1.0}, inversion="ddim")))
    assert plan.control is not None


def test_a_damaged_tokenizer_ends_a_local_edit_in_one_line_before_any_model_loads(tuned_run, tmp_path, monkeypatch):
    monkeypatch.setattr(Run, "load_pipeline", lambda *_: pytest.fail("the model was loaded"))
    run = shutil.copytree(tuned_run, tmp_path / "run", ignore=shutil.ignore_patterns("edits"))
    tokenizer = run / "tokenizer" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[: tokenizer.stat().st_size // 2])  # truncated
    write_rabbit(tmp_path / "rabbit")
    config = tmp_path / "p2p.yaml"
    config.write_text(f"pretrained_model_path: {run}\nimage_path: {tmp_path / 'rabbit'}\n"
                      "prompts: [a ball is moving, a red ball is moving]\n")
    for args in (["--model", str(run), "--control", "refine", "--prompt", TARGET, "--inversion", "ddim"],
                 ["--p2p-config", str(config), "--fast"]):
        with pytest.raises(SystemExit) as exit:
            run_cli(inference.main, "inference.py", args)
        message = str(exit.value.code)
        assert message.startswith(f"inference.py: error: {run / 'tokenizer'}: the run's tokenizer cannot be loaded (")
        assert message.endswith("re-run the training to save the model again") and "\n" not in message
    assert not (run / "edits").exists() and not (run / "results").exists()
