"""Your own models: a single-file checkpoint as the base, LoRAs fused into it (in training and in edits), and LoRA
tuning (`tuning: lora`). Tiny models, offline, on the CPU."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import inference
import train_tuneavideo
from tests.helpers import ROOT, SAMPLE_CLIP, denoising_losses, train_in_process
from tests.original_layout import write_original_checkpoint
from tuneavideo.app.page import picked_loras
from tuneavideo.app.workspace import TuneSettings, Workspace, edit_command, write_tune_config
from tuneavideo.base_model import BaseModel, fuse_loras, parse_lora
from tuneavideo.cli import run_cli
from tuneavideo.config import LoraFile, load_config
from tuneavideo.editing import edit
from tuneavideo.errors import UserError
from tuneavideo.evaluate import read_frames
from tuneavideo.models.unet import TEMPORAL_KEY, UNet3DConditionModel
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.request import EditRequest
from tuneavideo.tiny import tiny_unet_config
from tuneavideo.tuned_parameters import apply_tuned_parameters

EDIT = dict(num_inference_steps=2, num_inv_steps=2, audio=False, gif=False)
QUICK = dict(max_train_steps=2, validation_steps=100, checkpointing_steps=100, mixed_precision="no")
UNET_LORA_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TEXT_LORA_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # kohya's: every text linear layer


def random_lora(unet: UNet2DConditionModel, text_encoder: CLIPTextModel | None, path: Path, rank: int = 2) -> Path:
    """A diffusers-format LoRA file for these models: rank `rank`, alpha = rank, random A and B (B is zero when
    initialised, which would make the LoRA a no-op)."""
    layers = {}
    for prefix, model, targets in (("unet", unet, UNET_LORA_LAYERS), ("text_encoder", text_encoder, TEXT_LORA_LAYERS)):
        if model is None:
            continue
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        generator = torch.Generator().manual_seed(len(layers))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        layers[f"{prefix}_lora_layers"] = get_peft_model_state_dict(model)
    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(path, **layers)
    return path / "pytorch_lora_weights.safetensors"


def to_kohya(diffusers_file: Path, path: Path, alpha: float) -> Path:
    """The same LoRA in kohya's sd-scripts format (`lora_unet_...` / `lora_te_text_model_...`, `lora_down`,
    `lora_up`, `alpha`), as community LoRAs ship."""
    tensors = {}
    for key, value in load_file(diffusers_file).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        name += module.replace(".", "_")
        tensors[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def files(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """A LoRA for the tiny model (diffusers and kohya format), a single-file checkpoint of it, and bad files."""
    root = tmp_path_factory.mktemp("own-models")
    lora = random_lora(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
                       CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"), root / "lora")
    # another family: a UNet of other widths (as SD 2.x's 1024-wide text features are to SD 1.x)
    torch.manual_seed(0)
    other = UNet2DConditionModel(**{**tiny_unet_config(), "block_out_channels": (16, 32, 32, 32),
                                    "cross_attention_dim": 24})
    checkpoint = write_original_checkpoint(tiny_sd, root / "tiny.safetensors")
    sdxl = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    save_file(sdxl, str(root / "sdxl.safetensors"))
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    # what ./download_models.sh --configs writes: configs and tokenizer, no weights
    configs = root / "checkpoints" / "configs" / "stable-diffusion-v1-5"
    shutil.copytree(tiny_sd, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dict(lora=lora, kohya=to_kohya(lora, root / "kohya.safetensors", alpha=1.0), checkpoint=checkpoint,
                other_family=random_lora(other, None, root / "other"), sdxl=root / "sdxl.safetensors",
                notes=root / "notes.ckpt", root=root)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_same(got: dict, expected: dict, atol: float = 0.0) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=name)


# A single-file checkpoint ---------------------------------------------------------------------------------------


def test_a_single_file_checkpoint_tunes_to_the_weights_of_its_folder(files, tiny_sd, tmp_path, run_config,
                                                                    monkeypatch):
    """The tiny model written in the original layout, its architecture from the configs-only folder that
    ./download_models.sh --configs writes (found by default, from the file's keys), tunes bit for bit as its folder."""
    monkeypatch.chdir(files["root"])  # ./checkpoints/configs/stable-diffusion-v1-5 is there
    folder_run = train_in_process(load_config(run_config(tmp_path / "folder", "folder.yaml", **QUICK)))
    file_run = train_in_process(load_config(run_config(tmp_path / "file", "file.yaml", **QUICK),
                                            [f"pretrained_model_path={files['checkpoint']}"]))
    tuned = "tuned_parameters.safetensors"
    assert_same(load_file(file_run / tuned), load_file(folder_run / tuned))
    folder_pipe = TuneAVideoPipeline.from_pretrained(folder_run)
    file_pipe = TuneAVideoPipeline.from_pretrained(file_run)
    for component in ("unet", "vae", "text_encoder"):
        assert_same(state(getattr(file_pipe, component)), state(getattr(folder_pipe, component)))
    recorded = json.loads((file_run / "base_model.json").read_text())
    assert recorded["pretrained_model_path"] == str(files["checkpoint"])
    assert Path(recorded["pretrained_model_config"]).resolve() == (files["root"] / "checkpoints" / "configs" /
                                                                   "stable-diffusion-v1-5").resolve()


def tiny_sd2(tiny_sd: Path, folder: Path) -> Path:
    """The tiny model as an SD 2.x: a 1024-wide text encoder (diffusers reads a checkpoint as 2.x from the width of
    the second layer's cross-attention of the first level: SD's 2 layers a block), linear transformer projections,
    v-prediction."""
    shutil.copytree(tiny_sd, folder, ignore=shutil.ignore_patterns("unet", "text_encoder"))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    torch.manual_seed(0)
    UNet2DConditionModel(**{**tiny_unet_config(), "cross_attention_dim": 1024, "use_linear_projection": True,
                            "layers_per_block": 2}).save_pretrained(folder / "unet")
    config = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").config.to_dict()
    config.update(hidden_size=1024, intermediate_size=64, num_attention_heads=8, num_hidden_layers=2, hidden_act="gelu")
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(folder / "text_encoder")
    return folder


def test_an_sd2_single_file_checkpoint_tunes_to_the_weights_of_its_folder(tiny_sd, tmp_path, run_config,
                                                                         monkeypatch):
    """SD 2.x's original layout (its text encoder as OpenCLIP's), found as 2.x from its keys, its architecture from
    ./checkpoints/configs/stable-diffusion-2-1, tunes bit for bit as its folder."""
    folder = tiny_sd2(tiny_sd, tmp_path / "tiny-sd2")
    checkpoint = write_original_checkpoint(folder, tmp_path / "tiny-sd2.safetensors")
    shutil.copytree(folder, tmp_path / "checkpoints" / "configs" / "stable-diffusion-2-1",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    monkeypatch.chdir(tmp_path)
    runs = [train_in_process(load_config(run_config(tmp_path / name, f"{name}.yaml", **QUICK),
                                         [f"pretrained_model_path={base}"]))
            for name, base in (("folder", folder), ("file", checkpoint))]
    tuned = "tuned_parameters.safetensors"
    assert_same(load_file(runs[1] / tuned), load_file(runs[0] / tuned))
    pipes = [TuneAVideoPipeline.from_pretrained(run) for run in runs]
    for component in ("unet", "vae", "text_encoder"):
        assert_same(state(getattr(pipes[1], component)), state(getattr(pipes[0], component)))
    assert pipes[1].scheduler.config.prediction_type == "v_prediction"
    recorded = json.loads((runs[1] / "base_model.json").read_text())
    assert Path(recorded["pretrained_model_config"]).resolve() == (tmp_path / "checkpoints" / "configs" /
                                                                   "stable-diffusion-2-1").resolve()


# LoRAs on the base ----------------------------------------------------------------------------------------------


def test_a_lora_fused_by_name_into_the_inflated_unet_equals_it_fused_before_inflation(files, tiny_sd):
    before = BaseModel.resolve(str(tiny_sd), loras=[LoraFile(str(files["lora"]), 0.7)]).video_pipeline()
    after = BaseModel.resolve(str(tiny_sd)).video_pipeline()
    untouched = state(after.unet)
    fuse_loras(after, [LoraFile(str(files["lora"]), 0.7)])
    plain = {name: value for name, value in state(before.unet).items() if TEMPORAL_KEY not in name}
    assert_same(plain, {name: value for name, value in state(after.unet).items() if TEMPORAL_KEY not in name},
                atol=1e-6)
    assert_same(state(before.text_encoder), state(after.text_encoder), atol=1e-6)
    changed = [name for name in plain if not torch.equal(plain[name], untouched[name])]
    assert any("attn1.to_q" in name for name in changed) and any("conv1" in name for name in changed)


def test_scale_zero_changes_nothing_and_a_kohya_file_loads_as_its_diffusers_twin(files, tiny_sd):
    plain = BaseModel.resolve(str(tiny_sd)).image_pipeline()
    zero = BaseModel.resolve(str(tiny_sd), loras=[LoraFile(str(files["lora"]), 0.0)]).image_pipeline()
    for component in ("unet", "text_encoder"):
        assert_same(state(getattr(zero, component)), state(getattr(plain, component)))
    # kohya's alpha 1 at rank 2 scales the LoRA by 1/2: the diffusers file (alpha = rank) at scale 0.5
    kohya = BaseModel.resolve(str(tiny_sd), loras=[LoraFile(str(files["kohya"]))]).image_pipeline()
    half = BaseModel.resolve(str(tiny_sd), loras=[LoraFile(str(files["lora"]), 0.5)]).image_pipeline()
    for component in ("unet", "text_encoder"):
        assert_same(state(getattr(kohya, component)), state(getattr(half, component)), atol=1e-6)
        assert any(not torch.equal(value, state(getattr(plain, component))[name])
                   for name, value in state(getattr(kohya, component)).items())


def test_an_edit_with_a_lora_equals_an_edit_of_the_run_with_it_fused_before_inflation(files, tiny_sd, tuned_run,
                                                                                    tmp_path):
    """`--lora` on a tuned run == the same run whose image weights (the tuned UNet without its temporal layers, and
    its text encoder) had the LoRA fused before inflation; the LoRA changes the edit, at scale 0 it changes nothing."""
    fused = tmp_path / "fused-run"
    shutil.copytree(tuned_run, fused)
    shutil.rmtree(fused / "inv_latents")  # inverted by the run's own UNet, not by the fused one
    tuned = TuneAVideoPipeline.from_pretrained(tuned_run)
    image_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sd, subfolder="unet"))
    tuned_state = state(tuned.unet)
    image_unet.load_state_dict({name: value for name, value in tuned_state.items() if TEMPORAL_KEY not in name})
    image = StableDiffusionPipeline(vae=tuned.vae, text_encoder=tuned.text_encoder, tokenizer=tuned.tokenizer,
                                    unet=image_unet, scheduler=tuned.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    fuse_loras(image, [LoraFile(str(files["lora"]), 0.8)])
    unet = UNet3DConditionModel.from_2d(image.unet, tuned.unet.config.spatial_attention)
    unet.load_state_dict({name: value for name, value in tuned_state.items() if TEMPORAL_KEY in name}, strict=False)
    unet.save_pretrained(fused / "unet")
    image.text_encoder.save_pretrained(fused / "text_encoder")

    def frames(run: Path, name: str, loras: list[LoraFile]) -> np.ndarray:
        result = edit(run, EditRequest(["a red ball"], output_dir=tmp_path / name, loras=loras, **EDIT))
        return np.stack(read_frames(result.videos[0])).astype(float)

    with_lora = frames(tuned_run, "with-lora", [LoraFile(str(files["lora"]), 0.8)])
    fused_before = frames(fused, "fused", [])
    without = frames(tuned_run, "without", [])
    at_zero = frames(tuned_run, "zero", [LoraFile(str(files["lora"]), 0.0)])
    assert np.abs(with_lora - fused_before).max() <= 1  # H.264 of frames equal up to float rounding
    assert np.abs(at_zero - without).max() <= 1
    assert np.abs(with_lora - without).mean() > 10 * max(np.abs(with_lora - fused_before).mean(), 0.05)


def test_a_run_tuned_with_a_lora_records_it_and_its_model_carries_it(files, tiny_sd, tmp_path, run_config):
    lora = files["lora"]
    config = run_config(tmp_path / "run", **QUICK)
    run = train_in_process(load_config(config, [f"loras=[{{path: {lora}, scale: 0.5}}]"]))
    recorded = json.loads((run / "base_model.json").read_text())
    assert [(item["path"], item["scale"]) for item in recorded["loras"]] == [(str(lora), 0.5)]
    assert len(recorded["loras"][0]["sha256"]) == 64
    # the saved pipeline is the fused base plus the tuned tensors: edits use the LoRA without being told
    expected = BaseModel.resolve(str(tiny_sd), loras=[LoraFile(str(lora), 0.5)]).video_pipeline()
    apply_tuned_parameters(expected.unet, run / "tuned_parameters.safetensors")
    saved = TuneAVideoPipeline.from_pretrained(run)
    assert_same(state(saved.unet), state(expected.unet))
    assert_same(state(saved.text_encoder), state(expected.text_encoder))
    # resuming with another LoRA file under the same name would mix two bases
    changed = tmp_path / "changed.safetensors"
    shutil.copy(files["kohya"], changed)
    train_in_process(load_config(config, [f"loras=[{{path: {changed}}}]", "overwrite=true"]))
    shutil.copy(lora, changed)
    with pytest.raises(UserError, match="changed since this run started") as error:
        train_in_process(load_config(config, [f"loras=[{{path: {changed}}}]", "resume_from_checkpoint=latest"]))
    assert "\n" not in str(error.value)


# LoRA tuning ------------------------------------------------------------------------------------------------------


LORA_TUNING = ["tuning=lora", "lora_rank=4"]


def test_lora_tuning_lowers_the_loss_and_saves_adapters_and_temporal_layers(tiny_sd, tmp_path, run_config):
    config = run_config(tmp_path / "run", validation_steps=1000)
    cfg = load_config(config, [*LORA_TUNING, "max_train_steps=60", "learning_rate=1e-2", "checkpointing_steps=1000",
                               "gradient_checkpointing=False", "trainable_modules=[attn1,attn2,attn_temp,ff]"])
    run = train_in_process(cfg)
    tuned = load_file(run / "tuned_parameters.safetensors")
    adapted = {name.split(".lora_")[0] for name in tuned if ".lora_" in name}
    assert adapted and all(".attn1." in n or ".attn2." in n or ".ff." in n for n in adapted)
    assert any("attn_temp.to_q.weight" in name for name in tuned)  # the temporal layers train fully
    assert not any(name.endswith("attn1.to_q.weight") for name in tuned)  # pretrained weights stay in the base
    saved = TuneAVideoPipeline.from_pretrained(run)
    rebuilt = apply_tuned_parameters(UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"),
                                     run / "tuned_parameters.safetensors")
    assert_same(state(saved.unet), state(rebuilt))

    untuned = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet")
    before, after = denoising_losses(saved, tiny_sd, cfg.train_data.video_path, cfg.train_data.prompt,
                                     [untuned, saved.unet], 8)
    assert after < 0.9 * before, (before, after)


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return UNet3DConditionModel.from_pretrained(run, subfolder="unet").state_dict()


def _launch(config: Path, *overrides: str) -> subprocess.Popen:
    """`accelerate launch train_tuneavideo.py` on one CPU process, as a user runs it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
               str(ROOT / "train_tuneavideo.py"), f"--config={config}", *LORA_TUNING, *overrides]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("case", ["stopped", pytest.param("killed", marks=pytest.mark.e2e)])
def test_lora_tuning_resumes_to_the_same_weights_and_the_run_edits(case, tmp_path, run_config):
    """Stopped after its checkpoint at step 2 (or killed with SIGKILL after checkpoint 1, each run a process of its
    own), then resumed: the same weights as a run that was never interrupted, bit for bit (one machine, one code
    path)."""
    settings = dict(max_train_steps=4, checkpointing_steps=2 if case == "stopped" else 1, validation_steps=100)
    straight, run = tmp_path / "straight", tmp_path / "resumed"
    config = run_config(run, "resumed.yaml", **settings)
    if case == "stopped":
        train_in_process(load_config(run_config(straight, "straight.yaml", **settings), LORA_TUNING))
        train_in_process(load_config(config, [*LORA_TUNING, "max_train_steps=2"]))
        train_in_process(load_config(config, [*LORA_TUNING, "resume_from_checkpoint=latest"]))
    else:
        uninterrupted = _launch(run_config(straight, "straight.yaml", **settings))
        _, errors = uninterrupted.communicate(timeout=600)
        assert uninterrupted.returncode == 0, errors[-3000:]
        process = _launch(config)
        deadline = time.time() + 300
        while not (run / "checkpoint-1").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert not (run / "tuned_parameters.safetensors").exists()  # it died mid-run
        resumed = _launch(config, "resume_from_checkpoint=latest")
        _, errors = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, errors[-3000:]
    assert_same(load_file(run / "tuned_parameters.safetensors"), load_file(straight / "tuned_parameters.safetensors"))
    assert_same(_unet(run), _unet(straight))
    checkpoint = load_file(run / "checkpoint-4" / "model.safetensors")
    assert checkpoint and all(".lora_" in name or TEMPORAL_KEY in name for name in checkpoint)

    result = edit(run, EditRequest(["a red ball"], output_dir=tmp_path / "edit", **EDIT))
    assert len(read_frames(result.videos[0])) == 4


# Bad input: one line each -----------------------------------------------------------------------------------------


# case -> (config overrides, `{x}` a file of the `files` fixture), words the one-line message must contain
BAD_INPUT = {
    "not a LoRA": (["loras=[{{path: {tiny_unet}}}]"], ["diffusion_pytorch_model.safetensors", "not a LoRA"]),
    "another family's LoRA": (["loras=[{{path: {other_family}}}]"], ["other", "not a LoRA of this"]),
    "a missing LoRA": (["loras=[{{path: {root}/missing.safetensors}}]"], ["loras[0].path", "missing.safetensors",
                                                                          "no such file"]),
    "LoRA rank 0": (["tuning=lora", "lora_rank=0"], ["lora_rank=0", ">= 1"]),
    "LoRA tuning of temporal layers only": (["tuning=lora", "trainable_modules=[attn_temp]"],
                                            ["tuning: lora", "attn_temp"]),
    "a missing checkpoint": (["pretrained_model_path={root}/missing.safetensors"], ["missing.safetensors",
                                                                                    "no such file"]),
    "an SDXL checkpoint": (["pretrained_model_path={sdxl}"], ["sdxl.safetensors", "xl_base", "1.x or 2.x"]),
    "not a checkpoint": (["pretrained_model_path={notes}"], ["notes.ckpt", "cannot be read as a checkpoint"]),
    "a LoRA as the checkpoint": (["pretrained_model_path={lora}"], ["pytorch_lora_weights.safetensors",
                                                                   "not a Stable Diffusion checkpoint"]),
    "no default config": (["pretrained_model_path={checkpoint}"], ["stable-diffusion-v1-5",
                                                                  "./download_models.sh --configs"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_models_and_loras_are_one_line_errors(case, files, tiny_sd, tmp_path, run_config, monkeypatch,
                                                  fresh_accelerate_state):
    overrides, words = BAD_INPUT[case]
    monkeypatch.chdir(tmp_path)  # no ./checkpoints/configs here
    names = {**files, "tiny_unet": Path(tiny_sd) / "unet" / "diffusion_pytorch_model.safetensors"}
    args = [item.format(**names) for item in overrides]
    config = run_config(tmp_path / "run", **QUICK)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_tuneavideo.main, "train_tuneavideo.py", [f"--config={config}", *args])
    message = str(exit_info.value.code)
    assert message.startswith("train_tuneavideo.py: error: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_edit_loras_are_parsed_and_checked_before_any_model_loads(files, tuned_run, tmp_path):
    assert parse_lora("style.safetensors") == LoraFile("style.safetensors", 1.0)
    assert parse_lora("dir/style.safetensors:0.6") == LoraFile("dir/style.safetensors", 0.6)
    assert parse_lora("C:style") == LoraFile("C:style", 1.0)  # not a number: all of it is the path
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference.main, "inference.py", ["--model", str(tuned_run), "--prompt", "a cat", "--lora",
                                                 str(tmp_path / "missing.safetensors:0.5")])
    message = str(exit_info.value.code)
    assert "--lora" in message and "missing.safetensors" in message and "\n" not in message
    with pytest.raises(UserError, match="notes.ckpt: not a LoRA") as error:
        edit(tuned_run, EditRequest(["a cat"], output_dir=tmp_path / "edit", loras=[LoraFile(str(files["notes"]))],
                                    **EDIT))
    assert "\n" not in str(error.value) and not (tmp_path / "edit" / "a cat.mp4").exists()


# The web app ------------------------------------------------------------------------------------------------------


def test_the_app_offers_model_files_and_loras_by_name_and_passes_them_on(files, tiny_sd, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_sd, checkpoints / "tiny-sd")
    shutil.copy(files["checkpoint"], checkpoints / "community.safetensors")
    (checkpoints / "loras").mkdir()
    shutil.copy(files["kohya"], checkpoints / "loras" / "style.safetensors")
    (checkpoints / "notes.txt").write_text("not a model")
    shutil.copytree(files["root"] / "checkpoints" / "configs", checkpoints / "configs")  # configs only: no model
    workspace = Workspace(root=tmp_path / "runs", checkpoints=checkpoints, data=tmp_path)
    assert list(workspace.base_models()) == ["community.safetensors", "tiny-sd"]
    assert workspace.loras() == {"style.safetensors": checkpoints / "loras" / "style.safetensors"}
    # the Tune and Edit tabs take LoRAs by those names only
    assert picked_loras(["style.safetensors"], workspace) == (checkpoints / "loras" / "style.safetensors",)
    with pytest.raises(UserError, match=r"^there is no LoRA '../loras/style.safetensors' in checkpoints/loras/"):
        picked_loras(["../loras/style.safetensors"], workspace)
    settings = TuneSettings("a ball", 1, 4, 3, 0, 64, 3e-5, 33, "", 2, 1,
                            loras=(workspace.loras()["style.safetensors"],), lora_scale=0.7)
    (tmp_path / "run").mkdir()
    cfg = load_config(write_tune_config(tmp_path / "run", workspace.base_models()["community.safetensors"],
                                        SAMPLE_CLIP, settings))
    assert cfg.pretrained_model_path == str((checkpoints / "community.safetensors").resolve())
    assert cfg.loras == [LoraFile(str((checkpoints / "loras" / "style.safetensors").resolve()), 0.7)]
    # an edit's LoRAs reach inference.py in its request file, as the same request
    run = tmp_path / "run"
    (run / "model_index.json").touch()
    (run / "config.yaml").touch()
    request = EditRequest(["a cat"], output_dir=str(tmp_path / "out"), loras=[LoraFile(str(files["lora"]), 0.35)])
    command = edit_command(workspace, run, request.save(tmp_path / "request.json"))
    assert inference.parse_args(command[2:]) == (run, request)
