"""Local edits (Video-P2P): the settings and their checks (`LocalEdit`, `plan_local`), the inversion (DDIM, then
null-text unless in Video-P2P's fast mode, `inversion="ddim"`) and the source and target prompts sampled together
from one inverted latent by the pipeline under attention control, with local blend, window by window over a clip of
any length (`invert_and_edit`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import CLIPTokenizer

from .attention_control import AttentionControl, LocalBlend, attention_control, mask_map_size
from .inversion import ddim_inversion
from .null_text import null_text_inversion
from .pipeline_tuneavideo import TuneAVideoPipeline
from .prompt_alignment import CONTROLS, PromptControlError, PromptEdit, check_fraction, prompt_edit
from .windows import plan_windows

INVERSIONS = ("null-text", "ddim")  # ddim: Video-P2P's fast mode
GUIDANCE_SCALE = 7.5  # Video-P2P's, the default with attention control


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
    """Check `local` against the prompts and step counts (one-line `PromptControlError`s naming the fields)."""
    if local.control not in CONTROLS:
        raise PromptControlError(f"control must be one of {', '.join(CONTROLS)}, got {local.control!r}")
    if local.inversion not in INVERSIONS:
        raise PromptControlError(f"inversion must be one of {', '.join(INVERSIONS)}, got {local.inversion!r}")
    if local.inversion == "null-text" and num_inference_steps != num_inv_steps:
        raise PromptControlError(f"null-text inversion gives one embedding per inversion step: num_inference_steps "
                                 f"must equal num_inv_steps ({num_inference_steps} != {num_inv_steps}), or use "
                                 "inversion='ddim'")
    for field_name in ("cross_replace_steps", "self_replace_steps", "blend_start"):
        check_fraction(getattr(local, field_name), field_name)
    check_fraction(local.mask_threshold, "mask_threshold", exclusive=True)
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
    """Invert the clean latent `clean` `(1, 4, frames, h, w)` as Video-P2P does (DDIM conditioned on
    `inversion_prompt`, by default the source prompt, then, in null-text mode, one optimised unconditional embedding
    per step for `guidance_scale`), then sample every prompt with the source branch, in windows of `window` frames
    overlapping by `overlap` (None: the pipeline's defaults). `progress()` is called once per step of each phase,
    when all windows have taken it (`edit.progress_steps` counts them).

    Each prompt is sampled by the pipeline as the batch `[source, target]` under the attention control of its
    `PromptEdit` (`attention_control`, which is also the step-end hook that applies the local blend). Guidance is
    decoupled: the target is guided by `guidance_scale` against the empty prompt; the source against the null-text
    embedding of each step, or, after a plain DDIM inversion, not at all (its conditional prediction, Video-P2P's
    fast mode).

    Raises:
        PromptControlError: `guidance_scale` at most 1 (the controlled batch needs its unconditional half).
    """
    if guidance_scale <= 1:
        raise PromptControlError(f"guidance_scale must be above 1 with attention control, got {guidance_scale}")
    local = plan.local
    null_text = local.inversion == "null-text"
    inversion_prompt = inversion_prompt or plan.source_prompt
    latents = ddim_inversion(pipe, pipe.scheduler, clean, num_inv_steps, prompt=inversion_prompt,
                             window_size=window, window_overlap=overlap, callback=progress, keep_all=null_text)
    negative = None  # unguided source: guidance 1 for its row
    if null_text:
        steps_done = []

        def step(i: int) -> None:  # called per UNet call; the bar moves once per step
            if i not in steps_done:
                steps_done.append(i)
                progress()

        text = pipe.encode_prompt([inversion_prompt], clean.device, do_classifier_free_guidance=False)
        uncond = null_text_inversion(pipe, latents, text, guidance_scale, local.null_text_iterations,
                                     window_size=window, window_overlap=overlap, callback=step)
        # the target row's unconditional embedding is the empty prompt's, encoded in a batch of two as the
        # pipeline encodes the two rows' negative prompts
        empty = pipe.encode_prompt(["", ""], clean.device, do_classifier_free_guidance=False)[1:]
        negative = [torch.cat([source_row.to(empty), empty]) for source_row in uncond]
    _, _, num_frames, height, width = clean.shape
    windows = plan_windows(num_frames, window, overlap)
    sources, targets, masks = [], [], []
    for prompt, edit in zip(prompts, plan.edits):
        blend = None
        if edit.blend is not None:
            blend = LocalBlend(windows, int(local.blend_start * num_inference_steps), local.mask_threshold)
        control = AttentionControl(edit, num_inference_steps, mask_map_size(height, width), local.cross_replace_steps,
                                   local.self_replace_steps, blend)
        with attention_control(pipe.unet, control):
            sampled = pipe([plan.source_prompt, prompt], latents=latents[-1], num_inference_steps=num_inference_steps,
                           guidance_scale=[guidance_scale if null_text else 1.0, guidance_scale],
                           negative_prompt_embeds=negative, num_inv_steps=num_inv_steps, latents_dtype=torch.float32,
                           window_size=window, window_overlap=overlap, output_type="latent", callback=progress,
                           callback_on_step_end=control).videos
        sources.append(sampled[:1])
        targets.append(sampled[1:])
        masks.append(blend.mask if blend is not None else None)
    # the source branch does not depend on the target: every prompt's is the same
    return LocalLatents(sources[0], torch.cat(targets), masks)

