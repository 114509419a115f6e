"""The `torch.ops.dq` operators and the backend registry that picks their implementation.

Each op is declared once as a `torch.library.custom_op` (opaque to torch.compile, with a fake
implementation for tracing), validated here, then dispatched at run time:

    _IMPLS[op][device_type][backend] -> fn        e.g. _IMPLS["linear_w8a8"]["cpu"]["cpu"]

- `set_backend(name)` / `use_backend(name)` / `get_backend()` hold the setting (a context
  variable: per thread / task, restored on exit of `use_backend`).
- "reference" runs `dq.kernels.reference` (dequantize, then fp32 compute) on any device.
- "auto" tries every backend registered for the input's device, in registration order, then
  the reference. A named backend (e.g. "cpu", "triton") runs where it is registered for the
  input's device and falls back to the reference elsewhere.
- A backend function is called with the op's arguments **by keyword** (names as in the op
  signatures below) and returns the output tensor, or `NotImplemented` to decline a case it
  does not cover (the next candidate, finally the reference, runs instead).
- Backends register with `register_impl(op, device_type, backend, fn)`; the Triton module
  registers "triton" for "cuda", `dq.kernels.cpu` registers "cpu" for "cpu".

Because the choice happens inside the op at run time, a compiled graph follows later changes
of the setting without recompiling.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from dq.kernels import reference

OP_NAMES = ("linear_w8a8", "conv2d_w8a8", "linear_wonly", "conv2d_wonly")

_IMPLS: dict[str, dict[str, dict[str, Callable]]] = {op: {} for op in OP_NAMES}
_REFERENCE: dict[str, Callable] = {op: getattr(reference, op) for op in OP_NAMES}
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("dq_kernel_backend", default="auto")


# ----------------------------------------------------------------------------- registry


def register_impl(op: str, device_type: str, backend: str, fn: Callable) -> None:
    """Register `fn` as `backend`'s implementation of `torch.ops.dq.<op>` on `device_type`.

    Args:
        op: one of OP_NAMES, e.g. "linear_w8a8".
        device_type: torch device type the implementation runs on ("cpu", "cuda", ...).
        backend: backend name users select with `set_backend` (not "auto" / "reference").
        fn: called with the op's arguments by keyword; returns the output or `NotImplemented`.

    Example:
        >>> register_impl("linear_w8a8", "cuda", "triton", triton_kernels.linear_w8a8)
    """
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; register one of {OP_NAMES}")
    if backend in ("auto", "reference"):
        raise ValueError(f"backend name {backend!r} is reserved; pick another name")
    _IMPLS[op].setdefault(device_type, {})[backend] = fn


def available_backends() -> list[str]:
    """Every name `set_backend` accepts: "auto", "reference" and the registered backends."""
    names = {b for per_dev in _IMPLS.values() for impls in per_dev.values() for b in impls}
    return ["auto", "reference", *sorted(names)]


def set_backend(name: str) -> None:
    """Select the kernel backend for `torch.ops.dq` ops ("auto", "reference", "cpu", ...).

    Example:
        >>> dq.kernels.set_backend("reference")
    """
    if name not in available_backends():
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {available_backends()}")
    _BACKEND.set(name)


def get_backend() -> str:
    """The current kernel backend name."""
    return _BACKEND.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another kernel backend; the previous one is restored on exit.

    Example:
        >>> with dq.kernels.use_backend("reference"):
        ...     y_ref = layer(x)
    """
    if name not in available_backends():
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {available_backends()}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def resolve(op: str, device_type: str) -> list[tuple[str, Callable]]:
    """The (backend, fn) candidates tried in order for `op` on `device_type`, reference last."""
    backend = get_backend()
    impls = _IMPLS[op].get(device_type, {})
    if backend == "auto":
        chosen = list(impls.items())
    elif backend in impls:
        chosen = [(backend, impls[backend])]
    else:
        chosen = []
    return [*chosen, ("reference", _REFERENCE[op])]


def _dispatch(op: str, kwargs: dict) -> torch.Tensor:
    for _, fn in resolve(op, kwargs["x"].device.type):
        out = fn(**kwargs)
        if out is not NotImplemented:
            return out
    raise AssertionError("unreachable: the reference never declines")


# ----------------------------------------------------------------------------- validation


def _fail(op: str, problem: str, fix: str) -> None:
    raise ValueError(f"dq.{op}: {problem}; {fix}")


def _check_float_x(op: str, x: torch.Tensor, ndim: int | None = None) -> None:
    if not x.is_floating_point() or x.dtype in reference.FLOAT8_DTYPES:
        _fail(
            op, f"x must be a float tensor, got {x.dtype}", "pass fp32 (or fp16/bf16) activations"
        )
    if ndim is not None and x.dim() != ndim:
        _fail(op, f"x must be {ndim}-D [B, C, H, W], got shape {list(x.shape)}", "pass a 4-D input")
    if ndim is None and x.dim() < 1:
        _fail(op, "x must have at least one dim [..., K]", "pass x of shape [..., in_features]")


def _check_same_device(op: str, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            _fail(
                op,
                f"{name} is on {t.device} but x is on {x.device}",
                "move the layer and its input to one device",
            )


def _check_vector(op: str, name: str, t: torch.Tensor | None, n: int) -> None:
    if t is not None and (t.numel() != n or not t.is_floating_point()):
        _fail(
            op,
            f"{name} must be a float tensor of {n} elements, got {t.dtype} {list(t.shape)}",
            f"pass {name} of shape [{n}]",
        )


def _check_scale(
    op: str, name: str, t: torch.Tensor | None, n: int, k: int, group_size: int
) -> None:
    """Scale / zero point: [N], [N, 1] or [N, G] (G divides K; G = K / group_size if given)."""
    if t is None:
        return
    if not t.is_floating_point() or t.dim() not in (1, 2) or t.shape[0] != n:
        _fail(
            op,
            f"{name} must be float [N] or [N, groups] with N={n}, got {t.dtype} {list(t.shape)}",
            f"pass {name} shaped [{n}] per channel or [{n}, K / group_size] per group",
        )
    g = 1 if t.dim() == 1 else t.shape[1]
    if k % g or (group_size and g != 1 and g * group_size != k):
        _fail(
            op,
            f"{name} has {g} groups per channel, which does not fit K={k} with group_size={group_size}",
            "pass group_size = K / groups (or 0 to infer it)",
        )


def _check_act_params(
    op: str, x_scale: torch.Tensor | None, x_zero_point: torch.Tensor | None
) -> None:
    if x_scale is not None and (x_scale.numel() != 1 or not x_scale.is_floating_point()):
        _fail(
            op,
            f"x_scale must be one float (per tensor), got {x_scale.dtype} {list(x_scale.shape)}",
            "pass a 0-dim fp32 tensor, or None for a dynamic scale",
        )
    if x_zero_point is not None:
        if x_scale is None:
            _fail(
                op,
                "x_zero_point is given without x_scale",
                "pass both, or neither for a dynamic scale",
            )
        if (
            x_zero_point.numel() != 1
            or x_zero_point.is_floating_point()
            or x_zero_point.dtype == torch.bool
        ):
            _fail(
                op,
                f"x_zero_point must be one integer, got {x_zero_point.dtype} {list(x_zero_point.shape)}",
                "pass a 0-dim int32 tensor in [0, 255]",
            )


def _check_w8a8_weight(op: str, w: torch.Tensor, n: int, k: int) -> None:
    packed = w.dtype == torch.uint8
    if w.dtype not in (torch.int8, torch.uint8):
        _fail(
            op,
            f"w must be int8 codes (or packed uint8 4-bit codes), got {w.dtype}",
            "quantize the weight with dq.modules.encode_weight",
        )
    cols = (k + 1) // 2 if packed else k
    if w.shape[0] != n or w.reshape(n, -1).shape[1] != cols:
        _fail(
            op,
            f"w {list(w.shape)} ({w.dtype}) does not match N={n}, K={k}",
            f"pass w of shape [{n}, {cols}]" + (" (two 4-bit codes per byte)" if packed else ""),
        )


def _check_wonly_codes(
    op: str, qdata: torch.Tensor, lut: torch.Tensor | None, n: int, k: int, bits: int
) -> None:
    if qdata.dtype not in (torch.int8, torch.uint8, *reference.FLOAT8_DTYPES):
        _fail(
            op,
            f"qdata must be int8, uint8 or float8 codes, got {qdata.dtype}",
            "store codes with dq.modules.pack_codes",
        )
    if not 1 <= bits <= 8:
        _fail(op, f"bits must be in [1, 8], got {bits}", "pass the format's bit width")
    q2 = qdata.reshape(qdata.shape[0], -1) if qdata.dim() >= 1 else qdata
    if qdata.dim() != 2 or q2.shape[0] != n or q2.shape[1] not in (k, (k + 1) // 2):
        _fail(
            op,
            f"qdata {list(qdata.shape)} does not match N={n}, K={k}",
            f"pass [{n}, {k}] codes or [{n}, {(k + 1) // 2}] packed 4-bit codes",
        )
    if q2.shape[1] != k and not reference.is_packed(qdata, k, bits):
        _fail(
            op,
            f"qdata has {q2.shape[1]} columns for K={k}, i.e. packed 4-bit codes, but dtype {qdata.dtype} / bits={bits}",
            "pack 4-bit codes as uint8 with bits <= 4",
        )
    if lut is not None and qdata.dtype == torch.uint8:
        need = 16 if reference.is_packed(qdata, k, bits) else 2**bits
        if lut.dim() != 1 or lut.numel() < need or not lut.is_floating_point():
            _fail(
                op,
                f"lut must be a float table of >= {need} entries, got {lut.dtype} {list(lut.shape)}",
                "pass the format's code -> value table (dq.modules.code_lut)",
            )


def _check_bias(op: str, bias: torch.Tensor | None, n: int) -> None:
    _check_vector(op, "bias", bias, n)


def _check_conv_geometry(
    op: str, x: torch.Tensor, weight_shape: list[int], stride, padding, dilation, groups: int
) -> None:
    if len(weight_shape) != 4:
        _fail(
            op,
            f"weight shape must be [O, C/groups, kh, kw], got {list(weight_shape)}",
            "pass the 4-D float weight shape",
        )
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:
            _fail(op, f"{name} must have two ints, got {list(v)}", f"pass {name}=[h, w]")
    o, cg = weight_shape[0], weight_shape[1]
    if groups < 1 or x.shape[1] != cg * groups or o % groups:
        _fail(
            op,
            f"input has {x.shape[1]} channels but the weight {list(weight_shape)} with groups={groups} expects {cg * groups}",
            "check the layer's in_channels and groups",
        )


def _conv_out_shape(x: torch.Tensor, weight_shape, stride, padding, dilation) -> list[int]:
    b, _, h, w = x.shape
    o, _, kh, kw = weight_shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [b, o, ho, wo]


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op("dq::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 (or W4A8) linear: int8 weights x uint8 per-tensor activations -> x.dtype.

    Args:
        x: float [..., K].
        w: int8 [N, K] codes (symmetric, per output channel), or uint8 [N, ceil(K/2)] packed
            signed 4-bit codes (value = code - 8, low nibble first).
        w_scale: fp32 [N] (or [N, K / g] per group: reference backend only on CPU).
        bias: [N] or None.
        x_scale: 0-dim fp32 static activation scale, or None for dynamic (max|x| / 127).
        x_zero_point: 0-dim int zero point in [0, 255], or None for 128 (symmetric int8).

    Returns:
        [..., N] in x.dtype.

    Example:
        >>> y = torch.ops.dq.linear_w8a8(x, q.qdata, q.scale, q.bias, q.input_scale, q.input_zero_point)
    """
    op = "linear_w8a8"
    _validate_linear_w8a8(op, x, w, w_scale, bias, x_scale, x_zero_point)
    return _dispatch(
        op, dict(x=x, w=w, w_scale=w_scale, bias=bias, x_scale=x_scale, x_zero_point=x_zero_point)
    )


def _validate_linear_w8a8(op, x, w, w_scale, bias, x_scale, x_zero_point) -> None:
    _check_float_x(op, x)
    n, k = w.shape[0] if w.dim() == 2 else -1, x.shape[-1]
    if w.dim() != 2:
        _fail(
            op, f"w must be 2-D [N, K], got shape {list(w.shape)}", "pass the linear weight codes"
        )
    _check_w8a8_weight(op, w, n, k)
    _check_scale(op, "w_scale", w_scale, n, k, 0)
    _check_bias(op, bias, n)
    _check_act_params(op, x_scale, x_zero_point)
    _check_same_device(
        op, x, w=w, w_scale=w_scale, bias=bias, x_scale=x_scale, x_zero_point=x_zero_point
    )


@linear_w8a8.register_fake
def _(x, w, w_scale, bias=None, x_scale=None, x_zero_point=None):
    _validate_linear_w8a8("linear_w8a8", x, w, w_scale, bias, x_scale, x_zero_point)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("dq::conv2d_w8a8", mutates_args=())
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
    """W8A8 (or W4A8) conv2d: like `linear_w8a8`, with conv geometry.

    Args:
        x: float [B, C, H, W] (any memory format).
        w: int8 [O, C/groups, kh, kw]; or 2-D int8 [O, C/groups*kh*kw] / packed uint8
            [O, ceil(C/groups*kh*kw / 2)] together with `weight_shape`.
        w_scale, bias, x_scale, x_zero_point: as in `linear_w8a8`.
        stride, padding, dilation: two ints each; groups: as in `F.conv2d`.
        weight_shape: [O, C/groups, kh, kw] when w is 2-D.

    Returns:
        [B, O, Ho, Wo] in x.dtype, channels_last memory format.
    """
    op = "conv2d_w8a8"
    _validate_conv2d_w8a8(
        op,
        x,
        w,
        w_scale,
        bias,
        x_scale,
        x_zero_point,
        stride,
        padding,
        dilation,
        groups,
        weight_shape,
    )
    return _dispatch(
        op,
        dict(
            x=x,
            w=w,
            w_scale=w_scale,
            bias=bias,
            x_scale=x_scale,
            x_zero_point=x_zero_point,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            weight_shape=weight_shape,
        ),
    )


def _w8a8_conv_shape(op, w, weight_shape) -> list[int]:
    if w.dim() == 4:
        return list(w.shape)
    if weight_shape is None:
        _fail(
            op,
            f"w is {w.dim()}-D {list(w.shape)} and weight_shape is missing",
            "pass weight_shape=[O, C/groups, kh, kw] with 2-D codes",
        )
    return list(weight_shape)


def _validate_conv2d_w8a8(
    op, x, w, w_scale, bias, x_scale, x_zero_point, stride, padding, dilation, groups, weight_shape
) -> list[int]:
    _check_float_x(op, x, ndim=4)
    shape = _w8a8_conv_shape(op, w, weight_shape)
    _check_conv_geometry(op, x, shape, stride, padding, dilation, groups)
    if w.dtype == torch.uint8 and w.dim() != 2:
        _fail(
            op,
            f"packed 4-bit w must be 2-D [O, ceil(K/2)], got {list(w.shape)}",
            "pass the packed codes with weight_shape",
        )
    n, k = shape[0], shape[1] * shape[2] * shape[3]
    _check_w8a8_weight(op, w, n, k)
    _check_scale(op, "w_scale", w_scale, n, k, 0)
    _check_bias(op, bias, n)
    _check_act_params(op, x_scale, x_zero_point)
    _check_same_device(
        op, x, w=w, w_scale=w_scale, bias=bias, x_scale=x_scale, x_zero_point=x_zero_point
    )
    return shape


@conv2d_w8a8.register_fake
def _(
    x, w, w_scale, bias, x_scale, x_zero_point, stride, padding, dilation, groups, weight_shape=None
):
    shape = _validate_conv2d_w8a8(
        "conv2d_w8a8",
        x,
        w,
        w_scale,
        bias,
        x_scale,
        x_zero_point,
        stride,
        padding,
        dilation,
        groups,
        weight_shape,
    )
    out = _conv_out_shape(x, shape, stride, padding, dilation)
    return x.new_empty(out).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("dq::linear_wonly", mutates_args=())
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
    """Weight-only quantized linear: y = x @ dequant(qdata).T + bias, in x.dtype.

    Args:
        x: float [..., K].
        qdata: int8 [N, K]; float8 [N, K]; uint8 [N, K] one code per byte; or, for bits <= 4,
            uint8 [N, ceil(K/2)] two codes per byte (low nibble first).
        scale: fp32 [N] / [N, 1] per channel, or [N, K / group_size] per group.
        zero_point: None or laid out like `scale`: w = (value - zero_point) * scale.
        bias: [N] or None.
        lut: fp32 code -> value table for uint8 codes (16 entries when packed), or None
            (packed: signed int4, code - 8; one per byte: the code itself).
        bits: bits per code.
        group_size: K per scale group (0: per channel, or inferred from scale's shape).

    Returns:
        [..., N] in x.dtype.

    Example:
        >>> y = torch.ops.dq.linear_wonly(x, q.qdata, q.scale, None, q.bias, q.lut, bits=4, group_size=64)
    """
    op = "linear_wonly"
    _validate_linear_wonly(op, x, qdata, scale, zero_point, bias, lut, bits, group_size)
    return _dispatch(
        op,
        dict(
            x=x,
            qdata=qdata,
            scale=scale,
            zero_point=zero_point,
            bias=bias,
            lut=lut,
            bits=bits,
            group_size=group_size,
        ),
    )


def _validate_linear_wonly(op, x, qdata, scale, zero_point, bias, lut, bits, group_size) -> None:
    _check_float_x(op, x)
    n, k = qdata.shape[0] if qdata.dim() else 0, x.shape[-1]
    _check_wonly_codes(op, qdata, lut, n, k, bits)
    _check_scale(op, "scale", scale, n, k, group_size)
    _check_scale(op, "zero_point", zero_point, n, k, group_size)
    _check_bias(op, bias, n)
    _check_same_device(op, x, qdata=qdata, scale=scale, zero_point=zero_point, bias=bias, lut=lut)


@linear_wonly.register_fake
def _(x, qdata, scale, zero_point=None, bias=None, lut=None, bits=8, group_size=0):
    _validate_linear_wonly("linear_wonly", x, qdata, scale, zero_point, bias, lut, bits, group_size)
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("dq::conv2d_wonly", mutates_args=())
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
    """Weight-only quantized conv2d: conv2d(x, dequant(qdata).reshape(weight_shape)) + bias.

    Args:
        x: float [B, C, H, W].
        qdata, scale, zero_point, lut, bits, group_size: as in `linear_wonly`, on the flattened
            weight [O, C/groups*kh*kw] (qdata 2-D; int8/fp8/uint8-codes may also be 4-D).
        bias: [O] or None.
        weight_shape: [O, C/groups, kh, kw].
        stride, padding, dilation: two ints each; groups: as in `F.conv2d`.

    Returns:
        [B, O, Ho, Wo] in x.dtype, channels_last memory format.
    """
    op = "conv2d_wonly"
    _validate_conv2d_wonly(
        op,
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
        bits,
        group_size,
    )
    return _dispatch(
        op,
        dict(
            x=x,
            qdata=qdata,
            scale=scale,
            zero_point=zero_point,
            bias=bias,
            lut=lut,
            weight_shape=weight_shape,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bits=bits,
            group_size=group_size,
        ),
    )


def _validate_conv2d_wonly(
    op,
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
    bits,
    group_size,
) -> None:
    _check_float_x(op, x, ndim=4)
    _check_conv_geometry(op, x, weight_shape, stride, padding, dilation, groups)
    n, k = weight_shape[0], weight_shape[1] * weight_shape[2] * weight_shape[3]
    q2 = (
        qdata.reshape(qdata.shape[0], -1)
        if qdata.dim() == 4 and qdata.dtype != torch.uint8
        else qdata
    )
    _check_wonly_codes(op, q2, lut, n, k, bits)
    _check_scale(op, "scale", scale, n, k, group_size)
    _check_scale(op, "zero_point", zero_point, n, k, group_size)
    _check_bias(op, bias, n)
    _check_same_device(op, x, qdata=qdata, scale=scale, zero_point=zero_point, bias=bias, lut=lut)


@conv2d_wonly.register_fake
def _(
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
    _validate_conv2d_wonly(
        "conv2d_wonly",
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
        bits,
        group_size,
    )
    out = _conv_out_shape(x, weight_shape, stride, padding, dilation)
    return x.new_empty(out).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- autograd
#
# Gradients flow to the input x only (the quantized base is frozen, as in QLoRA-style
# training): dy/dx of the dequantized weight, with a straight-through estimator for the
# activation rounding (an identity inside the calibrated range, zero where the input clipped).
# Asking for a gradient of the codes, scales or bias gives a clear error.

_CODE_ARGS = ("w", "qdata", "w_scale", "scale", "zero_point", "bias", "x_scale", "x_zero_point", "lut")


def _no_grad_for_codes(op: str, inputs: tuple, names: tuple[str, ...]) -> None:
    for name, t in zip(names, inputs, strict=False):
        if name in _CODE_ARGS and isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(
                f"dq.{op}: {name} requires grad, but quantized codes, scales and biases are "
                "frozen; train float parameters beside them (e.g. LoRA) or dequantize the layer"
            )


def _act_mask(x, x_scale, x_zero_point) -> torch.Tensor | None:
    """Straight-through mask: 1 where the activation lies inside its uint8 range."""
    if x_scale is None:
        return None
    s, zp = reference.act_qparams(x, x_scale, x_zero_point)
    q = torch.round(x.float() / s) + zp.float()
    return ((q >= 0) & (q <= 255)).to(x.dtype)


def _setup_w8a8(ctx, inputs, output):
    names = ("x", "w", "w_scale", "bias", "x_scale", "x_zero_point")
    _no_grad_for_codes("linear_w8a8", inputs, names)
    x, w, w_scale, _, x_scale, x_zp = inputs
    ctx.save_for_backward(x, w, w_scale, x_scale, x_zp)


def _backward_linear_w8a8(ctx, grad):
    x, w, w_scale, x_scale, x_zp = ctx.saved_tensors
    wf = reference.w8a8_weight(w, w_scale, x.shape[-1])  # [N, K] fp32
    gx = (grad.float() @ wf).to(x.dtype)
    mask = _act_mask(x, x_scale, x_zp)
    return (gx if mask is None else gx * mask), None, None, None, None, None


def _setup_wonly(ctx, inputs, output):
    names = ("x", "qdata", "scale", "zero_point", "bias", "lut")
    _no_grad_for_codes("linear_wonly", inputs, names)
    x, qdata, scale, zero_point, _, lut, bits, _ = inputs
    ctx.bits = bits
    ctx.save_for_backward(x, qdata, scale, zero_point, lut)


def _backward_linear_wonly(ctx, grad):
    x, qdata, scale, zero_point, lut = ctx.saved_tensors
    wf = reference.dequantize_weight(qdata, scale, zero_point, lut, ctx.bits, x.shape[-1])
    return (grad.float() @ wf).to(x.dtype), None, None, None, None, None, None, None


def _setup_conv_w8a8(ctx, inputs, output):
    names = ("x", "w", "w_scale", "bias", "x_scale", "x_zero_point")
    _no_grad_for_codes("conv2d_w8a8", inputs, names)
    x, w, w_scale, _, x_scale, x_zp, stride, padding, dilation, groups, weight_shape = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.shape = list(w.shape) if w.dim() == 4 else list(weight_shape)
    ctx.save_for_backward(x, w, w_scale, x_scale, x_zp)


def _backward_conv_w8a8(ctx, grad):
    x, w, w_scale, x_scale, x_zp = ctx.saved_tensors
    shape = ctx.shape
    wf = reference.w8a8_weight(w, w_scale, shape[1] * shape[2] * shape[3]).reshape(shape)
    stride, padding, dilation, groups = ctx.conv
    gx = torch.nn.grad.conv2d_input(x.shape, wf, grad.float(), stride, padding, dilation, groups)
    mask = _act_mask(x, x_scale, x_zp)
    gx = gx.to(x.dtype)
    return (gx if mask is None else gx * mask), *([None] * 10)


def _setup_conv_wonly(ctx, inputs, output):
    names = ("x", "qdata", "scale", "zero_point", "bias", "lut")
    _no_grad_for_codes("conv2d_wonly", inputs, names)
    x, qdata, scale, zero_point, _, lut, weight_shape, stride, padding, dilation, groups, bits, _ = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.shape, ctx.bits = list(weight_shape), bits
    ctx.save_for_backward(x, qdata, scale, zero_point, lut)


def _backward_conv_wonly(ctx, grad):
    x, qdata, scale, zero_point, lut = ctx.saved_tensors
    o, cg, kh, kw = ctx.shape
    wf = reference.dequantize_weight(qdata.reshape(o, -1), scale, zero_point, lut, ctx.bits, cg * kh * kw)
    stride, padding, dilation, groups = ctx.conv
    gx = torch.nn.grad.conv2d_input(x.shape, wf.reshape(ctx.shape), grad.float(), stride, padding, dilation, groups)
    return gx.to(x.dtype), *([None] * 12)


linear_w8a8.register_autograd(_backward_linear_w8a8, setup_context=_setup_w8a8)
linear_wonly.register_autograd(_backward_linear_wonly, setup_context=_setup_wonly)
conv2d_w8a8.register_autograd(_backward_conv_w8a8, setup_context=_setup_conv_w8a8)
conv2d_wonly.register_autograd(_backward_conv_wonly, setup_context=_setup_conv_wonly)
