"""One tuning step as `tuneavideo.training` runs it: the diffusion loss, mixed precision (frozen weights held in
half precision, autocast by accelerate), backward, gradient clipping and the optimizer. It needs neither the config
nor the video packages, so the benchmarks time this very step at real size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler

from .errors import UserError


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite on some process; the step stopped before it reached the weights."""

    def __init__(self, losses: torch.Tensor):
        super().__init__(losses)
        self.losses = losses


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are held in under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_frozen_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold frozen weights in `dtype` (half the UNet's memory in fp16/bf16), trainable ones in float32.

    Autocast runs every layer in half precision either way; the trainable float32 master weights keep small
    AdamW updates from rounding away. (diffusers' `cast_training_params` upcasts the trainable ones after the whole
    model was cast down, which would first round the tuned pretrained weights to half precision.)
    """
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else dtype)


def make_optimizer(parameters: list[torch.nn.Parameter], learning_rate: float, use_8bit_adam: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2,
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over `parameters`, or bitsandbytes' 8-bit AdamW with `use_8bit_adam`."""
    optimizer_class = torch.optim.AdamW
    if use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("use_8bit_adam: true needs bitsandbytes, which is not installed; pip install "
                            "bitsandbytes, or set use_8bit_adam: false") from None
        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)


# `control(noisy_latents, timesteps, text)`: a frozen ControlNet's residuals for the UNet (its keyword arguments)
Control = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict]


def diffusion_loss(unet, noise_scheduler: DDPMScheduler, latents: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, control: Control | None = None) -> torch.Tensor:
    """The original's objective: MSE between the UNet's prediction and the noise (or v) at a random timestep, one
    timestep per clip of `latents` `(batch, 4, frames, h, w)`; with `control`, the UNet predicts with its residuals
    added (ControlVideo's tuning)."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"the base model's scheduler has prediction_type {prediction_type!r}, which tuning does not "
                        "support; use a model whose scheduler predicts epsilon or v_prediction")
    text = encoder_hidden_states.expand(latents.shape[0], -1, -1)
    residuals = {}
    if control is not None:
        with torch.no_grad():  # the ControlNet is frozen
            residuals = control(noisy_latents, timesteps, text)
    model_pred = unet(noisy_latents, timesteps, text, **residuals).sample
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


@dataclass
class TrainingStep:
    """`step(latents, encoder_hidden_states)`: one (possibly accumulated) tuning step; returns every process's loss."""

    accelerator: Accelerator
    unet: torch.nn.Module  # as prepared by the accelerator
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    parameters: list[torch.nn.Parameter]  # the trainable ones
    max_grad_norm: float

    @classmethod
    def prepare(cls, accelerator: Accelerator, unet: torch.nn.Module, noise_scheduler: DDPMScheduler,
                optimizer: torch.optim.Optimizer, lr_scheduler, max_grad_norm: float) -> TrainingStep:
        """Hold `unet`'s frozen weights in the mixed-precision dtype, let the accelerator wrap the UNet, optimizer
        and schedule, and put the UNet in training mode. The trainable parameters are those that require grad."""
        dtype = weight_dtype(accelerator)
        if dtype != torch.float32:
            cast_frozen_parameters(unet, dtype)
        parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
        prepared, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        prepared.train()
        return cls(accelerator, prepared, noise_scheduler, optimizer, lr_scheduler, parameters, max_grad_norm)

    def __call__(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 control: Control | None = None) -> torch.Tensor:
        """Raises `NonFiniteLoss` before the backward pass when any process's loss is NaN or infinite."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet):
            loss = diffusion_loss(self.unet, self.noise_scheduler, latents, encoder_hidden_states, control)
            losses = accelerator.gather(loss.detach())  # every process sees every loss, so all stop together
            if not torch.isfinite(losses).all():
                raise NonFiniteLoss(losses)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return losses
