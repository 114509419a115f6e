"""The main job (`dq run`) and the console script, on a tiny pipeline saved offline."""

import json

import pytest

from dq.cli import main
from dq.demo import DemoSettings, run_demo
from dq.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


def test_run_demo_writes_report_grid_and_loadable_pipeline(tiny_dir, tmp_path):
    out = tmp_path / "run"
    report = run_demo(DemoSettings(out=out, config="w8a8", pipeline=str(tiny_dir), num_prompts=2, steps=2))
    assert (out / "grid.png").is_file() and (out / "report.md").is_file()
    saved = json.loads((out / "report.json").read_text())
    # int8 codes + the CPU engine's prepacked int8 copy (2 bytes/weight) vs 4 bytes fp32
    assert saved["unet_weight_bytes"]["ratio"] < 0.6
    assert saved["quantized"]["psnr_vs_ref"] > 10
    assert report["config"] == "w8a8"
    import dq

    pipe = dq.load(out / "pipeline")
    assert any(type(m).__name__ == "QLinear" for m in pipe.unet.modules())


def test_cli_lists_presets_and_formats(capsys):
    assert main(["presets"]) == 0
    assert "w8a8" in capsys.readouterr().out
    assert main(["formats"]) == 0
    assert "fp4_e2m1" in capsys.readouterr().out


def test_cli_bad_preset_is_a_clear_error(tiny_dir, tmp_path, capsys):
    code = main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--config", "w3a1"])
    assert code == 2
    assert "unknown preset" in capsys.readouterr().err


def test_cli_quantize_round_trip(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--config", "w8a8",
                 "--prompts", str(prompts), "--steps", "2"]) == 0
    assert (tmp_path / "q" / "unet" / "config.json").is_file()
    cfg = json.loads((tmp_path / "q" / "unet" / "config.json").read_text())
    assert "quantization_config" in cfg
