"""Resumable training state: small `checkpoint-STEP` folders, written atomically, and resuming from them.

A checkpoint holds the trainable tensors, optimizer, LR schedule and every process's RNG state (not the frozen
UNet, which the base model restores). It is written under a temporary name and renamed once every process is done,
so a crash, a kill or a full disk never leaves a half-written `checkpoint-STEP` that `latest` would pick.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from .atomic import remove, staged
from .errors import UserError
from .run import Run, checkpoint_step

logger = logging.getLogger(__name__)


def keep_only_trainable_in_checkpoints(accelerator: Accelerator, trainable: list[str]) -> None:
    """Make `accelerator.save_state` store only the `trainable` tensors of the prepared model."""
    wanted = set(trainable)

    def keep_trainable(models, weights, output_dir):
        for index, weight in enumerate(weights):
            weights[index] = {k: v for k, v in weight.items() if k.removeprefix("module.") in wanted}

    accelerator.register_save_state_pre_hook(keep_trainable)


def remove_checkpoints(run: Run) -> None:
    for path in run.checkpoints():
        shutil.rmtree(path)


def save_checkpoint(accelerator: Accelerator, run: Run, step: int, total_limit: int | None = None) -> Path:
    """`accelerator.save_state` (on every process) into a temporary folder renamed to `checkpoint-STEP`."""
    final = run.checkpoint(step)
    temporary = run.checkpoint_staging(step)
    if accelerator.is_main_process:
        remove(temporary)  # left by a killed run
    accelerator.wait_for_everyone()
    # torch.save reports a full disk as a RuntimeError ("unexpected pos"), not OSError: `staged` asks the disk
    with staged(temporary, f"no space left on the disk of {run.folder} while saving {final.name}; "
                           f"{resume_advice(run)}"):
        accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit is not None:
            for old in run.checkpoints()[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def resume_advice(run: Run) -> str:
    """What to do once space is freed after a failed save: resume from the last complete checkpoint, if any."""
    last = run.checkpoints()
    if last:
        return f"{last[-1]} is the last complete checkpoint: free space, then resume with resume_from_checkpoint=latest"
    return "there is no complete checkpoint: free space, then run the training again"


def resume(accelerator: Accelerator, resume_from_checkpoint: str | None, run: Run) -> int:
    """Load the requested checkpoint (a path or "latest"); returns the step it was saved at (0 when none)."""
    if not resume_from_checkpoint:
        return 0
    if resume_from_checkpoint == "latest":
        found = run.checkpoints()
        if not found:
            logger.warning(f"no checkpoint in {run.folder} to resume from; starting from step 0")
            return 0
        path = found[-1]
    else:
        path = Path(resume_from_checkpoint)
        if not path.is_dir() or checkpoint_step(path) is None:
            raise UserError(f"resume_from_checkpoint={path}: no checkpoint-STEP folder there; use latest or a path")
    logger.info(f"resuming from {path}")
    # the checkpoint holds only the trainable tensors; the frozen ones come from the base model
    accelerator.load_state(str(path), strict=False)
    return checkpoint_step(path)
