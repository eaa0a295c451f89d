"""One edit's files (`EditWriter`): staged out of sight and moved in together, frames repeated for a variable-rate
source, masks over the source, and what killed edits left behind swept by the next one."""

import os
import subprocess
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import probe
from tuneavideo.video.edit_writer import EditWriter, mask_overlay, upsampled
from tuneavideo.video.readers import Clip


def chunks(videos: int, frames: int, size: int = 16) -> list[np.ndarray]:
    """Decoded videos `(videos, 3, frames, h, w)` in [0, 1], video k, frame j of grey level 10 * (j + 1) + 100 * k,
    in chunks of 3 frames as the pipeline decodes them."""
    levels = (10 * (np.arange(frames)[None] + 1) + 100 * np.arange(videos)[:, None]) / 255
    video = np.broadcast_to(levels[:, None, :, None, None], (videos, 3, frames, size, size)).astype(np.float32)
    return [video[:, :, first : first + 3] for first in range(0, frames, 3)]


def source(frames: int, size: int = 16):
    return iter([np.full((size, size, 3), 200, np.uint8)] * frames)


def visible(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def test_every_file_is_staged_then_moved_in_together_with_repeated_frames(tmp_path):
    repeats = [1, 2, 1, 3, 1]  # a variable-rate source: frame j shown repeats[j] times
    videos, side = [tmp_path / "a.mp4", tmp_path / "b.mp4"], tmp_path / "a+b.side-by-side.mp4"
    with EditWriter(tmp_path, Fraction(8), repeats) as writer:
        gifs = writer.write_videos(chunks(2, 5), source(5), videos, side, None, True, [tmp_path / "a", tmp_path / "b"])
        masks = [torch.zeros(5, 2, 2, dtype=torch.bool)]
        masks[0][:, 0] = True  # the top half
        writer.write_masks(source(5), masks, [tmp_path / "a.mask.mp4"])
        assert visible(tmp_path) == []  # nothing under a final name before the commit
        writer.commit()
    assert gifs == [tmp_path / "a.gif", tmp_path / "b.gif"]
    assert visible(tmp_path) == ["a", "a+b.side-by-side.mp4", "a.gif", "a.mask.mp4", "a.mp4", "b", "b.gif", "b.mp4"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # the staging folder is gone
    shown = Clip(tmp_path / "b.mp4").read(range(8))[:, 8, 8, 0].astype(int)
    expected = np.repeat(100 + 10 * np.arange(1, 6), repeats)
    assert np.abs(shown - expected).max() <= 2
    assert probe(side)["size"] == (48, 16) and probe(side)["frames"] == 8  # the source, then each video
    # one JPEG per edited frame (not per repeat), straight from the decoder
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == [f"{j:05d}.jpg" for j in range(5)]
    assert abs(int(np.asarray(Image.open(tmp_path / "a" / "00004.jpg"))[8, 8, 0]) - 50) <= 2
    tinted = Clip(tmp_path / "a.mask.mp4").read([0])[0].astype(int)
    assert np.abs(tinted[2, 8] - [228, 100, 100]).max() <= 6 and np.abs(tinted[13, 8] - 200).max() <= 6


def test_an_edit_that_fails_between_files_leaves_the_earlier_files_as_they_were(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"an earlier edit")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "00000.jpg").write_bytes(b"an earlier frame")
    with pytest.raises(RuntimeError), EditWriter(tmp_path, Fraction(8), [1] * 3) as writer:
        writer.write_videos(chunks(1, 3), source(3), [tmp_path / "a.mp4"], None, None, False, [tmp_path / "a"])
        raise RuntimeError("stopped before the next file")
    assert visible(tmp_path) == ["a", "a.mp4"] and (tmp_path / "a.mp4").read_bytes() == b"an earlier edit"
    assert (tmp_path / "a" / "00000.jpg").read_bytes() == b"an earlier frame"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_the_next_edit_sweeps_what_killed_edits_left_and_nothing_of_a_running_one(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that has ended: its staging folders are left over
    left = [tmp_path / f".edit-{gone.pid}-0123456789ab.tmp", Path(tempfile.mkdtemp(prefix=f"tav-edit-{gone.pid}-"))]
    for folder in left:
        folder.mkdir(exist_ok=True)
        (folder / "a.mp4").write_bytes(b"half")
    running = tmp_path / f".edit-{os.getpid()}-00000000000a.tmp"  # this process's: an edit still being written
    running.mkdir()
    old = tmp_path / ".a cat.0123456789ab.tmp.mp4"  # an earlier version's per-file temporary
    old.write_bytes(b"half")
    job = tmp_path / "job.json"
    job.write_text("{}")
    audio = Path(tempfile.mkdtemp(prefix="tav-edit-"))  # an earlier version's sound, a day old
    recent = Path(tempfile.mkdtemp(prefix="tav-edit-"))  # ... and one an edit of that version may be using
    os.utime(audio, (time.time() - 2 * 86400,) * 2)
    try:
        with EditWriter(tmp_path, Fraction(8), [1]):
            pass
        assert not any(path.exists() for path in [*left, old, audio])
        assert running.is_dir() and job.is_file() and recent.is_dir()
    finally:
        for path in (audio, recent):
            if path.exists():
                path.rmdir()


def test_mask_overlay_tints_only_the_mask_and_masks_are_upsampled_nearest():
    frame = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    shown = mask_overlay(frame, mask)
    assert (shown[2:] == 100).all() and (shown[:2] == [178, 50, 50]).all()  # (100 + 255) / 2, 100 / 2
    up = upsampled(torch.tensor([[[True, False], [False, False]]]), (4, 4))
    assert up.shape == (1, 4, 4) and up[0, :2, :2].all() and up.sum() == 4
