"""The edit request (`tuneavideo.request`): the defaults decided once, the checks that name its fields, and the JSON
file the web app hands to `inference.py --request`; the command line's flags are its fields."""

import json
from fractions import Fraction

import pytest

import inference
from tuneavideo.config import ControlNetConfig, LoraFile
from tuneavideo.errors import UserError
from tuneavideo.request import (
    GUIDANCE_SCALE,
    LOCAL_GUIDANCE_SCALE,
    EditRequest,
    LocalEdit,
    RequestError,
    parse_blend_words,
    parse_reweights,
    parse_span,
)


def test_the_guidance_default_is_tune_a_video_s_and_video_p2p_s_with_a_local_edit():
    assert (GUIDANCE_SCALE, LOCAL_GUIDANCE_SCALE) == (12.5, 7.5)
    assert EditRequest(["a cat"]).guidance == 12.5 and EditRequest(["a cat"], local=LocalEdit()).guidance == 7.5
    assert EditRequest(["a cat"], guidance_scale=3.0, local=LocalEdit()).guidance == 3.0


@pytest.mark.parametrize("request_, message", [
    (EditRequest([" "]), "give at least one non-empty `prompts`"),
    (EditRequest(["a"], num_inference_steps=0), "`num_inference_steps` must be >= 1, got 0"),
    (EditRequest(["a"], window=1), "`window` must be >= 2, got 1"),
    (EditRequest(["a"], span=(Fraction(2), Fraction(1))), "`span` '2:1': START must be >= 0 and before END"),
    (EditRequest(["a"], guidance_scale=float("nan")), "`guidance_scale` must be a finite number, got nan"),
    (EditRequest(["a"], eta=-1.0), "`eta` must be a finite number >= 0, got -1.0"),
    (EditRequest(["a/b", "a_b"]), "`prompts` would overwrite each other's files"),
    (EditRequest(["a.side-by-side"]), "`prompts` would overwrite each other's files"),
    (EditRequest(["a"], eta=0.5, local=LocalEdit()), "`eta` does not apply to a local edit"),
    (EditRequest(["a"], local=LocalEdit(control="swap")), "`control` must be one of replace, refine, got 'swap'"),
    (EditRequest(["a"], local=LocalEdit(inversion="fast")), "`inversion` must be one of null-text, ddim"),
    (EditRequest(["a"], num_inv_steps=3, local=LocalEdit()), "give `num_inference_steps` equal to `num_inv_steps`"),
    (EditRequest(["a"], local=LocalEdit(blend_start=1.5)), "`blend_start` must be in [0, 1], got 1.5"),
    (EditRequest(["a"], local=LocalEdit(mask_threshold=0.0)), "`mask_threshold` must be in (0, 1), got 0.0"),
    (EditRequest(["a"], local=LocalEdit(reweights={"a": float("inf")})), "`reweights` a=inf: the factor must be"),
    (EditRequest(["a"], local=LocalEdit(null_text_iterations=0)), "`null_text_iterations` must be >= 1, got 0"),
])
def test_a_request_that_cannot_work_is_one_line_naming_its_field(request_, message):
    with pytest.raises(RequestError) as raised:
        request_.check()
    assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_video_stems_are_the_prompts_and_an_index_per_video():
    assert EditRequest(["a cat", "a/dog"]).check() == ["a cat", "a_dog"]
    assert EditRequest(["a cat"], num_videos_per_prompt=2).check() == ["a cat-0", "a cat-1"]
    assert EditRequest(["inversion"]).check() == ["inversion"]  # the edits' own files end in .inversion.mp4


def test_the_text_forms_of_span_blend_words_and_reweights():
    assert parse_span("all") == (None, None) and parse_span("1.5:") == (Fraction(3, 2), None)
    assert parse_blend_words("ball") == ("ball", "ball") and parse_blend_words("dog:cat") == ("dog", "cat")
    assert parse_reweights(["red=2", "a=-0.5"]) == {"red": 2.0, "a": -0.5}
    for parse, text, message in ((parse_span, "a:b", "`span` 'a:b': give all, or START:END"),
                                 (parse_blend_words, "dog:", "`blend_words` 'dog:': give WORD or"),
                                 (parse_reweights, ["red"], "`reweights` 'red': give WORD=FACTOR")):
        with pytest.raises(RequestError, match=f"^{message}".replace("[", r"\[")):
            parse(text)


def test_a_request_file_holds_every_field_and_refuses_what_is_not_one(tmp_path):
    request = EditRequest(["a cat"], seed=3, span=(None, Fraction(9, 4)), local=LocalEdit(blend_words=("a", "b")))
    path = request.save(tmp_path / "request.json")
    assert json.loads(path.read_text())["span"] == ":9/4" and EditRequest.load(path) == request
    for text, message in (('{"prompts": ["a"], "steps": 3}', "unknown field 'steps'; a request has prompts, "),
                          ('{"prompts": "a cat"}', "`prompts` cannot be 'a cat'"),
                          ('{"prompts": ["a"], "seed": 1.5}', "`seed` cannot be 1.5"),
                          ('{"prompts": ["a"], "audio": 1}', "`audio` cannot be 1"),
                          ('{"prompts": ["a"], "span": ["0", "1"]}', "`span` cannot be ['0', '1']"),
                          ('{"prompts": ["a"], "local": {"reweights": {"a": "2"}}}', "local: `reweights` cannot be"),
                          ('["a"]', "must be a mapping of EditRequest's fields"), ("{", "cannot be read as a JSON request")):
        path.write_text(text)
        with pytest.raises(RequestError) as raised:
            EditRequest.load(path)
        assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value), str(raised.value)


def test_the_command_line_s_flags_are_the_request_s_fields(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").touch()
    (run / "model_index.json").touch()
    _, request = inference.parse_args([
        "--model", str(run), "--prompt", "a cat", "--prompt", "a dog", "--seed", "4", "--span", "all", "--no-audio",
        "--no-gif", "--jpeg-frames", "--control", "replace", "--blend", "cat", "--reweight", "cat=2",
        "--null-text-iterations", "3", "--inversion", "ddim"])
    assert request == EditRequest(["a cat", "a dog"], seed=4, span=(None, None), audio=False, gif=False,
                                  jpeg_frames=True, local=LocalEdit("replace", blend_words=("cat", "cat"),
                                                                    reweights={"cat": 2.0}, null_text_iterations=3,
                                                                    inversion="ddim"))
    # a message of the request speaks of its fields; the command line's, of its flags
    for args, message in ((["--window", "1"], "--window must be >= 2, got 1"),
                          (["--control", "refine", "--blend-start", "2"], "--blend-start must be in [0, 1], got 2.0"),
                          (["--reweight", "cat"], "--reweight 'cat': give WORD=FACTOR"),
                          (["--span", "x"], "argument --span: --span 'x': give all, or START:END")):
        with pytest.raises(UserError) as raised:
            inference.parse_args(["--model", str(run), "--prompt", "a", *args])
        assert message in str(raised.value) and "`" not in str(raised.value), str(raised.value)


def test_loras_are_a_field_kept_by_the_request_file_and_flagged_as_lora(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")  # only its being there is checked before a model loads
    request = EditRequest(["a cat"], loras=[LoraFile(str(lora), 0.35), LoraFile(str(lora))])
    request.check()
    assert EditRequest.load(request.save(tmp_path / "request.json")) == request
    assert json.loads((tmp_path / "request.json").read_text())["loras"] == [
        {"path": str(lora), "scale": 0.35}, {"path": str(lora), "scale": 1.0}]
    args = inference.parser().parse_args(["--model=run", "--prompt=a cat", f"--lora={lora}:0.35", f"--lora={lora}"])
    assert args.loras == request.loras
    for bad, message in (([{"scale": 1.0}], "`path` is missing"), ([{"path": 3}], "`path` cannot be 3"),
                         ([{"path": str(lora), "weight": 1}], "unknown field 'weight'")):
        (tmp_path / "bad.json").write_text(json.dumps({"prompts": ["a cat"], "loras": bad}))
        with pytest.raises(RequestError, match=message):
            EditRequest.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="`loras` .*missing.safetensors: no such file"):
        EditRequest(["a cat"], loras=[LoraFile(str(tmp_path / "missing.safetensors"))]).check()
    with pytest.raises(RequestError, match="the scale must be a finite number"):
        EditRequest(["a cat"], loras=[LoraFile(str(lora), float("inf"))]).check()


def test_controlnets_pair_their_flags_in_order_and_are_kept_by_the_request_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").touch()
    (run / "model_index.json").touch()
    poses = tmp_path / "poses"
    poses.mkdir()

    def parsed(*args: str) -> EditRequest:
        return inference.parse_args(["--model", str(run), "--prompt", "a cat", *args])[1]

    assert parsed().controlnets is None  # the run's own, if it has one
    assert parsed("--no-controlnet").controlnets == []
    request = parsed("--controlnet", "cn/canny", "--controlnet", "cn/pose", "--condition", "canny", "--condition",
                     str(poses), "--controlnet-scale", "0.8", "--controlnet-scale", "0.5", "--canny-thresholds",
                     "50:150", "--no-controlnet-inversion")
    assert request.controlnets == [ControlNetConfig("cn/canny", "canny", 0.8),
                                   ControlNetConfig("cn/pose", str(poses), 0.5)]
    assert (request.canny_thresholds, request.controlnet_inversion) == ((50.0, 150.0), False)
    assert parsed("--controlnet", "cn/depth").controlnets == [ControlNetConfig("cn/depth", "canny", 1.0)]
    assert EditRequest.load(request.save(tmp_path / "request.json")) == request
    assert json.loads((tmp_path / "request.json").read_text())["controlnets"][1] == {
        "model": "cn/pose", "condition": str(poses), "scale": 0.5}
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": ["a cat"], "controlnets": [{"condition": "canny"}]}))
    with pytest.raises(RequestError, match="controlnets\\[0\\]: `model` is missing"):
        EditRequest.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="--controlnet-scale: given 1 times for 2 --controlnet"):
        parsed("--controlnet", "a", "--controlnet", "b", "--controlnet-scale", "1")
