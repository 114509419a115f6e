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

A float folder can also be quantized while it loads, with a weight-only config
(`from_pretrained(dir, quantization_config=DQDiffusersConfig(config="w8a16"))`, or
`PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"config": "w8a16"}, ...)`):
layer by layer, equal to `dq.quantize_model` bit for bit (`dq.onload`).

The safetensors headers also carry a sha256 of the plan (and a CRC per plan entry), so a plan
edited after saving is refused with the layers it changed, even where every tensor still fits
(int4 -> fp4_e2m1: same packed storage). Before diffusers reads a dq component's weights, the
quantizer checks the files it will read: a pickle-only folder is refused (never unpickled), a
truncated file gets dq's message.

Saving a dq pipeline is atomic: `dq.save_pretrained(pipe, dir)` (and `pipe.save_pretrained`
on a pipeline from `dq.quantize` / `dq.load`) writes a complete sibling folder, fsyncs it and
swaps it in with one `renameat2(RENAME_EXCHANGE)`, so a save killed midway leaves the previous
content intact. It deletes nothing dq did not write: every other file of the old folder (notes,
README.md, .git, `unet/lora/...`) is carried over, and `.dq-manifest.json` lists what each save
wrote. The source folder of the pipeline, the working folder and non-empty folders dq did not
write are refused (the first and last allowed with `overwrite=True`).

Example:
    >>> pipe = dq.quantize(pipe, "w4a16")
    >>> pipe.save_pretrained("sd-w4a16")                        # atomic
    >>> pipe = DiffusionPipeline.from_pretrained("sd-w4a16")    # after `import dq`
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
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
    "check_plan_digest",
    "check_save_target",
    "check_saved",
    "extra_buffers",
    "load",
    "plan_digest",
    "record_calibration",
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
_META_CHECKSUMS = "dq_checksums"  # CRC-32 of every tensor
_META_PLAN = "dq_plan_sha256"  # sha256 of the canonical plan JSON (plan + extra_buffers)
_META_PLAN_PARTS = "dq_plan_parts"  # CRC-32 per plan entry, to name what an edit changed
_META_CALIBRATION = "dq_calibration"  # what the model was calibrated with (JSON), if recorded

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
    """dq's `quantization_config` for diffusers: a request to quantize a float checkpoint while
    it loads, or the plan stored in a dq-quantized model's `config.json` (JSON only).

    Quantize on load (weight-only configs: "w8a16", "w4a16", "fp8", "fp4", or any QuantConfig
    whose specs have no activation format). Each planned layer is quantized as its float tensors
    arrive, so the whole float model is never held; the result equals `dq.quantize_model` of
    the float model loaded with the same `torch_dtype`, bit for bit, and saves with
    `save_pretrained` like any dq model. Configs with activation formats need calibration and
    are refused with a pointer to `dq.quantize(pipe, config, calib_prompts=...)`.

        unet = UNet2DConditionModel.from_pretrained(
            "sd15", subfolder="unet", quantization_config=DQDiffusersConfig(config="w4a16"))
        pipe = DiffusionPipeline.from_pretrained("sd15", quantization_config=
            PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"config": "w8a16"},
                                       components_to_quantize=["unet"]))

    Args:
        config: for quantize-on-load: a preset name, a `dq.QuantConfig` or its dict.
        modules_to_not_convert: for quantize-on-load: more layers kept in float, named as for
            diffusers' quantizers ("to_k", "attn2", "down_blocks.0") or globs; added to the
            config's skips (a single string is one name).
        plan: the stored form: the resolved `QuantConfig` as a dict (`QuantConfig.to_dict()`):
            every quantizable layer -> its LayerSpec dict, or None where the layer stays in float.
        dq_version: version of the dq that wrote the checkpoint.
        format_version: version of this layout; a newer one than this dq knows is refused.
        extra_buffers: module name -> names of extra persistent buffers (precomputed constants)
            the checkpoint holds beyond codes, scales and float weights.
        quant_method: the registered method name (the default, or the "dq" alias).

    Give `config` (a request) or `plan` (a stored model), not both.

    Example:
        >>> cfg = DQDiffusersConfig.from_quant_config(QuantConfig.from_preset("w8a16"))
        >>> DQDiffusersConfig.from_dict(cfg.to_dict()).quant_config == cfg.quant_config
        True
        >>> DQDiffusersConfig(config="w8a16").is_request
        True
    """

    def __init__(
        self,
        config: str | QuantConfig | dict[str, Any] | None = None,
        modules_to_not_convert: list[str] | str | None = None,
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
        self._model_ref: weakref.ref | None = None
        self.extra_buffers = _check_extra_buffers(extra_buffers or {})
        if config is not None:
            if plan is not None:
                raise ValueError(
                    "give DQDiffusersConfig either config= (quantize a float checkpoint while "
                    "loading) or plan= (the stored form of a dq model), not both"
                )
            from dq.onload import request_config

            self._quant_config = request_config(config, modules_to_not_convert or ())
            self.plan = None  # resolved on the model being loaded
            return
        if modules_to_not_convert:
            raise ValueError(
                "modules_to_not_convert applies when quantizing on load "
                "(DQDiffusersConfig(config='w8a16', modules_to_not_convert=[...])); a stored "
                "plan already names every layer"
            )
        if plan is None:
            raise ValueError(
                "DQDiffusersConfig needs config= to quantize a float checkpoint while loading "
                "(a weight-only preset such as 'w8a16' or 'w4a16', or a dq.QuantConfig); a "
                "config.json whose dq quantization_config has neither 'config' nor 'plan' was "
                "not written by dq (save quantized pipelines with pipe.save_pretrained after "
                "dq.quantize)"
            )
        try:
            self._quant_config = QuantConfig.from_dict(plan)
        except ValueError as e:
            raise ValueError(f"dq quantization_config: the plan is not valid: {e}{hint}") from e
        self.plan = self._quant_config.to_dict()

    @property
    def is_request(self) -> bool:
        """True for a quantize-on-load request (`config=`), False for a stored plan."""
        return self.plan is None

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
        if self.is_request:  # round-trips through from_dict as the same request
            return {
                "quant_method": QUANT_METHOD,
                "format_version": self.format_version,
                "dq_version": self.dq_version,
                "config": self._quant_config.to_dict(),
            }
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

    def to_diff_dict(self) -> dict[str, Any]:
        """As `to_dict`: dq has no default config to leave out."""
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        if self.is_request:
            c = self._quant_config
            default = "float" if c.default is None else f"{c.default.weight}/{c.default.weight_granularity}"
            return f"DQDiffusersConfig(config={c.name!r}: {default}, skip={list(c.skip)}, quantized on load)"
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
    install_model_methods(model)
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=qcfg)


def _quantized_to(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """`model.to(...)` for a dq-quantized diffusers model (installed by `install_model_methods`)."""
    dtype = kwargs.pop("dtype", None)
    rest = [a for a in args if not isinstance(a, torch.dtype)]
    dtype = next((a for a in args if isinstance(a, torch.dtype)), dtype)
    if dtype is not None and dtype != model.dtype:
        raise ValueError(
            f"this {type(model).__name__} is quantized by dq with its float parts in "
            f"{model.dtype}; casting it to {dtype} is not supported (codes and scales stay as "
            f"quantized). Quantize the pipeline loaded in {dtype} (dq.quantize on a pipeline "
            f"loaded with dtype={dtype}, or `dq quantize --dtype`), or keep {model.dtype}: "
            f"with from_pipe pass dtype={model.dtype}"
        )
    return type(model).to(model, *rest, **kwargs)  # a device move, or nothing


def install_model_methods(model: nn.Module) -> None:
    """Let `model.to(dtype=...)` through when the dtype is the model's own, make
    `model.num_parameters()` count the quantized weights and `model.get_memory_footprint()`
    count the kernels' copies too.

    diffusers' `ModelMixin.to` refuses any dtype on a quantized model, even one that casts
    nothing, and `Pipeline.from_pipe` always passes one (float32 unless told otherwise), so
    `StableDiffusionImg2ImgPipeline.from_pipe(quantized)` failed. The instance's `to` drops a
    dtype equal to `model.dtype` and refuses any other with the fix; devices move as before.
    """
    model.to = types.MethodType(_quantized_to, model)
    model.num_parameters = types.MethodType(_quantized_num_parameters, model)
    model.get_memory_footprint = types.MethodType(_quantized_memory_footprint, model)


def _quantized_memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """`ModelMixin.get_memory_footprint` plus what the kernels hold for the model's layers
    outside its tensors (`dq.kernels.held_nbytes`): the CPU engine's packed copy of codes still
    in `qdata` (after a forward with gradients, which does not hand the codes over) and FP
    layers' derived int8 weights. A layer whose codes the engine took over holds one copy."""
    from dq.kernels import held_nbytes

    return held_nbytes(model, buffers=return_buffers)


def _quantized_num_parameters(
    model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False
) -> int:
    """`ModelMixin.num_parameters` counting each quantized layer's weight as the parameters it
    stands for (dq keeps codes and scales as buffers, so the float count would miss them);
    quantized weights are frozen, so `only_trainable` leaves them out."""
    skip = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    total = sum(p.numel() for n, p in model.named_parameters()
                if n not in skip and (p.requires_grad or not only_trainable))  # fmt: skip
    if not only_trainable:
        total += sum(int(torch.Size(m.weight_shape).numel()) for m in model.modules()
                     if isinstance(m, QuantizedLayerMixin))  # fmt: skip
    return total


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
    """diffusers' hooks for dq: loading dq checkpoints, and quantizing float checkpoints while
    they load (weight-only configs, `dq.onload`).

    Quantize-on-load (`pre_quantized=False`: the folder is float, `quantization_config=
    DQDiffusersConfig(config=...)`): `_process_model_before_weight_loading` resolves the plan
    on the meta model, `create_quantized_param` receives each planned layer's float weight and
    bias and quantizes the layer once it has both, `_process_model_after_weight_loading`
    records the resolved plan (what `save_pretrained` writes).

    Load order of a dq checkpoint inside `ModelMixin.from_pretrained`: `maybe_update_loaded_keys` (read the
    safetensors headers), `_process_model_before_weight_loading` (swap in empty QLinear /
    QConv2d per the plan, their tensors on the meta device), `update_missing_keys` (check every
    tensor's name, shape and dtype against the plan: any mismatch raises before a weight is
    assigned), `maybe_update_state_dict` (CRC-32 check), `create_quantized_param` (assign codes
    and scales in their stored dtypes, never cast), `_process_model_after_weight_loading`
    (nothing may be left on the meta device).
    """

    requires_calibration = False
    required_packages = ["dq"]
    # float tensors of the model class's `_keep_in_fp32_modules` load in float32 (as for the
    # float model); quantize-on-load keeps those layers in float
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: DQDiffusersConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._onload = None
        if self.pre_quantized and quantization_config.is_request:
            raise ValueError(
                "this config.json holds a dq quantize-on-load request ('config'), not the plan of "
                "a quantized model; pass the request to from_pretrained(quantization_config=...) "
                "of a float folder instead"
            )
        if not self.pre_quantized:  # a float checkpoint, quantized layer by layer while loading
            from dq.onload import LoadTimeQuantizer, request_config

            self._onload = LoadTimeQuantizer(request_config(quantization_config.quant_config))
        self._files: list[str] = []
        self._header: dict[str, tuple[tuple[int, ...], str, str]] = {}
        self._meta: dict[str, str] = {}
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

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        """Unset means float32 (what the float model loads in), so `_pre_quantization_dtype`
        names a real dtype; codes and scales keep their stored dtypes either way."""
        return torch.float32 if torch_dtype is None else torch_dtype

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if "torch_dtype" in kwargs and self.pre_quantized:  # the first call, before diffusers picks and reads a file
            _precheck_caller_folder()
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
        qc = self.quantization_config.to_dict()  # refreshes extra_buffers from the bound model
        meta = {
            _META_FORMAT: str(FORMAT_VERSION),
            _META_CHECKSUMS: json.dumps(sums, sort_keys=True),
            _META_PLAN: plan_digest(qc["plan"], qc["extra_buffers"]),
            _META_PLAN_PARTS: json.dumps(_plan_parts(qc["plan"], qc["extra_buffers"]), sort_keys=True),
        }
        model = self.quantization_config._model_ref() if self.quantization_config._model_ref else None
        calibration = getattr(model, "_dq_calibration", None)
        if calibration:
            meta[_META_CALIBRATION] = json.dumps(calibration, sort_keys=True, default=str)
        return state_dict, meta

    # -- load, in the order diffusers calls them --
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list) -> list[str]:
        if not self.pre_quantized:
            return loaded_keys
        files = [f for f in checkpoint_files if not isinstance(f, dict)]
        self._files = [str(f) for f in files]
        self._header, self._meta = read_safetensors_headers(self._files)
        self._checksums = _parse_checksums(self._meta, self._files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self._onload is not None:
            self._onload.prepare(model, kwargs.get("keep_in_fp32_modules") or ())
            return model
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
            # after the tensor check, whose messages are more precise where shapes differ
            qc = self.quantization_config
            check_plan_digest(qc.plan, qc.extra_buffers, self._meta, self._files)
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
        if self._onload is not None:
            return self._onload.owns(param_name)
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
        if self._onload is not None:  # a float tensor, already in the load's torch_dtype
            self._onload.take(model, param_name, param_value, target_device)
            return
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
        if self._onload is not None:
            resolved = self._onload.finish(model)
            self.quantization_config = DQDiffusersConfig.from_quant_config(resolved, extra_buffers(model))
        left = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
        if left:
            fix = (
                "the float folder is incomplete" if self._onload is not None
                else "the folder is incomplete: save the quantized pipeline again with dq"
            )
            raise ValueError(
                f"{len(left)} tensor(s) were not found in the checkpoint ({left[:3]}); {fix}"
            )
        self.quantization_config._bind(model)
        model._dq_config = self.quantization_config.quant_config
        install_model_methods(model)
        calibration = _parse_calibration(self._meta)
        if calibration is not None:
            model._dq_calibration = calibration
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


# ----------------------------------------------------------------------------------------------
# Plan integrity: the plan in config.json against the digest written with the tensors
# ----------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def plan_digest(plan: dict[str, Any], extra: dict[str, list[str]] | None = None) -> str:
    """sha256 (hex) of the canonical JSON of a normalised plan (`QuantConfig.to_dict()`) and
    its extra buffers: what the safetensors headers record, so an edited plan is refused.

    The plan is normalised on reading (`QuantConfig.from_dict(...).to_dict()`), so an older
    layout of the same plan (version 1) has the same digest.
    """
    return hashlib.sha256(_canonical({"plan": plan, "extra_buffers": extra or {}})).hexdigest()


def _plan_parts(plan: dict[str, Any], extra: dict[str, list[str]]) -> dict[str, int]:
    """CRC-32 of each plan entry ("layers.<name>", every other plan key, "extra_buffers")."""
    parts = {f"layers.{k}": zlib.crc32(_canonical(v)) for k, v in plan.get("layers", {}).items()}
    parts.update({k: zlib.crc32(_canonical(v)) for k, v in plan.items() if k != "layers"})
    parts["extra_buffers"] = zlib.crc32(_canonical(extra))
    return parts


def check_plan_digest(
    plan: dict[str, Any], extra: dict[str, list[str]], meta: dict[str, str], files: list[str]
) -> None:
    """Raise ValueError when the plan read from config.json is not the one the tensors were
    saved with. Folders written before dq recorded the digest (no key) pass unchecked."""
    saved = meta.get(_META_PLAN)
    if saved is None:
        return
    if saved == plan_digest(plan, extra):
        return
    changed: list[str] = []
    try:
        before = {str(k): int(v) for k, v in json.loads(meta.get(_META_PLAN_PARTS, "{}")).items()}
    except (ValueError, TypeError, AttributeError):
        before = {}
    now = _plan_parts(plan, extra)
    for key in sorted(set(before) | set(now), key=lambda k: (not k.startswith("layers."), k)):
        if before.get(key) == now.get(key):
            continue
        if key.startswith("layers."):
            layer = key[len("layers."):]
            spec = plan.get("layers", {}).get(layer, "absent")
            what = "float" if spec is None else spec if isinstance(spec, str) else (
                f"{spec.get('weight')}/{spec.get('weight_granularity')}, act={spec.get('act')}"
            )
            changed.append(f"layer {layer!r} (config.json now says {what})")
        else:
            changed.append(f"the plan's {key!r}")
    detail = f": {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}" if changed else ""
    raise ValueError(
        f"the dq plan in config.json is not the plan {_short(files)} was saved with "
        f"(its checksum differs{detail}). The plan was edited after saving; with another "
        "format of the same storage the codes would be decoded wrongly. Restore the original "
        "config.json, or quantize and save the pipeline again with dq"
    )


def _parse_calibration(meta: dict[str, str]) -> dict[str, Any] | None:
    raw = meta.get(_META_CALIBRATION)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None  # informational only: never a reason to refuse a load
    return d if isinstance(d, dict) else None


def record_calibration(model: nn.Module, info: dict[str, Any]) -> None:
    """Record what `model` was calibrated with (prompt count, sampling settings, ...); the next
    save writes it into the safetensors metadata and `dq inspect` shows it.

    Args:
        model: the quantized model (e.g. `pipe.unet`).
        info: JSON-ready facts, e.g. {"num_prompts": 32, "sampling": Sampling(...).to_dict()}.
    """
    json.dumps(info, default=str)  # fail now, not at save time
    model._dq_calibration = dict(info)


# ----------------------------------------------------------------------------------------------
# Before diffusers reads a weights file: no pickle, clear messages for damaged files
# ----------------------------------------------------------------------------------------------

_SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _with_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{variant}{dot}{ext}"


def _caller_load_args() -> tuple[Any, str | None, str | None] | None:
    """(pretrained_model_name_or_path, subfolder, variant) of the `ModelMixin.from_pretrained`
    call that is building this quantizer, read from its frame; None when not found (another
    caller, or a diffusers whose locals are named otherwise: the later header checks remain)."""
    from diffusers.models.modeling_utils import ModelMixin

    frame = sys._getframe(1)
    try:
        for _ in range(4):  # _precheck <- validate_environment <- ModelMixin.from_pretrained
            if frame is None:
                return None
            loc = frame.f_locals
            if frame.f_code.co_name == "from_pretrained":
                cls = loc.get("cls")
                if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
                    return None  # another loader (single file, a pipeline): leave it be
                if "pretrained_model_name_or_path" not in loc:
                    return None
                return loc["pretrained_model_name_or_path"], loc.get("subfolder"), loc.get("variant")
            frame = frame.f_back
        return None
    finally:
        del frame


def _precheck_caller_folder() -> None:
    """For a local folder being loaded by diffusers: refuse a dq component without safetensors
    weights (diffusers would fall back to `torch.load` on a pickle .bin) and read the headers
    of the files it will load, so a truncated file gets dq's message, not a generic one."""
    args = _caller_load_args()
    if args is None or not isinstance(args[0], str | os.PathLike):
        return
    root, subfolder, variant = args
    folder = Path(root) / (subfolder or "")
    if not folder.is_dir():
        return  # a hub id: the fetched files are checked in maybe_update_loaded_keys
    single = folder / _with_variant(_SAFE_WEIGHTS, variant)
    index = folder / f"{_with_variant(_SAFE_WEIGHTS, variant)}.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({str(folder / f) for f in weight_map.values()}) if isinstance(weight_map, dict) else []
        missing = [f for f in files if not os.path.isfile(f)]
        if missing or not files:
            raise ValueError(
                f"{index} lists weight files that are not in {folder} ({missing[:3] or 'none'}); "
                "the folder is incomplete: re-download it or save the quantized pipeline again"
            )
    elif single.is_file():
        files = [str(single)]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise ValueError(
            f"{folder} is quantized by dq but holds no {single.name} (found {found}); dq loads "
            "safetensors only and never unpickles a .bin. Save the quantized pipeline again "
            "with dq (it writes safetensors)"
        )
    read_safetensors_headers(files)


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

# PipelineQuantizationConfig(quant_backend="dq") also needs the name in transformers' registry
# (diffusers checks both when transformers is installed); added when transformers imports it.
from dq.onload import register_with_transformers_when_imported  # noqa: E402

register_with_transformers_when_imported()


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


# Weights files of a model folder, as diffusers and transformers name them (variants, shards
# and shard indexes included). A save replaces a component's weights as a set: a stale shard
# index or variant left beside new weights would load the old model.
_WEIGHTS_RE = re.compile(
    r"^(diffusion_pytorch_model|model|pytorch_model)(\.[A-Za-z0-9_]+)?(-\d{5}-of-\d{5})?"
    r"\.(safetensors|bin)(\.index(\.[A-Za-z0-9_]+)?\.json)?$"
)
MANIFEST = ".dq-manifest.json"  # written by every dq save: the files that save wrote


def _read_manifest(folder: Path) -> set[str] | None:
    """The files the previous dq save wrote into `folder` (relative POSIX paths), or None where
    dq's manifest is missing or unreadable."""
    try:
        d = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = d["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else None


def _write_manifest(folder: Path) -> list[str]:
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
    )
    body = {"written_by": f"dq {_dq_version()}", "files": files}
    (folder / MANIFEST).write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    return files


def _replaced_by_new_save(rel: str, old_manifest: set[str] | None, new: Path) -> bool:
    """Whether the old entry `rel` goes with the old save: the new save wrote the same path,
    the previous dq save wrote it, or it is a weights file of a component folder (or a single
    model's folder) the new save wrote weights into."""
    if os.path.lexists(new / rel) or rel == MANIFEST:
        return True
    if old_manifest is not None and rel in old_manifest:
        return True
    parent, _, name = rel.rpartition("/")
    if parent.count("/") > 0 or not _WEIGHTS_RE.match(name):
        return False  # only top-level and component-level weights belong to the model
    folder = new / parent if parent else new
    return folder.is_dir() and any(_WEIGHTS_RE.match(p.name) for p in folder.iterdir())


def _carry_over(old: Path, new: Path) -> list[str]:
    """Keep every entry of the old folder that is not replaced by the new save (notes, README,
    .git, a `lora/` folder inside `unet/`, ...), at any depth, as diffusers' in-place save keeps
    them: hard-linked (copied where links fail), so the old folder stays intact until the swap.
    Returns the kept paths."""

    def link(src: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    manifest = _read_manifest(old)
    kept: list[str] = []
    for dirpath, dirnames, filenames in os.walk(old):
        rel_dir = Path(dirpath).relative_to(old)
        for d in list(dirnames):
            src = Path(dirpath, d)
            if src.is_symlink():  # a link to a folder: kept as a link, never followed
                dirnames.remove(d)
                filenames.append(d)
            elif not any(src.iterdir()) and not os.path.lexists(new / rel_dir / d):
                (new / rel_dir / d).mkdir(parents=True)  # an empty folder of the user's
                kept.append((rel_dir / d).as_posix())
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if _replaced_by_new_save(rel, manifest, new):
                continue
            src = Path(dirpath, f)
            dst = new / rel
            if src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(src), dst)
            else:
                link(str(src), dst)
            kept.append(rel)
    return kept


def _is_dq_object(obj: Any) -> bool:
    if isinstance(getattr(obj, "hf_quantizer", None), DQQuantizer):
        return True
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        return any(
            isinstance(getattr(c, "hf_quantizer", None), DQQuantizer) for c in comps.values()
        )
    return False


def _source_folders(obj: Any) -> list[Path]:
    """Local folders `obj` (a pipeline or model) and its components were loaded from."""
    out: list[Path] = []
    items = [obj]
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        items += list(comps.values())
    for item in items:
        cfg = getattr(item, "config", None)
        for src in (getattr(item, "name_or_path", None), getattr(cfg, "_name_or_path", None)):
            if isinstance(src, str | os.PathLike) and str(src) and os.path.isdir(src):
                out.append(Path(os.path.realpath(src)))
    return out


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _written_by_dq(folder: Path) -> bool:
    if (folder / MANIFEST).is_file():
        return True
    try:  # folders saved by a dq older than the manifest still name dq in a config.json
        return bool(_dq_components(folder))
    except ValueError:
        return False


def check_save_target(
    save_directory: str | os.PathLike, obj: Any = None, *, overwrite: bool = False
) -> Path:
    """Refuse, before any work, a save that could lose data or cannot succeed; returns the
    resolved target folder.

    Refused: an empty path; a path that is a file, or below one; a folder that cannot be
    written; the current working folder or one of its parents; and, unless `overwrite=True`,
    the folder `obj` (or one of its components) was loaded from, or a non-empty folder dq did
    not write. With `overwrite=True` those two are saved into, keeping every file the save
    does not replace.

    Args:
        save_directory: where the save goes (as the user wrote it: errors quote it).
        obj: the pipeline or model to be saved (for its source folders), or None.
        overwrite: allow saving over the source folder or over a folder dq did not write.
    """
    user = os.fspath(save_directory)
    if not str(user).strip():
        raise ValueError("the save path is empty; pass the folder to save into, e.g. 'out/sd-w8a8'")
    target = Path(os.path.realpath(user))
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"cannot save to {user!r}: it exists and is a file, not a folder; pass a folder path "
            "(a new one, or one an earlier dq save wrote)"
        )
    anc = target.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(
            f"cannot save to {user!r}: {str(anc)!r} is a file, so no folder can be made below "
            "it; choose another path"
        )
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot save to {user!r}: no permission to write in {str(anc)!r} (read-only "
            "folder); choose a folder you can write to"
        )
    cwd = Path(os.path.realpath(os.getcwd()))
    if _is_within(cwd, target):
        raise ValueError(
            f"cannot save to {user!r}: it is the current working folder"
            f"{'' if cwd == target else ' or one of its parents'} ({cwd}); an atomic save "
            "replaces the whole folder. Save into a subfolder, e.g. 'out/quantized'"
        )
    if obj is not None and not overwrite:
        for src in _source_folders(obj):
            if _is_within(src, target):
                raise ValueError(
                    f"cannot save to {user!r}: the pipeline was loaded from "
                    f"{'that folder' if src == target else repr(str(src)) + ', inside it'}, and "
                    "saving there would replace the model it was loaded from. Save to a new "
                    "folder (e.g. add '-quantized' to the name), or pass overwrite=True "
                    "(CLI: --overwrite) to replace it on purpose"
                )
    if target.is_dir() and not overwrite and not _written_by_dq(target):
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"cannot save to {user!r}: the folder holds files dq did not write ({shown}). "
                "Save to a new or empty folder, or pass overwrite=True (CLI: --overwrite) to "
                "save into it anyway (files the save does not replace are kept)"
            )
    return target


def _os_error_message(user: str, e: OSError) -> str:
    reason = {
        errno.EACCES: "permission denied (read-only folder?); choose a folder you can write to",
        errno.EPERM: "operation not permitted; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose a folder on a writable disk",
        errno.ENOSPC: "no space left on the device; free some space or save elsewhere",
        errno.EDQUOT: "disk quota exceeded; free some space or save elsewhere",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
        errno.EEXIST: "a part of the path already exists as a file; choose another path",
    }.get(e.errno, f"{e.strerror or e}; check the path and the disk")
    return f"cannot save to {user!r}: {reason}. The previous content (if any) is unchanged"


def save_pretrained(
    obj: Any, save_directory: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any
) -> None:
    """Save a pipeline (or a model) atomically with its own `save_pretrained`.

    The save is written to a sibling folder, fsync'd, then swapped in with one atomic rename
    (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, undone on the next save or
    `dq.load` if interrupted). A save killed midway leaves the previous content intact.

    Nothing but what dq wrote is deleted: every entry of an existing folder that the new save
    does not replace (README.md, .git, `unet/notes.txt`, `unet/lora/...`) is kept. A
    component's weights are replaced as a set (stale shards, shard indexes, variants and
    pickle files of the same names would otherwise load the old model). A manifest
    (`.dq-manifest.json`) records the files each save wrote.

    Refused up front (see `check_save_target`): a path that is a file or below one, a folder
    that cannot be written, the working folder, and, unless `overwrite=True`, the folder the
    pipeline was loaded from or a non-empty folder dq did not write.

    Args:
        obj: a diffusers pipeline or model (dq-quantized or not).
        save_directory: the folder to (re)write.
        overwrite: save over the source folder or a folder dq did not write (user files kept).
        **kwargs: passed to `obj.save_pretrained` (variant, max_shard_size, push_to_hub, ...).

    Example:
        >>> dq.save_pretrained(pipe, "sd-w8a8")
    """
    if kwargs.get("safe_serialization") is False and _is_dq_object(obj):
        raise ValueError(
            "dq checkpoints are saved as safetensors only (loading never unpickles); remove "
            "safe_serialization=False"
        )
    user = os.fspath(save_directory)
    target = check_save_target(user, obj, overwrite=overwrite)
    staging: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target)
        if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
            kwargs["repo_id"] = target.name  # diffusers would name the repo after the staging folder
        staging = target.parent / f".{target.name}.dq-staging-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(staging)
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
        type(obj).save_pretrained(obj, os.fspath(staging), **kwargs)
        _write_manifest(staging)
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
        staging = None
        _fsync_path(target.parent)
    except OSError as e:
        raise ValueError(_os_error_message(user, e)) from e
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


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
    where = os.fspath(path)
    if not os.path.isdir(where):
        if os.path.exists(where):
            raise ValueError(f"{where!r} is a file; pass the folder a pipeline was saved into")
        if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", str(where)):
            raise ValueError(
                f"{where!r} does not exist (looked in {os.getcwd()}) and is not a hub id "
                "('owner/name'); pass the folder a pipeline was saved into"
            )
    if os.path.isdir(path):
        _recover(Path(os.path.realpath(path)))
        check_saved(path)
    kwargs.setdefault("use_safetensors", True)
    pipe = DiffusionPipeline.from_pretrained(os.fspath(path), **kwargs)
    return bind_atomic_save(pipe)
