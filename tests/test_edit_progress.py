"""An edit's own progress file (tuneavideo/edit_progress.py): what the app's page shows while an edit runs."""

import json
import time

import pytest

from tuneavideo.edit_progress import EditProgress, EditProgressWriter
from tuneavideo.errors import UserError
from tuneavideo.run import EditFiles


def progress_file(folder, *prompts):
    """The progress file of an edit of `prompts` in `folder`."""
    return EditFiles.of(folder, list(prompts), list(prompts)).progress


def test_an_edit_s_progress_file_follows_its_phases_and_window_steps(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with EditProgressWriter(progress_file(tmp_path, "a cat")) as report:
        assert EditProgress.load(tmp_path).phase == "loading the model"  # written at once
        clock[0] += 30  # loading: not counted in the rate
        report.start(40)
        report.phase("inverting")
        clock[0] += 10
        report.step(4)  # 4 windows, one step each: 2.5 s a window-step
        seen = EditProgress.load(tmp_path)
        assert (seen.phase, seen.done, seen.total) == ("inverting", 4, 40)
        assert seen.seconds_per_step == pytest.approx(2.5) and seen.eta_seconds == pytest.approx(90)
        clock[0] += 0.5
        report.step(4)  # within a second of the last write: not written yet
        assert EditProgress.load(tmp_path).done == 4
        report.phase("editing")  # a new phase is written at once, with the steps so far
        assert (EditProgress.load(tmp_path).phase, EditProgress.load(tmp_path).done) == ("editing", 8)
        report.step(32)
        report.phase("writing the videos")
    done = EditProgress.load(tmp_path)
    assert (done.phase, done.done, done.total, done.eta_seconds) == ("done", 40, 40, 0.0)
    assert json.loads((tmp_path / "a cat.progress.json").read_text())["phase"] == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["a cat.progress.json"]  # no temporary file left
    assert EditProgress.load(tmp_path, since=time.time() + 60) is None  # an earlier edit's file is not this one's
    assert EditProgress.load(tmp_path / "missing") is None


@pytest.mark.parametrize(("error", "phase", "message"), [
    (KeyboardInterrupt(), "stopped", "interrupted"),
    (UserError("--span 9:: holds no frame"), "failed", "--span 9:: holds no frame"),
    (RuntimeError("CUDA out of memory\nmore"), "failed", "RuntimeError: CUDA out of memory"),
])
def test_how_an_edit_ended_is_in_its_progress_file(tmp_path, error, phase, message):
    with pytest.raises(type(error)), EditProgressWriter(progress_file(tmp_path, "a cat")) as report:
        report.start(10)
        raise error
    ended = EditProgress.load(tmp_path)
    assert (ended.phase, ended.message) == (phase, message)


def test_edits_sharing_a_folder_keep_their_own_progress_files_and_the_newest_is_read(tmp_path):
    with EditProgressWriter(progress_file(tmp_path, "a cat")) as first:
        first.start(10)
        first.phase("editing")
        with EditProgressWriter(progress_file(tmp_path, "a dog", "a cow")) as second:
            second.phase("inverting")
            assert EditProgress.load(tmp_path).phase == "inverting"  # the newest written
        assert EditProgress.load(tmp_path).phase == "done"  # the second ended
        first.phase("writing the videos")
        assert EditProgress.load(tmp_path).phase == "writing the videos"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a cat.progress.json", "a dog+a cow.progress.json"]
    assert json.loads((tmp_path / "a dog+a cow.progress.json").read_text())["phase"] == "done"
