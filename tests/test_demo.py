"""The main job (`dq run`) and the console script, on a tiny pipeline saved offline."""

import json

import pytest

from dq.cli import main
from dq.demo import DemoSettings, real_size_speed, run_demo
from dq.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


def _tiny_unet_config() -> dict:
    unet = tiny_sd_pipeline(seed=0).unet
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def demo_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    report = run_demo(DemoSettings(out=out, config="w8a8", pipeline=str(tiny_dir), num_prompts=4, steps=2,
                                   real_size=False))
    return out, report


def test_run_demo_writes_report_grid_and_loadable_pipeline(demo_run):
    out, report = demo_run
    assert (out / "grid.png").is_file() and (out / "report.md").is_file()
    assert (out / "images" / "reference" / "0.png").is_file()  # dq.evaluate made the images
    saved = json.loads((out / "report.json").read_text())
    assert saved["quantized"]["psnr_vs_ref"] > 10
    assert report["config"] == "w8a8"
    import dq

    pipe = dq.load(out / "pipeline")
    assert any(type(m).__name__ == "QLinear" for m in pipe.unet.modules())


def test_run_demo_counts_weights_against_fp16_stored_and_resident(demo_run):
    out, _ = demo_run
    w = json.loads((out / "report.json").read_text())["unet_weight_bytes"]
    assert w["fp32"] == 2 * w["fp16"]
    # int8 codes + per-channel scales + float biases/norms: about half of fp16, one copy resident
    # (a ratio against fp32 would be ~0.27; codes plus a second engine copy ~1.0)
    assert 0.45 < w["stored_vs_fp16"] < 0.65
    assert 0.45 < w["resident_vs_fp16"] < 0.65
    assert w["stored_vs_fp16"] == pytest.approx(w["stored"] / w["fp16"], abs=1e-4)
    assert 8 <= w["avg_bits"] < 10
    md = (out / "report.md").read_text()
    assert "vs fp16" in md and "resident after a forward" in md and f"{w['resident']:,}" in md


def test_run_demo_metrics_come_with_bootstrap_intervals(demo_run):
    out, _ = demo_run
    r = json.loads((out / "report.json").read_text())
    assert "bootstrap" in r["intervals"]["method"] and "4 prompts" in r["intervals"]["method"]
    q, ci = r["quantized"], r["intervals"]["quantized"]
    for k in ("clip_score", "psnr_vs_ref", "ssim_vs_ref", "feature_dist_vs_ref"):
        lo, hi = ci[k]
        assert lo <= q[k] <= hi, (k, lo, q[k], hi)
    assert ci["psnr_vs_ref"][0] < ci["psnr_vs_ref"][1]  # 4 different images: a real spread
    assert "clip_score" in r["intervals"]["fp"] and "psnr_vs_ref" not in r["fp"]
    assert r["quantized"]["fid_ref"] >= 0 and "fid_ref" not in ci  # a set statistic: no interval
    md = (out / "report.md").read_text()
    lo, hi = ci["psnr_vs_ref"]
    assert f"[{lo:.4g}, {hi:.4g}]" in md


def test_run_demo_speed_section_says_which_figure_is_which(demo_run):
    out, _ = demo_run
    sp = json.loads((out / "report.json").read_text())["speed"]
    assert "skipped" in sp["sd15_unet"] and "--no-real-size" in sp["sd15_unet"]["skipped"]
    for k in ("embedded_unet", "embedded_pipeline_per_image"):
        assert sp[k]["fp32_s"] > 0 and sp[k]["quantized_s"] > 0
        assert sp[k]["speedup"] == pytest.approx(sp[k]["fp32_s"] / sp[k]["quantized_s"], rel=0.01)
    md = (out / "report.md").read_text()
    assert "## Speed" in md and "UNet forward" in md and "pipeline, per image" in md
    assert "SD 1.5 UNet timing was skipped" in md
    if sp["embedded_unet"]["speedup"] < 1:
        assert "per-call overhead" in md


def test_real_size_speed_times_fp32_and_quantized_and_counts_fp16():
    cfg = _tiny_unet_config()
    r = real_size_speed("w8a8", unet_config=cfg, latent=8, repeats=3)
    assert r["fp32_s"] > 0 and r["quantized_s"] > 0
    # fp32 and quantized forwards alternate: each median lies within its own range
    assert r["fp32_range_s"][0] <= r["fp32_s"] <= r["fp32_range_s"][1]
    assert r["quantized_range_s"][0] <= r["quantized_s"] <= r["quantized_range_s"][1]
    assert r["speedup"] == pytest.approx(r["fp32_s"] / r["quantized_s"], rel=0.01)
    assert r["fp16_bytes"] == 2 * r["params"] and r["fp32_resident_bytes"] >= 2 * r["fp16_bytes"]
    assert 0.4 < r["resident_vs_fp16"] < 0.7  # int8, one copy held after the first forward
    assert r["plan"] == "w8a8"


def test_real_size_speed_carries_a_mixed_plan_by_layer_group():
    import dq

    cfg = _tiny_unet_config()
    plan = {"content": dq.LayerSpec("fp4_e2m1", "channel", act="uint8"),
            "quality": dq.LayerSpec("int4", "channel", act="uint8")}
    r = real_size_speed(None, unet_config=cfg, group_plan=plan, latent=8, repeats=1)
    assert "fp4_e2m1" in r["plan"] and "int4" in r["plan"]
    assert r["resident_vs_fp16"] < 0.75  # 4-bit codes (the engine may hold int8 copies of some)


def test_run_demo_with_the_real_size_line(tiny_dir, tmp_path, monkeypatch):
    import dq.demo as demo

    monkeypatch.setattr(demo, "real_size_unet_config", _tiny_unet_config)
    out = tmp_path / "run"
    r = run_demo(DemoSettings(out=out, config="w8a8", pipeline=str(tiny_dir), num_prompts=2, steps=1,
                              save=False, real_size_latent=8, real_size_repeats=1))
    s = r["speed"]["sd15_unet"]
    assert s["fp32_s"] > 0 and s["quantized_s"] > 0 and s["latent"] == 8
    md = (out / "report.md").read_text()
    assert "**SD 1.5 UNet forward** (real size" in md and "8x8 latent" in md and "alternated" in md


@pytest.mark.parametrize("field,value", [("real_size_latent", 12), ("real_size_repeats", 0), ("evaluator", "x")],
                         ids=["latent-not-multiple-of-8", "no-repeats", "unknown-evaluator"])
def test_demo_settings_refuse_bad_real_size_values(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        DemoSettings(out=tmp_path / "o", **{field: value}).check()


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
