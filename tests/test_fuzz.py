"""Property-based fuzzing (hypothesis) of the clip reader and the config loader.

Properties:

* `Clip(path).info`, `list(Clip(path).frames())` and `Clip(path).read([0])`, on random bytes and on mutations (flipped,
  deleted, inserted, zeroed byte ranges, truncation) of small valid clips made here, and on folders of frames among
  which some files are random bytes, damaged images or images of another size: they give frames of the size `info`
  states (uint8 `(H, W, 3)`) or raise VideoReadError with a one-line message naming the file or folder. The reader
  runs in a worker subprocess with a per-example watchdog, so a hang or a crash of the interpreter (FFmpeg is C) fails
  the example instead of pytest.
* ``load_config(path, overrides)`` on random YAML-ish text, random mappings, mutated shipped configs and random
  dotlist overrides: it returns a TrainConfig with the declared field types or raises a one-line ConfigError.
* ``inference.py``'s options: random argument lists of its flags with odd values, through its parser and every check
  made before a model is loaded (`plan_edit`, on a real tuned run): they give a plan whose frames, windows and
  output folder fit the options, or a one-line UserError; nothing else.

CI runs a small fixed set of examples (``derandomize=True``: the same ones every run). To fuzz longer locally, with
fresh random examples each run::

    FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

import dataclasses
import io
import json
import math
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import ROOT, ffmpeg, index_frames, watchdog
from tuneavideo.config import ConfigError, TrainConfig, ValidationDataConfig, load_config

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
WATCHDOG_S = 30.0  # per example; a clip here takes well under a second, a config milliseconds


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` fixed examples, or FUZZ_EXAMPLES random ones when that is set."""
    return settings(
        max_examples=FUZZ_EXAMPLES or ci_examples,
        derandomize=not FUZZ_EXAMPLES,
        database=None,  # nothing written into the repository; a failure prints the example to reproduce it
        deadline=None,  # watchdogs guard against hangs instead: the reader worker's timeout, SIGALRM for configs
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# Clip reader ---------------------------------------------------------------------------------------------------------

# Runs in the worker: one path per stdin line, one JSON line of results per path.
WORKER = r"""
import json, math, sys
from tuneavideo.video.readers import Clip, VideoReadError

def describe(name, value):
    if name == "info":
        times = value.times
        return {"info": [value.num_frames, value.fps.numerator, value.fps.denominator, value.width, value.height,
                         value.start_time], "types": [type(v).__name__ for v in vars(value).values()],
                "times": None if times is None else [len(times), all(map(math.isfinite, times)),
                                                     list(times) == sorted(times)]}
    if name == "all":
        return {"count": len(value), "shapes": sorted({frame.shape for frame in value}),
                "dtypes": sorted({str(frame.dtype) for frame in value})}
    return {"shape": list(value.shape), "dtype": str(value.dtype)}

for line in sys.stdin:
    path = line.rstrip("\n")
    results = {}
    calls = {"info": lambda: Clip(path).info, "all": lambda: list(Clip(path).frames()),
             "first": lambda: Clip(path).read([0])}
    for name, call in calls.items():
        try:
            results[name] = describe(name, call())
        except VideoReadError as err:
            results[name] = {"error": str(err)}
        except BaseException as err:  # not allowed: reported to the test, which fails on it
            results[name] = {"unexpected": f"{type(err).__module__}.{type(err).__qualname__}: {err}"}
    print(json.dumps(results), flush=True)
"""


class ReaderWorker:
    """A subprocess that reads clips; a crash or a hang is reported as an AssertionError."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.stderr = tempfile.TemporaryFile()

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.stderr.seek(0)
        self.stderr.truncate()
        return subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, bufsize=0,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def read(self, path: Path) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        self.process.stdin.write(f"{path}\n".encode())
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                if not selector.select(timeout=WATCHDOG_S):
                    self.close()
                    raise AssertionError(f"the reader hung (> {WATCHDOG_S:.0f} s) on {path}")
                chunk = self.process.stdout.read(65536)
                if not chunk:  # the worker died
                    code = self.process.wait()
                    self.stderr.seek(0)
                    tail = self.stderr.read()[-1500:].decode(errors="replace")
                    self.process = None
                    raise AssertionError(f"the reader crashed the interpreter (exit code {code}) on {path}:\n{tail}")
                line += chunk
        return json.loads(line)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def worker():
    started = ReaderWorker()
    yield started
    started.close()


def _make_seed_clips() -> dict[str, bytes]:
    """Small valid clips to mutate: MP4 with its index after or before the frames, and Matroska (no frame count)."""
    with tempfile.TemporaryDirectory() as folder:
        clips = {}
        for name, extra in (("moov_last.mp4", []), ("moov_first.mp4", ["-movflags", "+faststart"]), ("clip.mkv", [])):
            path = os.path.join(folder, name)
            ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=12", "-frames:v", "10", "-c:v", "libx264",
                   "-g", "4", "-pix_fmt", "yuv420p", *extra, path)
            clips[name] = Path(path).read_bytes()
        return clips


SEED_CLIPS = _make_seed_clips()


def mutate(draw, data: bytearray, max_edits: int = 3) -> bytes:
    """`data` with 1-`max_edits` byte-range edits, mostly small so that many files still decode."""
    for _ in range(draw(st.integers(1, max_edits))):
        start = draw(st.integers(0, max(0, len(data) - 1)))
        length = draw(st.sampled_from([1, 1, 2, 4, 16, 64]))
        match draw(st.sampled_from(["flip", "delete", "insert", "zero", "truncate"])):
            case "flip":
                data[start : start + length] = bytes(b ^ 0xFF for b in data[start : start + length])
            case "delete":
                del data[start : start + length]
            case "insert":
                data[start:start] = draw(st.binary(min_size=1, max_size=length))
            case "zero":
                data[start : start + length] = bytes(len(data[start : start + length]))
            case "truncate":
                del data[start:]
    return bytes(data)


@st.composite
def mutated_clips(draw) -> tuple[str, bytes]:
    """A seed clip with 1-3 byte-range edits."""
    name = draw(st.sampled_from(sorted(SEED_CLIPS)))
    return name[name.index(".") :], mutate(draw, bytearray(SEED_CLIPS[name]))


def _encoded(frame: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=kind)
    return buffer.getvalue()


FRAMES = index_frames(4, 32, 24)
VALID_IMAGES = {kind: [_encoded(frame, kind) for frame in FRAMES] for kind in ("PNG", "JPEG")}


@st.composite
def frame_folders(draw) -> dict[str, bytes]:
    """File name -> bytes: 1-4 valid 32x24 frames, and 1-2 files (new, or in place of a frame) of random bytes, a
    damaged image or an image of another size, at any place in the name order."""
    files = {}
    for index in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["PNG", "JPEG"]))
        files[f"{index:03d}.{'png' if kind == 'PNG' else 'jpg'}"] = VALID_IMAGES[kind][index]
    for _ in range(draw(st.integers(1, 2))):
        index, extra = draw(st.integers(0, 4)), draw(st.sampled_from(["", "b"]))
        name = f"{index:03d}{extra}.{draw(st.sampled_from(['png', 'jpg']))}"
        kind = draw(st.sampled_from(["PNG", "JPEG"]))
        match draw(st.sampled_from(["random", "mutated", "other size"])):
            case "random":
                files[name] = draw(st.binary(max_size=512))
            case "mutated":
                files[name] = mutate(draw, bytearray(VALID_IMAGES[kind][draw(st.integers(0, 3))]))
            case "other size":
                files[name] = _encoded(index_frames(1, draw(st.sampled_from([24, 33])), 24)[0], kind)
    return files


def check_results(results: dict, path: Path) -> None:
    """Each call gave a well-formed result or our error, with a one-line message naming the file or folder (or a file
    in it); frames have the size `info` states."""
    where = re.escape(str(path)) + (r"(/[^/]+)?" if path.is_dir() else "")
    for call, result in results.items():
        assert "unexpected" not in result, f"{call}: {result['unexpected']}"
        if "error" in result:
            message = result["error"]
            assert re.match(rf"{where}: ", message) and "\n" not in message, f"{call}: {message!r}"
        elif call == "info":
            num_frames, fps_numerator, fps_denominator, width, height, start_time = result["info"]
            assert result["types"][:5] == ["int", "Fraction", "int", "int", "float"], result
            assert result["types"][5] in ("NoneType", "tuple"), result  # a variable rate's frame times
            assert result["times"] in (None, [num_frames, True, True]), result
            assert num_frames >= 1 and width >= 1 and height >= 1 and fps_numerator > 0 < fps_denominator, result
            assert math.isfinite(start_time), result
        else:
            shapes = [result["shape"][1:]] if call == "first" else result["shapes"]
            assert (result["count"] >= 1 and result["dtypes"] == ["uint8"]) if call == "all" else (
                result["shape"][0] == 1 and result["dtype"] == "uint8"), result
            assert len(shapes) == 1 and shapes[0][2] == 3, result
            if "info" in results["info"]:
                width, height = results["info"]["info"][3:5]
                assert list(shapes[0][:2]) == [height, width], results


@fuzz_settings(30)
@given(st.one_of(
    st.binary(max_size=2048),
    # Random bytes behind a real MP4 header get further into the demuxers.
    st.binary(max_size=2048).map(lambda tail: SEED_CLIPS["moov_first.mp4"][:32] + tail),
))
def test_reader_on_random_bytes(worker, tmp_path, data):
    path = tmp_path / "random.mp4"
    path.write_bytes(data)
    check_results(worker.read(path), path)


@fuzz_settings(80)
@given(mutated_clips())
def test_reader_on_mutated_clips(worker, tmp_path, clip):
    suffix, data = clip
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(data)
    check_results(worker.read(path), path)


@fuzz_settings(30)
@given(frame_folders())
def test_reader_on_damaged_frame_folders(worker, tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("frames")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    check_results(worker.read(folder), folder)


def test_worker_reads_the_seed_clips_and_folders(worker, tmp_path):
    # The harness itself: unmutated clips and folders read in full, so the fuzz tests above do reach the decoders.
    for name, data in SEED_CLIPS.items():
        path = tmp_path / name
        path.write_bytes(data)
        results = worker.read(path)
        check_results(results, path)
        assert results["info"]["info"][:5] == [10, 12, 1, 64, 48], (name, results)
        assert results["all"]["count"] == 10 and results["all"]["shapes"] == [[48, 64, 3]], (name, results)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, (png, jpeg) in enumerate(zip(*VALID_IMAGES.values())):
        (folder / f"{index}.png").write_bytes(png)
        (folder / f"{index}b.jpg").write_bytes(jpeg)
    results = worker.read(folder)
    check_results(results, folder)
    assert results["info"]["info"][:5] == [8, 24, 1, 32, 24] and results["all"]["count"] == 8, results
    (folder / "9.png").write_bytes(b"random bytes")
    message = worker.read(folder)["all"]["error"]
    assert re.fullmatch(rf"{re.escape(str(folder / '9.png'))}: cannot be read as an image .*", message), message


# Config loader ------------------------------------------------------------------------------------------------------

CONFIG_TEXTS = [path.read_text() for path in sorted((ROOT / "configs").glob("*.yaml"))]
# Every key of the schema, dotted, so random overrides and mappings often hit real keys.
SCHEMA_KEYS: list[str] = []
for _field in dataclasses.fields(TrainConfig):
    SCHEMA_KEYS.append(_field.name)
    if dataclasses.is_dataclass(_field.type):
        SCHEMA_KEYS += [f"{_field.name}.{sub.name}" for sub in dataclasses.fields(_field.type)]
YAML_TOKENS = ["", " ", "\n", "  ", ":", ": ", "- ", "[", "]", "{", "}", ",", "'", '"', "#", "&a", "*a", "!!str",
               "|", ">", "?", "~", "null", "true", "no", "0", "-1", "24", "3e-5", "1e999", ".nan", "???", "${seed}",
               "${oc.env:HOME}", "${nope}", "\t", "\\", "é", "\x00", "%", "@", "`"]
YAML_VALUES = ["1", "-1", "0", "512", "null", "true", "no", "fp16", "3e-5", ".inf", "abc", "[]", "{}", "[a, b]",
               "{a: 1}", "'x'", "???", "${seed}", "${train_data.width}", "${oc.env:NOPE}", "[[1]]", "''"]

yaml_ish_text = st.lists(st.one_of(st.sampled_from(YAML_TOKENS + SCHEMA_KEYS), st.text(max_size=5)),
                         max_size=40).map("".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10))
mappings = st.dictionaries(
    st.one_of(st.sampled_from([key.split(".")[-1] for key in SCHEMA_KEYS]), st.text(max_size=8)),
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=8),
    max_size=8,
)
overrides = st.lists(
    st.builds(lambda key, sep, value: f"{key}{sep}{value}",
              st.one_of(st.sampled_from(SCHEMA_KEYS + ["validation_data.prompts[0]", "x", "train_data.x", ""]),
                        st.text(max_size=10)),
              st.sampled_from(["=", "==", "", "=="]),
              st.one_of(st.sampled_from(YAML_VALUES), st.text(max_size=10))),
    max_size=4,
)


@st.composite
def mutated_configs(draw) -> str:
    """A shipped config with 1-5 line or character edits."""
    lines = draw(st.sampled_from(CONFIG_TEXTS)).split("\n")
    for _ in range(draw(st.integers(1, 5))):
        index = draw(st.integers(0, len(lines) - 1))
        match draw(st.sampled_from(["delete", "duplicate", "replace value", "insert", "indent", "edit"])):
            case "delete":
                del lines[index]
                lines = lines or [""]
            case "duplicate":
                lines.insert(index, lines[index])
            case "replace value":
                key = lines[index].split(":")[0]
                lines[index] = f"{key}: {draw(st.sampled_from(YAML_VALUES))}"
            case "insert":
                lines.insert(index, f"{draw(st.sampled_from(SCHEMA_KEYS)).split('.')[-1]}: "
                                    f"{draw(st.sampled_from(YAML_VALUES))}")
            case "indent":
                lines[index] = draw(st.sampled_from(["", "  ", "    ", "\t"])) + lines[index].lstrip()
            case "edit":
                line = lines[index]
                at = draw(st.integers(0, len(line)))
                lines[index] = line[:at] + draw(st.sampled_from(YAML_TOKENS)) + line[at + draw(st.integers(0, 3)) :]
    return "\n".join(lines)


def has_declared_types(cfg: object) -> bool:
    """Whether every field of the dataclass ``cfg`` (recursively) holds a value of its annotated type; a field typed
    ``Any`` holds what ANY_FIELDS says it must."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if hint is typing.Any:
            if not ANY_FIELDS[type(cfg), name](value):  # a new Any field needs its check here: KeyError
                return False
            continue
        if dataclasses.is_dataclass(hint):
            if not (isinstance(value, hint) and has_declared_types(value)):
                return False
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        if not any(_is_instance(value, option) for option in options):
            return False
    return True


def _are_prompts(value: object) -> bool:
    """A non-empty list of prompts, or a non-empty mapping of names to prompts; no prompt blank."""
    if isinstance(value, dict):
        prompts = list(value.values())
        if not all(isinstance(key, str) for key in value):
            return False
    elif isinstance(value, list):
        prompts = value
    else:
        return False
    return bool(prompts) and all(isinstance(prompt, str) and prompt.strip() for prompt in prompts)


ANY_FIELDS = {(ValidationDataConfig, "prompts"): _are_prompts}


def _is_instance(value: object, hint: object) -> bool:
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_instance(element, item) for element in value)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)




def check_load(tmp_path: Path, text: str, extra: list[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        with watchdog(WATCHDOG_S):
            cfg = load_config(path, extra)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message
        assert message.startswith((f"{path}", "override ")), message
    else:
        assert isinstance(cfg, TrainConfig) and has_declared_types(cfg), cfg


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


@fuzz_settings(150)
@given(text=st.one_of(yaml_ish_text, mappings.map(lambda m: yaml.safe_dump(m, allow_unicode=True))),
       extra=overrides)
def test_config_loader_on_random_text_and_mappings(config_dir, text, extra):
    check_load(config_dir, text, extra)


@fuzz_settings(150)
@given(text=mutated_configs(), extra=overrides)
def test_config_loader_on_mutated_configs(config_dir, text, extra):
    check_load(config_dir, text, extra)


@fuzz_settings(100)
@given(extra=overrides)
def test_config_loader_on_random_overrides(config_dir, extra):
    check_load(config_dir, CONFIG_TEXTS[0], extra)



# inference.py options ---------------------------------------------------------------------------------------------

NUMBERS = ["0", "1", "2", "3", "-1", "50", "1001", "1e3", "2.5", "nan", "inf", "-inf", "1e999", "", " ", "0x10", "七",
           "99999999999999999999"]
SPANS = ["all", ":", "0:", ":1", "0.5:1.5", "1:0.5", "5:", "-1:2", "1/3:2/3", "a:b", "1:2:3", "nan:1", "1e999:",
         "0:1e-9", "", "all:"]
TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


@st.composite
def edit_arguments(draw, run: Path, folder: Path) -> list[str]:
    """An inference.py command line: the run (mostly), a prompt or a few, then any of its options with odd values."""
    places = [str(folder / "out"), str(folder / "a-file"), str(folder / "a-file" / "below"), "", str(folder)]
    args = ["--model", draw(st.sampled_from([str(run)] * 4 + [str(folder / "nowhere"), str(folder / "a-file"), ""]))]
    for _ in range(draw(st.integers(0, 3))):
        args += ["--prompt", draw(st.one_of(TEXT, st.sampled_from(["a cat", "a/b", "side-by-side", " "])))]
    options = {
        "--num-inference-steps": st.sampled_from(NUMBERS), "--num-inv-steps": st.sampled_from(NUMBERS),
        "--guidance-scale": st.sampled_from(NUMBERS), "--eta": st.sampled_from(NUMBERS),
        "--num-videos-per-prompt": st.sampled_from(NUMBERS), "--seed": st.sampled_from(NUMBERS),
        "--stride": st.sampled_from(NUMBERS), "--window": st.sampled_from(NUMBERS),
        "--overlap": st.sampled_from(NUMBERS), "--span": st.one_of(st.sampled_from(SPANS), TEXT),
        "--output-dir": st.sampled_from(places), "--negative-prompt": TEXT,
        "--no-audio": st.none(), "--evaluate": st.none(), "--bogus": st.none(),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=6)):
        value = draw(options[flag])
        args += [flag] if value is None else [flag, value]
    return args


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("edits")
    (folder / "a-file").write_text("not a folder")
    return folder


@pytest.fixture(scope="module")
def run_copy(tuned_run, edit_folder) -> Path:
    """The shared tuned run, copied: a plan makes its output folder, and other tests check the run has none."""
    return Path(shutil.copytree(tuned_run, edit_folder / "run"))


def test_edit_options_give_a_plan_or_one_line(run_copy, edit_folder):
    import inference
    from tuneavideo.editing import plan_edit
    from tuneavideo.errors import UserError

    @fuzz_settings(150)
    @given(edit_arguments(run_copy, edit_folder))
    def check(args: list[str]) -> None:
        try:
            plan = plan_edit(*inference.parse_args(args))
        except UserError as err:
            assert "\n" not in str(err) and str(err).strip(), repr(str(err))
            return
        options = plan.request
        assert plan.files.folder.is_dir() and plan.frames and len(plan.frames) <= plan.clip.info.num_frames
        assert plan.frames.step == (options.stride or plan.cfg.train_data.sample_frame_rate)
        assert all(len(w.frames) == min(plan.window, len(plan.frames)) for w in plan.windows)
        assert math.isfinite(options.guidance) and options.eta >= 0
        assert 1 <= options.num_inference_steps <= 1000 and 1 <= options.num_inv_steps <= 1000

    check()
