"""`dq.storage`: one packing table and pure byte costs equal to the built modules'."""

import pytest
import torch
from torch import nn

from dq import formats, storage
from dq.config import LayerSpec
from dq.modules import QConv2d, QLinear
from dq.quant import quantize_weight

FORMATS = ["int8", "int6", "int4", "int3", "int2", "uint8", "uint4", "fp8_e4m3", "fp8_e5m2",
           "fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1", "fp4_e3m0", "fp3_e2m0"]
GRANULARITIES = ["tensor", "channel", "group16", "group48"]  # 48 does not divide 64: per channel


@pytest.mark.parametrize("act", [None, "uint8"])
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spec_nbytes_equals_the_built_module(kind, fmt, gran, act):
    layer = nn.Linear(64, 24) if kind == "linear" else nn.Conv2d(16, 8, 2)  # K = 64 both
    spec = LayerSpec(fmt, gran, act=act)
    cls = QLinear if kind == "linear" else QConv2d
    q = cls.from_float(layer, spec, act_range=(-1.0, 1.0) if act else None)
    assert storage.spec_nbytes(spec, layer.weight.shape) == q.quant_weight_nbytes()
    bias = layer.bias.numel() * 4
    assert q.quant_nbytes() == q.quant_weight_nbytes() + bias


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_unpack_round_trips_grid_values(fmt):
    f = formats.get(fmt)
    w = torch.randn(6, 34)
    qw = quantize_weight(w, LayerSpec(fmt, "channel"))
    packed = storage.pack(qw.values, f)
    assert packed.dtype == storage.storage_of(f).dtype
    assert torch.equal(storage.unpack(packed, f, 34), qw.values)


def test_spec_nbytes_on_a_meta_sd15_unet():
    from diffusers import UNet2DConditionModel

    from dq import recipes

    cfg = recipes.get("sd15").unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    layers = [m for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    fp16 = sum(m.weight.numel() * 2 for m in layers)
    w4 = sum(storage.spec_nbytes(LayerSpec("int4", "group64"), m.weight.shape) for m in layers)
    w8 = sum(storage.spec_nbytes(LayerSpec("int8", act="uint8"), m.weight.shape) for m in layers)
    assert 0.25 < w4 / fp16 < 0.3 and 0.5 < w8 / fp16 < 0.51
    assert all(m.weight.is_meta for m in layers)  # nothing was materialised
