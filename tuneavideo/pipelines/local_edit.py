"""Local edits (Video-P2P): the inversion (DDIM, then null-text unless in Video-P2P's fast mode) and the source and
target prompts sampled together from one inverted latent by the pipeline under attention control, with local blend,
window by window over a clip of any length (`invert_and_edit`). The settings, their defaults and their checks are
the edit request's (`tuneavideo.request.LocalEdit`); here they are plain parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention_control import AttentionControl, LocalBlend, attention_control, mask_map_size
from .edit import Control, control_of
from .inversion import ddim_inversion
from .null_text import null_text_inversion
from .pipeline_tuneavideo import TuneAVideoPipeline
from .prompt_alignment import PromptControlError, PromptEdit
from .windows import plan_windows


@dataclass
class LocalLatents:
    """The source branch `(1, 4, frames, h, w)`, every target `(prompts, 4, frames, h, w)` and each target's last
    blend mask `(frames, h, w)` bool at latent size (None without local blend)."""

    source: torch.Tensor
    targets: torch.Tensor
    masks: list[torch.Tensor | None]


def invert_and_edit(pipe: TuneAVideoPipeline, clean: torch.Tensor, source_prompt: str, prompts: list[str],
                    edits: list[PromptEdit], num_inference_steps: int, num_inv_steps: int, guidance_scale: float,
                    window: int | None, overlap: int | None, progress: Callable[..., None], *,
                    null_text_iterations: int | None, cross_replace_steps: float, self_replace_steps: float,
                    blend_start: float, mask_threshold: float, inversion_prompt: str | None = None,
                    control: Control | None = None, control_inversion: bool = True) -> LocalLatents:
    """Invert the clean latent `clean` `(1, 4, frames, h, w)` as Video-P2P does (DDIM conditioned on
    `inversion_prompt`, by default `source_prompt`, then, unless `null_text_iterations` is None (Video-P2P's fast
    mode), one unconditional embedding per step optimised for `guidance_scale` in at most that many iterations),
    then sample every prompt with the source branch under the attention control of its `PromptEdit` in `edits`
    (`prompt_alignment.prompt_edit`; the target takes the source's cross-attention maps for the first
    `cross_replace_steps` of the steps and its temporal ones for `self_replace_steps`, and, with blend words, is the
    source's outside their mask, `mask_threshold` of the maps' peak, after `blend_start` of the steps), in windows
    of `window` frames overlapping by `overlap` (None: the pipeline's defaults). `progress()` is called once per step of each phase,
    when all windows have taken it (`edit.progress_steps` counts them).

    Each prompt is sampled by the pipeline as the batch `[source, target]` under the attention control of its
    `PromptEdit` (`attention_control`, which is also the step-end hook that applies the local blend). Guidance is
    decoupled: the target is guided by `guidance_scale` against the empty prompt; the source against the null-text
    embedding of each step, or, after a plain DDIM inversion, not at all (its conditional prediction, Video-P2P's
    fast mode). `control` (the pipeline's structure guidance arguments) guides both branches, and with
    `control_inversion` the DDIM and null-text inversions too.

    Raises:
        PromptControlError: `guidance_scale` at most 1 (the controlled batch needs its unconditional half).
    """
    if guidance_scale <= 1:
        raise PromptControlError(f"guidance_scale must be above 1 with attention control, got {guidance_scale}")
    null_text = null_text_iterations is not None
    inversion_prompt = inversion_prompt or source_prompt
    guidance = control_of(pipe, clean, control) if control_inversion else None
    latents = ddim_inversion(pipe, pipe.scheduler, clean, num_inv_steps, prompt=inversion_prompt,
                             window_size=window, window_overlap=overlap, callback=progress, keep_all=null_text,
                             control=guidance)
    negative = None  # unguided source: guidance 1 for its row
    if null_text:
        steps_done = []

        def step(i: int) -> None:  # called per UNet call; the bar moves once per step
            if i not in steps_done:
                steps_done.append(i)
                progress()

        text = pipe.encode_prompt([inversion_prompt], clean.device, do_classifier_free_guidance=False)
        uncond = null_text_inversion(pipe, latents, text, guidance_scale, null_text_iterations,
                                     window_size=window, window_overlap=overlap, callback=step, control=guidance)
        # the target row's unconditional embedding is the empty prompt's, encoded in a batch of two as the
        # pipeline encodes the two rows' negative prompts
        empty = pipe.encode_prompt(["", ""], clean.device, do_classifier_free_guidance=False)[1:]
        negative = [torch.cat([source_row.to(empty), empty]) for source_row in uncond]
    _, _, num_frames, height, width = clean.shape
    windows = plan_windows(num_frames, window, overlap)
    sources, targets, masks = [], [], []
    for prompt, edit in zip(prompts, edits):
        blend = None
        if edit.blend is not None:
            blend = LocalBlend(windows, int(blend_start * num_inference_steps), mask_threshold)
        attention = AttentionControl(edit, num_inference_steps, mask_map_size(height, width), cross_replace_steps,
                                     self_replace_steps, blend)
        with attention_control(pipe.unet, attention):
            sampled = pipe([source_prompt, prompt], latents=latents[-1], num_inference_steps=num_inference_steps,
                           guidance_scale=[guidance_scale if null_text else 1.0, guidance_scale],
                           negative_prompt_embeds=negative, num_inv_steps=num_inv_steps, latents_dtype=torch.float32,
                           window_size=window, window_overlap=overlap, output_type="latent", callback=progress,
                           callback_on_step_end=attention, **(control or {})).videos
        sources.append(sampled[:1])
        targets.append(sampled[1:])
        masks.append(blend.mask if blend is not None else None)
    # the source branch does not depend on the target: every prompt's is the same
    return LocalLatents(sources[0], torch.cat(targets), masks)

