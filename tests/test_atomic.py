"""Atomic writes (`tuneavideo.atomic`): a file or folder appears under its name whole or not at all, whatever stops
the writer (an error, Ctrl-C, a full disk), and a full disk is one line that names the folder."""

import pytest

from tests.helpers import small_disk
from tuneavideo.atomic import DiskFullError, atomic_path, remove, staged


def test_atomic_path_keeps_existing_file_on_failure(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_staged_output_is_removed_on_ctrl_c(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged(tmp_path / "model.tmp", "disk full") as folder:
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_reports_a_full_disk_in_one_line(tmp_path):
    with small_disk(tmp_path / "out", 64 << 10) as disk:  # a real 64 KiB file system
        target = disk / "edit.mp4"
        target.write_bytes(b"old")
        with pytest.raises(DiskFullError) as info, atomic_path(target) as tmp:
            tmp.write_bytes(bytes(1 << 20))  # 1 MiB cannot fit
        assert str(info.value) == (f"no space left on the disk of {disk} while writing edit.mp4; free space and "
                                   "run again (files written before are kept)")
        assert [p.name for p in disk.iterdir()] == ["edit.mp4"] and target.read_bytes() == b"old"



def test_a_folder_replaces_the_folder_of_its_name_only_when_complete(tmp_path):
    target = tmp_path / "frames"
    target.mkdir()
    (target / "00000.jpg").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "00000.jpg").write_bytes(b"new")
        raise RuntimeError("stopped between two frames")
    assert [p.name for p in tmp_path.iterdir()] == ["frames"] and (target / "00000.jpg").read_bytes() == b"old"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "00001.jpg").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["00001.jpg"]


def test_remove_takes_files_folders_and_links_and_what_is_gone(tmp_path):
    (tmp_path / "folder" / "inner").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    for name in ("link", "folder", "file", "never there"):
        remove(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
