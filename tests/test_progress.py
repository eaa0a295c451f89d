"""Progress bars (tuneavideo/progress.py): plain lines in a log, and a training ETA that leaves validations out."""

import io
import time

import pytest

from tuneavideo.progress import _Lines, paused, progress_bar


def test_bars_in_a_log_are_plain_lines(monkeypatch):
    log = io.StringIO()  # not a terminal, as CI, nohup and the app's job logs are
    monkeypatch.setattr("sys.stderr", log)
    with progress_bar(total=3, desc="Steps", mininterval=0) as steps:
        for _ in range(3):
            steps.update()
            with progress_bar(total=2, desc="Validation", leave=False, mininterval=0) as inner:  # a nested bar
                inner.update(2)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no cursor moves
    lines = text.splitlines()
    assert all(line.strip() for line in lines) and all(a != b for a, b in zip(lines, lines[1:]))  # each once
    assert lines[-1].startswith("Steps: 100%|") and "3/3" in lines[-1]
    assert any(line.startswith("Validation: 100%|") for line in lines)


def test_lines_drop_redraws_and_blanking():
    log = io.StringIO()
    lines = _Lines(log)
    for write in ("\rSteps: 1/3", "\rSteps: 1/3", "\n\x1b[A", "\r          \r", "\rSteps: 2/3", "\n"):
        lines.write(write)
    assert log.getvalue() == "Steps: 1/3\nSteps: 2/3\n"


@pytest.mark.parametrize("pause", [True, False])
def test_a_validation_does_not_count_toward_the_training_rate(monkeypatch, pause):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])  # tqdm's clock
    with progress_bar(total=100, mininterval=0, smoothing=0.3) as bar:
        for _ in range(5):
            clock[0] += 0.5  # a step: 0.5 s
            bar.update()
        if pause:
            with paused(bar):
                clock[0] += 100  # a validation: 100 s
        else:
            clock[0] += 100
        clock[0] += 0.5
        bar.update()
        seconds_per_step = 1 / bar.format_dict["rate"]
    if pause:
        assert seconds_per_step == pytest.approx(0.5)
    else:  # what the bar showed before: the validation's time taken for steps
        assert seconds_per_step > 20
