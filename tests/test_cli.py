"""The `dq` command line: calibration flags and their defaults, the end-of-run summary,
`dq inspect`, `--version`, and early refusals (before anything loads) that name the flag."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline

import dq
from dq.cli import main
from dq.testing import tiny_sd_pipeline

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "dq" / "data" / "tiny-shapes"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\na blue square\na green triangle\n")
    return f


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Records the keyword arguments of every StableDiffusionPipeline call."""
    calls: list[dict] = []
    real = StableDiffusionPipeline.__call__

    def call(self, *a, **kw):
        calls.append({k: v for k, v in kw.items() if k not in ("prompt", "generator")}
                     | {"n": len(kw.get("prompt") or [])})
        return real(self, *a, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    return calls


@pytest.fixture
def no_loading(monkeypatch):
    """Make any pipeline load fail loudly: a refusal must come before it."""

    def refuse(*a, **k):
        raise AssertionError("the pipeline was loaded before the bad input was refused")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    import dq.demo

    monkeypatch.setattr(dq.demo, "_load", refuse)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- flags and defaults


def test_flags_reach_the_calibration_call(tiny_dir, prompts_file, tmp_path, pipeline_calls, capsys):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_dir), str(out), "--config", "w8a8", "--prompts", str(prompts_file),
                 "--steps", "2", "--guidance", "3.5", "--height", "16", "--width", "24",
                 "--num-prompts", "2", "--batch-size", "1", "--seed", "7", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(pipeline_calls) == 2  # 2 prompts, one per call
    for c in pipeline_calls:
        assert c["num_inference_steps"] == 2 and c["guidance_scale"] == 3.5
        assert (c["height"], c["width"], c["n"]) == (16, 24, 1)
    text = capsys.readouterr().out
    # the summary: layers per format, bytes against fp16, time per stage
    assert "int8/channel, act uint8" in text and "of" in text and "in fp16" in text
    assert "time: load" in text and "calibration" in text and "save" in text
    from dq import summary

    info = summary.inspect_folder(out)
    cal = info["components"]["unet"]["calibration"]
    assert cal["num_prompts"] == 2 and cal["sampling"]["seed"] == 7
    assert cal["sampling"]["guidance_scale"] == 3.5


def test_recipe_and_pipeline_defaults_reach_the_call(tmp_path, pipeline_calls, capsys):
    """The embedded pipeline: no --prompts (the recipe ships its captions); guidance and size
    from the folder's own dq_defaults.json (4.0, 32x32), steps from the flag."""
    out = tmp_path / "q"
    code = main(["quantize", str(EMBEDDED), str(out), "--steps", "1", "--num-prompts", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    defaults = json.loads((EMBEDDED / "dq_defaults.json").read_text())
    assert pipeline_calls and sum(c["n"] for c in pipeline_calls) == 3
    c = pipeline_calls[0]
    assert c["num_inference_steps"] == 1
    assert c["guidance_scale"] == defaults["guidance_scale"]
    assert (c["height"], c["width"]) == (defaults["height"], defaults["width"])
    assert "recipe embedded" in capsys.readouterr().out


def test_weight_only_preset_needs_no_prompts(tiny_dir, tmp_path, pipeline_calls, capsys):
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--config", "w4a16", "--quiet"]) == 0
    assert pipeline_calls == []  # no calibration run at all
    assert "int4/" in capsys.readouterr().out


def test_rounding_flag_reaches_dq_quantize_and_is_recorded(tiny_dir, prompts_file, tmp_path, pipeline_calls, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), str(out), "--config", "w4a16", "--rounding", "search",
                 "--prompts", str(prompts_file), "--steps", "2", "--quiet"]) == 0  # fmt: skip
    assert len(pipeline_calls) >= 1  # weight-only, yet calibrated: the search reads layer inputs
    from dq import summary

    assert summary.inspect_folder(out)["components"]["unet"]["calibration"]["rounding"] == "search"


def test_cli_rounding_choices_are_the_librarys():
    import dq.api
    import dq.cli

    assert dq.cli.ROUNDINGS == dq.api.ROUNDINGS


def test_help_shows_recipe_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--guidance", "--height", "--width", "--num-prompts", "--batch-size",
                 "--seed", "--dtype", "--device", "--overwrite"):
        assert flag in text
    assert "from the model's recipe" in text and "sdxl_turbo" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"dq {dq.__version__}"


def test_presets_and_formats_say_what_needs_prompts_and_what_can_be_activations(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "needs prompts" in text and "w8a8" in text
    assert main(["formats"]) == 0
    text = capsys.readouterr().out
    assert "as activation" in text and "integer engine" in text


# ----------------------------------------------------------------------------- dq inspect


def test_inspect_summarises_a_saved_folder(tiny_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), str(out), "--prompts", str(prompts_file), "--steps", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"dq {dq.__version__}" in text and "plan 'w8a8'" in text
    assert "content" in text and "quality" in text and "int8/channel, act uint8" in text
    assert "MB" in text or "kB" in text
    assert "calibrated on 3 prompts" in text and "num_inference_steps=1" in text


def test_inspect_refuses_what_is_not_a_dq_folder(tiny_dir, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in _err(capsys)
    assert main(["inspect", str(tiny_dir)]) == 2
    assert "no dq-quantized component" in _err(capsys)


# ----------------------------------------------------------------------------- early refusals


def _bad_quantize_cases(tiny_dir, tmp_path, prompts_file):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "user").mkdir()
    (tmp_path / "user/photo.jpg").write_text("x")
    t, p = str(tiny_dir), str(prompts_file)
    q = str(tmp_path / "q")
    return {
        "pipeline-typo": (["quantize", t + "x", q], r"PIPELINE .* does not exist.*spelling"),
        "relative-typo": (["quantize", "tiny-pipe", q], r"PIPELINE 'tiny-pipe' does not exist"),
        "pipeline-not-a-pipeline": (["quantize", str(tmp_path), q], r"not a diffusers pipeline folder"),
        "unknown-preset": (["quantize", t, q, "--config", "w3a1"], r"--config 'w3a1': unknown preset.*w8a8"),
        "missing-config-json": (["quantize", t, q, "--config", str(tmp_path / "nope.json")], r"--config .* does not exist"),
        "malformed-config-json": (["quantize", t, q, "--config", str(tmp_path / "bad.json")], r"--config .* is not valid JSON"),
        "invalid-config-json": (["quantize", t, q, "--config", _write(tmp_path / "c.json", {"default": {"weight": "int9"}})],
                                r"--config .* not a valid QuantConfig.*unknown weight format"),
        "missing-prompts": (["quantize", t, q, "--prompts", str(tmp_path / "p.txt")], r"--prompts .* does not exist"),
        "empty-prompts": (["quantize", t, q, "--prompts", str(tmp_path / "empty.txt")], r"--prompts .* has no prompts"),
        "act-preset-no-prompts": (["quantize", t, q, "--config", "w8a8"], r"--prompts FILE"),
        "search-no-prompts": (["quantize", t, q, "--config", "w4a16", "--rounding", "search"],
                              r"--rounding search reads each layer's inputs.*--prompts FILE"),
        "out-is-a-file": (["quantize", t, str(tmp_path / "a_file"), "--prompts", p], r"OUT: .*is a file"),
        "out-under-a-file": (["quantize", t, str(tmp_path / "a_file/q"), "--prompts", p], r"OUT: .*is a file"),
        "out-is-source": (["quantize", t, t, "--prompts", p], r"OUT .* is the pipeline folder being quantized.*--overwrite"),
        "out-is-cwd": (["quantize", t, ".", "--prompts", p], r"current working folder"),
        "out-not-dq": (["quantize", t, str(tmp_path / "user"), "--prompts", p], r"dq did not write.*--overwrite"),
        "steps-0": (["quantize", t, q, "--steps", "0"], r"--steps 0: must be at least 1"),
        "height-not-8": (["quantize", t, q, "--height", "30"], r"--height 30: must be a multiple of 8"),
        "guidance-negative": (["quantize", t, q, "--guidance", "-1"], r"--guidance -1.0: must be >= 0"),
        "num-prompts-0": (["quantize", t, q, "--num-prompts", "0"], r"--num-prompts 0"),
        "device-bogus": (["quantize", t, q, "--device", "gpu7", "--prompts", p], r"--device 'gpu7' is not a device"),
    }


def _write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_quantize_refuses_bad_input_before_loading(tiny_dir, tmp_path, prompts_file, no_loading, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for case, (argv, pattern) in _bad_quantize_cases(tiny_dir, tmp_path, prompts_file).items():
        assert main(argv) == 2, case
        err = _err(capsys)
        assert re.search(pattern, err), f"{case}: {err}"
        assert "calib_prompts" not in err, case
    assert not (tmp_path / "q").exists()
    assert (tmp_path / "user/photo.jpg").read_text() == "x"


def test_run_refuses_bad_input_before_loading(tmp_path, no_loading, capsys):
    (tmp_path / "a_file").write_text("x")
    cases = {
        "num-prompts-0": (["run", "--num-prompts", "0"], "--num-prompts 0"),
        "num-prompts-1": (["run", "--num-prompts", "1"], "--num-prompts 1"),
        "unknown-preset": (["run", "--config", "w9a9"], "--config 'w9a9': unknown preset"),
        "steps-0": (["run", "--steps", "0"], "--steps 0"),
        "out-is-a-file": (["run", "--out", str(tmp_path / "a_file")], "--out .* is a file"),
        "pipeline-typo": (["run", "--pipeline", str(tmp_path / "nope")], "--pipeline .* does not exist"),
    }
    for case, (argv, pattern) in cases.items():
        assert main(argv) == 2, case
        err = _err(capsys)
        assert re.search(pattern, err), f"{case}: {err}"


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("dq")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dq.cli"]
    res = subprocess.run([*cmd, "quantize", "tiny-pipe", "out"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "PIPELINE 'tiny-pipe' does not exist" in res.stderr


def test_run_flags_reach_the_demo_settings(tmp_path, monkeypatch):
    import dq.demo

    seen = []
    monkeypatch.setattr(dq.demo, "run_demo", lambda s: seen.append(s))
    assert main(["run", "--out", str(tmp_path / "r"), "--no-real-size", "--num-prompts", "3"]) == 0
    assert main(["run", "--out", str(tmp_path / "r2")]) == 0
    assert [s.real_size for s in seen] == [False, True] and seen[0].num_prompts == 3
