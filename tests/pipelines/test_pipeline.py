"""Pipeline and DDIM inversion on the tiny model: shapes, determinism, latent sharing, the inversion update."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from tests.helpers import ROOT
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.inversion import ddim_inversion
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline


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
    # keep_all=False keeps only the last latent (the same computation, in one process: bit for bit)
    last = ddim_inversion(pipe, scheduler, latent, num_inv_steps=10, keep_all=False)
    assert len(last) == 1 and torch.equal(last[0], latents[-1])


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
    # eta=0 DDIM from the same latent: a prompt's videos are the same (rows of one batch: kernels may tile them
    # differently, so to 1e-6), different prompts differ
    torch.testing.assert_close(videos[0], videos[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(videos[2], videos[3], rtol=1e-6, atol=1e-6)
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


@pytest.mark.parametrize("callback_steps", [None, 0, -1, 1.5])
def test_callback_steps_must_be_a_positive_integer(pipe, callback_steps):
    # None passed check_inputs and then failed in the loop as `i % None` (TypeError)
    with pytest.raises(ValueError, match="callback_steps"):
        pipe("a", video_length=2, num_inference_steps=2, callback=lambda i, t, z: None, callback_steps=callback_steps)


def test_a_scheduler_config_without_clip_sample_is_corrected_with_a_warning(tiny_sd, unet3d):
    # Many community checkpoints' scheduler configs lack `clip_sample`; DDIM then defaults to clipping x0, which the
    # original pipeline's constructor (like diffusers' SD pipelines) corrected, with a warning.
    config = dict(DDIMScheduler.load_config(tiny_sd, subfolder="scheduler"))
    del config["clip_sample"]
    config["steps_offset"] = 0
    unfixed = DDIMScheduler.from_config(config)
    assert unfixed.config.clip_sample is True
    with pytest.warns(FutureWarning, match="clip_sample"):
        pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=unet3d, scheduler=unfixed)
    assert (pipe.scheduler.config.clip_sample, pipe.scheduler.config.steps_offset) == (False, 1)
    reference = TuneAVideoPipeline.from_pretrained(
        tiny_sd, unet=unet3d, scheduler=DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"))
    latent = 3 * torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latent, num_inference_steps=4, guidance_scale=12.5, output_type="latent")
    corrected, expected = (p("a cat", **settings).videos for p in (pipe, reference))
    torch.testing.assert_close(corrected, expected, rtol=1e-5, atol=1e-6)
    # what it corrects is no detail: with x0 clipping the same call gives another latent
    clipping = DDIMScheduler.from_config(config)
    pipe.scheduler = clipping
    assert (pipe("a cat", **settings).videos - expected).abs().max() > 1e-2


def test_encode_video_is_the_scaled_vae_posterior_of_every_frame(pipe):
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    posterior = pipe.encode_video(iter(frames), chunk_size=2)  # streamed in chunks of 2, 2 and 1 frames
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        expected = pipe.vae.encode(pixels).latent_dist
    scale = pipe.vae.config.scaling_factor
    assert posterior.mean.shape == (1, 4, 5, 8, 8)
    torch.testing.assert_close(posterior.mean[0].transpose(0, 1), expected.mean * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(posterior.std[0].transpose(0, 1), expected.std * scale, rtol=1e-5, atol=1e-7)
    # and decoding is its mirror: the decoded clip has the frames' layout
    decoded = pipe.decode_latents(posterior.mean)
    assert decoded.shape == (1, 3, 5, 64, 64) and 0 <= decoded.min() and decoded.max() <= 1


def test_chunked_decoding_is_the_whole_clips(pipe):
    """Two clips of 5 frames decoded 2 frames at a time (chunks of 2, 2 and 1) give the clips decoded at once."""
    latents = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode_latents(latents)
    chunks = list(pipe.decode_chunks(latents, chunk_size=2))
    assert [chunk.shape for chunk in chunks] == [(2, 3, 2, 64, 64)] * 2 + [(2, 3, 1, 64, 64)]
    assert whole.shape == (2, 3, 5, 64, 64) and 0 <= whole.min() and whole.max() <= 1
    np.testing.assert_allclose(pipe.decode_latents(latents, chunk_size=2), whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(chunks, axis=2), whole, rtol=0, atol=1e-6)
    # each frame is its own: decoding frame 3 alone gives frame 3 of the clip
    np.testing.assert_allclose(pipe.decode_latents(latents[:, :, 3:4])[:, :, 0], whole[:, :, 3], rtol=0, atol=1e-6)


def test_sampled_prompts_do_not_depend_on_each_other(pipe):
    """`tuneavideo.pipelines.edit.sample`: one generator per prompt (eta > 0 draws from it every step), prompt
    order kept, and the pipeline's scheduler put back."""
    from tuneavideo.pipelines.edit import sample

    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = pipe.scheduler
    settings = dict(num_inference_steps=3, guidance_scale=5.0, num_inv_steps=3, eta=0.5, seed=7)
    both = sample(pipe, latent, ["a cat", "a dog"], **settings)
    assert pipe.scheduler is scheduler and both.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(sample(pipe, latent, ["a dog"], **settings)[0], both[1], rtol=0, atol=1e-6)
    assert (both[0] - both[1]).abs().max() > 1e-3


# What the README recipe says, replaced by what the tiny test model takes; each must occur exactly this often.
RECIPE_SUBSTITUTIONS = {
    '"./checkpoints/stable-diffusion-v1-4"': ("{base!r}", 1),
    '"./outputs/man-skiing"': ("{tuned!r}", 1),
    '.to("cuda")': ('.to("cpu")', 2),
    "torch.float16": ("torch.float32", 3),
    "video_length=24, height=512, width=512": ("video_length=3, height=64, width=64", 1),
    "num_inference_steps=50": ("num_inference_steps=3", 1),
    'f"./{prompt}.gif"': ('f"{out}/{{prompt}}.gif"', 1),
}


def readme_recipe() -> str:
    """The Python block of README's "Editing from Python", as a user would copy it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Editing from Python") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


def test_the_original_readme_recipe_runs(tiny_sd, unet3d, tmp_path):
    tuned = tmp_path / "man-skiing"
    unet3d.save_pretrained(tuned / "unet")
    (tuned / "inv_latents").mkdir()
    torch.save(torch.randn(1, 4, 3, 8, 8).half(), tuned / "inv_latents" / "ddim_latent-500.pt")
    code = readme_recipe()
    for text, (replacement, count) in RECIPE_SUBSTITUTIONS.items():
        assert code.count(text) == count, f"README recipe: {text!r} occurs {code.count(text)} times, not {count}"
        code = code.replace(text, replacement.format(base=str(tiny_sd), tuned=str(tuned), out=tmp_path))
    exec(code, {})
    with Image.open(tmp_path / "spider man is skiing.gif") as gif:
        assert gif.size == (64, 64) and gif.n_frames == 3


# Bad input -----------------------------------------------------------------------------------------------------


def test_a_long_prompt_warns_with_the_dropped_words(tiny_sd, caplog):
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"))
    words = "a man is skiing " + "zz " * 40 + "on the moon"  # 'zz ' is 3 tokens: past 77 in all
    with caplog.at_level("WARNING"):
        pipe.encode_prompt(words, "cpu", do_classifier_free_guidance=False)
    assert "dropped" in caplog.text and "on the moon" in caplog.text


def test_an_inverted_latent_of_the_wrong_shape_names_both_shapes(tiny_sd):
    pipe = TuneAVideoPipeline.from_pretrained(tiny_sd, unet=UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet"))
    with pytest.raises(ValueError) as error:
        pipe("a cat", video_length=4, height=64, width=64, latents=torch.randn(1, 4, 3, 8, 8), num_inference_steps=2)
    assert "(1, 4, 3, 8, 8)" in str(error.value) and "(1, 4, 4, 8, 8)" in str(error.value)


# --- what plugs into the one denoising loop ---


def test_a_step_end_hook_sees_the_latents_and_what_it_returns_is_denoised_next(pipe):
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    replaced = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = dict(latents=latent, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    seen, unet_inputs, after_hook = [], [], []

    def hook(pipeline, i, t, callback_kwargs):
        assert pipeline is pipe and set(callback_kwargs) == {"latents"}
        seen.append((i, int(t)))
        return {"latents": replaced.clone()} if i == 0 else {}

    handle = pipe.unet.register_forward_pre_hook(lambda module, args: unet_inputs.append(args[0].clone()))
    try:
        out = pipe("a cat", callback_on_step_end=hook, callback=lambda i, t, z: after_hook.append(z.clone()),
                   **settings).videos
    finally:
        handle.remove()
    assert seen == [(0, 667), (1, 334), (2, 1)]
    assert torch.equal(after_hook[0], replaced)  # the original's callback sees the hook's latents
    assert torch.equal(unet_inputs[1], replaced)  # and step 1 denoises them (DDIM's input scaling is 1)
    # a hook returning nothing changes nothing
    plain = pipe("a cat", **settings).videos
    assert torch.equal(pipe("a cat", callback_on_step_end=lambda *_: {}, **settings).videos, plain)
    assert (out - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a cat", callback_on_step_end=hook, callback_on_step_end_tensor_inputs=["noise_pred"], **settings)


def test_per_step_unconditional_embeddings_are_used_at_their_step(pipe):
    """`negative_prompt_embeds` given per step (null-text inversion's) equals guided DDIM written out with the
    step's embedding; one tensor is the same embedding at every step."""
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt("a cat", "cpu", do_classifier_free_guidance=False)
    empty = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False)
    nulls = [empty + 0.5 * torch.randn(empty.shape, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    settings = dict(latents=latent, num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    ours = pipe("a cat", negative_prompt_embeds=nulls, **settings).videos
    pipe.scheduler.set_timesteps(3)
    expected = latent
    with torch.no_grad():
        for t, null in zip(pipe.scheduler.timesteps, nulls):
            uncond, cond = pipe.unet(torch.cat([expected] * 2), t, torch.cat([null, text])).sample.chunk(2)
            expected = pipe.scheduler.step(uncond + 7.5 * (cond - uncond), t, expected).prev_sample
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert (pipe("a cat", negative_prompt_embeds=nulls[::-1], **settings).videos - ours).abs().max() > 1e-3
    same = pipe("a cat", negative_prompt_embeds=[empty] * 3, **settings).videos
    assert torch.equal(pipe("a cat", negative_prompt_embeds=empty, **settings).videos, same)
    assert torch.equal(pipe("a cat", **settings).videos, same)  # the empty negative prompt's
    with pytest.raises(ValueError, match="2 `negative_prompt_embeds` for 3 steps"):
        pipe("a cat", negative_prompt_embeds=nulls[:2], **settings)


def test_guidance_per_prompt_and_a_scale_of_one_is_the_conditional_prediction(pipe):
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latent, num_inference_steps=2, output_type="latent")
    both = pipe(["a cat", "a dog"], guidance_scale=[1.0, 7.5], **settings).videos
    torch.testing.assert_close(both[:1], pipe("a cat", guidance_scale=1.0, **settings).videos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1:], pipe("a dog", guidance_scale=7.5, **settings).videos, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 values of `guidance_scale` for 2 prompts"):
        pipe(["a cat", "a dog"], guidance_scale=[1.0, 2.0, 3.0], **settings)


def test_num_inv_steps_samples_from_the_inversions_noise_level_and_leaves_the_scheduler(pipe, tiny_sd):
    from tuneavideo.pipelines.inversion import sampling_scheduler

    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latent, num_inference_steps=2, guidance_scale=7.5, output_type="latent")
    scheduler, config = pipe.scheduler, dict(pipe.scheduler.config)
    steps = []
    ours = pipe("a cat", num_inv_steps=4, callback=lambda i, t, z: steps.append(int(t)), **settings).videos
    assert pipe.scheduler is scheduler and dict(pipe.scheduler.config) == config
    assert steps == [751, 251]  # 4 inversion steps end at 751 (not 501, the first of 2 plain steps)
    pipe.scheduler = sampling_scheduler(scheduler, 2, 4)
    assert torch.equal(pipe("a cat", **settings).videos, ours)


def test_the_package_has_one_sampling_loop():
    """One `scheduler.step` outside DDIM inversion and null-text inversion: the pipeline's `__call__`."""
    import ast
    from pathlib import Path

    import tuneavideo

    package = Path(tuneavideo.__file__).parent
    steps = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                receiver = ast.unparse(node.func.value)  # diffusion schedulers, not lr_scheduler or optimizers
                if node.func.attr == "step" and ("scheduler" in receiver or "inverse" in receiver) \
                        and "lr_" not in receiver:
                    steps.append((path.relative_to(package).as_posix(), function.name, ast.unparse(node.func)))
    steps = sorted(set(steps))
    inversions = {"pipelines/inversion.py", "pipelines/null_text.py"}
    assert [step for step in steps if step[0] not in inversions] == [
        ("pipelines/pipeline_tuneavideo.py", "__call__", "scheduler.step")
    ]
    assert {step[0] for step in steps} == {"pipelines/pipeline_tuneavideo.py", *inversions}
