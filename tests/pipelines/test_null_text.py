"""Null-text inversion on the tiny model: it makes guided sampling retrace the inversion, it equals Video-P2P's
optimisation written out, windows accumulate the whole clip's gradient, and it stops early as Video-P2P does."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import SAMPLE_CLIP
from tuneavideo.pipelines.inversion import ddim_inversion
from tuneavideo.pipelines.null_text import null_text_inversion
from tuneavideo.pipelines.windows import fuse_windows, plan_windows
from tuneavideo.video.readers import Clip

GUIDANCE = 7.5
PROMPT = "a ball is moving"


def prev_step_by_hand(noise, t, sample, scheduler, num_steps):
    """Video-P2P's `prev_step` (epsilon prediction), written out."""
    prev = int(t) - scheduler.config.num_train_timesteps // num_steps
    alpha = scheduler.alphas_cumprod[int(t)]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    original = (sample - (1 - alpha) ** 0.5 * noise) / alpha**0.5
    return alpha_prev**0.5 * original + (1 - alpha_prev) ** 0.5 * noise


def guided(pipe, latent, t, null, text, windows):
    """The guided prediction, unconditional and conditional halves in one batch as the pipeline runs them."""
    def predict(frames):
        window = latent[:, :, frames]
        uncond, cond = pipe.unet(torch.cat([window] * 2), t, torch.cat([null, text])).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    return fuse_windows(predict, latent, windows)


def reference_null_text(pipe, latents, text, num_inner_steps, windows):
    """Video-P2P's `null_optimization`, written out with plain autograd through every window at once."""
    num_steps = len(latents) - 1
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps)
    null = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False).detach()
    latent, embeddings = latents[-1], []

    def predict(embedding, t):
        return fuse_windows(lambda frames: pipe.unet(latent[:, :, frames], t, embedding).sample, latent, windows)

    for i, t in enumerate(scheduler.timesteps):
        null = null.clone().requires_grad_()
        optimizer = torch.optim.Adam([null], lr=1e-2 * (1.0 - i / 100.0))
        with torch.no_grad():
            cond = predict(text, t)
        for _ in range(num_inner_steps):
            uncond = predict(null, t)
            rec = prev_step_by_hand(uncond + GUIDANCE * (cond - uncond), t, latent, scheduler, num_steps)
            loss = F.mse_loss(rec, latents[-i - 2])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 1e-5 + i * 2e-5:
                break
        null = null.detach()
        embeddings.append(null)
        with torch.no_grad():
            latent = prev_step_by_hand(guided(pipe, latent, t, null, text, windows), t, latent, scheduler, num_steps)
    return embeddings


@torch.no_grad()
def reconstruct(pipe, latents, text, nulls):
    """Guided DDIM sampling from the inverted latent, with one unconditional embedding per step."""
    num_steps = len(latents) - 1
    pipe.scheduler.set_timesteps(num_steps)
    windows = plan_windows(latents[0].shape[2])
    latent = latents[-1]
    for t, null in zip(pipe.scheduler.timesteps, nulls):
        latent = pipe.scheduler.step(guided(pipe, latent, t, null, text, windows), t, latent).prev_sample
    return latent


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny UNet's many small backward ops run several times faster on one thread, most of all on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def source(pipe):
    """The sample clip's latent (2 frames of 64x64: 8x8 latents), its inversion (4 steps) and the prompt."""
    frames = Clip(SAMPLE_CLIP).read([0, 6], size=(64, 64))
    latent = pipe.encode_video(frames).mean
    latents = ddim_inversion(pipe, pipe.scheduler, latent, num_inv_steps=4, prompt=PROMPT)
    text = pipe.encode_prompt(PROMPT, "cpu", do_classifier_free_guidance=False)
    return latents, text


def test_guided_reconstruction_with_null_text_retraces_the_source(pipe, source):
    latents, text = source
    nulls = null_text_inversion(pipe, latents, text, guidance_scale=GUIDANCE)
    assert len(nulls) == len(latents) - 1 == 4
    assert all(null.shape == text.shape and null.dtype == torch.float32 and not null.requires_grad for null in nulls)
    empty = pipe.encode_prompt("", "cpu", do_classifier_free_guidance=False)
    plain_error = F.mse_loss(reconstruct(pipe, latents, text, [empty] * 4), latents[0]).item()
    null_text_error = F.mse_loss(reconstruct(pipe, latents, text, nulls), latents[0]).item()
    print(f"guided reconstruction MSE to the source latent: DDIM inversion alone {plain_error:.3e}, "
          f"with null-text inversion {null_text_error:.3e}")
    assert null_text_error < 0.75 * plain_error


def test_unwindowed_equals_videop2p_optimisation_written_out(pipe, source):
    latents, text = source
    latents = latents[:3]  # 2 steps
    ours = null_text_inversion(pipe, latents, text, num_inner_steps=2)
    theirs = reference_null_text(pipe, latents, text, 2, plan_windows(2))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a window holding the whole clip is no window
    windowed = null_text_inversion(pipe, latents, text, num_inner_steps=2, window_size=2)
    for a, b in zip(windowed, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def long_clip(pipe):
    """5 frames inverted in 2 steps in windows of 3 overlapping by 1: [0 1 2], [anchor 0 | 2 3], [anchor 0 | 3 4]."""
    latent = torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = ddim_inversion(pipe, pipe.scheduler, latent, num_inv_steps=2, prompt=PROMPT, window_size=3,
                             window_overlap=1)
    return latents, pipe.encode_prompt(PROMPT, "cpu", do_classifier_free_guidance=False)


def test_windows_accumulate_the_gradient_of_the_whole_clip(pipe, long_clip):
    latents, text = long_clip
    windows = plan_windows(5, 3, 1)
    assert [w.frames for w in windows] == [[0, 1, 2], [0, 2, 3], [0, 3, 4]]
    ours = null_text_inversion(pipe, latents, text, num_inner_steps=2, window_size=3, window_overlap=1)
    theirs = reference_null_text(pipe, latents, text, 2, windows)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (ours[-1] - theirs[0]).abs().max() > 1e-4  # the second step did move the embedding


def test_a_callback_per_unet_call_and_videop2p_early_stop(pipe, long_clip):
    latents, text = long_clip

    def calls(**options):
        steps = []
        null_text_inversion(pipe, latents, text, num_inner_steps=2, callback=steps.append, **options)
        return steps

    # 3 windows, never stopping early: the text prediction, per iteration a pass for the loss and one for each
    # window's graph, the advance; at every step
    assert calls(early_stop_epsilon=-1.0, window_size=3, window_overlap=1) == [0] * 18 + [1] * 18
    # one window, and a loss below the threshold after the first iteration stops there
    assert calls(early_stop_epsilon=1e9) == [0] * 3 + [1] * 3
