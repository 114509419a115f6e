"""How quantized weights are stored, and what they cost: one packing table, pure byte counts.

Codes live on the flattened weight ``[out, in * prod(kernel)]`` (see `dq.quant.QWeight`):

    storage         dtype            shape          codes
    "int8"          int8             [O, K]         INT values (signed formats, 5-8 bits)
    "uint8"         uint8            [O, K]         INT values (unsigned formats, 5-8 bits)
    "packed4"       uint8            [O, ceil(K/2)] two 4-bit codes per byte, low nibble first:
                                                    signed INT value + 8, unsigned INT value,
                                                    FP bit pattern (any format of <= 4 bits)
    "float8_*"      torch float8     [O, K]         the values themselves (E4M3FN, E5M2)
    "uint8codes"    uint8            [O, K]         FP bit patterns, one per byte (5-7-bit FP)

Scales are fp32 ``[O]`` (per channel; per tensor is repeated) or ``[O, G]`` (per group); unsigned
INT formats add a zero point shaped like the scale. A layer with quantized activations adds a
0-dim fp32 ``input_scale`` and a 0-dim int32 ``input_zero_point``.

`spec_nbytes` counts all of that from a spec and a shape alone (works for ``meta`` weights and
whole real-size UNets without building anything); it equals
`QuantizedLayerMixin.quant_weight_nbytes()` of the built layer.

    >>> spec_nbytes(LayerSpec("int4", "group64"), (320, 320))
    56320
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from dq import formats, quant
from dq.formats import Format

__all__ = [
    "StorageKind",
    "STORAGE",
    "storage_of",
    "pack",
    "unpack",
    "code_lut",
    "resolve_spec",
    "spec_nbytes",
    "qdata_like",
]


@dataclass(frozen=True)
class StorageKind:
    """One row of the packing table."""

    name: str
    dtype: torch.dtype
    codes_per_byte: int  # 2 for packed 4-bit codes, else 1

    def qdata_shape(self, out: int, k: int) -> tuple[int, int]:
        return (out, -(-k // self.codes_per_byte))


STORAGE: dict[str, StorageKind] = {
    "int8": StorageKind("int8", torch.int8, 1),
    "uint8": StorageKind("uint8", torch.uint8, 1),
    "packed4": StorageKind("packed4", torch.uint8, 2),
    "float8_e4m3fn": StorageKind("float8_e4m3fn", torch.float8_e4m3fn, 1),
    "float8_e5m2": StorageKind("float8_e5m2", torch.float8_e5m2, 1),
    "uint8codes": StorageKind("uint8codes", torch.uint8, 1),
}


def storage_of(fmt: str | Format) -> StorageKind:
    """The table row a format is stored with."""
    fmt = formats.get(fmt)
    kind = STORAGE.get(fmt.storage)
    if kind is None:
        raise ValueError(f"format {fmt.name!r} has unknown storage {fmt.storage!r}")
    return kind


def _nibbles(values: torch.Tensor, fmt: Format) -> torch.Tensor:
    """4-bit codes 0..15: INT values offset by 8 (signed) or as they are (unsigned); FP bit
    patterns."""
    if fmt.kind == "int":
        return (values.round() + (8 if fmt.signed else 0)).to(torch.uint8)
    return fmt.encode(values).to(torch.uint8)


def pack(values: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Grid values [O, K] -> the storage tensor for `fmt` (odd K is padded with a zero code).

    Runs in blocks of rows (`dq.quant.CHUNK_ELEMENTS` values each), so a whole layer's
    temporaries are never allocated at once."""
    fmt = formats.get(fmt)
    kind = storage_of(fmt)
    if values.dim() != 2:
        return _pack_rows(values, fmt, kind)
    out = torch.empty(kind.qdata_shape(*values.shape), dtype=kind.dtype, device=values.device)
    for a, b in quant._row_blocks(values.shape[0], values.shape[1]):
        out[a:b] = _pack_rows(values[a:b], fmt, kind)
    return out


def _pack_rows(values: torch.Tensor, fmt: Format, kind: StorageKind) -> torch.Tensor:
    if kind.name in ("int8", "uint8"):
        return values.round().to(kind.dtype)
    if kind.name.startswith("float8"):
        return values.to(kind.dtype)
    if kind.name == "packed4":
        codes = _nibbles(values, fmt)
        if codes.shape[-1] % 2:
            pad = _nibbles(torch.zeros(codes.shape[0], 1), fmt)
            codes = torch.cat([codes, pad], dim=1)
        return quant.pack_int4(codes)
    return fmt.encode(values).to(torch.uint8)  # uint8codes


def code_lut(fmt: str | Format) -> torch.Tensor | None:
    """fp32 code -> value table for packed 4-bit and one-code-per-byte FP storage, else None.
    A 2- or 3-bit format's table is padded to 16 entries (its codes sit in a 4-bit nibble)."""
    fmt = formats.get(fmt)
    kind = storage_of(fmt)
    if kind.name == "packed4" and fmt.kind == "int":
        return torch.arange(16, dtype=torch.float32) - (8 if fmt.signed else 0)
    if kind.name in ("packed4", "uint8codes"):
        table = fmt.decode(torch.arange(2**fmt.bits, dtype=torch.uint8)).float()
        if kind.name == "packed4" and table.numel() < 16:
            table = torch.cat([table, torch.zeros(16 - table.numel())])
        return table
    return None


def unpack(qdata: torch.Tensor, fmt: str | Format, k: int) -> torch.Tensor:
    """Storage tensor -> grid values [O, k] (fp32); the inverse of `pack`."""
    fmt = formats.get(fmt)
    kind = storage_of(fmt)
    if kind.name == "packed4":
        codes = quant.unpack_int4(qdata.reshape(qdata.shape[0], -1))[:, :k]
        return code_lut(fmt)[codes.long()]
    if kind.name == "uint8codes":
        return code_lut(fmt)[qdata.long()]
    return qdata.float()


def qdata_like(fmt: str | Format, out: int, k: int, device: Any = None) -> torch.Tensor:
    """An all-zero storage tensor for `out` x `k` codes of `fmt` (a shell's buffer)."""
    kind = storage_of(fmt)
    return torch.zeros(kind.qdata_shape(out, k), dtype=kind.dtype, device=device)


def resolve_spec(spec, weight_shape: torch.Size | tuple[int, ...]):
    """Adapt a default spec to a layer's shape: a group size that does not divide the layer's
    inputs falls back to per-channel scales (recorded in the plan, so save/load is exact).

    A spec from an explicit plan entry (`QuantConfig.spec_for` marks those, see
    `dq.config.explicit_layer`) is never adapted: a group size that does not divide that
    layer's inputs is a ValueError naming the layer, since silently storing another
    granularity than the one asked for would change the model without a word.
    """
    k = math.prod(tuple(weight_shape)[1:])
    if spec.group_size and k % spec.group_size:
        # set by QuantConfig.spec_for on explicit plan entries (dq.config.explicit_layer);
        # read by name here because imports point down (storage <- config)
        layer = getattr(spec, "_dq_explicit_layer", None)
        if layer is not None:
            divisors = [g for g in (16, 32, 64, 128) if k % g == 0]
            hint = f"group{divisors[-1]}" if divisors else "'channel'"
            raise ValueError(
                f"the plan gives layer {layer!r} {spec.weight_granularity}, but group size "
                f"{spec.group_size} does not divide its {k} inputs per output channel; use a "
                f"group size that divides {k} (e.g. {hint}) or 'channel' for this layer"
            )
        spec = replace(spec, weight_granularity="channel")
    return spec


def spec_nbytes(spec, weight_shape: torch.Size | tuple[int, ...]) -> int:
    """Bytes a layer quantized with `spec` holds for its weight: codes, scales, zero points and
    activation parameters (not the bias, which stays float either way).

    Pure: needs only the shape, so it runs on `meta` weights and whole real-size UNets. The
    spec is resolved for the shape first (as `dq.quantize` does). `None` (a float layer) is
    not a spec: count float layers as ``numel * element_size`` yourself.

    Args:
        spec: a `dq.LayerSpec`.
        weight_shape: the float weight's shape [O, I, *k].

    Example:
        >>> spec_nbytes(LayerSpec("int8", "channel", act="uint8"), (640, 320, 3, 3))
        1845768
    """
    shape = tuple(int(d) for d in weight_shape)
    spec = resolve_spec(spec, shape)
    out, k = shape[0], math.prod(shape[1:])
    fmt = formats.get(spec.weight)
    kind = storage_of(fmt)
    rows, cols = kind.qdata_shape(out, k)
    codes = rows * cols * torch.empty((), dtype=kind.dtype).element_size()
    groups = k // spec.group_size if spec.group_size else 1
    params = out * groups * 4 * (2 if quant.weight_has_zero_point(fmt) else 1)
    acts = 8 if spec.act is not None else 0  # fp32 input_scale + int32 input_zero_point
    return codes + params + acts
