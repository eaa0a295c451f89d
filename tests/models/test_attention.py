"""Spatial attention across frames: the sparse-causal rule, its exactness against the original's duplicated key
set, Video-P2P's first-frame rule, backends, and the rule as a UNet config attribute."""

import json

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
from tuneavideo.models.unet import UNet3DConditionModel

FRAMES, TOKENS, DIM, HEADS = 5, 6, 8, 2


def make_attention(seed=0, spatial_attention="sparse_causal"):
    torch.manual_seed(seed)
    attn = SparseCausalAttention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()
    attn.spatial_attention = spatial_attention
    return attn


def reference_sparse_causal(attn, hidden_states, num_frames, first_frame_only=False):
    """The original's maths, written out: frame i attends to the concatenated tokens of frames [0, max(i-1, 0)],
    duplicates included, with an explicit softmax per head; with `first_frame_only` (Video-P2P's FrameAttention)
    to frame 0's tokens alone."""
    batch_frames, tokens, dim = hidden_states.shape
    frames = hidden_states.reshape(-1, num_frames, tokens, dim)
    outputs = []
    for clip in frames:
        for i in range(num_frames):
            context = clip[0] if first_frame_only else torch.cat([clip[0], clip[max(i - 1, 0)]], dim=0)
            query = attn.to_q(clip[i]).reshape(tokens, attn.heads, -1).transpose(0, 1)
            key = attn.to_k(context).reshape(len(context), attn.heads, -1).transpose(0, 1)
            value = attn.to_v(context).reshape(len(context), attn.heads, -1).transpose(0, 1)
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


# Video-P2P's first-frame rule

BACKENDS = [None, AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(1)]


@pytest.mark.parametrize("num_frames", [1, 2, 3, 5])
@pytest.mark.parametrize("processor", BACKENDS)
def test_first_frame_rule_under_every_backend_equals_its_maths(num_frames, processor):
    attn = make_attention(spatial_attention="first_frame")
    if processor is not None:
        attn.set_processor(processor)
    hidden_states = torch.randn(2 * num_frames, TOKENS, DIM)
    with torch.no_grad():
        out = attn(hidden_states, num_frames=num_frames)
        expected = reference_sparse_causal(attn, hidden_states, num_frames, first_frame_only=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_first_frame_rule_differs_from_sparse_causal_from_frame_two_on():
    attn = make_attention()
    hidden_states = torch.randn(FRAMES, TOKENS, DIM)
    with torch.no_grad():
        sparse = attn(hidden_states, num_frames=FRAMES)
        attn.spatial_attention = "first_frame"
        first = attn(hidden_states, num_frames=FRAMES)
    torch.testing.assert_close(first[:2], sparse[:2], rtol=1e-5, atol=1e-6)  # frames 0 and 1 see frame 0 in both
    assert (first[2:] - sparse[2:]).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("perturbed", range(1, FRAMES))
def test_under_first_frame_only_frame_zero_reaches_other_frames(perturbed):
    attn = make_attention(spatial_attention="first_frame")
    hidden_states = torch.randn(FRAMES, TOKENS, DIM)
    changed = hidden_states.clone()
    changed[perturbed] += torch.randn(TOKENS, DIM)
    with torch.no_grad():
        difference = (attn(hidden_states, num_frames=FRAMES) - attn(changed, num_frames=FRAMES)).abs().amax(dim=(1, 2))
    assert difference[perturbed] > 1e-3
    assert all(difference[frame] == 0 for frame in range(FRAMES) if frame != perturbed)


def test_switching_processor_keeps_the_first_frame_rule():
    attn = make_attention(spatial_attention="first_frame")
    hidden_states = torch.randn(FRAMES, TOKENS, DIM)
    expected = reference_sparse_causal(attn, hidden_states, FRAMES, first_frame_only=True)
    for processor in (AttnProcessor(), SlicedAttnProcessor(2), AttnProcessor2_0()):
        attn.set_processor(processor)
        with torch.no_grad():
            torch.testing.assert_close(attn(hidden_states, num_frames=FRAMES), expected, rtol=1e-5, atol=1e-6)


def _attn1_rules(unet):
    return {module.spatial_attention for module in unet.modules() if isinstance(module, SparseCausalAttention)}


def test_the_rule_is_a_unet_config_attribute_saved_and_loaded(tiny_sd, tmp_path, clip_inputs):
    sparse = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet")
    first = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet", spatial_attention="first_frame")
    assert sparse.config.spatial_attention == "sparse_causal" and _attn1_rules(sparse) == {"sparse_causal"}
    assert first.config.spatial_attention == "first_frame" and _attn1_rules(first) == {"first_frame"}
    first.save_pretrained(tmp_path / "first")
    assert json.loads((tmp_path / "first" / "config.json").read_text())["spatial_attention"] == "first_frame"
    loaded = UNet3DConditionModel.from_pretrained(tmp_path / "first")
    assert _attn1_rules(loaded) == {"first_frame"}

    sample, timestep, text = clip_inputs(first, frames=4)
    with torch.no_grad():
        out_first = first(sample, timestep, text).sample
        torch.testing.assert_close(loaded(sample, timestep, text).sample, out_first, rtol=1e-5, atol=1e-6)
        assert (sparse(sample, timestep, text).sample - out_first).abs().max() > 1e-4
        # a loaded model switched to the other rule computes that rule
        loaded.set_spatial_attention("sparse_causal")
        torch.testing.assert_close(loaded(sample, timestep, text).sample, sparse(sample, timestep, text).sample,
                                   rtol=1e-5, atol=1e-6)
    assert loaded.config.spatial_attention == "sparse_causal"


def test_a_config_without_the_rule_loads_as_sparse_causal(tiny_sd, tmp_path):
    first = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet", spatial_attention="first_frame")
    first.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    del config["spatial_attention"]  # as Tune-A-Video and Video-P2P write it
    config_file.write_text(json.dumps(config))
    loaded = UNet3DConditionModel.from_pretrained(tmp_path / "old")
    assert loaded.config.spatial_attention == "sparse_causal" and _attn1_rules(loaded) == {"sparse_causal"}


def test_an_unknown_rule_is_refused(unet3d):
    with pytest.raises(ValueError, match="spatial_attention must be one of sparse_causal, first_frame, got 'frame0'"):
        unet3d.set_spatial_attention("frame0")
