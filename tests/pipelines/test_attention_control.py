"""Local edits (Video-P2P): token alignment and the attention controller, on the tiny model (its tokenizer is
character-level, so every word is several tokens). Controlled sampling is in test_local_edit.py."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from transformers import CLIPTokenizer

from tuneavideo.errors import UserError
from tuneavideo.pipelines.attention_control import (
    AttentionControl,
    ControlledAttnProcessor,
    attention_control,
    mask_map_size,
)
from tuneavideo.pipelines.prompt_alignment import (
    PromptControlError,
    PromptEdit,
    prompt_edit,
    refine_mapping,
    replace_mapping,
    word_positions,
    word_tokens,
)


@pytest.fixture
def tokenizer(tiny_sd):
    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


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
                       blend=("man", "spider-man"))
    assert edit.reweight[2:12].eq(4).all() and edit.reweight[12:14].eq(0.5).all()
    assert edit.reweight[:2].eq(1).all() and edit.reweight[14:].eq(1).all()
    assert edit.blend[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert edit.blend[1].nonzero().flatten().tolist() == list(range(2, 12))


@pytest.mark.parametrize("make, message", [
    (lambda t: prompt_edit(t, "a cat", "a red cat", "replace"), "2 words and the target 3: use control 'refine'"),
    (lambda t: prompt_edit(t, "a cat", "a dog", "refine", blend=("cat", "cat")),
     "blend target word 'cat' is not a word of the prompt 'a dog'"),
    (lambda t: prompt_edit(t, "a cat", "a dog", "refine", reweight={"red": 2}),
     "reweight word 'red' is not a word of the prompt 'a dog'"),
    (lambda t: prompt_edit(t, "a cat", "a dog", "swap"), "control must be one of replace, refine"),
    (lambda t: prompt_edit(t, "a cat", "x" * 80, "refine"), "has 80 tokens; attention control needs at most 75"),
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
