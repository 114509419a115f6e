"""Quantization maths as pure functions: granularity values, scale estimation, quantize /
dequantize onto a format's grid, 4-bit packing, SQNR.

Conventions (the model ``x ~ (q - zero_point) * scale``):

- INT: ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``; symmetric INT has
  ``zero_point = None`` and ``scale = absmax / qmax``; asymmetric INT uses the format's full range
  ``[qmin, qmax]`` for ``[min(x_min, 0), max(x_max, 0)]`` (0 is always exact).
- FP: ``q = fmt.round(x / scale)`` with ``scale = absmax / fmt.max``; always symmetric,
  ``zero_point = None``.

Layouts and parameter shapes (``x`` of shape [O, ...]):

- ``PerTensor()``:       layout x,                      scale []
- ``PerChannel(axis)``:  layout x,                      scale = x.shape with 1 on every dim but axis
- ``PerGroup(size)``:    layout x.reshape(O, G, size),  scale [O, G, 1]; G = numel / O / size
  (all dims after the first are flattened: a conv weight [O, I, kh, kw] is grouped along
  I*kh*kw, matching im2col; a 1-D x is one row, O = 1).

``zero_point`` has the shape of ``scale`` (int32) or is None. ``quantize`` / ``dequantize`` also
accept parameters with the right number of elements in any shape (e.g. a per-channel scale
stored as [O]) and reshape them.

    >>> import torch, dq.quant as Q
    >>> w = torch.randn(8, 64)
    >>> s, zp = Q.compute_qparams(w, "int4", Q.PerGroup(32))
    >>> s.shape, zp
    (torch.Size([8, 2, 1]), None)
    >>> Q.sqnr_db(w, Q.fake_quantize(w, "int4", s, zp, Q.PerGroup(32))) > 15
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dq import formats as _formats
from dq.formats import Format, FPFormat, IntFormat

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "Granularity",
    "parse_granularity",
    "to_layout",
    "from_layout",
    "param_shape",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "unpack_int4",
    "signed_to_offset",
    "offset_to_signed",
    "sqnr_db",
    "pair_absmax",
    "pair_limited_values",
    "QWeight",
    "quantize_weight",
    "scale_values",
    "act_params",
    "fake_quantize_act",
    "weight_has_zero_point",
]


# ----- granularity -----


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of ``axis`` (0: output channels of a weight).

    Args:
        axis: the channel dimension; negative values count from the end.
    """

    axis: int = 0

    def __post_init__(self):
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ValueError(f"PerChannel(axis={self.axis!r}): axis must be an int")

    def __str__(self) -> str:
        return "channel" if self.axis == 0 else f"channel:{self.axis}"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements of each row (x viewed as [O, -1]).

    Args:
        size: group size, >= 1 (typically 32, 64, 128).
    """

    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"PerGroup(size={self.size!r}): size must be an int >= 1, e.g. 64")

    def __str__(self) -> str:
        return f"group{self.size}"


Granularity = PerTensor | PerChannel | PerGroup

_GRAN_RE = re.compile(r"^(?:per[_-]?)?(tensor|channel(?::(-?\d+))?|group[:_]?(\d+))$")


def parse_granularity(s: str | Granularity) -> Granularity:
    """Parse "tensor", "channel", "channel:1", "group64" (the inverse of ``str(g)``).

    Args:
        s: the text; a granularity value passes through.

    Example:
        >>> parse_granularity("group64")
        PerGroup(size=64)
    """
    if isinstance(s, PerTensor | PerChannel | PerGroup):
        return s
    mt = _GRAN_RE.match(s.strip().lower()) if isinstance(s, str) else None
    if mt is None:
        raise ValueError(
            f"unknown granularity {s!r}; use 'tensor', 'channel', 'channel:<axis>' or "
            "'group<size>' (e.g. 'group64')"
        )
    if mt.group(1) == "tensor":
        return PerTensor()
    if mt.group(1).startswith("channel"):
        return PerChannel(int(mt.group(2) or 0))
    return PerGroup(int(mt.group(3)))


def _divisors_near(n: int, size: int, k: int = 6) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divs, key=lambda d: (abs(math.log(d / size)), d))[:k])


def param_shape(shape: torch.Size | tuple[int, ...], g: Granularity) -> tuple[int, ...]:
    """Shape of scale / zero_point for a tensor of ``shape`` (raises ValueError if ``g`` does not
    fit the shape)."""
    shape = tuple(shape)
    if isinstance(g, PerTensor):
        return ()
    if isinstance(g, PerChannel):
        if len(shape) == 0 or not -len(shape) <= g.axis < len(shape):
            raise ValueError(
                f"PerChannel(axis={g.axis}) does not fit a tensor of shape {list(shape)}; "
                f"use an axis in [{-len(shape)}, {len(shape) - 1}] or PerTensor()"
            )
        axis = g.axis % len(shape)
        return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    if isinstance(g, PerGroup):
        if len(shape) == 0:
            raise ValueError("PerGroup needs a tensor with at least 1 dim; use PerTensor()")
        rows = shape[0] if len(shape) > 1 else 1
        n = math.prod(shape) // rows if rows else 0
        if n == 0 or n % g.size:
            raise ValueError(
                f"PerGroup(size={g.size}) needs the flattened row length {n} (shape "
                f"{list(shape)} viewed as [{rows}, {n}]) to be divisible by the group size; "
                f"sizes that divide it: {_divisors_near(n, g.size) if n else []}"
            )
        return (rows, n // g.size, 1)
    raise ValueError(f"granularity must be PerTensor, PerChannel or PerGroup, got {g!r}")


def to_layout(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """x viewed in the layout its scale broadcasts against (only PerGroup reshapes)."""
    g = parse_granularity(g)
    pshape = param_shape(x.shape, g)
    if isinstance(g, PerGroup):
        return x.reshape(pshape[0], pshape[1], g.size)  # [O, G, size]
    return x


def from_layout(
    y: torch.Tensor, shape: torch.Size | tuple[int, ...], g: Granularity
) -> torch.Tensor:
    """Inverse of ``to_layout``: back to ``shape``."""
    return y.reshape(shape)


def _rows(xl: torch.Tensor, g: Granularity) -> torch.Tensor:
    """Layout -> [R, N]: one row per scale (R = number of scales), in param-shape order."""
    if isinstance(g, PerTensor):
        return xl.reshape(1, -1)
    if isinstance(g, PerChannel):
        return xl.movedim(g.axis % xl.ndim, 0).reshape(xl.shape[g.axis], -1)
    return xl.reshape(-1, xl.shape[-1])  # [O*G, size]


def _resolve_fmt(fmt: str | Format) -> Format:
    return _formats.get(fmt)


def _as_param(
    p: torch.Tensor | float | None, pshape: tuple[int, ...], what: str
) -> torch.Tensor | None:
    if p is None:
        return None
    p = torch.as_tensor(p)
    if p.numel() != math.prod(pshape):
        raise ValueError(
            f"{what} has shape {list(p.shape)} ({p.numel()} elements) but this granularity needs "
            f"{list(pshape)}; compute it with compute_qparams on the same tensor and granularity"
        )
    return p.reshape(pshape)


# ----- scale estimation -----

_METHODS = ("minmax", "percentile", "mse")


def _qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: Format, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows' clipping ranges [R, 1] -> (scale [R, 1] float32, zero_point [R, 1] int32 | None).

    Symmetric: hi is the absmax (lo ignored). A zero range (all-zero row) gets scale 1, so
    nothing divides by 0; scales are kept >= the smallest normal float32.
    """
    if symmetric:
        scale = hi / fmt.max
        zero = hi == 0
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # 0 must be exact
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
        zero = hi == lo
    scale = torch.where(zero, torch.ones_like(scale), scale)
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    if symmetric:
        return scale, None
    zp = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    return scale, zp.to(torch.int32)


def _row_errors(xr, fmt, scale, zp):
    """Root squared error of fake quantization per row: rows [R, N], params [R, 1] -> [R, 1].

    Computed on the grid's side: with y = x / s (+ zp), ||dequantize(quantize(x)) - x|| =
    s * ||q - y||, q = clamp(round(y)) (clamping integer bounds commutes with rounding), so one
    candidate costs a division, a rounding, a subtraction and a norm."""
    y = xr / scale
    if isinstance(fmt, IntFormat):
        if zp is not None:
            y.add_(zp)
        q = y.clamp(fmt.qmin, fmt.qmax).round_()
    else:
        q = fmt.round(y)
    return torch.linalg.vector_norm(q.sub_(y), dim=1, keepdim=True).mul_(scale)


# Row-wise work on weights (scale search, rounding) runs in blocks of about this many elements:
# temporaries stay in the cores' caches and are recycled by the allocator instead of being
# fresh, page-faulted allocations of a whole layer's size each.
CHUNK_ELEMENTS = 1 << 18


def _row_blocks(rows: int, row_len: int) -> list[tuple[int, int]]:
    """[(r0, r1), ...] covering `rows` rows of `row_len` elements in blocks of about
    CHUNK_ELEMENTS elements (at least one row each)."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_len))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _mse_search(xr, lo, hi, fmt, symmetric, n, scale, zp):
    """Per-row shrink factor alpha = 1 - i/n of the clipping range minimising the squared error
    of fake quantization. alpha = 1 (the given scale/zp) is the starting point and only a
    strictly smaller error replaces it.

    Coarse to fine: every step = isqrt(n)-th i from the top, stopping once no row has improved
    over the last two coarse points (the error grows again as clipping bites, for every row);
    then each row's best i moves by +-step/2, +-step/4, ... +-1 (5, 2, 1 for n = 100) where
    that helps: 11-16 candidates instead of the 28 of a +-(step - 1) neighbourhood. Measured
    on normal, Laplace and the embedded UNet's trained weights (INT4/INT3/INT2 in groups of 64,
    FP4 E2M1 in groups of 32): total squared error 0.02-0.05 % above the +-(step - 1)
    neighbourhood and 0.03-0.3 % above trying every i, against +17-30 % (4 bits) for min-max
    (eval/quantize_real.py --search-check).

    xr [R, N]; lo, hi [R, 1] the min-max range; scale, zp [R, 1]. Returns (scale, zp) [R, 1].
    """
    if lo.shape[0] != xr.shape[0]:  # per-tensor range shared by all rows
        lo, hi = lo.expand(xr.shape[0], 1), hi.expand(xr.shape[0], 1)
        scale = scale.expand(xr.shape[0], 1)
        zp = None if zp is None else zp.expand(xr.shape[0], 1)
    best = _row_errors(xr, fmt, scale, zp)  # [R, 1]
    best_i = torch.zeros(best.shape, dtype=torch.long)

    def consider(i_rows: torch.Tensor) -> None:
        nonlocal best, best_i, scale, zp
        alpha = 1.0 - i_rows.to(lo.dtype) / n  # [R, 1]
        s_a, zp_a = _qparams_from_range(lo * alpha, hi * alpha, fmt, symmetric)
        err = _row_errors(xr, fmt, s_a, zp_a)
        better = err < best
        best = torch.where(better, err, best)
        best_i = torch.where(better, i_rows, best_i)
        scale = torch.where(better, s_a, scale)
        if zp is not None:
            zp = torch.where(better, zp_a, zp)

    step = max(1, math.isqrt(n))
    for i in range(step, n, step):
        consider(torch.full_like(best_i, i))
        if i >= 2 * step and not bool((best_i >= i - step).any()):
            break  # every row got worse twice in a row
    d = step // 2
    while d >= 1:  # halving steps around each row's best: 5, 2, 1 for n = 100
        centre = best_i.clone()
        for i_rows in (centre - d, centre + d):
            ok = (i_rows > 0) & (i_rows < n)
            if bool(ok.any()):
                consider(torch.where(ok, i_rows, torch.zeros_like(i_rows)))
        d //= 2
    return scale, zp


def compute_qparams(
    x: torch.Tensor,
    fmt: str | Format,
    granularity: str | Granularity,
    method: str = "minmax",
    symmetric: bool = True,
    percentile: float = 0.999,
    mse_grid: int = 100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) mapping x onto ``fmt``'s grid, one per group of ``granularity``.

    Methods (all per row = per scale):
      - "minmax": the clipping range is [min, max] (asymmetric) or max |x| (symmetric).
      - "percentile": the ``percentile`` quantile of |x| (symmetric) or the (1 - p, p) quantiles
        (asymmetric), nearest rank.
      - "mse": the min-max range shrunk by a factor alpha in {1, 1 - 1/n, ..., 1/n}
        (n = ``mse_grid``) that minimises the squared error of fake quantization, searched
        coarse-to-fine (see ``_mse_search``); alpha = 1 is tried first and only a strictly
        smaller error replaces it, so it is never worse than "minmax".

    Args:
        x: float tensor (weights [O, ...] or activations).
        fmt: a format or its registry name.
        granularity: PerTensor() / PerChannel(axis) / PerGroup(size), or its text.
        method: "minmax" | "percentile" | "mse".
        symmetric: False for an asymmetric INT grid with a zero point (INT only). A symmetric
            unsigned INT format covers [0, absmax] (negative values clamp to 0).
        percentile: quantile in (0, 1] for method="percentile".
        mse_grid: number of shrink factors for method="mse".

    Returns:
        (scale float32, zero_point int32 or None), shapes from ``param_shape(x.shape, g)``.

    Example:
        >>> s, zp = compute_qparams(torch.randn(16, 8), "uint8", "channel", symmetric=False)
        >>> s.shape, zp.dtype
        (torch.Size([16, 1]), torch.int32)
    """
    fmt = _resolve_fmt(fmt)
    g = parse_granularity(granularity)
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {_METHODS}")
    if not symmetric and isinstance(fmt, FPFormat):
        raise ValueError(
            f"{fmt.name} is a floating-point format and FP quantization is symmetric; "
            "pass symmetric=True or use an INT format"
        )
    if method == "percentile" and not 0 < percentile <= 1:
        raise ValueError(f"percentile={percentile} must be in (0, 1], e.g. 0.999")
    if method == "mse" and (not isinstance(mse_grid, int) or mse_grid < 1):
        raise ValueError(f"mse_grid={mse_grid!r} must be an int >= 1, e.g. 100")
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}; convert it with x.float()")
    if x.numel() == 0:
        raise ValueError("x is empty; there is nothing to compute a scale from")
    pshape = param_shape(x.shape, g)
    xr = _rows(to_layout(x.float(), g), g)  # [R, N]

    if method == "percentile":
        n = xr.shape[1]
        k_hi = max(1, min(n, math.ceil(percentile * n)))
        if symmetric:
            lo = hi = xr.abs().kthvalue(k_hi, dim=1, keepdim=True).values  # [R, 1]
        else:
            k_lo = max(1, min(n, n + 1 - k_hi))
            lo = xr.kthvalue(k_lo, dim=1, keepdim=True).values
            hi = xr.kthvalue(k_hi, dim=1, keepdim=True).values
    else:  # no temporary of x's size; max |x| = max(-min, max)
        lo, hi = xr.amin(dim=1, keepdim=True), xr.amax(dim=1, keepdim=True)  # [R, 1] each
        if symmetric:
            lo = hi = torch.maximum(-lo, hi)
    # NaN and inf survive min / max, so the reduced range tells whether x is finite; quantiles
    # may skip them
    finite = torch.isfinite(x).all() if method == "percentile" else torch.isfinite(hi).all() & torch.isfinite(lo).all()
    if not bool(finite):
        raise ValueError("x contains NaN or inf; clean the tensor (e.g. torch.nan_to_num) first")

    scale, zp = _qparams_from_range(lo, hi, fmt, symmetric)

    if method == "mse":
        parts = [
            _mse_search(
                xr[a:b], lo[a:b], hi[a:b], fmt, symmetric, mse_grid,
                scale[a:b], None if zp is None else zp[a:b],
            )
            for a, b in _row_blocks(xr.shape[0], xr.shape[1])
        ]
        scale = torch.cat([p[0] for p in parts])
        if zp is not None:
            zp = torch.cat([p[1] for p in parts])

    scale = scale.reshape(pshape)
    return scale, None if zp is None else zp.reshape(pshape)


# ----- quantize / dequantize -----


def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    granularity: str | Granularity = PerTensor(),
) -> torch.Tensor:
    """x -> grid values q (float32, same shape as x): INT ``clamp(round(x/s) + zp)``, FP
    ``fmt.round(x/s)``. Turn q into stored codes with ``fmt.encode(q)``.

    Args:
        x: float tensor.
        fmt: a format or its registry name.
        scale: from ``compute_qparams`` (same granularity).
        zero_point: int tensor for asymmetric INT, else None.
        granularity: the granularity the parameters were computed with.
    """
    fmt = _resolve_fmt(fmt)
    g = parse_granularity(granularity)
    x = torch.as_tensor(x)
    pshape = param_shape(x.shape, g)
    scale = _as_param(scale, pshape, "scale").float()
    zp = _as_param(zero_point, pshape, "zero_point")
    if zp is not None and isinstance(fmt, FPFormat):
        raise ValueError(f"{fmt.name} is symmetric (FP); pass zero_point=None")
    xl = to_layout(x.float(), g)  # layout; scale broadcasts against it
    if zp is not None:  # asymmetric INT
        q = fmt.round(xl / scale + zp.float())
    else:
        q = fmt.round(xl / scale)
    return from_layout(q, x.shape, g)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    granularity: str | Granularity = PerTensor(),
) -> torch.Tensor:
    """Grid values -> float32 ``(q - zero_point) * scale``, same shape as q.

    Args:
        q: grid values (float, or integer codes of an INT format).
        scale: from ``compute_qparams``.
        zero_point: as returned by ``compute_qparams`` (None when symmetric).
        granularity: the granularity the parameters were computed with.
    """
    g = parse_granularity(granularity)
    q = torch.as_tensor(q)
    pshape = param_shape(q.shape, g)
    scale = _as_param(scale, pshape, "scale").float()
    zp = _as_param(zero_point, pshape, "zero_point")
    ql = to_layout(q.float(), g)
    if zp is not None:
        ql = ql - zp.float()
    return from_layout(ql * scale, q.shape, g)


def fake_quantize(
    x: torch.Tensor,
    fmt: str | Format,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    granularity: str | Granularity = PerTensor(),
) -> torch.Tensor:
    """``dequantize(quantize(x))``: float32 x as the quantized model sees it (for calibration and
    sensitivity, never at inference)."""
    q = quantize(x, fmt, scale, zero_point, granularity)
    return dequantize(q, scale, zero_point, granularity)


# ----- 4-bit packing -----


def signed_to_offset(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Signed integers in [-2**(bits-1), 2**(bits-1)-1] -> uint8 offset codes q + 2**(bits-1)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.as_tensor(q)
    if bool(((q < lo) | (q > hi)).any()):
        raise ValueError(f"signed_to_offset: values outside [{lo}, {hi}] for bits={bits}")
    return (q.to(torch.int16) - lo).to(torch.uint8)


def offset_to_signed(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """uint8 offset codes in [0, 2**bits - 1] -> int8 values codes - 2**(bits-1)."""
    codes = torch.as_tensor(codes)
    if bool(((codes < 0) | (codes >= (1 << bits))).any()):
        raise ValueError(f"offset_to_signed: codes outside [0, {(1 << bits) - 1}]")
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim, low nibble first.

    Args:
        codes: uint8 in [0, 15] (FP4 bit patterns, offset codes), or int8 in [-8, 7] (signed
            int4, stored as offset codes q + 8), last dim even.

    Returns:
        uint8 [..., n/2]: byte j = codes[2j] | codes[2j+1] << 4.

    Example:
        >>> pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).tolist()
        [33]
    """
    codes = torch.as_tensor(codes)
    if codes.dtype == torch.int8:
        codes = signed_to_offset(codes, 4)
    elif codes.dtype != torch.uint8:
        raise ValueError(
            f"pack_int4 expects uint8 codes in [0, 15] or int8 in [-8, 7], got {codes.dtype}"
        )
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise ValueError(
            f"pack_int4 needs an even last dim, got shape {list(codes.shape)}; pad the last dim "
            "to a multiple of 2"
        )
    if bool((codes > 15).any()):
        raise ValueError("pack_int4: uint8 codes must be in [0, 15]")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 [..., n/2] -> uint8 codes [..., n] (or int8 in [-8, 7]
    when ``signed``, undoing the offset)."""
    packed = torch.as_tensor(packed)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return offset_to_signed(codes, 4) if signed else codes


# ----- metrics -----


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(||ref||^2 / ||ref - test||^2) in dB (float64);
    inf when test equals ref exactly.

    Example:
        >>> round(sqnr_db(torch.ones(100), torch.full((100,), 1.5)), 3)
        6.021
    """
    ref = torch.as_tensor(ref).double()
    test = torch.as_tensor(test).double()
    if ref.shape != test.shape:
        raise ValueError(f"sqnr_db: shapes differ, {list(ref.shape)} vs {list(test.shape)}")
    noise = (ref - test).pow(2).sum().item()
    if noise == 0:
        return math.inf
    signal = ref.pow(2).sum().item()
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def pair_absmax(w: torch.Tensor) -> torch.Tensor:
    """Per output channel, the largest |w[:, 2j]| + |w[:, 2j + 1]| over adjacent input channels
    (at each kernel tap of a convolution weight [O, I, kh, kw]): the int16 pair sums of AVX2
    u8 x s8 dot products. An odd last channel pairs with zero padding. Returns [O], int32 for
    integer codes (widened before abs: |-128| fits), fp32 for float weights."""
    a = (w.float() if w.is_floating_point() else w.int()).abs()
    a = a.reshape(w.shape[0], w.shape[1], -1)  # [O, I, taps]
    if a.shape[1] % 2:
        a = torch.nn.functional.pad(a, (0, 0, 0, 1))
    return (a[:, 0::2] + a[:, 1::2]).amax(dim=(1, 2))


def pair_limited_values(
    w: torch.Tensor, scale: torch.Tensor, qmax: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel INT values with |q[n, 2j]| + |q[n, 2j + 1]| <= limit for every
    adjacent input-channel pair (at each kernel tap of a convolution).

    Each channel's scale grows to max(scale, P / limit), P its largest |w[2j]| + |w[2j + 1]|,
    so unrounded pairs fit; where rounding both up overshoots by one, the weight that rounded
    up further is rounded down instead. Nothing clips (P >= max |w|). Cost against plain int8
    (eval/pair_limit_sqnr.py): 3.7 dB of weight SQNR on the embedded UNet (7-bit weights:
    6.0 dB), 1.6-3 dB on normal or Laplace weights; on uniform weights no better than 7-bit.

    Args:
        w: float weight [O, I, *k]; scale: [O] or [O, 1], positive.
    Returns:
        (scale shaped as given, values [O, K] float in w's flattened order)
    """
    o, i = w.shape[0], w.shape[1]
    w3 = w.reshape(o, i, -1).float()  # [O, I, taps]
    if i % 2:  # an odd last channel pairs with zero
        w3 = F.pad(w3, (0, 0, 0, 1))
    a = w3.abs()
    pair = a[:, 0::2] + a[:, 1::2]  # [O, I/2, taps]
    del a
    s = torch.maximum(scale.reshape(o).float(), pair.amax(dim=(1, 2)) / limit)  # P / limit
    x = w3 / s.view(o, 1, 1)
    # Rounding adds at most 1/2 to each |x|, so a pair can overshoot only where its unrounded
    # sum is within 1 of the limit: few places, fixed by index (same arithmetic as on all).
    n, j, t = (pair / s.view(o, 1, 1) > limit - 1).nonzero(as_tuple=True)
    del pair
    ja, jb = 2 * j, 2 * j + 1
    xa, xb = x[n, ja, t], x[n, jb, t]
    q = x.round_().clamp_(-qmax, qmax)  # x is ours: rounded in place
    qa, qb = q[n, ja, t], q[n, jb, t]
    over = qa.abs() + qb.abs() > limit  # by exactly one
    down_a = over & (qa.abs() - xa.abs() >= qb.abs() - xb.abs())
    q[n, ja, t] = qa - qa.sign() * down_a
    q[n, jb, t] = qb - qb.sign() * (over & ~down_a)
    if i % 2:
        q = q[:, :i]
    return s.reshape(scale.shape).to(scale.dtype), q.reshape(o, -1)


# ----- weights as values -----


def weight_has_zero_point(fmt: str | Format) -> bool:
    """Unsigned INT weight formats are asymmetric (a zero point per scale); all others are
    symmetric."""
    fmt = _resolve_fmt(fmt)
    return fmt.kind == "int" and not fmt.signed


def scale_values(
    v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Unscaled grid values [N, K] -> ``(v - zero_point) * scale`` in fp32, per channel
    (scale [N] or [N, 1]) or per group (scale [N, G], G dividing K). The one dequantization
    every path uses (modules, simulation, kernel references), so they agree bit for bit."""
    n, k = v.shape
    s = scale.float().reshape(n, -1)
    per_group = s.shape[1] > 1
    v = v.float()
    if per_group:
        v = v.reshape(n, s.shape[1], -1)  # [N, G, K/G]
        s = s.unsqueeze(-1)
    if zero_point is not None:
        zp = zero_point.float().reshape(n, -1)
        v = v - (zp.unsqueeze(-1) if per_group else zp)
    return (v * s).reshape(n, k)


class WeightSpec(Protocol):
    """What `quantize_weight` reads from a spec (a `dq.config.LayerSpec` fits)."""

    weight: str
    weight_granularity: str
    weight_method: str
    pair_limit: int | None


@dataclass(frozen=True, eq=False)
class QWeight:
    """A weight on a format's grid: ``w ~ (values - zero_point) * scale``.

    The value handed between stages: `quantize_weight` makes it, learned rounding returns one,
    `dq.simulate` and the quantized modules (`from_qweight`) consume it without re-rounding.

    Args:
        values: fp32 [O, K] grid values on the weight flattened to [O, in * prod(k)]: integers
            in [qmin, qmax] for INT formats, members of ``fmt.grid()`` for FP formats.
        scale: fp32 [O] (per channel; a per-tensor scale is repeated) or [O, G] (groups of
            K / G inputs).
        zero_point: fp32 shaped like ``scale`` for unsigned INT formats, else None.
        fmt: the format of ``values``.
        shape: the float weight's shape [O, I, *k].
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    fmt: Format
    shape: torch.Size

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        o, k = self.shape[0], math.prod(self.shape[1:])
        if tuple(self.values.shape) != (o, k):
            raise ValueError(
                f"QWeight values have shape {list(self.values.shape)}; a weight of shape "
                f"{list(self.shape)} needs [{o}, {k}] (flattened to [out, in * prod(kernel)])"
            )
        if self.scale.dim() not in (1, 2) or self.scale.shape[0] != o or k % self.groups:
            raise ValueError(
                f"QWeight scale has shape {list(self.scale.shape)}; use [{o}] per channel or "
                f"[{o}, G] with G dividing {k}"
            )
        if weight_has_zero_point(self.fmt) != (self.zero_point is not None):
            raise ValueError(
                f"{self.fmt.name}: zero_point must be {'given' if weight_has_zero_point(self.fmt) else 'None'} "
                "(only unsigned INT weights are asymmetric)"
            )
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError("QWeight zero_point must have the shape of scale")

    @property
    def groups(self) -> int:
        """Scales per output channel (1 per channel)."""
        return 1 if self.scale.dim() == 1 else self.scale.shape[1]

    @property
    def group_size(self) -> int:
        """Inputs per scale group, 0 for per-channel scales."""
        return 0 if self.groups == 1 else math.prod(self.shape[1:]) // self.groups

    def on_grid(self) -> bool:
        """Whether every value is a grid point of the format (learned rounding must keep this)."""
        return bool(torch.equal(self.fmt.round(self.values), self.values))

    def dequantize(self) -> torch.Tensor:
        """fp32 weight [O, I, *k] the values stand for."""
        return scale_values(self.values, self.scale, self.zero_point).reshape(self.shape)


def _flat_param(p: torch.Tensor, out: int) -> torch.Tensor:
    """A `compute_qparams` scale or zero point -> [out] per channel, [out, G] per group (a
    per-tensor value is repeated per channel), fp32."""
    p = torch.as_tensor(p, dtype=torch.float32)
    p = p.reshape(1, 1).expand(out, 1) if p.numel() == 1 else p.reshape(out, -1)
    return (p[:, 0] if p.shape[1] == 1 else p).contiguous()


def quantize_weight(
    w: torch.Tensor,
    spec: WeightSpec,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> QWeight:
    """Round a float weight to its spec's grid: the only place a spec becomes numbers.

    Scales come from ``spec.weight_method`` unless given (e.g. by a scale search); with
    ``spec.pair_limit`` the per-channel scale grows just enough to meet the pair cap.

    Args:
        w: float weight [O, I, *k] (a Linear's [O, I] too).
        spec: format, granularity, scale method and pair limit (a `dq.LayerSpec`).
        scale, zero_point: precomputed parameters in the `QWeight` layout ([O] or [O, G]).

    Example:
        >>> qw = quantize_weight(torch.randn(8, 64), LayerSpec("int4", "group32"))
        >>> qw.values.abs().max() <= 7, qw.scale.shape
        (tensor(True), torch.Size([8, 2]))
    """
    fmt = _resolve_fmt(spec.weight)
    gran = parse_granularity(spec.weight_granularity)
    wf = w.detach().float()
    w2 = wf.reshape(wf.shape[0], -1)  # [O, K]
    o = w2.shape[0]
    asym = weight_has_zero_point(fmt)
    if scale is None:
        s, zp = compute_qparams(w2, fmt, gran, method=spec.weight_method, symmetric=not asym)
        s, zp = _flat_param(s, o), None if zp is None else _flat_param(zp, o)
    else:
        s = torch.as_tensor(scale, dtype=torch.float32).reshape(o, -1)
        s = s[:, 0].contiguous() if s.shape[1] == 1 else s.contiguous()
        zp = None if zero_point is None else torch.as_tensor(zero_point, dtype=torch.float32).reshape(s.shape)
        if asym and zp is None:
            raise ValueError(f"{fmt.name} weights are asymmetric: pass zero_point with scale")
    # every step below is per output channel: run it in blocks of channels
    v = torch.empty_like(w2)
    blocks = _row_blocks(o, w2.shape[1])
    if spec.pair_limit is not None:  # signed INT per channel (checked by LayerSpec)
        s = s.clone()
        for a, b in blocks:
            s[a:b], v[a:b] = pair_limited_values(wf[a:b], s[a:b], fmt.qmax, spec.pair_limit)
    else:
        g = PerGroup(w2.shape[1] // s.shape[1]) if s.dim() == 2 else PerChannel(0)
        for a, b in blocks:
            pshape = param_shape(w2[a:b].shape, g)
            v[a:b] = quantize(w2[a:b], fmt, s[a:b].reshape(pshape),
                              None if zp is None else zp[a:b].reshape(pshape), g)
    return QWeight(v, s, zp, fmt, wf.shape)


# ----- activations (per tensor, calibrated) -----


def act_params(
    fmt: str | Format, lo: float, hi: float, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor activation (scale, zero point) for a calibrated range [lo, hi].

    Unsigned INT formats are asymmetric over [min(lo, 0), max(hi, 0)] unless ``symmetric``;
    signed INT and FP formats are symmetric over max(|lo|, |hi|). ``symmetric`` with an
    unsigned format uses the signed grid of the same width (int8 for uint8), as integer
    engines do. Returns (0-dim fp32 scale, 0-dim int32 zero point or None).

    Example:
        >>> s, zp = act_params("uint8", -1.0, 3.0)
        >>> round(float(s), 6), int(zp)
        (0.015686, 64)
    """
    fmt = _resolve_fmt(fmt)
    if symmetric and isinstance(fmt, IntFormat) and not fmt.signed:
        fmt = IntFormat(f"int{fmt.bits}", fmt.bits)
    asym = isinstance(fmt, IntFormat) and not fmt.signed
    lo_t = torch.tensor([[min(float(lo), 0.0)]])
    hi_t = torch.tensor([[max(float(hi), 0.0)]])
    if not asym:
        hi_t = torch.maximum(hi_t, -lo_t)
    if not (bool(torch.isfinite(lo_t).all()) and bool(torch.isfinite(hi_t).all())):
        raise ValueError(
            f"activation range [{lo}, {hi}] is not finite; the layer never ran during "
            "calibration or saw NaN/inf"
        )
    s, zp = _qparams_from_range(lo_t, hi_t, fmt, symmetric=not asym)
    return s.reshape(()), None if zp is None else zp.reshape(())


def fake_quantize_act(
    x: torch.Tensor, fmt: str | Format, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """Activations as a layer with quantized inputs sees them, fp32, x's memory format kept:
    INT ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``, FP ``fmt.round(x / s) * s``."""
    fmt = _resolve_fmt(fmt)
    y = x.float() / scale
    if isinstance(fmt, IntFormat):
        if zero_point is not None:
            return (torch.round(y).add_(zero_point.float()).clamp_(fmt.qmin, fmt.qmax) - zero_point.float()) * scale
        return torch.round(y).clamp_(fmt.qmin, fmt.qmax) * scale
    return fmt.round(y) * scale
