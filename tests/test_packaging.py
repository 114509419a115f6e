"""The wheel ships the embedded default: pipeline, evaluators, prompt files, world generator.

One wheel is built (from a copy of the checkout, so the working tree is left alone) and read
as a zip; one test installs it by unpacking onto PYTHONPATH and runs `dq.assets` from an
empty folder in a fresh interpreter, the way an installed dq sees itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

import dq
import dq.assets

ROOT = Path(__file__).resolve().parents[1]

# Files the embedded default cannot run without, relative to dq/.
REQUIRED = [
    "world.py",
    "assets.py",
    "data/tiny-shapes/model_index.json",
    "data/tiny-shapes/dq_defaults.json",
    "data/tiny-shapes/calibration_prompts.txt",
    "data/tiny-shapes/scheduler/scheduler_config.json",
    "data/tiny-shapes/tokenizer/tokenizer.json",
    "data/tiny-shapes/tokenizer/tokenizer_config.json",
    "data/tiny-shapes/text_encoder/config.json",
    "data/tiny-shapes/text_encoder/model.safetensors",
    "data/tiny-shapes/unet/config.json",
    "data/tiny-shapes/unet/diffusion_pytorch_model.safetensors",
    "data/tiny-shapes/vae/config.json",
    "data/tiny-shapes/vae/diffusion_pytorch_model.safetensors",
    "data/evaluators/heldout_prompts.json",
    "data/evaluators/attributes/config.json",
    "data/evaluators/attributes/model.safetensors",
    "data/evaluators/clip/config.json",
    "data/evaluators/clip/model.safetensors",
    "data/evaluators/clip/tokenizer/vocab.json",
    "data/evaluators/clip/tokenizer/merges.txt",
    "data/evaluators/clip/tokenizer/tokenizer.json",
    "data/evaluators/clip/tokenizer/tokenizer_config.json",
]
# Probe files added to the copy only: the package-data rule must ship any file type at any
# depth, also in folders that are not Python packages.
PROBES = ["_probe/notes.txt", "_probe/deep/er/table.json", "_probe/deep/weights.safetensors",
          "_probe/odd.ext"]  # fmt: skip


def _source_files(pkg: Path) -> set[str]:
    """Files under a dq/ folder, relative to it, bytecode caches left out."""
    return {
        p.relative_to(pkg).as_posix()
        for p in pkg.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel file, the dq/ folder it was built from)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dq", src / "dq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for rel in PROBES:
        (src / "dq" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "dq" / rel).write_text(f"probe {rel}\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--no-cache-dir", "-q", "-w", str(tmp / "dist"), str(src)]  # fmt: skip
    res = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout}\n{res.stderr}"
    wheels = list((tmp / "dist").glob("dq-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], src / "dq"


def test_wheel_holds_the_embedded_default(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [rel for rel in REQUIRED if f"dq/{rel}" not in names]
    assert not missing, f"not in the wheel: {missing}"


def test_wheel_ships_every_file_under_dq(built):
    wheel, pkg = built
    with zipfile.ZipFile(wheel) as zf:
        shipped = {i.filename[3:]: i for i in zf.infolist() if i.filename.startswith("dq/")}
    source = _source_files(pkg)
    assert set(PROBES) <= source
    assert source - set(shipped) == set(), "files under dq/ the package-data rule leaves out"
    assert not [n for n in shipped if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    for rel in REQUIRED:  # same bytes as the checkout
        if rel.endswith(".safetensors"):
            assert shipped[rel].CRC == zlib.crc32((pkg / rel).read_bytes()), rel


def test_wheel_declares_the_dq_command(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        ep = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(ep).decode()
    assert "dq = dq.cli:main" in text


def test_installed_wheel_finds_its_data_from_an_empty_folder(built, tmp_path):
    wheel, _ = built
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import json, dq, dq.assets, dq.world\n"
        "w = dq.assets.world()\n"
        "print(json.dumps({'dq': dq.__file__, 'assets': str(dq.assets.assets_dir()),\n"
        "  'defaults': dq.assets.embedded_defaults(), 'n_calib': len(dq.assets.calibration_prompts()),\n"
        "  'n_heldout': len(dq.assets.heldout_prompts(5)[0]), 'world_is_dq_world': w is dq.world,\n"
        "  'image_size': w.IMAGE_SIZE}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DQ_ASSETS"}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["dq"]).resolve().is_relative_to(site.resolve()), out["dq"]
    assert Path(out["assets"]) == (site / "dq" / "data").resolve()
    assert out["defaults"]["height"] == 32 and out["n_calib"] == 64 and out["n_heldout"] == 5
    assert out["world_is_dq_world"] and out["image_size"] == 32


def test_assets_dir_is_the_package_data_folder(monkeypatch):
    monkeypatch.delenv("DQ_ASSETS", raising=False)
    root = dq.assets.assets_dir()
    assert root == Path(dq.__file__).resolve().parent / "data"
    assert dq.assets.embedded_pipeline_path() == root / "tiny-shapes"
    assert (root / "evaluators" / "heldout_prompts.json").is_file()


def test_dq_assets_env_overrides(monkeypatch, tmp_path):
    data = Path(dq.__file__).resolve().parent / "data"
    other = tmp_path / "other"
    other.mkdir()
    (other / "tiny-shapes").symlink_to(data / "tiny-shapes", target_is_directory=True)
    (other / "evaluators").mkdir()
    rows = [{"prompt": "a red circle", "colour": "red", "shape": "circle", "size": "large",
             "position": "center", "background": "black"}]  # fmt: skip
    (other / "evaluators" / "heldout_prompts.json").write_text(json.dumps(rows))
    monkeypatch.setenv("DQ_ASSETS", str(other))
    assert dq.assets.assets_dir() == other
    assert dq.assets.embedded_pipeline_path() == other / "tiny-shapes"
    assert dq.assets.heldout_prompts() == (["a red circle"], [{k: v for k, v in rows[0].items()
                                                              if k != "prompt"}])  # fmt: skip


def test_missing_folders_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("DQ_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="DQ_ASSETS=.*is not a folder"):
        dq.assets.assets_dir()
    monkeypatch.delenv("DQ_ASSETS")
    monkeypatch.setattr(dq.assets, "DATA_DIR", tmp_path / "empty")
    with pytest.raises(ValueError, match="packaged embedded pipeline is missing"):
        dq.assets.assets_dir()


def test_world_is_importable_from_the_package():
    import dq.world

    assert dq.assets.world() is dq.world
    assert dq.world.IMAGE_SIZE == 32
