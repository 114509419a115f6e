"""Plain-PyTorch references of the `torch.ops.dq` kernels: dequantize, then compute in fp32.

These functions *define* the maths every fast kernel approximates; tests compare each fast
implementation against them. They assume already-validated inputs (`dq.kernels.ops` validates
before dispatching). All of them compute in fp32 and return `x.dtype`.

Activation quantization (W8A8), per tensor onto uint8:

    q  = clamp(round(x / s) + zp, 0, 255)          round half to even, IEEE division
    x' = (q - zp) * s

with a static calibrated `s`, `zp`; `zp = None` means 128 (symmetric int8 expressed on the uint8
engine); `s = None` means dynamic symmetric: `s = max|x| / 127`, `zp = 128`.

Weight codes -> values (both W8A8 and weight-only):

    int8 [N, K]                  the codes are the values (INT formats of any width <= 8)
    float8 [N, K]                the codes are the values (float8_e4m3fn / float8_e5m2)
    uint8 [N, ceil(K/2)]         two 4-bit codes per byte, low nibble first (when bits <= 4):
                                 value = lut[code], or code - 8 (signed int4) without a lut,
                                 or the code itself without a lut but with a zero point
    uint8 [N, K]                 one code per byte: value = lut[code], or the code itself
    w = (value - zero_point) * scale,   scale [N] / [N, 1] per channel or [N, K / g] per group
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dq import quant
from dq.quant import unpack_int4

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SYMMETRIC_ZERO_POINT = 128  # symmetric int8 activations on the uint8 engine: q_u8 = q_s8 + 128


# ----------------------------------------------------------------------------- activations


def dynamic_act_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-tensor symmetric activation scale max|x| / 127 (0-dim fp32, >= 1e-8)."""
    return (x.detach().abs().amax().float() / 127.0).clamp_min(1e-8)


def act_qparams(
    x: torch.Tensor, x_scale: torch.Tensor | None, x_zero_point: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve (scale, zero point) of activations: static, symmetric static, or dynamic.

    Returns:
        (0-dim fp32 scale, 0-dim int32 zero point) on x's device.
    """
    if x_scale is None:
        x_scale = dynamic_act_scale(x)
    if x_zero_point is None:
        x_zero_point = torch.tensor(SYMMETRIC_ZERO_POINT, dtype=torch.int32, device=x.device)
    return x_scale.float().reshape(()), x_zero_point.to(torch.int32).reshape(())


def quantize_act(
    x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor
) -> torch.Tensor:
    """fp32 x -> uint8 codes clamp(round(x / s) + zp, 0, 255), same shape and memory format."""
    q = torch.round(x.float() / x_scale) + x_zero_point.float()
    return q.clamp_(0, 255).to(torch.uint8)


def fake_quantize_act(
    x: torch.Tensor, x_scale: torch.Tensor | None, x_zero_point: torch.Tensor | None
) -> torch.Tensor:
    """x -> (q - zp) * s in fp32: the activation the W8A8 kernels actually multiply
    (`dq.quant.fake_quantize_act` on the uint8 grid, the rule every path shares)."""
    s, zp = act_qparams(x, x_scale, x_zero_point)
    return quant.fake_quantize_act(x, "uint8", s, zp)


# ----------------------------------------------------------------------------- weights


def is_packed(qdata: torch.Tensor, k: int, bits: int) -> bool:
    """Whether `qdata` holds two 4-bit codes per byte for a K=`k` weight."""
    return qdata.dtype == torch.uint8 and bits <= 4 and qdata.shape[-1] == (k + 1) // 2 != k


def weight_values(
    qdata: torch.Tensor, k: int, lut: torch.Tensor | None, bits: int, has_zero_point: bool
) -> torch.Tensor:
    """Weight codes (any storage, see module docstring) -> unscaled fp32 values [N, k]."""
    if qdata.dtype != torch.uint8:  # int8 / float8: the codes are the values
        return qdata.float()
    codes = unpack_int4(qdata)[:, :k] if is_packed(qdata, k, bits) else qdata
    if lut is not None:
        return lut.float()[codes.long()]
    offset = 8 if is_packed(qdata, k, bits) and not has_zero_point else 0
    return codes.float() - offset


def scale_per_k(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Scale or zero point [N] / [N, 1] / [N, G] -> fp32 broadcastable against [N, K]:
    [N, 1] per channel, or [N, G, 1] against the weight viewed as [N, G, K / G]."""
    t = t.float().reshape(n, -1)
    return t if t.shape[1] == 1 else t.unsqueeze(-1)


scale_values = quant.scale_values  # (v - zero_point) * scale, the one dequantization rule


def dequantize_weight(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    lut: torch.Tensor | None,
    bits: int,
    k: int,
) -> torch.Tensor:
    """Weight codes -> fp32 [N, k]: w = (value - zero_point) * scale (per channel or group).

    Args:
        qdata: codes, see the module docstring for the storage layouts.
        scale: [N], [N, 1] or [N, G] with G dividing k.
        zero_point: None or laid out like `scale`.
        lut: fp32 code -> value table for uint8 codes, or None.
        bits: bits per code (<= 4 with uint8 [N, ceil(k/2)] means packed).
        k: inputs per output channel.

    Example:
        >>> dequantize_weight(torch.tensor([[0x21]], dtype=torch.uint8), torch.ones(1), None, None, 4, 2)
        tensor([[-7., -6.]])
    """
    v = weight_values(qdata, k, lut, bits, zero_point is not None)  # [N, K]
    return scale_values(v, scale, zero_point)


def w8a8_weight(w: torch.Tensor, w_scale: torch.Tensor, k: int) -> torch.Tensor:
    """W8A8/W4A8 weight (int8 codes, or packed signed int4 = code - 8) -> fp32 [N, k]."""
    return dequantize_weight(
        w.reshape(w.shape[0], -1), w_scale, None, None, 4 if w.dtype == torch.uint8 else 8, k
    )


# ----------------------------------------------------------------------------- ops


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float()


def linear_w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = fq(x) @ (w * w_scale).T + bias: x [..., K] -> [..., N] in x.dtype."""
    k = x.shape[-1]
    y = F.linear(
        fake_quantize_act(x, x_scale, x_zero_point), w8a8_weight(w, w_scale, k), _bias(bias)
    )
    return y.to(x.dtype)


def conv2d_w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    x_zero_point: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight_shape: list[int] | None = None,
) -> torch.Tensor:
    """conv2d(fq(x), w * w_scale) + bias: [B, C, H, W] -> [B, O, Ho, Wo], channels_last."""
    shape = list(w.shape) if w.dim() == 4 else list(weight_shape)
    k = shape[1] * shape[2] * shape[3]
    wf = w8a8_weight(w, w_scale, k).reshape(shape)
    xq = fake_quantize_act(x, x_scale, x_zero_point)
    y = F.conv2d(xq, wf, _bias(bias), stride, padding, dilation, groups)
    return y.to(x.dtype, memory_format=torch.channels_last)


def linear_wonly(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lut: torch.Tensor | None = None,
    bits: int = 8,
    group_size: int = 0,
) -> torch.Tensor:
    """y = x @ dequantize_weight(...).T + bias in fp32: x [..., K] -> [..., N] in x.dtype."""
    k = x.shape[-1]
    w = dequantize_weight(qdata, scale, zero_point, lut, bits, k)
    return F.linear(x.float(), w, _bias(bias)).to(x.dtype)


def conv2d_wonly(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    lut: torch.Tensor | None,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bits: int = 8,
    group_size: int = 0,
) -> torch.Tensor:
    """conv2d(x, dequantize_weight(...)) + bias in fp32; output channels_last, x.dtype."""
    o, cg, kh, kw = weight_shape
    w = dequantize_weight(qdata.reshape(o, -1), scale, zero_point, lut, bits, cg * kh * kw)
    y = F.conv2d(x.float(), w.reshape(weight_shape), _bias(bias), stride, padding, dilation, groups)
    return y.to(x.dtype, memory_format=torch.channels_last)
