"""Quantize-on-load (`dq.onload` through `DQQuantizer`): weight-only configs applied while
diffusers loads a float checkpoint equal `dq.quantize_model` of the loaded float model bit for
bit, hold one float layer at a time, save and reload pre-quantized; activation formats are
refused with a pointer to `dq.quantize`."""

from __future__ import annotations

import gc
import json
import os
import warnings
import weakref

import pytest
import safetensors.torch as st
import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig, UNet2DConditionModel
from torch import nn

import dq
import dq.onload as O
from dq.config import LayerSpec, QuantConfig
from dq.modules import QLinear, QuantizedLayerMixin
from dq.serialization import DQDiffusersConfig
from dq.storage import spec_nbytes

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
# weight-only, every storage kind, per-channel and per-group scales, one layer kept in float
MIXED = QuantConfig(
    default=LayerSpec("int8", "channel"),
    layers={
        f"{ATTN}.attn2.to_k": LayerSpec("int4", "group16", "mse"),
        f"{ATTN}.attn2.to_v": LayerSpec("fp4_e2m1", "group32", "mse"),
        f"{ATTN}.ff.net.2": LayerSpec("fp8_e4m3", "channel"),
        "down_blocks.0.resnets.0.conv1": LayerSpec("fp6_e3m2", "channel"),
        "mid_block.resnets.0.conv2": LayerSpec("uint4", "channel"),
        f"{ATTN}.attn1.to_q": None,
    },
    name="mixed-weight-only",
)
CONFIGS = {"w8a16": "w8a16", "w4a16": "w4a16", "fp8": "fp8", "fp4": "fp4", "mixed": MIXED}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A float tiny SD pipeline saved with save_pretrained (safetensors)."""
    from dq.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("onload") / "fp"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(_bytes(sa[k]), _bytes(sb[k])), k


def _load(float_dir, config, **kw):
    return UNet2DConditionModel.from_pretrained(
        float_dir, subfolder="unet", quantization_config=DQDiffusersConfig(config=config), **kw
    )


def _two_step(float_dir, config, **kw):
    unet = UNet2DConditionModel.from_pretrained(float_dir, subfolder="unet", **kw)
    return dq.quantize_model(unet, config)


# ----------------------------------------------------------------------------------------------
# Identity with dq.quantize_model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_quantize_on_load_equals_quantize_model_bit_for_bit(name, float_dir):
    loaded = _load(float_dir, CONFIGS[name])
    ref = _two_step(float_dir, CONFIGS[name])
    assert_same_state(loaded, ref)  # codes, scales, zero points, biases, float layers
    assert loaded.config.quantization_config.plan == ref.config.quantization_config.plan
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx).sample, ref(x, t, ctx).sample)
    n_q = sum(isinstance(m, QuantizedLayerMixin) for m in loaded.modules())
    assert n_q == sum(s is not None for s in loaded._dq_config.layers.values()) > 0


def test_quantize_on_load_in_half_precision_equals_the_half_precision_route(float_dir):
    loaded = _load(float_dir, "w8a16", torch_dtype=torch.float16)
    ref = _two_step(float_dir, "w8a16", torch_dtype=torch.float16)
    assert_same_state(loaded, ref)
    assert loaded.conv_in.weight.dtype == torch.float16  # float layers in torch_dtype
    q = loaded.get_submodule(f"{ATTN}.attn1.to_k")
    assert q.qdata.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert loaded.config._pre_quantization_dtype == torch.float16


def test_a_stored_plan_passed_for_a_float_folder_is_applied_on_load(float_dir):
    ref = _two_step(float_dir, "w4a16")
    plan_cfg = DQDiffusersConfig.from_quant_config(ref._dq_config)
    loaded = UNet2DConditionModel.from_pretrained(float_dir, subfolder="unet", quantization_config=plan_cfg)
    assert_same_state(loaded, ref)


# ----------------------------------------------------------------------------------------------
# One float layer at a time
# ----------------------------------------------------------------------------------------------


def test_float_weights_are_never_all_held(float_dir, monkeypatch):
    """At every hand-over at most one planned layer holds a real float weight, and every float
    layer object is freed once its quantized layer replaces it."""
    live_bytes: list[int] = []
    dropped: list[weakref.ref] = []
    real_take = O.LoadTimeQuantizer.take

    def take(self, model, param_name, value, device):
        layer = param_name.rpartition(".")[0]
        dropped.append(weakref.ref(model.get_submodule(layer)))
        real_take(self, model, param_name, value, device)
        live_bytes.append(sum(
            m.weight.numel() * m.weight.element_size()
            for n, m in model.named_modules()
            if n in self.plan and isinstance(m, nn.Linear | nn.Conv2d) and not m.weight.is_meta
        ))

    monkeypatch.setattr(O.LoadTimeQuantizer, "take", take)
    unet = _load(float_dir, "w8a16")
    ref = UNet2DConditionModel.from_pretrained(float_dir, subfolder="unet")
    planned = [n for n, s in unet._dq_config.layers.items() if s is not None]
    largest = max(ref.get_submodule(n).weight.numel() * 4 for n in planned)
    total = sum(ref.get_submodule(n).weight.numel() * 4 for n in planned)
    n_tensors = sum(1 + (ref.get_submodule(n).bias is not None) for n in planned)
    assert len(live_bytes) == n_tensors  # every planned tensor went through dq, one by one
    assert max(live_bytes) <= largest < total / 10
    gc.collect()
    assert not any(r() is not None and isinstance(r(), nn.Linear | nn.Conv2d) for r in dropped)


# ----------------------------------------------------------------------------------------------
# Memory figures, save and reload
# ----------------------------------------------------------------------------------------------


def test_memory_after_load_matches_the_two_step_route_and_the_storage_table(float_dir):
    loaded = _load(float_dir, "w4a16")
    ref = _two_step(float_dir, "w4a16")
    fp = UNet2DConditionModel.from_pretrained(float_dir, subfolder="unet")
    assert loaded.get_memory_footprint() == ref.get_memory_footprint() < fp.get_memory_footprint() / 3
    for name, spec in loaded._dq_config.layers.items():
        if spec is not None:
            q = loaded.get_submodule(name)
            assert q.quant_weight_nbytes() == spec_nbytes(spec, fp.get_submodule(name).weight.shape)


def test_loaded_model_saves_and_reloads_pre_quantized(float_dir, tmp_path):
    loaded = _load(float_dir, "w4a16")
    loaded.save_pretrained(tmp_path / "unet")
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())["quantization_config"]
    assert "plan" in saved and "config" not in saved
    assert saved["plan"]["layers"] == loaded._dq_config.to_dict()["layers"]
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert back.hf_quantizer.pre_quantized
    assert_same_state(back, loaded)
    keys = st.load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors").keys()
    assert not any(k.endswith(f"{ATTN}.attn1.to_k.weight") for k in keys)  # codes, not floats


def test_pipeline_quantization_config_with_the_dq_backend(float_dir, tmp_path):
    from dq.testing import tiny_sd_pipeline

    pq = PipelineQuantizationConfig(
        quant_backend="dq", quant_kwargs={"config": "w8a16"}, components_to_quantize=["unet"]
    )
    pipe = DiffusionPipeline.from_pretrained(float_dir, quantization_config=pq)
    assert isinstance(pipe.unet.get_submodule(f"{ATTN}.attn2.to_q"), QLinear)
    assert not any(isinstance(m, QuantizedLayerMixin) for m in pipe.text_encoder.modules())
    ref = dq.quantize(tiny_sd_pipeline(seed=0), "w8a16", progress=False)
    assert_same_state(pipe.unet, ref.unet)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = ref("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
    pipe.save_pretrained(tmp_path / "pipe")
    back = dq.load(tmp_path / "pipe")
    assert_same_state(back.unet, pipe.unet)


def test_transformers_components_are_refused_with_the_fix(float_dir):
    pq = PipelineQuantizationConfig(
        quant_backend="dq", quant_kwargs={"config": "w8a16"},
        components_to_quantize=["unet", "text_encoder"],
    )
    with pytest.raises(ValueError, match="components_to_quantize=\\['unet'\\]"):
        DiffusionPipeline.from_pretrained(float_dir, quantization_config=pq)


# ----------------------------------------------------------------------------------------------
# Exclusions, keep_in_fp32
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [["attn2"], "attn2", ["down_blocks.*.attn2.*", "up_blocks.*.attn2.*", "mid_block.*.attn2.*"]],
                         ids=["list", "string", "globs"])
def test_modules_to_not_convert_keeps_those_layers_in_float(skip, float_dir):
    unet = UNet2DConditionModel.from_pretrained(
        float_dir, subfolder="unet",
        quantization_config=DQDiffusersConfig(config="w8a16", modules_to_not_convert=skip),
    )
    attn2 = [m for n, m in unet.named_modules() if ".attn2." in n and isinstance(m, nn.Linear | QLinear)]
    assert attn2 and all(type(m) is nn.Linear for m in attn2)
    assert isinstance(unet.get_submodule(f"{ATTN}.attn1.to_q"), QLinear)
    assert type(unet.conv_in) is nn.Conv2d  # dq's default skips stay
    fp = UNet2DConditionModel.from_pretrained(float_dir, subfolder="unet")
    assert torch.equal(unet.get_submodule(f"{ATTN}.attn2.to_k").weight, fp.get_submodule(f"{ATTN}.attn2.to_k").weight)


def test_a_name_that_matches_nothing_warns(float_dir):
    with pytest.warns(UserWarning, match="to_kk"):
        UNet2DConditionModel.from_pretrained(
            float_dir, subfolder="unet",
            quantization_config=DQDiffusersConfig(config="w8a16", modules_to_not_convert=["to_kk"]),
        )


def test_keep_in_fp32_modules_stay_float32(float_dir, monkeypatch):
    monkeypatch.setattr(UNet2DConditionModel, "_keep_in_fp32_modules", ["time_embedding"])
    unet = _load(float_dir, "w8a16", torch_dtype=torch.float16)
    for name in ("time_embedding.linear_1", "time_embedding.linear_2"):
        m = unet.get_submodule(name)
        assert type(m) is nn.Linear and m.weight.dtype == torch.float32, name
    assert unet.get_submodule("time_embedding.linear_1").weight.dtype == torch.float32
    assert isinstance(unet.get_submodule(f"{ATTN}.attn1.to_q"), QLinear)
    assert unet._dq_config.layers["time_embedding.linear_1"] is None


# ----------------------------------------------------------------------------------------------
# The config object and clear refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["w8a16", MIXED, MIXED.to_dict()], ids=["preset", "QuantConfig", "dict"])
def test_request_config_round_trips_through_json(config):
    cfg = DQDiffusersConfig(config=config, modules_to_not_convert=["attn2"])
    d = json.loads(cfg.to_json_string())
    again = DQDiffusersConfig.from_dict(d)
    assert again.is_request and again.quant_config == cfg.quant_config
    assert "attn2" in again.quant_config.skip and "quantized on load" in repr(again)


@pytest.mark.parametrize(
    "config",
    ["w8a8", "w4a8_uniform", QuantConfig(default=LayerSpec("int8", "channel"),
                                          layers={"mid_block.attentions.0.proj_in": LayerSpec("int8", "channel", act="uint8")})],
    ids=["w8a8", "w4a8_uniform", "one-layer-with-activations"],
)
def test_activation_formats_are_refused_with_a_pointer_to_dq_quantize(config):
    with pytest.raises(ValueError, match=r"dq\.quantize\(pipe, config, calib_prompts=") as e:
        DQDiffusersConfig(config=config)
    assert "'w8a16'" in str(e.value)  # names the weight-only presets


def test_activation_formats_through_the_pipeline_config_are_refused(float_dir):
    pq = PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"config": "w8a8"}, components_to_quantize=["unet"])
    with pytest.raises(ValueError, match="calibrated on real prompts"):
        DiffusionPipeline.from_pretrained(float_dir, quantization_config=pq)


def test_mixed_precision_preset_is_refused_on_load():
    with pytest.raises(ValueError, match="mixed-precision preset.*quantize on load: 'fp4'"):
        DQDiffusersConfig(config="w4a8")


def test_config_and_plan_together_and_a_bare_config_are_refused():
    plan = QuantConfig.from_preset("w8a16").to_dict()
    with pytest.raises(ValueError, match="not both"):
        DQDiffusersConfig(config="w8a16", plan=plan)
    with pytest.raises(ValueError, match="needs config="):
        DQDiffusersConfig()
    with pytest.raises(ValueError, match="applies when quantizing on load"):
        DQDiffusersConfig(plan=plan, modules_to_not_convert=["attn2"])


def test_an_incomplete_float_folder_names_the_layer(float_dir, tmp_path):
    import shutil

    bad = tmp_path / "fp"
    shutil.copytree(float_dir / "unet", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    sd = st.load_file(f)
    del sd[f"{ATTN}.attn1.to_k.weight"]
    st.save_file(sd, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=f"{ATTN}.attn1.to_k"):
            UNet2DConditionModel.from_pretrained(bad, quantization_config=DQDiffusersConfig(config="w8a16"))


def test_a_nan_weight_is_refused_naming_the_layer(float_dir, tmp_path):
    import shutil

    bad = tmp_path / "fp"
    shutil.copytree(float_dir / "unet", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    sd = st.load_file(f)
    sd[f"{ATTN}.ff.net.2.weight"][0, 0] = float("nan")
    st.save_file(sd, f)
    with pytest.raises(ValueError, match=f"{ATTN}.ff.net.2.*NaN"):
        UNet2DConditionModel.from_pretrained(bad, quantization_config=DQDiffusersConfig(config="w8a16"))


def test_a_dq_folder_ignores_a_second_request_and_loads_its_own_plan(float_dir, tmp_path):
    _load(float_dir, "w4a16").save_pretrained(tmp_path / "unet")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet", quantization_config=DQDiffusersConfig(config="w8a16"))
    assert back._dq_config.layers[f"{ATTN}.attn1.to_k"].weight == "int4"
    assert os.path.isfile(tmp_path / "unet" / "config.json")
