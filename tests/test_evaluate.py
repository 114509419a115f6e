"""dq.evaluate: resumable batch evaluation, sharding, reports, bad input, the offline real-model path.

Tiny random pipelines (`dq.testing.tiny_sd_pipeline`, 64x64, 2 steps) saved to tmp folders,
judged by the embedded world's evaluators (fast), except the standard-path test, which uses a
random-weight open_clip ViT and a random-weight Inception loaded from local files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import dq
from dq import evaluate as E
from dq.testing import tiny_sd_pipeline

G = importlib.import_module("dq.generate")  # the module (dq.generate the attribute is the function)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small red square",
           "a large blue circle", "a yellow star"]  # fmt: skip
SAMPLING = dq.Sampling(num_inference_steps=2, guidance_scale=1.0, batch_size=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two saved tiny pipelines, a prompt file and a folder of real (embedded-world) images."""
    root = tmp_path_factory.mktemp("eval")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "fp")
    tiny_sd_pipeline(seed=1).save_pretrained(root / "other")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    from dq.assets import heldout_prompts, real_images

    _, labels = heldout_prompts(8)
    (root / "real").mkdir()
    for i, im in enumerate(real_images(labels)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / "real" / f"{i}.png")
    return root


def run(world, out, models=("other",), counter=None, **kw):
    kw.setdefault("evaluators", "embedded")
    kw.setdefault("settings", E.EvalSettings(bootstrap=200))
    return E.evaluate([world / m for m in models], world / "prompts.txt", reference=world / "fp",
                      real=world / "real", out=out, sampling=SAMPLING, progress=False,
                      _counter=counter, **kw)  # fmt: skip


def quality(report):
    """name -> metrics and intervals (what must not depend on processes or resumption)."""
    return {r["name"]: (r["metrics"], r["ci"]) for r in report["models"]}


@pytest.fixture(scope="module")
def first(world):
    counter = {}
    out = world / "out1"
    return run(world, out, counter=counter), out, counter


def test_report_files_and_metrics(first):
    rep, out, counter = first
    assert counter == {"reference": 6, "other": 6}
    assert sorted(int(p.stem) for p in (out / "other").glob("*.png")) == list(range(6))
    for f in ("report.json", "report.csv", "report.md", "grid.png"):
        assert (out / f).is_file(), f
    ref, other = rep["models"]
    assert ref["role"] == "reference" and ref["metrics"]["fid_ref"] is None
    m = other["metrics"]
    assert {"fid_real", "fid_ref", "clip_score", "psnr_vs_ref", "ssim_vs_ref", "feature_dist_vs_ref"} <= set(m)
    lo, hi = other["ci"]["psnr_vs_ref"]
    assert lo <= m["psnr_vs_ref"] <= hi
    assert other["weights"]["avg_bits"] == pytest.approx(32.0)  # float32 tiny UNet
    assert other["latency_s_per_image"]["timed"] == 6 and other["peak_rss_bytes"] > 0
    md = (out / "report.md").read_text()
    assert f"resize: {rep['fid']['resize']}" in md  # the FID resize mode is printed
    assert "| other |" in md and "Command:" in md
    assert Image.open(out / "grid.png").size[1] > 2 * E.EvalSettings().grid_cell


def test_fid_of_a_set_against_itself_is_zero(world, tmp_path):
    rep = run(world, tmp_path / "self", models=("fp",))  # the model is the reference itself
    m = rep["models"][1]["metrics"]
    assert m["fid_ref"] == pytest.approx(0.0, abs=1e-3)
    assert m["psnr_vs_ref"] == pytest.approx(100.0)  # identical images (dq.metrics clamps at 100 dB)
    assert m["ssim_vs_ref"] == pytest.approx(1.0, abs=1e-6)
    assert rep["models"][0]["metrics"]["fid_real"] == pytest.approx(m["fid_real"])


def test_resume_after_interruption_regenerates_nothing(world, first, tmp_path, monkeypatch):
    rep1, _, _ = first
    real_generate = G.generate
    calls = {"n": 0}

    def dying(*a, **k):  # the second batch "crashes"
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(G, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "r")
    monkeypatch.setattr(G, "generate", real_generate)
    assert len(list((tmp_path / "r" / "reference").glob("*.png"))) == 4  # one batch of 4 written
    counter = {}
    rep = run(world, tmp_path / "r", counter=counter)
    assert counter == {"reference": 2, "other": 6}  # only what was missing
    counter = {}
    rep = run(world, tmp_path / "r", counter=counter)
    assert counter == {}
    assert quality(rep) == quality(rep1)
    assert list((tmp_path / "r" / ".stats").glob("fid-*.safetensors"))  # cached statistics


def test_shards_give_the_numbers_of_one_process(world, first, tmp_path):
    rep1, out1, _ = first
    out = tmp_path / "sharded"
    assert run(world, out, shard=(1, 2)) == {}
    rep = run(world, out, shard=(0, 2))
    assert quality(rep) == quality(rep1)
    for i in range(6):
        assert (out / "other" / f"{i}.png").read_bytes() == (out1 / "other" / f"{i}.png").read_bytes()


def test_accelerate_two_cpu_processes(world, first, tmp_path):
    """A real `accelerate launch` of two CPU processes (torchrun + gloo; `--cpu` alone would
    start one): the same images and numbers as one process."""
    rep1, _, _ = first
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, torch\ntorch.set_num_threads(1)\nimport dq\nfrom dq import evaluate as E\n"
        f"root = {str(world)!r}\n"
        "E.evaluate([root + '/other'], root + '/prompts.txt', reference=root + '/fp', real=root + '/real',\n"
        "           out=sys.argv[1], sampling=dq.Sampling(num_inference_steps=2, guidance_scale=1.0, batch_size=4),\n"
        "           evaluators='embedded', progress=False, settings=E.EvalSettings(bootstrap=200))\n"
    )
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    res = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                          str(tmp_path / "acc")], capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp_path / "acc" / "report.json").read_text())
    assert rep["processes"] == 2
    per = json.loads((tmp_path / "acc" / "per_image.json").read_text())
    assert per == {r["name"]: r["per_image"] for r in rep1["models"]}
    assert {r["name"]: r["metrics"] for r in rep["models"]} == {r["name"]: r["metrics"] for r in rep1["models"]}
    print(f"accelerate 2-process run: {time.time() - t0:.1f} s")


# ------------------------------------------------------------------------------- bad input


def _bad_cases(world, tmp):
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "broken.json").write_text("{not json")
    (tmp / "notcoco.json").write_text(json.dumps({"images": []}))
    (tmp / "p.csv").write_text("id,text\n1,a red circle\n2,a blue square\n")
    (tmp / "realempty").mkdir()
    (tmp / "mixed").mkdir()
    Image.new("RGB", (32, 32)).save(tmp / "mixed" / "a.png")
    Image.new("RGB", (48, 32)).save(tmp / "mixed" / "b.png")
    (tmp / "unet_only").mkdir()
    (tmp / "unet_only" / "config.json").write_text("{}")
    tiny_sd_pipeline(seed=0, sample_size=4).save_pretrained(tmp / "small")  # 32x32 images
    prompts = world / "prompts.txt"
    return {
        "empty prompt file": ({"prompts": tmp / "empty.txt"}, "holds no prompts"),
        "malformed json": ({"prompts": tmp / "broken.json"}, "not valid JSON"),
        "json without captions": ({"prompts": tmp / "notcoco.json"}, "not COCO captions"),
        "missing column": ({"prompts": tmp / "p.csv", "column": "caption"}, "no column 'caption'"),
        "missing prompt file": ({"prompts": tmp / "nope.txt"}, "does not exist"),
        "missing real folder": ({"prompts": prompts, "real": tmp / "nowhere"}, "does not exist"),
        "empty real folder": ({"prompts": prompts, "real": tmp / "realempty"}, "holds 0 images"),
        "mixed real sizes": ({"prompts": prompts, "real": tmp / "mixed"}, "differ in size"),
        "not a pipeline": ({"prompts": prompts, "models": [tmp / "unet_only"]}, "no model_index.json"),
        "mismatched model sizes": ({"prompts": prompts, "models": [tmp / "small"]}, "different sizes"),
        "too many images": ({"prompts": prompts, "num_images": 99}, "holds 6"),
    }


CASES = ["empty prompt file", "malformed json", "json without captions", "missing column",
         "missing prompt file", "missing real folder", "empty real folder", "mixed real sizes",
         "not a pipeline", "mismatched model sizes", "too many images"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_before_generation(world, tmp_path, monkeypatch, case):
    kw, message = _bad_cases(world, tmp_path)[case]
    monkeypatch.setattr(G, "generate", lambda *a, **k: pytest.fail("generated before checking"))
    models = kw.pop("models", [world / "other"])
    kw.setdefault("real", world / "real")
    with pytest.raises(ValueError, match=message):
        E.evaluate(models, reference=world / "fp", out=tmp_path / "out", sampling=SAMPLING,
                   evaluators="embedded", progress=False, **kw)  # fmt: skip
    assert not list((tmp_path / "out").rglob("*.png"))


def test_prompt_formats_and_selection(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"annotations": [{"caption": " a dog "}, {"caption": "a cat"}]}))
    assert E.read_prompts(tmp_path / "c.json") == ["a dog", "a cat"]
    (tmp_path / "p.tsv").write_text("id\tprompt\n1\ta red circle\n2\ta blue square\n")
    assert E.read_prompts(tmp_path / "p.tsv") == ["a red circle", "a blue square"]
    (tmp_path / "p.csv").write_text('id,text\n1,"a cat, sitting"\n')
    assert E.read_prompts(tmp_path / "p.csv", column="text") == ["a cat, sitting"]
    with pytest.raises(ValueError, match="--column"):
        (tmp_path / "q.csv").write_text("id,words\n1,x\n")
        E.read_prompts(tmp_path / "q.csv")
    items = [f"p{i}" for i in range(50)]
    a, b = E.select_prompts(items, 10, seed=0), E.select_prompts(items, 20, seed=0)
    assert a == b[:10] and len(set(b)) == 20 and a != items[:10]
    assert E.select_prompts(items, None) == items


def test_cli_and_compare(world, first, tmp_path):
    _, out1, _ = first
    parser = argparse.ArgumentParser(prog="dq")
    E.add_cli(parser.add_subparsers(dest="command"))
    shutil.copytree(out1, tmp_path / "run")  # a resumed run: scoring only
    args = parser.parse_args([
        "eval", str(world / "other"), "--prompts", str(world / "prompts.txt"), "--reference",
        str(world / "fp"), "--real", str(world / "real"), "--out", str(tmp_path / "run"),
        "--steps", "2", "--guidance", "1.0", "--batch-size", "4", "--evaluator", "embedded",
        "--quiet", "--compare", str(out1),
    ])  # fmt: skip
    assert args.func(args) == 0
    assert (tmp_path / "run" / "pareto.png").is_file()
    assert "dq eval" in (tmp_path / "run" / "report.md").read_text()
    png = E.compare([out1, E._load_run(out1)], tmp_path / "p.png", x="bytes")
    assert Image.open(png).size[0] > 300
    with pytest.raises(ValueError, match="report.json"):
        E.compare([tmp_path / "nothing"], tmp_path / "q.png")


# ------------------------------------------------------------------------------- real-model path


def _tiny_open_clip(tmp_path) -> tuple[str, Path]:
    import open_clip

    name = "dq-test-vit"
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    model = open_clip.create_model(name, pretrained=None)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    return name, tmp_path / "clip.pt"


def _random_inception(tmp_path, monkeypatch) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:  # build it without its download, keep the random init
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    return tmp_path / "inception.pth"


def _standard_run(first, tmp_path, monkeypatch, lpips: bool) -> tuple[str, E.EvalSettings]:
    """(open_clip model name, settings) of the standard judges from local random weights, and a
    copy of the first run's images under tmp_path / "run" to score again."""
    _, out1, _ = first
    name, clip_path = _tiny_open_clip(tmp_path)
    inception = _random_inception(tmp_path, monkeypatch)
    shutil.copytree(out1, tmp_path / "run", ignore=shutil.ignore_patterns(".stats", "report*"))
    settings = E.EvalSettings(evaluator="standard", clip_model=name, clip_weights=str(clip_path),
                              inception_weights=str(inception), fid_feature=64, lpips=lpips,
                              bootstrap=50)  # fmt: skip  (the 64-d tap: only Inception's first blocks run)
    return name, settings


def test_standard_judges_offline_from_local_weights(world, first, tmp_path, monkeypatch):
    name, settings = _standard_run(first, tmp_path, monkeypatch, lpips=False)
    counter = {}
    rep = run(world, tmp_path / "run", evaluators=None, settings=settings, counter=counter)
    assert counter == {}  # images reused: only the judges changed
    assert "inception-v3-compat pool 64" in rep["fid"]["feature"] and "299x299" in rep["fid"]["resize"]
    assert rep["clip"].startswith(f"open_clip {name} (clip.pt)")
    m = rep["models"][1]["metrics"]
    for k in ("fid_real", "fid_ref", "clip_score", "feature_dist_vs_ref"):
        assert m[k] is not None and m[k] == m[k], k  # finite, not NaN
    assert "resize:" in (tmp_path / "run" / "report.md").read_text()


# LPIPS offline: torchvision's AlexNet weights from a local file in torch's hub cache (as after a
# first online run; here randomly initialised), the LPIPS heads from torchmetrics' package.


@pytest.fixture
def offline_alexnet(tmp_path, monkeypatch):
    import torch.hub
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = torchvision.models.AlexNet_Weights.DEFAULT.url
    ckpt = tmp_path / "torch-home" / "hub" / "checkpoints" / os.path.basename(url)
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt)

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return ckpt


def test_lpips_vs_reference_runs_offline(world, first, tmp_path, monkeypatch, offline_alexnet):
    _, settings = _standard_run(first, tmp_path, monkeypatch, lpips=True)
    rep = run(world, tmp_path / "run", evaluators=None, settings=settings, counter={})
    assert rep["perceptual"].startswith("LPIPS (alex, torchmetrics)"), rep.get("perceptual")
    ref, q = rep["models"][0]["metrics"], rep["models"][1]["metrics"]
    assert "feature_dist_vs_ref" not in q or q["feature_dist_vs_ref"] is None
    assert q["lpips_vs_ref"] is not None and q["lpips_vs_ref"] > 0  # quantized images differ
    if ref.get("lpips_vs_ref") is not None:
        assert ref["lpips_vs_ref"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
