"""Hub-format save/load of dq-quantized pipelines: bit-identical round trips through
`DiffusionPipeline.from_pretrained`, atomic saves, clear errors for faulty folders, push_to_hub."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

import dq
import dq.serialization as S
from dq.config import LayerSpec, QuantConfig
from dq.modules import QLinear, QuantizedLayerMixin

PROMPTS = ["a red circle", "a blue square"]
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
MID = "mid_block.attentions.0.transformer_blocks.0"
REPO = Path(__file__).resolve().parents[1]

# A hand-written mixed plan: every storage kind (int8, packed 4-bit INT and FP, float8 E4M3 and
# E5M2, one FP6 code per byte), per-channel and per-group scales, W8A8 with asymmetric and
# symmetric activations, and a layer kept in float.
MIXED = QuantConfig(
    default=LayerSpec("int8", "channel", act="uint8"),
    layers={
        f"{ATTN}.attn2.to_k": LayerSpec("int4", "group16", "mse"),
        f"{ATTN}.attn2.to_v": LayerSpec("fp4_e2m1", "group32", "mse"),
        f"{ATTN}.ff.net.2": LayerSpec("fp8_e4m3", "channel"),
        f"{MID}.ff.net.0.proj": LayerSpec("fp8_e5m2", "channel"),
        "down_blocks.0.resnets.0.conv1": LayerSpec("fp6_e3m2", "channel"),
        "mid_block.resnets.0.conv2": LayerSpec("int4", "channel"),
        "time_embedding.linear_1": LayerSpec("int8", "channel", act="int8"),
        f"{MID}.attn1.to_q": None,
    },
    name="mixed",
)
CONFIGS = {"w8a8": "w8a8", "w4a16": "w4a16", "fp8": "fp8", "mixed": MIXED}


def _quantized(config, seed=0):
    from dq.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return dq.quantize(pipe, config, calib_prompts=PROMPTS, calibration={"num_inference_steps": 2}, progress=False)


def _image(pipe):
    return pipe(
        PROMPTS[0],
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), k


def _load(path, **kw):
    pipe = DiffusionPipeline.from_pretrained(os.fspath(path), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_w8a16(tmp_path_factory):
    """(pipeline, folder) of a W8A16 tiny pipeline saved once for the fault-injection tests."""
    pipe = _quantized("w8a16")
    path = tmp_path_factory.mktemp("w8a16") / "pipe"
    S.save_pretrained(pipe, path)
    return pipe, path


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_roundtrip_through_diffusers_is_bit_identical(name, tmp_path):
    pipe = _quantized(CONFIGS[name])
    before = _image(pipe)
    S.save_pretrained(pipe, tmp_path / "p")

    loaded = _load(tmp_path / "p")  # the path users take: plain diffusers after `import dq`

    assert loaded.unet.is_quantized and isinstance(loaded.unet.hf_quantizer, S.DQQuantizer)
    assert_same_tensors(pipe.unet.state_dict(), loaded.unet.state_dict())
    specs = {n: m.spec for n, m in pipe.unet.named_modules() if isinstance(m, QuantizedLayerMixin)}
    got = {n: m.spec for n, m in loaded.unet.named_modules() if isinstance(m, QuantizedLayerMixin)}
    assert got == specs and len(specs) > 50
    assert torch.equal(_image(loaded), before)


def test_config_json_is_the_versioned_plan_and_weights_are_safetensors(tmp_path):
    pipe = _quantized(MIXED)
    S.save_pretrained(pipe, tmp_path / "p")
    qc = json.loads((tmp_path / "p/unet/config.json").read_text())["quantization_config"]

    assert qc["quant_method"] == S.QUANT_METHOD and "import dq" in qc["quant_method"]
    assert qc["format_version"] == S.FORMAT_VERSION and qc["dq_version"] == dq.__version__
    plan = QuantConfig.from_dict(qc["plan"])
    assert plan.layers == pipe.unet._dq_config.layers  # every layer, float ones as null
    assert plan.layers[f"{MID}.attn1.to_q"] is None
    assert plan.layers[f"{ATTN}.attn2.to_k"] == LayerSpec("int4", "group16", "mse")
    files = sorted(p.name for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]
    with safe_open(tmp_path / "p/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        meta = f.metadata()
        assert f.get_slice(f"{ATTN}.ff.net.2.qdata").get_dtype() == "F8_E4M3"
        assert f.get_slice(f"{MID}.ff.net.0.proj.qdata").get_dtype() == "F8_E5M2"
    assert meta["dq_format_version"] == str(S.FORMAT_VERSION)
    assert set(json.loads(meta["dq_checksums"])) == set(pipe.unet.state_dict())


def test_model_class_from_pretrained_keeps_code_dtypes_under_torch_dtype(saved_w8a16):
    pipe, path = saved_w8a16
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float16)
    q = unet.get_submodule(f"{ATTN}.attn2.to_q")
    assert isinstance(q, QLinear) and q.qdata.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert torch.equal(q.qdata, pipe.unet.get_submodule(f"{ATTN}.attn2.to_q").qdata)
    assert unet.conv_in.weight.dtype == torch.float16  # float layers follow torch_dtype


def test_sharded_save_and_resave_of_a_loaded_pipeline(tmp_path):
    pipe = _quantized("w4a16")
    S.save_pretrained(pipe, tmp_path / "a", max_shard_size="150KB")
    assert len(list((tmp_path / "a/unet").glob("*.safetensors"))) > 1
    loaded = _load(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # plain diffusers save of a loaded dq pipeline
    again = _load(tmp_path / "b")
    assert_same_tensors(pipe.unet.state_dict(), again.unet.state_dict())


@pytest.mark.skipif(
    not hasattr(dq, "load"), reason="dq/__init__.py does not export dq.serialization yet"
)
def test_package_exports_and_quantize_binds_the_atomic_save():
    assert dq.load is S.load and dq.save_pretrained is S.save_pretrained
    pipe = _quantized("w8a16")
    assert getattr(pipe.save_pretrained, "__func__", None) is S._bound_save


def test_dq_load_and_dequantize(saved_w8a16):
    pipe, path = saved_w8a16
    loaded = S.load(path)
    assert_same_tensors(pipe.unet.state_dict(), loaded.unet.state_dict())
    layer = loaded.unet.get_submodule(f"{ATTN}.ff.net.2")
    w = layer.dequantize()
    loaded.unet.dequantize()
    f = loaded.unet.get_submodule(f"{ATTN}.ff.net.2")
    assert type(f) is torch.nn.Linear and torch.equal(f.weight, w)
    assert not loaded.unet.is_quantized and "quantization_config" not in loaded.unet.config


def test_extra_buffers_roundtrip_without_format_change(tmp_path):
    """Precomputed constants (e.g. BOS key/value rows) ride along as extra buffers."""
    pipe = _quantized("w8a16")
    to_k = pipe.unet.get_submodule(f"{ATTN}.attn2.to_k")
    attn = pipe.unet.get_submodule(f"{ATTN}.attn2")
    to_k.register_buffer("bos_out", torch.randn(1, 32))  # on a dq layer: found automatically
    S.register_constant(attn, "bos_kv", torch.randn(2, 1, 32))  # on any module: marked
    S.save_pretrained(pipe, tmp_path / "p")
    qc = json.loads((tmp_path / "p/unet/config.json").read_text())["quantization_config"]
    assert qc["extra_buffers"] == {f"{ATTN}.attn2": ["bos_kv"], f"{ATTN}.attn2.to_k": ["bos_out"]}

    loaded = _load(tmp_path / "p")
    assert torch.equal(loaded.unet.get_submodule(f"{ATTN}.attn2.to_k").bos_out, to_k.bos_out)
    assert torch.equal(loaded.unet.get_submodule(f"{ATTN}.attn2").bos_kv, attn.bos_kv)

    # a declared constant missing from the file is an error, not a silent default
    f = tmp_path / "p/unet/diffusion_pytorch_model.safetensors"
    sd = st.load_file(f)
    del sd[f"{ATTN}.attn2.bos_kv"]
    st.save_file(sd, f)
    with pytest.raises(ValueError, match="bos_kv"):
        _load(tmp_path / "p")


# ----------------------------------------------------------------------------------------------
# Without dq
# ----------------------------------------------------------------------------------------------


def test_loading_without_import_dq_says_to_import_dq(children):
    out, err = children["no_dq"].communicate(timeout=180)
    assert children["no_dq"].returncode != 0
    assert "Unknown quantization type" in err and "import dq" in err
    assert "import dq" in err.strip().splitlines()[-1]  # in the final error line


# ----------------------------------------------------------------------------------------------
# Atomic save
# ----------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import itertools, sys, time
    import safetensors.torch
    import torch
    torch.set_num_threads(1)
    import dq, dq.serialization as S
    from dq.testing import tiny_sd_pipeline

    target, mode = sys.argv[1], sys.argv[2]
    seeds = (1,) if mode == "pause" else (1, 0)
    pipes = [dq.quantize(tiny_sd_pipeline(seed=s), "w8a16", progress=False) for s in seeds]
    if mode == "pause":  # stall right after the first weights file is complete
        real = safetensors.torch.save_file
        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            print("WROTE", filename, flush=True)
            time.sleep(120)
        safetensors.torch.save_file = save_file
    print("READY", flush=True)
    for i in itertools.count():
        S.save_pretrained(pipes[i % 2], target)
        if mode == "pause":
            break
    """
)


def _start_child(tmp_path, target, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(target), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


def _wait_for(proc, word):
    for line in proc.stdout:
        if line.startswith(word):
            return line
    raise AssertionError(f"child exited before printing {word}")


@pytest.fixture(scope="module", autouse=True)
def children(saved_w8a16, tmp_path_factory):
    """The child processes of this file, started as soon as the saved folder exists so their
    imports (~10 s of CPU each here) overlap the in-process tests:

    - no_dq: `DiffusionPipeline.from_pretrained(folder)` in a process that never imports dq;
    - killed: re-saves a copy of the folder and stalls right after its first weights file.
    """
    root = tmp_path_factory.mktemp("children")
    folder = str(saved_w8a16[1])
    code = f"from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained({folder!r})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    no_dq = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    target = root / "pipe"
    shutil.copytree(saved_w8a16[1], target)
    killed = _start_child(root, target, "pause")
    yield {"no_dq": no_dq, "killed": killed, "killed_target": target}
    for proc in (no_dq, killed):
        proc.kill()
        proc.communicate()


def test_save_killed_midway_leaves_previous_save_intact(saved_w8a16, children):
    pipe, _ = saved_w8a16
    proc, target = children["killed"], children["killed_target"]
    wrote = _wait_for(proc, "WROTE")
    assert ".dq-staging-" in wrote  # the new save goes to a sibling folder...
    os.kill(proc.pid, signal.SIGKILL)  # ...and dies there with one weights file written
    proc.wait()
    staging = list(target.parent.glob(".pipe.dq-staging-*"))
    assert staging and any(staging[0].rglob("*.safetensors"))

    loaded = _load(target)
    assert_same_tensors(pipe.unet.state_dict(), loaded.unet.state_dict())
    S.save_pretrained(pipe, target)  # the next save removes the dead save's leftovers
    assert not list(target.parent.glob(".pipe.dq-*"))


@pytest.mark.slow  # a second child process (~15 s of imports on this CPU)
def test_save_killed_at_a_random_point_leaves_one_complete_save(tmp_path):
    from dq.testing import tiny_sd_pipeline

    target = tmp_path / "pipe"
    expected = [
        dq.quantize(tiny_sd_pipeline(seed=s), "w8a16", progress=False).unet.state_dict()
        for s in (1, 0)
    ]
    proc = _start_child(tmp_path, target, "loop")
    try:
        _wait_for(proc, "READY")
        deadline = time.time() + 60
        while not (target / "model_index.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.77)  # several saves in, at no particular point of one
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    got = _load(target).unet.state_dict()
    matches = []
    for exp in expected:
        try:
            assert_same_tensors(exp, got)
            matches.append(True)
        except AssertionError:
            matches.append(False)
    assert sum(matches) == 1


def test_save_into_existing_folder_replaces_weights_and_keeps_other_files(saved_w8a16, tmp_path):
    pipe, src = saved_w8a16
    target = tmp_path / "pipe"
    shutil.copytree(src, target)
    user_files = {
        "README.md": "my notes",
        ".git/HEAD": "ref: refs/heads/main",
        "unet/notes.txt": "calibrated on my prompts",  # inside a component folder
        "unet/lora/pytorch_lora_weights.safetensors": "my lora",  # a user folder in a component
        "unet/my_model.safetensors": "not diffusers' weights name",
        "vae/notes/a.txt": "deep",
    }
    for rel, text in user_files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text(text)
    (target / "empty_dir").mkdir()
    stale = target / "unet/diffusion_pytorch_model.bin"  # the component's old weights...
    stale.write_bytes(b"old pickle")
    stale_index = target / "unet/diffusion_pytorch_model.safetensors.index.json"  # ...would load
    stale_index.write_text('{"weight_map": {}}')  # instead of the new file if kept
    bound = S.bind_atomic_save(pipe)
    bound.save_pretrained(target)
    for rel, text in user_files.items():
        assert (target / rel).read_text() == text, rel
    assert (target / "empty_dir").is_dir()
    assert not stale.exists() and not stale_index.exists()  # weights are replaced as a set
    manifest = json.loads((target / S.MANIFEST).read_text())["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in manifest
    assert "unet/notes.txt" not in manifest  # kept, never claimed as dq's
    bound.save_pretrained(target)  # and again: still kept
    assert (target / "unet/lora/pytorch_lora_weights.safetensors").read_text() == "my lora"
    assert not list(tmp_path.glob(".pipe.dq-*"))
    assert_same_tensors(pipe.unet.state_dict(), _load(target).unet.state_dict())


def test_files_of_an_earlier_dq_save_that_the_new_one_does_not_write_go(tmp_path):
    """What dq wrote (the manifest) is dq's to replace: a sharded save re-saved unsharded
    leaves no stale shard behind."""
    pipe = _quantized("w8a16")
    S.save_pretrained(pipe, tmp_path / "p", max_shard_size="150KB")
    assert len(list((tmp_path / "p/unet").glob("*.safetensors"))) > 1
    (tmp_path / "p/unet/notes.txt").write_text("mine")
    S.save_pretrained(pipe, tmp_path / "p")
    names = sorted(f.name for f in (tmp_path / "p/unet").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors", "notes.txt"]


def test_saving_over_the_source_folder_is_refused(tmp_path):
    from dq.testing import tiny_sd_pipeline

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "src")
    before = _snapshot(tmp_path / "src")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "src")
    dq.quantize(pipe, "w8a16", progress=False)
    for target in (tmp_path / "src", str(tmp_path / "src") + "/", tmp_path):
        with pytest.raises(ValueError, match="loaded from.*overwrite=True"):
            pipe.save_pretrained(target)
    assert _snapshot(tmp_path / "src") == before  # the float model is untouched
    pipe.save_pretrained(tmp_path / "src", overwrite=True)  # on purpose: allowed
    assert DiffusionPipeline.from_pretrained(tmp_path / "src").unet.is_quantized


def test_saving_into_the_working_folder_is_refused(saved_w8a16, tmp_path, monkeypatch):
    pipe, _ = saved_w8a16
    (tmp_path / "work").mkdir()
    (tmp_path / "work/data.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / "work")
    for target in (".", "", os.getcwd(), ".."):
        with pytest.raises(ValueError, match="working folder|empty") as e:
            S.save_pretrained(pipe, target, overwrite=True)  # never, not even with overwrite
        assert "subfolder" in str(e.value) or "pass the folder" in str(e.value)
    assert (tmp_path / "work/data.txt").read_text() == "keep me"
    S.save_pretrained(pipe, "out")  # a subfolder is fine
    assert (tmp_path / "work/out/model_index.json").is_file()


def test_saving_over_a_folder_dq_did_not_write_needs_overwrite(saved_w8a16, tmp_path):
    pipe, _ = saved_w8a16
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="dq did not write.*holiday.jpg.*overwrite=True"):
        S.save_pretrained(pipe, target)
    assert sorted(p.name for p in target.iterdir()) == ["holiday.jpg"]
    S.save_pretrained(pipe, target, overwrite=True)
    assert (target / "holiday.jpg").read_bytes() == b"\xff\xd8"  # kept even then
    (tmp_path / "empty").mkdir()
    S.save_pretrained(pipe, tmp_path / "empty")  # an empty folder has nothing to lose


def test_unwritable_targets_name_the_users_path(saved_w8a16, tmp_path, monkeypatch):
    pipe, _ = saved_w8a16
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot save to '.*a_file/out'.*is a file"):
        S.save_pretrained(pipe, tmp_path / "a_file" / "out")
    with pytest.raises(ValueError, match=r"cannot save to '.*a_file'.*is a file"):
        S.save_pretrained(pipe, tmp_path / "a_file")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access
    monkeypatch.setattr(  # tests run as root, which os.access never refuses
        S.os, "access", lambda p, m: False if os.path.realpath(p) == os.path.realpath(ro) else real_access(p, m)
    )
    with pytest.raises(ValueError, match=r"cannot save to '.*ro/q'.*no permission") as e:
        S.save_pretrained(pipe, ro / "q")
    assert "staging" not in str(e.value)
    monkeypatch.undo()

    # an OSError in the middle of the save (here: disk full) names the user's path, not the
    # hidden staging folder, and leaves the earlier save intact
    S.save_pretrained(pipe, tmp_path / "full")
    before = _snapshot(tmp_path / "full")
    real_save = st.save_file

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / ".full.dq-staging-1-ab/unet/x"))

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(ValueError, match=r"cannot save to '.*full'.*no space left.*unchanged") as e:
        S.save_pretrained(pipe, tmp_path / "full")
    assert "staging" not in str(e.value)
    monkeypatch.setattr(st, "save_file", real_save)
    assert _snapshot(tmp_path / "full") == before
    assert not list(tmp_path.glob(".full.dq-*"))


def test_safe_serialization_false_is_refused(saved_w8a16, tmp_path):
    pipe, _ = saved_w8a16
    with pytest.raises(ValueError, match="safetensors only"):
        S.save_pretrained(pipe, tmp_path / "p", safe_serialization=False)
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------
# Faulty folders: each gives its clear error, through dq.load and through plain diffusers
# ----------------------------------------------------------------------------------------------

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
LAYER = f"{ATTN}.attn2.to_q"


def _edit_config(path, fn):
    f = path / "unet/config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


def _truncate(path):
    f = path / UNET_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    f = path / UNET_FILE
    data = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # tensor data begins after the JSON header
    data[(start + len(data)) // 2] ^= 0x40
    f.write_bytes(bytes(data))


def _drop_tensor(path):
    f = path / UNET_FILE
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    sd = st.load_file(f)
    del sd[f"{LAYER}.scale"]
    st.save_file(sd, f, metadata=meta)


def _retarget_layer(path):
    _edit_config(path, lambda q: q["plan"]["layers"][LAYER].update(weight="int4"))


def _float_in_plan(path):
    _edit_config(path, lambda q: q["plan"]["layers"].__setitem__(LAYER, None))


def _unknown_format(path):
    _edit_config(path, lambda q: q["plan"]["layers"][LAYER].update(weight="int3x"))


def _newer_format(path):
    _edit_config(path, lambda q: q.update(format_version=S.FORMAT_VERSION + 1, dq_version="99.0"))


def _newer_plan(path):
    _edit_config(path, lambda q: q["plan"].update(version=q["plan"]["version"] + 1))


def _int8_to_int7(q):
    """int8 -> int7 on one layer: the same storage (int8 codes, fp32 scales), so every tensor
    still fits; only the plan's checksum can tell."""
    q["plan"]["layers"][LAYER]["weight"] = "int7"


def _bin_only(path):
    f = path / UNET_FILE
    torch.save(st.load_file(f), path / "unet/diffusion_pytorch_model.bin")
    f.unlink()


FAULTS = {
    # id: (mutation, error from dq.load, error from DiffusionPipeline.from_pretrained)
    "truncated": (_truncate, "truncated or corrupted", "truncated or corrupted"),
    "flipped-byte": (_flip_byte, "corrupted.*checksums", "corrupted.*checksums"),
    "tensor-missing": (_drop_tensor, f"has no '{LAYER}.scale'", f"has no '{LAYER}.scale'"),
    "plan-format-mismatch": (
        _retarget_layer,
        f"{LAYER}.qdata' has shape",
        f"{LAYER}.qdata' has shape",
    ),
    "plan-float-but-codes": (
        _float_in_plan,
        f"quantized codes for layer '{LAYER}'",
        f"quantized codes for layer '{LAYER}'",
    ),
    "unknown-format": (
        _unknown_format,
        "unknown weight format 'int3x'",
        "unknown weight format 'int3x'",
    ),
    "newer-format-version": (
        _newer_format,
        "newer than this dq.*upgrade dq",
        "newer than this dq.*upgrade dq",
    ),
    "newer-plan-version": (
        _newer_plan,
        "newer than this dq.*upgrade dq",
        "newer than this dq.*upgrade dq",
    ),
    "bin-only": (
        _bin_only,
        "no safetensors weights.*never pickle",
        "holds no diffusion_pytorch_model.safetensors.*never unpickles",
    ),
    "plan-edited-same-storage": (
        lambda path: _edit_config(path, _int8_to_int7),
        f"not the plan .* was saved with.*layer '{LAYER}'.*Restore the original config.json",
        f"not the plan .* was saved with.*layer '{LAYER}'.*Restore the original config.json",
    ),
}


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_faulty_folder_gives_a_clear_error(fault, saved_w8a16, tmp_path):
    mutate, dq_msg, diffusers_msg = FAULTS[fault]
    path = tmp_path / "pipe"
    shutil.copytree(saved_w8a16[1], path)
    mutate(path)
    before = _snapshot(path)

    with pytest.raises(ValueError, match=dq_msg):
        S.load(path)
    with pytest.raises((ValueError, OSError), match=diffusers_msg):
        DiffusionPipeline.from_pretrained(path)
    assert _snapshot(path) == before  # loading never writes
    assert torch.get_default_dtype() == torch.float32


def test_pickle_is_never_unpickled_on_any_load_path(saved_w8a16, tmp_path, monkeypatch):
    path = tmp_path / "pipe"
    shutil.copytree(saved_w8a16[1], path)
    _bin_only(path)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    for load in (
        lambda: S.load(path),
        lambda: DiffusionPipeline.from_pretrained(path),
        lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        lambda: UNet2DConditionModel.from_pretrained(path / "unet"),
    ):
        with pytest.raises(ValueError, match="never (un)?pickle"):
            load()
    assert calls == []


def test_edited_plan_with_the_same_storage_is_refused(tmp_path):
    """int4 -> fp4_e2m1: both packed 4-bit codes with fp32 scales, so shapes and dtypes agree;
    the checksum of the plan in the safetensors header refuses it."""
    cfg = QuantConfig(default=LayerSpec("int4", "group16", "mse"), name="int4")
    pipe = _quantized(cfg)
    S.save_pretrained(pipe, tmp_path / "p")
    meta = safe_open(tmp_path / "p" / UNET_FILE, "pt").metadata()
    assert meta["dq_plan_sha256"] == S.plan_digest(
        pipe.unet.hf_quantizer.quantization_config.to_dict()["plan"], {}
    )
    _edit_config(tmp_path / "p", lambda q: q["plan"]["layers"][LAYER].update(weight="fp4_e2m1"))
    with pytest.raises(ValueError, match=f"layer '{LAYER}' .*fp4_e2m1.*Restore the original"):
        DiffusionPipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="not the plan"):
        S.load(tmp_path / "p")


def test_folder_without_a_plan_checksum_still_loads(tmp_path):
    """Folders written before the plan checksum (no dq_plan_sha256 in the header) load."""
    pipe = _quantized("w8a16")
    S.save_pretrained(pipe, tmp_path / "p")
    f = tmp_path / "p" / UNET_FILE
    with safe_open(f, "pt") as h:
        meta = {k: v for k, v in h.metadata().items() if not k.startswith("dq_plan")}
    st.save_file(st.load_file(f), f, metadata=meta)
    loaded = S.load(tmp_path / "p")
    assert_same_tensors(pipe.unet.state_dict(), loaded.unet.state_dict())


def test_calibration_record_is_saved_and_reloaded(tmp_path):
    pipe = _quantized("w8a16")
    S.record_calibration(pipe.unet, {"num_prompts": 2, "sampling": {"num_inference_steps": 2}})
    S.save_pretrained(pipe, tmp_path / "p")
    loaded = S.load(tmp_path / "p")
    assert loaded.unet._dq_calibration == {"num_prompts": 2, "sampling": {"num_inference_steps": 2}}


def test_plan_mismatch_error_names_the_layer_and_the_fix(saved_w8a16, tmp_path):
    path = tmp_path / "pipe"
    shutil.copytree(saved_w8a16[1], path)
    _retarget_layer(path)
    with pytest.raises(ValueError) as e:
        UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    msg = str(e.value)
    assert LAYER in msg and "int4/channel" in msg and "save the quantized pipeline again" in msg


# ----------------------------------------------------------------------------------------------
# push_to_hub (offline: HfApi mocked)
# ----------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_hub_folder(saved_w8a16, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    import dq.hub

    pipe, _ = saved_w8a16
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["upload"] = (repo_id, kw)
        shutil.copytree(folder_path, tmp_path / "uploaded")  # what the hub would receive
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    out = dq.hub.push_to_hub(pipe, "me/tiny-w8a16", private=True)

    assert out == "commit-info"
    assert calls["create_repo"] == (
        "me/tiny-w8a16",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls["upload"][0] == "me/tiny-w8a16"
    up = tmp_path / "uploaded"
    names = {p.relative_to(up).as_posix() for p in up.rglob("*") if p.is_file()}
    assert {"model_index.json", "README.md", "unet/config.json", UNET_FILE} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    card = (up / "README.md").read_text()
    assert "import dq" in card and "me/tiny-w8a16" in card and "int8/channel" in card
    assert_same_tensors(pipe.unet.state_dict(), _load(up).unet.state_dict())

    # local_dir: the user's own README.md there is kept; dq's card is refreshed on the next push
    local = tmp_path / "local"
    shutil.copytree(up, local)
    shutil.rmtree(up)
    dq.hub.push_to_hub(pipe, "me/tiny-w8a16", local_dir=local)
    assert "import dq" in (local / "README.md").read_text()  # dq's card: replaced
    (local / "README.md").write_text("# my own card")
    shutil.rmtree(tmp_path / "uploaded")
    dq.hub.push_to_hub(pipe, "me/tiny-w8a16", local_dir=local)
    assert (local / "README.md").read_text() == "# my own card"


# ----------------------------------------------------------------------------- self-contained plans


def test_bias_shifted_fp4_saves_and_reloads_in_a_fresh_process(tmp_path):
    from dq import formats

    fmt = formats.get("fp4_e2m1").with_bias(0, name="fp4_e2m1_b0_savetest")  # range x 2
    cfg = QuantConfig(default=LayerSpec(fmt, "channel", act="uint8"), name="fp4-b0")
    pipe = _quantized(cfg)
    layer = pipe.unet.get_submodule(f"{ATTN}.attn1.to_q")
    assert layer.spec.weight == "fp4_e2m1_b0_savetest"
    assert float(layer.qweight().values.abs().max()) == 12.0  # the shifted grid's max
    pipe.save_pretrained(tmp_path / "q")
    ref = _image(pipe)
    torch.save(ref, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, dq
        from dq import formats
        from diffusers import DiffusionPipeline
        assert "fp4_e2m1_b0_savetest" not in formats.names()
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "q")!r})
        pipe.set_progress_bar_config(disable=True)
        assert formats.get("fp4_e2m1_b0_savetest").bias == 0
        img = pipe({PROMPTS[0]!r}, num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
                   output_type="pt", generator=torch.Generator().manual_seed(0)).images
        assert torch.equal(img, torch.load({str(tmp_path / "ref.pt")!r})), "images differ"
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_version_1_folder_still_loads(tmp_path):
    pipe = _quantized("w8a8")
    pipe.save_pretrained(tmp_path / "q")

    def to_v1(q):
        plan = q["plan"]
        plan["version"] = 1
        plan.pop("formats")
        for spec in plan["layers"].values():
            if spec is not None:
                spec["rounding"] = "nearest"

    _edit_config(tmp_path / "q", to_v1)  # the normalised plan, hence its checksum, is unchanged
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "q")
    assert torch.equal(_image(loaded), _image(pipe))
