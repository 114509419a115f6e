"""Fast CPU implementations of the `torch.ops.dq` kernels (backend "cpu").

W8A8 / W4A8: integer GEMMs through oneDNN (the engine behind inductor's x86 quantization):

    q = quantize_act(x)                                   uint8 codes, one fused pass
    y = onednn.qlinear_pointwise / qconv2d_pointwise(q, w_packed)
      = s_x * s_w[n] * sum_k (q[m,k] - zp) * w[n,k] + b[n]   fp32 out, int32 accumulation

- Weights are reordered once into oneDNN's blocked int8 layout and kept in `PACK_CACHE`, keyed
  weakly by the weight's storage and checked against its version counter. Memory: one extra byte
  per weight (a packed 4-bit weight is unpacked to int8 first: W4A8 runs from 1 byte/weight on
  top of its 0.5-byte codes). `clear_cache()` drops every entry.
- Exactness. With VNNI / AMX (avx512_vnni, avx_vnni, amx_int8) u8 x s8 products accumulate in
  int32 and the engine is exact. On plain AVX2 (this project's dev machine) `vpmaddubsw` adds
  *pairs* of u8 x s8 products in int16 with saturation. The pairs are adjacent input channels
  (k = 2j, 2j + 1; for a convolution, at the same kernel tap -- tests/test_kernels_cpu.py checks
  this on adversarial weights), so a call is exact while q_max * P <= 32767, where
  P = max |w[n, 2j]| + |w[n, 2j + 1]| is the weight's largest pair sum (cached per weight).
  Weights quantized with `LayerSpec(pair_limit=128)` (the "w8a8" preset), 7-bit or 4-bit
  weights have P <= 128 and run once for any uint8 codes. Otherwise, when a call's codes exceed
  the bound, they are split exactly, q = min(q, T) + (q - min(q, T)), and the engine runs twice
  (the second time with zero point 0) -- exact, at about twice the integer cost
  (eval/bench_kernels.py measures both).
- Per-group weight scales (W4A8 per group) have no integer engine here: reference fallback.

Weight-only (blocked dequantize-and-matmul): output channels are processed in blocks of
`wonly_block_rows` rows; each block is dequantized to fp32 and multiplied, so the full fp32
weight never exists (peak extra memory: one block, `WONLY_BLOCK_BYTES` (linear) or
`WONLY_CONV_BLOCK_BYTES` (conv) or `WONLY_MIN_ROWS` rows, plus its decode temporaries). Codes are decoded
with one table gather per byte (`F.embedding` on a 256-entry table, both nibbles at once).
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from dq.kernels import reference
from dq.kernels.ops import OP_NAMES, register_impl
from dq.quant import pair_absmax, unpack_int4

ONEDNN_INT8 = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.onednn, "qlinear_pointwise"
)
# Weight-only blocks: about *_BLOCK_BYTES of fp32 weight, never fewer than WONLY_MIN_ROWS output
# channels. Measured on this CPU (eval/bench_kernels.py, 1 thread): GEMMs get faster as blocks
# grow (thin blocks re-read the input per block; 2x4096x1280->1280 int4: 256 rows 0.80x of
# fp32, whole weight 0.98x), so linear blocks are large and only SD's biggest weights
# (5120x1280) are split; convolutions prefer ~256-row blocks (1280x1280x3x3 @16: 256 rows
# 0.86x, whole 0.56x -- large fp32 blocks are slow to reorder for oneDNN).
WONLY_BLOCK_BYTES = 16 * 1024 * 1024  # linear
WONLY_CONV_BLOCK_BYTES = 4 * 1024 * 1024  # conv2d
WONLY_MIN_ROWS = 256


# ----------------------------------------------------------------------------- prepack cache


class PackCache:
    """Values derived from a weight tensor (e.g. its oneDNN-packed copy), computed once.

    Keyed weakly by the weight's storage, which every alias shares (the module's buffer, a
    `reshape` view made anew each forward, the detached aliases torch.compile passes), so an
    entry dies with its weight; each view geometry gets its own slot, validated with the
    version counter, so an in-place update (`copy_`, `load_state_dict`) repacks on the next call.
    """

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, w: torch.Tensor, key: tuple, make) -> object:
        """The value `make()` built for (`w`, `key`), rebuilt if `w` was written since."""
        storage = w.untyped_storage()
        slot = (key, w.data_ptr(), tuple(w.shape), tuple(w.stride()))
        per_storage = self._entries.get(storage)
        if per_storage is None:
            per_storage = self._entries[storage] = {}
        hit = per_storage.get(slot)
        if hit is not None and hit[0] == _version(w):
            return hit[1]
        value = make()
        per_storage[slot] = (_version(w), value)
        return value

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()

    def drop(self, w: torch.Tensor) -> None:
        """Forget every value derived from `w`'s storage."""
        self._entries.pop(w.untyped_storage(), None)

    def nbytes(self, weights: list[torch.Tensor] | None = None) -> int:
        """Bytes held by cached tensors (what the cache costs on top of the weights), for
        every cached weight or only for those derived from `weights`."""
        total = 0
        if weights is None:
            total += sum(t.nelement() * t.element_size() for t in list(HELD_PACKED))
            groups = list(self._entries.values())
        else:
            groups = [self._entries.get(w.untyped_storage()) for w in weights]
            groups = [g for g in groups if g is not None]
        for per_storage in groups:
            for _, value in per_storage.values():
                for t in value if isinstance(value, tuple) else (value,):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be modified)
        return -1


PACK_CACHE = PackCache()
# packed weights that replaced a layer's codes (held by the layer, counted by `nbytes`)
HELD_PACKED: weakref.WeakSet = weakref.WeakSet()


def clear_cache() -> None:
    """Drop every prepacked weight (e.g. before measuring memory)."""
    PACK_CACHE.clear()


# ----------------------------------------------------------------------------- activations


def quantize_act(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """fp32 x -> uint8 codes clamp(round(x / s) + zp, 0, 255) in one vectorised pass.

    Uses ATen's quantizer (`quantize_per_tensor`, 2-3x faster than the elementwise chain),
    which rounds zp + x * (1/s): at exact ties this can differ from `reference.quantize_act`
    by one code. Falls back to the reference formula where that quantizer is unavailable.
    Keeps x's memory format.
    """
    x = x.float()
    try:
        with warnings.catch_warnings():  # silence its deprecation notice: we keep plain uint8
            warnings.simplefilter("ignore", UserWarning)
            return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr()
    except (AttributeError, RuntimeError):
        return reference.quantize_act(x, torch.tensor(scale), torch.tensor(zero_point))


def _act_qparams(x, x_scale, x_zero_point) -> tuple[float, int]:
    s, zp = reference.act_qparams(x, x_scale, x_zero_point)
    return float(s), int(zp)


# ----------------------------------------------------------------------------- W8A8


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# u8 x s8 dot products accumulate straight into int32 (no saturating int16 pair sums)
INT32_DOT_PRODUCTS = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def safe_code_max(pair_max: int) -> int:
    """Largest activation code for which the engine is exact when every adjacent input-channel
    pair of weights has |w[2j]| + |w[2j + 1]| <= pair_max (see `dq.quant.pair_absmax`)."""
    if INT32_DOT_PRODUCTS or pair_max == 0:
        return 255
    return min(255, 32767 // pair_max)  # 255 up to 128, 129 for int8 pairs of 127 + 127


def _int8_codes(w: torch.Tensor, k: int) -> torch.Tensor:
    """int8 codes as given, or packed signed 4-bit codes unpacked to int8 [N, k]."""
    if w.dtype == torch.int8:
        return w
    return (unpack_int4(w.reshape(w.shape[0], -1))[:, :k].to(torch.int8) - 8).contiguous()


def _per_channel(w_scale: torch.Tensor, n: int) -> torch.Tensor | None:
    """fp32 [N] contiguous, or None when the scale is per group."""
    s = w_scale.reshape(n, -1)
    return s.reshape(n).float().contiguous() if s.shape[1] == 1 else None


def _bias_f32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float().contiguous()


def _pack_linear(w: torch.Tensor, k: int) -> torch.Tensor:
    """int8 / packed 4-bit codes -> oneDNN's blocked int8 weight (an opaque mkldnn tensor)."""
    return torch.ops.onednn.qlinear_prepack(_int8_codes(w, k), None)


def _pack_conv(
    w: torch.Tensor, shape: list[int], s_w: torch.Tensor, stride, padding, dilation, groups
) -> torch.Tensor:
    w4 = _int8_codes(w, shape[1] * shape[2] * shape[3]).reshape(shape)
    # the activation scale / zero point given here are not baked in: each call passes its own
    return torch.ops.onednn.qconv_prepack(w4, s_w, 1.0, 0, stride, padding, dilation, groups, None)


def _weight_info(w: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, int]:
    """(zero weight zero points [N] int64, largest pair sum `pair_absmax`), cached per weight
    of logical shape [N, K] (linear) or [O, I, kh, kw] (conv)."""

    def make():
        k = math.prod(shape[1:])
        codes = _int8_codes(w, k).reshape(shape)
        return torch.zeros(shape[0], dtype=torch.int64), int(pair_absmax(codes).max())

    return PACK_CACHE.get(w, ("info", tuple(shape)), make)


def _exact_engine_sum(q: torch.Tensor, zero_point: int, bias, code_max: int, run) -> torch.Tensor:
    """run(codes, zero_point, bias) on q, split into two exact runs when codes exceed code_max:
    q = min(q, T) + (q - min(q, T)), the second run with zero point 0 and no bias."""
    if code_max >= 255 or q.numel() == 0 or int(q.max()) <= code_max:
        return run(q, zero_point, bias)  # (no reduction over q when every code is safe)
    q_lo = q.clamp(max=code_max)
    y = run(q_lo, zero_point, bias)
    y += run(q - q_lo, 0, None)  # q - q_lo <= 255 - T <= T: exact too
    return y


def _qlinear(q: torch.Tensor, xs: float, xz: int, w, k: int, s_w, bias) -> torch.Tensor:
    """uint8 codes [M, K] x int8 weight [N, K] -> fp32 [M, N] (exact, see module docstring)."""
    w2 = w.reshape(w.shape[0], -1)
    packed = PACK_CACHE.get(w2, ("qlinear", k), lambda: _pack_linear(w2, k))
    _, pair_max = _weight_info(w2, [w2.shape[0], k])
    return _qlinear_packed(q, xs, xz, packed, pair_max, s_w, bias)


def _qlinear_packed(q, xs: float, xz: int, packed, pair_max: int, s_w, bias) -> torch.Tensor:
    w_zp = torch.zeros(s_w.shape[0], dtype=torch.int64)

    def run(codes, zp, b):
        return torch.ops.onednn.qlinear_pointwise(
            codes, xs, zp, packed, s_w, w_zp, b, 1.0, 0, torch.float32, "none", [], ""
        )

    return _exact_engine_sum(q, xz, _bias_f32(bias), safe_code_max(pair_max), run)


def linear_w8a8(x, w, w_scale, bias=None, x_scale=None, x_zero_point=None):
    """oneDNN u8 x s8 GEMM with fp32 output; per-channel scales only (else NotImplemented)."""
    n, k = w.shape[0], x.shape[-1]
    s_w = _per_channel(w_scale, n)
    if not ONEDNN_INT8 or s_w is None:
        return NotImplemented
    xs, xz = _act_qparams(x, x_scale, x_zero_point)
    q = quantize_act(x.reshape(-1, k), xs, xz)
    y = _qlinear(q, xs, xz, w, k, s_w, bias)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def conv2d_w8a8(
    x, w, w_scale, bias, x_scale, x_zero_point, stride, padding, dilation, groups, weight_shape=None
):
    """oneDNN u8 x s8 direct convolution with fp32 channels_last output (a pointwise conv runs
    as a GEMM over the channels_last pixels, which measured faster)."""
    shape = list(w.shape) if w.dim() == 4 else list(weight_shape)
    n, k = shape[0], shape[1] * shape[2] * shape[3]
    s_w = _per_channel(w_scale, n)
    if not ONEDNN_INT8 or s_w is None:
        return NotImplemented
    geo = (list(stride), list(padding), list(dilation), groups)
    xs, xz = _act_qparams(x, x_scale, x_zero_point)
    q = quantize_act(x, xs, xz)
    if shape[2:] == [1, 1] and geo == ([1, 1], [0, 0], [1, 1], 1):
        b, _, h, wd = x.shape
        q2 = q.permute(0, 2, 3, 1).reshape(-1, k)  # [B*H*W, C], a view for channels_last x
        y = _qlinear(q2, xs, xz, w, k, s_w, bias).reshape(b, h, wd, n).permute(0, 3, 1, 2)
        return y.to(x.dtype)
    key = ("qconv", *map(tuple, geo[:3]), groups)
    packed = PACK_CACHE.get(w, key, lambda: _pack_conv(w, shape, s_w, *geo))
    _, pair_max = _weight_info(w, shape)
    return _qconv_packed(q, xs, xz, packed, pair_max, s_w, bias, geo).to(x.dtype)


def _qconv_packed(q, xs: float, xz: int, packed, pair_max: int, s_w, bias, geo) -> torch.Tensor:
    q = q.contiguous(memory_format=torch.channels_last)
    w_zp = torch.zeros(s_w.shape[0], dtype=torch.int64)

    def run(codes, zp, b):
        return torch.ops.onednn.qconv2d_pointwise(
            codes, xs, zp, packed, s_w, w_zp, b, *geo, 1.0, 0, torch.float32, "none", [], ""
        )

    y = _exact_engine_sum(q, xz, _bias_f32(bias), safe_code_max(pair_max), run)
    return y.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- one copy
# A layer that runs on the engine may hand its codes over: `take_packed` returns the packed
# weight (which then replaces the codes in the layer), `run_packed` runs from it and
# `unpack_codes` gives the int8 codes back exactly (oneDNN's reorder to the plain layout).


def is_conv_packed(weight_shape, geo) -> bool:
    """Whether a conv of this geometry runs on the qconv engine (else as a GEMM)."""
    return not (list(weight_shape[2:]) == [1, 1] and geo == ([1, 1], [0, 0], [1, 1], 1))


def take_packed(w: torch.Tensor, weight_shape, s_w, geo=None) -> tuple[torch.Tensor, int]:
    """(packed weight, largest pair sum) of engine codes `w`, from the cache (built if absent);
    the cache entries of `w` are dropped (the caller keeps the packed weight)."""
    shape = list(weight_shape)
    k = math.prod(shape[1:])
    if geo is not None and is_conv_packed(shape, geo):
        packed = _pack_conv(w, shape, s_w.reshape(-1).float().contiguous(), *geo)
        _, pair_max = _weight_info(w, shape)
    else:
        w2 = w.reshape(w.shape[0], -1)
        packed = PACK_CACHE.get(w2, ("qlinear", k), lambda: _pack_linear(w2, k))
        _, pair_max = _weight_info(w2, [w2.shape[0], k])
    PACK_CACHE.drop(w)
    HELD_PACKED.add(packed)
    return packed, pair_max


def unpack_codes(packed: torch.Tensor, weight_shape, geo=None) -> torch.Tensor:
    """int8 codes [N, K] the packed weight was made from (exact)."""
    n = weight_shape[0]
    if geo is not None and is_conv_packed(list(weight_shape), geo):
        return packed.to_dense().reshape(n, -1).contiguous()
    return packed.to_dense().t().contiguous()  # qlinear_prepack holds [K, N]


def run_packed(x, packed, pair_max, s_w, bias, x_scale, x_zero_point, geo=None, conv=False):
    """The W8A8 op of `linear_w8a8` / `conv2d_w8a8` from a packed weight."""
    xs, xz = _act_qparams(x, x_scale, x_zero_point)
    s_w = s_w.reshape(-1).float().contiguous()
    n = s_w.shape[0]
    if not conv:
        k = x.shape[-1]
        q = quantize_act(x.reshape(-1, k), xs, xz)
        y = _qlinear_packed(q, xs, xz, packed, pair_max, s_w, bias)
        return y.reshape(*x.shape[:-1], n).to(x.dtype)
    q = quantize_act(x, xs, xz)
    if packed.dim() == 2:  # a pointwise conv, run as a GEMM over channels_last pixels
        b, c, h, wd = x.shape
        q2 = q.permute(0, 2, 3, 1).reshape(-1, c)
        y = _qlinear_packed(q2, xs, xz, packed, pair_max, s_w, bias)
        return y.reshape(b, h, wd, n).permute(0, 3, 1, 2).to(x.dtype)
    y = _qconv_packed(q, xs, xz, packed, pair_max, s_w, bias, geo)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- weight-only


def wonly_block_rows(k: int, n: int, block_bytes: int) -> int:
    """Output channels per dequantized block: ~`block_bytes` of fp32 rows of `k` values, a
    multiple of 16, at least WONLY_MIN_ROWS, at most n."""
    rows = max(WONLY_MIN_ROWS, block_bytes // (4 * k) // 16 * 16)
    return min(rows, n)


def _code_table(
    qdata: torch.Tensor, k: int, lut: torch.Tensor | None, bits: int, has_zp: bool
) -> torch.Tensor | None:
    """Byte -> values table for a table-lookup decode: [256, 2] for packed 4-bit codes (both
    nibbles), [256, 1] for one code per byte (uint8 codes, float8 bit patterns); None for int8."""
    if qdata.dtype == torch.int8:
        return None
    byte = torch.arange(256, dtype=torch.uint8)
    if qdata.dtype in reference.FLOAT8_DTYPES:
        return byte.view(qdata.dtype).float().unsqueeze(1)  # every float8 bit pattern, exact
    if reference.is_packed(qdata, k, bits):
        values = lut.float()[:16] if lut is not None else torch.arange(16.0) - (0 if has_zp else 8)
        return torch.stack((values[(byte & 0x0F).long()], values[(byte >> 4).long()]), dim=1)
    values = lut.float()[:256] if lut is not None else torch.arange(256.0)
    table = torch.full((256, 1), float("nan"))  # codes beyond the lut decode to NaN, visibly
    table[: values.numel(), 0] = values
    return table


def _decode_rows(qdata: torch.Tensor, k: int, table: torch.Tensor | None) -> torch.Tensor:
    """Codes of a block of rows -> unscaled fp32 values [rows, k] (one gather per byte; the
    same values as `reference.weight_values`)."""
    if table is None:
        return qdata.float()
    rows = qdata.shape[0]
    v = F.embedding(qdata.view(torch.uint8).int(), table)  # [rows, bytes, 1 or 2]
    return v.reshape(rows, -1)[:, :k]


def _dequant_rows(qdata, scale, zero_point, table, k, r0, r1) -> torch.Tensor:
    """fp32 [r1 - r0, k]: rows r0:r1 of the dequantized weight, scaled in place (the maths of
    `reference.scale_values`, without a second block-sized temporary)."""
    n, rows = qdata.shape[0], r1 - r0
    v = _decode_rows(qdata[r0:r1], k, table).contiguous()  # a fresh tensor we own
    s = reference.scale_per_k(scale.reshape(n, -1)[r0:r1], rows, k)
    vg = v.view(rows, s.shape[1], -1) if s.dim() == 3 else v  # [rows, G, K/G] per group
    if zero_point is not None:
        vg.sub_(reference.scale_per_k(zero_point.reshape(n, -1)[r0:r1], rows, k))
    vg.mul_(s)
    return v


def linear_wonly(x, qdata, scale, zero_point=None, bias=None, lut=None, bits=8, group_size=0):
    """y = x @ W.T + b, W dequantized block by block (never whole)."""
    n, k = qdata.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    y = x2.new_empty((x2.shape[0], n))
    table = _code_table(qdata, k, lut, bits, zero_point is not None)
    rows = wonly_block_rows(k, n, WONLY_BLOCK_BYTES)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        wb = _dequant_rows(qdata, scale, zero_point, table, k, r0, r1)  # [rows, K]
        if bias is None:
            torch.mm(x2, wb.t(), out=y[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1].float(), x2, wb.t(), out=y[:, r0:r1])
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def conv2d_wonly(
    x,
    qdata,
    scale,
    zero_point,
    bias,
    lut,
    weight_shape,
    stride,
    padding,
    dilation,
    groups,
    bits=8,
    group_size=0,
):
    """conv2d with the weight dequantized in blocks of whole groups of output channels."""
    o, cg, kh, kw = weight_shape
    k = cg * kh * kw
    q2 = qdata.reshape(o, -1)
    og = o // groups  # output channels per group
    rows = wonly_block_rows(k, o, WONLY_CONV_BLOCK_BYTES)
    per_block = rows if groups == 1 else max(1, rows // og) * og  # grouped: whole groups
    xf = x.float().contiguous(memory_format=torch.channels_last)
    table = _code_table(q2, k, lut, bits, zero_point is not None)
    outs = []
    for r0 in range(0, o, per_block):
        r1 = min(r0 + per_block, o)
        wb = _dequant_rows(q2, scale, zero_point, table, k, r0, r1).reshape(r1 - r0, cg, kh, kw)
        wb = wb.contiguous(memory_format=torch.channels_last)  # oneDNN's fast fp32 weight order
        bb = None if bias is None else bias[r0:r1].float()
        if groups == 1:
            outs.append(F.conv2d(xf, wb, bb, stride, padding, dilation, 1))
        else:  # the block's groups see their own input channels
            g0, g1 = r0 // og, r1 // og
            xg = xf[:, g0 * cg : g1 * cg]
            outs.append(F.conv2d(xg, wb, bb, stride, padding, dilation, g1 - g0))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.to(x.dtype, memory_format=torch.channels_last)


def _register() -> None:
    impls = {
        "linear_w8a8": linear_w8a8,
        "conv2d_w8a8": conv2d_w8a8,
        "linear_wonly": linear_wonly,
        "conv2d_wonly": conv2d_wonly,
    }
    for op in OP_NAMES:
        register_impl(op, "cpu", "cpu", impls[op])


_register()
