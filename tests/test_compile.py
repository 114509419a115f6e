"""Quantized layers under torch.compile: no graph breaks inside them, same results as eager."""

import pytest
import torch
from torch import nn

from dq.config import LayerSpec
from dq.modules import QConv2d, QLinear

SPECS = [LayerSpec("int8", act="uint8"), LayerSpec("int4", "group16"), LayerSpec("fp8_e4m3")]


@pytest.mark.parametrize("spec", SPECS, ids=["w8a8", "w4a16-g16", "fp8"])
def test_quantized_layers_compile_fullgraph(spec):
    torch.manual_seed(0)
    x_lin, x_conv = torch.randn(2, 7, 32), torch.randn(1, 16, 8, 8)
    rng = lambda x: (float(x.min()), float(x.max()))  # noqa: E731
    block = nn.Sequential()
    block.lin = QLinear.from_float(nn.Linear(32, 16), spec, act_range=rng(x_lin))
    conv = QConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), spec, act_range=rng(x_conv))

    def f(a, b):
        return block.lin(a).sum() + conv(b).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # raises on any graph break
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x_lin, x_conv), f(x_lin, x_conv), rtol=1e-5, atol=1e-5)


def test_quantized_unet_adds_no_graph_breaks(fresh_tiny_sd):
    import dq

    unet = fresh_tiny_sd.unet
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, 32)

    def breaks(model):
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(x, t, ctx).graph_break_count

    base = breaks(unet)
    dq.quantize_model(unet, "w8a8", calibrate=lambda m: m(x, t, ctx))
    assert breaks(unet) <= base
