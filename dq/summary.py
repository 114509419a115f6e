"""What a quantization did, in numbers: layers per group and format, bytes against fp16.

Two sources give the same table: a live quantized model (`rows_from_model`, what `dq quantize`
prints at the end) and a saved folder (`inspect_folder`, `dq inspect DIR`), which reads only
JSON and the safetensors headers (no tensor data).

    >>> rows = rows_from_model(pipe.unet)
    >>> print(format_rows(rows))
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LayerRow", "format_rows", "inspect_folder", "rows_from_model", "totals"]

# bytes per element of safetensors dtypes (header names)
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_LAYER_TENSORS = ("qdata", "scale", "zero_point", "input_scale", "input_zero_point")


@dataclass(frozen=True)
class LayerRow:
    """One quantizable layer: its group, its format ("float" when kept in float), the bytes its
    weight takes as stored (codes, scales, zero points, activation parameters; no bias), and
    the bytes the same weight takes in fp16."""

    name: str
    group: str
    fmt: str
    nbytes: int
    fp16_nbytes: int


def _spec_label(spec: Any) -> str:
    if spec is None:
        return "float"
    get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k)
    act = get("act")
    return f"{get('weight')}/{get('weight_granularity')}" + (f", act {act}" if act else "")


def _group(name: str, recipe: Any = None) -> str:
    if recipe is not None:
        return recipe.layer_group(name)
    from dq.recipes.recipe import layer_group

    return layer_group(name)


def rows_from_model(unet: Any, recipe: Any = None) -> list[LayerRow]:
    """Rows for every quantizable layer of a (quantized) model.

    Args:
        unet: the model after `dq.quantize` (float layers are counted as they are stored).
        recipe: a `dq.recipes.Recipe` for the layer groups (default: dq's content markers).
    """
    from torch import nn

    from dq.modules import QuantizedLayerMixin

    rows = []
    for name, m in unet.named_modules():
        if isinstance(m, QuantizedLayerMixin):
            numel = math.prod(m.weight_shape)
            rows.append(LayerRow(name, _group(name, recipe), _spec_label(m.spec),
                                 m.quant_weight_nbytes(), numel * 2))
        elif isinstance(m, nn.Linear | nn.Conv2d) and name:
            w = m.weight
            rows.append(LayerRow(name, _group(name, recipe), "float",
                                 w.numel() * w.element_size(), w.numel() * 2))
    return rows


def totals(rows: Iterable[LayerRow]) -> dict[tuple[str, str], dict[str, int]]:
    """(group, format) -> {"layers", "bytes", "fp16_bytes"}, largest first."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        t = out.setdefault((r.group, r.fmt), {"layers": 0, "bytes": 0, "fp16_bytes": 0})
        t["layers"] += 1
        t["bytes"] += r.nbytes
        t["fp16_bytes"] += r.fp16_nbytes
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["fp16_bytes"], kv[0])))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n / 1e3:.1f} kB"


def format_rows(rows: list[LayerRow]) -> str:
    """A plain-text table: one line per (group, format), then the totals."""
    lines = [f"  {'group':8s} {'format':28s} {'layers':>6s} {'bytes':>11s} {'fp16':>11s} {'ratio':>6s}"]
    for (group, fmt), t in totals(rows).items():
        ratio = t["bytes"] / t["fp16_bytes"] if t["fp16_bytes"] else 0.0
        lines.append(f"  {group:8s} {fmt:28s} {t['layers']:6d} {_mb(t['bytes']):>11s} "
                     f"{_mb(t['fp16_bytes']):>11s} {ratio:6.3f}")
    n_q = sum(r.fmt != "float" for r in rows)
    b = sum(r.nbytes for r in rows)
    f16 = sum(r.fp16_nbytes for r in rows)
    lines.append(f"  {n_q} of {len(rows)} layers quantized; layer weights {_mb(b)} vs "
                 f"{_mb(f16)} in fp16 ({b / f16 if f16 else 0:.3f}x)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- saved folders


def _header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors: name -> {"dtype", "shape", ...}, metadata) of a safetensors file, read from its
    JSON header alone."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length out of range")
            head = json.loads(f.read(n))
        size = os.path.getsize(path)
    except (OSError, struct.error, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted. "
            "Re-download it, or save the quantized pipeline again"
        ) from None
    meta = head.pop("__metadata__", None) or {}
    end = max((t["data_offsets"][1] for t in head.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(
            f"{path} is truncated ({size} bytes, its header describes {8 + n + end}); "
            "re-download it, or save the quantized pipeline again"
        )
    return head, meta


def _tensor_bytes(t: dict[str, Any]) -> int:
    return math.prod(t["shape"]) * _ST_SIZES.get(t["dtype"], 4)


def _codes_per_byte(plan: dict[str, Any], fmt: str) -> int:
    """2 for formats of <= 4 bits (two codes per byte, dq.storage "packed4"), else 1."""
    d = (plan.get("formats") or {}).get(fmt)
    if d is None:  # a version-1 plan: no definitions inside, ask the registry
        from dq import storage

        return storage.storage_of(fmt).codes_per_byte
    bits = d["bits"] if d.get("kind") == "int" else 1 + d["exp_bits"] + d["man_bits"]
    return 2 if bits <= 4 else 1


def _component_rows(folder: Path, plan: dict[str, Any], tensors: dict[str, Any]) -> list[LayerRow]:
    rows = []
    for name, spec in plan.get("layers", {}).items():
        if spec is None:
            w = tensors.get(f"{name}.weight")
            if w is None:
                continue
            numel = math.prod(w["shape"])
            rows.append(LayerRow(name, _group(name), "float", _tensor_bytes(w), numel * 2))
            continue
        q = tensors.get(f"{name}.qdata")
        if q is None:
            continue
        out, cols = q["shape"][0], math.prod(q["shape"][1:])
        k = cols * _codes_per_byte(plan, spec["weight"])
        nbytes = sum(_tensor_bytes(tensors[f"{name}.{t}"]) for t in _LAYER_TENSORS
                     if f"{name}.{t}" in tensors)
        rows.append(LayerRow(name, _group(name), _spec_label(spec), nbytes, out * k * 2))
    return rows


def inspect_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Summarise a folder written by dq: per dq-quantized component, the dq and layout
    versions, the plan per group and format (`rows`), file bytes, and the calibration record
    if the save carried one. Reads JSON and safetensors headers only.

    Args:
        path: a pipeline folder (with model_index.json) or one model's folder.

    Returns:
        {"pipeline": class name or None, "components": {name: {...}}}; a component entry
        holds "dq_version", "format_version", "plan_name", "rows" (LayerRow list),
        "file_bytes", "calibration" (dict or None), "plan_checksum" (bool: recorded).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder; pass a folder written by dq (pipe.save_pretrained)")
    index = root / "model_index.json"
    pipeline = None
    folders = []
    if index.is_file():
        try:
            d = json.loads(index.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{index} is not valid JSON ({e}); save the pipeline again") from None
        pipeline = d.get("_class_name")
        folders = [(k, root / k) for k, v in d.items() if not k.startswith("_") and isinstance(v, list)]
    elif (root / "config.json").is_file():
        folders = [(".", root)]
    else:
        raise ValueError(
            f"{str(path)!r} holds neither model_index.json nor config.json: it is not a saved "
            "diffusers pipeline or model"
        )
    comps: dict[str, Any] = {}
    for name, folder in folders:
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            continue
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e}); save the pipeline again") from None
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if not (isinstance(qc, dict) and str(qc.get("quant_method", "")).startswith("dq")):
            continue
        tensors: dict[str, Any] = {}
        meta: dict[str, str] = {}
        file_bytes = 0
        for f in sorted(folder.glob("*.safetensors")):
            t, m = _header(f)
            tensors.update(t)
            meta.update(m)
            file_bytes += f.stat().st_size
        plan = qc.get("plan") or {}
        calibration = None
        if "dq_calibration" in meta:
            try:
                calibration = json.loads(meta["dq_calibration"])
            except ValueError:
                calibration = None
        comps[name] = {
            "dq_version": qc.get("dq_version"),
            "format_version": qc.get("format_version"),
            "plan_name": plan.get("name"),
            "rows": _component_rows(folder, plan, tensors),
            "file_bytes": file_bytes,
            "fp16_file_bytes": _fp16_bytes(tensors, plan),
            "calibration": calibration,
            "plan_checksum": "dq_plan_sha256" in meta,
        }
    if not comps:
        raise ValueError(
            f"{str(path)!r} has no dq-quantized component (no config.json with a dq "
            "quantization_config); quantize it with `dq quantize` first"
        )
    return {"pipeline": pipeline, "components": comps}


def _fp16_bytes(tensors: dict[str, Any], plan: dict[str, Any]) -> int:
    """What the component's whole file would take with every tensor in fp16."""
    total = 0
    for key, t in tensors.items():
        layer, _, tname = key.rpartition(".")
        spec = plan.get("layers", {}).get(layer)
        if spec is not None and tname in _LAYER_TENSORS:
            if tname == "qdata":
                out, cols = t["shape"][0], math.prod(t["shape"][1:])
                total += out * cols * _codes_per_byte(plan, spec["weight"]) * 2
            continue  # scales and zero points have no fp16 counterpart
        total += math.prod(t["shape"]) * 2 if t["dtype"] in ("F32", "F16", "BF16", "F64") else _tensor_bytes(t)
    return total
