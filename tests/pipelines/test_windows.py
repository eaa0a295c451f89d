"""Windows over long clips: the plan, the fusing weights, and windowed sampling and inversion on the tiny model."""

import pytest
import torch
from diffusers import DDIMScheduler

from tuneavideo.pipelines.inversion import ddim_inversion
from tuneavideo.pipelines.windows import fuse_windows, plan_windows

# (frames, window size, overlap): one window, exact multiples of the stride and not, the tuned 24 over 10 s at 15 fps
PLANS = [(8, 8, 2), (5, 8, 2), (9, 8, 2), (24, 8, 2), (23, 8, 0), (30, 4, 2), (150, 24, 6), (25, 24, 6), (7, 2, 0)]


@pytest.mark.parametrize("num_frames, size, overlap", PLANS)
def test_windows_cover_every_frame_once_with_weights_summing_to_one(num_frames, size, overlap):
    windows = plan_windows(num_frames, size, overlap)
    total = torch.zeros(num_frames, dtype=torch.float64)
    seen = []
    for index, window in enumerate(windows):
        own = window.frames[window.first_member :]
        # every window is the tuned length (or the whole clip), the anchor frame 0 first after the first window
        assert len(window.frames) == min(size, num_frames)
        assert window.frames[: window.first_member] == ([] if index == 0 else [0])
        assert own == list(range(own[0], own[-1] + 1)) and len(window.weights) == len(own)
        assert (window.weights > 0).all()
        total[own] += window.weights
        seen += own
    torch.testing.assert_close(total, torch.ones(num_frames, dtype=torch.float64), rtol=0, atol=1e-12)
    assert sorted(set(seen)) == list(range(num_frames))  # nothing left out
    assert windows[-1].frames[-1] == num_frames - 1  # the last window ends at the clip's end
    for before, after in zip(windows, windows[1:]):  # neighbours share at least `overlap` frames
        assert before.frames[-1] - after.frames[after.first_member] + 1 >= overlap


def test_a_frame_in_one_window_takes_that_windows_prediction_exactly():
    latents = torch.randn(1, 4, 23, 2, 2, generator=torch.Generator().manual_seed(0))
    windows = plan_windows(23, 8, 2)
    predictions = {}

    def predict(frames):
        predictions[tuple(frames)] = torch.randn(1, 4, len(frames), 2, 2)
        return predictions[tuple(frames)]

    fused = fuse_windows(predict, latents, windows)
    holders = {frame: [w for w in windows if frame in w.frames[w.first_member :]] for frame in range(23)}
    alone = [frame for frame, held in holders.items() if len(held) == 1]
    assert 0 in alone and len(alone) > 10
    for frame in alone:
        (window,) = holders[frame]
        own = predictions[tuple(window.frames)][:, :, window.frames.index(frame)]
        assert torch.equal(fused[:, :, frame], own)
    # a frame in two windows takes their weighted mean, by the pyramid weights
    shared = next(frame for frame, held in holders.items() if len(held) == 2)
    first, second = holders[shared]
    weights = [w.weights[w.frames[w.first_member :].index(shared)] for w in (first, second)]
    expected = sum(float(weight) * predictions[tuple(w.frames)][:, :, w.frames.index(shared)]
                   for weight, w in zip(weights, (first, second)))
    torch.testing.assert_close(fused[:, :, shared], expected)


def test_bad_windows_are_refused():
    for size, overlap in ((1, 0), (8, 7), (8, -1)):
        with pytest.raises(ValueError, match="overlap"):
            plan_windows(20, size, overlap)
    assert len(plan_windows(20, 8, None)) == len(plan_windows(20, 8, 2))  # a quarter window by default


def test_one_window_is_the_unwindowed_computation(pipe, tiny_sd):
    latent = torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latent, num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    plain = pipe("a cat", **settings).videos
    for window in (5, 8):  # a window as long as the clip, or longer: the clip is one window
        assert torch.equal(pipe("a cat", window_size=window, **settings).videos, plain)
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    inverted = ddim_inversion(pipe, scheduler, latent, 3)[-1]
    assert torch.equal(ddim_inversion(pipe, scheduler, latent, 3, window_size=5)[-1], inverted)


def test_a_clip_of_identical_frames_stays_identical_across_windows(pipe, tiny_sd):
    frame = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    latent = frame.expand(-1, -1, 11, -1, -1).contiguous()
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    inverted = ddim_inversion(pipe, scheduler, latent, 3, window_size=4, window_overlap=1)[-1]
    edited = pipe("a cat", latents=inverted, num_inference_steps=3, window_size=4, window_overlap=1,
                  output_type="latent").videos
    assert len(plan_windows(11, 4, 1)) > 2
    # to rounding, which is as large without windows (2e-5 after 6 steps): frames from 2 on attend over twice the
    # (duplicated) keys of frames 0 and 1, which rounds differently; a window that disagreed would differ by far more
    for result in (inverted, edited):
        torch.testing.assert_close(result, result[:, :, :1].expand_as(result), rtol=0, atol=1e-4)
    pixels = torch.from_numpy(pipe.decode_latents(edited))  # a 255th is 4e-3
    torch.testing.assert_close(pixels, pixels[:, :, :1].expand_as(pixels), rtol=0, atol=1e-4)
    # and not trivially: the frames did change
    assert (inverted - latent).abs().max() > 1e-2


def test_windowed_sampling_moves_each_window_by_its_own_noise_prediction(pipe):
    # each frame's prediction comes from the windows holding it: changing a frame far from a window's frames
    # leaves the frames only that window holds unchanged after one step
    latent = torch.randn(1, 4, 12, 8, 8, generator=torch.Generator().manual_seed(2))
    perturbed = latent.clone()
    perturbed[:, :, 11] += 1.0
    settings = dict(num_inference_steps=1, guidance_scale=1.0, output_type="latent", window_size=4, window_overlap=1)
    first, second = (pipe("a cat", latents=z, **settings).videos for z in (latent, perturbed))
    windows = plan_windows(12, 4, 1)
    untouched = [f for f in range(12) if all(11 not in w.frames for w in windows if f in w.frames[w.first_member :])]
    assert untouched and 11 not in untouched
    torch.testing.assert_close(first[:, :, untouched], second[:, :, untouched], rtol=0, atol=1e-6)
    assert (first[:, :, 11] - second[:, :, 11]).abs().max() > 1e-3
