"""Local edits (Video-P2P): the options and their checks (`LocalEdit`, `plan_local`), the inversion (DDIM, then
null-text unless Video-P2P's `--fast`) and the source and target prompts sampled together from one inverted latent
under attention control, with local blend, window by window over a clip of any length (`invert_and_edit`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from .attention_control import AttentionControl, attention_control, mask_map_size
from .inversion import ddim_inversion, sampling_scheduler
from .null_text import null_text_inversion
from .pipeline_tuneavideo import TuneAVideoPipeline
from .prompt_alignment import CONTROLS, PromptControlError, PromptEdit, check_fraction, prompt_edit
from .windows import blend, plan_windows

INVERSIONS = ("null-text", "ddim")  # ddim: Video-P2P's --fast
GUIDANCE_SCALE = 7.5  # Video-P2P's, the default with attention control


@dataclass
class LocalEditOutput:
    """Final latents `(1, 4, frames, h, w)` of the source branch (the reconstruction) and of the edit, and the
    edit's last local-blend mask `(frames, h, w)`, bool at latent size (None without local blend)."""

    source: torch.Tensor
    target: torch.Tensor
    masks: torch.Tensor | None


def blend_masks(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """The local-blend mask from the blend words' accumulated maps `(2, frames, mh, mw)` (source, target): each
    max-pooled (3x3, stride 1), resized (nearest) to the latent `size`, divided by its frame's maximum and
    thresholded; the union of the two, `(frames, h, w)` bool."""
    masks = F.interpolate(F.max_pool2d(maps, 3, stride=1, padding=1), size=size, mode="nearest")
    masks = masks / masks.amax(dim=(2, 3), keepdim=True) > threshold
    return masks[0] | masks[1]


@torch.no_grad()
def sample_local_edit(
    pipeline: TuneAVideoPipeline,
    latent: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    edit: PromptEdit,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    uncond_embeddings: list[torch.Tensor] | None = None,
    cross_replace_steps: float = 0.2,
    self_replace_steps: float = 0.5,
    blend_start: float = 0.2,
    mask_threshold: float = 0.3,
    window_size: int | None = None,
    window_overlap: int | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor | None], None] | None = None,
) -> LocalEditOutput:
    """Sample `source_prompt` and `target_prompt` from the inverted `latent` `(1, 4, frames, h, w)` with attention
    control by `edit` (`prompt_alignment.prompt_edit` with the pipeline's tokenizer), DDIM with the pipeline's
    scheduler (`inversion.sampling_scheduler` as for a plain edit).

    Guidance is decoupled: the target is guided by `guidance_scale` against the empty prompt; the source against
    `uncond_embeddings[i]` at step `i` (null-text inversion's `(1, tokens, dim)` per step), or, when None, the
    source takes its conditional prediction unguided (Video-P2P's `--fast`, for a plain DDIM inversion).

    Every window (`windows.plan_windows(frames, window_size, window_overlap)`) runs both branches; each frame's
    blend-word maps are weighted across windows as its predictions are, and summed over steps. With
    `edit.blend`, after every scheduler step from step `int(blend_start * num_inference_steps) + 1` on (counting
    from 1), the target's latents outside the mask are the source's:
    `target = source + mask * (target - source)`. `callback(i, t, latents, mask)` is called after every step with
    the latents `(2, 4, frames, h, w)` (source, target) and the mask applied (None before the blend).
    """
    device = pipeline._execution_device
    unet, scheduler = pipeline.unet, pipeline.scheduler
    _, channels, num_frames, height, width = latent.shape
    windows = plan_windows(num_frames, window_size, window_overlap)

    # [uncond source, uncond target, cond source, cond target]; null-text mode replaces row 0 at every step
    embeddings = pipeline.encode_prompt([source_prompt, target_prompt], device).to(unet.dtype)
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = pipeline.prepare_latents((2, channels, num_frames, height, width), torch.float32, device, None, latent)
    step_kwargs = pipeline._step_kwargs(None, 0.0)
    size = mask_map_size(height, width)
    control = AttentionControl(edit, num_inference_steps, size, cross_replace_steps, self_replace_steps)
    maps = torch.zeros(2, 1, num_frames, *size, device=device)  # (source/target, 1, frames, mh, mw)
    mask = None

    with attention_control(unet, control), pipeline.progress_bar(total=num_inference_steps * len(windows)) as bar:
        for i, t in enumerate(scheduler.timesteps):
            control.step = i
            if uncond_embeddings is not None:
                embeddings[:1] = uncond_embeddings[i].to(embeddings)
            window_maps = {}

            def predict(frames: list[int]) -> torch.Tensor:
                model_input = scheduler.scale_model_input(torch.cat([latents[:, :, frames]] * 2), t).to(unet.dtype)
                noise_pred = unet(model_input, t, encoder_hidden_states=embeddings).sample.to(latents.dtype)
                bar.update()
                if edit.blend is not None:
                    window_maps[tuple(frames)] = control.take_maps().unsqueeze(1)
                noise_uncond, noise_text = noise_pred.chunk(2)
                guided = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                if uncond_embeddings is None:
                    guided[0] = noise_text[0]
                return guided

            noise_pred = blend(predict, latents, windows)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if edit.blend is not None:
                maps += blend(lambda frames: window_maps[tuple(frames)], maps, windows)
                if i + 1 > int(blend_start * num_inference_steps):
                    mask = blend_masks(maps.squeeze(1), (height, width), mask_threshold)
                    latents[1] = latents[0] + mask.to(latents) * (latents[1] - latents[0])
            if callback is not None:
                callback(i, t, latents, mask)
    pipeline.maybe_free_model_hooks()
    return LocalEditOutput(latents[:1], latents[1:], mask)


@dataclass
class LocalEdit:
    """Attention control for every prompt of an edit (`EditOptions.local`); defaults are Video-P2P's."""

    control: str = "refine"  # "replace": swap words one for one; "refine": add or change words
    source_prompt: str | None = None  # the source branch; None: the tuned prompt
    blend: tuple[str, str] | None = None  # (word of the source prompt, word of each target): local blend
    reweight: dict[str, float] = field(default_factory=dict)  # word of the targets -> attention factor
    cross_replace_steps: float = 0.2
    self_replace_steps: float = 0.5
    blend_start: float = 0.2
    mask_threshold: float = 0.3
    inversion: str = "null-text"  # or "ddim"
    null_text_iterations: int = 10  # most optimiser iterations per step of null-text inversion (Video-P2P's 10)


@dataclass
class LocalPlan:
    """A checked local edit: the source prompt and each target prompt's `PromptEdit`."""

    local: LocalEdit
    source_prompt: str
    edits: list[PromptEdit]


def plan_local(tokenizer: CLIPTokenizer, local: LocalEdit, prompts: list[str], tuned_prompt: str,
               num_inference_steps: int, num_inv_steps: int) -> LocalPlan:
    """Check `local` against the prompts and step counts (one-line `PromptControlError`s)."""
    if local.control not in CONTROLS:
        raise PromptControlError(f"--control must be one of {', '.join(CONTROLS)}, got {local.control!r}")
    if local.inversion not in INVERSIONS:
        raise PromptControlError(f"--inversion must be one of {', '.join(INVERSIONS)}, got {local.inversion!r}")
    if local.inversion == "null-text" and num_inference_steps != num_inv_steps:
        raise PromptControlError(f"--inversion null-text gives one embedding per inversion step: give "
                                 f"--num-inference-steps equal to --num-inv-steps ({num_inference_steps} != "
                                 f"{num_inv_steps}), or use --inversion ddim")
    for option, value in (("--cross-replace-steps", local.cross_replace_steps),
                          ("--self-replace-steps", local.self_replace_steps), ("--blend-start", local.blend_start)):
        check_fraction(value, option)
    check_fraction(local.mask_threshold, "--mask-threshold", exclusive=True)
    source = local.source_prompt or tuned_prompt
    edits = [prompt_edit(tokenizer, source, prompt, local.control, local.reweight, local.blend) for prompt in prompts]
    return LocalPlan(local, source, edits)


@dataclass
class LocalLatents:
    """The source branch `(1, 4, frames, h, w)`, every target `(prompts, 4, frames, h, w)` and each target's last
    blend mask `(frames, h, w)` bool at latent size (None without local blend)."""

    source: torch.Tensor
    targets: torch.Tensor
    masks: list[torch.Tensor | None]


def invert_and_edit(pipe: TuneAVideoPipeline, clean: torch.Tensor, plan: LocalPlan, prompts: list[str],
                    num_inference_steps: int, num_inv_steps: int, guidance_scale: float, window: int | None,
                    overlap: int | None, progress: Callable[..., None],
                    inversion_prompt: str | None = None) -> LocalLatents:
    """Invert the clean latent `clean` as Video-P2P does (DDIM conditioned on `inversion_prompt`, by default the
    source prompt, then, in null-text mode, one optimised unconditional embedding per step for `guidance_scale`),
    then sample every prompt with the source branch. `progress()` is called once per step of each phase, when all
    windows have taken it."""
    local = plan.local
    null_text = local.inversion == "null-text"
    inversion_prompt = inversion_prompt or plan.source_prompt
    latents = ddim_inversion(pipe, pipe.scheduler, clean, num_inv_steps, prompt=inversion_prompt,
                             window_size=window, window_overlap=overlap, callback=progress, keep_all=null_text)
    uncond = None
    if null_text:
        steps_done = []

        def step(i: int) -> None:  # called per UNet call; the bar moves once per step
            if i not in steps_done:
                steps_done.append(i)
                progress()

        text = pipe.encode_prompt([inversion_prompt], clean.device, do_classifier_free_guidance=False)
        uncond = null_text_inversion(pipe, latents, text, guidance_scale, local.null_text_iterations,
                                     window_size=window, window_overlap=overlap, callback=step)
    scheduler = pipe.scheduler
    pipe.scheduler = sampling_scheduler(scheduler, num_inference_steps, num_inv_steps)
    try:
        outputs = [
            sample_local_edit(pipe, latents[-1], plan.source_prompt, prompt, edit, num_inference_steps,
                              guidance_scale, uncond, local.cross_replace_steps, local.self_replace_steps,
                              local.blend_start, local.mask_threshold, window, overlap, progress)
            for prompt, edit in zip(prompts, plan.edits)
        ]
    finally:
        pipe.scheduler = scheduler
    # the source branch does not depend on the target: every prompt's is the same
    return LocalLatents(outputs[0].source, torch.cat([out.target for out in outputs]), [out.masks for out in outputs])


def work(windows: int, num_inference_steps: int, num_inv_steps: int, prompts: int, local: LocalEdit) -> int:
    """Progress-bar units of `invert_and_edit`: window steps of the inversion, null-text, and every prompt."""
    inversion = num_inv_steps * (2 if local.inversion == "null-text" else 1)
    return windows * (inversion + num_inference_steps * prompts)
