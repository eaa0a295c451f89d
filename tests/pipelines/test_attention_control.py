"""Local edits (Video-P2P): token alignment, the attention controller, and controlled sampling with local blend
over windows, on the tiny model (its tokenizer is character-level, so every word is several tokens)."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from transformers import CLIPTokenizer

from tuneavideo.errors import UserError
from tuneavideo.models.unet import UNet3DConditionModel
from tuneavideo.pipelines.attention_control import (
    AttentionControl,
    ControlledAttnProcessor,
    attention_control,
    mask_map_size,
)
from tuneavideo.pipelines.local_edit import sample_local_edit
from tuneavideo.pipelines.pipeline_tuneavideo import TuneAVideoPipeline
from tuneavideo.pipelines.prompt_alignment import (
    PromptControlError,
    PromptEdit,
    check_fraction,
    parse_blend,
    parse_reweight,
    prompt_edit,
    refine_mapping,
    replace_mapping,
    word_positions,
    word_tokens,
)
from tuneavideo.tiny import tiny_unet_config


@pytest.fixture
def tokenizer(tiny_sd):
    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


def latent_of(frames=4, height=8, width=8, seed=0):
    return torch.randn(1, 4, frames, height, width, generator=torch.Generator().manual_seed(seed))


# --- words and token alignment ---


def test_word_positions_cover_every_token_of_every_occurrence(tokenizer):
    prompt = "a cat is a Cat"
    ids = tokenizer(prompt).input_ids
    assert [tokenizer.bos_token_id, *sum(word_tokens(tokenizer, prompt), []), tokenizer.eos_token_id] == ids
    cat = word_positions(tokenizer, prompt, "cat")
    assert cat == [2, 3, 4, 8, 9, 10]  # both occurrences (CLIP lowercases), three tokens each
    assert tokenizer.decode([ids[p] for p in cat]).replace(" ", "") == "catcat"
    assert word_positions(tokenizer, prompt, "a") == [1, 7]
    assert word_positions(tokenizer, "a Spider-Man is", "Spider-Man") == list(range(2, 12))


def test_word_swap_maps_each_word_to_its_counterpart(tokenizer):
    same = replace_mapping(tokenizer, "a cat runs", "a dog runs")  # equal token counts: token to token
    torch.testing.assert_close(same, torch.eye(77), rtol=0, atol=0)
    mapping = replace_mapping(tokenizer, "a man is", "a spider-man is")  # 3 tokens -> 10
    assert torch.equal(mapping[2:5, 2:12], torch.full((3, 10), 0.1))  # every new token shares the word's maps
    assert mapping[:, 2:12].sum() == pytest.approx(3.0) and mapping[2:5].sum() == pytest.approx(3.0)
    # the words after it follow their own tokens ("is" at 5, 6 in the source, 12, 13 in the target), then the end
    for source, target in [(0, 0), (1, 1), (5, 12), (6, 13), (7, 14), (8, 15)]:
        assert mapping[source, target] == 1 and mapping[:, target].sum() == 1


def test_refinement_aligns_tokens_and_keeps_inserted_ones(tokenizer):
    mapping, alphas = refine_mapping(tokenizer, "a cat", "a red cat")
    # target tokens: start, a, r e d, c a t, end; the inserted "red" keeps its own maps
    assert alphas[:9].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 1] and alphas[9:].eq(1).all()
    assert mapping[:, 2:5].eq(0).all()
    aligned = [0, 1, 5, 6, 7, 8]
    assert [int(mapping[:, j].argmax()) for j in aligned] == [0, 1, 2, 3, 4, 5]
    assert [int(mapping[:, j].argmax()) for j in range(9, 77)] == list(range(9, 77))  # padding: position to position
    identity, ones = refine_mapping(tokenizer, "a cat", "a cat")
    assert torch.equal(identity, torch.eye(77)) and ones.eq(1).all()


def test_reweight_and_blend_tables(tokenizer):
    edit = prompt_edit(tokenizer, "a man is", "a spider-man is", "replace", reweight={"spider-man": 4, "is": 0.5},
                       blend=parse_blend("man:spider-man"))
    assert edit.reweight[2:12].eq(4).all() and edit.reweight[12:14].eq(0.5).all()
    assert edit.reweight[:2].eq(1).all() and edit.reweight[14:].eq(1).all()
    assert edit.blend[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert edit.blend[1].nonzero().flatten().tolist() == list(range(2, 12))
    assert parse_blend("cat") == ("cat", "cat")
    assert parse_reweight(["origami=2", "red=0.5"]) == {"origami": 2.0, "red": 0.5}


@pytest.mark.parametrize("make, message", [
    (lambda t: prompt_edit(t, "a cat", "a red cat", "replace"), "2 words and the target 3: use --control refine"),
    (lambda t: prompt_edit(t, "a cat", "a dog", "refine", blend=("cat", "cat")),
     "--blend target word 'cat' is not a word of the prompt 'a dog'"),
    (lambda t: prompt_edit(t, "a cat", "a dog", "refine", reweight={"red": 2}),
     "--reweight word 'red' is not a word of the prompt 'a dog'"),
    (lambda t: prompt_edit(t, "a cat", "a dog", "swap"), "--control must be one of replace, refine"),
    (lambda t: prompt_edit(t, "a cat", "x" * 80, "refine"), "has 80 tokens; attention control needs at most 75"),
    (lambda t: parse_reweight(["origami"]), "--reweight 'origami': give WORD=FACTOR"),
    (lambda t: parse_reweight(["origami=big"]), "--reweight 'origami=big': give WORD=FACTOR"),
    (lambda t: parse_blend("cat:"), "--blend 'cat:': give WORD or SOURCE_WORD:TARGET_WORD"),
    (lambda t: check_fraction(1.0, "--mask-threshold", exclusive=True), "--mask-threshold must be in (0, 1), got 1.0"),
    (lambda t: check_fraction(-0.1, "--blend-start"), "--blend-start must be in [0, 1], got -0.1"),
])
def test_bad_control_input_is_one_clear_line(tokenizer, make, message):
    with pytest.raises(PromptControlError) as caught:
        make(tokenizer)
    assert isinstance(caught.value, UserError)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# --- the controller ---


def prompt_edit_identity():
    return PromptEdit(torch.eye(77), torch.ones(77), torch.ones(77))


def test_controlled_attention_is_a_row_softmax_where_a_global_max_underflows():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    hidden_states = torch.randn(4, 6, 8) * 60  # sharp attention: logits far apart between rows
    with torch.no_grad():
        query, key, value = (attn.head_to_batch_dim(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        logits = query @ key.transpose(1, 2) * attn.scale
        global_max = torch.exp(logits - logits.max())  # Video-P2P's softmax
        assert (global_max / global_max.sum(-1, keepdim=True)).isnan().any()
        control = AttentionControl(prompt_edit_identity(), 1, (1, 1), cross_replace_steps=1.0, self_replace_steps=1.0)
        controlled = ControlledAttnProcessor(control, temporal=True)(attn, hidden_states)
        # batch rows [uncond source, uncond target, cond source, cond target], heads inner: the conditional
        # target (row 3) attends with the conditional source's probabilities (row 2) to its own values
        probs = torch.softmax(logits, dim=-1).unflatten(0, (4, 2))
        probs[3] = probs[2]
        expected = attn.to_out[0](attn.batch_to_head_dim(probs.flatten(0, 1) @ value))
    assert controlled.isfinite().all()
    torch.testing.assert_close(controlled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(controlled[:3], AttnProcessor()(attn, hidden_states)[:3], rtol=1e-5, atol=1e-5)


def test_cross_attention_edit_replaces_refines_and_reweights_the_conditional_target(tokenizer):
    edit = prompt_edit(tokenizer, "a cat", "a red cat", "refine", reweight={"red": 3, "cat": 0.5},
                       blend=("cat", "cat"))
    frames, heads, queries = 2, 2, 6
    torch.manual_seed(0)
    probs = torch.randn(4 * frames * heads, queries, 77).softmax(-1)
    clips = probs.unflatten(0, (4, frames, heads))
    control = AttentionControl(edit, 4, (2, 3), cross_replace_steps=0.5)  # steps 0 and 1 of 4: int(0.5 * 5)
    edited = control.cross(probs.clone(), heads).unflatten(0, (4, frames, heads))
    assert torch.equal(edited[:3], clips[:3])  # unconditional clips and the source untouched
    source, target = clips[2], clips[3]
    for j, i in [(0, 0), (1, 1), (5, 2), (6, 3), (7, 4), (8, 5), (40, 40)]:  # aligned tokens take the source's
        factor = 0.5 if j in (5, 6, 7) else 1.0
        torch.testing.assert_close(edited[3][..., j], source[..., i] * factor, rtol=0, atol=1e-7)
    torch.testing.assert_close(edited[3][..., 2:5], target[..., 2:5] * 3, rtol=0, atol=1e-7)  # "red": its own
    # the blend words' maps of this (mask-sized) layer: "cat" tokens summed, heads averaged, after the edit
    maps = control.take_maps()
    assert maps.shape == (2, frames, 2, 3)
    torch.testing.assert_close(maps[0], source[..., 2:5].sum(-1).mean(1).unflatten(-1, (2, 3)))
    torch.testing.assert_close(maps[1], edited[3][..., 5:8].sum(-1).mean(1).unflatten(-1, (2, 3)))
    control.step = 2  # past the replace steps the target keeps its own maps
    assert torch.equal(control.cross(probs.clone(), heads), probs)


def test_control_hooks_cross_and_temporal_attention_only_and_restores_processors(unet3d):
    before = dict(unet3d.attn_processors)
    control = AttentionControl(prompt_edit_identity(), 1, (1, 1))
    with attention_control(unet3d, control):
        inside = unet3d.attn_processors
        hooked = {name for name, processor in inside.items() if isinstance(processor, ControlledAttnProcessor)}
        assert hooked == {name for name in before if ".attn2." in name or ".attn_temp." in name}
        assert all(inside[name] is before[name] for name in before if ".attn1." in name)
        assert all(inside[name].temporal == (".attn_temp." in name) for name in hooked)
    after = unet3d.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


def test_mask_layers_are_the_quarter_of_the_latent_for_any_size():
    assert mask_map_size(64, 64) == (16, 16)  # 512x512: Video-P2P's 16x16 level
    assert mask_map_size(60, 107) == (15, 27)  # 480x856: what the stride-2 convolutions give
    assert mask_map_size(8, 12) == (2, 3)


# --- controlled sampling ---


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


@pytest.mark.parametrize("control, shapes", [("replace", "SD 1.x"), ("refine", "SD 2.x")])
def test_target_equal_to_source_prompt_reproduces_the_source_branch(pipe, control, shapes):
    pipe = sd2_shaped(pipe) if shapes == "SD 2.x" else pipe
    pipe.set_progress_bar_config(disable=True)
    uncond = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False)
    edit = prompt_edit(pipe.tokenizer, "a cat runs", "a cat runs", control, blend=("cat", "cat"))
    out = sample_local_edit(pipe, latent_of(), "a cat runs", "a cat runs", edit, num_inference_steps=2,
                            uncond_embeddings=[uncond] * 2, cross_replace_steps=1.0, self_replace_steps=1.0,
                            blend_start=0.0)
    torch.testing.assert_close(out.target, out.source, rtol=0, atol=1e-6)
    assert (out.source - latent_of()).abs().max() > 0.1  # and it did sample
    assert out.masks.shape == (4, 8, 8)


def test_without_replace_steps_the_branches_are_plain_sampling(pipe):
    pipe.unet.set_default_attn_processor()  # the controlled processors' maths, for the plain runs too
    latent = latent_of()
    edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine")
    out = sample_local_edit(pipe, latent, "a cat", "a red cat", edit, num_inference_steps=2,
                            cross_replace_steps=0, self_replace_steps=0)
    # both prompts sampled plainly in one batch, [uncond, uncond, cond source, cond target] as the controlled one
    settings = dict(latents=latent, num_inference_steps=2, output_type="latent")
    guided = pipe(["a cat", "a red cat"], guidance_scale=7.5, **settings).videos
    torch.testing.assert_close(out.target, guided[1:], rtol=0, atol=1e-6)  # guided against the empty prompt
    # the source, with a plain DDIM inversion: its own prediction, unguided (the DDIM reconstruction)
    unguided = pipe(["a cat", "a red cat"], guidance_scale=1.0, **settings).videos
    torch.testing.assert_close(out.source, unguided[:1], rtol=1e-5, atol=1e-6)
    assert (out.target - out.source).abs().max() > 0.1


def test_local_blend_keeps_the_source_outside_the_mask_at_every_step(pipe):
    latent = latent_of(height=8, width=12)  # another aspect ratio: mask maps of 2x3 (random maps are flat,
    # hence the high threshold)
    edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine", blend=("cat", "cat"))
    seen = []

    def check(i, t, latents, mask):
        seen.append(mask is not None)
        if mask is not None:
            assert mask.shape == (4, 8, 12) and mask.dtype == torch.bool
            assert torch.equal(latents[1][:, ~mask], latents[0][:, ~mask])
            assert (latents[1][:, mask] - latents[0][:, mask]).abs().max() > 1e-3
            partial.append(0 < mask.float().mean() < 1)

    partial = []
    out = sample_local_edit(pipe, latent, "a cat", "a red cat", edit, num_inference_steps=4, blend_start=0.25,
                            mask_threshold=0.95, callback=check)
    assert seen == [False, True, True, True]  # from step int(0.25 * 4) + 1 = 2 on
    assert any(partial)  # the mask does leave some of the clip to the source
    assert torch.equal(out.target[0][:, ~out.masks], out.source[0][:, ~out.masks])


def test_a_reweight_of_one_changes_nothing(pipe):
    latent = latent_of()
    results = []
    for reweight in (None, {"red": 1.0}):
        edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine", reweight=reweight)
        results.append(sample_local_edit(pipe, latent, "a cat", "a red cat", edit, num_inference_steps=2,
                                         cross_replace_steps=1.0))
    assert torch.equal(results[0].target, results[1].target)


def test_one_window_is_unwindowed_and_every_frame_gets_a_mask(pipe):
    latent = latent_of(frames=5)
    edit = prompt_edit(pipe.tokenizer, "a cat", "a red cat", "refine", blend=("cat", "cat"))
    settings = dict(num_inference_steps=2, blend_start=0.0, mask_threshold=0.9)
    plain = sample_local_edit(pipe, latent, "a cat", "a red cat", edit, **settings)
    one = sample_local_edit(pipe, latent, "a cat", "a red cat", edit, window_size=5, **settings)
    assert all(torch.equal(x, y) for x, y in zip((one.source, one.target, one.masks),
                                                 (plain.source, plain.target, plain.masks)))

    def check(i, t, latents, mask):
        assert torch.equal(latents[1][:, ~mask], latents[0][:, ~mask])

    windowed = sample_local_edit(pipe, latent, "a cat", "a red cat", edit, window_size=3, window_overlap=1,
                                 callback=check, **settings)
    assert windowed.masks.shape == (5, 8, 8)
    assert windowed.masks.flatten(1).any(1).all()  # each frame's mask from that frame's own maps
    assert (windowed.target - plain.target).abs().max() > 1e-4  # windows did change the computation
