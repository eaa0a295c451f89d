"""Structure guidance (tuneavideo/pipelines/controlnet.py): diffusers' 2-D ControlNets on a window's frames folded into
the batch give, frame for frame, what the ControlNet gives for that frame alone; settings as diffusers defines them;
a ControlNet that does not fit, and every bad setting, is one line."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from tests.helpers import ROOT, SAMPLE_CLIP, fake_hf
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.controlnet import ControlError, StructureGuidance, check_fits, load_controlnet
from tuneavideo.pipelines.edit import invert, sample
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.request import LocalEdit
from tuneavideo.tiny import tiny_controlnet
from tuneavideo.video.readers import Clip

def condition_frames(count, size=64, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def window_inputs(frames=3, batch=2, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, frames, size, size, generator=generator)
    text = torch.randn(batch, 7, 16, generator=generator)
    return sample, text


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def test_folded_frames_give_what_the_controlnet_gives_each_frame_alone(tiny_sd):
    controlnet = tiny_controlnet(tiny_sd, seed=0)
    conditions = condition_frames(5)
    guidance = StructureGuidance.create(controlnet, conditions, 5, 64, 64, controlnet_conditioning_scale=0.7)
    sample, text = window_inputs(frames=3)
    frames = [0, 3, 4]  # a window with the anchor frame 0 in front
    with torch.no_grad():
        found = guidance.residuals(sample, 500, text, frames, step=0, num_steps=10, guided=True)
        for position, frame in enumerate(frames):
            image = to_tensor(conditions[frame]).expand(2, -1, -1, -1)
            down, mid = controlnet(sample[:, :, position], 500, text, controlnet_cond=image, conditioning_scale=0.7,
                                   return_dict=False)
            for ours, theirs in zip(found["down_block_additional_residuals"], down, strict=True):
                assert ours.shape[2] == 3
                torch.testing.assert_close(ours[:, :, position], theirs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(found["mid_block_additional_residual"][:, :, position], mid, rtol=1e-4,
                                       atol=1e-5)
    assert found["mid_block_additional_residual"].abs().max() > 1e-2


def test_a_zero_controlnet_gives_zero_residuals_and_an_inactive_step_none(tiny_sd):
    guidance = StructureGuidance.create(tiny_controlnet(tiny_sd), condition_frames(3), 3, 64, 64)
    sample, text = window_inputs()
    with torch.no_grad():
        found = guidance.residuals(sample, 10, text, [0, 1, 2], step=0, num_steps=4, guided=True)
    assert all(torch.count_nonzero(r) == 0 for r in found["down_block_additional_residuals"])
    assert torch.count_nonzero(found["mid_block_additional_residual"]) == 0
    late = StructureGuidance.create(tiny_controlnet(tiny_sd, 0), condition_frames(3), 3, 64, 64,
                                    control_guidance_start=0.5)
    assert late.residuals(sample, 10, text, [0, 1, 2], step=1, num_steps=4, guided=True) == {}


def test_step_scales_follow_diffusers_control_guidance_start_and_end(tiny_sd):
    controlnet = tiny_controlnet(tiny_sd)
    guidance = StructureGuidance.create([controlnet, controlnet], [condition_frames(2)] * 2, 2, 64, 64,
                                        controlnet_conditioning_scale=[0.5, 2.0], control_guidance_start=[0.2, 0.0],
                                        control_guidance_end=[0.7, 1.0])
    # by hand: on while start <= i / 10 and (i + 1) / 10 <= end
    assert [guidance.step_scales(i, 10)[0] for i in range(10)] == [0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 0, 0]
    assert [guidance.step_scales(i, 10)[1] for i in range(10)] == [2.0] * 10


def test_guess_mode_runs_on_the_conditional_half_with_zeros_for_the_unconditional(tiny_sd):
    controlnet = tiny_controlnet(tiny_sd, seed=1)
    conditions = condition_frames(2)
    guidance = StructureGuidance.create(controlnet, conditions, 2, 64, 64, guess_mode=True)
    sample, text = window_inputs(frames=2, batch=2)
    sample[1] = sample[0]  # classifier-free guidance: the same latents twice
    with torch.no_grad():
        found = guidance.residuals(sample, 300, text, [0, 1], step=0, num_steps=1, guided=True)
        for position in range(2):
            image = to_tensor(conditions[position])
            down, mid = controlnet(sample[1:, :, position], 300, text[1:], controlnet_cond=image, guess_mode=True,
                                   return_dict=False)
            for ours, theirs in zip(found["down_block_additional_residuals"], down, strict=True):
                assert torch.count_nonzero(ours[:1]) == 0
                torch.testing.assert_close(ours[1:, :, position], theirs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(found["mid_block_additional_residual"][1:, :, position], mid, rtol=1e-4,
                                       atol=1e-5)


def test_two_controlnets_sum_their_scaled_residuals(tiny_sd):
    first, second = tiny_controlnet(tiny_sd, seed=2), tiny_controlnet(tiny_sd, seed=3)
    conditions = [condition_frames(3, seed=4), condition_frames(3, seed=5)]
    sample, text = window_inputs()
    both = StructureGuidance.create([first, second], conditions, 3, 64, 64, controlnet_conditioning_scale=[0.4, 1.3])
    one = StructureGuidance.create(first, conditions[0], 3, 64, 64, controlnet_conditioning_scale=0.4)
    two = StructureGuidance.create(second, conditions[1], 3, 64, 64, controlnet_conditioning_scale=1.3)
    with torch.no_grad():
        found, a, b = (g.residuals(sample, 700, text, [0, 1, 2], 0, 1, True) for g in (both, one, two))
    for key in found:
        pairs = zip(found[key], a[key], b[key]) if key.startswith("down") else [(found[key], a[key], b[key])]
        for total, x, y in pairs:
            torch.testing.assert_close(total, x + y, rtol=1e-5, atol=1e-6)


def test_uint8_frames_and_pil_images_prepare_alike_resized_to_the_output(tiny_sd):
    images = condition_frames(2, size=48)
    arrays = [np.asarray(image) for image in images]
    controlnet = tiny_controlnet(tiny_sd)
    from_pil = StructureGuidance.create(controlnet, images, 2, 64, 32).prepare([1, 0])
    from_arrays = StructureGuidance.create(controlnet, np.stack(arrays), 2, 64, 32).prepare([1, 0])
    assert from_pil[0].shape == (2, 3, 64, 32)
    assert torch.equal(from_pil[0], from_arrays[0])
    assert 0 <= from_pil[0].min() and from_pil[0].max() <= 1


def test_a_controlnet_for_another_base_is_one_line(tiny_sd):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    controlnet = tiny_controlnet(tiny_sd)
    check_fits(controlnet, unet.config)
    wider = ControlNetModel.from_config({**controlnet.config, "cross_attention_dim": 1024})
    sd1 = {**unet.config, "cross_attention_dim": 768}
    with pytest.raises(ControlError, match=r"^canny is made for SD 2\.x but this model is SD 1\.x \(cross-attention "
                                           r"width 1024, not 768\); use a ControlNet for SD 1\.x$"):
        check_fits(wider, type("Config", (), sd1), name="canny")
    narrower = ControlNetModel.from_config({**controlnet.config, "block_out_channels": (8, 8, 16, 16)})
    with pytest.raises(ControlError, match=r"has UNet widths \(8, 8, 16, 16\), this model \(8, 16, 16, 16\)"):
        check_fits(narrower, unet.config)


@pytest.mark.parametrize("settings, message", [
    (dict(controlnet_conditioning_scale=-0.5), "-0.5 is negative"),
    (dict(controlnet_conditioning_scale="strong"), "'strong' is not a number"),
    (dict(controlnet_conditioning_scale=float("nan")), "nan is not a number"),
    (dict(control_guidance_start=0.6, control_guidance_end=0.6), "need 0 <= start < end <= 1"),
    (dict(control_guidance_end=1.5), "need 0 <= start < end <= 1"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5]), "2 values for 1 ControlNets"),
    (dict(num_frames=4), "condition 1 has 3 frames for a clip of 4"),
])
def test_bad_settings_are_one_line(tiny_sd, settings, message):
    arguments = {"num_frames": 3, "height": 64, "width": 64, **settings}
    with pytest.raises(ControlError, match=message) as err:
        StructureGuidance.create(tiny_controlnet(tiny_sd), condition_frames(3), **arguments)
    assert "\n" not in str(err.value)


def test_load_controlnet_from_a_folder_and_bad_sources_in_one_line(tiny_sd, tmp_path):
    controlnet = tiny_controlnet(tiny_sd, seed=6)
    controlnet.save_pretrained(tmp_path / "controlnet")
    loaded = load_controlnet(tmp_path / "controlnet")
    assert all(torch.equal(v, controlnet.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ControlError, match=r"cannot load a ControlNet .*; download one with \./download_models\.sh "
                                           r"--controlnet canny\|depth\|<hub id>$"):
        load_controlnet(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ControlError, match=r"a ControlNet file must end in \.safetensors, \.ckpt, \.pth, \.bin"):
        load_controlnet(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ControlError, match="broken.safetensors: cannot load a ControlNet .*put its original .yaml"):
        load_controlnet(tmp_path / "broken.safetensors")


def test_download_script_controlnet_fetches_the_controlnets_and_the_depth_estimator(tmp_path):
    script = ROOT / "download_models.sh"
    env = fake_hf(tmp_path)
    run = subprocess.run(["bash", str(script), "--controlnet", "canny", "--controlnet=depth", "--controlnet",
                          "someone/sd21-pose"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = [call.split() for call in (tmp_path / "calls").read_text().splitlines()]
    # no Stable Diffusion when only ControlNets are asked for; full-precision diffusers weights
    assert [call[1] for call in calls] == ["lllyasviel/control_v11p_sd15_canny", "lllyasviel/control_v11f1p_sd15_depth",
                                           "someone/sd21-pose", "Intel/dpt-large"]
    assert calls[0][4:] == ["--include", "config.json", "--include", "diffusion_pytorch_model.safetensors"]
    for name in ("control_v11p_sd15_canny", "control_v11f1p_sd15_depth", "sd21-pose"):
        assert (tmp_path / "checkpoints" / name / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "dpt-large" / "preprocessor_config.json").is_file()
    for args, message in ((["--controlnet"], "--controlnet needs a value"),
                          (["--controlnet", "--eval"], "--controlnet needs a value"),
                          (["--controlnet", "pose"], "unknown ControlNet 'pose': use canny, depth or a hub id")):
        bad = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_rows_of_a_tuning_batch_take_their_own_frames_and_timesteps(tiny_sd):
    controlnet = tiny_controlnet(tiny_sd, seed=7)
    guidance = StructureGuidance.create(controlnet, condition_frames(6), 6, 64, 64)
    sample, text = window_inputs(frames=2, batch=2)
    timesteps = torch.tensor([50, 900])
    with torch.no_grad():
        both = guidance.residuals(sample, timesteps, text, [[0, 1], [4, 5]], step=0, num_steps=1, guided=False)
        for row, frames in enumerate(([0, 1], [4, 5])):
            alone = guidance.residuals(sample[row : row + 1], timesteps[row], text[row : row + 1], frames, 0, 1, False)
            torch.testing.assert_close(both["mid_block_additional_residual"][row : row + 1],
                                       alone["mid_block_additional_residual"], rtol=1e-4, atol=1e-5)
            for ours, theirs in zip(both["down_block_additional_residuals"], alone["down_block_additional_residuals"]):
                torch.testing.assert_close(ours[row : row + 1], theirs, rtol=1e-4, atol=1e-5)


# --- in the pipeline: the one sampling loop, the inversions and local edits under control -------------------------


@pytest.fixture
def untuned(tiny_sd):
    """The tiny pipeline with the just-inflated UNet (zero temporal output: on identical frames, the image model),
    a DDIM scheduler and no progress bars; ControlNets are set per test."""
    unet = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet").eval()
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=unet, scheduler=DDIMScheduler.from_pretrained(
        tiny_sd, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_pipeline(tiny_sd, controlnet) -> StableDiffusionControlNetPipeline:
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=controlnet, scheduler=DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SETTINGS = dict(num_inference_steps=5, guidance_scale=7.5, control_guidance_start=0.2, control_guidance_end=0.8,
                height=64, width=64)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_on_identical_frames_every_frame_is_what_diffusers_controlnet_pipeline_gives(tiny_sd, untuned, guess_mode):
    controlnet = tiny_controlnet(tiny_sd, seed=8)
    untuned.controlnet = controlnet
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = condition_frames(1, size=48)[0]  # resized to 64x64 by both
    expected = image_pipeline(tiny_sd, controlnet)(
        "a red ball", image=image, latents=latent, controlnet_conditioning_scale=0.6, guess_mode=guess_mode,
        output_type="latent", **SETTINGS).images
    ours = untuned("a red ball", latents=latent[:, :, None].expand(-1, -1, 3, -1, -1), conditioning_frames=[image] * 3,
                   controlnet_conditioning_scale=0.6, guess_mode=guess_mode, output_type="latent", **SETTINGS).videos
    plain = untuned("a red ball", latents=latent[:, :, None].expand(-1, -1, 3, -1, -1), output_type="latent",
                    **{k: v for k, v in SETTINGS.items() if not k.startswith("control")}).videos
    assert (ours - plain).abs().max() > 1e-2  # the control acts
    for frame in range(3):
        torch.testing.assert_close(ours[:, :, frame], expected, rtol=1e-4, atol=1e-4)


def test_two_controlnets_equal_diffusers_multicontrolnet(tiny_sd, untuned):
    nets = [tiny_controlnet(tiny_sd, seed=9), tiny_controlnet(tiny_sd, seed=10)]
    untuned.controlnet = MultiControlNetModel(nets)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = [condition_frames(1, seed=11)[0], condition_frames(1, seed=12)[0]]
    scales = dict(controlnet_conditioning_scale=[0.5, 0.9], control_guidance_start=[0.0, 0.2],
                  control_guidance_end=[0.6, 1.0])
    settings = {k: v for k, v in SETTINGS.items() if not k.startswith("control")}
    expected = image_pipeline(tiny_sd, nets)("a cat", image=images, latents=latent, output_type="latent",
                                             **settings, **scales).images
    ours = untuned("a cat", latents=latent[:, :, None].expand(-1, -1, 2, -1, -1), output_type="latent",
                   conditioning_frames=[[images[0]] * 2, [images[1]] * 2], **settings, **scales).videos
    for frame in range(2):
        torch.testing.assert_close(ours[:, :, frame], expected, rtol=1e-4, atol=1e-4)


def index_conditions(count: int, size: int = 64) -> list[np.ndarray]:
    """Condition frames whose grey level is 20 * their index, so a ControlNet input shows which frames it was."""
    return [np.full((size, size, 3), 20 * index, np.uint8) for index in range(count)]


def test_a_zero_controlnet_gives_exactly_the_uncontrolled_edit_inversion_included(tiny_sd, pipe):
    source = pipe.encode_video(Clip(SAMPLE_CLIP).frames((64, 64), 0, 4)).mean
    plain = sample(pipe, invert(pipe, source, 3), ["a red ball"], 3, 7.5, 3)
    pipe.controlnet = tiny_controlnet(tiny_sd)
    control = dict(conditioning_frames=index_conditions(4))
    controlled = sample(pipe, invert(pipe, source, 3, control=control), ["a red ball"], 3, 7.5, 3, control=control)
    assert torch.equal(controlled, plain)
    pipe.controlnet = tiny_controlnet(tiny_sd, seed=13)
    assert not torch.allclose(invert(pipe, source, 3, control=control), invert(pipe, source, 3), atol=1e-3)


def test_each_window_and_the_anchor_get_their_own_conditions_and_one_window_is_unwindowed(tiny_sd, pipe):
    pipe.controlnet = tiny_controlnet(tiny_sd, seed=14)
    seen = []
    hook = pipe.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sorted({round(float(v) * 255 / 20) for v in
                                                          kwargs["controlnet_cond"].flatten(1).mean(1)})),
        with_kwargs=True)
    latent = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    control = dict(conditioning_frames=index_conditions(6))
    pipe("a ball", latents=latent, num_inference_steps=1, window_size=3, window_overlap=1, **control)
    hook.remove()
    assert seen == [[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]  # each window's frames, and the anchor frame 0
    one = pipe("a ball", latents=latent, num_inference_steps=2, window_size=6, output_type="latent", **control).videos
    unwindowed = pipe("a ball", latents=latent, num_inference_steps=2, output_type="latent", **control).videos
    assert torch.equal(one, unwindowed)


@pytest.mark.parametrize("inversion", ["ddim", "null-text"])
def test_local_edits_under_a_zero_controlnet_are_the_uncontrolled_ones(tiny_sd, pipe, inversion):
    source = pipe.encode_video(Clip(SAMPLE_CLIP).frames((64, 64), 0, 2)).mean
    plan = LocalEdit("refine", blend_words=("ball", "ball"), inversion=inversion, null_text_iterations=1).plan(
        pipe.tokenizer, ["a red ball"], "a ball")

    def run(control):
        return plan.invert_and_edit(pipe, source, ["a red ball"], 2, 2, 7.5, None, None, lambda *_: None,
                                    control=control)

    plain = run(None)
    pipe.controlnet = tiny_controlnet(tiny_sd)
    control = dict(conditioning_frames=index_conditions(2))
    zero = run(control)
    if inversion == "ddim":
        assert torch.equal(zero.source, plain.source) and torch.equal(zero.targets, plain.targets)
    else:  # null-text's gradients also flow through the ControlNet (exactly zero there), which reorders their sums
        torch.testing.assert_close(zero.source, plain.source, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(zero.targets, plain.targets, rtol=1e-4, atol=1e-4)
    pipe.controlnet = tiny_controlnet(tiny_sd, seed=15)
    controlled = run(control)
    assert (controlled.source - plain.source).abs().max() > 1e-3  # both branches are guided
    assert (controlled.targets - plain.targets).abs().max() > 1e-3
