"""Resumable training state: small `checkpoint-STEP` folders, written atomically, and resuming from them.

A checkpoint holds the trainable tensors, optimizer, LR schedule and every process's RNG state (not the frozen
UNet, which the base model restores). It is written under a temporary name and renamed once every process is done,
so a crash, a kill or a full disk never leaves a half-written `checkpoint-STEP` that `latest` would pick.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_MODEL_NAME, SCHEDULER_NAME
from safetensors import SafetensorError, safe_open

from .atomic import remove, staged
from .errors import UserError, first_line
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


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (a file of accelerate's missing, truncated or
    corrupt), or None when every file reads. Reads only the files' indexes and checksums, not the tensors."""
    for pattern in (f"{SAFE_MODEL_NAME}*.safetensors", f"{OPTIMIZER_NAME}*.bin", f"{SCHEDULER_NAME}*.bin",
                    f"{RNG_STATE_NAME}*.pkl"):
        if not any(path.glob(pattern)):
            return f"no {pattern}"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):  # checks that the header covers the whole file
                    pass
            elif file.suffix in (".bin", ".pkl"):  # torch.save's zip archives: every member's CRC
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{file.name}: {bad} is corrupt"
        except (OSError, zipfile.BadZipFile, SafetensorError) as err:
            return f"{file.name}: {first_line(err)}"
    return None


def resume_point(resume_from_checkpoint: str | None, run: Run) -> Path | None:
    """The checkpoint to resume from (a path or "latest"; None: start at step 0), checked to be complete before any
    file of the run is touched. "latest" passes over damaged checkpoints to the newest complete one, saying so in
    one line.

    Raises:
        UserError: the path is no checkpoint or is damaged (naming the complete one to use instead), or every
            checkpoint of the run is damaged.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = run.checkpoints()
        if not found:
            logger.warning(f"no checkpoint in {run.folder} to resume from; starting from step 0")
            return None
        newest_damage = checkpoint_damage(found[-1])
        if newest_damage is None:
            return found[-1]
        for path in reversed(found[:-1]):
            if checkpoint_damage(path) is None:
                logger.warning(f"{found[-1]} is damaged ({newest_damage}); resuming from {path.name}, the newest "
                               "complete checkpoint")
                return path
        raise UserError(f"{found[-1]} is damaged ({newest_damage}) and no earlier checkpoint is complete; train "
                        "again with overwrite=true")
    path = Path(resume_from_checkpoint)
    if not path.is_dir() or checkpoint_step(path) is None:
        raise UserError(f"resume_from_checkpoint={path}: no checkpoint-STEP folder there; use latest or a path")
    damage = checkpoint_damage(path)
    if damage is not None:
        complete = [other for other in Run(path.parent).checkpoints() if checkpoint_damage(other) is None]
        instead = (f"resume from {complete[-1]} instead" if complete
                   else "no checkpoint beside it is complete; train again with overwrite=true")
        raise UserError(f"resume_from_checkpoint={path} is damaged ({damage}); {instead}")
    return path


def resume(accelerator: Accelerator, checkpoint: Path | None) -> int:
    """Load `checkpoint` (from `resume_point`); returns the step it was saved at (0 when None)."""
    if checkpoint is None:
        return 0
    logger.info(f"resuming from {checkpoint}")
    # the checkpoint holds only the trainable tensors; the frozen ones come from the base model
    accelerator.load_state(str(checkpoint), strict=False)
    return checkpoint_step(checkpoint)
