"""Triton GPU kernels for dq's quantized ops (the CUDA backend of `torch.ops.dq.*`).

Four GEMMs, each a Triton kernel behind a thin wrapper with the op's signature:

- `linear_w8a8`, INT8 weights: activations quantized per tensor to uint8 (a small kernel, or fused
  into the GEMM prologue with `fuse_quant=True`), int8 x int8 -> int32 `tl.dot`, and an epilogue
  applying activation scale x per-channel weight scale, the zero-point correction and the bias.
- `linear_w8a8`, packed INT4 weights (W4A8): the same GEMM, the weight tile unpacked from two 4-bit
  codes per byte to int8 in registers; per-channel or per-group scales (per group: each K block's
  int32 partial product is scaled and summed in fp32).
- `linear_wonly` (W4A16, W8A16, FP-coded weight-only): codes (packed 4-bit, one code per byte,
  int8) decoded in-kernel, scaled per channel (epilogue) or per group (in the tile), cast to
  fp16/bf16 and multiplied with 16-bit activations (fp32 activations are cast to fp16 in the
  kernel). A 16-entry table that is an INT table (code - 8 or code) is decoded by subtraction;
  any other table of <= 16 entries (FP4) is loaded once and held in registers, one copy per
  tile column, and read with `tl.gather` (warp shuffles); larger tables (FP5/FP6 byte codes)
  by an L1-cached global gather `lut[code]`.
- `linear_wonly`, FP8 weights (float8_e4m3fn / float8_e5m2): the same kernel, the tile cast from
  fp8 to fp16 directly (exact), the per-channel scale applied in the epilogue. GPUs before
  sm_89 have no e4m3 conversions: there the bit patterns are decoded through a 256-entry table.

The maths (exact, and what the tests check):

    W8A8   q   = clamp(rne(x / s_x) + zp, 0, 255)       uint8 codes, IEEE division, ties to even
           a   = q - 128                                  stored as int8 (symmetric int8 storage)
           acc = sum_k a[m,k] * w[n,k]                    int32, exact
           y   = s_x * s_w[n] * (acc + (128 - zp) * sum_k w[n,k]) + b[n]
               = s_x * s_w[n] * sum_k (q[m,k] - zp) * w[n,k] + b[n]
    per group g (W4A8):
           y   = s_x * (sum_g s_w[n,g] acc_g + (128 - zp) sum_g s_w[n,g] sum_{k in g} w[n,k]) + b[n]
    W-only w[n,k] = (value(code[n,k]) - zp[n,g]) * s[n,g]; value = lut[code] or code - offset
           y   = x @ w.T + b, x and the scaled tile in fp16 (or bf16 / fp32), fp32 accumulation

`zp` is the uint8 zero point; zp = None means 128 (symmetric int8 on the same engine) and
s_x = None a dynamic symmetric scale max|x| / 127, as in `dq.kernels.reference`. Division is
`div_rn` (IEEE, as torch's `x / s` with a device tensor s) and rne is fp32 `(v + 1.5*2**23) -
1.5*2**23`, so the codes equal torch's `round(x / s)` bit for bit. The row sums `sum_k w[n,k]`
(and the INT-table check) are computed once per weight tensor and cached, keyed weakly by the
tensor and invalidated by in-place writes. Outputs are in x.dtype by default.

Conv2d is an im2col GEMM (`_im2col`): the padded input is viewed with `as_strided` as
[B*Ho*Wo, C*kh*kw] in the weight's (c, kh, kw) order and copied once (for W8A8 after quantizing,
so the copy moves int8 and zero padding becomes the code of 0.0), then the GEMM above; the output
is returned in channels_last memory order. Grouped convolutions loop over groups. The im2col copy
costs kh*kw times the input in memory traffic; an implicit-GEMM kernel would avoid it.

Importing this module registers every wrapper as backend "triton" of the `torch.ops.dq` ops on
CUDA (`register`); cases the kernels do not cover raise `Unsupported`, which the registered
adapters turn into `NotImplemented` so the op falls back.

Under `TRITON_INTERPRET=1` (tests on CPU) every kernel runs one small tile config; on a GPU the
kernels autotune over a few Hopper/Ada tile shapes. The interpreter handles fp8 tensors natively,
so no upcast is needed there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from dq.kernels.reference import act_qparams
from dq.quant import unpack_int4

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Unsupported(ValueError):
    """A valid input these kernels do not cover (the op falls back to another backend)."""


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------------------- tile configs


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
    )


if INTERPRET:
    # one small config: multi-tile grids and K loops at test shapes, seconds not minutes
    _INT8_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    _WONLY_CONFIGS = _INT8_CONFIGS
else:
    # Hopper (wgmma) / Ada (mma.sync) tiles for SD-sized GEMMs (M >= 1024); int8 wants deep K
    # blocks, in-register dequantization fewer live registers. Four each: every config costs a
    # compile per specialization, and configs too big for a GPU's shared memory are skipped.
    _INT8_CONFIGS = [
        _cfg(128, 128, 128, 8, 3),
        _cfg(128, 256, 128, 8, 3),
        _cfg(128, 128, 64, 4, 4),
        _cfg(64, 128, 128, 4, 4),
    ]
    _WONLY_CONFIGS = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 32, 4, 4),
        _cfg(64, 128, 64, 4, 4),
    ]


def _block_k_for_groups(args: dict) -> int:
    """Per-group scales need K blocks that never straddle a group: cap BLOCK_K (from the tile
    config) at the largest power of two dividing the group size. A heuristic, not a pruning
    hook, so it also holds when the autotuner has a single config and skips pruning."""
    if not args["PER_GROUP"]:
        return args["BLOCK_K"]
    g = int(args["GROUP_K"])
    return min(args["BLOCK_K"], g & -g)


# ---------------------------------------------------------------------------- jit helpers


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles: GROUP_M row tiles share each column sweep."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _quantize_u8_shifted(x, s, zp):
    """fp32 x -> int8 holding clamp(rne(x / s) + zp, 0, 255) - 128 (s fp32, zp fp32 scalars)."""
    v = tl.math.div_rn(x, s)  # IEEE division, as torch's x / s
    v = tl.minimum(tl.maximum(v, -1024.0), 1024.0)  # keeps the trick below exact; clamp absorbs it
    r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: fp32 addition rounds half to even
    q = tl.minimum(tl.maximum(r + zp, 0.0), 255.0)
    return (q - 128.0).to(tl.int8)


@triton.jit
def _unpack_nibbles(p):
    """uint8 [BN, BK/2] (byte j = code[2j] | code[2j+1] << 4) -> uint8 codes [BK, BN]."""
    lo = p & 0xF
    hi = p >> 4
    codes = tl.join(lo, hi)  # [BN, BK/2, 2]
    codes = tl.reshape(codes, (p.shape[0], 2 * p.shape[1]))  # [BN, BK], k = 2j + t
    return tl.trans(codes)


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, xs_ptr, xzp_ptr, numel, BLOCK: tl.constexpr):
    """Elementwise: q = clamp(rne(x / s) + zp, 0, 255) - 128 as int8 (contiguous x, q)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    s = tl.load(xs_ptr).to(tl.float32)
    zp = tl.load(xzp_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + offs, _quantize_u8_shifted(x, s, zp), mask=mask)


@triton.autotune(
    configs=_INT8_CONFIGS,
    key=["M", "N", "K", "GROUP_K", "A_FLOAT", "PACKED", "PER_GROUP", "OUT_ACC"],
)
@triton.heuristics({"BLOCK_K": _block_k_for_groups})
@triton.jit
def _w8a8_kernel(
    a_ptr,
    b_ptr,
    ws_ptr,
    corr_ptr,
    bias_ptr,
    xs_ptr,
    xzp_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP_K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_sn,
    stride_om,
    stride_on,
    A_FLOAT: tl.constexpr,  # a is float x (quantized here) instead of int8 q - 128
    PACKED: tl.constexpr,  # b is uint8 [N, ceil(K/2)] holding 4-bit codes, value = code - W_OFFSET
    W_OFFSET: tl.constexpr,
    PER_GROUP: tl.constexpr,  # ws is [N, K / GROUP_K]; corr is fp32 sum_g ws * rowsum_g
    HAS_BIAS: tl.constexpr,
    OUT_ACC: tl.constexpr,  # store the corrected int32 accumulator (tests), per-channel only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    xs = tl.load(xs_ptr).to(tl.float32)
    zp = tl.load(xzp_ptr).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_mask = m_ok[:, None] & (kk[None, :] < K)
        a = tl.load(
            a_ptr + rm64[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0
        )
        if A_FLOAT:
            a = _quantize_u8_shifted(a.to(tl.float32), xs, zp.to(tl.float32))
            a = tl.where(a_mask, a, 0).to(tl.int8)  # padding must add nothing
        if PACKED:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(
                b_ptr + rn64[:, None] * stride_bn + kb[None, :] * stride_bk,
                mask=n_ok[:, None] & (kb[None, :] < (K + 1) // 2),
                other=0,
            )  # [BN, BK/2]
            b = _unpack_nibbles(p).to(tl.int8) - W_OFFSET  # [BK, BN]; k >= K meets a == 0
        else:
            b = tl.load(
                b_ptr + kk[:, None] * stride_bk + rn64[None, :] * stride_bn,
                mask=(kk[:, None] < K) & n_ok[None, :],
                other=0,
            )  # [BK, BN]
        if PER_GROUP:
            part = tl.dot(a, b, out_dtype=tl.int32)
            s_w = tl.load(ws_ptr + rn64 * stride_sn + k0 // GROUP_K, mask=n_ok, other=0.0)
            accf += part.to(tl.float32) * s_w[None, :]
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    shift = 128 - zp  # a = q - 128, so q - zp = a + shift
    out_ptrs = out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PER_GROUP:
        corr = tl.load(corr_ptr + rn, mask=n_ok, other=0.0)  # fp32 sum_g s_w[n,g] * rowsum_g[n]
        y = (accf + shift.to(tl.float32) * corr[None, :]) * xs
    else:
        rowsum = tl.load(corr_ptr + rn, mask=n_ok, other=0)  # int32 sum_k w[n,k]
        acc = acc + shift * rowsum[None, :]
        s_w = tl.load(ws_ptr + rn64 * stride_sn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * (xs * s_w)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if OUT_ACC:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=_WONLY_CONFIGS,
    key=["M", "N", "K", "GROUP_K", "PACKED", "USE_LUT", "HAS_ZP", "CODE_OFFSET", "PER_GROUP"],
)
@triton.heuristics({"BLOCK_K": _block_k_for_groups})
@triton.jit
def _wonly_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    zp_ptr,
    lut_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP_K,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_om,
    stride_on,
    PACKED: tl.constexpr,  # q is uint8 [N, ceil(K/2)] with two 4-bit codes per byte
    USE_LUT: tl.constexpr,  # value = lut[code] (fp32 table), else value = code - CODE_OFFSET
    LUT_SIZE: tl.constexpr,  # entries (power of two); <= 16: held in registers, else L1 gather
    HAS_ZP: tl.constexpr,  # value -= zp[n, g] (zp laid out like the scale)
    CODE_OFFSET: tl.constexpr,
    PER_GROUP: tl.constexpr,  # scale [N, K / GROUP_K] applied in the tile, else [N] in the epilogue
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.float16 / tl.bfloat16 / tl.float32 (IEEE)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_LUT:
        if LUT_SIZE <= 16:  # the table, loaded once, one copy per column: gathers are shuffles
            lut = tl.load(lut_ptr + tl.arange(0, LUT_SIZE))
            lut_cols = tl.broadcast_to(lut[:, None], (LUT_SIZE, BLOCK_N))
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            x_ptr + rm64[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_ok[:, None] & (kk[None, :] < K),
            other=0.0,
        ).to(DOT_DTYPE)  # [BM, BK], zero beyond K so padded codes add nothing
        if PACKED:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(
                q_ptr + rn64[:, None] * stride_qn + kb[None, :] * stride_qk,
                mask=n_ok[:, None] & (kb[None, :] < (K + 1) // 2),
                other=0,
            )
            codes = _unpack_nibbles(p)  # uint8 [BK, BN]
        else:
            b_mask = (kk[:, None] < K) & n_ok[None, :]
            # no `other`: fp8 has no integer fill value; masked entries are zeroed below
            codes = tl.load(
                q_ptr + kk[:, None] * stride_qk + rn64[None, :] * stride_qn, mask=b_mask
            )
        if USE_LUT:
            # masked lanes hold garbage: the mask keeps every index inside the table
            idx = codes.to(tl.int32) & (LUT_SIZE - 1)
            if LUT_SIZE <= 16:
                w = tl.gather(lut_cols, idx, 0)  # w[k, n] = lut[idx[k, n]], fp32 [BK, BN]
            else:
                w = tl.load(lut_ptr + idx)  # fp32; the small table stays in L1
        else:
            w = codes.to(DOT_DTYPE)  # exact for int8, 4-bit codes and fp8
            if CODE_OFFSET != 0:
                w = w - CODE_OFFSET
            if not PACKED:
                w = tl.where(b_mask, w, 0.0)  # k >= K: never let an fp8 NaN pattern meet a zero
        if HAS_ZP or PER_GROUP:
            g = k0 // GROUP_K
            w = w.to(tl.float32)
            if HAS_ZP:
                w = w - tl.load(zp_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0)[None, :]
            if PER_GROUP:
                w = w * tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0)[None, :]
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(DOT_DTYPE), acc)

    if not PER_GROUP:
        acc = acc * tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


# ---------------------------------------------------------------------------- host helpers


def _grid(meta, M: int, N: int):
    return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] (a view when the leading dims flatten)."""
    return x.reshape(-1, x.shape[-1])


def _int_codes(w: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """int8 [N, K] or packed uint8 [N, ceil(K/2)] -> int32 [N, K] weight values."""
    if w.dtype == torch.uint8:
        return unpack_int4(w.reshape(w.shape[0], -1))[:, :k].to(torch.int32) - offset
    return w.to(torch.int32)


_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight tensor -> {key: (stamp, value)}


def _cached(t: torch.Tensor, key: tuple, make):
    """A value derived from `t`, computed once; keyed weakly by the tensor object (dies with it)
    and rebuilt when `t` is written in place (version counter, data pointer)."""
    stamp = (t._version, t.data_ptr(), tuple(t.shape))
    per_tensor = _DERIVED.setdefault(t, {})
    hit = per_tensor.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = make()
    per_tensor[key] = (stamp, value)
    return value


def weight_row_sums(w: torch.Tensor, k: int, group_size: int = 0, offset: int = 8) -> torch.Tensor:
    """Sum of the integer weight values per output channel (or per channel and group).

    Args:
        w: int8 [N, K] or packed uint8 [N, ceil(K/2)] (4-bit codes, value = code - offset).
        k: the number of inputs K.
        group_size: 0 for per-channel sums [N], else sums per group [N, K / group_size].
        offset: code offset of packed weights (8 for signed int4).

    Returns:
        int32 [N] or [N, groups]; cached on `w` until `w` is written.
    """

    def make():
        vals = _int_codes(w, k, offset)  # [N, K]
        if group_size:
            vals = vals.reshape(vals.shape[0], -1, group_size)
        return vals.sum(dim=-1, dtype=torch.int32)

    return _cached(w, ("rowsum", k, group_size, offset), make)


def _lut_as_offset(lut: torch.Tensor) -> int | None:
    """o when the 16-entry table is lut[c] = c - o (INT codes: o = 8 signed, 0 unsigned), else
    None. Checked once per table tensor (one device sync), then cached."""

    def make():
        if lut.numel() != 16:
            return None
        codes = torch.arange(16, device=lut.device, dtype=torch.float32)
        for o in (8, 0):
            if torch.equal(lut.float(), codes - o):
                return o
        return None

    return _cached(lut, ("offset",), make)


_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _device_constant(name: str, device: torch.device, make) -> torch.Tensor:
    """A constant tensor copied to `device` once (no host-to-device copy per call, or inside a
    CUDA graph capture)."""
    if (name, device) not in _ON_DEVICE:
        _ON_DEVICE[name, device] = make().to(device)
    return _ON_DEVICE[name, device]


def e4m3_table() -> torch.Tensor:
    """fp32 [256]: the value of every float8_e4m3fn bit pattern (for GPUs before sm_89)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _no_native_e4m3(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def _lut_table(lut: torch.Tensor) -> torch.Tensor:
    """fp32 contiguous table padded with zeros to a power-of-two length (cached per tensor)."""

    def make():
        t = lut.to(torch.float32).reshape(-1).contiguous()
        size = triton.next_power_of_2(t.numel())
        return t if size == t.numel() else torch.cat([t, t.new_zeros(size - t.numel())])

    return _cached(lut, ("table",), make)


def _check_act_params(x_scale, x_zero_point, x: torch.Tensor):
    """0-dim device tensors (fp32 scale, int32 zero point); None scale = dynamic symmetric int8
    (the one rule of `dq.kernels.reference.act_qparams`)."""
    if x_scale is None:
        x_zero_point = None  # dynamic: symmetric, zero point 128 on the uint8 engine
    if x_zero_point is None:  # a device constant: no host-to-device copy per call (CUDA graphs)
        x_zero_point = _device_constant("zp128", x.device, lambda: torch.tensor(128, dtype=torch.int32))
    if x_scale is not None:
        x_scale = torch.as_tensor(x_scale, dtype=torch.float32, device=x.device)
        if x_zero_point is not None:
            x_zero_point = torch.as_tensor(x_zero_point, device=x.device)
        if x_scale.numel() != 1 or (x_zero_point is not None and x_zero_point.numel() != 1):
            raise ValueError(
                f"activation scale/zero point must be per-tensor (one element), got shapes "
                f"{list(x_scale.shape)} / {list(getattr(x_zero_point, 'shape', []))}; pass 0-dim tensors"
            )
    return act_qparams(x, x_scale, x_zero_point)


def _check_device(x: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(
                f"all tensors must be on {x.device}, got one on {t.device}; move the layer and "
                "its input to the same device"
            )


def _scale_layout(
    scale: torch.Tensor, n: int, k: int, group_size: int, min_block: int
) -> tuple[torch.Tensor, int, bool]:
    """Scale -> (fp32 [N, groups] contiguous, GROUP_K, per_group); a group must hold a K block
    of at least `min_block` (tensor-core K: 32 for int8, 16 for fp16) and a power of two."""
    s = scale.to(torch.float32).reshape(n, -1).contiguous()
    groups = s.shape[1]
    if groups == 1:
        return s, k, False
    g = group_size or k // groups
    if g * groups != k:
        raise ValueError(
            f"scale has {groups} groups per channel but K={k} and group_size={group_size}; pass a "
            "scale of shape [N] (per channel) or [N, K / group_size]"
        )
    if g & -g < min_block:
        raise Unsupported(
            f"group size {g} is not a multiple of {min_block}, which the tensor-core tiles need; "
            "use a group size such as 32, 64 or 128, or per-channel scales"
        )
    return s, g, True


# ---------------------------------------------------------------------------- public wrappers


def quantize_act(
    x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor
) -> torch.Tensor:
    """Quantize activations per tensor to uint8 codes, stored shifted as int8.

    Args:
        x: float tensor (any shape, fp32/fp16/bf16).
        x_scale: 0-dim fp32 scale s.
        x_zero_point: 0-dim int zero point zp in [0, 255].

    Returns:
        int8 tensor shaped like x holding clamp(rne(x / s) + zp, 0, 255) - 128.

    Example:
        >>> q = quantize_act(x, torch.tensor(0.1, device=x.device), torch.tensor(128, device=x.device))
    """
    _check_device(x, x_scale, x_zero_point)
    x_scale, x_zero_point = _check_act_params(x_scale, x_zero_point, x)
    # elementwise over memory order: keep a dense NCHW or channels_last layout as it is
    dense = x.is_contiguous() or (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )
    xc = x if dense else x.contiguous()
    q = torch.empty_like(xc, dtype=torch.int8)  # same strides as xc
    block = 1024
    _quant_act_kernel[(triton.cdiv(xc.numel(), block),)](
        xc, q, x_scale, x_zero_point, xc.numel(), BLOCK=block
    )
    return q


def linear_w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
    *,
    group_size: int = 0,
    w_offset: int = 8,
    out_dtype: torch.dtype | None = None,
    fuse_quant: bool = False,
    x_is_quantized: bool = False,
    return_acc: bool = False,
) -> torch.Tensor:
    """y = dequant(quant(x)) @ dequant(w).T + bias with an int8 tensor-core GEMM (W8A8 / W4A8).

    Args:
        x: float [..., K] activations (or, with `x_is_quantized`, int8 q - 128 from `quantize_act`).
        w: int8 [N, K] weight codes, or uint8 [N, ceil(K/2)] packed 4-bit codes (low nibble first,
            value = code - w_offset).
        w_scale: fp32 [N] per-channel, or [N, K / group_size] per-group weight scales.
        bias: [N] or None.
        x_scale: 0-dim activation scale; None quantizes dynamically (symmetric, max|x| / 127).
        x_zero_point: 0-dim uint8 zero point; None means 128 (symmetric int8).
        group_size: K per scale group when `w_scale` is 2-D (0 infers it from the shape).
        w_offset: code offset of packed weights (8 = signed int4).
        out_dtype: output dtype (default: x's float dtype, fp32 for quantized x).
        fuse_quant: quantize x inside the GEMM prologue instead of a separate pass.
        x_is_quantized: x already holds int8 q - 128 (e.g. an im2col of quantized codes).
        return_acc: return the corrected int32 accumulator sum_k (q - zp) * w (per-channel only).

    Returns:
        [..., N] in `out_dtype` (int32 with `return_acc`).

    Example:
        >>> y = linear_w8a8(x.half(), qlinear.qdata, qlinear.scale, qlinear.bias,
        ...                 qlinear.input_scale, qlinear.input_zero_point)
    """
    _check_device(x, w, w_scale, bias, x_scale, x_zero_point)
    k = x.shape[-1]
    n = w.shape[0]
    packed = w.dtype == torch.uint8
    if w.dim() != 2 or w.dtype not in (torch.int8, torch.uint8):
        raise ValueError(
            f"w must be int8 [N, K] or packed uint8 [N, ceil(K/2)], got {w.dtype} {list(w.shape)}; "
            "flatten conv weights to [out, in*kh*kw] first"
        )
    if packed and w.shape[1] == k and k > 1:
        raise Unsupported(
            "uint8 weights one code per byte (unsigned 5-8-bit formats) do not fit the int8 GEMM; "
            "use a signed INT weight format for W8A8, or the reference backend"
        )
    if w.shape[1] != ((k + 1) // 2 if packed else k):
        raise ValueError(
            f"weight {list(w.shape)} ({w.dtype}) does not match K={k} inputs; expected "
            f"[N, {(k + 1) // 2 if packed else k}]"
        )
    if x_is_quantized and (x.dtype != torch.int8 or fuse_quant):
        raise ValueError("x_is_quantized needs int8 x (from quantize_act) and fuse_quant=False")
    if not x_is_quantized and not x.is_floating_point():
        raise ValueError(
            f"x must be a float tensor, got {x.dtype}; pass x_is_quantized=True for codes"
        )
    if x_is_quantized and x_scale is None:
        raise ValueError("pre-quantized x needs its x_scale (and x_zero_point)")
    s_w, gk, per_group = _scale_layout(w_scale, n, k, group_size, min_block=32)
    if return_acc and per_group:
        raise ValueError("return_acc is only defined for per-channel scales; pass a [N] w_scale")
    x_scale, x_zero_point = _check_act_params(x_scale, x_zero_point, x)
    if out_dtype is None:
        out_dtype = torch.float32 if x_is_quantized else x.dtype

    x2 = _as_2d(x)
    m = x2.shape[0]
    if x_is_quantized or fuse_quant:
        a = x2
    else:
        a = quantize_act(x2, x_scale, x_zero_point)
    rowsum = weight_row_sums(w, k, gk if per_group else 0, w_offset)
    corr = (s_w * rowsum.float()).sum(dim=1) if per_group else rowsum.reshape(n)
    b_arg = bias if bias is not None else s_w  # dummy pointer when HAS_BIAS is False
    out = torch.empty((m, n), dtype=torch.int32 if return_acc else out_dtype, device=x.device)
    _w8a8_kernel[lambda meta: _grid(meta, m, n)](
        a,
        w,
        s_w,
        corr,
        b_arg,
        x_scale,
        x_zero_point,
        out,
        m,
        n,
        k,
        gk,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        s_w.stride(0),
        out.stride(0),
        out.stride(1),
        A_FLOAT=fuse_quant,
        PACKED=packed,
        W_OFFSET=w_offset if packed else 0,
        PER_GROUP=per_group,
        HAS_BIAS=bias is not None,
        OUT_ACC=return_acc,
    )
    return out.reshape(*x.shape[:-1], n)


def linear_wonly(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lut: torch.Tensor | None = None,
    bits: int = 8,
    group_size: int = 0,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x @ dequant(qdata).T + bias with weights decoded inside the GEMM (weight-only).

    Args:
        x: float [..., K] activations.
        qdata: weight codes: int8 [N, K] (INT <= 8 bits); float8_e4m3fn / float8_e5m2 [N, K];
            uint8 [N, K] one code per byte (decoded through `lut`); or, when bits <= 4, uint8
            [N, ceil(K/2)] with two codes per byte, low nibble first (uint8 of any other shape
            is one code per byte).
        scale: fp32 [N] per channel or [N, K / group_size] per group.
        zero_point: None, or float laid out like `scale`: w = (value - zero_point) * scale.
        bias: [N] or None.
        lut: fp32 table code -> value (16 entries for 4-bit, 2**bits for byte codes); without it
            packed codes are signed int4 stored with offset 8 (offset 0 when a zero point is
            given) and uint8 codes one per byte are their own (unsigned) values.
        bits: bits per code (<= 4 means packed when qdata is uint8 [N, ceil(K/2)]).
        group_size: K per scale group when `scale` is 2-D (0 infers it).
        out_dtype: output dtype (default x.dtype).
        compute_dtype: dtype of the tensor-core product: fp16 (default for fp32/fp16 x), bf16
            (default for bf16 x) or fp32 (IEEE, slow; for checks).

    Returns:
        [..., N] in `out_dtype`.

    Example:
        >>> y = linear_wonly(x.half(), qlinear.qdata, qlinear.scale, None, qlinear.bias,
        ...                  qlinear.lut, bits=4, group_size=64)
    """
    _check_device(x, qdata, scale, zero_point, bias, lut)
    k = x.shape[-1]
    n = qdata.shape[0]
    packed = qdata.dtype == torch.uint8 and bits <= 4 and qdata.shape[1] == (k + 1) // 2
    if qdata.dim() != 2 or qdata.dtype not in (torch.int8, torch.uint8, *_FP8):
        raise ValueError(
            f"qdata must be a 2-D int8, uint8 or float8 tensor, got {qdata.dtype} "
            f"{list(qdata.shape)}; flatten conv weights to [out, in*kh*kw] first"
        )
    if not packed and qdata.shape[1] != k:
        raise ValueError(
            f"qdata {list(qdata.shape)} ({qdata.dtype}, bits={bits}) does not match K={k} inputs; "
            f"expected [N, {k}] or, packed 4-bit, [N, {(k + 1) // 2}]"
        )
    if lut is not None and qdata.dtype != torch.uint8:
        lut = None  # int8 / fp8 codes are their own values
    if qdata.dtype == torch.float8_e4m3fn and _no_native_e4m3(x.device):
        # before sm_89 there are no e4m3 conversions: decode the bit patterns by table
        qdata, lut = qdata.view(torch.uint8), _device_constant("e4m3", x.device, e4m3_table)
    s, gk, per_group = _scale_layout(scale, n, k, group_size, min_block=16)
    zp = None
    if zero_point is not None:
        zp = zero_point.to(torch.float32).reshape(s.shape).contiguous()
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16
    if compute_dtype not in _TL_DTYPE:
        raise ValueError(f"compute_dtype must be fp16, bf16 or fp32, got {compute_dtype}")
    if out_dtype is None:
        out_dtype = x.dtype
    if lut is not None and packed:
        lut_offset = _lut_as_offset(lut)
        if lut_offset is not None:  # INT table: decode by subtraction, no gather
            lut, offset = None, lut_offset
        else:
            offset = 0
    else:
        offset = 8 if (packed and lut is None and zp is None) else 0
    lut_arg = _lut_table(lut) if lut is not None else s

    x2 = _as_2d(x)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    _wonly_kernel[lambda meta: _grid(meta, m, n)](
        x2,
        qdata,
        s,
        zp if zp is not None else s,
        lut_arg,
        bias if bias is not None else s,
        out,
        m,
        n,
        k,
        gk,
        x2.stride(0),
        x2.stride(1),
        qdata.stride(0),
        qdata.stride(1),
        s.stride(0),
        out.stride(0),
        out.stride(1),
        PACKED=packed,
        USE_LUT=lut is not None,
        LUT_SIZE=lut_arg.numel(),
        HAS_ZP=zp is not None,
        CODE_OFFSET=offset,
        PER_GROUP=per_group,
        HAS_BIAS=bias is not None,
        DOT_DTYPE=_TL_DTYPE[compute_dtype],
    )
    return out.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------- conv2d (im2col)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_out_hw(h, w, kernel, stride, padding, dilation) -> tuple[int, int]:
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def _im2col(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """[B, C, H, W] (already padded unless padding is given) -> [B*Ho*Wo, C*kh*kw], K in the
    weight's (c, kh, kw) order; one strided copy (a free view for 1x1, stride 1, channels_last)."""
    kh, kw = kernel
    if any(padding):
        x = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    b, c, h, w = x.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if (kh, kw) == (1, 1) and stride == (1, 1):
        return x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when x is channels_last
    sb, sc, sh, sw = x.stride()  # any strides (NCHW or channels_last): the view below is exact
    cols = x.as_strided(
        (b, ho, wo, c, kh, kw),
        (sb, sh * stride[0], sw * stride[1], sc, sh * dilation[0], sw * dilation[1]),
    )
    return cols.reshape(b * ho * wo, c * kh * kw)


def _conv_groups(x, n_out, groups, run_group):
    """Split channels into groups, run the 2-D GEMM per group, concatenate output channels."""
    if groups == 1:
        return run_group(x, 0)
    cg = x.shape[1] // groups
    og = n_out // groups
    return torch.cat(
        [run_group(x[:, g * cg : (g + 1) * cg], g * og) for g in range(groups)], dim=-1
    )


def conv2d_w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    weight_shape: list[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantized conv2d as quantize -> int8 im2col -> int8 GEMM (W8A8, or W4A8 with packed w).

    Args:
        x: float [B, C, H, W].
        w: int8 [O, C/groups, kh, kw], or 2-D codes [O, C/groups*kh*kw] (int8) / packed uint8
            [O, ceil(C/groups*kh*kw/2)] together with `weight_shape`.
        w_scale: fp32 [O] (or [O, groups_k] per group) weight scales.
        bias, x_scale, x_zero_point: as in `linear_w8a8`.
        stride, padding, dilation, groups: as in `torch.nn.functional.conv2d` (int padding).
        weight_shape: [O, C/groups, kh, kw] when w is 2-D.
        out_dtype: output dtype (default x.dtype).

    Returns:
        [B, O, Ho, Wo] in channels_last memory order.

    Example:
        >>> y = conv2d_w8a8(x.half(), qconv.qdata, qconv.scale, qconv.bias, qconv.input_scale,
        ...                 qconv.input_zero_point, 1, 1, 1, 1)
    """
    shape = list(w.shape) if w.dim() == 4 else weight_shape
    if shape is None or len(shape) != 4:
        raise ValueError("2-D conv weight codes need weight_shape=[O, C/groups, kh, kw]")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    o, kernel = shape[0], (shape[2], shape[3])
    w2 = w.reshape(o, -1)
    x_scale, x_zero_point = _check_act_params(x_scale, x_zero_point, x)
    out_dtype = out_dtype or x.dtype
    b, _, h, wd = x.shape
    ho, wo = _conv_out_hw(h, wd, kernel, stride, padding, dilation)
    # quantize the padded input once, so padding holds the code of 0.0, then im2col int8 codes
    if any(padding):
        x = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    xq = quantize_act(x, x_scale, x_zero_point)
    og = o // groups
    s2 = w_scale.reshape(o, -1)

    def run_group(xg, o0):
        cols = _im2col(xg, kernel, stride, (0, 0), dilation)
        sl = slice(o0, o0 + og)
        return linear_w8a8(
            cols,
            w2[sl],
            s2[sl],
            None if bias is None else bias[sl],
            x_scale,
            x_zero_point,
            x_is_quantized=True,
            out_dtype=out_dtype,
        )

    y = _conv_groups(xq, o, groups, run_group)  # [B*Ho*Wo, O]
    return y.reshape(b, ho, wo, o).permute(0, 3, 1, 2)


def conv2d_wonly(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    lut: torch.Tensor | None,
    weight_shape: list[int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bits: int = 8,
    group_size: int = 0,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weight-only quantized conv2d as float im2col -> `linear_wonly` GEMM.

    Args:
        x: float [B, C, H, W].
        qdata, scale, zero_point, bias, lut, bits, group_size: as in `linear_wonly`, on the
            flattened weight [O, C/groups*kh*kw].
        weight_shape: [O, C/groups, kh, kw].
        stride, padding, dilation, groups: as in `torch.nn.functional.conv2d` (int padding).

    Returns:
        [B, O, Ho, Wo] in channels_last memory order.

    Example:
        >>> y = conv2d_wonly(x.half(), qc.qdata, qc.scale, None, qc.bias, qc.lut,
        ...                  list(qc.weight_shape), 1, 1, 1, 1, bits=4, group_size=0)
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    o, kernel = weight_shape[0], (weight_shape[2], weight_shape[3])
    q2 = qdata.reshape(o, -1)
    b, _, h, wd = x.shape
    ho, wo = _conv_out_hw(h, wd, kernel, stride, padding, dilation)
    og = o // groups
    s2 = scale.reshape(o, -1)
    zp2 = None if zero_point is None else zero_point.reshape(o, -1)

    def run_group(xg, o0):
        sl = slice(o0, o0 + og)
        cols = _im2col(xg, kernel, stride, padding, dilation)
        return linear_wonly(
            cols,
            q2[sl],
            s2[sl],
            None if zp2 is None else zp2[sl],
            None if bias is None else bias[sl],
            lut,
            bits,
            group_size,
            out_dtype=out_dtype or x.dtype,
            compute_dtype=compute_dtype,
        )

    y = _conv_groups(x, o, groups, run_group)
    return y.reshape(b, ho, wo, o).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- op registration


def _on_device(fn):
    """Backend adapter: run `fn` on the input's GPU; decline (NotImplemented) what it can't do."""

    def impl(**kwargs):
        x = kwargs["x"]
        try:
            if x.is_cuda:
                with torch.cuda.device(x.device):
                    return fn(**kwargs)
            return fn(**kwargs)
        except Unsupported:
            return NotImplemented

    impl.__name__ = impl.__qualname__ = f"triton_{fn.__name__}"
    impl.__doc__ = fn.__doc__
    return impl


OPS = {
    "linear_w8a8": _on_device(linear_w8a8),
    "conv2d_w8a8": _on_device(conv2d_w8a8),
    "linear_wonly": _on_device(linear_wonly),
    "conv2d_wonly": _on_device(conv2d_wonly),
}


def register(device_type: str = "cuda") -> None:
    """Register these kernels as backend "triton" of every `torch.ops.dq` op on `device_type`.

    Args:
        device_type: "cuda" (done on import); "cpu" only makes sense under TRITON_INTERPRET=1,
            where tests route the ops through the interpreter.

    Example:
        >>> register("cpu")  # in a TRITON_INTERPRET=1 process
        >>> with dq.kernels.use_backend("triton"):
        ...     y = torch.ops.dq.linear_w8a8(x, w, w_scale, None, x_scale, x_zero_point)
    """
    from dq.kernels.ops import register_impl

    for op, fn in OPS.items():
        register_impl(op, device_type, "triton", fn)


register("cuda")
