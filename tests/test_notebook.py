"""`postprocess.ipynb` runs headless (nbclient) on the sample clip and shows what it promises.

The kernel is this interpreter, named in a kernelspec written to a temporary JUPYTER_PATH, so the test works in any
fresh virtual environment with the requirements installed (no `ipykernel install` into the user's Jupyter).
"""

from __future__ import annotations

import json
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e  # the tools run as processes

NOTEBOOK = ROOT / "postprocess.ipynb"
KERNEL = "tuneavideo-test"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_notebook_is_stored_clean_and_uses_only_the_io_modules():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    imports = {line.split()[1] for cell in code for line in cell.source.splitlines() if line.startswith("from ")}
    ours = {name for name in imports if name.startswith("tuneavideo")}
    # the reader, the sound steps and the writer: no model, no training code; moviepy for the seed's flow
    assert ours == {"tuneavideo.video.readers", "tuneavideo.video.sound", "tuneavideo.video.writers"}
    assert "moviepy.editor" in imports


def test_notebook_runs_headless_on_the_sample_clip(kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # like papermill: override the settings cell so the run writes only under tmp_path and finds no edit
    settings = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = f'WORK = Path(r"{tmp_path / "work"}")\nEDITS_DIR = Path(r"{tmp_path / "no-edits"}")'
    notebook.cells.insert(settings + 1, nbformat.v4.new_code_cell(overrides))
    NotebookClient(notebook, kernel_name=kernel, timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()

    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "sound: True" in text and "muxed: True" in text and "muxed: False" in text
    assert text.count("video 1.000 s, audio 1.000 s") == 3  # the demo's 8 frames at 8 fps, whatever span is muxed
    # the seed's moviepy flow gives the same file (its own asserts check the samples too)
    assert "mux_audio: picture 1.000 s, sound 1.000 s" in text and "moviepy: picture 1.000 s, sound 1.000 s" in text
    assert "cut: 44100 samples ours, 44100 moviepy's" in text and "RMS apart" in text
    work = tmp_path / "work"
    assert {"stand-in-edit.mp4", "span.wav", "edit-with-sound.mp4", "edit-with-sound-moviepy.mp4"} <= {
        p.name for p in work.iterdir()}
