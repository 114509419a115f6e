"""Number formats as data: integer and ExMy floating-point grids, and a registry of named ones.

A format knows its grid and how to round onto it, without any scale: ``fmt.round(x)`` maps a
float tensor to the nearest representable value (round-half-to-even, saturating), ``fmt.encode``
turns grid values into their integer codes / bit patterns and ``fmt.decode`` inverts it.
Scales and granularity live in :mod:`dq.quant`.

    >>> import torch, dq.formats as F
    >>> F.get("fp4_e2m1").round(torch.tensor([0.3, 2.6, 100.0])).tolist()
    [0.5, 3.0, 6.0]

FP special-value rules (``FPFormat.special``):

- ``"ieee"``:   exponent all-ones is inf (mantissa 0) or NaN (mantissa != 0); e.g. E5M2.
- ``"fn"``:     finite plus NaN: only S.1..1.1..1 is NaN, no inf; e.g. OCP E4M3FN.
- ``"finite"``: every code is a finite number (OCP MX FP6/FP4 style); the default.
- ``"fnuz"``:   finite, unsigned zero: the negative-zero code 1.0..0.0..0 is NaN, no inf.

``round`` never produces inf: values beyond ``max`` (inf included) saturate to +-max, and NaN
stays NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from dq._lazy import deferred_import

if TYPE_CHECKING:
    import torch
else:  # `dq presets` / `dq --help` read formats without paying for torch
    torch = deferred_import("torch", globals())

__all__ = [
    "IntFormat",
    "FPFormat",
    "Format",
    "register",
    "get",
    "names",
    "to_dict",
    "from_dict",
]

_SPECIALS = ("ieee", "fn", "finite", "fnuz")


def _as_float(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Returns (x in a working float dtype, dtype to return): float64 stays float64, every other
    float is computed in float32 (exact: any narrower float converts exactly) and cast back;
    integer input gives float32 output."""
    x = torch.as_tensor(x)
    if x.dtype == torch.float64:
        return x, torch.float64
    if x.is_floating_point():
        return x.float(), x.dtype
    return x.float(), torch.float32


@dataclass(frozen=True)
class IntFormat:
    """A b-bit integer grid: signed two's complement [-2**(b-1), 2**(b-1)-1] or unsigned [0, 2**b-1].

    Args:
        name: registry name, e.g. "int4".
        bits: 2..8.
        signed: two's complement range if True, else unsigned.

    Example:
        >>> IntFormat("int4", 4).round(torch.tensor([2.5, 9.0])).tolist()
        [2.0, 7.0]
    """

    name: str
    bits: int
    signed: bool = True
    kind: str = field(default="int", init=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"IntFormat needs a non-empty name, got {self.name!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(
                f"IntFormat {self.name!r}: bits={self.bits!r} is out of range; use 2..8"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def min(self) -> float:
        return float(self.qmin)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype that stores codes natively (int8 / uint8), else None."""
        if self.bits == 8:
            return torch.int8 if self.signed else torch.uint8
        return None

    @property
    def storage(self) -> str:
        """How codes are stored: "packed4" (two per uint8) for <= 4 bits, else "int8" / "uint8"."""
        if self.bits <= 4:
            return "packed4"
        return "int8" if self.signed else "uint8"

    def grid(self) -> torch.Tensor:
        """Every representable value, ascending, float32 [2**bits]."""
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round half to even, then clamp to [qmin, qmax]; NaN stays NaN.

        Args:
            x: float tensor (no scale applied).
        """
        x, out_dtype = _as_float(x)
        return torch.round(x).clamp_(self.qmin, self.qmax).to(out_dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values -> the integers themselves, int8 (signed) or uint8 (unsigned).

        Args:
            x: float tensor whose values are already on the grid (see ``round``).
        """
        x, _ = _as_float(x)
        bad = ~((x == torch.round(x)) & (x >= self.qmin) & (x <= self.qmax))
        if bool(bad.any()):
            raise ValueError(
                f"{self.name}.encode: {int(bad.sum())} value(s) are not integers in "
                f"[{self.qmin}, {self.qmax}] (e.g. {x[bad].flatten()[0].item()}); "
                f"round them first with {self.name}.round(x)"
            )
        return x.to(torch.int8 if self.signed else torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes -> float32 values (inverse of ``encode``)."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point():
            raise ValueError(f"{self.name}.decode expects integer codes, got {codes.dtype}")
        c = codes.to(torch.int32)
        if bool(((c < self.qmin) | (c > self.qmax)).any()):
            raise ValueError(
                f"{self.name}.decode: codes outside [{self.qmin}, {self.qmax}]; "
                "pass codes produced by encode"
            )
        return c.float()


@dataclass(frozen=True)
class FPFormat:
    """A signed ExMy floating-point grid: 1 sign bit, ``exp_bits`` exponent, ``man_bits`` mantissa.

    Value of code (s, E, M): E > 0: (-1)**s * (1 + M / 2**m) * 2**(E - bias);
    E == 0 (subnormal): (-1)**s * M / 2**m * 2**(1 - bias). Special codes follow ``special``
    (see the module docstring). A custom ``bias`` shifts the whole range by a power of two:
    that is how a clipping maximum is chosen (Chen et al. 2024).

    Args:
        name: registry name, e.g. "fp4_e2m1".
        exp_bits: exponent bits, >= 1.
        man_bits: mantissa bits, >= 0.
        bias: exponent bias; None means the IEEE default 2**(exp_bits-1) - 1.
        special: "ieee" | "fn" | "finite" | "fnuz".

    Example:
        >>> FPFormat("e2m1", 2, 1).grid().tolist()[7:]
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int | None = None
    special: str = "finite"
    kind: str = field(default="fp", init=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FPFormat needs a non-empty name, got {self.name!r}")
        e, m = self.exp_bits, self.man_bits
        if not isinstance(e, int) or e < 1:
            raise ValueError(f"FPFormat {self.name!r}: exp_bits={e!r} must be an int >= 1")
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"FPFormat {self.name!r}: man_bits={m!r} must be an int >= 0")
        if not 2 <= 1 + e + m <= 8:
            raise ValueError(
                f"FPFormat {self.name!r}: 1 + exp_bits + man_bits = {1 + e + m} bits is out of "
                "range; use 2..8 bits in total"
            )
        if self.special not in _SPECIALS:
            raise ValueError(
                f"FPFormat {self.name!r}: special={self.special!r} is unknown; use one of {_SPECIALS}"
            )
        if self.special == "ieee" and e < 2:
            raise ValueError(
                f"FPFormat {self.name!r}: special='ieee' needs exp_bits >= 2 (exponent all-ones is "
                "reserved for inf/NaN); use special='finite'"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (e - 1)) - 1)
        if not isinstance(self.bias, int) or isinstance(self.bias, bool):
            raise ValueError(f"FPFormat {self.name!r}: bias={self.bias!r} must be an int")
        if not self.max > 0:
            raise ValueError(
                f"FPFormat {self.name!r}: special={self.special!r} leaves no positive finite "
                "value; add exponent/mantissa bits or use special='finite'"
            )
        # round() builds 2**k from float32 bits for k and -k in [emin - m, emax - m]:
        # every such power must be a normal float32.
        lo, hi = self._emin - m, self._emax - m
        if not (-126 <= lo and hi <= 127 and -126 <= -hi and -lo <= 127):
            raise ValueError(
                f"FPFormat {self.name!r}: bias={self.bias} puts the range outside float32's "
                "normal exponents; use a bias closer to the default "
                f"{(1 << (e - 1)) - 1}"
            )

    # ----- derived properties -----

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def _emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def _emax(self) -> int:
        """Exponent of the largest finite value."""
        return math.frexp(self.max)[1] - 1

    @property
    def max(self) -> float:
        """Largest finite value."""
        return _fp_values(self)[2]

    @property
    def min(self) -> float:
        """Most negative finite value (= -max)."""
        return -self.max

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self._emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals ``min_normal`` when man_bits == 0)."""
        return math.ldexp(1.0, self._emin - self.man_bits)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch float8 dtype with exactly this grid and these bit patterns, else None."""
        key = (self.exp_bits, self.man_bits, self.bias, self.special)
        name = {
            (4, 3, 7, "fn"): "float8_e4m3fn",
            (5, 2, 15, "ieee"): "float8_e5m2",
            (4, 3, 8, "fnuz"): "float8_e4m3fnuz",
            (5, 2, 16, "fnuz"): "float8_e5m2fnuz",
        }.get(key)
        return getattr(torch, name, None) if name else None

    @property
    def storage(self) -> str:
        """How codes are stored: a torch float8 dtype name, "packed4" (two per uint8) for <= 4
        bits, else "uint8codes" (one code per byte)."""
        if self.torch_dtype is not None:
            return str(self.torch_dtype).removeprefix("torch.")
        return "packed4" if self.bits <= 4 else "uint8codes"

    def with_bias(self, bias: int, name: str | None = None) -> FPFormat:
        """The same ExMy format with another exponent bias (range scaled by 2**(old - new)).

        Args:
            bias: the new exponent bias.
            name: name of the new format; default "<name>_b<bias>".
        """
        return replace(self, bias=bias, name=name or f"{self.name}_b{bias}")

    # ----- grid, rounding, codes -----

    def grid(self) -> torch.Tensor:
        """Every finite representable value ascending (subnormals included, a single 0), float32."""
        return _fp_tables(self)[1].clone()

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value, ties to the even code, saturating to +-max; NaN stays NaN.

        Exact: with q = 2**(max(floor(log2|x|), emin) - man_bits) the spacing of the grid
        around |x|, |x| / q is computed exactly and rounded half-to-even (for man_bits >= 1 the
        parity of |x| / q is the parity of the code; man_bits == 0 is corrected for). float32
        input to a format with a torch float8 dtype uses torch's native cast (same result).

        Args:
            x: float tensor (no scale applied). float64 is computed in float64, other floats in
               float32; the result has x's dtype.
        """
        x, out_dtype = _as_float(x)
        if x.dtype == torch.float32 and self.torch_dtype is not None:
            # native cast (RNE, exact from float32) after saturating; NaN passes through
            v = x.clamp(self.min, self.max).to(self.torch_dtype).float()
        else:
            v = self._round_exact(x)
        return v.to(out_dtype)

    def _round_exact(self, x: torch.Tensor) -> torch.Tensor:
        """Bit-level RNE onto the grid for float32 / float64 x (the reference for ``round``)."""
        m = self.man_bits
        if x.dtype == torch.float64:
            ibits, ityp, ebias = 52, torch.int64, 1023
        else:
            ibits, ityp, ebias = 23, torch.int32, 127
        a = x.abs()
        # biased exponent of a (floor(log2 a) + ebias; subnormal inputs give 0, inf/NaN the top),
        # clipped to the format's exponent range: then q = 2**(eb - ebias - m) is the grid
        # spacing around a. Temporaries are reused in place (this runs on whole weights).
        eb = (a.view(ityp) >> ibits).clamp_(self._emin + ebias, self._emax + ebias)
        y = ((2 * ebias + m) - eb).bitwise_left_shift_(ibits).view(a.dtype)  # 1 / q
        y.mul_(a)  # a / q, exact
        keep_lower = None
        if m == 0:
            # normals: y in [1, 2); a tie y == 1.5 sits between codes E and E + 1
            # (E = eb - ebias + bias): keep the lower value when E is even.
            keep_lower = (y == 1.5) & (a >= self.min_normal) & ((eb - ebias + self.bias) % 2 == 0)
        v = y.round_()
        if keep_lower is not None:
            v.masked_fill_(keep_lower, 1.0)
        v.mul_(eb.sub_(m).bitwise_left_shift_(ibits).view(a.dtype))  # r * q
        v.clamp_max_(self.max).copysign_(x)  # saturate (inf too; NaN propagates), sign back
        if self.special == "fnuz":
            v.add_(0.0)  # no negative zero: -0 + 0 = +0
        return v

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values -> uint8 bit patterns (sign | exponent | mantissa in the low ``bits`` bits).

        -0.0 keeps its sign bit (except "fnuz", which has no negative zero); NaN (and inf for
        "ieee") encode to the format's canonical pattern, keeping the sign bit where it has one.

        Args:
            x: float tensor whose values are representable (see ``round``).
        """
        x, _ = _as_float(x)
        if self.torch_dtype is not None:
            codes = x.float().to(self.torch_dtype)
            back = codes.float()
            if bool(((back == x) | (back.isnan() & x.isnan())).all()):
                return codes.view(torch.uint8)
            # else fall through to report the values that are off the grid
        pos_vals, pos_codes = _fp_tables(self)[3]
        n = self.exp_bits + self.man_bits
        a = x.abs().float()
        idx = torch.searchsorted(pos_vals, a).clamp_(max=pos_vals.numel() - 1)
        hit = pos_vals[idx] == a
        codes = pos_codes[idx]
        sign = torch.signbit(x).to(torch.uint8) << n
        nan, inf = torch.isnan(x), torch.isinf(x)
        nan_code, inf_code = self._nan_code, self._inf_code
        if self.special == "fnuz":
            sign = torch.where(a == 0, torch.zeros_like(sign), sign)
        bad = ~hit & ~nan
        if inf_code is not None:
            bad &= ~inf
        if nan_code is None:
            bad |= nan
        if bool(bad.any()):
            example = x[bad].flatten()[0].item()
            raise ValueError(
                f"{self.name}.encode: {int(bad.sum())} value(s) are not representable "
                f"(e.g. {example}); round them first with {self.name}.round(x)"
            )
        out = codes | sign
        if nan_code is not None and bool(nan.any()):
            nan_c = torch.tensor(nan_code, dtype=torch.uint8)
            if self.special != "fnuz":
                nan_c = nan_c | sign
            out = torch.where(nan, nan_c, out)
        if inf_code is not None and bool(inf.any()):
            out = torch.where(inf, torch.tensor(inf_code, dtype=torch.uint8) | sign, out)
        return out

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 bit patterns -> float32 values (inverse of ``encode``; NaN / inf where the
        format has them)."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point():
            raise ValueError(f"{self.name}.decode expects integer codes, got {codes.dtype}")
        c = codes.to(torch.int64)
        if bool(((c < 0) | (c >= (1 << self.bits))).any()):
            raise ValueError(
                f"{self.name}.decode: codes outside [0, {(1 << self.bits) - 1}]; "
                "pass codes produced by encode"
            )
        return _fp_tables(self)[0][c]

    @property
    def _nan_code(self) -> int | None:
        n, m = self.exp_bits + self.man_bits, self.man_bits
        if self.special == "fn":
            return (1 << n) - 1
        if self.special == "ieee":
            return ((1 << self.exp_bits) - 1) << m | (1 << (m - 1) if m else 0)
        if self.special == "fnuz":
            return 1 << n
        return None

    @property
    def _inf_code(self) -> int | None:
        if self.special == "ieee":
            return ((1 << self.exp_bits) - 1) << self.man_bits
        return None

    def _code_value(self, c: int) -> float:
        e, m, n = self.exp_bits, self.man_bits, self.exp_bits + self.man_bits
        s, E, M = (c >> n) & 1, (c >> m) & ((1 << e) - 1), c & ((1 << m) - 1)
        if self.special == "fnuz" and c == 1 << n:
            return math.nan
        if self.special == "fn" and c & ((1 << n) - 1) == (1 << n) - 1:
            return math.nan
        if self.special == "ieee" and E == (1 << e) - 1:
            return math.nan if M else (-math.inf if s else math.inf)
        if E == 0:
            mag = math.ldexp(M, 1 - self.bias - m)
        else:
            mag = math.ldexp((1 << m) + M, E - self.bias - m)
        return -mag if s else mag


Format = IntFormat | FPFormat


@functools.cache
def _fp_values(fmt: FPFormat):
    """(value of every code [2**bits], finite values ascending, max, (code, value) of the
    non-negative finite values ascending) as plain Python numbers: a format is defined and
    checked without torch."""
    n = fmt.exp_bits + fmt.man_bits
    values = [fmt._code_value(c) for c in range(1 << fmt.bits)]
    finite = sorted({v for v in values if math.isfinite(v)})
    pos = sorted((v, c) for c, v in enumerate(values[: 1 << n]) if math.isfinite(v))
    return values, finite, max(finite), pos


@functools.cache
def _fp_tables(fmt: FPFormat):
    """(value of every code float32 [2**bits], finite grid ascending float32, max,
    (non-negative finite values ascending float32, their codes uint8))."""
    values, finite, fmax, pos = _fp_values(fmt)
    table = torch.tensor(values, dtype=torch.float32)
    pos_vals = torch.tensor([v for v, _ in pos], dtype=torch.float32)
    pos_codes = torch.tensor([c for _, c in pos], dtype=torch.uint8)
    return table, torch.tensor(finite, dtype=torch.float32), fmax, (pos_vals, pos_codes)


# ----- registry -----

_REGISTRY: dict[str, Format] = {}


def register(fmt: Format, overwrite: bool = False) -> Format:
    """Add a format to the registry under ``fmt.name`` and return it.

    Args:
        fmt: an IntFormat or FPFormat.
        overwrite: replace an existing, different format of the same name.
    """
    if not isinstance(fmt, IntFormat | FPFormat):
        raise ValueError(f"register expects an IntFormat or FPFormat, got {type(fmt).__name__}")
    old = _REGISTRY.get(fmt.name)
    if old is not None and old != fmt and not overwrite:
        raise ValueError(
            f"format {fmt.name!r} is already registered as {old}; pick another name "
            "or pass overwrite=True"
        )
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str | Format) -> Format:
    """The registered format called ``name`` (a format passes through unchanged).

    Example:
        >>> get("int4").qmax
        7
    """
    if isinstance(name, IntFormat | FPFormat):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(names())}") from None


def names() -> list[str]:
    """Names of all registered formats, in registration order."""
    return list(_REGISTRY)


def to_dict(fmt: Format) -> dict:
    """A JSON-ready dict of the format's fields (``kind`` included)."""
    return asdict(fmt)


def from_dict(d: dict) -> Format:
    """Inverse of ``to_dict``."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind == "int":
        return IntFormat(**d)
    if kind == "fp":
        return FPFormat(**d)
    raise ValueError(f"format dict needs kind 'int' or 'fp', got {kind!r}")


# ----- registered formats -----

for _b in range(2, 9):
    register(IntFormat(f"int{_b}", _b))  # [-2**(b-1), 2**(b-1)-1], e.g. int8 -128..127, int4 -8..7
    register(IntFormat(f"uint{_b}", _b, signed=False))  # [0, 2**b-1], e.g. uint8 0..255

FP8_E4M3 = register(FPFormat("fp8_e4m3", 4, 3, special="fn"))  # OCP E4M3FN: +-448, min 2**-9
FP8_E5M2 = register(FPFormat("fp8_e5m2", 5, 2, special="ieee"))  # IEEE-like: +-57344, min 2**-16
FP6_E3M2 = register(FPFormat("fp6_e3m2", 3, 2))  # OCP MX: +-28, min 0.0625
FP6_E2M3 = register(FPFormat("fp6_e2m3", 2, 3))  # OCP MX: +-7.5, min 0.125
FP5_E2M2 = register(FPFormat("fp5_e2m2", 2, 2))  # finite: +-7, min 0.25
FP5_E3M1 = register(FPFormat("fp5_e3m1", 3, 1))  # finite: +-24, min 0.125
FP4_E2M1 = register(FPFormat("fp4_e2m1", 2, 1))  # OCP MX / NVFP4 element: +-6, min 0.5
FP4_E3M0 = register(FPFormat("fp4_e3m0", 3, 0))  # finite, bias 3: 0, +-2**-2 .. +-16 (powers of 2)
FP3_E2M0 = register(FPFormat("fp3_e2m0", 2, 0))  # finite, bias 1: 0, +-1, +-2, +-4
