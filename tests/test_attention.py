"""Sparse-causal attention: the rule, its exactness against the original's duplicated key set, and backends."""

import pytest
import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from tuneavideo.models.attention import (
    SparseCausalAttention,
    SparseCausalAttnProcessor,
    SparseCausalAttnProcessor2_0,
)

FRAMES, TOKENS, DIM, HEADS = 5, 6, 8, 2


def make_attention(seed=0):
    torch.manual_seed(seed)
    return SparseCausalAttention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()


def reference_sparse_causal(attn, hidden_states, num_frames):
    """The original's maths, written out: frame i attends to the concatenated tokens of frames [0, max(i-1, 0)],
    duplicates included, with an explicit softmax per head."""
    batch_frames, tokens, dim = hidden_states.shape
    frames = hidden_states.reshape(-1, num_frames, tokens, dim)
    outputs = []
    for clip in frames:
        for i in range(num_frames):
            context = torch.cat([clip[0], clip[max(i - 1, 0)]], dim=0)
            query = attn.to_q(clip[i]).reshape(tokens, attn.heads, -1).transpose(0, 1)
            key = attn.to_k(context).reshape(2 * tokens, attn.heads, -1).transpose(0, 1)
            value = attn.to_v(context).reshape(2 * tokens, attn.heads, -1).transpose(0, 1)
            weights = torch.softmax(query @ key.transpose(1, 2) * query.shape[-1] ** -0.5, dim=-1)
            outputs.append((weights @ value).transpose(0, 1).reshape(tokens, dim))
    return attn.to_out[0](torch.stack(outputs))


@pytest.mark.parametrize("num_frames", [1, 2, 3, 5])
@pytest.mark.parametrize("processor", [None, AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(1)])
def test_every_backend_equals_the_original_maths(num_frames, processor):
    attn = make_attention()
    if processor is not None:
        attn.set_processor(processor)
    hidden_states = torch.randn(2 * num_frames, TOKENS, DIM)
    with torch.no_grad():
        out = attn(hidden_states, num_frames=num_frames)
        expected = reference_sparse_causal(attn, hidden_states, num_frames)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("perturbed", range(FRAMES))
def test_perturbing_frame_k_changes_only_frames_that_attend_to_it(perturbed):
    attn = make_attention()
    hidden_states = torch.randn(FRAMES, TOKENS, DIM)
    changed = hidden_states.clone()
    changed[perturbed] += torch.randn(TOKENS, DIM)
    with torch.no_grad():
        difference = (attn(hidden_states, num_frames=FRAMES) - attn(changed, num_frames=FRAMES)).abs().amax(dim=(1, 2))
    # frame k's own queries, frame k+1 (k is its previous frame), and every frame when k is frame 0
    affected = set(range(FRAMES)) if perturbed == 0 else {perturbed, min(perturbed + 1, FRAMES - 1)}
    for frame in range(FRAMES):
        if frame in affected:
            assert difference[frame] > 1e-3, (perturbed, frame)
        else:
            assert difference[frame] == 0, (perturbed, frame)


def test_one_frame_is_ordinary_self_attention():
    attn = make_attention()
    plain = make_attention()
    torch.nn.Module.__setattr__(plain, "processor", AttnProcessor())  # bypass the wrapping: plain self-attention
    hidden_states = torch.randn(3, TOKENS, DIM)
    with torch.no_grad():
        torch.testing.assert_close(attn(hidden_states, num_frames=1), plain(hidden_states), rtol=1e-5, atol=1e-6)


def test_switching_processor_keeps_the_rule():
    attn = make_attention()
    assert isinstance(attn.processor, SparseCausalAttnProcessor2_0)
    for processor in (AttnProcessor(), SlicedAttnProcessor(1), XFormersAttnProcessor()):
        attn.set_processor(processor)
        assert isinstance(attn.processor, SparseCausalAttnProcessor)
        assert attn.processor.processor is processor
    attn.set_processor(AttnProcessor2_0())
    assert isinstance(attn.processor, SparseCausalAttnProcessor2_0)
    attn.set_attention_slice(1)
    assert isinstance(attn.processor, SparseCausalAttnProcessor)


def test_missing_num_frames_is_an_error():
    attn = make_attention()
    with pytest.raises(ValueError, match="num_frames"):
        attn(torch.randn(2, TOKENS, DIM))
