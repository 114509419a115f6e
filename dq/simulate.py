"""Reversible simulation of a quantization plan: `fake_quantized(unet, plan, act_ranges)`.

Inside the context the named float layers compute exactly what dq's quantized modules compute
under the reference kernel backend — the same grid values (`dq.quant.quantize_weight`), the
same dequantization (`dq.quant.scale_values`), the same activation rounding
(`dq.modules.simulated_act`), the same BOS split — so the UNet's output equals the real
quantized UNet's bit for bit. Any format works, including ones no kernel runs (4- or 6-bit
activations, FP8 activations). On exit, even after an exception, the original layer objects
are put back untouched (their weights are never written).

It is what sensitivity analysis and plan search use: entering costs one weight quantization per
layer, and nothing is packed.

    with fake_quantized(unet, {"mid_block.attentions.0.proj_in": LayerSpec("int4")}):
        y = unet(x, t, ctx).sample
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dq import quant
from dq.config import LayerSpec
from dq.modules import (
    QConv2d,
    QuantizedLayerMixin,
    _act_buffers,
    bos_constants,
    bos_forward,
    check_spec_fits,
    simulated_act,
)
from dq.quant import QWeight
from dq.storage import resolve_spec

__all__ = ["fake_quantized", "SimulatedLayer"]


class SimulatedLayer(nn.Module):
    """A float Linear/Conv2d computing as its quantized counterpart would (reference maths).

    Args:
        float_module: the layer it stands in for (kept, never modified).
        spec: the shape-resolved spec.
        qweight: the weight's grid values, or None to keep the float weight.
        act_range: calibrated (min, max) input range when `spec.act` is set and activations
            are simulated, else None (float inputs).
        bos: the BOS embedding for a BOS-aware key/value layer, else None.
    """

    def __init__(
        self,
        float_module: nn.Module,
        spec: LayerSpec,
        qweight: QWeight | None,
        act_range: tuple[float, float] | None,
        bos: torch.Tensor | None = None,
    ):
        super().__init__()
        self.float_module = float_module
        self.spec = spec
        dev = float_module.weight.device
        self.weight = (
            float_module.weight.detach().float() if qweight is None
            else qweight.dequantize().to(dev)
        )
        self.bias = None if float_module.bias is None else float_module.bias.detach().float()
        self.act = None
        if act_range is not None:
            s, zp = _act_buffers(spec, *act_range)
            self.act = (s.to(dev), zp.to(dev))
        self.bos = None if bos is None else bos_constants(float_module, bos)

    def _codes_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.act is not None:
            x = simulated_act(self.spec, x, *self.act)
        m = self.float_module
        if isinstance(m, nn.Conv2d):
            y = F.conv2d(x, self.weight, self.bias, m.stride, m.padding, m.dilation, m.groups)
            return y.to(dtype, memory_format=torch.channels_last)  # as the quantized conv
        return F.linear(x, self.weight, self.bias).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos is None:
            return self._codes_forward(x)
        return bos_forward(x, self.bos[0], self.bos[1], self._codes_forward)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@contextlib.contextmanager
def fake_quantized(
    unet: nn.Module,
    plan: Mapping[str, LayerSpec | None],
    act_ranges: Mapping[str, tuple[float, float]] | None = None,
    *,
    weights: bool | Collection[str] = True,
    activations: bool | Collection[str] = True,
    qweights: Mapping[str, QWeight] | None = None,
    bos: torch.Tensor | None = None,
    bos_layers: Collection[str] = (),
) -> Iterator[nn.Module]:
    """Simulate `plan` on `unet` for the duration of a `with` block, then restore it.

    Args:
        unet: a float model (its quantizable layers still nn.Linear / nn.Conv2d).
        plan: layer name -> LayerSpec (None entries are ignored), e.g. one layer at a time.
        act_ranges: layer name -> calibrated (min, max) input range, needed for every layer
            whose spec quantizes activations (and whose activations are simulated).
        weights: quantize the weights of every planned layer (True), of none (False: an
            activation-only simulation), or of the named layers.
        activations: likewise for the activations of specs with `act`.
        qweights: precomputed grid values per layer (e.g. learned rounding), used as given.
        bos: BOS embedding [D]; with `bos_layers`, those key/value layers keep token 0 in full
            precision exactly as `QLinear.enable_bos` does.

    Yields:
        The same `unet`, simulated.

    Example:
        >>> with fake_quantized(unet, plan, ranges) as m:
        ...     y = m(x, t, ctx).sample
    """
    act_ranges = act_ranges or {}
    qweights = qweights or {}

    def chosen(sel: bool | Collection[str], name: str) -> bool:
        return sel if isinstance(sel, bool) else name in sel

    swaps: list[tuple[str, nn.Module, nn.Module]] = []
    for name, spec in plan.items():
        if spec is None:
            continue
        module = unet.get_submodule(name)
        if isinstance(module, QuantizedLayerMixin | SimulatedLayer) or not isinstance(
            module, nn.Linear | nn.Conv2d
        ):
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}; fake_quantized simulates float "
                "nn.Linear / nn.Conv2d layers (use the float model, not a quantized one)"
            )
        if isinstance(module, nn.Conv2d):
            QConv2d.check_float(module)
        spec = resolve_spec(spec, module.weight.shape)
        check_spec_fits(spec, module.weight.shape, name)
        qw = None
        if chosen(weights, name):
            qw = qweights.get(name) or quant.quantize_weight(module.weight, spec)
        act_range = None
        if spec.act is not None and chosen(activations, name):
            if name not in act_ranges:
                raise ValueError(
                    f"layer {name!r} quantizes activations ({spec.act}) but act_ranges has no "
                    "range for it; pass the calibrated (min, max) from dq.capture"
                )
            act_range = act_ranges[name]
        layer_bos = bos if (bos is not None and name in bos_layers) else None
        swaps.append((name, module, SimulatedLayer(module, spec, qw, act_range, layer_bos)))
    try:
        for name, _, sim in swaps:
            _set_submodule(unet, name, sim)
        yield unet
    finally:
        for name, original, _ in swaps:
            _set_submodule(unet, name, original)
