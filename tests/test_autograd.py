"""Gradients flow through quantized layers to their inputs (frozen base, straight-through
activation rounding); asking for gradients of codes is a clear error."""

import pytest
import torch
from torch import nn

import dq
from dq.config import LayerSpec
from dq.modules import QConv2d, QLinear

SPECS = [LayerSpec("int8", act="uint8"), LayerSpec("int4", "group16"), LayerSpec("fp4_e2m1", act="uint8"),
         LayerSpec("fp8_e4m3")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.weight}-{s.act}")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_gradient_equals_the_dequantized_float_layer(kind, spec):
    torch.manual_seed(0)
    layer = nn.Linear(32, 16) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 5, 32) if kind == "linear" else torch.randn(2, 8, 6, 6)
    cls = QLinear if kind == "linear" else QConv2d
    q = cls.from_float(layer, spec, act_range=(-10.0, 10.0) if spec.act else None)  # no clipping
    xg = x.clone().requires_grad_(True)
    q(xg).square().sum().backward()
    ref = x.clone().requires_grad_(True)
    w = q.dequantize()
    y = (torch.nn.functional.linear(ref, w, q.bias) if kind == "linear"
         else torch.nn.functional.conv2d(ref, w, q.bias, padding=1))
    # d/dx of sum(y^2) uses y itself: compare through the same upstream gradient
    (2 * q(x).detach() * y).sum().backward()
    torch.testing.assert_close(xg.grad, ref.grad, rtol=1e-4, atol=1e-4)


def test_a_lora_style_training_step_updates_only_the_float_branch(tiny_sd):
    import copy

    unet = copy.deepcopy(tiny_sd.unet)
    dq.quantize_model(unet, "w4a16")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = unet.get_submodule(name)
    down = nn.Linear(base.in_features, 4, bias=False)
    up = nn.Linear(4, base.out_features, bias=False)
    nn.init.normal_(up.weight, std=0.01)

    class WithLora(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.down, self.up = base, down, up

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    parent = unet.get_submodule(name.rsplit(".", 1)[0])
    parent.to_q = WithLora()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.SGD([*down.parameters(), *up.parameters()], lr=0.1)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, requires_grad=True)
    out = unet(x, torch.tensor([10]), torch.randn(1, 77, cfg.cross_attention_dim)).sample
    out.square().mean().backward()
    opt.step()
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".down." in k or ".up." in k for k in changed)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradient_of_codes_is_a_clear_error():
    q = QLinear.from_float(nn.Linear(16, 8), LayerSpec("int8", act="uint8"), act_range=(-1.0, 1.0))
    q.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        q(torch.randn(2, 16, requires_grad=True)).sum().backward()
