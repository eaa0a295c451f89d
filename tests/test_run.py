"""The run folder (`tuneavideo.run`): its paths, whether it is finished, the inversion cache key and progress.json."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.helpers import SAMPLE_CLIP
from tuneavideo.errors import UserError
from tuneavideo.pipelines.windows import plan_windows
from tuneavideo.video.readers import Clip
from tuneavideo.run import HISTORY_LIMIT, PROGRESS_INTERVAL, Progress, ProgressWriter, Run, RunError, checkpoint_step


def test_every_path_of_a_run_folder(tmp_path):
    run = Run(str(tmp_path))  # a str is taken too
    assert run.folder == tmp_path and run == Run(tmp_path)
    expected = {
        run.config_file: "config.yaml", run.model_index: "model_index.json", run.progress_file: "progress.json",
        run.logs: "logs", run.tuned_parameters: "tuned_parameters.safetensors", run.edits: "edits",
        run.samples: "samples", run.sample_grid(4): "samples/sample-4.gif",
        run.sample(4, "a cat"): "samples/sample-4/a cat.mp4",
        run.sample(4, "a cat", "style", ".gif"): "samples/sample-4/style/a cat.gif",
        run.validation_latent(4): "inv_latents/ddim_latent-4.pt", run.checkpoint(4): "checkpoint-4",
    }
    for path, name in expected.items():
        assert path == tmp_path / name
    assert run.checkpoint_staging(4).parent == tmp_path and run.checkpoint_staging(4).name.startswith(".")


def test_sample_files_are_the_newest_step_s_first(tmp_path):
    run = Run(tmp_path)
    assert run.sample_files() == []
    written = [run.sample(9, "a cat"), run.sample(10, "a cat", suffix=".gif"), run.sample(10, "a cat"),
               run.sample(10, "a dog", "style"), run.sample_grid(10), run.sample_grid(9)]
    for path in [*written, run.samples / "sample-10" / ".a cat.0123.tmp.mp4", run.samples / "notes.txt"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert run.sample_files() == [run.samples / name for name in (
        "sample-10/a cat.gif", "sample-10/a cat.mp4", "sample-10/style/a dog.mp4", "sample-10.gif",
        "sample-9/a cat.mp4", "sample-9.gif")]


def test_checkpoints_are_the_complete_ones_by_step(tmp_path):
    run = Run(tmp_path)
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-x", ".checkpoint-11.tmp", "checkpoint-12.bak"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-13").write_text("a file, not a folder")
    assert run.checkpoints() == [tmp_path / "checkpoint-9", tmp_path / "checkpoint-10"]
    assert [checkpoint_step(path) for path in run.checkpoints()] == [9, 10]
    assert checkpoint_step(tmp_path / "checkpoint-x") is None


def test_a_run_is_finished_once_its_model_index_is_written(tmp_path):
    run = Run(tmp_path / "run")
    with pytest.raises(RunError, match="no such run folder"):
        run.check_finished()
    run.folder.mkdir()
    assert not run.holds_a_run()
    run.check_output_dir(resuming=False, overwrite=False)  # an empty folder takes a new run
    with pytest.raises(RunError, match="has no config.yaml"):
        run.check_finished()
    run.config_file.write_text("# a run\n")
    assert run.holds_a_run() and not run.finished
    with pytest.raises(RunError, match=r"has no tuned model \(model_index.json\) yet"):
        run.check_finished()
    with pytest.raises(RunError, match="already holds a run"):
        run.check_output_dir(resuming=False, overwrite=False)
    run.check_output_dir(resuming=True, overwrite=False)
    run.check_output_dir(resuming=False, overwrite=True)
    run.model_index.write_text("{}")
    assert run.finished and run.check_finished() is run
    checkpoint_only = Run(tmp_path / "stopped")
    checkpoint_only.checkpoint(3).mkdir(parents=True)
    assert checkpoint_only.holds_a_run()


def test_the_config_is_the_resolved_one_and_names_the_run_when_unreadable(tuned_run, tmp_path):
    run = Run(tuned_run)
    cfg = run.config()
    assert cfg.max_train_steps == 1 and cfg.train_data.video_path == str(SAMPLE_CLIP)
    assert run.clip(cfg).info.num_frames == 48
    copy = Run(tmp_path / "run")
    copy.folder.mkdir()
    copy.write_config(cfg)
    assert copy.config() == cfg and copy.config_file.read_text().startswith("# torch ")
    copy.config_file.write_text("train_data: [unclosed")
    with pytest.raises(RunError, match=r"config.yaml: invalid YAML.*re-run the training to rewrite it"):
        copy.config()
    cfg.train_data.video_path = str(tmp_path / "moved.mp4")
    with pytest.raises(RunError, match=r"moved.mp4.*train_data.video_path in .*config.yaml"):
        copy.clip(cfg)


def test_the_inversion_cache_key_follows_the_clip_the_weights_the_frames_and_the_steps(tuned_run, tmp_path):
    run = Run(tmp_path / "run")
    shutil.copytree(tuned_run, run.folder)
    cfg = run.config()
    clip = run.clip(cfg)
    span, six = range(0, 12, 2), plan_windows(6)

    def cache(frames=span, size=(64, 64), windows=six, steps=3, source=clip):
        return run.inversion_cache(cfg, source, size, frames, windows, steps)

    # the tuned window (frames 0, 3, 6, 9) in one window with validation's steps is validation's own latent
    assert cache(range(0, 12, 3), windows=plan_windows(4)) == run.validation_latent(cfg.max_train_steps)
    spanned = cache()
    assert spanned.parent == run.folder / "inv_latents" and spanned.name.startswith("span-")
    assert spanned.suffix == ".pt" and cache() == spanned  # the same edit: the same cache
    others = [cache(steps=2), cache(size=(128, 128)), cache(frames=range(1, 13, 2)),
              cache(frames=range(0, 24, 2), windows=plan_windows(12)),
              cache(frames=range(0, 24, 2), windows=plan_windows(12, 6, 2)),
              cache(range(0, 12, 3), windows=plan_windows(4), steps=2)]  # the tuned window, other steps
    assert len({spanned, *others}) == 1 + len(others)
    weights = run.folder / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(time.time_ns(), weights.stat().st_mtime_ns + 10**9))  # tuned again
    assert cache() != spanned
    spanned = cache()
    copied = tmp_path / "clip.mp4"
    shutil.copyfile(SAMPLE_CLIP, copied)
    assert cache(source=Clip(copied)) != spanned  # another clip, even with the same frames


def read(run: Run) -> dict:
    return json.loads(run.progress_file.read_text())


def test_progress_is_written_at_the_first_step_then_at_most_once_a_second(tmp_path):
    run = Run(tmp_path)
    with ProgressWriter(run, total=10) as writer:
        assert run.progress() is None  # nothing until the loop begins
        writer.begin(4)  # resumed at step 4
        assert (read(run)["state"], read(run)["step"], read(run)["total"]) == ("running", 4, 10)
        written = time.monotonic()
        writer.step(5, 0.5, 3e-5)
        first = run.progress()
        assert (first.step, first.loss, first.learning_rate) == (5, 0.5, 3e-5)
        assert first.eta_seconds == pytest.approx(first.seconds_per_step * 5) and first.seconds_per_step > 0
        writer.step(6, 0.25, 3e-5)
        if time.monotonic() - written < PROGRESS_INTERVAL:  # (on a machine too busy for that, the next check stands)
            assert run.progress() == first  # too soon after the last write
        writer.sample(run.sample(6, "a cat"))  # a sample is written at once, with the newest step
        assert (run.progress().step, run.progress().sample) == (6, str(tmp_path / "samples/sample-6/a cat.mp4"))
        time.sleep(PROGRESS_INTERVAL)
        writer.step(7, 0.125, 3e-5)
        assert run.progress().step == 7
    done = run.progress()
    assert (done.state, done.step, done.eta_seconds, done.message) == ("finished", 7, 0.0, None)
    assert done.updated == pytest.approx(time.time(), abs=5)
    assert run.progress(since=done.updated) == done and run.progress(since=done.updated + 1) is None
    assert not [path for path in tmp_path.iterdir() if path.name != "progress.json"]  # atomic: no temporary left


@pytest.mark.parametrize("error, state, message", [
    (KeyboardInterrupt("saved checkpoint-2; continue with resume_from_checkpoint=latest"), "stopped",
     "saved checkpoint-2; continue with resume_from_checkpoint=latest"),
    (KeyboardInterrupt(), "stopped", "interrupted"),
    (UserError("the loss became nan at step 3\n(more)"), "failed", "the loss became nan at step 3"),
    (RuntimeError("CUDA out of memory.\nTried to allocate"), "failed", "RuntimeError: CUDA out of memory."),
])
def test_progress_says_how_the_run_ended(error, state, message, tmp_path):
    run = Run(tmp_path)
    with pytest.raises(type(error)), ProgressWriter(run, total=3) as writer:
        writer.begin(0)
        writer.step(1, 0.5, 1e-4)
        raise error
    assert run.progress() == Progress(state, 1, 3, 0.5, 1e-4, run.progress().seconds_per_step,
                                      run.progress().eta_seconds, None, message, run.progress().updated,
                                      [[1, 0.5, 1e-4]])


def test_other_processes_write_no_progress_and_a_resumed_run_keeps_its_sample(tmp_path):
    run = Run(tmp_path)
    with ProgressWriter(run, total=3, enabled=False) as writer:
        writer.begin(0)
        writer.step(1, 0.5, 1e-4)
    assert run.progress() is None
    with ProgressWriter(run, total=3) as writer:
        writer.begin(0)
        writer.sample(run.sample(1, "a cat"))
        writer.step(1, 0.5, 1e-4)
    resumed = ProgressWriter(run, total=3, resuming=True)
    assert resumed.progress.sample == str(run.sample(1, "a cat"))
    assert ProgressWriter(run, total=3).progress.sample is None  # a fresh run (overwrite) has no sample yet


def test_the_history_has_every_step_and_a_resumed_run_keeps_it_up_to_where_it_resumes(tmp_path):
    run = Run(tmp_path)
    with pytest.raises(KeyboardInterrupt), ProgressWriter(run, total=5) as writer:
        writer.begin(0)
        for step, lr in ((1, 1e-4), (2, 2e-4), (3, 3e-4)):
            writer.step(step, 1 / step, lr)
        raise KeyboardInterrupt("saved checkpoint-2")  # as if step 3 were lost: resumed from step 2 below
    assert run.progress().history == [[1, 1.0, 1e-4], [2, 0.5, 2e-4], [3, 1 / 3, 3e-4]]
    with ProgressWriter(run, total=5, resuming=True) as writer:
        writer.begin(2)
        writer.step(3, 0.25, 3e-4)
    assert run.progress().history == [[1, 1.0, 1e-4], [2, 0.5, 2e-4], [3, 0.25, 3e-4]]
    with ProgressWriter(run, total=5) as writer:  # a fresh run over the folder starts a fresh history
        writer.begin(0)
        writer.step(1, 2.0, 1e-4)
    assert run.progress().history == [[1, 2.0, 1e-4]]


def test_a_long_run_s_history_is_bounded_each_entry_the_mean_loss_of_its_steps(tmp_path):
    run, total = Run(tmp_path), 2 * HISTORY_LIMIT + 2  # 3 steps an entry
    with ProgressWriter(run, total=total) as writer:
        writer.begin(0)
        for step in range(1, total + 1):
            writer.step(step, float(step), 1e-4)
    history = run.progress().history
    assert len(history) == total // 3 + 1 <= HISTORY_LIMIT
    assert history[:2] == [[3, 2.0, 1e-4], [6, 5.0, 1e-4]]  # the mean of steps 1-3, of steps 4-6
    assert history[-2:] == [[total - 1, total - 2, 1e-4], [total, total, 1e-4]]  # and the last step alone


def test_truncated_or_foreign_progress_is_unknown_and_a_newer_version_s_keys_are_ignored(tmp_path):
    run = Run(tmp_path)
    with ProgressWriter(run, total=3) as writer:
        writer.begin(0)
        writer.step(1, 0.5, 1e-4)
    written = run.progress_file.read_bytes()
    finished = run.progress()
    newer = json.loads(written) | {"gpu_memory": 12.5, "phase": "validation"}  # keys of a newer version
    run.progress_file.write_text(json.dumps(newer))
    assert run.progress() == finished
    for damaged in (written[: len(written) // 2], b"", b"\xff\xfe not text", b"[1, 2]", b'{"state": "running"}',
                    json.dumps(json.loads(written) | {"step": "three"}).encode(),
                    json.dumps(json.loads(written) | {"history": [[1, "x", 2]]}).encode()):
        run.progress_file.write_bytes(damaged)
        assert run.progress() is None, damaged
        assert run.progress_file.read_bytes() == damaged  # read, never rewritten by a reader
    assert ProgressWriter(run, total=3, resuming=True).progress.history == []  # unknown: nothing to keep
