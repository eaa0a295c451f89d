"""The web app (`app.py`, `tuneavideo.app.page`) end to end through `gradio_client`, on the tiny random model.

One app serves the module, its jobs under a temporary root. The main story tunes the sample clip, is stopped with a
checkpoint while a second job waits in the queue, resumes, and edits the run; the edit's MP4 is downloaded through
the app and decoded. Bad input must come back as a one-line message, with nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import gradio
import gradio_client
import httpx
import huggingface_hub
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import inference
from tests.helpers import (  # the sample clip: 48 frames at 24 fps, 256x256, with sound
    SAMPLE_CLIP,
    marker_corner,
    marker_frames,
    probe,
    small_disk,
    write_frames_mp4,
    write_phone_clip,
)
from tuneavideo.app.page import Refusals, history_plot, launch, log_tail, page_words, status_markdown, uploaded_clip
from tuneavideo.config import load_config
from tuneavideo.errors import UserError
from tuneavideo.evaluate import CLIP_MODEL, PICKSCORE_MODEL, PICKSCORE_PROCESSOR
from tuneavideo.request import EditRequest, LocalEdit
from tuneavideo.app.jobs import FINISHED, Job, JobRunner
from tuneavideo.video.readers import Clip
from tuneavideo.video.writers import write_mp4
from tuneavideo.app.workspace import REPO, Workspace, edit_command, is_random_model, metrics_markdown

pytestmark = pytest.mark.e2e  # the app serves, and runs the tools as processes

MAX_UPLOAD_BYTES = 1_000_000
MAX_CLIP_SECONDS = 3.0
# every tuning job here: 4 frames (every 3rd: 8 fps), 64x64, validation with 2 DDIM steps
TINY_TUNE = dict(frames=4, stride=3, start=0, size=64, learning_rate=3e-5, seed=33, sample_prompt="", sample_steps=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(root: Path, checkpoints: Path, data: Path = REPO / "data") -> Iterator[tuple[str, JobRunner]]:
    """The app on a free local port, its jobs under `root`; stopped, with its jobs, on exit."""
    workspace = Workspace(root=root, checkpoints=checkpoints, data=data, max_upload_bytes=MAX_UPLOAD_BYTES,
                          max_clip_seconds=MAX_CLIP_SECONDS)
    port = free_port()
    demo, runner = launch(workspace, port=port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", runner
    finally:
        runner.shutdown(timeout=30)
        demo.close()


def wait_for(client: Client, job_id: str, done: Callable[[dict], bool], timeout: float = 120) -> dict:
    """Poll the app's /job endpoint until `done(info)`; fails with the last state after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.predict(job_id, api_name="/job")
        if done(info):
            return info
        if info["status"] in ("done", "failed", "stopped", "cancelled") or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never got there: {info}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The app with an empty checkpoints folder (so it writes the tiny model) and a gradio_client on it."""
    root, checkpoints = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("checkpoints")
    with serve_app(root, checkpoints) as (url, runner):
        client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        yield SimpleNamespace(client=client, root=root, checkpoints=checkpoints, runner=runner)


def tune(client: Client, **settings) -> tuple[str, str]:
    """Submit a tuning job through the Tune button's endpoint; returns its id and the status line shown."""
    job_id, status = client.predict(**{"video": None, "clip": "", "prompt": "a ball is moving", **TINY_TUNE,
                                       **settings}, api_name="/tune")
    assert job_id in status
    return job_id, status


def test_app_py_says_in_its_own_line_where_it_listens_and_stops_quietly(tmp_path):
    port = free_port()
    command = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--root", str(tmp_path / "outputs"),
               "--checkpoints", str(tmp_path / "checkpoints")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline().strip(), process.stdout.readline().strip()]
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200  # it listens once it says so
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[0]
    assert lines[0].startswith(f"no Stable Diffusion model in {tmp_path / 'checkpoints'}: wrote the tiny random one")
    assert lines[1] == (f"the app is at http://127.0.0.1:{port}/ (this machine only; never a public link); "
                        "Ctrl-C stops it")
    assert rest.strip() == "" and process.returncode == 0  # not Gradio's "share=True" or Ctrl-C lines


def test_without_a_base_model_the_app_writes_the_tiny_random_one(app):
    assert [path.name for path in app.checkpoints.iterdir()] == ["tiny-sd"]
    assert is_random_model(app.checkpoints / "tiny-sd")


def test_tune_stop_resume_and_edit_with_sound(app):
    client, root = app.client, app.root
    # 6 steps: a Stop sent once step 1 is seen lands well before the end, on a slow machine or a fast one
    first, _ = tune(client, video=handle_file(SAMPLE_CLIP), steps=6, sample_every=6)
    running = wait_for(client, first, lambda info: info["status"] == "running")
    assert running["position"] is None

    # one job at a time: a second one waits, reports its place, and can be taken off the queue
    second, status = tune(client, clip="sample.mp4", steps=1, sample_every=1)
    assert "waiting in the queue, position 1 (next to start)" in status
    waiting = client.predict(second, api_name="/job")
    assert (waiting["status"], waiting["position"]) == ("queued", 1)
    assert "taken off the queue" in client.predict(second, api_name="/stop")
    assert client.predict(second, api_name="/job")["status"] == "cancelled"
    assert not (root / second / "log.txt").exists()  # it never started

    # progress while it runs (the run's progress.json), then Stop: a checkpoint after the current step
    progress = wait_for(client, first, lambda info: (info["progress"] or {}).get("step", 0) >= 1)["progress"]
    assert (progress["state"], progress["total"], progress["learning_rate"]) == ("running", 6, 3e-5)
    assert progress["loss"] > 0 and progress["seconds_per_step"] > 0 and progress["eta_seconds"] >= 0
    client.predict(first, api_name="/stop")
    stopped = wait_for(client, first, lambda info: info["status"] == "stopped")
    assert stopped["checkpoints"] and not stopped["finished_run"]
    saved_at = int(stopped["checkpoints"][-1].split("-")[1])
    assert 1 <= saved_at < 6
    # the message is the training's own note in progress.json, not a line of its output
    assert stopped["message"] == f"saved checkpoint-{saved_at}; continue with resume_from_checkpoint=latest"
    assert (stopped["progress"]["state"], stopped["progress"]["step"]) == ("stopped", saved_at)

    # Resume continues from that checkpoint to the end
    job_id, status = client.predict(first, api_name="/resume")
    assert job_id == first
    done = wait_for(client, first, lambda info: info["status"] == "done")
    assert done["finished_run"] and (done["progress"]["step"], done["progress"]["total"]) == (6, 6)
    assert done["progress"]["state"] == "finished"
    assert f"resuming from {root / first / f'checkpoint-{saved_at}'}" in (root / first / "log.txt").read_text()
    samples = root / first / "samples"
    assert done["sample"] == str(samples / "sample-6" / "a ball is moving.mp4")
    assert done["run_folder"] == str(root / first)
    assert done["samples"] == [str(samples / name) for name in ("sample-6/a ball is moving.gif",
                                                                "sample-6/a ball is moving.mp4", "sample-6.gif")]
    # one [step, loss, learning rate] a step, those before the stop kept by the resumed run
    history = done["progress"]["history"]
    assert [entry[0] for entry in history] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(loss) and loss > 0 and lr == 3e-5 for _, loss, lr in history)
    assert history[-1][1] == done["progress"]["loss"]
    # the finished job's line names the run folder and links the newest sample, which the app serves
    status = status_markdown(app.runner, app.runner.get(first))
    link = f"gradio_api/file={quote(done['sample'])}"
    assert f"Run folder: `{root / first}`; newest sample: [sample-6/a ball is moving.mp4]({link})" in status
    assert httpx.get(f"{client.src}{link}").content == Path(done["sample"]).read_bytes()
    assert client.predict(api_name="/runs") == [first]
    # the upload is stored under a generated name, in the run's generated folder
    assert (root / first / "source.mp4").read_bytes() == SAMPLE_CLIP.read_bytes()

    edit_id, _ = client.predict(run=first, prompts="a red ball is moving\n\na cat, cartoon style", steps=2,
                                inv_steps=2, guidance_scale=7.5, seed=None, span="tuned window", span_start=0,
                                span_end=0, stride=None, api_name="/edit")
    edited = wait_for(client, edit_id, lambda info: info["status"] == "done", timeout=60)
    # the edit's own progress file, as the API reports it: every window-step done
    assert edited["progress"]["phase"] == "done" and edited["progress"]["done"] == edited["progress"]["total"] > 0
    assert [Path(path).name for path in edited["outputs"]["videos"]] == ["a red ball is moving.mp4",
                                                                         "a cat, cartoon style.mp4"]
    video, mask, side_by_side, inversion, condition, downloads, figures = client.predict(edit_id,
                                                                                         api_name="/edit_result")
    assert (mask, inversion, condition) == (None, None, None)  # a plain edit has none of them
    assert sorted(Path(path).name for path in downloads) == sorted(
        ["a red ball is moving.mp4", "a cat, cartoon style.mp4", "a red ball is moving.gif",
         "a cat, cartoon style.gif", "a red ball is moving+a cat, cartoon style.side-by-side.mp4"])
    fps = Fraction(24, 3)
    for path, width in ((video, 64), (side_by_side, 3 * 64)):  # the side-by-side: the source, then each edit
        assert not Path(path).is_relative_to(root)  # downloaded through the app, not read from its folder
        info = probe(Path(path))
        assert (info["frames"], info["size"], info["fps"], info["codec"]) == (4, (width, 64), fps, "h264")
        assert info["audio_seconds"] == pytest.approx(4 / fps, abs=float(1 / fps))

    # the state lives on disk: a new runner over the same root finds every job as it ended
    reopened = JobRunner(root, cwd=REPO).start()
    try:
        found = {job.id: job.status for job in reopened.jobs()}
        assert found == {first: "done", second: "cancelled", edit_id: "done"}
    finally:
        reopened.shutdown()


def assert_refused(client: Client, settings: dict, message: str) -> None:
    """The endpoint call of `settings` is refused with one line holding `message`."""
    with pytest.raises(AppError) as raised:
        client.predict(**settings)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def run_copy(tuned_run: Path, run: Path) -> Path:
    """A copy of the tuned run (tuned on "a ball is moving") at `run`, without its edits."""
    return shutil.copytree(tuned_run, run, ignore=shutil.ignore_patterns("edits"))


def test_a_local_edit_shows_its_blend_mask_and_inversion(app, tuned_run):
    client, root = app.client, app.root
    run = root / "local-run"
    run_copy(tuned_run, run)
    edit = dict(run=run.name, prompts="a red ball is moving", steps=2, inv_steps=2, guidance_scale=None, seed=None,
                span="tuned window", span_start=0, span_end=0, stride=None, local=True, blend="ball",
                api_name="/edit")  # inversion: ddim, the app's default
    # the edit's own checks, before anything is written or a model loads
    # in the page's words: its fields' names, not the command line's options or the request's fields
    for settings, message in ((dict(blend="cat"), "Blend word(s) source word 'cat' is not a word of the prompt"),
                              (dict(control="replace"), 'the source prompt has 4 words and the target 5: use '
                                                        '"refine" under Control'),
                              (dict(reweight="red"), "Reweight 'red': give WORD=FACTOR"),
                              (dict(local=False), "Blend word(s) and Reweight are for a local edit: tick Local edit")):
        assert_refused(client, {**edit, **settings}, message)
    assert not (run / "edits").exists()

    edit_id, _ = client.predict(**edit)
    done = wait_for(client, edit_id, lambda info: info["status"] == "done", timeout=120)
    assert [Path(path).name for path in done["outputs"]["masks"]] == ["a red ball is moving.mask.mp4"]
    assert [Path(path).name for path in done["outputs"]["inversion"]] == ["a red ball is moving.inversion.mp4"]
    video, mask, _, inversion, _, downloads, _ = client.predict(edit_id, api_name="/edit_result")
    assert {"a red ball is moving.mask.mp4", "a red ball is moving.inversion.mp4"} <= {Path(p).name for p in downloads}
    for path in (video, mask, inversion):  # downloaded through the app; 4 frames of 64x64 at 8 fps
        info = probe(Path(path))
        assert (info["frames"], info["size"], info["fps"], info["codec"]) == (4, (64, 64), Fraction(8), "h264")


def test_a_guided_edit_takes_a_controlnet_of_checkpoints_by_name_and_shows_its_condition(app, tuned_run,
                                                                                          tiny_controlnet_path):
    client, root = app.client, app.root
    run = root / "guided-run"
    run_copy(tuned_run, run)
    shutil.copytree(tiny_controlnet_path, app.checkpoints / "tiny-canny")
    edit = dict(run=run.name, prompts="a red ball is moving", steps=2, inv_steps=2, guidance_scale=None, seed=None,
                span="tuned window", span_start=0, span_end=0, stride=None, controlnet="tiny-canny",
                condition="canny", controlnet_scale=0.8, api_name="/edit")
    # names of checkpoints/ only: a path from the page, or a condition file, never reaches the edit
    for settings, message in ((dict(controlnet=str(tiny_controlnet_path)), "there is no ControlNet"),
                              (dict(controlnet="../tiny-canny"), "there is no ControlNet '../tiny-canny'"),
                              (dict(condition=str(SAMPLE_CLIP)), "is not in the list of choices: ['canny', 'depth']")):
        assert_refused(client, {**edit, **settings}, message)
    assert not (run / "edits").exists()

    edit_id, _ = client.predict(**edit)
    done = wait_for(client, edit_id, lambda info: info["status"] == "done", timeout=120)
    assert [Path(path).name for path in done["outputs"]["condition"]] == ["a red ball is moving.condition.mp4"]
    assert json.loads((Path(done["outputs"]["videos"][0]).parent / "request.json").read_text())["controlnets"] == [
        {"model": str(app.checkpoints / "tiny-canny"), "condition": "canny", "scale": 0.8}]
    video, _, _, _, condition, downloads, _ = client.predict(edit_id, api_name="/edit_result")
    assert "a red ball is moving.condition.mp4" in {Path(path).name for path in downloads}
    for path in (video, condition):  # downloaded through the app; 4 frames of 64x64 at 8 fps
        info = probe(Path(path))
        assert (info["frames"], info["size"], info["fps"], info["codec"]) == (4, (64, 64), Fraction(8), "h264")


def test_a_portrait_phone_clip_is_tuned_and_edited_upright(app, tmp_path):
    # stored 64x48 with a display rotation: shown 48x64, the red square in the top-right corner
    stored = write_frames_mp4(tmp_path / "stored.mp4", marker_frames(8, 64, 48), 8)
    phone = write_phone_clip(tmp_path / "phone.mp4", stored, -90)
    run, _ = tune(app.client, video=handle_file(phone), frames=4, stride=2, steps=1, sample_every=1)
    tuned = wait_for(app.client, run, lambda info: info["status"] == "done")
    assert probe(Path(tuned["sample"]))["size"] == (48, 64)
    edit_id, _ = app.client.predict(run=run, prompts="a blue square", steps=2, inv_steps=2, guidance_scale=7.5,
                                    seed=None, span="tuned window", span_start=0, span_end=0, stride=None,
                                    api_name="/edit")
    wait_for(app.client, edit_id, lambda info: info["status"] == "done", timeout=60)
    video, _, side_by_side, _, _, _, _ = app.client.predict(edit_id, api_name="/edit_result")
    assert probe(Path(video))["size"] == (48, 64)
    source = Clip(side_by_side).read([0])[0, :, :48]
    assert source.shape == (64, 48, 3) and marker_corner(source) == "top-right"


@pytest.mark.parametrize(("message", "page"), [
    # the command line's options
    ("the source prompt has 4 words and the target 5: use --control refine", 'the source prompt has 4 words and the '
     'target 5: use "refine" under Control'),
    ("--inversion null-text gives one embedding per inversion step: give --num-inference-steps equal to "
     "--num-inv-steps (2 != 3), or use --inversion ddim", '"null-text" under Inversion gives one embedding per '
     'inversion step: give Steps equal to Inversion steps (2 != 3), or use "ddim" under Inversion'),
    # the pipelines' parameter names
    ("control 'replace' swaps words one for one, but the source prompt has 4 words and the target 5: use control "
     "'refine'", '"replace" under Control swaps words one for one, but the source prompt has 4 words and the target '
     '5: use "refine" under Control'),
    ("null-text inversion gives one embedding per inversion step: num_inference_steps must equal num_inv_steps "
     "(2 != 3), or use inversion='ddim'", "null-text inversion gives one embedding per inversion step: Steps must "
     'equal Inversion steps (2 != 3), or use "ddim" under Inversion'),
    ("blend source word 'cat' is not a word of the prompt 'a ball'", "Blend word(s) source word 'cat' is not a word "
     "of the prompt 'a ball'"),
    ("give at least one non-empty --prompt", "give at least one non-empty New prompts"),
    ("reweight 'red': give WORD=FACTOR, e.g. origami=2", "Reweight 'red': give WORD=FACTOR, e.g. origami=2"),
    ("`span` '9:': START must be before END", "Span of the clip '9:': START must be before END"),
    # words that are the message's own, and settings the page does not have, stay as they are
    ("the prompt has 80 tokens; attention control needs at most 75: shorten it",
     "the prompt has 80 tokens; attention control needs at most 75: shorten it"),
    ("--window 4 and resume_from_checkpoint=latest", "--window 4 and resume_from_checkpoint=latest"),
])
def test_messages_speak_the_page_s_words(message, page):
    assert page_words(message) == page


def test_a_refused_job_s_message_stays_in_its_page_s_status_until_it_starts_one():
    refusals = Refusals()
    error = refusals.refuse("page 1", "edit", UserError("blend 'x:y:z': give WORD or SOURCE_WORD:TARGET_WORD"))
    assert error.message == "Blend word(s) 'x:y:z': give WORD or SOURCE_WORD:TARGET_WORD"
    for _ in range(2):  # every redraw
        assert refusals.status("page 1", "edit", "**edit `e1`**: done.") == f"**Not started:** {error.message}"
    assert refusals.status("page 1", "tune", "No job yet.") == "No job yet."  # the other tab
    assert refusals.status("page 2", "edit", "No job yet.") == "No job yet."  # another page
    refusals.started("page 1", "edit")
    assert refusals.status("page 1", "edit", "**edit `e2`**: editing") == "**edit `e2`**: editing"


@pytest.mark.parametrize(("steps", "total", "x_lim"), [(2, 2, [0, 20]), (6, 500, [0, 500])])
def test_the_charts_span_the_run_and_at_least_twenty_steps(steps, total, x_lim):
    from tuneavideo.run import Progress

    progress = Progress(state="running", step=steps, total=total,
                        history=[[step, 1.0, 3e-5] for step in range(1, steps + 1)])
    update = history_plot(progress)
    # the axis's ticks (about one per 40 px of a chart) fall on whole steps, not "1, 2, 2" for a 2-step run
    assert update["x_lim"] == x_lim and list(update["value"]["step"]) == list(range(1, steps + 1))
    assert history_plot(None)["value"] is None


def test_a_running_edit_shows_its_phase_window_steps_and_eta(tmp_path):
    from tuneavideo.edit_progress import EditProgressWriter

    job = Job(id="edit-1", kind="edit", folder=tmp_path, command=[], run="run", status="running",
              started=time.time() - 7)
    runner = SimpleNamespace()  # a running job's line asks the runner nothing
    assert status_markdown(runner, job) == "**edit `edit-1`**: starting (loading the model)… (elapsed 0:07)"
    with EditProgressWriter(tmp_path / "a cat.progress.json") as report:  # what the edit process writes
        assert status_markdown(runner, job).startswith("**edit `edit-1`**: starting (loading the model)…")
        report.start(40)
        report.phase("editing")
        report.step(12)
        report.phase("editing")  # written
        line = status_markdown(runner, job)
        assert line.startswith("**edit `edit-1`**: editing · 12 / 40 window-steps · ETA 0:")
        assert line.endswith("(elapsed 0:07)")
        job.stop_requested = True
        assert status_markdown(runner, job).endswith("· stopping after this step…")


def test_the_log_shows_each_bar_s_newest_line(tmp_path):
    job = Job(id="run", kind="tune", folder=tmp_path, command=[], run="run")
    job.log.write_text("loading the base model m\n"
                       "Steps:   0%|          | 0/4 [00:00<?, ?it/s]\n"
                       "Steps:  50%|#####     | 2/4 [00:20<00:20, 10.0s/it, loss=1.2]\n"
                       "Validation at step 2:   0%|          | 0/4 [00:00<?, ?it/s]\n"
                       "Validation at step 2: 100%|##########| 4/4 [00:08<00:00, 2.0s/it]\n"
                       "wrote the samples of step 2 to s\n"
                       "Steps:  75%|#######5  | 3/4 [00:40<00:10, 10.0s/it, loss=1.1]\n"
                       "Steps: 100%|##########| 4/4 [00:50<00:00, 10.0s/it, loss=1.0]\n"
                       "Loading pipeline components:  20%|##  | 1/5\rLoading pipeline components: 100%|####| 5/5\n")
    assert log_tail(job).splitlines() == [
        "loading the base model m", "Steps:  50%|#####     | 2/4 [00:20<00:20, 10.0s/it, loss=1.2]",
        "Validation at step 2: 100%|##########| 4/4 [00:08<00:00, 2.0s/it]", "wrote the samples of step 2 to s",
        "Steps: 100%|##########| 4/4 [00:50<00:00, 10.0s/it, loss=1.0]",
        "Loading pipeline components: 100%|####| 5/5"]


def test_runs_are_listed_the_newest_to_finish_first(tmp_path):
    workspace = Workspace(root=tmp_path, checkpoints=tmp_path, data=tmp_path)
    for name, finished in (("b-later", 2000), ("a-earlier", 1000), ("c-last", 3000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").touch()
        os.utime(tmp_path / name / "model_index.json", (finished, finished))
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "a-earlier" / "edits").mkdir()  # an edit since does not make a run newer
    assert list(workspace.runs()) == ["c-last", "b-later", "a-earlier"]


def test_a_failed_tuning_shows_the_training_s_own_error(app):
    # a learning rate this large sends the weights to infinity in one step: the next loss is not finite
    job_id, _ = tune(app.client, clip="sample.mp4", steps=4, sample_every=4, learning_rate=1e30)
    failed = wait_for(app.client, job_id, lambda info: info["status"] == "failed")
    # progress.json's one-line error, without the CLI's "train_tuneavideo.py: error: " of the log's last line
    assert failed["message"].startswith("the loss became ") and "\n" not in failed["message"]
    assert (failed["progress"]["state"], failed["progress"]["message"]) == ("failed", failed["message"])
    assert status_markdown(app.runner, app.runner.get(job_id)).endswith(f"`{failed['message']}`")


@contextlib.contextmanager
def job_queue(root: Path) -> Iterator[tuple[JobRunner, Callable[[str, str], Job]]]:
    """A JobRunner over `root`, and a function that queues a job `name` running Python `code`, its folder
    `root/name`."""
    runner = JobRunner(root, cwd=root).start()

    def queue(name: str, code: str) -> Job:
        (root / name).mkdir(exist_ok=True)
        return runner.submit(Job(id=name, kind="edit", folder=root / name, command=[sys.executable, "-c", code],
                                 run="run"))

    try:
        yield runner, queue
    finally:
        runner.shutdown(timeout=10)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_job_whose_folder_was_deleted_fails_and_the_queue_goes_on(tmp_path):
    go = tmp_path / "go"
    with job_queue(tmp_path) as (runner, queue):
        queue("first", f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)")
        wait_until(lambda: runner.get("first").status == "running")
        queue("deleted", "print('never runs')")
        queue("last", "print('ran')")
        waiting = runner.get("last")  # a page's copy of the job, taken while it waits
        assert "position 2 (1 jobs ahead of it)" in status_markdown(runner, waiting)
        shutil.rmtree(tmp_path / "deleted")  # the user deleted a waiting job's folder
        go.touch()
        wait_until(lambda: runner.get("last").status in FINISHED)
        deleted = runner.get("deleted")
        assert deleted.status == "failed" and "No such file or directory" in deleted.message
        assert [runner.get(name).status for name in ("first", "last")] == ["done", "done"]
        assert status_markdown(runner, waiting) == "**edit `last`**: starting…"  # the copy is older than the queue


def test_a_job_that_fills_the_disk_fails_and_the_queue_goes_on(tmp_path):
    with small_disk(tmp_path / "disk", 64 * 1024) as folder, job_queue(folder) as (runner, queue):
        # the job itself succeeds, filling the disk; then its job.json cannot be written
        big = folder / "fills" / "big"
        queue("fills", f"try:\n    open({str(big)!r}, 'wb').write(bytes(1 << 20))\nexcept OSError:\n    pass")
        wait_until(lambda: runner.get("fills").status in FINISHED)
        big.unlink()  # room for the next job
        queue("next", "print('ran')")
        wait_until(lambda: runner.get("next").status in FINISHED)
        fills = runner.get("fills")
        assert fills.status == "failed" and "no space left on the disk" in fills.message
        assert runner.get("next").status == "done"


def make_clip(path: Path, seconds: float, fps: int = 8) -> Path:
    frames = np.zeros((int(seconds * fps), 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(len(frames))[:, None, None] * 8
    write_mp4(frames, path, fps)
    return path


def test_bad_input_gives_one_line_messages_and_writes_nothing(app, tmp_path):
    client, root = app.client, app.root
    before = sorted(root.iterdir())
    not_a_video = tmp_path / "holiday.mp4"
    not_a_video.write_text("this is not a video")
    too_large = tmp_path / "large.mp4"
    too_large.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    cases = [
        (dict(video=handle_file(not_a_video)), "the clip 'holiday.mp4': cannot be read as a video (Invalid data found "
                                               "when processing input); check that it plays in a video player"),
        (dict(video=handle_file(make_clip(tmp_path / "long.mp4", 4))), "the clip is 4.0 s long; the limit is 3 s"),
        (dict(video=handle_file(SAMPLE_CLIP), frames=40),
         "the clip 'sample.mp4': has 48 frames but n_sample_frames=40"),
        (dict(clip="../../etc/passwd"), "there is no clip '../../etc/passwd'"),
        (dict(video=handle_file(SAMPLE_CLIP), loras=["../../etc/passwd"]), "there is no LoRA '../../etc/passwd'"),
        (dict(video=handle_file(SAMPLE_CLIP), prompt="  "), "describe the clip in the prompt"),
        (dict(video=handle_file(SAMPLE_CLIP), steps=0), "Value 0 is less than minimum value 1"),  # gr.Number's check
    ]
    for settings, message in cases:
        with pytest.raises(AppError) as raised:
            tune(client, **{"steps": 1, "sample_every": 1, **settings})
        assert message in str(raised.value) and "\n" not in str(raised.value) and "Traceback" not in str(raised.value)
        assert "Errno" not in str(raised.value)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # Gradio's own limit (max_file_size)
        tune(client, video=handle_file(too_large), steps=1, sample_every=1)
    with too_large.open("rb") as file:  # which its server applies too, for clients that do not check first
        assert httpx.post(f"{client.src}gradio_api/upload", files={"files": file}).status_code == 413

    broken = root / "broken-run"  # looks finished, but its config cannot be read
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    (broken / "config.yaml").write_text("train_data: [unclosed")
    edit = dict(prompts="a cat", steps=2, inv_steps=2, guidance_scale=7.5, seed=None, span="tuned window",
                span_start=0, span_end=0, stride=None, api_name="/edit")
    for run, message in (("broken-run", "broken-run/config.yaml: invalid YAML.*re-run the training"),
                         ("../outside", "there is no finished run named '../outside'")):
        with pytest.raises(AppError, match=message) as raised:
            client.predict(run=run, **edit)
        assert "\n" not in str(raised.value)
    assert sorted(root.iterdir()) == sorted([*before, broken])
    assert not (broken / "edits").exists()


def test_the_edit_job_reads_the_whole_request_from_a_file(tmp_path):
    """The app hands its request to inference.py as a file, never as flags: every field arrives as it was set."""
    workspace = Workspace(root=tmp_path, checkpoints=tmp_path, data=tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").touch()
    (run / "model_index.json").touch()
    local = LocalEdit("replace", source_prompt="-a dog", blend_words=("dog", "cat"), reweights={"cat": 2.0, "-a": 0.5},
                      cross_replace_steps=0.1, self_replace_steps=0.25, blend_start=0.3, mask_threshold=0.45,
                      inversion="ddim", null_text_iterations=3)
    plain = EditRequest(prompts=["-a cat", "a dog"], negative_prompt="blur", seed=4, num_inference_steps=3,
                        guidance_scale=7.123456789, num_inv_steps=5, num_videos_per_prompt=2, eta=0.5,
                        span=(Fraction(3, 2), Fraction(9, 4)), stride=2, window=3, overlap=1,
                        output_dir=str(tmp_path / "out"), audio=False, evaluate=True, jpeg_frames=True, gif=False)
    requests = [plain, dataclasses.replace(plain, span=(None, None), local=local),
                dataclasses.replace(plain, span=(None, Fraction(1, 3)), local=LocalEdit())]
    for index, request in enumerate(requests):
        command = edit_command(workspace, run, request.save(tmp_path / f"request-{index}.json"))
        assert command[2:] == [f"--model={run}", f"--request={tmp_path / f'request-{index}.json'}"]
        assert inference.parse_args(command[2:]) == (run, request)
    (tmp_path / "bad.json").write_text('{"prompts": ["a cat"], "steps": 3}')
    with pytest.raises(UserError, match=r"bad.json: unknown field 'steps'; a request has prompts, "):
        inference.parse_args([f"--model={run}", f"--request={tmp_path / 'bad.json'}"])
    with pytest.raises(UserError, match="^--request holds every edit setting; leave out --seed$"):
        inference.parse_args([f"--model={run}", f"--request={tmp_path / 'request-0.json'}", "--seed=3"])


def test_edits_are_scored_when_the_scoring_models_are_there(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # this machine's cache left out
    workspace = Workspace(root=tmp_path, checkpoints=tmp_path, data=tmp_path, repo=tmp_path)
    assert not workspace.can_evaluate()
    # in the Hugging Face cache (where the edit job's hub ids find them)
    for hub_id, file in ((CLIP_MODEL, "config.json"), (PICKSCORE_MODEL, "config.json"),
                         (PICKSCORE_PROCESSOR, "preprocessor_config.json")):
        cached = hub / f"models--{hub_id.replace('/', '--')}"
        (cached / "snapshots" / "0").mkdir(parents=True)
        (cached / "snapshots" / "0" / file).write_text("{}")
        (cached / "refs").mkdir()
        (cached / "refs" / "main").write_text("0")
    assert workspace.can_evaluate()  # prepare_edit then asks for the figures (EditRequest.evaluate)
    shutil.rmtree(hub)
    for name in ("clip-vit-large-patch14", "PickScore_v1", "CLIP-ViT-H-14-laion2B-s32B-b79K"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert workspace.can_evaluate()
    figures = dict(num_frames=4, frame_consistency=91.5, frame_consistency_neighbours=95.0, text_alignment=27.25,
                   pickscore=20.125)
    (tmp_path / "metrics.json").write_text(json.dumps(
        [{"video": "a cat.mp4", "prompt": "a cat", **figures, "source": {**figures, "text_alignment": -3.5}}]))
    table = metrics_markdown(tmp_path / "metrics.json")
    assert "| a cat.mp4 | 91.50 | 27.25 | 20.12 |\n" in table and "| source | 91.50 | -3.50 | 20.12 |" in table
    (tmp_path / "metrics.json").write_text(json.dumps(  # a local edit's, with the PSNR outside its mask
        [{"video": "a cat.mp4", "prompt": "a cat", **figures, "psnr_outside_mask": 31.254, "source": figures}]))
    table = metrics_markdown(tmp_path / "metrics.json")
    assert "| a cat.mp4 | 91.50 | 27.25 | 20.12 | 31.25 dB |" in table
    assert "| source | 91.50 | 27.25 | 20.12 | - |" in table
    assert metrics_markdown(tmp_path / "missing.json") == ""


def test_a_folder_of_frames_in_data_is_a_clip_to_tune(tmp_path, tiny_sd):
    from PIL import Image

    from tuneavideo.app.workspace import PRESETS, TuneSettings, prepare_tune

    data = tmp_path / "data"
    frames = data / "dance"
    frames.mkdir(parents=True)
    for index in range(12):
        Image.new("RGB", (48, 48), (20 * index, 0, 0)).save(frames / f"{index:05d}.jpg")
    (data / "notes.txt").write_text("not a clip")
    workspace = Workspace(root=tmp_path / "outputs", checkpoints=tmp_path, data=data)
    assert list(workspace.clips()) == ["dance"]
    quick = {k: v for k, v in PRESETS["quick"].items() if k not in ("n_sample_frames", "sample_frame_rate", "size")}
    settings = TuneSettings(prompt="a red square", sample_prompt="", n_sample_frames=4, sample_frame_rate=2, size=64,
                            **quick)
    run, command = prepare_tune(workspace, tiny_sd, workspace.clips()["dance"], settings)
    config = load_config(run / "tune.yaml")
    assert Path(config.train_data.video_path) == (run / "source").resolve()
    assert sorted(p.name for p in (run / "source").iterdir()) == sorted(p.name for p in frames.iterdir())
    assert command[-1] == f"--config={run / 'tune.yaml'}"


def test_tune_reads_only_uploads_and_the_data_folder_s_clips(app, tmp_path, monkeypatch):
    client, root = app.client, app.root
    before = sorted(root.iterdir())
    outside = shutil.copy(SAMPLE_CLIP, tmp_path / "home-video.mp4")  # a video elsewhere on the machine
    (tmp_path / "notes.txt").write_text("not a video")
    refused = [outside, tmp_path / "missing.mp4", tmp_path / "notes.txt", tmp_path, f"{root}/../{outside.name}",
               REPO / "data" / ".." / "README.md", "/etc/hostname"]
    # a client that names a file of the server's machine instead of uploading one
    monkeypatch.setattr(gradio_client.client.Endpoint, "_upload_file", lambda self, data, data_index: data)

    def messages() -> set[str]:
        found = set()
        for path in refused:
            with pytest.raises(AppError) as raised:
                tune(client, video={"path": str(path), "meta": {"_type": "gradio.FileData"}}, steps=1,
                     sample_every=1)
            found.add(str(raised.value))
        return found

    assert len(messages()) == 1  # Gradio 6.31 refuses them itself, alike
    # the app does not rely on that: with Gradio's check off and the path handed over as named, it refuses every
    # path with one message, so no caller learns which files exist
    monkeypatch.setattr(gradio.processing_utils, "_check_allowed", lambda path, check_in_upload_folder: None)

    async def as_named(self, path):
        return str(path)

    monkeypatch.setattr(gradio.blocks.Block, "async_move_resource_to_block_cache", as_named)
    found = messages()
    assert len(found) == 1 and "the clip was not uploaded through this page" in found.pop()
    assert sorted(root.iterdir()) == before


def test_a_clip_of_the_data_folder_named_by_its_path_is_one_of_the_workspace_s(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    clip = shutil.copy(SAMPLE_CLIP, data / "sample.mp4")
    workspace = Workspace(root=tmp_path / "outputs", checkpoints=tmp_path, data=data)
    assert uploaded_clip(str(data / ".." / "data" / "sample.mp4"), workspace) == clip
    with pytest.raises(UserError, match="not uploaded through this page"):
        uploaded_clip(str(tmp_path / "other.mp4"), workspace)


def test_a_run_tuned_by_the_original_code_is_edited_in_the_app(app, tuned_run):
    from tests.helpers import write_as_diffusers_0_11

    run = write_as_diffusers_0_11(tuned_run, app.root / "original-run")
    edit_id, _ = app.client.predict(run=run.name, prompts="a red ball is moving", steps=2, inv_steps=2,
                                    guidance_scale=7.5, seed=None, span="tuned window", span_start=0, span_end=0,
                                    stride=None, api_name="/edit")
    done = wait_for(app.client, edit_id, lambda info: info["status"] == "done", timeout=120)
    video = done["outputs"]["videos"][0]
    assert Path(video).name == "a red ball is moving.mp4"
    assert (probe(Path(video))["frames"], probe(Path(video))["size"]) == (4, (64, 64))


def test_a_truncated_or_newer_progress_file_stops_no_reader_and_not_the_queue(app):
    client, runner = app.client, app.runner

    def tuning(name: str, progress: str, exit_code: int | str) -> str:
        """A tuning job whose process writes `progress` as its progress.json, then exits with `exit_code` (a
        message: printed, exit status 1)."""
        folder = app.root / name
        folder.mkdir()
        code = (f"import pathlib, sys, time\npathlib.Path({str(folder / 'progress.json')!r}).write_text("
                f"{progress!r}.replace('NOW', str(time.time())))\nsys.exit({exit_code!r})")
        runner.submit(Job(id=name, kind="tune", folder=folder, command=[sys.executable, "-c", code], run=name))
        return name

    truncated = tuning("truncated-progress", '{"state": "failed", "step": 1, "tot', "it broke")
    failed = wait_for(client, truncated, lambda info: info["status"] == "failed")  # /job reads it every call
    assert failed["progress"] is None and failed["message"] == "it broke"  # the log's last line, as without one
    assert status_markdown(runner, runner.get(truncated)).endswith("`it broke`")
    newer = tuning("newer-progress", json.dumps({"state": "finished", "step": 2, "total": 2, "loss": 0.5,
                                                 "updated": "NOW", "history": [[1, 0.7, 1e-4], [2, 0.5, 1e-4]],
                                                 "gpu_memory_gb": 3.5}).replace('"NOW"', "NOW"), 0)
    done = wait_for(client, newer, lambda info: info["status"] == "done")  # the worker went on
    assert (done["progress"]["step"], done["progress"]["loss"]) == (2, 0.5)
    assert "gpu_memory_gb" not in done["progress"] and "last loss 0.5" in status_markdown(runner, runner.get(newer))


def test_a_truncated_result_file_of_an_edit_fails_no_reader(app):
    client, runner = app.client, app.runner
    folder = app.root / "truncated-result" / "edits" / "edit-1"
    folder.mkdir(parents=True)
    code = f"import pathlib\npathlib.Path({str(folder / 'result.json')!r}).write_text('{{\"folder\": \"/x\", \"vid')"
    runner.submit(Job(id="edit-1", kind="edit", folder=folder, command=[sys.executable, "-c", code],
                      run="truncated-result"))
    done = wait_for(client, "edit-1", lambda info: info["status"] == "done")  # /job reads result.json
    assert done["outputs"] == {"videos": [], "gifs": [], "side_by_side": [], "masks": [], "inversion": [],
                               "condition": []}
    assert client.predict("edit-1", api_name="/edit_result")[:6] == (None,) * 6
    assert status_markdown(runner, runner.get("edit-1")).startswith("**edit `edit-1`**: done")
    assert (folder / "result.json").read_text() == '{"folder": "/x", "vid'  # read, never rewritten


def test_a_local_edit_of_a_run_with_a_damaged_tokenizer_is_one_line_and_leaves_no_folder(app, tuned_run):
    run = app.root / "damaged-tokenizer"
    run_copy(tuned_run, run)
    tokenizer = run / "tokenizer" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[: tokenizer.stat().st_size // 2])
    with pytest.raises(AppError) as raised:
        app.client.predict(run=run.name, prompts="a red ball is moving", steps=2, inv_steps=2, guidance_scale=None,
                           seed=None, span="tuned window", span_start=0, span_end=0, stride=None, local=True,
                           blend="ball", api_name="/edit")
    assert "the run's tokenizer cannot be loaded" in str(raised.value) and "\n" not in str(raised.value)
    assert not (run / "edits").exists()  # no empty edits/edit-* folder left


def test_the_seed_fields_take_at_most_2_32_minus_1(app):
    with pytest.raises(AppError, match="4294967295"):
        tune(app.client, clip="sample.mp4", steps=1, sample_every=1, seed=2**32)
    with pytest.raises(AppError, match="4294967295"):
        app.client.predict(run="any", prompts="a cat", steps=2, inv_steps=2, guidance_scale=7.5, seed=2**40,
                           span="tuned window", span_start=0, span_end=0, stride=None, api_name="/edit")
