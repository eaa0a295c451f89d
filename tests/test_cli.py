"""What the command-line tools print: one line per phase, one progress bar per long phase, the warnings that ask for
something, and no library chatter unless --verbose."""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, SAMPLE_CLIP

pytestmark = pytest.mark.e2e  # the tools run as processes

# A tqdm bar as it is redrawn (the text before "NN%|"), and the cursor moves of nested bars.
BAR = re.compile(r"^(?P<desc>[^|]*?):\s+\d+%\|")
CHATTER = ("Loading pipeline components", "Loading weights", "Writing model shards", "accelerate", "[RANK",
           "torchvision", "INFO", "Warning:", "should be kept in float32")


def python(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def printed(result: subprocess.CompletedProcess) -> tuple[list[str], set[str]]:
    """The lines a terminal keeps (each bar's redraws dropped), and the bars' names."""
    lines, bars = [], set()
    for line in re.split(r"[\r\n]", result.stderr + result.stdout):
        line = line.replace("\x1b[A", "").strip()
        bar = BAR.match(line)
        if bar:
            bars.add(bar["desc"])
        elif line:
            lines.append(line)
    return lines, bars


def assert_lines(lines: list[str], expected: list[str]) -> None:
    """Every line is one of ours (a regex of `expected`, in that order), and every one of ours is there."""
    assert not [line for line in lines if any(word in line for word in CHATTER)], lines
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), (pattern, line)


@pytest.fixture(scope="module")
def tuned(tiny_sd, tmp_path_factory):
    """A one-step tuning through train_tuneavideo.py: the run folder and what it printed."""
    folder = tmp_path_factory.mktemp("quiet")
    config = folder / "config.yaml"
    config.write_text(f"""
pretrained_model_path: "{tiny_sd}"
output_dir: "{folder / 'run'}"
train_data: {{video_path: "{SAMPLE_CLIP}", prompt: "a ball is moving", n_sample_frames: 4,
             width: 64, height: 64, sample_frame_rate: 3}}
validation_data: {{prompts: ["a red ball"], num_inference_steps: 2, num_inv_steps: 2}}
max_train_steps: 1
checkpointing_steps: 1
validation_steps: 1
seed: 33
mixed_precision: fp16
""")
    return folder / "run", python(ROOT / "train_tuneavideo.py", f"--config={config}")


def test_a_tuning_names_every_phase_and_nothing_else(tuned, tiny_sd):
    run, result = tuned
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # bars into a pipe: plain lines, no redraws
    lines, bars = printed(result)
    assert_lines(lines, [
        r"mixed_precision=fp16 needs a CUDA GPU; training in float32 instead \(bf16 works on the CPU\)",
        f"loading the base model {re.escape(str(tiny_sd))}",
        r"1 process\(es\) on cpu, mixed precision no",
        r"trainable parameters: [\d,]+ in \d+ tensors",
        r"xformers is not available here; using PyTorch's scaled_dot_product_attention instead",
        r"frames resized to 64x64; 1 window start\(s\)",
        f"saved {re.escape(str(run / 'checkpoint-1'))}",
        f"wrote the samples of step 1 to {re.escape(str(run / 'samples'))}",
        f"saved the tuned model to {re.escape(str(run))}",
    ])
    assert bars == {"Steps", "Validation at step 1"}


def test_an_edit_names_every_phase_and_verbose_brings_the_libraries_back(tuned):
    run, _ = tuned
    edit = [ROOT / "inference.py", f"--model={run}", "--prompt=a cat", "--num-inference-steps=2",
            "--num-inv-steps=2", f"--output-dir={run / 'quiet'}"]
    lines, bars = printed(python(*edit))
    edits = re.escape(str(run / "quiet"))
    assert_lines(lines, [
        f"loading the tuned model {re.escape(str(run))}",
        f"using the run's inverted latent {re.escape(str(run / 'inv_latents' / 'ddim_latent-1.pt'))}",
        f"writing the edits to {edits}",
        rf"wrote 1 edit\(s\) of source frames 0-9 \(every 3\), 4 frames at 64x64, 8 fps, with sound, to {edits}:",
        f"{edits}/a cat.mp4", f"{edits}/a cat.gif", f"{edits}/a cat.side-by-side.mp4",
    ])
    assert bars == {"Editing 4 frames in 1 window(s)"}

    lines, bars = printed(python(*edit[:-1], f"--output-dir={run / 'verbose'}", "--verbose"))
    assert f"INFO tuneavideo.editing: loading the tuned model {run}" in lines
    # the libraries' own bars are back (the tuned model is loaded by parts: transformers' "Loading weights")
    assert "Editing 4 frames in 1 window(s)" in bars and "Loading weights" in bars


def test_a_process_of_several_that_stops_is_its_one_line_then_ours_without_torchruns_report(tmp_path, run_config):
    config = run_config(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model_index.json").write_text("{}")  # a finished run is there: every process refuses it
    result = subprocess.run([sys.executable, str(ROOT / "train_tuneavideo.py"), f"--config={config}",
                             "--num-processes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert lines[:2] == [f"train_tuneavideo.py: error: output_dir {tmp_path / 'run'} already holds a run: continue it "
                         "with resume_from_checkpoint=latest, replace it with overwrite=true, or choose another "
                         "output_dir"] * 2
    assert lines[2:] == ["train_tuneavideo.py: error: 2 of 2 processes stopped (ranks 0, 1); the lines above say why"]


@pytest.mark.parametrize("launcher", [
    [],  # README's command: one process needs no launcher
    ["-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
     "--mixed_precision", "no", "--dynamo_backend", "no"],  # accelerate launch with every value said, and --quiet
], ids=["python", "accelerate launch -q"])
def test_a_bad_input_is_one_line_without_the_launchers_warning_or_traceback(launcher, tmp_path):
    result = subprocess.run([sys.executable, *launcher, str(ROOT / "train_tuneavideo.py"),
                             f"--config={tmp_path / 'missing.yaml'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HOME": str(tmp_path)})  # no accelerate config
    assert result.returncode == 1
    assert (result.stdout + result.stderr).strip() == (f"train_tuneavideo.py: error: config file not found: "
                                                       f"{tmp_path / 'missing.yaml'}")
