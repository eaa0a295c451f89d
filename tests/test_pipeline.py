"""Pipeline and DDIM inversion on the tiny model: shapes, determinism, latent sharing, the inversion update."""

import pytest
import torch
from diffusers import DDIMScheduler

from tuneavideo.inversion import ddim_inversion
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline


@pytest.fixture
def pipe(tiny_sd, unet3d):
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=unet3d)
    pipe.scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def next_step_by_hand(model_output, timestep, sample, scheduler, num_inv_steps):
    """The design doc's transcription of the original inversion update (epsilon prediction)."""
    current = min(timestep - scheduler.config.num_train_timesteps // num_inv_steps, 999)
    alpha_current = scheduler.alphas_cumprod[current] if current >= 0 else scheduler.final_alpha_cumprod
    alpha_next = scheduler.alphas_cumprod[timestep]
    original = (sample - (1 - alpha_current) ** 0.5 * model_output) / alpha_current**0.5
    return alpha_next**0.5 * original + (1 - alpha_next) ** 0.5 * model_output


def test_inversion_matches_the_original_update(pipe, tiny_sd):
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = ddim_inversion(pipe, scheduler, latent, num_inv_steps=10)

    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(901, 0, -100))
    inputs = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        empty = pipe.text_encoder(inputs.input_ids)[0]
        expected = [latent]
        for t in reversed(scheduler.timesteps):  # ascending: 1, 101, ..., 901
            noise = pipe.unet(expected[-1], t, encoder_hidden_states=empty).sample
            expected.append(next_step_by_hand(noise, int(t), expected[-1], scheduler, 10))
    assert len(latents) == 11
    for ours, theirs in zip(latents, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the first step starts from alpha_bar_0 (set_alpha_to_one=False), not from 1
    assert scheduler.final_alpha_cumprod == pytest.approx(1 - 0.00085)


def test_inversion_follows_v_prediction(pipe, tiny_sd):
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler", prediction_type="v_prediction")
    latent = torch.randn(1, 4, 2, 8, 8)
    out = ddim_inversion(pipe, scheduler, latent, num_inv_steps=2)
    with torch.no_grad():
        empty = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False)
        v = pipe.unet(latent, 1, encoder_hidden_states=empty).sample
    alpha_current, alpha_next = scheduler.alphas_cumprod[0], scheduler.alphas_cumprod[1]
    original = alpha_current**0.5 * latent - (1 - alpha_current) ** 0.5 * v
    epsilon = alpha_current**0.5 * v + (1 - alpha_current) ** 0.5 * latent
    torch.testing.assert_close(out[1], alpha_next**0.5 * original + (1 - alpha_next) ** 0.5 * epsilon)


def test_seeded_sampling_is_deterministic_with_the_right_shape(pipe):
    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe("a man is skiing", video_length=3, height=64, width=64, num_inference_steps=3, generator=generator).videos

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (1, 3, 3, 64, 64) and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - other).abs().max() > 1e-4


def test_one_inverted_latent_serves_several_prompts_and_videos(pipe):
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a man is skiing", "a bear is skiing"]
    out = pipe(prompts, latents=latent, num_inference_steps=3, guidance_scale=12.5, num_videos_per_prompt=2)
    videos = out.videos
    assert videos.shape == (4, 3, 3, 64, 64)
    # eta=0 DDIM from the same latent: a prompt's videos are identical, different prompts differ
    torch.testing.assert_close(videos[0], videos[1], rtol=0, atol=0)
    torch.testing.assert_close(videos[2], videos[3], rtol=0, atol=0)
    assert (videos[0] - videos[2]).abs().max() > 1e-4
    single = pipe(prompts[1], latents=latent, num_inference_steps=3, guidance_scale=12.5).videos
    torch.testing.assert_close(single[0], videos[2], rtol=1e-4, atol=1e-5)


def test_latents_of_the_wrong_shape_are_refused(pipe):
    with pytest.raises(ValueError, match="video_length"):
        pipe("a", video_length=4, latents=torch.randn(1, 4, 3, 8, 8), num_inference_steps=2)


def test_numpy_output_and_callbacks(pipe):
    seen = []
    out = pipe(
        "a", video_length=2, num_inference_steps=4, output_type="np", callback=lambda i, t, z: seen.append(i),
        callback_steps=2, generator=torch.Generator().manual_seed(0),
    )
    assert out.videos.shape == (1, 3, 2, 64, 64) and out.videos.dtype.name == "float32"
    assert seen == [0, 2]


README_RECIPE = """
import torch
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.util import save_videos_grid

pretrained_model_path = "{base}"
my_model_path = "{tuned}"
unet = UNet3DConditionModel.from_pretrained(my_model_path, subfolder='unet', torch_dtype=torch.float32).to('cpu')
pipe = TuneAVideoPipeline.from_pretrained(pretrained_model_path, unet=unet, torch_dtype=torch.float32).to("cpu")
pipe.enable_vae_slicing()

prompt = "spider man is skiing"
ddim_inv_latent = torch.load(f"{{my_model_path}}/inv_latents/ddim_latent-500.pt").to(torch.float32)
video = pipe(prompt, latents=ddim_inv_latent, video_length=3, height=64, width=64, num_inference_steps=4, guidance_scale=12.5).videos

save_videos_grid(video, f"{out}/{{prompt}}.gif")
"""


def test_the_original_readme_recipe_runs(tiny_sd, unet3d, tmp_path):
    from PIL import Image

    tuned = tmp_path / "man-skiing"
    unet3d.save_pretrained(tuned / "unet")
    (tuned / "inv_latents").mkdir()
    torch.save(torch.randn(1, 4, 3, 8, 8).half(), tuned / "inv_latents" / "ddim_latent-500.pt")
    exec(README_RECIPE.format(base=tiny_sd, tuned=tuned, out=tmp_path), {})
    with Image.open(tmp_path / "spider man is skiing.gif") as gif:
        assert gif.size == (64, 64) and gif.n_frames == 3
    assert isinstance(UNet3DConditionModel.from_pretrained(tuned, subfolder="unet"), UNet3DConditionModel)
