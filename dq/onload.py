"""Quantize while diffusers loads a float checkpoint (weight-only dq configs).

    from dq.serialization import DQDiffusersConfig
    unet = UNet2DConditionModel.from_pretrained(
        "sd15", subfolder="unet", quantization_config=DQDiffusersConfig(config="w8a16"))

diffusers builds the model on the meta device, then hands the checkpoint's tensors one by one
to dq's quantizer (`DQQuantizer.create_quantized_param`). The float layers the plan quantizes
stay on meta until their own tensors arrive; the moment a layer holds all of them (weight and
bias) it is quantized by the same `from_float` that `dq.quantize_model` runs, swapped in, and
its float tensors are dropped. Beyond what diffusers itself reads (the checkpoint, which
safetensors memory-maps), at most one layer's float weight is alive at a time, and the result
equals `dq.quantize_model` of the float model loaded with the same `torch_dtype`, bit for bit.

Only weight-only configs load this way: activation formats need ranges calibrated on real
inputs, so they are refused with a pointer to `dq.quantize(pipe, config, calib_prompts=...)`.
Layers of the model class's `_keep_in_fp32_modules` stay in float32, as diffusers' own
quantizers keep them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from dq.config import QuantConfig
from dq.modules import QConv2d, quantized_module_for

__all__ = ["LoadTimeQuantizer", "request_config", "weight_only_presets"]


def weight_only_presets() -> list[str]:
    """The preset names that quantize on load (no activation format)."""
    from dq.config import PRESETS

    return sorted(n for n, (spec, _doc) in PRESETS.items() if spec.act is None)


def request_config(
    config: str | QuantConfig | Mapping[str, Any], modules_to_not_convert: Iterable[str] = ()
) -> QuantConfig:
    """The QuantConfig a quantize-on-load request stands for; ValueError for anything that
    cannot be applied while loading (activation formats, mixed-precision presets).

    Args:
        config: a preset name ("w8a16", "w4a16", "fp8", "fp4"), a QuantConfig, or its dict.
        modules_to_not_convert: more layers kept in float, as diffusers' quantizers name them
            (plain module names such as "to_k" or "attn2", or globs); added to the config's skips.

    Example:
        >>> request_config("w8a16", ["attn2"]).skip
        ('conv_in', 'conv_out', 'attn2')
    """
    only = ", ".join(repr(n) for n in weight_only_presets())
    if isinstance(config, str):
        try:
            cfg = QuantConfig.from_preset(config)
        except ValueError as e:
            raise ValueError(f"{e}. Presets that quantize on load: {only}") from None
    elif isinstance(config, QuantConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = QuantConfig.from_dict(dict(config))
    else:
        raise ValueError(
            f"config must be a dq preset name (e.g. 'w8a16'), a dq.QuantConfig or its dict, got "
            f"{type(config).__name__}"
        )
    if cfg.needs_activation_calibration:
        acts = sorted({s.act for s in (cfg.default, *cfg.layers.values()) if s is not None and s.act})
        raise ValueError(
            f"config {cfg.name!r} quantizes activations ({', '.join(acts)}), which needs "
            "activation ranges calibrated on real prompts, so it cannot be applied while "
            "loading. Load the float pipeline and run dq.quantize(pipe, config, "
            "calib_prompts=[...]) (then save_pretrained: that folder loads quantized), or "
            f"quantize on load with a weight-only config ({only})"
        )
    extra = (modules_to_not_convert,) if isinstance(modules_to_not_convert, str) else modules_to_not_convert
    extra = tuple(p for p in (extra or ()) if p not in cfg.skip)
    if extra:
        cfg = dataclasses.replace(cfg, skip=(*cfg.skip, *extra))
    return cfg


class LoadTimeQuantizer:
    """The layer-by-layer state of one quantize-on-load: the plan resolved on the meta model,
    and the planned float layers still waiting for some of their tensors.

    Args:
        config: a weight-only QuantConfig (see `request_config`).

    Example (what `DQQuantizer` does with it):
        >>> lq = LoadTimeQuantizer(cfg); lq.prepare(meta_unet)
        >>> for name, t in checkpoint: lq.take(meta_unet, name, t, "cpu") if lq.owns(name) else ...
        >>> resolved = lq.finish(unet)
    """

    def __init__(self, config: QuantConfig):
        self.config = config
        self.plan: dict[str, Any] = {}
        self.waiting: set[str] = set()

    def prepare(self, model: nn.Module, keep_in_fp32_modules: Iterable[str] = ()) -> None:
        """Resolve the plan on `model` (its tensors on meta: only shapes are read). Layers
        under `keep_in_fp32_modules` stay in float."""
        from dq import validate
        from dq.api import resolve_plan

        keep = tuple(p for p in (keep_in_fp32_modules or ()) if p not in self.config.skip)
        cfg = dataclasses.replace(self.config, skip=(*self.config.skip, *keep)) if keep else self.config
        self.plan = resolve_plan(model, cfg)
        validate.check_plan_coverage(self.config, self.plan, stacklevel=6)
        for name, spec in self.plan.items():
            module = model.get_submodule(name)
            if spec is not None and isinstance(module, nn.Conv2d):
                QConv2d.check_float(module)  # before any tensor is read
        self.waiting = {n for n, s in self.plan.items() if s is not None}

    def owns(self, param_name: str) -> bool:
        """Whether `param_name` is a tensor of a planned layer that is still float."""
        layer, _, tensor = param_name.rpartition(".")
        return layer in self.waiting and tensor in ("weight", "bias")

    def take(self, model: nn.Module, param_name: str, value: torch.Tensor, device: Any) -> None:
        """Give a planned layer one of its float tensors (as diffusers hands it over, already in
        the load's `torch_dtype`); once it holds all of them, quantize and swap it in."""
        layer, _, tensor = param_name.rpartition(".")
        module = model.get_submodule(layer)
        value = value.to(device)
        if tensor == "weight" and not bool(torch.isfinite(value).all()):
            n_bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"layer {layer!r} holds NaN or infinite weights ({n_bad} of {value.numel()} "
                "values) in the checkpoint; its quantization scales would be NaN. Repair the "
                "checkpoint, or keep the layer in float (modules_to_not_convert=[...])"
            )
        module._parameters[tensor] = nn.Parameter(value, requires_grad=False)
        if any(p.is_meta for p in module.parameters(recurse=False)):
            return  # the rest of this layer is still to come
        q = quantized_module_for(module).from_float(module, self.plan[layer])
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        self.waiting.discard(layer)  # the float tensors go with `module`

    def finish(self, model: nn.Module) -> QuantConfig:
        """The resolved plan (every layer named: what save_pretrained writes); ValueError when
        a planned layer never received its tensors."""
        if self.waiting:
            left = sorted(self.waiting)
            raise ValueError(
                f"{len(left)} layer(s) the dq config quantizes were not (fully) in the "
                f"checkpoint, e.g. {left[:3]}: their float weight or bias is missing. Check that "
                "the folder holds the complete float model"
            )
        from dq.api import _resolved_config

        return _resolved_config(self.config, self.plan)


# ----------------------------------------------------------------------------------------------
# PipelineQuantizationConfig(quant_backend="dq"): the backend must be known to transformers too
# ----------------------------------------------------------------------------------------------
# diffusers' PipelineQuantizationConfig refuses a backend that transformers (when installed)
# does not list, even for components that are diffusers models. dq quantizes diffusers models
# only, so transformers gets a stand-in config class with the same signature (diffusers compares
# the two) that refuses transformers components with a clear message. Registered when
# `transformers.quantizers.auto` is imported, so `import dq` does not import transformers.

_TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"


def _transformers_stand_in() -> type:
    import functools

    from dq.serialization import DQDiffusersConfig

    class DQTransformersStandIn:
        """dq for transformers components: refused (dq quantizes diffusers UNets)."""

        @functools.wraps(DQDiffusersConfig.__init__)
        def __init__(self, *args: Any, **kwargs: Any):
            raise ValueError(
                "dq quantizes diffusers models (the UNet), not transformers components such as "
                "text encoders: list only diffusers components in components_to_quantize, e.g. "
                "PipelineQuantizationConfig(quant_backend='dq', quant_kwargs={'config': "
                "'w8a16'}, components_to_quantize=['unet'])"
            )

    return DQTransformersStandIn


def register_with_transformers() -> None:
    """Add the "dq" backend name to transformers' quantization-config registry (if transformers
    is installed and that registry imported); idempotent."""
    registry = sys.modules.get(_TRANSFORMERS_REGISTRY)
    mapping = getattr(registry, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    if isinstance(mapping, dict) and "dq" not in mapping:
        mapping["dq"] = _transformers_stand_in()


def register_with_transformers_when_imported() -> None:
    """`register_with_transformers` now if transformers' registry is loaded, else as soon as
    it is imported (diffusers imports it when a PipelineQuantizationConfig is built)."""
    from dq._registration import when_imported

    when_imported(_TRANSFORMERS_REGISTRY, register_with_transformers)
