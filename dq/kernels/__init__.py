"""dq's quantized kernels: `torch.ops.dq.*` operators with per-backend implementations.

    torch.ops.dq.linear_w8a8(x, w, w_scale, bias, x_scale, x_zero_point)
    torch.ops.dq.conv2d_w8a8(x, w, w_scale, bias, x_scale, x_zero_point,
                             stride, padding, dilation, groups, weight_shape=None)
    torch.ops.dq.linear_wonly(x, qdata, scale, zero_point, bias, lut, bits, group_size)
    torch.ops.dq.conv2d_wonly(x, qdata, scale, zero_point, bias, lut, weight_shape,
                              stride, padding, dilation, groups, bits, group_size)

Each op has a plain-PyTorch reference (`dq.kernels.reference`: dequantize, then fp32 compute)
and fast implementations registered per device and backend (`dq.kernels.cpu`: oneDNN integer
GEMMs and blocked weight-only matmuls; `dq.kernels.triton_kernels`: CUDA). Which one runs is a
setting, read when the op runs:

    dq.kernels.set_backend("auto")          # fastest registered for the device (default)
    with dq.kernels.use_backend("reference"):
        y_ref = layer(x)
    dq.kernels.get_backend()

A new backend plugs in with `dq.kernels.register_impl(op, device_type, backend, fn)`; see
`dq.kernels.ops` for the dispatch rules.
"""

from dq.kernels import cpu  # noqa: F401  (registers the "cpu" backend)
from dq.kernels.ops import (
    OP_NAMES,
    available_backends,
    conv2d_w8a8,
    conv2d_wonly,
    get_backend,
    linear_w8a8,
    linear_wonly,
    register_impl,
    resolve,
    set_backend,
    use_backend,
)

try:  # the CUDA backend registers itself on import when triton is installed
    from dq.kernels import triton_kernels  # noqa: F401
except ImportError:
    pass



def cache_nbytes(module=None) -> int:
    """Bytes held by prepacked kernel weights (the CPU int8 engine's cache), on top of codes:
    all of them, or only those of `module`'s quantized layers."""
    if module is None:
        return cpu.PACK_CACHE.nbytes()
    # a layer whose codes the engine took over holds its packed weight as `engine_weight`
    held = [m._buffers["engine_weight"] for m in module.modules() if "engine_weight" in m._buffers]
    # FP weights on the int8 engine: int8 codes derived from their packed FP codes (and the
    # engine's packed copy of those) are held too
    derived = [c[1] for m in module.modules() if (c := getattr(m, "_engine_cache", None)) is not None]
    held += derived
    weights = [m._buffers["qdata"] for m in module.modules() if "qdata" in m._buffers] + derived
    return cpu.PACK_CACHE.nbytes(weights) + sum(t.nelement() * t.element_size() for t in held)


def held_nbytes(module, buffers: bool = True) -> int:
    """Bytes `module` holds for its weights right now: its parameters (and buffers) plus the
    kernels' copies that are not its tensors (`cache_nbytes` less the packed weights a
    compacted layer already holds as its `engine_weight` buffer)."""
    own = sum(t.nelement() * t.element_size() for t in module.parameters())
    taken = 0
    if buffers:
        own += sum(t.nelement() * t.element_size() for t in module.buffers())
        taken = sum(t.nelement() * t.element_size() for m in module.modules()
                    if (t := m._buffers.get("engine_weight")) is not None)  # fmt: skip
    return own + cache_nbytes(module) - taken


__all__ = [
    "cache_nbytes",
    "held_nbytes",
    "OP_NAMES",
    "available_backends",
    "conv2d_w8a8",
    "conv2d_wonly",
    "get_backend",
    "linear_w8a8",
    "linear_wonly",
    "register_impl",
    "resolve",
    "set_backend",
    "use_backend",
]
