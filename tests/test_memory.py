"""Honest memory: one copy of each engine weight at run time, reported by the footprint."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import dq
from dq import kernels
from dq.config import LayerSpec
from dq.kernels import cpu
from dq.modules import QLinear, QuantizedLayerMixin

pytestmark = pytest.mark.skipif(not cpu.ONEDNN_INT8, reason="needs oneDNN's int8 engine")


def _held(model: nn.Module) -> int:
    """Bytes really held: every parameter and buffer plus cache entries derived from them."""
    own = sum(t.nelement() * t.element_size() for t in model.parameters())
    own += sum(t.nelement() * t.element_size() for t in model.buffers())
    codes = [m._buffers["qdata"] for m in model.modules() if "qdata" in m._buffers]
    return own + cpu.PACK_CACHE.nbytes(codes)


def _stack(spec, n=4, width=1024):
    torch.manual_seed(0)
    layers = [QLinear.from_float(nn.Linear(width, width), spec, act_range=(-4.0, 4.0)) for _ in range(n)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("weight,max_vs_fp16", [("int8", 0.55), ("int4", 0.55)])
def test_engine_weights_replace_the_codes_after_the_first_forward(weight, max_vs_fp16):
    cpu.clear_cache()
    model = _stack(LayerSpec(weight, act="uint8"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    numel = sum(m.weight_shape.numel() for m in model)
    x = torch.randn(8, 1024)
    with torch.no_grad():  # oneDNN's one-time set-up (kernels, pools) is not the weights' memory
        _stack(LayerSpec(weight, act="uint8"), n=1)(x)
    gc.collect()
    base = cpu.PACK_CACHE.nbytes()  # entries of layers other tests left alive
    with torch.no_grad():
        y0 = model(x)
    weight_bytes = sum(
        t.nelement() * t.element_size() for m in model for n, t in m._buffers.items()
        if n in ("qdata", "engine_weight", "scale")
    )
    codes = [m._buffers["qdata"] for m in model if "qdata" in m._buffers]
    assert weight_bytes + cpu.PACK_CACHE.nbytes(codes) <= max_vs_fp16 * 2 * numel
    assert cpu.PACK_CACHE.nbytes() - base == sum(m.engine_weight.nelement() for m in model)
    assert all("engine_weight" in m._buffers and "qdata" not in m._buffers for m in model)
    # what is held is what is reported
    footprint = sum(t.nelement() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert _held(model) == footprint
    assert kernels.cache_nbytes(model) == sum(m.engine_weight.nelement() for m in model)
    # (resident-set growth is left to benchmarks: the allocator's reuse makes it noisy here)
    # codes come back exactly: state_dict, dequantize, copies, later forwards
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    twin = copy.deepcopy(model)
    assert torch.equal(twin[0].qdata, before["0.qdata"])
    twin.load_state_dict(before)
    assert "qdata" in twin[0]._buffers


def test_writing_codes_puts_them_back_and_repacks():
    cpu.clear_cache()
    model = _stack(LayerSpec("int8", act="uint8"), n=1, width=64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)
    layer = model[0]
    w = layer.dequantize() * 0.5
    layer.requantize(w)
    assert "qdata" in layer._buffers and "engine_weight" not in layer._buffers
    with torch.no_grad():
        y = model(x)
    ref = dq.modules.reference_forward(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_gradients_still_flow_from_a_compacted_layer():
    model = _stack(LayerSpec("int8", act="uint8"), n=1, width=64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("config", ["w8a8", "w4a16"])
def test_get_memory_footprint_of_a_quantized_unet_is_what_is_held(config):
    from dq.testing import tiny_sd_pipeline

    cpu.clear_cache()
    pipe = tiny_sd_pipeline(seed=0)
    fp16 = sum(p.numel() * 2 for p in pipe.unet.parameters())
    kw = {"calib_prompts": ["a red circle"], "calibration": {"num_inference_steps": 2}} if "a8" in config else {}
    dq.quantize(pipe, config, progress=False, **kw)
    unet = pipe.unet
    cfg = unet.config
    with torch.no_grad():
        unet(torch.randn(1, cfg.in_channels, 8, 8), torch.tensor([10]),
             torch.randn(1, 77, cfg.cross_attention_dim))
    held = _held(unet)
    reported = unet.get_memory_footprint()
    assert abs(held - reported) <= 0.03 * held, (held, reported)
    layers = [m for m in unet.modules() if isinstance(m, QuantizedLayerMixin)]
    assert layers
    if config == "w8a8":
        assert all("engine_weight" in m._buffers for m in layers if m.on_engine and m.scale.dim() == 1)
    assert reported < fp16


def test_footprint_counts_the_engine_copy_kept_beside_the_codes_under_training():
    """A forward with gradients does not hand the codes to the engine: the packed copy sits
    beside them, and the reported footprint says so (then shrinks again once compacted)."""
    from dq.testing import tiny_sd_pipeline

    cpu.clear_cache()
    pipe = tiny_sd_pipeline(seed=0)
    dq.quantize(pipe, "w8a8", calib_prompts=["a red circle"], calibration={"num_inference_steps": 2},
                progress=False)
    unet = pipe.unet
    cfg = unet.config
    args = (torch.tensor([10]), torch.randn(1, 77, cfg.cross_attention_dim))
    before = unet.get_memory_footprint()
    x = torch.randn(1, cfg.in_channels, 8, 8, requires_grad=True)
    unet(x, *args).sample.sum().backward()
    training = unet.get_memory_footprint()
    assert abs(training - _held(unet)) <= 0.03 * training, (training, _held(unet))
    assert training > 1.5 * before  # codes and the engine's packed copy
    with torch.no_grad():
        unet(x.detach(), *args)
    after = unet.get_memory_footprint()  # compacted: the packed weight replaced the codes
    assert after <= 1.05 * before and abs(after - _held(unet)) <= 0.03 * after
