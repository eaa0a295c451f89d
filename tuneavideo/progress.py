"""The tools' progress bars: tqdm's, redrawn in place on a terminal. Written to a file or a pipe (CI, nohup, the
app's job logs), where redraws and cursor moves would leave `\\r` and `ESC[A` codes in the text, a bar is written as
plain lines instead: one every `LOG_INTERVAL` seconds and its last state, each once.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm.auto import tqdm

LOG_INTERVAL = 10.0  # seconds between a bar's lines in a log: a 10-minute phase logs about 60 lines
_CURSOR_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor up (ESC[A) around nested bars


class _Lines(io.TextIOBase):
    """A text stream taking tqdm's redraws (`\\r` + bar, cursor moves, blanking) and writing every non-blank bar
    line that differs from the one before as a line of its own to `stream`."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _CURSOR_CODES.sub("", text)):
            line = part.rstrip()
            if line.strip() and line != self._last:
                self.stream.write(line + "\n")
                self._last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **options) -> tqdm:
    """A tqdm bar (`options` are tqdm's) on stderr: redrawn on a terminal, written as plain lines elsewhere."""
    if not sys.stderr.isatty():
        options = {"mininterval": LOG_INTERVAL, **options, "file": _Lines(sys.stderr)}
    return tqdm(iterable, **options)


@contextlib.contextmanager
def paused(bar: tqdm) -> Iterator[None]:
    """The time spent in the block does not count toward `bar`'s rate and remaining time: a training bar's ETA
    over a validation inside it stays that of the training steps, without a jump after each validation."""
    start = time.time()  # tqdm's clock
    try:
        yield
    finally:
        bar.last_print_t += time.time() - start  # the rate of the next update is measured from here
