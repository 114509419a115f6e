"""LoRA on quantized layers: peft wraps `QLinear` / `QConv2d` with a float LoRA branch.

peft picks a LoRA wrapper for each targeted layer through a list of dispatchers that only
knows float `nn.Linear` / `nn.Conv2d` (and a few quantization libraries). Importing dq (this
module) adds one dispatcher in front of peft's own, for dq's layers only:

    pipe = dq.quantize(pipe, "w8a8", prompts)
    pipe.load_lora_weights("lora_dir")          # diffusers / peft format
    pipe.set_adapters(["a"], [0.8]); pipe.disable_lora(); pipe.enable_lora()
    pipe.unload_lora_weights()
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))

The wrappers are peft's own `lora.Linear` / `lora.Conv2d` (so every peft and diffusers feature
that works through them -- adapter scales, enabling, deleting, unloading, training -- works
unchanged): the base runs on its quantized kernel, the LoRA branch in float beside it,
``y = base_q(x) + B(A(x)) * scale``. Only what would read a float base weight is dq's:

- layer construction and adapter placement use the layer's geometry, never its weight;
- `merge` (diffusers' `fuse_lora`) re-quantizes the layer: dequantize, add the LoRA delta,
  round to nearest in the layer's own spec on fresh scales, activation range kept (a BOS-aware
  layer's precomputed BOS output gets the delta too). `unmerge` (`unfuse_lora`) restores the
  stored codes exactly. A fused LoRA runs at the quantized layer's full speed but is rounded
  with the weight; fusing into the float model *before* `dq.quantize` (and calibrating with the
  LoRA in place) gives the best speed and accuracy.

Not supported on dq layers (a clear error): DoRA (`use_dora`, needs the float weight norm),
LoRA initialisations computed from the base weight (PiSSA, OLoRA, LoftQ, EVA, CorDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dq.modules import QConv2d, QLinear, QuantizedLayerMixin

try:  # peft is optional: without it there is nothing to dispatch to
    from peft.tuners.lora import layer as _peft_layer
    from peft.tuners.lora import model as _peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError:  # pragma: no cover - exercised only without peft
    _peft_layer = None

_WEIGHT_INITS = ("pissa", "olora", "loftq", "eva", "corda", "orthogonal")


def _proxy(base: QuantizedLayerMixin) -> nn.Module:
    """A weightless (meta) float layer of `base`'s geometry, for peft code that builds the
    LoRA branch from the base layer's type and shape."""
    has_bias = base.bias is not None
    if isinstance(base, QLinear):
        return nn.Linear(base.in_features, base.out_features, bias=has_bias, device="meta")
    return nn.Conv2d(
        base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
        base.dilation, base.groups, bias=has_bias, device="meta",
    )


def _check_config(config, kwargs) -> None:
    if kwargs.get("use_dora") or getattr(config, "use_dora", False):
        raise ValueError(
            "DoRA (use_dora=True) is not supported on dq's quantized layers: it needs the float "
            "weight's norm. Train DoRA on the float model, or use plain LoRA on the quantized one"
        )
    init = kwargs.get("init_lora_weights", getattr(config, "init_lora_weights", True))
    if isinstance(init, str) and init.lower().startswith(_WEIGHT_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} is computed from the base weight, which dq's quantized "
            "layers hold as codes; use init_lora_weights=True (or 'gaussian') on a quantized model"
        )


def _delta(self, adapter: str) -> torch.Tensor:
    """The float weight delta of one adapter, shaped like the base weight."""
    a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
    scaling = self.scaling[adapter]
    if a.dim() == 2:
        return (b @ a) * scaling
    if a.shape[2:] == (1, 1) and b.shape[2:] == (1, 1):  # 1x1 convolutions
        return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], a.shape[1], 1, 1) * scaling
    return F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3) * scaling


class _DQLoraMixin:
    """What differs from peft's float wrappers: construction, placement, merging."""

    def _dq_init(self, base_layer, adapter_name, **kwargs) -> None:
        object.__setattr__(self, "_dq_base", base_layer)
        _check_config(kwargs.get("config"), kwargs)
        # peft reads the float base layer's type / shape / device while it builds the branch:
        # give it a weightless twin, then put the quantized layer in place.
        super().__init__(_proxy(base_layer), adapter_name, **kwargs)
        self.base_layer = base_layer
        self._dq_saved = None  # the codes before a merge, restored exactly by unmerge

    def update_layer(self, adapter_name, *args, **kwargs):
        _check_config(kwargs.get("config"), kwargs)
        current = self._modules["base_layer"]
        self._modules["base_layer"] = _proxy(self._dq_base)
        try:
            return super().update_layer(adapter_name, *args, **kwargs)
        finally:
            self._modules["base_layer"] = current

    def _move_adapter_to_device_of_base_layer(self, adapter_name, device=None) -> None:
        base = self._dq_base
        target = device if device is not None else base.scale.device
        for name in self.adapter_layer_names + self.other_param_names:
            layer = getattr(self, name, None)
            if isinstance(layer, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in layer:
                if all(p.device.type != "meta" for p in layer[adapter_name].parameters()):
                    layer[adapter_name] = layer[adapter_name].to(target)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        return _delta(self, adapter)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.lora_A]
        if not adapter_names:
            return
        base = self._dq_base
        delta = sum(_delta(self, a) for a in adapter_names).to(base.scale.device)
        w = base.dequantize() + delta.reshape(base.weight_shape)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(
                f"NaNs or infs in the merged weight of adapters {adapter_names}; not fused"
            )
        if self._dq_saved is None:
            self._dq_saved = {k: v.clone() for k, v in base.state_dict().items()}
        base.requantize(w)
        bos_in, bos_out = base._buffers.get("bos_input"), base._buffers.get("bos_output")
        if bos_out is not None:  # the BOS token's float path gets the delta too
            bos_out.add_(F.linear(bos_in.float(), delta.reshape(bos_out.numel(), -1)))
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._dq_saved is not None:
            self._dq_base.load_state_dict(self._dq_saved)
            self._dq_saved = None
        self.merged_adapters.clear()


if _peft_layer is not None:

    class LoraQLinear(_DQLoraMixin, _peft_layer.Linear):
        """peft's `lora.Linear` around a `dq.modules.QLinear`."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            kwargs.pop("fan_in_fan_out", None)
            self._dq_init(base_layer, adapter_name, fan_in_fan_out=False, **kwargs)

    class LoraQConv2d(_DQLoraMixin, _peft_layer.Conv2d):
        """peft's `lora.Conv2d` around a `dq.modules.QConv2d`."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            self._dq_init(base_layer, adapter_name, **kwargs)

    def dispatch_dq(target: nn.Module, adapter_name: str, config=None, **kwargs):
        """peft dispatcher: dq's quantized layers -> dq's LoRA wrappers (else None)."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if kwargs.get("parameter_name") is not None:
            return None
        kwargs.pop("parameter_name", None)
        if isinstance(base, QLinear):
            return LoraQLinear(target, adapter_name, config=config, **kwargs)
        if isinstance(base, QConv2d):
            return LoraQConv2d(target, adapter_name, config=config, **kwargs)
        return None

    def _install() -> None:
        lora_model = _peft_model.LoraModel
        original = lora_model.__dict__["_create_new_module"]
        if getattr(original, "_dq", False):
            return
        original_fn = original.__func__

        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            custom = getattr(lora_config, "_custom_modules", None) or {}
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not any(isinstance(base, k) for k in custom):  # a user's own mapping wins
                new = dispatch_dq(target, adapter_name, config=lora_config, **kwargs)
                if new is not None:
                    return new
            return original_fn(lora_config, adapter_name, target, **kwargs)

        _create_new_module._dq = True
        lora_model._create_new_module = staticmethod(_create_new_module)

        original_replace = lora_model._replace_module

        def _replace_module(self, parent, child_name, new_module, child):
            # peft finds the device from `child.qweight`, which is a method on dq's layers
            base = child.base_layer if hasattr(child, "base_layer") else child
            if not isinstance(base, QuantizedLayerMixin):
                return original_replace(self, parent, child_name, new_module, child)
            setattr(parent, child_name, new_module)
            for name, module in new_module.named_modules():
                if self.prefix in name and all(p.device.type != "meta" for p in module.parameters()):
                    module.to(base.scale.device)
            return None

        lora_model._replace_module = _replace_module

    _install()
