"""The inflated UNet: SD key layout, 2D loading, equivalence to the image model, norms, checkpointing, backends."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from tuneavideo.models.attention import SparseCausalAttnProcessor, SparseCausalAttnProcessor2_0
from tuneavideo.models.resnet import ResnetBlock3D
from tuneavideo.models.unet import UNet3DConditionModel

DEFAULT_TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp")

SD14_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def trainable_names(model, suffixes=DEFAULT_TRAINABLE):
    modules = {name for name, _ in model.named_modules() if name.endswith(suffixes)}
    return [name for name, _ in model.named_parameters() if any(name.startswith(m + ".") for m in modules)]


def test_sd14_layout_has_798_keys_and_74m_trainable_parameters():
    with torch.device("meta"):
        unet_2d = UNet2DConditionModel.from_config(SD14_UNET_CONFIG)
        unet_3d = UNet3DConditionModel.from_config(UNet3DConditionModel.config_from_2d(unet_2d.config))
    keys_2d, keys_3d = unet_2d.state_dict(), unet_3d.state_dict()
    assert len(keys_2d) == 686 and len(keys_3d) == 798
    added = set(keys_3d) - set(keys_2d)
    assert set(keys_2d) <= set(keys_3d) and len(added) == 112
    assert all(".transformer_blocks.0.attn_temp." in k or ".transformer_blocks.0.norm_temp." in k for k in added)
    assert all(keys_2d[k].shape == keys_3d[k].shape for k in keys_2d)
    names = trainable_names(unet_3d)
    assert len(names) == 112
    assert sum(dict(unet_3d.named_parameters())[n].numel() for n in names) == 74_354_880


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_inflated_model_on_identical_frames_equals_the_image_model(tiny_sd, tmp_path, variant):
    if variant == "sd1":
        path, subfolder = tiny_sd, "unet"
    else:  # SD 2.x: linear projections, a head count per level, upcast attention
        config = dict(UNet2DConditionModel.load_config(tiny_sd, subfolder="unet"))
        config.update(use_linear_projection=True, attention_head_dim=[2, 4, 4, 4], upcast_attention=True)
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "unet")
        path, subfolder = tmp_path, "unet"
    unet_2d = UNet2DConditionModel.from_pretrained(path, subfolder=subfolder).eval()
    unet_3d = UNet3DConditionModel.from_pretrained_2d(path, subfolder=subfolder).eval()
    for name, parameter in unet_3d.named_parameters():
        if "attn_temp.to_out.0" in name:
            assert torch.count_nonzero(parameter) == 0, name  # weight and bias zero-initialised
    frame = torch.randn(2, 4, 1, 16, 16)
    text = torch.randn(2, 7, unet_2d.config.cross_attention_dim)
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet_2d(frame[:, :, 0], timestep, text).sample
        out = unet_3d(frame.expand(-1, -1, 4, -1, -1), timestep, text).sample
    for index in range(4):
        torch.testing.assert_close(out[:, :, index], expected, rtol=1e-4, atol=1e-5)


def test_resnet_group_norm_pools_statistics_over_all_frames():
    torch.manual_seed(0)
    block = ResnetBlock3D(8, 8, temb_channels=4, groups=2, eps=1e-5).eval()
    clip = torch.randn(1, 8, 3, 5, 5) * torch.tensor([1.0, 5.0, 0.2]).view(1, 1, 3, 1, 1)
    temb = torch.randn(1, 4)
    with torch.no_grad():
        out = block(clip, temb)
        # by hand: GroupNorm over (channels of a group, frames, h, w); convs frame by frame
        hidden = F.silu(F.group_norm(clip, 2, block.norm1.weight, block.norm1.bias, 1e-5))
        hidden = torch.stack([block.conv1._conv_forward(hidden[:, :, i], block.conv1.weight, block.conv1.bias) for i in range(3)], 2)
        hidden = hidden + block.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        hidden = F.silu(F.group_norm(hidden, 2, block.norm2.weight, block.norm2.bias, 1e-5))
        hidden = torch.stack([block.conv2._conv_forward(hidden[:, :, i], block.conv2.weight, block.conv2.bias) for i in range(3)], 2)
        per_frame = torch.stack([block(clip[:, :, i : i + 1], temb)[:, :, 0] for i in range(3)], 2)
    torch.testing.assert_close(out, clip + hidden, rtol=1e-5, atol=1e-5)
    assert (out - per_frame).abs().max() > 1e-2  # per-frame statistics would be a different model


def test_forward_shapes_batches_and_odd_sizes(unet3d, clip_inputs):
    sample, timestep, text = clip_inputs(unet3d, batch=2, frames=3, size=8)
    with torch.no_grad():
        out = unet3d(sample, timestep, text).sample
        # each clip of a batch is computed on its own
        first = unet3d(sample[:1], timestep[:1], text[:1]).sample
        odd = unet3d(torch.randn(1, 4, 2, 10, 14), 5, text[:1]).sample
        # latents of frames in multiples of 8 only (fit_size): odd sides, halved to 12 x 20, 6 x 10, 3 x 5 on the
        # way down and brought back to each skip connection's size on the way up
        portrait = unet3d(torch.randn(1, 4, 2, 23, 40), 5, text[:1]).sample
        wide = unet3d(torch.randn(1, 4, 1, 9, 16), 5, text[:1]).sample  # 16:9 at 128 x 72
    assert out.shape == sample.shape and odd.shape == (1, 4, 2, 10, 14)
    assert portrait.shape == (1, 4, 2, 23, 40) and wide.shape == (1, 4, 1, 9, 16)
    torch.testing.assert_close(out[:1], first, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_from_pretrained_2d_reads_bin_safetensors_and_fp16_variants(tiny_sd, tmp_path, safe_serialization):
    unet_2d = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet_2d.save_pretrained(tmp_path / "unet", safe_serialization=safe_serialization)
    unet_2d.half().save_pretrained(tmp_path / "unet", safe_serialization=safe_serialization, variant="fp16")
    suffix = "safetensors" if safe_serialization else "bin"
    assert (tmp_path / "unet" / f"diffusion_pytorch_model.{suffix}").exists()
    full = UNet3DConditionModel.from_pretrained_2d(tmp_path, subfolder="unet")
    half = UNet3DConditionModel.from_pretrained_2d(tmp_path, subfolder="unet", variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    reference = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(full.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(half.state_dict()[key], value.half(), rtol=0, atol=0)


def test_from_pretrained_2d_refuses_a_non_sd_unet(tmp_path):
    config = dict(SD14_UNET_CONFIG, block_out_channels=[8, 8, 8, 8], norm_num_groups=4, cross_attention_dim=8)
    config["attention_head_dim"] = 2
    config["down_block_types"] = ["DownBlock2D"] * 4  # no attention at all: SD weights would be missing
    UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="not a 4-level Stable Diffusion UNet"):
        UNet3DConditionModel.from_pretrained_2d(tmp_path, subfolder="unet")


def test_save_and_load_round_trip_and_original_format_checkpoint(unet3d, clip_inputs, tmp_path):
    unet3d.save_pretrained(tmp_path / "ours" / "unet")
    loaded = UNet3DConditionModel.from_pretrained(tmp_path / "ours", subfolder="unet").eval()

    # a checkpoint as the original code saved it: its 0.11 config keys and a `.bin` state dict
    original = tmp_path / "original" / "unet"
    original.mkdir(parents=True)
    config = {k: v for k, v in unet3d.config.items() if not k.startswith("_")}
    config.update(_class_name="UNet3DConditionModel", _diffusers_version="0.11.1")
    (original / "config.json").write_text(json.dumps(config))
    torch.save(unet3d.state_dict(), original / "diffusion_pytorch_model.bin")
    from_original = UNet3DConditionModel.from_pretrained(original).eval()
    strict = UNet3DConditionModel.from_config(config)
    strict.load_state_dict(torch.load(original / "diffusion_pytorch_model.bin"), strict=True)

    sample, timestep, text = clip_inputs(unet3d)
    weights = unet3d.state_dict()
    with torch.no_grad():
        expected = unet3d(sample, timestep, text).sample
        for model in (loaded, from_original, strict.eval()):
            # the weights round-trip exactly; the outputs of separately built modules only closely, as their
            # kernels can differ (oneDNN picks by CPU and memory alignment)
            assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
            torch.testing.assert_close(model(sample, timestep, text).sample, expected, rtol=1e-5, atol=1e-6)


def test_backends_give_the_same_output_and_keep_sparse_causal(unet3d, clip_inputs):
    sample, timestep, text = clip_inputs(unet3d, frames=4)
    with torch.no_grad():
        expected = unet3d(sample, timestep, text).sample
    switches = [
        lambda: unet3d.set_default_attn_processor(),
        lambda: unet3d.set_attn_processor(AttnProcessor2_0()),
        lambda: unet3d.set_attn_processor(AttnProcessor()),
        lambda: unet3d.set_attn_processor({k: AttnProcessor() for k in unet3d.attn_processors}),
    ]
    for switch in switches:
        switch()
        processors = unet3d.attn_processors
        attn1 = [p for k, p in processors.items() if ".attn1." in k]
        assert attn1 and all(isinstance(p, (SparseCausalAttnProcessor, SparseCausalAttnProcessor2_0)) for p in attn1)
        with torch.no_grad():
            torch.testing.assert_close(unet3d(sample, timestep, text).sample, expected, rtol=1e-4, atol=1e-5)


def test_checkpointing_gives_every_trainable_layer_the_same_gradient(unet3d, clip_inputs):
    sample, timestep, text = clip_inputs(unet3d, frames=3)
    names = trainable_names(unet3d)
    unet3d.requires_grad_(False)
    for name, parameter in unet3d.named_parameters():
        parameter.requires_grad_(name in names)

    def gradients():
        unet3d.zero_grad(set_to_none=True)
        unet3d(sample, timestep, text).sample.pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in unet3d.named_parameters() if name in names}

    unet3d.train()
    plain = gradients()
    unet3d.enable_gradient_checkpointing()
    checkpointed = gradients()
    down = [n for n in names if n.startswith("down_blocks.")]
    # 10 transformer blocks (3 down, 1 mid, 6 up), 7 trainable tensors each; the original froze the down ones
    assert len(names) == 10 * 7 and len(down) == 3 * 7
    for name in names:
        assert checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7)


def control_residuals(unet, batch, frames, size, seed=0):
    """Random ControlNet-shaped residuals `(batch, channels, frames, h, w)` for `unet`'s skips and mid block,
    found by running the model's own down path."""
    shapes = []
    sample = torch.zeros(batch, unet.config.in_channels, frames, size, size)
    text = torch.zeros(batch, 1, unet.config.cross_attention_dim)
    with torch.no_grad():
        sample = unet.conv_in(sample)
        shapes.append(sample.shape)
        emb = unet.time_embedding(unet.time_proj(torch.zeros(batch)))
        for block in unet.down_blocks:
            sample, skips = block(sample, emb, text)
            shapes += [skip.shape for skip in skips]
    generator = torch.Generator().manual_seed(seed)
    down = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    return down, torch.randn(sample.shape, generator=generator)


def test_zero_control_residuals_change_nothing(unet3d, clip_inputs):
    sample, timestep, text = clip_inputs(unet3d, batch=2, frames=3)
    down, mid = control_residuals(unet3d, 2, 3, 8)
    with torch.no_grad():
        plain = unet3d(sample, timestep, text).sample
        zero = unet3d(sample, timestep, text, down_block_additional_residuals=[torch.zeros_like(r) for r in down],
                      mid_block_additional_residual=torch.zeros_like(mid)).sample
        controlled = unet3d(sample, timestep, text, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
    assert torch.equal(zero, plain)
    assert (controlled - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="go together"):
        unet3d(sample, timestep, text, down_block_additional_residuals=down)
    with pytest.raises(ValueError, match=f"expected {len(down)} down block residuals, got {len(down) - 1}"):
        unet3d(sample, timestep, text, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


def test_control_residuals_on_identical_frames_equal_the_image_model_with_them(tiny_sd):
    unet_2d = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    unet_3d = UNet3DConditionModel.from_pretrained_2d(tiny_sd, subfolder="unet").eval()
    frames = 3
    down, mid = control_residuals(unet_3d, 2, 1, 16)
    generator = torch.Generator().manual_seed(1)
    frame = torch.randn(2, 4, 1, 16, 16, generator=generator)
    text = torch.randn(2, 7, unet_2d.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet_2d(frame[:, :, 0], timestep, text, down_block_additional_residuals=[r[:, :, 0] for r in down],
                           mid_block_additional_residual=mid[:, :, 0]).sample
        plain = unet_2d(frame[:, :, 0], timestep, text).sample
        out = unet_3d(frame.expand(-1, -1, frames, -1, -1), timestep, text,
                      down_block_additional_residuals=[r.expand(-1, -1, frames, -1, -1) for r in down],
                      mid_block_additional_residual=mid.expand(-1, -1, frames, -1, -1)).sample
    assert (expected - plain).abs().max() > 1e-2  # the residuals matter
    for index in range(frames):
        torch.testing.assert_close(out[:, :, index], expected, rtol=1e-4, atol=1e-5)
