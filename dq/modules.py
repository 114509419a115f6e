"""Quantized replacements for `nn.Linear` and `nn.Conv2d` holding real packed codes.

One vocabulary for every format (style.md §5): a quantized layer holds

- `qdata`: the weight codes in their storage dtype: `int8` (INT ≤ 8 bits, one code per byte),
  `uint8` with two 4-bit codes per byte (any ≤ 4-bit format, low nibble first, laid out on the
  flattened `[out, in * kh * kw]` weight), `float8_e4m3fn` / `float8_e5m2`, or `uint8` bit patterns
  one per byte (5–7-bit FP formats);
- `scale` (float32, `[out]` per channel or `[out, groups]` per group) and, for asymmetric INT
  weights, `zero_point`;
- for quantized activations: `input_scale` and `input_zero_point` (0-dim, calibrated);
- `bias` in float.

`from_float` builds one from a float layer and a `LayerSpec`; `dequantize()` returns the float
weight the codes stand for; `forward` calls the `torch.ops.dq` kernels, which pick their
implementation from the backend setting in `dq.kernels` (never a patched forward).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from dq import formats, quant
from dq.config import LayerSpec

# Activation formats the W8A8 engines execute: per-tensor uint8 asymmetric (FBGEMM/oneDNN style)
# and int8 symmetric (mapped onto the same engine with zero point 128 shifted in).
_ENGINE_ACT_FORMATS = ("uint8", "int8")


def weight_2d(w: torch.Tensor) -> torch.Tensor:
    """[out, in, *k] -> [out, in * prod(k)] (the layout codes and scales are defined on)."""
    return w.reshape(w.shape[0], -1)


def check_spec_fits(spec: LayerSpec, weight_shape: torch.Size | tuple[int, ...], name: str = "") -> None:
    """Raise ValueError when `spec` cannot be applied to a weight of `weight_shape`."""
    where = f" for layer {name!r}" if name else ""
    k = int(torch.Size(weight_shape)[1:].numel())
    fmt = formats.get(spec.weight)
    if spec.group_size and k % spec.group_size:
        raise ValueError(
            f"group size {spec.group_size} does not divide the {k} inputs per output channel{where}; "
            "use a group size that divides it, or 'channel' granularity"
        )
    if fmt.storage == "packed4" and k % 2:
        raise ValueError(
            f"4-bit codes are packed two per byte but the layer has an odd number ({k}) of "
            f"inputs per output channel{where}; use an 8-bit format for this layer"
        )
    if spec.act is not None:
        if spec.act not in _ENGINE_ACT_FORMATS:
            raise ValueError(
                f"activation format {spec.act!r}{where} has no kernel; use one of "
                f"{_ENGINE_ACT_FORMATS} or act=None (weight-only)"
            )
        if fmt.kind != "int" or not fmt.signed or spec.group_size:
            raise ValueError(
                f"quantized activations{where} need INT weights with per-channel or per-tensor "
                f"scales, got {spec.weight} / {spec.weight_granularity}; use e.g. "
                "LayerSpec('int8', 'channel', act='uint8') or act=None"
            )


def resolve_spec(spec: LayerSpec, weight_shape: torch.Size | tuple[int, ...]) -> LayerSpec:
    """Adapt a spec to a layer's shape: a group size that does not divide the layer's inputs
    falls back to per-channel scales (recorded in the plan, so save/load is exact)."""
    k = int(torch.Size(weight_shape)[1:].numel())
    if spec.group_size and k % spec.group_size:
        spec = replace(spec, weight_granularity="channel")
    return spec


def _act_qparams(spec: LayerSpec, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor uint8 activation parameters from a calibrated range [lo, hi]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if spec.act == "int8" or spec.act_symmetric:
        amax = max(abs(lo), abs(hi), 1e-8)
        scale = amax / 127.0
        zp = 128  # symmetric int8 expressed on the uint8 engine: q_u8 = q_s8 + 128
    else:
        scale = max(hi - lo, 1e-8) / 255.0
        zp = int(min(max(round(-lo / scale), 0), 255))
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32)


def encode_weight(w: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Quantize a float weight to codes + scales as stored in a quantized layer.

    Args:
        w: float weight [out, in, *k].
        spec: the layer's settings (already resolved for the shape).
    Returns:
        {"qdata": codes, "scale": f32 [out] or [out, groups], "zero_point"?: f32}
    """
    fmt = formats.get(spec.weight)
    gran = quant.parse_granularity(spec.weight_granularity)
    wf = w.detach().float()
    w2 = weight_2d(wf)  # [O, K]
    symmetric = not weight_has_zero_point(fmt)
    scale, zp = quant.compute_qparams(w2, fmt, gran, method=spec.weight_method, symmetric=symmetric)
    if spec.pair_limit is not None:  # signed INT per channel (checked by LayerSpec)
        scale, q = pair_limited_codes(wf, scale, fmt.qmax, spec.pair_limit)
    else:
        q = quant.quantize(w2, fmt, scale, zp, gran)  # grid values, [O, K]
    out = {"qdata": pack_codes(q, fmt), "scale": _flat_scale(scale, w2.shape[0])}
    if zp is not None:
        out["zero_point"] = _flat_scale(zp.float(), w2.shape[0])
    return out


def pair_limited_codes(
    w: torch.Tensor, scale: torch.Tensor, qmax: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel INT codes with |q[n, 2j]| + |q[n, 2j + 1]| <= limit for every
    adjacent input-channel pair (at each kernel tap of a convolution).

    Each channel's scale grows to max(scale, P / limit), P its largest |w[2j]| + |w[2j + 1]|,
    so unrounded pairs fit; where rounding both up overshoots by one, the weight that rounded
    up further is rounded down instead. Nothing clips (P >= max |w|). Cost against plain int8
    (eval/pair_limit_sqnr.py): 3.7 dB of weight SQNR on the embedded UNet (7-bit weights:
    6.0 dB), 1.6-3 dB on normal or Laplace weights; on uniform weights no better than 7-bit.

    Args:
        w: float weight [O, I, *k]; scale: [O] or [O, 1], positive.
    Returns:
        (scale shaped as given, codes [O, K] float in w's flattened order)
    """
    o, i = w.shape[0], w.shape[1]
    s = torch.maximum(scale.reshape(o).float(), quant.pair_absmax(w) / limit)
    x = w.reshape(o, i, -1) / s.view(o, 1, 1)  # [O, I, taps]
    if i % 2:
        x = F.pad(x, (0, 0, 0, 1))
    xa, xb = x[:, 0::2], x[:, 1::2]
    qa, qb = xa.round().clamp(-qmax, qmax), xb.round().clamp(-qmax, qmax)
    over = qa.abs() + qb.abs() > limit  # by exactly one
    down_a = over & (qa.abs() - xa.abs() >= qb.abs() - xb.abs())
    qa = qa - qa.sign() * down_a
    qb = qb - qb.sign() * (over & ~down_a)
    q = torch.stack((qa, qb), dim=2).reshape(o, -1, x.shape[2])[:, :i]  # interleave pairs
    return s.reshape(scale.shape).to(scale.dtype), q.reshape(o, -1)


def weight_has_zero_point(fmt) -> bool:
    """Unsigned INT weight formats are asymmetric (a zero point per scale); all others are
    symmetric."""
    return fmt.kind == "int" and not fmt.signed


def _flat_scale(scale: torch.Tensor, out: int) -> torch.Tensor:
    """Scale (or zero point) from `compute_qparams` -> [out] per channel, [out, groups] per group
    (a per-tensor value is repeated per channel)."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    s = s.reshape(1, 1).expand(out, 1) if s.numel() == 1 else s.reshape(out, -1)
    return (s[:, 0] if s.shape[1] == 1 else s).contiguous()


def pack_codes(q: torch.Tensor, fmt) -> torch.Tensor:
    """Grid values [O, K] -> storage tensor for `fmt` (see module docstring)."""
    storage = fmt.storage
    if storage == "int8":
        return q.round().to(torch.int8)
    if storage == "uint8":
        return q.round().to(torch.uint8)
    if storage in ("float8_e4m3fn", "float8_e5m2"):
        return q.to(getattr(torch, storage))
    if storage == "packed4":
        codes = _nibbles(q, fmt)
        return quant.pack_int4(codes)
    if storage == "uint8codes":
        return fmt.encode(q).to(torch.uint8)
    raise ValueError(f"format {fmt.name!r} has unknown storage {storage!r}")


def _nibbles(q: torch.Tensor, fmt) -> torch.Tensor:
    """4-bit codes 0..15: INT values offset by 8 (signed) or as-is (unsigned); FP bit patterns."""
    if fmt.kind == "int":
        off = 8 if fmt.signed else 0
        return (q.round() + off).to(torch.uint8)
    return fmt.encode(q).to(torch.uint8)


def code_lut(fmt) -> torch.Tensor | None:
    """16/64/128-entry float table mapping codes to values for non-byte formats, else None."""
    if fmt.storage == "packed4" and fmt.kind == "int":
        off = 8 if fmt.signed else 0
        return torch.arange(16, dtype=torch.float32) - off
    if fmt.storage in ("packed4", "uint8codes"):
        table = fmt.decode(torch.arange(2**fmt.bits, dtype=torch.uint8))
        if fmt.storage == "packed4" and table.numel() < 16:  # 2/3-bit codes in a 4-bit nibble
            table = torch.cat([table, torch.zeros(16 - table.numel())])
        return table
    return None


def unpack_codes(qdata: torch.Tensor, fmt, k: int) -> torch.Tensor:
    """Storage tensor -> grid values [O, K] (float32)."""
    storage = fmt.storage
    if storage in ("int8", "uint8"):
        return qdata.float()
    if storage in ("float8_e4m3fn", "float8_e5m2"):
        return qdata.float()
    if storage == "packed4":
        codes = quant.unpack_int4(qdata)[..., :k]
        return code_lut(fmt)[codes.long()]
    if storage == "uint8codes":
        return code_lut(fmt)[qdata.long()]
    raise ValueError(f"format {fmt.name!r} has unknown storage {storage!r}")


class QuantizedLayerMixin:
    """Shared state and behaviour of quantized layers; subclasses add the float op."""

    spec: LayerSpec
    weight_shape: torch.Size

    def _init_quant_buffers(self, spec: LayerSpec, weight_shape: torch.Size, bias: bool) -> None:
        fmt = formats.get(spec.weight)
        out, k = weight_shape[0], int(torch.Size(weight_shape)[1:].numel())
        self.spec = spec
        self.weight_shape = torch.Size(weight_shape)
        if fmt.storage == "packed4":
            qdata = torch.zeros(out, (k + 1) // 2, dtype=torch.uint8)
        elif fmt.storage in ("float8_e4m3fn", "float8_e5m2"):
            qdata = torch.zeros(out, k, dtype=getattr(torch, fmt.storage))
        elif fmt.storage == "int8":
            qdata = torch.zeros(out, k, dtype=torch.int8)
        else:
            qdata = torch.zeros(out, k, dtype=torch.uint8)
        groups = k // spec.group_size if spec.group_size else 0
        pshape = (out, groups) if groups else (out,)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", torch.ones(pshape, dtype=torch.float32))
        if weight_has_zero_point(fmt):
            self.register_buffer("zero_point", torch.zeros(pshape, dtype=torch.float32))
        else:
            self.zero_point = None
        if spec.act is not None:
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        else:
            self.input_scale = None
            self.input_zero_point = None
        lut = code_lut(fmt)
        # derived from the format, not saved: the plan names the format
        self.register_buffer("lut", lut, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None

    def _load_from_float(
        self, w: torch.Tensor, bias: torch.Tensor | None, act_range: tuple[float, float] | None
    ) -> None:
        enc = encode_weight(w, self.spec)
        self.qdata.copy_(enc["qdata"])
        self.scale.copy_(enc["scale"].reshape(self.scale.shape))
        if self.zero_point is not None:
            self.zero_point.copy_(enc["zero_point"].reshape(self.zero_point.shape))
        if bias is not None:
            self.bias.data.copy_(bias.detach().float())
        if self.spec.act is not None:
            if act_range is None:
                raise ValueError(
                    f"{type(self).__name__} with activation format {self.spec.act!r} needs a "
                    "calibrated activation range; pass act_range=(min, max) or calibrate with "
                    "dq.quantize(..., calib_prompts=[...])"
                )
            s, z = _act_qparams(self.spec, *act_range)
            self.input_scale.copy_(s)
            self.input_zero_point.copy_(z)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the stored codes represent, shaped like the original weight."""
        fmt = formats.get(self.spec.weight)
        k = int(self.weight_shape[1:].numel())
        q = unpack_codes(self.qdata, fmt, k)  # [O, K]
        if self.zero_point is not None:
            zp = self.zero_point
            q = (q.reshape(q.shape[0], zp.reshape(q.shape[0], -1).shape[1], -1) - zp.reshape(q.shape[0], -1, 1)).reshape(q.shape)
        if self.spec.group_size:
            g = self.spec.group_size
            w = (q.reshape(q.shape[0], -1, g) * self.scale.unsqueeze(-1)).reshape(q.shape)
        else:
            w = q * self.scale.reshape(-1, 1)
        return w.reshape(self.weight_shape)

    @property
    def _kernel_args(self) -> dict:
        fmt = formats.get(self.spec.weight)
        return {"bits": fmt.bits, "group_size": self.spec.group_size}

    def quant_nbytes(self) -> int:
        """Bytes of everything this layer stores (codes, scales, activation params, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        s = self.spec
        act = s.act or "float"
        return f"{tuple(self.weight_shape)}, w={s.weight}/{s.weight_granularity}, a={act}"


class QLinear(QuantizedLayerMixin, nn.Module):
    """`nn.Linear` with quantized weights (and optionally activations)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec):
        super().__init__()
        check_spec_fits(spec, (out_features, in_features))
        self.in_features, self.out_features = in_features, out_features
        self._init_quant_buffers(spec, torch.Size((out_features, in_features)), bias)

    @classmethod
    def from_float(
        cls, module: nn.Linear, spec: LayerSpec, act_range: tuple[float, float] | None = None,
        weight: torch.Tensor | None = None,
    ) -> QLinear:
        """Quantize `module` with `spec`; `weight` overrides the float weight (e.g. after
        learned rounding); `act_range` is the calibrated (min, max) of its input."""
        spec = resolve_spec(spec, module.weight.shape)
        q = cls(module.in_features, module.out_features, module.bias is not None, spec)
        q._load_from_float(module.weight if weight is None else weight, module.bias, act_range)
        return q.to(module.weight.device)

    # --- BOS-aware text embedding (MixDQ) -------------------------------------------------
    def enable_bos(self, float_module: nn.Linear, bos: torch.Tensor) -> None:
        """Keep the BOS token's path in full precision: precompute `float_module(bos)`.

        With a causal text encoder (CLIP) token 0 of every prompt's embedding is the same BOS
        vector (and a large outlier); cross-attention key/value layers then output a constant
        for it. Rows whose token 0 equals `bos` get the precomputed float output; the other
        tokens (and any row whose token 0 differs, e.g. SDXL's all-zero unconditional
        embedding) go through the quantized kernel. Both constants are saved with the layer.

        Args:
            float_module: the float layer this one was quantized from.
            bos: [in_features] the BOS token's text embedding.
        """
        bos = bos.detach().float().reshape(-1).to(self.scale.device)
        if bos.numel() != self.in_features:
            raise ValueError(
                f"BOS embedding has {bos.numel()} values but the layer takes {self.in_features}; "
                "pass token 0 of the encoder_hidden_states this layer projects"
            )
        with torch.no_grad():
            w = float_module.weight.detach().float()
            b = None if float_module.bias is None else float_module.bias.detach().float()
            out = F.linear(bos, w.to(bos.device), None if b is None else b.to(bos.device))
        self.register_buffer("bos_input", bos.clone())
        self.register_buffer("bos_output", out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bos_out = self._buffers.get("bos_output")
        if bos_out is None or x.dim() != 3 or x.shape[1] < 2:
            return self._forward_codes(x)
        # [B, L, in]: tokens 1.. through the kernel; token 0 precomputed where it is the BOS.
        # Branch-free (torch.where), so torch.compile sees no data-dependent control flow.
        bos_in = self._buffers["bos_input"]
        rest = self._forward_codes(x[:, 1:])  # [B, L-1, out]
        head_q = self._forward_codes(x[:, :1])  # [B, 1, out], used where token 0 is not BOS
        tol = 1e-2 * bos_in.abs().amax() + 1e-6
        is_bos = (x[:, 0].to(bos_in.dtype) - bos_in).abs().amax(dim=-1) <= tol  # [B]
        head = torch.where(is_bos[:, None, None], bos_out.to(head_q.dtype), head_q)
        return torch.cat([head, rest], dim=1)

    def _forward_codes(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.device.type == "cpu":  # half precision is emulated (slow) on CPU; GPUs keep it
            x = x.float()
        if self.spec.act is not None:
            y = torch.ops.dq.linear_w8a8(
                x, self._engine_weight(), self.scale, self.bias, self.input_scale,
                self.input_zero_point,
            )
        else:
            y = torch.ops.dq.linear_wonly(
                x, self.qdata, self.scale, self.zero_point, self.bias, self.lut,
                **self._kernel_args,
            )
        return y.to(dtype)

    def _engine_weight(self) -> torch.Tensor:
        return self.qdata


class QConv2d(QuantizedLayerMixin, nn.Module):
    """`nn.Conv2d` with quantized weights (and optionally activations)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
        stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
        bias: bool, spec: LayerSpec,
    ):
        super().__init__()
        shape = torch.Size((out_channels, in_channels // groups, *kernel_size))
        check_spec_fits(spec, shape)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        self._init_quant_buffers(spec, shape, bias)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, spec: LayerSpec, act_range: tuple[float, float] | None = None,
        weight: torch.Tensor | None = None,
    ) -> QConv2d:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r} "
                "is not supported; keep this layer in float (add it to QuantConfig.skip)"
            )
        spec = resolve_spec(spec, module.weight.shape)
        q = cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None, spec,
        )
        q._load_from_float(module.weight if weight is None else weight, module.bias, act_range)
        return q.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.device.type == "cpu":  # half precision is emulated (slow) on CPU; GPUs keep it
            x = x.float()
        conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if self.spec.act is not None:
            y = torch.ops.dq.conv2d_w8a8(
                x, self.qdata, self.scale, self.bias, self.input_scale, self.input_zero_point,
                *conv, list(self.weight_shape),
            )
        else:
            y = torch.ops.dq.conv2d_wonly(
                x, self.qdata, self.scale, self.zero_point, self.bias, self.lut, list(self.weight_shape),
                *conv, **self._kernel_args,
            )
        return y.to(dtype)


def quantized_module_for(module: nn.Module) -> type[QuantizedLayerMixin] | None:
    """The quantized class replacing `module`, or None if it is not quantizable."""
    if isinstance(module, nn.Linear):
        return QLinear
    if isinstance(module, nn.Conv2d):
        return QConv2d
    return None


def reference_forward(layer: QuantizedLayerMixin, x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch forward from `dequantize()` (and real activation rounding), for tests."""
    w = layer.dequantize()
    if layer.spec.act is not None:
        s, z = layer.input_scale, layer.input_zero_point
        x = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    if isinstance(layer, QLinear):
        return F.linear(x, w, layer.bias)  # BOS-aware layers: compare tokens 1.. only
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
