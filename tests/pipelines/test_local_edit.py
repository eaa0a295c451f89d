"""`tuneavideo.pipelines.local_edit` on the tiny model: the pipeline's one loop under attention control (the control
as attention processors and as the step-end hook applying the local blend, per-prompt guidance, windows), the
and `invert_and_edit` end to end (both inversions, the progress it reports)."""

import pytest
import torch

from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.attention_control import AttentionControl, LocalBlend, attention_control, mask_map_size
from tuneavideo.pipelines.edit import progress_steps
from tuneavideo.pipelines.local_edit import invert_and_edit
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.pipelines.prompt_alignment import PromptControlError, prompt_edit
from tuneavideo.pipelines.windows import plan_windows
from tuneavideo.tiny import tiny_unet_config


def latent_of(frames=4, height=8, width=8, seed=0):
    return torch.randn(1, 4, frames, height, width, generator=torch.Generator().manual_seed(seed))


def controlled(pipe, latent, source, target, edit, num_inference_steps=2, uncond=None, cross_replace_steps=0.2,
               self_replace_steps=0.5, blend_start=0.2, mask_threshold=0.3, window_size=None, window_overlap=None,
               callback=None):
    """`[source, target]` sampled by the pipeline from `latent` under the control of `edit` as `invert_and_edit`
    plugs it in (per-step `uncond` for the source row, else the source unguided); (latents, last mask)."""
    _, _, frames, height, width = latent.shape
    blend = None
    if edit.blend is not None:
        blend = LocalBlend(plan_windows(frames, window_size, window_overlap), int(blend_start * num_inference_steps),
                           mask_threshold)
    control = AttentionControl(edit, num_inference_steps, mask_map_size(height, width), cross_replace_steps,
                               self_replace_steps, blend)
    negative = None
    if uncond is not None:
        empty = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False)
        negative = [torch.cat([u, empty]) for u in uncond]
    with attention_control(pipe.unet, control):
        latents = pipe([source, target], latents=latent, num_inference_steps=num_inference_steps,
                       guidance_scale=[7.5 if uncond is not None else 1.0, 7.5], negative_prompt_embeds=negative,
                       latents_dtype=torch.float32, window_size=window_size, window_overlap=window_overlap,
                       output_type="latent", callback_on_step_end=control,
                       callback=None if callback is None else lambda i, t, z: callback(i, t, z, blend.mask)).videos
    return latents, None if blend is None else blend.mask


def sd2_shaped(pipe):
    """`pipe` with a random UNet of SD 2.x's shapes: other head counts per level, linear projections."""
    config = UNet3DConditionModel.config_from_2d(
        {**tiny_unet_config(), "attention_head_dim": (1, 2, 4, 4), "use_linear_projection": True}
    )
    torch.manual_seed(0)
    unet = UNet3DConditionModel.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "attn_temp.to_out" in name:
                parameter.normal_(0, 0.3)
    return TuneAVideoPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, unet, pipe.scheduler)


# --- the pipeline's loop under attention control ---


@pytest.mark.parametrize("control, shapes", [("replace", "SD 1.x"), ("refine", "SD 2.x")])
def test_target_equal_to_source_prompt_reproduces_the_source_branch(pipe, control, shapes):
    pipe = sd2_shaped(pipe) if shapes == "SD 2.x" else pipe
    pipe.set_progress_bar_config(disable=True)
    uncond = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False)
    edit = prompt_edit(pipe.tokenizer, "a cat runs", "a cat runs", control, blend=("cat", "cat"))
    latents, mask = controlled(pipe, latent_of(), "a cat runs", "a cat runs", edit, uncond=[uncond] * 2,
                               cross_replace_steps=1.0, self_replace_steps=1.0, blend_start=0.0)
    torch.testing.assert_close(latents[1], latents[0], rtol=0, atol=1e-6)
    assert (latents[0] - latent_of()[0]).abs().max() > 0.1  # and it did sample
    assert mask.shape == (4, 8, 8)


def test_without_replace_steps_the_branches_are_plain_sampling(pipe):
    pipe.unet.set_default_attn_processor()  # the controlled processors' maths, for the plain runs too
    latent = latent_of()
    edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine")
    out, _ = controlled(pipe, latent, "a cat", "a red cat", edit, cross_replace_steps=0, self_replace_steps=0)
    # both prompts sampled plainly in one batch, [uncond, uncond, cond source, cond target] as the controlled one
    settings = dict(latents=latent, num_inference_steps=2, output_type="latent")
    guided = pipe(["a cat", "a red cat"], guidance_scale=7.5, **settings).videos
    torch.testing.assert_close(out[1:], guided[1:], rtol=0, atol=1e-6)  # guided against the empty prompt
    # the source, with a plain DDIM inversion: its own prediction, unguided (the DDIM reconstruction)
    unguided = pipe(["a cat", "a red cat"], guidance_scale=1.0, **settings).videos
    torch.testing.assert_close(out[:1], unguided[:1], rtol=1e-5, atol=1e-6)
    assert (out[1] - out[0]).abs().max() > 0.1


def test_local_blend_keeps_the_source_outside_the_mask_at_every_step(pipe):
    latent = latent_of(height=8, width=12)  # another aspect ratio: mask maps of 2x3 (random maps are flat,
    # hence the high threshold)
    edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine", blend=("cat", "cat"))
    seen, partial = [], []

    def check(i, t, latents, mask):  # the pipeline's callback, after the step-end hook
        seen.append(mask is not None)
        if mask is not None:
            assert mask.shape == (4, 8, 12) and mask.dtype == torch.bool
            assert torch.equal(latents[1][:, ~mask], latents[0][:, ~mask])
            assert (latents[1][:, mask] - latents[0][:, mask]).abs().max() > 1e-3
            partial.append(0 < mask.float().mean() < 1)

    out, mask = controlled(pipe, latent, "a cat", "a red cat", edit, num_inference_steps=4, blend_start=0.25,
                           mask_threshold=0.95, callback=check)
    assert seen == [False, True, True, True]  # from step int(0.25 * 4) + 1 = 2 on
    assert any(partial)  # the mask does leave some of the clip to the source
    assert torch.equal(out[1][:, ~mask], out[0][:, ~mask])


def test_a_reweight_of_one_changes_nothing(pipe):
    latent = latent_of()
    results = []
    for reweight in (None, {"red": 1.0}):
        edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine", reweight=reweight)
        results.append(controlled(pipe, latent, "a cat", "a red cat", edit, cross_replace_steps=1.0)[0])
    assert torch.equal(results[0][1], results[1][1])


def test_one_window_is_unwindowed_and_every_frame_gets_a_mask(pipe):
    latent = latent_of(frames=5)
    edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine", blend=("cat", "cat"))
    settings = dict(blend_start=0.0, mask_threshold=0.9)
    plain = controlled(pipe, latent, "a cat", "a red cat", edit, **settings)
    one = controlled(pipe, latent, "a cat", "a red cat", edit, window_size=5, **settings)
    assert torch.equal(one[0], plain[0]) and torch.equal(one[1], plain[1])

    def check(i, t, latents, mask):
        assert torch.equal(latents[1][:, ~mask], latents[0][:, ~mask])

    windowed, mask = controlled(pipe, latent, "a cat", "a red cat", edit, window_size=3, window_overlap=1,
                                callback=check, **settings)
    assert mask.shape == (5, 8, 8)
    assert mask.flatten(1).any(1).all()  # each frame's mask from that frame's own maps
    assert (windowed[1] - plain[0][1]).abs().max() > 1e-4  # windows did change the computation


def test_the_blend_fuses_each_frames_maps_across_its_windows_as_its_noise():
    # 5 frames in windows of 3 overlapping by 1: [0 1 2], [anchor 0 | 2 3], [anchor 0 | 3 4]
    windows = plan_windows(5, 3, 1)
    blend = LocalBlend(windows, start_step=0, threshold=0.5)
    calls = [torch.rand(2, len(window.frames), 3, 3, generator=torch.Generator().manual_seed(k))
             for k, window in enumerate(windows)]
    latents = torch.randn(2, 4, 5, 12, 12)
    blend(0, latents.clone(), calls)
    maps = blend.maps[:, 0].clone()
    torch.testing.assert_close(maps[:, :2], calls[0][:, :2])  # frames in one window: its maps
    w = [window.weights for window in windows]
    torch.testing.assert_close(maps[:, 2], (calls[0][:, 2] * w[0][2] + calls[1][:, 1] * w[1][0]).float())
    torch.testing.assert_close(maps[:, 3], (calls[1][:, 2] * w[1][1] + calls[2][:, 1] * w[2][0]).float())
    blend(1, latents.clone(), calls)  # summed over the steps
    torch.testing.assert_close(blend.maps[:, 0], 2 * maps)


# --- invert_and_edit ---

SETTINGS = dict(cross_replace_steps=0.5, self_replace_steps=0.5, blend_start=0.0, mask_threshold=0.9)


@pytest.mark.parametrize("inversion", ["ddim", "null-text"])
def test_invert_and_edit_reports_each_step_once_and_keeps_the_source_outside_the_mask(pipe, inversion):
    prompts = ["a red ball", "a big ball"]
    edits = [prompt_edit(pipe.tokenizer, "a ball", prompt, "refine", {"ball": 2.0}, ("ball", "ball"))
             for prompt in prompts]
    calls = []
    scheduler = pipe.scheduler
    out = invert_and_edit(pipe, latent_of(frames=3), "a ball", prompts, edits, 2, 2, 7.5, None, None,
                          lambda *_: calls.append(1), null_text_iterations=1 if inversion == "null-text" else None,
                          **SETTINGS)
    assert len(calls) == progress_steps(len(prompts), 2, 2, inversion) == (8 if inversion == "null-text" else 6)
    assert pipe.scheduler is scheduler
    assert out.source.shape == (1, 4, 3, 8, 8) and out.targets.shape == (2, 4, 3, 8, 8)
    for target, mask in zip(out.targets, out.masks):
        assert mask.shape == (3, 8, 8) and torch.equal(target[:, ~mask], out.source[0][:, ~mask])
    assert (out.targets[0] - out.targets[1]).abs().max() > 1e-4


def test_attention_control_needs_guidance(pipe):
    edits = [prompt_edit(pipe.tokenizer, "a ball", "a red ball", "refine")]
    with pytest.raises(PromptControlError, match="guidance_scale must be above 1 with attention control, got 1.0"):
        invert_and_edit(pipe, latent_of(), "a ball", ["a red ball"], edits, 2, 2, 1.0, None, None, lambda *_: None,
                        null_text_iterations=None, **SETTINGS)
