"""The LOVEU-TGVE metrics: the formulas on hand-made embeddings, and the command on tiny CLIP models against a plain
re-statement of the benchmark's definitions (scripts/run_eval.py of showlab/loveu-tgve-2023). Offline, CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from tests.helpers import ROOT
from tuneavideo.cli import run_cli
from tuneavideo.video.readers import Clip
from tuneavideo.errors import UserError
from tuneavideo.evaluate import (
    Evaluator,
    frame_consistency,
    frame_consistency_neighbours,
    main,
    psnr_outside,
    read_frames,
    text_image_score,
)
from tuneavideo.tiny import write_tokenizer
from tuneavideo.video.writers import write_gif, write_mp4

KEYS = {"video", "prompt", "num_frames", "frame_consistency", "frame_consistency_neighbours", "text_alignment",
        "pickscore"}


# --- the formulas, on embeddings whose cosines are known ---


def test_identical_frames_are_fully_consistent():
    features = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    assert frame_consistency(features) == pytest.approx(100.0, abs=1e-9)
    assert frame_consistency_neighbours(features) == pytest.approx(100.0, abs=1e-9)


def test_two_frames_give_their_cosine():
    # cosine([1, 0], [3, 3]) = 1/sqrt(2) whatever the lengths: the figure is a cosine, not a dot product
    features = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    assert frame_consistency(features) == pytest.approx(100 / math.sqrt(2), abs=1e-9)
    assert frame_consistency_neighbours(features) == pytest.approx(100 / math.sqrt(2), abs=1e-9)


def test_consistency_leaves_out_the_diagonal_and_neighbours_only_pair_consecutive_frames():
    # frames a, b, a with a orthogonal to b: of the 6 ordered distinct pairs, (0, 2) and (2, 0) have cosine 1
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    assert frame_consistency(features) == pytest.approx(100 * 2 / 6, abs=1e-9)  # 100 * 5 / 9 with the diagonal
    assert frame_consistency_neighbours(features) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_consistency(features[:1])


def test_text_score_is_scaled_mean_cosine_and_can_be_negative():
    text = torch.tensor([[2.0, 0.0]])
    frames = torch.tensor([[-1.0, 0.0], [-1.0, 1.0]])  # cosines -1 and -1/sqrt(2)
    expected = (-1 - 1 / math.sqrt(2)) / 2
    assert text_image_score(text, frames, logit_scale=100.0) == pytest.approx(100 * expected, abs=1e-9)
    assert text_image_score(text, frames, logit_scale=7.0) == pytest.approx(7 * expected, abs=1e-9)
    assert text_image_score(text, -frames, logit_scale=100.0) == pytest.approx(-100 * expected, abs=1e-9)


# --- tiny models, clips and a plain re-statement of the benchmark ---


def tiny_clip(seed: int, tokenizer, projection_dim: int, logit_scale: float) -> CLIPModel:
    """A CLIP (ViT + text transformer) at tiny width; 32x32 images in 8x8 patches; 77 text positions, like CLIP."""
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(tokenizer), max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(logit_scale),
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def image_processor() -> CLIPImageProcessorPil:
    """CLIP's preprocessing at a small size: shortest side to 40, then a real centre crop to 32x32."""
    return CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> Path:
    """A folder whose checkpoints/ holds what `download_models.sh --eval` writes, as tiny random models: the CLIP
    (model and processor, as save_pretrained writes them), PickScore (model only) and the laion processor (the hub
    repository's layout: preprocessor_config.json with integer sizes, tokenizer files, no weights)."""
    root = tmp_path_factory.mktemp("eval")
    checkpoints = root / "checkpoints"
    tokenizer = write_tokenizer(root / "tokenizer")
    tiny_clip(0, tokenizer, 8, 100.0).save_pretrained(checkpoints / "clip-vit-large-patch14")
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(
        checkpoints / "clip-vit-large-patch14"
    )
    tiny_clip(1, tokenizer, 12, 20.0).save_pretrained(checkpoints / "PickScore_v1")
    laion = checkpoints / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    write_tokenizer(laion)
    (laion / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 40,
    }))
    return root


@pytest.fixture(scope="session")
def models(eval_root) -> dict[str, Path]:
    checkpoints = eval_root / "checkpoints"
    return dict(clip_model=checkpoints / "clip-vit-large-patch14", pickscore_model=checkpoints / "PickScore_v1",
                pickscore_processor=checkpoints / "CLIP-ViT-H-14-laion2B-s32B-b79K")


@pytest.fixture(scope="session")
def evaluator(models) -> Evaluator:
    return Evaluator(**models)


def make_frames(num_frames: int, height: int = 48, width: int = 64, phase: float = 0.0) -> np.ndarray:
    """A non-square clip of a bright disc moving over a colour gradient (smooth, so codecs keep it recognisable)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(num_frames):
        cx, cy = 10 + 7 * i + phase, height / 2 + 8 * math.sin(i + phase)
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < 90).astype(np.float32)
        frame = np.stack([x / width * 200, y / height * 180, 100 + 0 * x], axis=-1) + 120 * disc[..., None]
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """The same kind of clip as an MP4, a GIF and a folder of JPEG frames, plus a source MP4."""
    folder = tmp_path_factory.mktemp("clips")
    write_mp4(make_frames(6), folder / "edit.mp4", fps=8)
    write_gif(make_frames(5, phase=2.0), folder / "edit.gif", fps=8)
    (folder / "frames").mkdir()
    for i, frame in enumerate(make_frames(7, phase=4.0)):
        Image.fromarray(frame).save(folder / "frames" / f"{i:05d}.jpg")
    write_mp4(make_frames(6, phase=1.0)[:, :, ::-1], folder / "source.mp4", fps=8)
    return dict(mp4=folder / "edit.mp4", gif=folder / "edit.gif", folder=folder / "frames",
                source=folder / "source.mp4")


def benchmark_images(path: Path) -> list[Image.Image]:
    """Frames as the benchmark holds them: PIL images read from the files, resized to 480x480 by Pillow's default."""
    if path.is_dir():
        images = [Image.open(file) for file in sorted(path.glob("*.jpg"))]
    elif path.suffix == ".gif":
        images = [frame.convert("RGB") for frame in ImageSequence.Iterator(Image.open(path))]
    else:  # decoding is not what is measured: the video is read by the project's reader
        images = [Image.fromarray(frame) for frame in Clip(path).frames()]
    return [image.resize((480, 480)) for image in images]


def benchmark_figures(path: Path, prompt: str, models: dict[str, Path]) -> dict[str, float]:
    """The benchmark's definitions, spelt out: CLIP logits_per_image, the cosine matrix with a zero diagonal summed
    over F(F-1), and PickScore's scaled cosine."""
    images = benchmark_images(path)
    n = len(images)

    def processor(folder: Path) -> CLIPProcessor:
        return CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(folder),
                             tokenizer=AutoTokenizer.from_pretrained(folder))

    clip, clip_processor = CLIPModel.from_pretrained(models["clip_model"]), processor(models["clip_model"])
    pick = CLIPModel.from_pretrained(models["pickscore_model"])
    pick_processor = processor(models["pickscore_processor"])
    with torch.no_grad():
        inputs = clip_processor(text=[prompt], images=images, return_tensors="pt", padding=True)
        logits = clip(**inputs).logits_per_image
        features = clip.get_image_features(**clip_processor(images=images, return_tensors="pt")).pooler_output
        image_embs = pick.get_image_features(**pick_processor(images=images, return_tensors="pt")).pooler_output
        text_embs = pick.get_text_features(**pick_processor(text=prompt, padding=True, truncation=True, max_length=77,
                                                            return_tensors="pt")).pooler_output
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        pickscore = (pick.logit_scale.exp() * (text_embs @ image_embs.T)[0]).mean().item()
    unit = features.numpy().astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    cosines = unit @ unit.T
    neighbours = np.mean([cosines[i, i + 1] for i in range(n - 1)])
    np.fill_diagonal(cosines, 0)
    return dict(num_frames=n, frame_consistency=100 * cosines.sum() / (n * (n - 1)),
                frame_consistency_neighbours=100 * neighbours, text_alignment=logits.mean().item(),
                pickscore=pickscore)


def assert_figures(measured: dict, expected: dict) -> None:
    assert measured["num_frames"] == expected["num_frames"]
    for key in KEYS - {"video", "prompt", "num_frames"}:
        assert measured[key] == pytest.approx(expected[key], abs=1e-5), key


# --- the library through the models ---


def test_identical_frames_through_the_models(evaluator):
    scores = evaluator.score(np.stack([make_frames(1)[0]] * 3), "a ball")
    assert scores.num_frames == 3
    assert scores.frame_consistency == pytest.approx(100.0, abs=1e-4)
    assert scores.frame_consistency_neighbours == pytest.approx(100.0, abs=1e-4)


def test_pickscore_scales_with_the_models_logit_scale(models):
    frames, prompt = make_frames(4), "a red ball, cartoon style"
    evaluator = Evaluator(**models)
    before = evaluator.score(frames, prompt)
    with torch.no_grad():  # PickScore's learnt temperature, doubled: the figure doubles, nothing else moves
        evaluator.pickscore.model.logit_scale += math.log(2.0)
    after = evaluator.score(frames, prompt)
    assert after.pickscore == pytest.approx(2 * before.pickscore, rel=1e-5)
    assert after.text_alignment == before.text_alignment
    assert after.frame_consistency == before.frame_consistency


def test_batches_give_the_same_figures(models, evaluator):
    frames = make_frames(5)
    whole = evaluator.score(frames, "a ball")
    in_pairs = Evaluator(**models, batch_size=2).score(frames, "a ball")
    for key in ("frame_consistency", "frame_consistency_neighbours", "text_alignment", "pickscore"):
        assert getattr(in_pairs, key) == pytest.approx(getattr(whole, key), abs=1e-5), key


def test_prompts_are_cut_at_77_tokens(evaluator):
    # the tiny tokenizer has one token per character: 120 letters are well past CLIP's 77 positions
    frames, prompt = make_frames(3), "a " + "b" * 120
    cut = evaluator.score(frames, prompt)
    assert cut == evaluator.score(frames, prompt + " and more words")
    assert cut.text_alignment != evaluator.score(frames, "a b").text_alignment


def test_psnr_outside_the_mask_counts_only_the_pixels_outside_it():
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2] = True
    source = np.zeros((1, 4, 4, 3), np.uint8)
    edited = source.copy()
    edited[0, :2] = 255  # changed only inside the mask
    assert psnr_outside(edited, source, mask) == math.inf
    edited[0, 3, 3] = 10  # one pixel outside: MSE = 3 * 100 / (8 * 3)
    assert psnr_outside(edited, source, mask) == pytest.approx(10 * math.log10(255**2 / (300 / 24)))
    assert psnr_outside(edited, source, np.ones((1, 4, 4), bool)) is None


def test_read_frames_sorts_folders_by_name_and_reads_every_gif_frame(tmp_path):
    colours = {"b.png": (0, 255, 0), "a.jpg": (255, 0, 0), "c.PNG": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (16, 8), colour).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = read_frames(tmp_path)
    centres = np.stack([frame[4, 8] for frame in frames]).astype(int)  # JPEG may shift a colour by a level or two
    assert np.abs(centres - [(255, 0, 0), (0, 255, 0), (0, 0, 255)]).max() <= 2
    write_gif(make_frames(5), tmp_path / "clip.gif", fps=8)
    assert len(read_frames(tmp_path / "clip.gif")) == 5
    (tmp_path / "one").mkdir()
    Image.new("RGB", (16, 8)).save(tmp_path / "one" / "0.png")
    with pytest.raises(UserError, match="at least 2 frames"):
        read_frames(tmp_path / "one")


# --- the command ---


def run_module(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tuneavideo.evaluate", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.e2e
def test_command_json_matches_the_benchmark_definitions(eval_root, models, clips):
    # no model options: the command must find ./checkpoints/<name>, as download_models.sh --eval leaves them
    edits = [clips["mp4"], clips["gif"], clips["folder"]]
    prompts = ["a red ball is moving", "a cat, cartoon style", "snow falls on a car"]
    args = [*map(str, edits), "--source", str(clips["source"]), "--json"]
    process = run_module(args + [arg for prompt in prompts for arg in ("--prompt", prompt)], cwd=eval_root)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert stderr.splitlines() == ["loading the CLIP model checkpoints/clip-vit-large-patch14",
                                   "loading the PickScore model checkpoints/PickScore_v1"]  # and no library chatter
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [record["video"] for record in records] == list(map(str, edits))
    for record, path, prompt in zip(records, edits, prompts):
        assert set(record) == KEYS | {"source"}
        assert record["prompt"] == prompt
        assert_figures(record, benchmark_figures(path, prompt, models))
        assert record["source"]["video"] == str(clips["source"])
        assert_figures(record["source"], benchmark_figures(clips["source"], prompt, models))


def test_command_prints_a_table(models, clips, capsys):
    options = [f"--{name.replace('_', '-')}={path}" for name, path in models.items()]
    main([str(clips["mp4"]), str(clips["folder"]), "--prompt", "a ball", "--source", str(clips["source"]), *options])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["video", "frames", "consistency", "neighbours", "text", "pickscore", "prompt"]
    assert len(lines) == 5  # header, then each edit followed by the source's row
    expected = benchmark_figures(clips["mp4"], "a ball", models)
    assert lines[1].split() == [str(clips["mp4"]), "6", *(f"{expected[key]:.2f}" for key in (
        "frame_consistency", "frame_consistency_neighbours", "text_alignment", "pickscore")), "a", "ball"]
    assert lines[2].split()[:2] == ["source", str(clips["source"])]
    assert lines[3].split()[:2] == [str(clips["folder"]), "7"]


@pytest.mark.e2e
def test_bad_input_ends_in_one_line(tmp_path, models, clips):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    options = [f"--{name.replace('_', '-')}={path}" for name, path in models.items()]
    edit = str(clips["mp4"])
    cases = {  # arguments -> words the one line must hold
        ("missing.mp4", "--prompt", "p", *options): "missing.mp4: no such video file",
        (edit, "--prompt", "p", "--clip-model", str(tmp_path / "nowhere")): "./download_models.sh --eval",
        (str(tmp_path / "text.mp4"), "--prompt", "p", *options): "text.mp4: cannot be read as a video",
        (edit, edit, "--prompt", "a", "--prompt", "b", "--prompt", "c", *options): "2 edits but 3 prompts",
        (str(tmp_path / "empty"), "--prompt", "p", *options): "empty: is a folder with no frame images",
    }
    # The command itself on a failure before and one during model loading, at once (each start imports torch and
    # transformers: seconds on 2 cores) ...
    processes = {words: run_module(list(args), cwd=tmp_path) for args, words in list(cases.items())[:2]}
    for words, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, words
        assert "Traceback" not in stderr, stderr
        *phases, line = stderr.strip().splitlines()  # the models being loaded, then the one-line error
        assert all(phase.startswith("loading the ") for phase in phases), stderr
        assert line.startswith("python -m tuneavideo.evaluate: error: "), stderr
        assert words in line, line
    # ... and every case through the same entry point in-process: a one-line exit message; --debug keeps the traceback
    for args, words in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, "evaluate", list(args))
        assert str(exit_info.value).startswith("evaluate: error: ") and "\n" not in str(exit_info.value)
        assert words in str(exit_info.value)
        with pytest.raises(UserError):
            run_cli(main, "evaluate", [*args, "--debug"])


# --- download_models.sh --eval (no network here: a stand-in `hf` records the calls and writes what they name) ---

FAKE_HF = """#!/usr/bin/env bash
# hf download REPO --local-dir DIR [--include PATTERN]...
echo "$*" >> "$CALLS"
dir="$4"; mkdir -p "$dir"; shift 4
while [ $# -gt 0 ]; do
  case "$2" in
    "*.json") for name in config.json preprocessor_config.json tokenizer.json; do echo '{}' > "$dir/$name"; done ;;
    "*.txt") echo x > "$dir/merges.txt" ;;
    *) echo weights > "$dir/$2" ;;
  esac
  shift 2
done
"""


def test_download_script_eval_fetches_the_three_models_without_the_laion_weights(tmp_path):
    script = ROOT / "download_models.sh"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(line.startswith("#") for line in usage.splitlines()) and "--eval" in usage
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hf").write_text(FAKE_HF)
    (tmp_path / "bin" / "hf").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    run = subprocess.run(["bash", str(script), "--eval"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[1] for call in calls] == [  # no Stable Diffusion when only --eval is asked for
        "openai/clip-vit-large-patch14", "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
    assert calls[-1].split()[4:] == ["--include", "*.json", "--include", "*.txt"]  # processor files only
    for name in ("clip-vit-large-patch14", "PickScore_v1", "CLIP-ViT-H-14-laion2B-s32B-b79K"):
        assert (tmp_path / "checkpoints" / name / "preprocessor_config.json").is_file()


def test_an_edit_with_evaluate_writes_the_figures_of_every_edit_and_the_source(eval_root, tuned_run, tmp_path,
                                                                                monkeypatch):
    import inference
    from tuneavideo.editing import plan_edit

    monkeypatch.chdir(eval_root)  # its checkpoints/ holds the tiny scoring models, as download_models.sh --eval would
    args = ["--model", str(tuned_run), "--prompt", "a red ball", "--prompt", "a cat", "--num-inference-steps", "3",
            "--num-inv-steps", "3", "--output-dir", str(tmp_path), "--evaluate"]
    run_cli(inference.main, "inference.py", args)
    records = json.loads((tmp_path / "a red ball+a cat.metrics.json").read_text())
    assert [(r["video"], r["prompt"]) for r in records] == [("a red ball.mp4", "a red ball"), ("a cat.mp4", "a cat")]
    evaluator = Evaluator()
    source = list(plan_edit(*inference.parse_args(args)).clip.frames((64, 64), 0, 12, 3))
    for record in records:
        assert set(record) == KEYS | {"source"} and set(record["source"]) == KEYS - {"video", "prompt"}
        expected = evaluator.score(read_frames(tmp_path / record["video"]), record["prompt"])
        assert record["num_frames"] == 4 and record["frame_consistency"] == pytest.approx(expected.frame_consistency)
        assert record["pickscore"] == pytest.approx(expected.pickscore)
        assert record["source"]["text_alignment"] == pytest.approx(
            evaluator.score(source, record["prompt"]).text_alignment)
    assert records[0]["source"]["frame_consistency"] == records[1]["source"]["frame_consistency"]


def test_an_edit_with_evaluate_and_no_models_fails_before_editing(tuned_run, tmp_path, monkeypatch):
    import inference

    monkeypatch.chdir(tmp_path)  # no checkpoints/ here, and the hub is offline
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference.main, "inference.py", ["--model", str(tuned_run), "--prompt", "a cat", "--output-dir",
                                                 str(tmp_path / "edits"), "--evaluate"])
    message = str(exit_info.value)
    assert "./download_models.sh --eval" in message and "\n" not in message
    assert not list((tmp_path / "edits").glob("*.mp4"))


def test_a_local_edit_with_evaluate_also_measures_what_stayed_outside_the_mask(eval_root, tuned_run, tmp_path,
                                                                              monkeypatch):
    import inference

    monkeypatch.chdir(eval_root)
    run_cli(inference.main, "inference.py", [
        "--model", str(tuned_run), "--prompt", "a red ball is moving", "--control", "refine", "--blend", "ball",
        "--inversion", "ddim", "--num-inference-steps", "1", "--num-inv-steps", "1", "--output-dir", str(tmp_path),
        "--no-audio", "--evaluate"])
    [record] = json.loads((tmp_path / "a red ball is moving.metrics.json").read_text())
    assert set(record) == KEYS | {"source", "psnr_outside_mask"}
    # at 64x64 the mask's map is 2x2 (the latent's quarter), which the 3x3 max pool makes whole: nothing is outside
    assert record["psnr_outside_mask"] is None
