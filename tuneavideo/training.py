"""One-shot tuning of an inflated Stable Diffusion UNet on one clip (the loop behind `train_tuneavideo.py`).

As the original: frozen VAE and text encoder; only modules whose names end with `trainable_modules` learn; DDPM
noise at a uniform random timestep; MSE to the noise (or to v); AdamW; constant LR; gradient-norm clipping. Runs
on one or many processes (`accelerate launch`), on GPU or CPU; validation and saving happen on the main process.
Everything goes through one `TuneAVideoPipeline`: the prompt and the clip are encoded by it once, and validation
samples with it.
"""

from __future__ import annotations

import logging
import os
import signal
from functools import partial
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.utils.import_utils import is_xformers_available
from omegaconf import OmegaConf

from .atomic import atomic_path, remove, staged
from .checkpointing import (
    keep_only_trainable_in_checkpoints,
    remove_checkpoints,
    resume,
    resume_advice,
    resume_point,
    save_checkpoint,
)
from .base_model import BaseModel
from .config import MAX_SEED, ControlNetConfig, TrainConfig, validation_prompts
from .pipelines.controlnet import StructureGuidance, check_fits, load_controlnet
from .video.conditions import depth_estimator, hold, make_condition
from .video.frames import clip_size, decode_frames, tuned_window, window_starts
from .video.readers import Clip
from .errors import UserError
from .pipelines.edit import invert, sample
from .models.unet import UNet3DConditionModel
from .pipelines.pipeline_tuneavideo import TuneAVideoPipeline, truncated_text
from .progress import paused, progress_bar
from .run import ProgressWriter, Run
from .training_step import NonFiniteLoss, TrainingStep, make_optimizer, weight_dtype
from .tuned_parameters import (
    add_lora_adapters,
    apply_tuned_parameters,
    save_tuned_parameters,
    trainable_parameter_names,
)
from .video.writers import save_videos_grid

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> Path:
    """Tune on `cfg.train_data`'s clip and write the run to `cfg.output_dir`; returns that folder. The main process
    keeps the run's progress.json up to date, to the end, however it ends (`ProgressWriter`)."""
    run = Run(cfg.output_dir)
    # bad paths fail here, in seconds, before any model is loaded (the clip's in `_tune`, as soon)
    base = BaseModel.resolve(cfg.pretrained_model_path, cfg.pretrained_model_config, cfg.loras)
    run.check_output_dir(resuming=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite)
    checkpoint = resume_point(cfg.resume_from_checkpoint, run)  # a damaged one is refused before a file is touched
    if cfg.resume_from_checkpoint:
        run.check_base_model(base.record())
    mixed_precision = _usable_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(
        # several processes without CUDA (`accelerate launch --multi_gpu` on a CPU machine): CPU workers over gloo
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run.folder), logging_dir=str(run.logs)),
    )
    with ProgressWriter(run, cfg.max_train_steps, enabled=accelerator.is_main_process,
                        resuming=bool(cfg.resume_from_checkpoint)) as report:
        _tune(cfg, base, run, accelerator, mixed_precision, report, checkpoint)
    return run.folder


def _tune(cfg: TrainConfig, base: BaseModel, run: Run, accelerator: Accelerator, mixed_precision: str,
          report: ProgressWriter, checkpoint: Path | None) -> None:
    data = cfg.train_data
    clip = Clip(data.video_path, data.fps)
    windows = TrainingWindows.plan(clip, cfg)
    if not accelerator.is_local_main_process:  # one process per machine prints
        logging.getLogger(__package__).setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if mixed_precision != (cfg.mixed_precision or "no"):
        logger.warning(f"mixed_precision={cfg.mixed_precision} needs a CUDA GPU; training in float32 instead "
                       "(bf16 works on the CPU)")
    if cfg.seed is not None:
        set_seed(cfg.seed)
    if accelerator.is_main_process:
        if cfg.overwrite and not cfg.resume_from_checkpoint:
            remove_checkpoints(run)  # a fresh run must not resume from the replaced run's state later
        run.write_config(cfg)
        run.write_base_model(base.record())

    # models: everything frozen but the trainable UNet modules (or, with tuning: lora, their LoRA adapters)
    logger.info(f"loading the base model {base.path}" + "".join(f"; LoRA {lora.path} x {lora.scale:g}"
                                                                for lora in base.loras))
    pipeline = base.video_pipeline(cfg.spatial_attention)
    pipeline.set_progress_bar_config(disable=True)
    noise_scheduler = base.scheduler(DDPMScheduler)
    unet, vae, text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    guidance = None
    if cfg.controlnet is not None:  # before anything long runs: a ControlNet or condition that does not fit is one line
        controlnet = load_controlnet(cfg.controlnet.model, option="controlnet.model")
        check_fits(controlnet, unet.config, f"controlnet.model {cfg.controlnet.model}")
        controlnet.requires_grad_(False).to(accelerator.device, dtype=weight_dtype(accelerator))
        guidance = tuning_guidance(controlnet, cfg.controlnet, windows, clip, accelerator.device)
        pipeline.controlnet = controlnet  # for the validation samples
    dropped = truncated_text(pipeline.tokenizer, data.prompt)
    if dropped:
        logger.warning(f"train_data.prompt is longer than the text encoder's {pipeline.tokenizer.model_max_length} "
                       f"tokens; dropped: {dropped!r}")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)
    if cfg.tuning == "lora":
        add_lora_adapters(unet, cfg.trainable_modules, cfg.lora_rank, cfg.lora_alpha)
    trainable = trainable_parameter_names(unet, cfg.trainable_modules)
    if not trainable:
        raise UserError(f"trainable_modules {cfg.trainable_modules} match no module of the UNet (e.g. attn1.to_q)")
    named = dict(unet.named_parameters())
    for name in trainable:
        named[name].requires_grad_(True)
    logger.info(f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision "
                f"{accelerator.mixed_precision}")
    logger.info(f"trainable parameters: {sum(named[n].numel() for n in trainable):,} in {len(trainable)} tensors")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.enable_xformers_memory_efficient_attention:
        _enable_xformers(unet)

    learning_rate = cfg.learning_rate
    if cfg.scale_lr:
        learning_rate *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer([named[n] for n in trainable], learning_rate, cfg.use_8bit_adam,
                               (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay, cfg.adam_epsilon)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        # accelerate steps the schedule once per optimizer step and process (not per accumulated batch)
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )

    step = TrainingStep.prepare(accelerator, unet, noise_scheduler, optimizer, lr_scheduler, cfg.max_grad_norm)
    if cfg.seed is not None and accelerator.num_processes > 1:
        # the model was initialised alike everywhere (DDP also broadcasts rank 0's weights); each process now
        # draws its own noise, timesteps and windows, or they would all compute the same gradient
        set_seed((cfg.seed + accelerator.process_index) % (MAX_SEED + 1))
    keep_only_trainable_in_checkpoints(accelerator, trainable)

    vae.to(accelerator.device, dtype=weight_dtype(accelerator))
    text_encoder.to(accelerator.device, dtype=weight_dtype(accelerator))
    vae.enable_slicing()  # encode and decode frame by frame: the whole clip at once is a memory spike
    logger.info(f"frames resized to {windows.size[0]}x{windows.size[1]}; {len(windows.starts)} window start(s)")
    with torch.no_grad():
        # the clip's latent distribution and the prompt's embedding, once for the whole run
        posterior = pipeline.encode_video(windows.decode(clip))
        encoder_hidden_states = pipeline.encode_prompt(data.prompt, accelerator.device,
                                                       do_classifier_free_guidance=False)

    global_step = resume(accelerator, checkpoint)
    if accelerator.is_main_process:
        accelerator.init_trackers("tuneavideo", config=_scalar_hparams(cfg))
    progress = progress_bar(
        range(global_step, cfg.max_train_steps), initial=global_step, total=cfg.max_train_steps,
        disable=not accelerator.is_local_main_process, desc="Steps",
    )
    report.begin(global_step)
    with CtrlC() as ctrl_c:
        while global_step < cfg.max_train_steps:
            try:
                latents, positions = windows.sample(posterior, cfg.train_batch_size)
                control = None if guidance is None else partial(guidance.residuals, frames=positions, step=0,
                                                                num_steps=1, guided=False)
                losses = step(latents, encoder_hidden_states, control)
            except NonFiniteLoss as err:
                _stop_diverged(err.losses, global_step + 1, run)

            if accelerator.sync_gradients:
                global_step += 1
                logs = {"loss": losses.mean().item(), "lr": step.lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(**logs, refresh=False)  # drawn by the update: one line a step in a log
                progress.update(1)
                accelerator.log(logs, step=global_step)
                report.step(global_step, logs["loss"], logs["lr"])
                interrupted = ctrl_c.any_process_interrupted(accelerator)
                if global_step % cfg.checkpointing_steps == 0 or interrupted:
                    save_checkpoint(accelerator, run, global_step, cfg.checkpoints_total_limit)
                if interrupted:
                    raise KeyboardInterrupt(f"saved {run.checkpoint(global_step).name}; continue with "
                                            "resume_from_checkpoint=latest")
                if global_step % cfg.validation_steps == 0 or global_step == cfg.max_train_steps:
                    if accelerator.is_main_process:
                        with accelerator.autocast(), paused(progress):  # the steps' ETA, without validations
                            validate(pipeline, windows.first(posterior).mean, cfg, global_step,
                                     clip.info.fps / data.sample_frame_rate, windows.first_control(guidance))
                        name, prompt = validation_prompts(cfg.validation_data)[0]
                        report.sample(run.sample(global_step, prompt, name))
                    accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final(cfg, base, unet, run)
    accelerator.end_training()


class TrainingWindows:
    """Which frames each step tunes on: the original's one window (`window: fixed`), or a window drawn every step
    among all that fit (`window: random`). The clip is decoded and VAE-encoded once, frames `decoded`; a window is
    `n_sample_frames` of them, `stride` apart, from a start in `starts` (positions within `decoded`)."""

    def __init__(self, decoded: range, starts: range, stride: int, length: int, size: tuple[int, int],
                 check) -> None:
        self.decoded, self.starts, self.stride, self.length, self.size = decoded, starts, stride, length, size
        self._check = check

    @classmethod
    def plan(cls, clip: Clip, cfg: TrainConfig) -> TrainingWindows:
        data = cfg.train_data
        size = clip_size(clip.info.width, clip.info.height, data.width, data.height)
        settings = (data.n_sample_frames, data.sample_start_idx, data.sample_frame_rate)
        if data.window == "fixed":
            def check(num_frames: int) -> range:
                return tuned_window(num_frames, *settings, clip.path)

            return cls(check(clip.info.num_frames), range(1), 1, data.n_sample_frames, size, check)

        def check(num_frames: int) -> range:
            return window_starts(num_frames, *settings, data.sample_end_idx, clip.path)

        starts = check(clip.info.num_frames)
        decoded = range(starts.start, starts.stop + (data.n_sample_frames - 1) * data.sample_frame_rate)
        return cls(decoded, range(len(starts)), data.sample_frame_rate, data.n_sample_frames, size, check)

    def decode(self, clip: Clip):
        return decode_frames(clip, self.decoded, self.size, self._check)

    def _window(self, posterior: DiagonalGaussianDistribution, start: int) -> DiagonalGaussianDistribution:
        positions = torch.arange(start, start + self.length * self.stride, self.stride)
        return DiagonalGaussianDistribution(posterior.parameters[:, :, positions.to(posterior.parameters.device)])

    def first(self, posterior: DiagonalGaussianDistribution) -> DiagonalGaussianDistribution:
        """The window at `sample_start_idx`: the one validation inverts and edits default to."""
        return self._window(posterior, 0)

    def first_control(self, guidance: StructureGuidance | None) -> dict | None:
        """The pipeline's structure guidance arguments for the `first` window under the tuning's `guidance`."""
        if guidance is None:
            return None
        frames = [guidance.conditions[0][position] for position in range(0, self.length * self.stride, self.stride)]
        return dict(conditioning_frames=frames, controlnet_conditioning_scale=guidance.scales[0])

    def sample(self, posterior: DiagonalGaussianDistribution,
               batch_size: int) -> tuple[torch.Tensor, list[list[int]]]:
        """`batch_size` latent clips `(batch, 4, frames, h, w)`: each a fresh posterior sample (the original's
        `latent_dist.sample()`) of its own window; and each clip's frames, as positions within `decoded`. Starts
        come from torch's global generator, which checkpoints save, so a resumed run draws the same windows."""
        samples, positions = [], []
        for _ in range(batch_size):
            start = int(torch.randint(len(self.starts), ())) if len(self.starts) > 1 else 0
            samples.append(self._window(posterior, start).sample())
            positions.append(list(range(start, start + self.length * self.stride, self.stride)))
        return torch.cat(samples), positions


def tuning_guidance(controlnet, settings: ControlNetConfig, windows: TrainingWindows, clip: Clip,
                    device: torch.device) -> StructureGuidance:
    """The ControlNet with the conditions of every frame the run tunes on (indexed by position within
    `windows.decoded`, held in a memory-mapped file), at `settings.scale`, acting at every step."""
    size = windows.size
    frames = make_condition(settings.condition, lambda: windows.decode(clip), windows.decoded,
                            (clip.info.width, clip.info.height), size,
                            estimator=lambda: depth_estimator(device=device))
    held = hold(frames, len(windows.decoded), size)
    return StructureGuidance.create(controlnet, held, len(held), size[1], size[0],
                                    controlnet_conditioning_scale=settings.scale)


class CtrlC:
    """Turns Ctrl-C (SIGINT) during the loop into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to stop now)")

    def any_process_interrupted(self, accelerator: Accelerator) -> bool:
        """Whether any process was interrupted; all processes must agree, or they would wait for each other."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def __enter__(self) -> CtrlC:
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _stop_diverged(losses: torch.Tensor, step: int, run: Run) -> None:
    """Stop on a NaN or infinite loss, before it reaches the weights or a checkpoint."""
    last = run.checkpoints()
    kept = f"{last[-1]} is the last good checkpoint (resume_from_checkpoint=latest)" if last else "no checkpoint yet"
    values = ", ".join(f"{v:g}" for v in losses.flatten().tolist())
    raise UserError(f"the loss became {values} at step {step}: try mixed_precision=bf16 or no, or a lower "
                    f"learning_rate; {kept}")


def _usable_mixed_precision(requested: str | None) -> str:
    """fp16 needs a CUDA GPU; bf16 runs on the CPU too; elsewhere train in float32 (the caller warns once)."""
    requested = requested or "no"
    return requested if requested in ("no", "bf16") or torch.cuda.is_available() else "no"


def _enable_xformers(unet: UNet3DConditionModel) -> None:
    if not (is_xformers_available() and torch.cuda.is_available()):
        logger.warning("xformers is not available here; using PyTorch's scaled_dot_product_attention instead")
        return
    unet.enable_xformers_memory_efficient_attention()


@torch.no_grad()
def validate(pipeline: TuneAVideoPipeline, clean_latents: torch.Tensor, cfg: TrainConfig, step: int,
             fps: float, control: dict | None = None) -> torch.Tensor:
    """Invert the tuned window (`clean_latents`, the VAE posterior mean) with the current UNet, save that latent,
    then sample every validation prompt from it; returns the samples, one video per prompt. A run tuned under a
    ControlNet inverts and samples under it (`control`: the pipeline's structure guidance arguments).

    Samples have the tuned frames' size, which keeps the source's aspect ratio, rather than
    `validation_data.width/height` (an inverted latent of another size could not be sampled anyway).
    """
    validation = cfg.validation_data
    run = Run(cfg.output_dir)
    unet = pipeline.unet
    was_training = unet.training
    unet.eval()
    prompts = validation_prompts(validation)  # (folder name, prompt)
    latents = None
    work = validation.num_inference_steps * len(prompts) + validation.use_inv_latent * validation.num_inv_steps
    with progress_bar(total=work, desc=f"Validation at step {step}", leave=False) as bar:
        if validation.use_inv_latent:
            latents = invert(pipeline, clean_latents, validation.num_inv_steps, callback=lambda *_: bar.update(),
                             control=control)
            with atomic_path(run.validation_latent(step)) as path:
                torch.save(latents.cpu(), path)
        samples = sample(pipeline, latents, [prompt for _, prompt in prompts], validation.num_inference_steps,
                         validation.guidance_scale, validation.num_inv_steps, validation.negative_prompt,
                         seed=cfg.seed if cfg.seed is not None else 0, callback=lambda *_: bar.update(),
                         control=control,
                         video_length=validation.video_length,
                         height=clean_latents.shape[3] * pipeline.vae_scale_factor,
                         width=clean_latents.shape[4] * pipeline.vae_scale_factor)
    videos = torch.from_numpy(pipeline.decode_latents(samples))
    for (name, prompt), video in zip(prompts, videos):
        for suffix in (".gif", ".mp4"):
            save_videos_grid(video[None], str(run.sample(step, prompt, name, suffix)), fps=fps)
    save_videos_grid(videos, str(run.sample_grid(step)), fps=fps)
    logger.info(f"wrote the samples of step {step} to {run.samples}")
    unet.train(was_training)
    return videos


def _scalar_hparams(cfg: TrainConfig) -> dict:
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    result = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            result.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            result[key] = value
    return result


def _save_final(cfg: TrainConfig, base: BaseModel, unet: UNet3DConditionModel, run: Run) -> None:
    """The tuned tensors, then the tuned pipeline (float32 VAE and text encoder from the base, a DDIM scheduler).

    The saved UNet is the base model plus the tuned-parameters file, so it is float32 even when the frozen weights
    were held in half precision during training, and equals what `apply_tuned_parameters` rebuilds. The pipeline is
    written to a temporary folder and moved in, `model_index.json` last: a full disk leaves no half-written model.
    """
    tuned_file = save_tuned_parameters(unet, run.tuned_parameters, cfg.trainable_modules)
    pipeline = base.video_pipeline(cfg.spatial_attention)
    apply_tuned_parameters(pipeline.unet, tuned_file)
    staging = run.pipeline_staging
    remove(staging)  # left by a killed run
    with staged(staging, f"no space left on the disk of {run.folder} while saving the tuned model; the tuned tensors "
                         f"are safe in {tuned_file}; {resume_advice(run)}"):
        pipeline.save_pretrained(staging)
    entries = sorted(staging.iterdir(), key=lambda entry: entry.name == run.model_index.name)
    for entry in entries:
        target = run.folder / entry.name
        if target.is_dir():
            remove(target)
        os.replace(entry, target)
    staging.rmdir()
    logger.info(f"saved the tuned model to {run.folder}")
