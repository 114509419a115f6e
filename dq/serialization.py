"""Save and load dq-quantized pipelines in diffusers' own hub layout.

After `dq.quantize`, `pipe.save_pretrained(dir)` writes the usual `model_index.json` and one
folder per component. A quantized component (the UNet) keeps its packed codes, scales and
activation parameters in safetensors, and its `config.json` gains a JSON-only
`quantization_config`:

    "quantization_config": {
      "quant_method": "dq (install dq and run `import dq` before loading this model)",
      "format_version": 1,                       # this layout; loaders refuse newer ones
      "dq_version": "0.1.0",                     # the dq that wrote it
      "plan": {...},                             # QuantConfig.to_dict(): every layer -> spec | null
      "extra_buffers": {"<module>": ["<name>"]}  # precomputed constants beyond codes and scales
    }

Every safetensors file of a quantized component also carries, in its header metadata, the
layout version and a CRC-32 of every tensor, so a corrupted file is caught at load time.

`import dq` registers the "dq" method with diffusers' quantizer registry (as third-party
quantizers do), so `DiffusionPipeline.from_pretrained(dir)` and the model classes'
`from_pretrained` rebuild `QLinear` / `QConv2d` skeletons from the plan and fill them from the
file: no calibration data, no re-quantization, and only safetensors and JSON are read. Without
`import dq`, diffusers' own error quotes the method name, which says to import dq.

Saving a dq pipeline is atomic: `dq.save_pretrained(pipe, dir)` (and `pipe.save_pretrained`
on a pipeline from `dq.quantize` / `dq.load`) writes a complete sibling folder, fsyncs it and
swaps it in with one `renameat2(RENAME_EXCHANGE)`, so a save killed midway leaves the previous
content intact.

Example:
    >>> pipe = dq.quantize(pipe, "w4a16")
    >>> pipe.save_pretrained("sd-w4a16")                        # atomic
    >>> pipe = DiffusionPipeline.from_pretrained("sd-w4a16")    # after `import dq`
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import types
import weakref
import zlib
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers import auto as _diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from dq.config import QuantConfig
from dq.modules import QConv2d, QLinear, QuantizedLayerMixin, quantized_module_for

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "DQDiffusersConfig",
    "DQQuantizer",
    "attach_quantization_config",
    "bind_atomic_save",
    "check_saved",
    "extra_buffers",
    "load",
    "register",
    "register_constant",
    "save_pretrained",
]

FORMAT_VERSION = 1  # layout of `quantization_config` + safetensors metadata; bump on change

# The method name is what diffusers prints when dq is not imported ("Unknown quantization type,
# got <quant_method> - supported types are: [...]"), so it is written as the instruction.
QUANT_METHOD = "dq (install dq and run `import dq` before loading this model)"
_ALIASES = ("dq",)  # also accepted on load (hand-written configs)

# Tensors every quantized layer may hold (dq.modules); anything else on a dq layer is an extra
# buffer (a precomputed constant) and is declared in `extra_buffers`.
STANDARD_TENSORS = frozenset(
    {"qdata", "scale", "zero_point", "input_scale", "input_zero_point", "bias"}
)

_META_FORMAT = "dq_format_version"  # safetensors header metadata keys
_META_CHECKSUMS = "dq_checksums"

# safetensors dtype names <-> torch dtypes (for header checks without reading tensor data)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _dq_version() -> str:
    import dq

    return getattr(dq, "__version__", "0")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(v))[:3])


class DQQuantizationMethod(str, Enum):
    """diffusers reads `quant_method.value`; dq has one method."""

    DQ = QUANT_METHOD


# ----------------------------------------------------------------------------------------------
# The quantization_config stored in config.json
# ----------------------------------------------------------------------------------------------


class DQDiffusersConfig(QuantizationConfigMixin):
    """The `quantization_config` of a dq-quantized diffusers model (JSON only).

    Args:
        plan: the resolved `QuantConfig` as a dict (`QuantConfig.to_dict()`): every quantizable
            layer -> its LayerSpec dict, or None where the layer stays in float.
        dq_version: version of the dq that wrote the checkpoint.
        format_version: version of this layout; a newer one than this dq knows is refused.
        extra_buffers: module name -> names of extra persistent buffers (precomputed constants)
            the checkpoint holds beyond codes, scales and float weights.
        quant_method: the registered method name (the default, or the "dq" alias).

    Example:
        >>> cfg = DQDiffusersConfig.from_quant_config(QuantConfig.from_preset("w8a16"))
        >>> DQDiffusersConfig.from_dict(cfg.to_dict()).quant_config == cfg.quant_config
        True
    """

    def __init__(
        self,
        plan: dict[str, Any] | None = None,
        dq_version: str | None = None,
        format_version: int = FORMAT_VERSION,
        extra_buffers: dict[str, list[str]] | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        if quant_method not in (QUANT_METHOD, *_ALIASES):
            raise ValueError(
                f"quant_method {quant_method!r} is not dq's; this config belongs to another "
                "quantization backend"
            )
        self.quant_method = DQQuantizationMethod.DQ
        self.dq_version = str(dq_version or _dq_version())
        newer = _version_tuple(self.dq_version) > _version_tuple(_dq_version())
        hint = (
            f" It was written by dq {self.dq_version}, newer than the installed dq "
            f"{_dq_version()}: upgrade dq (pip install -U dq)."
            if newer
            else ""
        )
        if kwargs:
            raise ValueError(
                f"dq quantization_config has unknown keys {sorted(kwargs)}.{hint or ' Was it written by a newer dq? Upgrade dq.'}"
            )
        try:
            self.format_version = int(format_version)
        except (TypeError, ValueError):
            raise ValueError(
                f"dq quantization_config has format_version={format_version!r}; expected an int "
                f"(this dq writes {FORMAT_VERSION})"
            ) from None
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses dq format version {self.format_version}, newer than this dq "
                f"understands ({FORMAT_VERSION}); upgrade dq (pip install -U dq) to load it.{hint}"
            )
        if plan is None:
            raise ValueError(
                "dq quantization_config has no 'plan'; the config.json was not written by dq "
                "(save quantized pipelines with pipe.save_pretrained after dq.quantize)"
            )
        try:
            self._quant_config = QuantConfig.from_dict(plan)
        except ValueError as e:
            raise ValueError(f"dq quantization_config: the plan is not valid: {e}{hint}") from e
        self.plan = self._quant_config.to_dict()
        self.extra_buffers = _check_extra_buffers(extra_buffers or {})
        self._model_ref: weakref.ref | None = None

    @classmethod
    def from_quant_config(
        cls, cfg: QuantConfig, extra_buffers: dict[str, list[str]] | None = None
    ) -> DQDiffusersConfig:
        """Wrap a (resolved) QuantConfig."""
        return cls(plan=cfg.to_dict(), extra_buffers=extra_buffers)

    @property
    def quant_config(self) -> QuantConfig:
        return self._quant_config

    def _bind(self, model: nn.Module) -> None:
        """Follow `model`: `to_dict` then records the extra buffers it holds at save time."""
        self._model_ref = weakref.ref(model)

    def to_dict(self) -> dict[str, Any]:
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            self.extra_buffers = extra_buffers(model)
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "dq_version": self.dq_version,
            "plan": json.loads(json.dumps(self.plan)),
            "extra_buffers": {k: list(v) for k, v in sorted(self.extra_buffers.items())},
        }

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        layers = self.plan.get("layers", {})
        n_q = sum(v is not None for v in layers.values())
        return (
            f"DQDiffusersConfig(format_version={self.format_version}, dq_version="
            f"{self.dq_version!r}, {n_q}/{len(layers)} layers quantized)"
        )


def _check_extra_buffers(d: Any) -> dict[str, list[str]]:
    if not isinstance(d, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v)
        for k, v in d.items()
    ):
        raise ValueError(
            "dq quantization_config: extra_buffers must map module names to lists of buffer "
            f"names, got {d!r}"
        )
    return {k: sorted(v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# Extra buffers (precomputed constants)
# ----------------------------------------------------------------------------------------------


def register_constant(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Attach a precomputed constant to `module` as a persistent buffer that dq saves and loads.

    On a dq layer (`QLinear`, `QConv2d`) any persistent buffer beyond the standard codes and
    scales is saved anyway; this function also works on other modules (e.g. an attention block)
    and marks the buffer so the loader recreates it.

    Args:
        module: the module that uses the constant.
        name: buffer name (a valid attribute name).
        tensor: the value.
    """
    if not name.isidentifier():
        raise ValueError(f"buffer name {name!r} is not a valid attribute name; use e.g. 'bos_kv'")
    module.register_buffer(name, tensor, persistent=True)
    marked = set(getattr(module, "_dq_extra_buffers", ()))
    module._dq_extra_buffers = marked | {name}


def extra_buffers(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> extra persistent buffers dq must save for `model` (see `register_constant`)."""
    out: dict[str, list[str]] = {}
    for mname, m in model.named_modules():
        names = set(getattr(m, "_dq_extra_buffers", ()))
        if isinstance(m, QuantizedLayerMixin):
            persistent = [
                n
                for n in m._buffers
                if n not in m._non_persistent_buffers_set and m._buffers[n] is not None
            ]
            names |= {n for n in persistent if n not in STANDARD_TENSORS}
        names = {n for n in names if m._buffers.get(n) is not None}
        if names:
            out[mname] = sorted(names)
    return out


# ----------------------------------------------------------------------------------------------
# Save side: the model carries the config and a quantizer
# ----------------------------------------------------------------------------------------------


def attach_quantization_config(model: nn.Module, cfg: QuantConfig) -> None:
    """Make `model.save_pretrained` write dq's format: the plan in `config.json`, codes and
    scales in safetensors. Called by `dq.quantize` with the resolved per-layer plan.

    Args:
        model: a diffusers model whose layers were replaced by dq's quantized modules.
        cfg: the resolved QuantConfig (every layer named, `default=None`).
    """
    register()
    missing = [
        n
        for n, s in cfg.layers.items()
        if s is not None and not isinstance(_get_submodule(model, n), QuantizedLayerMixin)
    ]
    if missing:
        raise ValueError(
            f"the plan quantizes {len(missing)} layer(s) that are not dq quantized modules, e.g. "
            f"{missing[:3]}; apply the plan first (dq.apply_plan) and attach the same plan"
        )
    qcfg = DQDiffusersConfig.from_quant_config(cfg, extra_buffers(model))
    qcfg._bind(model)
    model.hf_quantizer = DQQuantizer(qcfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qcfg.quant_method
    model._dq_config = cfg
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=qcfg)


def _get_submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's raw little-endian bytes (what safetensors stores)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.view(torch.uint8).numpy())


# ----------------------------------------------------------------------------------------------
# The diffusers quantizer
# ----------------------------------------------------------------------------------------------


class DQQuantizer(DiffusersQuantizer):
    """diffusers' hooks for dq checkpoints (pre-quantized only).

    Load order inside `ModelMixin.from_pretrained`: `maybe_update_loaded_keys` (read the
    safetensors headers), `_process_model_before_weight_loading` (swap in empty QLinear /
    QConv2d per the plan, their tensors on the meta device), `update_missing_keys` (check every
    tensor's name, shape and dtype against the plan: any mismatch raises before a weight is
    assigned), `maybe_update_state_dict` (CRC-32 check), `create_quantized_param` (assign codes
    and scales in their stored dtypes, never cast), `_process_model_after_weight_loading`
    (nothing may be left on the meta device).
    """

    requires_calibration = False
    required_packages = ["dq"]
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DQDiffusersConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError(
                "dq's diffusers integration loads checkpoints already quantized by dq; to "
                "quantize a float model use dq.quantize(pipe, config)"
            )
        self._files: list[str] = []
        self._header: dict[str, tuple[tuple[int, ...], str, str]] = {}
        self._checksums: dict[str, int] | None = None

    # -- properties diffusers asks for --
    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def supports_safetensors_serialization(self) -> bool:
        return True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "dq checkpoints cannot be offloaded to disk with device_map; load them without "
                "'disk' entries in device_map"
            )

    # -- save --
    def get_state_dict_and_metadata(
        self, state_dict: dict[str, Any], safe_serialization: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if not safe_serialization:
            raise ValueError(
                "dq checkpoints are saved as safetensors only (loading never unpickles); "
                "remove safe_serialization=False"
            )
        sums = {k: _crc32(v) for k, v in state_dict.items()}
        meta = {
            _META_FORMAT: str(FORMAT_VERSION),
            _META_CHECKSUMS: json.dumps(sums, sort_keys=True),
        }
        return state_dict, meta

    # -- load, in the order diffusers calls them --
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list) -> list[str]:
        files = [f for f in checkpoint_files if not isinstance(f, dict)]
        self._files = [str(f) for f in files]
        self._header, meta = read_safetensors_headers(self._files)
        self._checksums = _parse_checksums(meta, self._files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config.quant_config
        for name, spec in cfg.layers.items():
            if spec is None:
                continue
            module = _get_submodule(model, name)
            if module is None or quantized_module_for(module) is None:
                what = "does not exist" if module is None else f"is a {type(module).__name__}"
                raise ValueError(
                    f"the dq plan quantizes layer {name!r}, but in the {type(model).__name__} built "
                    f"from config.json it {what}: config.json and the plan disagree. Save the "
                    "quantized pipeline again with dq"
                )
            try:
                skeleton = _skeleton(module, spec)
            except ValueError as e:
                raise ValueError(f"dq plan entry for layer {name!r} cannot be built: {e}") from e
            _set_submodule(model, name, skeleton)
        for mname, names in self.quantization_config.extra_buffers.items():
            module = _get_submodule(model, mname)
            if module is None:
                raise ValueError(
                    f"the dq config declares extra buffers {names} on module {mname!r}, which the "
                    "model does not have; save the quantized pipeline again with dq"
                )
            for n in names:
                key = f"{mname}.{n}" if mname else n
                if key not in self._header:
                    raise ValueError(
                        f"the dq config declares buffer {key!r} but the checkpoint "
                        f"({_short(self._files)}) does not hold it; the folder is incomplete: "
                        "save the quantized pipeline again with dq"
                    )
                shape, dt, _ = self._header[key]
                empty = torch.empty(shape, dtype=_ST_DTYPES.get(dt, torch.float32), device="meta")
                register_constant(module, n, empty)
        model._dq_config = cfg
        return model

    def update_missing_keys(
        self, model: nn.Module, missing_keys: list[str], prefix: str
    ) -> list[str]:
        if self._header:
            _check_plan_matches_tensors(model, self._header, self._files)
        return missing_keys

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._checksums is None:
            return state_dict
        bad = [k for k, v in state_dict.items() if self._checksums.get(k) != _crc32(v)]
        if bad:
            files = sorted({self._header[k][2] for k in bad if k in self._header}) or self._files
            raise ValueError(
                f"{_short(files)} is corrupted: {len(bad)} tensor(s) do not match the checksums "
                f"written at save time (e.g. {bad[:3]}). Re-download the files, or save the "
                "quantized pipeline again"
            )
        return state_dict

    def check_if_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        state_dict: dict[str, Any],
        **kwargs: Any,
    ) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        module = _get_submodule(model, module_name) if module_name else model
        if isinstance(module, QuantizedLayerMixin):
            return True
        return tensor_name in getattr(module, "_dq_extra_buffers", ())

    def check_quantized_param_shape(
        self, param_name: str, current: torch.Tensor, loaded: torch.Tensor
    ) -> bool:
        if tuple(current.shape) != tuple(loaded.shape):
            raise ValueError(
                f"tensor {param_name!r} has shape {tuple(loaded.shape)} in the checkpoint but the "
                f"plan builds {tuple(current.shape)}; save the quantized pipeline again with dq"
            )
        return True

    def create_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: Any,
        state_dict: dict[str, Any],
        unexpected_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # diffusers casts floating tensors to `torch_dtype` before this call: take the stored
        # tensor instead, so codes (float8 too) and float32 scales keep their dtypes.
        value = state_dict.get(param_name, param_value)
        module_name, _, tensor_name = param_name.rpartition(".")
        module = _get_submodule(model, module_name) if module_name else model
        current = getattr(module, tensor_name)
        if current is not None and value.dtype != current.dtype:
            raise ValueError(
                f"tensor {param_name!r} is {value.dtype} in the checkpoint but the plan expects "
                f"{current.dtype}; save the quantized pipeline again with dq"
            )
        value = value.to(target_device)
        if tensor_name in module._parameters:
            module._parameters[tensor_name] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[tensor_name] = value

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        left = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
        if left:
            raise ValueError(
                f"{len(left)} tensor(s) were not found in the checkpoint ({left[:3]}); the "
                "folder is incomplete: save the quantized pipeline again with dq"
            )
        self.quantization_config._bind(model)
        model._dq_config = self.quantization_config.quant_config
        if hasattr(model, "register_to_config"):
            model.register_to_config(quantization_config=self.quantization_config)
        return model

    def _dequantize(self, model: nn.Module) -> nn.Module:
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantizedLayerMixin):
                _set_submodule(model, name, _float_module(m))
        if hasattr(model, "_internal_dict"):
            from diffusers.configuration_utils import FrozenDict

            model._internal_dict = FrozenDict(
                {k: v for k, v in model._internal_dict.items() if k != "quantization_config"}
            )
        for attr in ("_dq_config", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        return model


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    for mname, m in model.named_modules():
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                yield (f"{mname}.{n}" if mname else n), b


def _short(files: list[str]) -> str:
    return (
        ", ".join(str(Path(f).parent.name + "/" + Path(f).name) for f in files) or "the checkpoint"
    )


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _skeleton(module: nn.Module, spec) -> nn.Module:
    """An empty quantized layer for `module` (whose tensors may be on the meta device): real
    non-persistent tables (the code LUT), persistent tensors on meta until the file fills them."""
    if isinstance(module, nn.Linear):
        q = QLinear(module.in_features, module.out_features, module.bias is not None, spec)
    elif isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r} "
                "cannot be quantized"
            )
        q = QConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            spec,
        )
    else:
        raise ValueError(f"{type(module).__name__} has no dq quantized module")
    for n, b in list(q._buffers.items()):
        if b is not None and n not in q._non_persistent_buffers_set:
            q._buffers[n] = torch.empty_like(b, device="meta")
    for n, p in list(q._parameters.items()):
        if p is not None:
            q._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    return q


def _float_module(q: QuantizedLayerMixin) -> nn.Module:
    """The float layer a quantized one stands for (weights = dequantized codes)."""
    w = q.dequantize()
    bias = q.bias is not None
    if isinstance(q, QLinear):
        m = nn.Linear(q.in_features, q.out_features, bias=bias, device=w.device)
    else:
        m = nn.Conv2d(
            q.in_channels,
            q.out_channels,
            q.kernel_size,
            q.stride,
            q.padding,
            q.dilation,
            q.groups,
            bias=bias,
            device=w.device,
        )
    with torch.no_grad():
        m.weight.copy_(w)
        if bias:
            m.bias.copy_(q.bias)
    return m


# ----------------------------------------------------------------------------------------------
# Reading safetensors headers (no tensor data) and checking them against the plan
# ----------------------------------------------------------------------------------------------


def read_safetensors_headers(
    files: list[str],
) -> tuple[dict[str, tuple[tuple[int, ...], str, str]], dict[str, str]]:
    """Key -> (shape, safetensors dtype name, file) and the merged header metadata of `files`.

    Only the JSON headers are read. Raises ValueError for a file that is not safetensors
    (dq never unpickles) or whose header is truncated or corrupted.
    """
    header: dict[str, tuple[tuple[int, ...], str, str]] = {}
    meta: dict[str, str] = {}
    from safetensors import safe_open

    for f in files:
        if not str(f).endswith(".safetensors"):
            raise ValueError(
                f"{f} is not a safetensors file; dq checkpoints are loaded from safetensors only "
                "(never pickle). Save the quantized pipeline again with dq, which writes safetensors"
            )
        try:
            with safe_open(str(f), framework="pt") as h:
                meta.update(h.metadata() or {})
                for k in h.keys():
                    sl = h.get_slice(k)
                    header[k] = (tuple(sl.get_shape()), sl.get_dtype(), str(f))
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(
                f"{f} is not a readable safetensors file ({e}): it is truncated or corrupted. "
                "Re-download it, or save the quantized pipeline again"
            ) from e
    fv = meta.get(_META_FORMAT)
    if fv is not None and _version_tuple(fv) > (FORMAT_VERSION,):
        raise ValueError(
            f"{_short(files)} was written with dq format version {fv}, newer than this dq "
            f"understands ({FORMAT_VERSION}); upgrade dq (pip install -U dq)"
        )
    return header, meta


def _parse_checksums(meta: dict[str, str], files: list[str]) -> dict[str, int] | None:
    raw = meta.get(_META_CHECKSUMS)
    if raw is None:
        logger.info("dq checkpoint %s has no checksums; skipping the corruption check", files)
        return None
    try:
        sums = json.loads(raw)
        return {str(k): int(v) for k, v in sums.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(
            f"the checksum table in the header of {_short(files)} is corrupted ({e}); "
            "re-download the files or save the quantized pipeline again"
        ) from e


def _torch_dtype_name(dt: torch.dtype) -> str:
    for k, v in _ST_DTYPES.items():
        if v == dt:
            return k
    return str(dt)


def _check_plan_matches_tensors(
    model: nn.Module, header: dict[str, tuple[tuple[int, ...], str, str]], files: list[str]
) -> None:
    """Raise ValueError listing every tensor the plan builds that the checkpoint lacks or holds
    with another shape or dtype, and every checkpoint tensor the plan has no place for."""
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    dq_layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLayerMixin)}
    ignore = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or []
    problems: list[str] = []

    def owner(key: str) -> str:
        return key.rpartition(".")[0]

    for key, (shape, dt) in expected.items():
        if key not in header:
            layer = owner(key)
            if layer in dq_layers:
                problems.append(
                    f"layer {layer!r} is quantized by the plan ({_spec_str(model, layer)}) but "
                    f"the checkpoint has no {key!r}"
                )
            else:
                problems.append(f"the checkpoint has no tensor {key!r}")
            continue
        fshape, fdt, _ = header[key]
        is_dq = owner(key) in dq_layers or key.rpartition(".")[2] in getattr(
            _get_submodule(model, owner(key)), "_dq_extra_buffers", ()
        )
        if fshape != shape:
            problems.append(
                f"{key!r} has shape {list(fshape)} in the checkpoint but the plan "
                f"({_spec_str(model, owner(key))}) builds {list(shape)}"
            )
        elif is_dq and fdt != _torch_dtype_name(dt):
            problems.append(
                f"{key!r} is {fdt} in the checkpoint but the plan ({_spec_str(model, owner(key))}) "
                f"stores {_torch_dtype_name(dt)}"
            )
    for key in header:
        if key in expected or any(re.search(p, key) for p in ignore):
            continue
        layer, _, tname = key.rpartition(".")
        if layer in dq_layers and tname == "weight":
            problems.append(
                f"layer {layer!r} is quantized by the plan but the checkpoint holds a float weight"
            )
        elif tname in ("qdata", "scale") and layer not in dq_layers:
            problems.append(
                f"the checkpoint holds quantized codes for layer {layer!r} but the plan keeps it "
                "in float"
            )
        else:
            problems.append(f"the checkpoint holds {key!r}, which the plan has no place for")
    if problems:
        shown = "\n  - ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError(
            f"the dq plan in config.json does not match the tensors in {_short(files)} "
            f"({len(problems)} problem(s)):\n  - {shown}{more}\nThe folder was edited or mixes "
            "two saves: save the quantized pipeline again with dq (pipe.save_pretrained after "
            "dq.quantize or dq.load)"
        )


def _spec_str(model: nn.Module, layer: str) -> str:
    m = _get_submodule(model, layer)
    spec = getattr(m, "spec", None)
    if spec is None:
        return "float"
    return f"{spec.weight}/{spec.weight_granularity}, act={spec.act}"


# ----------------------------------------------------------------------------------------------
# Registration with diffusers
# ----------------------------------------------------------------------------------------------


def register() -> None:
    """Register dq with diffusers' quantizer registry (done by `import dq`; idempotent).

    diffusers has no public registration API; `DiffusersAutoQuantizer` looks methods up in the
    module-level dicts of `diffusers.quantizers.auto`, which every loader (ModelMixin,
    pipelines, single-file) shares, so adding keys there is enough.
    """
    for key in (QUANT_METHOD, *_ALIASES):
        _diffusers_auto.AUTO_QUANTIZER_MAPPING[key] = DQQuantizer
        _diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = DQDiffusersConfig


register()


# ----------------------------------------------------------------------------------------------
# Atomic save
# ----------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where
    unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath, f)
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(target: Path, kind: str) -> list[tuple[Path, int]]:
    pat = re.compile(rf"^\.{re.escape(target.name)}\.dq-{kind}-(\d+)-[0-9a-f]+$")
    out = []
    if target.parent.is_dir():
        for entry in target.parent.iterdir():
            m = pat.match(entry.name)
            if m:
                out.append((entry, int(m.group(1))))
    return out


def _recover(target: Path) -> None:
    """Undo what a save killed between its two fallback renames left behind, and remove the
    staging folders of dead saves. (With RENAME_EXCHANGE there is no such window.)"""
    if not target.exists():
        olds = [(p, pid) for p, pid in _siblings(target, "old") if not _pid_alive(pid)]
        if olds:
            newest = max(olds, key=lambda x: x[0].stat().st_mtime)[0]
            os.rename(newest, target)
            logger.warning("dq: restored %s from an interrupted save", target)
    for kind in ("staging", "old"):
        for p, pid in _siblings(target, kind):
            if not _pid_alive(pid) and target.exists():
                shutil.rmtree(p, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    """Entries of the old folder the new save did not write (README.md, .git, ...) are kept,
    as diffusers' in-place save keeps them: hard-linked (copied where links fail), so the old
    folder stays intact until the swap."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=link)
        else:
            link(entry.path, str(dst))


def _is_dq_object(obj: Any) -> bool:
    if isinstance(getattr(obj, "hf_quantizer", None), DQQuantizer):
        return True
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        return any(
            isinstance(getattr(c, "hf_quantizer", None), DQQuantizer) for c in comps.values()
        )
    return False


def save_pretrained(obj: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a pipeline (or a model) atomically with its own `save_pretrained`.

    The save is written to a sibling folder, fsync'd, then swapped in with one atomic rename
    (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, undone on the next save or
    `dq.load` if interrupted). A save killed midway leaves the previous content intact.
    Entries of an existing folder that the new save does not write (README.md, .git) are kept.

    Args:
        obj: a diffusers pipeline or model (dq-quantized or not).
        save_directory: the folder to (re)write.
        **kwargs: passed to `obj.save_pretrained` (variant, max_shard_size, push_to_hub, ...).

    Example:
        >>> dq.save_pretrained(pipe, "sd-w8a8")
    """
    if kwargs.get("safe_serialization") is False and _is_dq_object(obj):
        raise ValueError(
            "dq checkpoints are saved as safetensors only (loading never unpickles); remove "
            "safe_serialization=False"
        )
    target = Path(os.path.realpath(os.fspath(save_directory)))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; pass a folder path to save into")
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = target.name  # diffusers would name the repo after the staging folder
    staging = target.parent / f".{target.name}.dq-staging-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(staging)
    try:
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
        type(obj).save_pretrained(obj, os.fspath(staging), **kwargs)
        if target.is_dir():
            _carry_over(target, staging)
        _fsync_tree(staging)
        if not target.exists():
            os.rename(staging, target)
        elif _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous content
        else:
            old = target.parent / f".{target.name}.dq-old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
            os.rename(staging, target)
            _fsync_path(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _bound_save(self: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    save_pretrained(self, save_directory, **kwargs)


def bind_atomic_save(pipe: Any) -> Any:
    """Route `pipe.save_pretrained(...)` (and `pipe.push_to_hub`, which saves through it) through
    the atomic `save_pretrained` for this pipeline object only. Returns `pipe`."""
    pipe.save_pretrained = types.MethodType(_bound_save, pipe)
    return pipe


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _dq_components(path: Path) -> dict[str, dict[str, Any]]:
    """Component folder name -> its parsed config.json, for components quantized by dq."""
    out: dict[str, dict[str, Any]] = {}
    candidates = [path] if (path / "config.json").is_file() else []
    index = path / "model_index.json"
    if index.is_file():
        names = [
            k for k, v in _read_json(index).items() if not k.startswith("_") and isinstance(v, list)
        ]
        candidates += [path / n for n in names]
    for folder in candidates:
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            continue
        cfg = _read_json(cfg_file)
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") in (QUANT_METHOD, *_ALIASES):
            out[folder.name if folder != path else "."] = cfg
    return out


def _read_json(f: Path) -> dict[str, Any]:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{f} is not valid JSON ({e}); re-download it or save the pipeline again"
        ) from e
    if not isinstance(d, dict):
        raise ValueError(
            f"{f} should hold a JSON object; re-download it or save the pipeline again"
        )
    return d


def check_saved(path: str | os.PathLike) -> dict[str, DQDiffusersConfig]:
    """Check a saved folder's dq components without loading any tensor: config version and
    plan, safetensors present (no pickle), headers complete. Returns component -> config.

    Args:
        path: a folder written by `save_pretrained` (a pipeline or one model).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass the folder a pipeline was saved into")
    out: dict[str, DQDiffusersConfig] = {}
    for name, cfg in _dq_components(root).items():
        folder = root if name == "." else root / name
        out[name] = DQDiffusersConfig.from_dict(cfg["quantization_config"])
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            found = sorted(p.name for p in folder.iterdir() if p.is_file())
            raise ValueError(
                f"component {name!r} in {root} is quantized by dq but holds no safetensors weights "
                f"(found {found}); dq loads safetensors only, never pickle. Save the quantized "
                "pipeline again with dq"
            )
        read_safetensors_headers([str(s) for s in shards])
    return out


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a pipeline saved by dq: `DiffusionPipeline.from_pretrained` with dq registered,
    safetensors enforced, and a pre-check of the folder (`check_saved`) for clear errors.

    Args:
        path: a local folder or a hub repo id.
        **kwargs: passed to `DiffusionPipeline.from_pretrained` (torch_dtype, variant, ...).

    Example:
        >>> pipe = dq.load("sd-w8a8")
    """
    from diffusers import DiffusionPipeline

    register()
    if os.path.isdir(path):
        _recover(Path(os.path.realpath(path)))
        check_saved(path)
    kwargs.setdefault("use_safetensors", True)
    pipe = DiffusionPipeline.from_pretrained(os.fspath(path), **kwargs)
    return bind_atomic_save(pipe)
