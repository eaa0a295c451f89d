"""The local web app (Gradio): tune Stable Diffusion on a clip, then edit the clip from new prompts, in a browser.

The page never runs a job itself. Its buttons put jobs on the `JobRunner`'s queue (one job at a time on the machine)
and a one-second timer redraws what the runner and the job folders say: queue positions, training step, the loss
and learning rate curves and ETA, the newest validation sample and every sample, an edit's phase, window-steps
and ETA (from its own progress file, as a training's come from its progress.json), the edited videos; the Edit tab
offers the newest finished run first. So a page can be closed and opened again, by anyone, while a job runs, and a
slow job never blocks the page.

Bad input (not a video, too long, too short, an unreadable run) is refused before a job is queued, with a one-line
message in the page (`gr.Error`); a job that fails shows the tool's own one-line error.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from urllib.parse import quote

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder

from ..cli import read_tail
from ..config import MAX_SEED, ControlNetConfig, LoraFile
from ..edit_progress import PHASES, EditProgress
from ..errors import UserError
from ..request import (
    CONTROLS,
    GUIDANCE_SCALE,
    INVERSIONS,
    LOCAL_GUIDANCE_SCALE,
    EditRequest,
    LocalEdit,
    parse_blend_words,
    parse_reweights,
)
from ..run import EditResult, Progress, Run
from ..video.conditions import CONDITIONS
from .jobs import FINISHED, Job, JobRunner
from .workspace import (
    PRESETS,
    TUNE_CONFIG,
    TuneSettings,
    Workspace,
    is_random_model,
    metrics_markdown,
    prepare_edit,
    prepare_tune,
    read_clip,
    run_defaults,
    tune_command,
)

NOISE_NOTE = (
    "**Random weights give noise, not pictures.** This base model is the tiny random one the app writes when "
    "`checkpoints/` holds no Stable Diffusion model: it shows the whole job running, fast, on a CPU. For real "
    "results put a model there (`./download_models.sh`) and restart the app."
)
SPAN_MODES = ("tuned window", "whole clip", "from / to")
RUN_CONTROLNET, NO_CONTROLNET = "the run's own, if any", "none"  # the Structure part's first ControlNet choices
LOG_LINES = 40
BAR_LINE = re.compile(r"(?P<name>[^|]*?):\s+\d+%\|")  # a tqdm bar's line: "Steps:  40%|####  | 2/5 ..."
LOCAL = LocalEdit()  # the Local edit fields' defaults (Video-P2P's)
# Gradio's file list shows a remove button by each of several files, even where nothing can be removed
CSS = ".status-box {min-height: 3em} #edit-files button[aria-label='Remove this file'] {display: none}"
# Gradio's own "Video not playable" toast for an upload the browser cannot preview (a file that is no video, or a
# codec the browser lacks, such as a phone's HEVC): the app reads the upload itself and says once what is wrong, if
# anything. The <video>'s error event is stopped on its way down, before Gradio's listener on the element.
HEAD = """<script>
window.addEventListener("error", (event) => {
  if (event.target instanceof HTMLVideoElement && event.target.closest("#tune-video")) event.stopPropagation();
}, true);
</script>"""
STEPS_SHOWN = 20  # the charts' x axis spans at least this many steps, so that its ticks fall on whole steps
# The page's name for each setting its messages may quote (as the command line's `--num-inv-steps`, or by its
# parameter name `num_inv_steps`, plain or in backquotes), and the settings whose values are the page's choices
PAGE_WORDS = {"control": "Control", "inversion": "Inversion", "blend": "Blend word(s)", "reweight": "Reweight",
              "blend_words": "Blend word(s)", "reweights": "Reweight", "source_prompt": "Source prompt",
              "num_inference_steps": "Steps", "num_inv_steps": "Inversion steps", "guidance_scale": "Guidance scale",
              "seed": "Seed", "span": "Span of the clip", "stride": "Stride", "prompt": "New prompts",
              "prompts": "New prompts", "cross_replace_steps": "Cross-replace steps",
              "self_replace_steps": "Self-replace steps", "blend_start": "Blend start",
              "mask_threshold": "Mask threshold", "controlnets": "ControlNet", "controlnet": "ControlNet"}
PAGE_CHOICES = {"control": CONTROLS, "inversion": INVERSIONS}
OWN_WORDS = {"prompt", "prompts"}  # messages use them plainly in their own sense: "the prompt 'a cat'"
_SETTING = re.compile(r"(?<![\w-])(?:--(?P<option>[a-z][a-z-]*)(?P<word> [a-z][a-z-]*)?|`(?P<field>[a-z_]+)`"
                      r"|(?P<name>[a-z]+(?:_[a-z]+)*))(?P<value>=\S+| '[^']*')?")


def page_words(message: str) -> str:
    """A tool's message in the page's words: a setting it quotes becomes its field's name, and a setting with one of
    the page's choices that choice ("use --control refine", "use control 'refine'" -> "use "refine" under Control").
    A plain word is taken for a setting only where it cannot be one of the message's own words: with an underscore,
    first in the message, or followed by a quoted value."""

    def name(match: re.Match) -> str:
        key = (match["option"] or "").replace("-", "_") or match["field"] or match["name"]
        value = (match["word"] or "") + (match["value"] or "")
        plain = match["name"] is not None
        if key not in PAGE_WORDS or plain and (key in OWN_WORDS or "_" not in key and match.start() > 0
                                               and value[:2] not in ("='", " '")):
            return match[0]
        given = value.lstrip("= ").strip("'")
        if given in PAGE_CHOICES.get(key, ()):
            return f'"{given}" under {PAGE_WORDS[key]}'
        return PAGE_WORDS[key] + value

    return _SETTING.sub(name, message)


def user_error(err: Exception | str) -> gr.Error:
    """A one-line message box in the page, in its words (and an AppError for API clients); no traceback anywhere."""
    return gr.Error(page_words(" ".join(str(err).split())), print_exception=False)


class Refusals:
    """Why a page's last Tune or Edit was refused, kept for its status box until that page starts a job of the kind:
    Gradio's message box closes by itself after a few seconds."""

    def __init__(self) -> None:
        self._messages: dict[tuple[str, str], str] = {}  # (page session, job kind) -> message

    def refuse(self, session: str, kind: str, err: Exception) -> gr.Error:
        error = user_error(err)
        self._messages[session, kind] = error.message
        return error

    def started(self, session: str, kind: str) -> None:
        self._messages.pop((session, kind), None)

    def status(self, session: str, kind: str, status: str) -> str:
        """`status`, or the refusal of the page's last try when there is one."""
        message = self._messages.get((session, kind))
        return status if message is None else f"**Not started:** {message}"


def whole_number(value: float | None, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` from a number field as an int; an empty field or a fraction is a message, not a crash."""
    if value is None or value != int(value) or value < minimum or (maximum is not None and value > maximum):
        raise UserError(f"{name} must be a whole number >= {minimum}" + (f" and <= {maximum}" if maximum else ""))
    return int(value)


def uploaded_clip(path: str, workspace: Workspace) -> Path:
    """The clip a request's video names: a file Gradio received (in its upload folder) or one of the workspace's
    own clips, never another file of the machine, whatever Gradio let through. Every other path gets the same
    message, before the file is looked at, so a caller learns nothing about which files exist."""
    real = Path(os.path.realpath(path))
    uploads = Path(os.path.realpath(get_upload_folder()))
    if (real.is_relative_to(uploads) and real != uploads and real.is_file()) or real in {
            Path(os.path.realpath(clip)) for clip in workspace.clips().values()}:
        return real
    raise UserError("the clip was not uploaded through this page: upload it, or pick a clip from the list")


def given(value: float | None, name: str) -> float:
    """A number field's value; an empty field is a message."""
    if value is None:
        raise UserError(f"give a number for {name}")
    return float(value)


def local_edit(on: bool, control: str, source_prompt: str | None, blend: str | None, reweight: str | None,
               inversion: str, cross_replace_steps: float | None, self_replace_steps: float | None,
               blend_start: float | None, mask_threshold: float | None) -> LocalEdit | None:
    """The Local edit fields as `EditRequest.local` (None when off): blend `WORD` or `SOURCE:TARGET`, reweight
    `WORD=FACTOR` lines, an empty source prompt the run's tuned one. The edit's own checks come later."""
    blend = (blend or "").strip()
    if not on:
        if blend or (reweight or "").strip():
            raise UserError("Blend word(s) and Reweight are for a local edit: tick Local edit, or clear them")
        return None
    return LocalEdit(
        control=control, source_prompt=(source_prompt or "").strip() or None,
        blend_words=parse_blend_words(blend) if blend else None,
        reweights=parse_reweights([line.strip() for line in (reweight or "").splitlines() if line.strip()]),
        cross_replace_steps=given(cross_replace_steps, "cross-replace steps"),
        self_replace_steps=given(self_replace_steps, "self-replace steps"),
        blend_start=given(blend_start, "blend start"), mask_threshold=given(mask_threshold, "mask threshold"),
        inversion=inversion,
    )


def picked_loras(names: list[str] | None, workspace: Workspace) -> tuple[Path, ...]:
    """The LoRA files of `checkpoints/loras/` picked by name: a path from the page never reaches a config."""
    offered = workspace.loras()
    unknown = [name for name in names or [] if name not in offered]
    if unknown:
        raise UserError(f"there is no LoRA {unknown[0]!r} in checkpoints/loras/; pick them from the list")
    return tuple(offered[name] for name in names or [])


def structure(controlnet: str | None, condition: str, scale: float | None,
              workspace: Workspace) -> list[ControlNetConfig] | None:
    """The Structure fields as `EditRequest.controlnets`: None (the ControlNet the run was tuned under), [] (none),
    or one ControlNet of `checkpoints/` by name, never a path from the page, on a condition made from the clip (the
    Condition choice: Gradio refuses any other value)."""
    if controlnet in (None, "", RUN_CONTROLNET):
        return None
    if controlnet == NO_CONTROLNET:
        return []
    offered = workspace.controlnets()
    if controlnet not in offered:
        raise UserError(f"there is no ControlNet {controlnet!r} in checkpoints/; pick one from the list")
    return [ControlNetConfig(str(offered[controlnet]), condition, given(scale, "ControlNet scale"))]


def duration(seconds: float) -> str:
    """`seconds` as m:ss, or h:mm:ss from an hour on."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def file_link(path: Path, folder: Path) -> str:
    """A Markdown link to `path` (under the app's outputs root, which it serves), named relative to `folder`."""
    return f"[{path.relative_to(folder)}](gradio_api/file={quote(str(path))})"


def samples_markdown(run: Run) -> str:
    """Links to every validation sample of `run`, the newest first ("" before the first)."""
    links = [f"- {file_link(path, run.samples)}" for path in run.sample_files()]
    return "**Samples** (the newest first)\n\n" + "\n".join(links) if links else ""


def history_frame(progress: Progress | None) -> pd.DataFrame | None:
    """progress.json's history as the plots' table (None, no plot, before the first step)."""
    if progress is None or not progress.history:
        return None
    return pd.DataFrame(progress.history, columns=["step", "loss", "learning rate"])


def history_plot(progress: Progress | None) -> dict:
    """The charts' update: the history over an x axis from step 0 to the run's last (at least `STEPS_SHOWN`)."""
    frame = history_frame(progress)
    if frame is None:
        return gr.update(value=None)
    return gr.update(value=frame, x_lim=[0, max(progress.total, STEPS_SHOWN)])


def outputs(result: EditResult | None) -> dict[str, list[str]]:
    """An edit's files by kind, as the API's `/job` reports them (empty lists before it is done)."""
    if result is None:
        return {"videos": [], "gifs": [], "side_by_side": [], "masks": [], "inversion": [], "condition": []}
    return {"videos": [str(path) for path in result.videos], "gifs": [str(path) for path in result.gifs],
            "side_by_side": [str(result.side_by_side)], "masks": [str(path) for path in result.masks],
            "inversion": [str(result.inversion)] if result.inversion else [],
            "condition": [str(result.condition)] if result.condition else []}


def status_markdown(runner: JobRunner, job: Job | None) -> str:
    """One or two lines on a job: its place in the queue, its progress, or how it ended."""
    if job is None:
        return "No job yet."
    head = f"**{job.kind} `{job.id}`**"
    if job.status == "queued":
        position = runner.position(job.id)
        if position is None:  # it left the queue since `job` was read; the next redraw shows how it goes
            return f"{head}: starting…"
        ahead = "next to start" if position == 1 else f"{position - 1} jobs ahead of it"
        return f"{head}: waiting in the queue, position {position} ({ahead})."
    if job.status == "running":
        stopping = " · stopping after this step…" if job.stop_requested else ""
        elapsed = duration(time.time() - job.started) if job.started else "0:00"
        if job.kind == "edit":
            edit = edit_progress(job)
            if edit is None or edit.phase == PHASES[0]:
                return f"{head}: starting (loading the model)… (elapsed {elapsed}){stopping}"
            text = f"{head}: {edit.phase}"
            if edit.total:
                text += f" · {edit.done} / {edit.total} window-steps"
            if edit.done and edit.eta_seconds is not None:
                text += f" · ETA {duration(edit.eta_seconds)}"
            return text + f" (elapsed {elapsed}){stopping}"
        progress = job.progress()
        if progress is None:
            return f"{head}: starting (loading the model)…"
        text = f"{head}: step {progress.step} / {progress.total}"
        if progress.loss is not None:
            text += f" · loss {progress.loss:.4g} · learning rate {progress.learning_rate:.3g}"
        if progress.eta_seconds is not None:
            text += f" · ETA {duration(progress.eta_seconds)}"
        return text + f" (elapsed {elapsed}){stopping}"
    took = f" in {job.finished - job.started:.0f} s" if job.finished and job.started else ""
    if job.status == "done":
        progress = job.progress()
        loss = f"; last loss {progress.loss:.4g}" if progress and progress.loss is not None else ""
        text = f"{head}: done{took}{loss}."
        if job.kind == "tune":
            text += f" Run folder: `{job.folder}`"
            if progress and progress.sample:
                text += f"; newest sample: {file_link(Path(progress.sample), Run(job.folder).samples)}"
        return text
    if job.status == "stopped":
        return f"{head}: stopped{took}. `{job.message}`" + (" Press Resume to continue." if job.kind == "tune" else "")
    if job.status == "cancelled":
        return f"{head}: taken off the queue before it started."
    return f"{head}: failed{took}. `{page_words(job.message or '')}`"


def edit_progress(job: Job) -> EditProgress | None:
    """What a started edit job's own progress file says (None before the edit wrote it)."""
    return EditProgress.load(job.folder, since=job.started) if job.started else None


def job_info(runner: JobRunner, job: Job) -> dict:
    """What the API's `/job` endpoint reports: the job record, its queue position, progress and output files."""
    info = {key: getattr(job, key) for key in ("id", "kind", "run", "status", "message", "returncode")}
    info["position"] = runner.position(job.id)
    progress = job.progress() if job.kind == "tune" else edit_progress(job)
    info["progress"] = asdict(progress) if progress else None
    if job.kind == "tune":
        run = Run(job.folder)
        info["sample"] = progress.sample if progress else None
        info["samples"] = [str(path) for path in run.sample_files()]
        info["run_folder"] = str(run.folder)
        info["finished_run"] = run.finished
        info["checkpoints"] = [path.name for path in run.checkpoints()]
    else:
        info["outputs"] = outputs(job.result() if job.status == "done" else None)
    return info


def log_tail(job: Job | None) -> str:
    """The last lines of a job's log as a terminal would show them: a progress bar's successive lines (a bar in a
    log is a line every few seconds, `tuneavideo.progress`) collapsed into its newest."""
    if job is None:
        return ""
    shown: list[str] = []
    for line in read_tail(job.log).split("\n"):
        line = line.rsplit("\r", 1)[-1]  # the libraries' bars (with --verbose) redraw in place
        bar = BAR_LINE.match(line)
        before = BAR_LINE.match(shown[-1]) if shown else None
        if bar and before and bar["name"] == before["name"]:
            shown[-1] = line
        elif line.strip():
            shown.append(line)
    return "\n".join(shown[-LOG_LINES:])


def build_app(runner: JobRunner, workspace: Workspace) -> gr.Blocks:
    """The page: Tune and Edit tabs over `runner`'s queue; every file it writes goes under `workspace.root`."""

    refusals = Refusals()

    def job_choices(kind: str) -> list[tuple[str, str]]:
        return [(f"{job.id} · {job.title[:40]} · {job.status}", job.id) for job in runner.jobs(kind)]

    def run_choices() -> list[tuple[str, str]]:
        choices = []
        for name in workspace.runs():
            job = runner.get(name)
            choices.append((f"{name} · {job.title[:40]}" if job else name, name))
        return choices

    def base_note(base_model: str | None) -> dict:
        folder = workspace.base_models().get(base_model or "")
        return gr.update(visible=bool(folder and is_random_model(folder)))

    def apply_preset(name: str) -> list:
        return list(PRESETS[name].values())  # in the order of the fields it fills (see preset.change below)

    def submit_tune(video: str | None, clip: str | None, base_model: str | None, prompt: str, steps: float,
                    frames: float, stride: float, start: float, size: float, learning_rate: float, seed: float,
                    sample_prompt: str, sample_steps: float, sample_every: float, loras: list[str] | None,
                    lora_scale: float, request: gr.Request):
        """Check everything, write the run folder and queue the job; returns its id and status line at once."""
        try:
            if video:
                source = uploaded_clip(video, workspace)  # its name is the user's, so it is only read
            elif clip:
                source = workspace.clips().get(clip)
                if source is None:
                    raise UserError(f"there is no clip {clip!r} in the data folder; pick one from the list")
            else:
                raise UserError("upload a video or pick a clip from the list")
            base = workspace.base_models().get(base_model or "")
            if base is None:
                raise UserError("pick a base model from the list")
            settings = TuneSettings(
                prompt=prompt or "", max_train_steps=whole_number(steps, "steps"),
                n_sample_frames=whole_number(frames, "frames"), sample_frame_rate=whole_number(stride, "stride"),
                sample_start_idx=whole_number(start, "start frame", minimum=0), size=whole_number(size, "size"),
                learning_rate=float(learning_rate or 0), seed=whole_number(seed, "seed", minimum=0, maximum=MAX_SEED),
                sample_prompt=sample_prompt or "", sample_steps=whole_number(sample_steps, "sample steps"),
                validation_steps=whole_number(sample_every, "sample every"),
                loras=picked_loras(loras, workspace), lora_scale=float(lora_scale),
            )
            folder, command = prepare_tune(workspace, base, source, settings)
        except UserError as err:
            raise refusals.refuse(request.session_hash, "tune", err) from None
        refusals.started(request.session_hash, "tune")
        job = runner.submit(Job(id=folder.name, kind="tune", folder=folder, command=command, run=folder.name,
                                title=settings.prompt.strip()))
        return job.id, status_markdown(runner, job)  # the timer puts it in the list

    def check_upload(video: str | None, request: gr.Request) -> None:
        """An upload that is no readable clip is refused as it arrives (and again by Tune), in one message."""
        if video:
            try:
                read_clip(uploaded_clip(video, workspace))
            except UserError as err:
                raise refusals.refuse(request.session_hash, "tune", err) from None

    def stop(job_id: str | None) -> str:
        """Stop: a waiting job leaves the queue; a running one gets one SIGINT (a tuning job saves a checkpoint)."""
        if not job_id:
            raise user_error("pick a job first")
        done = runner.stop(job_id)
        return f"{status_markdown(runner, runner.get(job_id))} ({done})"

    def resume(job_id: str | None):
        """Queue a stopped or failed tuning job again, from its newest checkpoint (from step 0 if it has none)."""
        job = runner.get(job_id or "")
        if job is None or job.kind != "tune":
            raise user_error("pick a tuning job first")
        if job.status == "done":
            raise user_error(f"{job.id} has finished; nothing to resume")
        if job.status not in FINISHED:
            raise user_error(f"{job.id} is {job.status}; stop it first")
        try:
            job = runner.requeue(job.id, tune_command(workspace, job.folder / TUNE_CONFIG, resume=True))
        except ValueError as err:  # it changed since: another page resumed it first
            raise user_error(err) from None
        return job.id, status_markdown(runner, job)  # the timer puts it in the list

    def run_settings(run_name: str | None):
        """Fill the Edit settings from the picked run, so that by default its cached inversion is reused."""
        run = workspace.runs().get(run_name or "")
        if run is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.update(visible=False)
        try:
            defaults = run_defaults(run)
        except UserError as err:
            raise user_error(err) from None
        return (defaults["num_inference_steps"], defaults["num_inv_steps"], defaults["seed"], defaults["stride"],
                defaults["prompt"], gr.update(visible=defaults["random"]))

    def submit_edit(run: str | None, prompts: str, steps: float, inv_steps: float, guidance_scale: float,
                    seed: float | None, span: str, span_start: float | None, span_end: float | None,
                    stride: float | None, local: bool, control: str, inversion: str,
                    cross_replace_steps: float | None, self_replace_steps: float | None, blend_start: float | None,
                    mask_threshold: float | None, source_prompt: str | None = None, blend: str | None = None,
                    reweight: str | None = None, controlnet: str | None = None, condition: str = "canny",
                    controlnet_scale: float | None = 1.0, loras: list[str] | None = None, lora_scale: float = 1.0,
                    request: gr.Request = None):
        """Check the run and settings and queue the edit; returns its id and status line at once. `local` and the
        parameters after it are the Local edit fields (see `local_edit`), then the Structure ones (see `structure`),
        then LoRAs of checkpoints/loras/ (by name) fused on top of the run's model; the text ones may be left out
        (None)."""
        try:
            seconds = [Fraction(str(value)) if value else None for value in (span_start, span_end)]  # 0: open
            edit_request = EditRequest(
                prompts=(prompts or "").splitlines(), num_inference_steps=whole_number(steps, "steps"),
                num_inv_steps=whole_number(inv_steps, "inversion steps"),
                guidance_scale=None if guidance_scale is None else float(guidance_scale),  # None: the edit's default
                seed=None if seed is None else whole_number(seed, "seed", minimum=0, maximum=MAX_SEED),
                span={"whole clip": (None, None), "from / to": tuple(seconds)}.get(span),
                stride=whole_number(stride, "stride") if stride else None,  # None, 0: the run's
                local=local_edit(local, control, source_prompt, blend, reweight, inversion, cross_replace_steps,
                                 self_replace_steps, blend_start, mask_threshold),
                controlnets=structure(controlnet, condition, controlnet_scale, workspace),
                loras=[LoraFile(str(path), float(lora_scale)) for path in picked_loras(loras, workspace)],
            )
            edit_folder, command = prepare_edit(workspace, run or "", edit_request)
        except UserError as err:
            raise refusals.refuse(request.session_hash, "edit", err) from None
        refusals.started(request.session_hash, "edit")
        title = " | ".join(line.strip() for line in prompts.splitlines() if line.strip())
        job = runner.submit(Job(id=edit_folder.name, kind="edit", folder=edit_folder, command=command, run=run,
                                title=title))
        return job.id, status_markdown(runner, job)  # the timer puts it in the list

    def edit_result(job_id: str | None):
        """The first prompt's edit (MP4 with sound) and, for a local edit, its blend mask, the side-by-side, a local
        edit's inversion, a guided edit's condition video, every file for download, and the edits' LOVEU-TGVE
        figures when the scoring models are there."""
        job = runner.get(job_id or "")
        result = job.result() if job is not None and job.status == "done" else None
        if result is None:
            return None, None, None, None, None, None, gr.update(value="", visible=False)
        videos = [str(path) for path in result.videos]
        masks = [str(path) for path in result.masks]
        inversion = [str(result.inversion)] if result.inversion else []
        condition = [str(result.condition)] if result.condition else []
        figures = metrics_markdown(result.metrics) if result.metrics else ""
        return (videos[0] if videos else None, masks[0] if masks else None, str(result.side_by_side),
                inversion[0] if inversion else None, condition[0] if condition else None,
                [*videos, *(str(path) for path in result.gifs), str(result.side_by_side), *masks, *inversion,
                 *condition],
                gr.update(value=figures, visible=bool(figures)))

    def edit_media(job_id: str | None):
        """`edit_result` for the page: the mask, inversion and condition videos shown only when the edit has them."""
        video, mask, side, inversion, condition, files, figures = edit_result(job_id)
        return (video, gr.update(value=mask, visible=mask is not None), side,
                gr.update(value=inversion, visible=inversion is not None),
                gr.update(value=condition, visible=condition is not None), files, figures)

    def job(job_id: str) -> dict:
        """The state of one job (for API clients): status, queue position, progress, samples and outputs."""
        found = runner.get(job_id)
        if found is None:
            raise user_error(f"no job {job_id!r}")
        return job_info(runner, found)

    def finished_runs() -> list[str]:
        """The finished runs' names, the newest to finish first (for API clients; the Edit tab offers the first)."""
        return list(workspace.runs())

    def refresh(tune_id: str | None, edit_id: str | None, run_name: str | None, shown: dict | None,
                request: gr.Request):
        """Redraw from the runner's state; outputs that did not change are skipped (a video is not reloaded)."""
        shown = dict(shown or {})

        def changed(key: str, value) -> bool:
            if shown.get(key) == value:
                return False
            shown[key] = value
            return True

        def dropdown(key: str, choices: list, current: str | None, default: str | None, follow_first: bool = False):
            """New choices when they changed; the value is only set when the page has none (to `default`), as
            `current` may be older than a value another event just set, or, with `follow_first`, when a new first
            choice came (a run that just finished)."""
            before = shown.get(key)
            if not changed(key, choices):
                return gr.skip()
            new_first = follow_first and before is not None and before[:1] != choices[:1]
            if current in [value for _, value in choices] and not new_first:
                return gr.update(choices=choices)
            return gr.update(choices=choices, value=default)

        def shown_job(job_id: str | None, kind: str) -> Job | None:
            """The page's job, or for a page without one the running job of that kind, else the newest."""
            jobs = runner.jobs(kind)
            picked = [job for job in jobs if job.id == job_id] or [job for job in jobs if job.status == "running"]
            return (picked or jobs or [None])[0]

        tune_job, edit_job = shown_job(tune_id, "tune"), shown_job(edit_id, "edit")
        tune_choices, edit_choices = job_choices("tune"), job_choices("edit")
        tune_progress = tune_job.progress() if tune_job else None
        sample = tune_progress.sample if tune_progress else None
        history = tune_progress.history if tune_progress else []
        history_key = (tune_job.id, len(history), history[-1] if history else None) if tune_job else None
        plot = history_plot(tune_progress) if changed("history", history_key) else gr.skip()
        samples = samples_markdown(Run(tune_job.folder)) if tune_job else ""
        session = request.session_hash
        tune_status = refusals.status(session, "tune", status_markdown(runner, tune_job))
        edit_status = refusals.status(session, "edit", status_markdown(runner, edit_job))
        log = log_tail(tune_job)
        edit_key = (edit_job.id, edit_job.status) if edit_job else None
        media = edit_media(edit_job.id if edit_job else None) if changed("edit", edit_key) else [gr.skip()] * 7
        queue, runs = queue_markdown(), run_choices()
        return (
            queue if changed("queue", queue) else gr.skip(),
            dropdown("tune_choices", tune_choices, tune_id, tune_job.id if tune_job else None),
            tune_status if changed("tune_status", tune_status) else gr.skip(),
            sample if changed("sample", sample) else gr.skip(),
            plot, plot,
            samples if changed("samples", samples) else gr.skip(),
            log if changed("log", log) else gr.skip(),
            dropdown("edit_choices", edit_choices, edit_id, edit_job.id if edit_job else None),
            edit_status if changed("edit_status", edit_status) else gr.skip(),
            *media,
            dropdown("runs", runs, run_name, runs[0][1] if runs else None, follow_first=True),
            shown,
        )

    def queue_markdown() -> str:
        parts = []
        for job in runner.jobs():
            if job.status == "running":
                progress = job.progress()
                step = f" (step {progress.step}/{progress.total})" if progress else ""
                parts.append(f"running: {job.kind} `{job.id}`{step}")
        waiting = [runner.get(job_id) for job_id in runner.waiting()]
        if waiting:
            parts.append("waiting: " + ", ".join(f"{index}. {job.kind} `{job.id}`"
                                                 for index, job in enumerate(waiting, 1) if job))
        return "**Queue** (one job at a time): " + ("; ".join(parts) if parts else "idle.")

    base_models = list(workspace.base_models())
    clips = list(workspace.clips())
    with gr.Blocks(title="Tune-A-Video", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# Tune-A-Video\nTune Stable Diffusion on one clip and a sentence that describes it, then "
                    "re-render the clip from new sentences, with the same motion and the clip's own sound.")
        queue_box = gr.Markdown(elem_id="queue")
        with gr.Tab("Tune", id="tune"):
            with gr.Row():
                with gr.Column():
                    video = gr.Video(label="Clip (upload)", sources=["upload"], elem_id="tune-video")
                    clip = gr.Dropdown(choices=clips, value=None, label="… or a clip from the data folder",
                                       allow_custom_value=True)
                    base_model = gr.Dropdown(choices=base_models, value=base_models[0] if base_models else None,
                                             label="Base model (checkpoints/: a folder or a .safetensors / .ckpt file)",
                                             allow_custom_value=True)
                    tune_note = gr.Markdown(NOISE_NOTE, visible=False, elem_id="tune-noise-note")
                    with gr.Row():
                        loras = gr.Dropdown(choices=list(workspace.loras()), value=[], multiselect=True,
                                            label="LoRAs (checkpoints/loras/)", elem_id="tune-loras",
                                            allow_custom_value=True)  # unknown names get our one-line message
                        lora_scale = gr.Slider(0, 2, 1.0, step=0.05, label="LoRA scale")
                    prompt = gr.Textbox(label="What the clip shows", placeholder="a man is skiing", elem_id="prompt")
                    preset = gr.Radio(list(PRESETS), value="quick", label="Preset",
                                      info="quick: a short look; paper: the original's 24 frames, 500 steps")
                    quick = PRESETS["quick"]
                    with gr.Accordion("Settings", open=False, elem_id="tune-settings"):
                        with gr.Row():
                            steps = gr.Number(quick["max_train_steps"], label="Steps", precision=0, minimum=1)
                            frames = gr.Number(quick["n_sample_frames"], label="Frames", precision=0, minimum=1)
                            stride = gr.Number(quick["sample_frame_rate"], label="Stride",
                                               info="take every n-th frame", precision=0, minimum=1)
                            start = gr.Number(quick["sample_start_idx"], label="Start frame", precision=0, minimum=0)
                        with gr.Row():  # a row of its own: beside two fields its label wrapped onto three lines
                            size = gr.Slider(64, 1024, quick["size"], step=64, label="Size (long side, px)")
                        with gr.Row():
                            learning_rate = gr.Number(quick["learning_rate"], label="Learning rate")
                            seed = gr.Number(quick["seed"], label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                        with gr.Row():
                            sample_prompt = gr.Textbox(label="Sample prompt", placeholder="(the clip's prompt)")
                            sample_steps = gr.Number(quick["sample_steps"], label="Sample steps", precision=0,
                                                     minimum=1)
                            sample_every = gr.Number(quick["validation_steps"], label="Sample every (steps)",
                                                     precision=0, minimum=1)
                    with gr.Row():
                        tune_button = gr.Button("Tune", variant="primary", elem_id="tune-button")
                        tune_stop = gr.Button("Stop", elem_id="tune-stop")
                        tune_resume = gr.Button("Resume", elem_id="tune-resume")
                with gr.Column():
                    tune_job = gr.Dropdown(label="Tuning job", allow_custom_value=True, elem_id="tune-job")
                    tune_status = gr.Markdown("No job yet.", elem_id="tune-status", elem_classes="status-box")
                    with gr.Row():
                        tune_loss = gr.LinePlot(x="step", y="loss", label="Loss", show_label=True, height=200,
                                                x_axis_format="d", y_axis_format=".3~g", elem_id="tune-loss")
                        tune_lr = gr.LinePlot(x="step", y="learning rate", label="Learning rate", show_label=True,
                                              height=200, x_axis_format="d", y_axis_format=".2~e",
                                              elem_id="tune-lr")
                    tune_sample = gr.Video(label="Newest validation sample", interactive=False,
                                           elem_id="tune-sample", loop=True, height=320)
                    tune_samples = gr.Markdown(elem_id="tune-samples")
                    with gr.Accordion("Log", open=False):
                        tune_log = gr.Textbox(show_label=False, lines=12, max_lines=12, interactive=False)
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    run = gr.Dropdown(label="Tuned run", allow_custom_value=True, elem_id="edit-run")
                    edit_note = gr.Markdown(NOISE_NOTE, visible=False)
                    prompts = gr.Textbox(label="New prompts, one per line", lines=3, elem_id="edit-prompts",
                                         placeholder="spider man is skiing on the beach, cartoon style")
                    with gr.Row():
                        edit_steps = gr.Number(EditRequest.num_inference_steps, label="Steps", precision=0, minimum=1)
                        inv_steps = gr.Number(EditRequest.num_inv_steps, label="Inversion steps", precision=0, minimum=1)
                        guidance = gr.Number(GUIDANCE_SCALE, label="Guidance scale",
                                             info=f"{LOCAL_GUIDANCE_SCALE:g} (Video-P2P's) with a local edit")
                        edit_seed = gr.Number(None, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    span = gr.Radio(list(SPAN_MODES), value=SPAN_MODES[0], label="Span of the clip")
                    with gr.Row():
                        span_start = gr.Number(0, label="from (s)", minimum=0)
                        span_end = gr.Number(0, label="to (s)", info="0: to the end", minimum=0)
                        edit_stride = gr.Number(None, label="Stride", info="source frames per edited frame",
                                                precision=0, minimum=1)
                    with gr.Accordion("Local edit", open=False, elem_id="edit-local"):
                        local_on = gr.Checkbox(False, label="Local edit: keep the clip, change only what the prompts "
                                               "change (Video-P2P's attention control)", elem_id="local-on")
                        with gr.Row():
                            control = gr.Radio(list(CONTROLS), value=LOCAL.control,
                                               label="Control", info="replace: swap words one for one (as many "
                                               "words as the source prompt); refine: add or change words")
                            inversion = gr.Radio(sorted(INVERSIONS), value="ddim", label="Inversion",
                                                 info="ddim: fast, the app's default; null-text: Video-P2P's, "
                                                 "closer to the clip, about 10 times the time (steps must equal "
                                                 "inversion steps)")
                        source_prompt = gr.Textbox(label="Source prompt", elem_id="local-source",
                                                   info="what the clip shows (the run's tuned prompt); each new "
                                                   "prompt changes its words")
                        with gr.Row():
                            blend = gr.Textbox(label="Blend word(s)", placeholder="ball  or  ball:cat",
                                               elem_id="local-blend", info="WORD, or SOURCE:TARGET: change only "
                                               "where it is (empty: the whole frame)")
                            reweight = gr.Textbox(label="Reweight", lines=2, placeholder="red=2",
                                                  info="WORD=FACTOR, one a line: more (or less) of a new word")
                        with gr.Accordion("Steps and mask", open=False), gr.Row():
                            cross_steps = gr.Number(LOCAL.cross_replace_steps, label="Cross-replace steps",
                                                    info="fraction of the steps with the source's words")
                            self_steps = gr.Number(LOCAL.self_replace_steps, label="Self-replace steps",
                                                   info="fraction with the source's temporal attention")
                            blend_start = gr.Number(LOCAL.blend_start, label="Blend start",
                                                    info="fraction of the steps before the blend")
                            threshold = gr.Number(LOCAL.mask_threshold, label="Mask threshold",
                                                  info="in (0, 1): of the blend word's peak attention")
                    with gr.Accordion("Structure", open=False, elem_id="edit-structure"):
                        gr.Markdown("A ControlNet keeps the clip's shapes and motion: it follows each frame's "
                                    "edges (canny) or depth, made from the clip. Download them with "
                                    "`./download_models.sh --controlnet canny` (or `depth`).")
                        with gr.Row():
                            controlnet = gr.Dropdown([RUN_CONTROLNET, NO_CONTROLNET, *workspace.controlnets()],
                                                     value=RUN_CONTROLNET, label="ControlNet (checkpoints/)",
                                                     elem_id="edit-controlnet", allow_custom_value=True)
                            condition = gr.Radio(list(CONDITIONS), value=CONDITIONS[0], label="Condition",
                                                 info="canny: edges; depth: needs the depth estimator downloaded")
                            controlnet_scale = gr.Number(1.0, label="ControlNet scale", minimum=0,
                                                         info="1.0: as ControlNets are trained")
                    with gr.Row():
                        edit_loras = gr.Dropdown(choices=list(workspace.loras()), value=[], multiselect=True,
                                                 label="LoRAs (checkpoints/loras/)", elem_id="edit-loras",
                                                 info="fused on top of the run's model", allow_custom_value=True)
                        edit_lora_scale = gr.Slider(0, 2, 1.0, step=0.05, label="LoRA scale")
                    with gr.Row():
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                        edit_stop = gr.Button("Stop", elem_id="edit-stop")
                with gr.Column():
                    edit_job = gr.Dropdown(label="Editing job", allow_custom_value=True, elem_id="edit-job")
                    edit_status = gr.Markdown("No job yet.", elem_id="edit-status", elem_classes="status-box")
                    with gr.Row():
                        edit_video = gr.Video(label="Edited (with the clip's sound)", interactive=False,
                                              elem_id="edit-video", height=320)
                        edit_mask = gr.Video(label="Blend mask (red, over the source)", interactive=False,
                                             elem_id="edit-mask", height=320, visible=False)
                        edit_condition = gr.Video(label="Condition (what the ControlNet follows)", interactive=False,
                                                  elem_id="edit-condition", height=320, visible=False)
                    edit_side = gr.Video(label="Side by side", interactive=False, elem_id="edit-side", height=240)
                    edit_inversion = gr.Video(label="Inversion (the clip as the source branch recovers it)",
                                              interactive=False, elem_id="edit-inversion", height=240,
                                              visible=False)
                    edit_files = gr.File(label="Downloads (MP4, GIF)", file_count="multiple", interactive=False,
                                         elem_id="edit-files")
                    edit_figures = gr.Markdown(visible=False, elem_id="edit-figures")
        shown = gr.State({})
        timer = gr.Timer(1.0)

        base_model.change(base_note, base_model, tune_note, api_visibility="private")
        preset.change(apply_preset, preset, [steps, frames, stride, start, size, learning_rate, seed, sample_steps,
                                             sample_every], api_visibility="private")
        tune_button.click(submit_tune, [video, clip, base_model, prompt, steps, frames, stride, start, size,
                                        learning_rate, seed, sample_prompt, sample_steps, sample_every, loras,
                                        lora_scale],
                          [tune_job, tune_status], api_name="tune")
        video.upload(check_upload, video, None, api_visibility="private")
        tune_stop.click(stop, tune_job, tune_status, api_name="stop")
        tune_resume.click(resume, tune_job, [tune_job, tune_status], api_name="resume")
        local_on.change(lambda on: LOCAL_GUIDANCE_SCALE if on else GUIDANCE_SCALE, local_on, guidance,
                        api_visibility="private")
        run.change(run_settings, run, [edit_steps, inv_steps, edit_seed, edit_stride, source_prompt, edit_note],
                   api_visibility="private")
        edit_button.click(submit_edit, [run, prompts, edit_steps, inv_steps, guidance, edit_seed, span, span_start,
                                        span_end, edit_stride, local_on, control, inversion, cross_steps,
                                        self_steps, blend_start, threshold, source_prompt, blend, reweight,
                                        controlnet, condition, controlnet_scale, edit_loras, edit_lora_scale],
                          [edit_job, edit_status], api_name="edit")
        edit_stop.click(stop, edit_job, edit_status, api_name="stop_edit")
        edit_job.change(edit_result, edit_job, [edit_video, edit_mask, edit_side, edit_inversion, edit_condition,
                                                edit_files, edit_figures],
                        api_name="edit_result")
        gr.api(job, api_name="job", concurrency_limit=None)
        gr.api(finished_runs, api_name="runs", concurrency_limit=None)
        redraw = dict(fn=refresh, inputs=[tune_job, edit_job, run, shown],
                      outputs=[queue_box, tune_job, tune_status, tune_sample, tune_loss, tune_lr, tune_samples,
                               tune_log, edit_job, edit_status, edit_video, edit_mask, edit_side, edit_inversion,
                               edit_condition, edit_files, edit_figures, run, shown],
                      api_visibility="private", show_progress="hidden", concurrency_limit=None)
        timer.tick(**redraw)
        demo.load(**redraw)
        demo.load(base_note, base_model, tune_note, api_visibility="private")
        tune_job.change(**redraw)
    return demo


def launch(workspace: Workspace, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           quiet: bool = False) -> tuple[gr.Blocks, JobRunner]:
    """Serve the app on host:port (never a public share link). Writes the tiny random base model first when
    `workspace.checkpoints` holds no Stable Diffusion model.

    With `block`, returns after Ctrl-C (or SIGTERM), having stopped the running job (it saves a checkpoint) and
    closed the server; otherwise returns at once with the server and runner running (tests close both).
    """
    workspace.root.mkdir(parents=True, exist_ok=True)
    made = workspace.ensure_base_model()
    if made is not None and not quiet:
        print(f"no Stable Diffusion model in {workspace.checkpoints}: wrote the tiny random one to {made} "
              "(random weights give noise, not pictures)")
    runner = JobRunner(workspace.root, cwd=workspace.repo).start()
    demo = build_app(runner, workspace)
    demo.queue(default_concurrency_limit=None)
    if block and threading.current_thread() is threading.main_thread():
        # `kill <pid>` stops like Ctrl-C: the server is closed and the running job gets its SIGINT below
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # quiet: Gradio's own lines ("To create a public link, set share=True", its Ctrl-C note) are not ours to say
        demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                    max_file_size=workspace.max_upload_bytes, allowed_paths=[str(workspace.root.resolve())],
                    show_error=False, css=CSS, head=HEAD)
    except BaseException:
        runner.shutdown()
        raise
    reach = "this machine only" if host in ("127.0.0.1", "localhost") else f"on {host}: other machines reach it"
    listening = f"the app is at {demo.local_url} ({reach}; never a public link); Ctrl-C stops it"
    if not block:
        if not quiet:
            print(listening, flush=True)
        return demo, runner
    try:  # from the line on: a Ctrl-C right after it must close the server too, or its thread keeps the process
        if not quiet:
            print(listening, flush=True)
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        demo.close(verbose=False)
        runner.shutdown()
    return demo, runner
