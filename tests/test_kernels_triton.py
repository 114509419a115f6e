"""Triton kernels (dq.kernels.triton_kernels) vs plain-PyTorch references, on CPU in the Triton
interpreter.

The interpreter only works when TRITON_INTERPRET=1 is set before triton is first imported, so the
ordinary test run starts one subprocess with that variable (`test_kernels_in_interpreter`) and the
other tests here run inside it; the rest of the suite never sees the variable. Run them directly
with `TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py`.

The outer run also compiles a few kernel specializations ahead of time for Hopper (sm_90) and
Ada (sm_89) with Triton's own compiler and ptxas, no GPU needed (`test_kernels_compile_for_gpus`):
that catches what the interpreter cannot (types the GPU backend rejects, tensor-core shapes).

Tolerances: integer accumulators are compared exactly; fp32 outputs against a float64 reference
within 1e-5 of the output's max magnitude (one rounding per product in the reference's fp32
sums); fp16-computed outputs within 2e-3 (activations rounded to fp16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def interp(fn):
    """Collect `fn` only inside the TRITON_INTERPRET=1 run (the subprocess below)."""
    fn.__test__ = IN_INTERPRETER
    return fn


def outer(fn):
    """Collect `fn` only in the ordinary run (compiled Triton, not the interpreter)."""
    fn.__test__ = not IN_INTERPRETER
    return fn


if IN_INTERPRETER:
    pytest.importorskip("triton")
    from dq.kernels import triton_kernels as tk


@outer
def test_kernels_in_interpreter():
    """Run this file's kernel tests in a subprocess with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


# (kernel, specialization) compiled ahead of time: pointer dtypes of the tensors and constexprs
COMPILE_CASES = {
    "w8a8-int8-prequant": ("_w8a8_kernel", dict(a_ptr="*i8", b_ptr="*i8", corr_ptr="*i32"),
                           dict(A_FLOAT=False, PACKED=False, PER_GROUP=False, BLOCK_K=128)),
    "w4a8-packed-fused": ("_w8a8_kernel", dict(a_ptr="*fp16", b_ptr="*u8", corr_ptr="*i32"),
                          dict(A_FLOAT=True, PACKED=True, PER_GROUP=False, BLOCK_K=128)),
    "w4a16-fp4-lut-group64": ("_wonly_kernel", dict(x_ptr="*fp16", q_ptr="*u8"),
                              dict(PACKED=True, USE_LUT=True, PER_GROUP=True, BLOCK_K=64)),
    "w8a16-fp8": ("_wonly_kernel", dict(x_ptr="*fp16", q_ptr="*fp8e4nv"),
                  dict(PACKED=False, USE_LUT=False, PER_GROUP=False, BLOCK_K=64)),
}  # fmt: skip
_DEFAULTS = dict(  # the remaining constexprs
    W_OFFSET=8, HAS_BIAS=True, OUT_ACC=False, LUT_SIZE=16, HAS_ZP=False, CODE_OFFSET=0,
    BLOCK_M=128, BLOCK_N=128, GROUP_M=8,
)  # fmt: skip


@outer
@pytest.mark.parametrize("arch", [90, 89], ids=["sm90", "sm89"])
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_kernels_compile_for_gpus(case, arch):
    """Compile as a launch on contiguous SD-sized tensors would (unit strides constexpr 1,
    pointers and sizes divisible by 16) and check the tensor-core instruction it lowers to."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dq.kernels import triton_kernels as tkc

    name, ptrs, const = COMPILE_CASES[case]
    fn = getattr(tkc, name)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # autotuner -> heuristics -> jit
        fn = fn.fn
    const = {**_DEFAULTS, **const, "DOT_DTYPE": tl.float16}
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in const or arg in ("stride_ak", "stride_bk", "stride_xk", "stride_qk", "stride_on"):
            sig[arg] = "constexpr"
            const.setdefault(arg, 1)
            continue
        sig[arg] = (
            ptrs.get(arg, "*i32" if arg == "xzp_ptr" else "*fp32")
            if arg.endswith("_ptr")
            else "i32"
        )
        if arg not in ("xs_ptr", "xzp_ptr"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=8, num_stages=3),
    )
    ptx = kernel.asm["ptx"]
    operand = "s8.s8" if name == "_w8a8_kernel" else "f16.f16"
    mma = "wgmma.mma_async" if arch == 90 else "mma.sync"
    assert any(mma in line and operand in line for line in ptx.splitlines()), f"no {mma} {operand}"
    assert "cp.async" in ptx  # loads are software-pipelined
    assert kernel.metadata.shared <= 227 * 1024


# ---------------------------------------------------------------------------- references


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_act_codes(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """uint8 activation codes as float: clamp(round(x / s) + zp, 0, 255)."""
    return torch.clamp(torch.round(x.float() / s) + zp, 0, 255)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15], K even -> [N, K/2], low nibble first."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def grouped(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w [N, K] * scale ([N] or [N, G], groups along K), float64."""
    n, k = w.shape
    s = scale.double().reshape(n, -1)
    return (w.double().reshape(n, s.shape[1], -1) * s[..., None]).reshape(n, k)


def assert_close_to(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.double() - ref).abs().max().item()
    bound = rel * ref.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({rel:g} of max |ref|)"


def act_params(zp: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(0.05), torch.tensor(zp, dtype=torch.int32)


def int_weight(kind: str, n: int, k: int, seed: int = 2):
    """(values int [N, K], storage tensor) for int8 or packed signed int4 weights."""
    if kind == "int8":
        w = torch.randint(-127, 128, (n, k), generator=_gen(seed), dtype=torch.int8)
        return w, w
    w = torch.randint(-8, 8, (n, k), generator=_gen(seed), dtype=torch.int8)
    return w, pack_nibbles((w + 8).to(torch.uint8))


# ---------------------------------------------------------------------------- activation quant


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_quantize_act_is_exact(dtype):
    s = torch.tensor(0.25)  # power of two: x / s lands exactly on .5 ties below
    ties = torch.arange(-40, 40, dtype=torch.float32) * 0.25 + 0.125  # (i + 0.5) * s
    x = torch.cat([ties, torch.randn(300, generator=_gen(0)) * 30, torch.tensor([1e4, -1e4])])
    x = x.to(dtype).reshape(2, -1)
    zp = torch.tensor(77, dtype=torch.int32)
    q = tk.quantize_act(x, s, zp)
    assert q.dtype == torch.int8 and q.shape == x.shape
    ref = ref_act_codes(x, s, zp) - 128
    assert torch.equal(q.float(), ref)


# ---------------------------------------------------------------------------- W8A8 / W4A8


SHAPES = [(37, 45, 96), (5, 33, 50)]  # M, N, K: none a multiple of the 32-wide interpreter tile


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fuse", [False, True], ids=["prequant", "fused"])
@pytest.mark.parametrize("wkind", ["int8", "int4"])
def test_w8a8_int32_accumulator_is_exact(wkind, fuse, shape):
    m, n, k = shape
    x = torch.randn(m, k, generator=_gen(1)) * 4
    wv, w = int_weight(wkind, n, k)
    s, zp = act_params()
    acc = tk.linear_w8a8(x, w, torch.ones(n), None, s, zp, fuse_quant=fuse, return_acc=True)
    ref = (ref_act_codes(x, s, zp) - zp).to(torch.int64) @ wv.to(torch.int64).T
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), ref)


@interp
@pytest.mark.parametrize(
    "out_dtype,rel", [(torch.float32, 1e-6), (torch.float16, 1e-3)], ids=["out-fp32", "out-fp16"]
)
@pytest.mark.parametrize("wkind", ["int8", "int4"])
def test_w8a8_output_matches_reference(wkind, out_dtype, rel):
    m, n, k = 19, 40, 64
    x = torch.randn(2, m, k, generator=_gen(3)) * 2  # leading dims are kept
    wv, w = int_weight(wkind, n, k)
    w_scale = torch.rand(n, generator=_gen(4)) * 0.02 + 0.001
    bias = torch.randn(n, generator=_gen(5))
    s, zp = act_params(zp=128)  # symmetric int8 on the uint8 engine
    y = tk.linear_w8a8(x, w, w_scale, bias, s, zp, out_dtype=out_dtype)
    xd = (ref_act_codes(x, s, zp) - zp).double() * s.double()
    ref = xd @ grouped(wv, w_scale).T + bias.double()
    assert y.shape == (2, m, n) and y.dtype == out_dtype
    assert_close_to(y, ref, rel)


@interp
@pytest.mark.parametrize("group", [32, 64], ids=["group32", "group64"])
def test_w4a8_per_group_scales(group):
    m, n, k = 21, 36, 128
    x = torch.randn(m, k, generator=_gen(6))
    wv, w = int_weight("int4", n, k)
    w_scale = torch.rand(n, k // group, generator=_gen(7)) * 0.1 + 0.01
    s, zp = act_params(zp=90)
    y = tk.linear_w8a8(x, w, w_scale, None, s, zp, group_size=group)
    ref = ((ref_act_codes(x, s, zp) - zp).double() * s.double()) @ grouped(wv, w_scale).T
    assert_close_to(y, ref, 1e-6)


@interp
def test_w8a8_dynamic_activation_scale():
    """x_scale=None: symmetric per-tensor scale max|x| / 127 computed on the device."""
    x = torch.randn(9, 40, generator=_gen(8))
    wv, w = int_weight("int8", 12, 40)
    y = tk.linear_w8a8(x, w, torch.full((12,), 0.01), None, None, None)
    s = x.abs().amax() / 127
    ref = (torch.round(x / s).double() * s.double()) @ (wv.double() * 0.01).T
    assert_close_to(y, ref, 1e-5)


# ---------------------------------------------------------------------------- weight-only

FP4_E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def wonly_case(name: str, n: int, k: int):
    """(kernel kwargs, float64 dequantized weight [N, K]) for a weight-only format case."""
    g = _gen(11)
    scale_c = torch.rand(n, generator=g) * 0.5 + 0.1
    scale_g = torch.rand(n, k // 32, generator=g) * 0.5 + 0.1
    if name == "int8-channel":
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        return dict(qdata=q, scale=scale_c, bits=8), grouped(q, scale_c)
    if name == "int4-group32-offset":
        c = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        return dict(qdata=pack_nibbles(c), scale=scale_g, bits=4, group_size=32), grouped(
            c.double() - 8, scale_g
        )
    if name == "uint4-group32-zeropoint":
        c = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        zp = torch.randint(0, 16, (n, k // 32), generator=g, dtype=torch.int32)
        vals = c.double() - zp.double().repeat_interleave(32, dim=1)
        return dict(qdata=pack_nibbles(c), scale=scale_g, zero_point=zp, bits=4, group_size=32), (
            grouped(vals, scale_g)
        )
    if name == "fp4_e2m1-group64-lut":
        c = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        s64 = scale_g[:, ::2].contiguous()
        return dict(qdata=pack_nibbles(c), scale=s64, lut=FP4_E2M1, bits=4, group_size=64), grouped(
            FP4_E2M1[c.long()], s64
        )
    if name == "fp6-bytecodes-lut64":
        lut = torch.randn(64, generator=g)
        c = torch.randint(0, 64, (n, k), generator=g, dtype=torch.uint8)
        return dict(qdata=c, scale=scale_c, lut=lut, bits=6), grouped(lut[c.long()], scale_c)
    if name == "uint8-raw":
        c = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
        return dict(qdata=c, scale=scale_c, bits=8), grouped(c, scale_c)
    if name == "fp8_e4m3-as-bytes-table":  # the pre-sm_89 route: bit patterns + 256-entry table
        q = (torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn)
        kw = dict(qdata=q.view(torch.uint8), scale=scale_c, lut=tk.e4m3_table(), bits=8)
        return kw, grouped(q.float(), scale_c)
    if name in ("fp8_e4m3-channel", "fp8_e5m2-channel"):
        dt = torch.float8_e4m3fn if "e4m3" in name else torch.float8_e5m2
        q = (torch.randn(n, k, generator=g) * 3).to(dt)
        return dict(qdata=q, scale=scale_c, bits=8), grouped(q.float(), scale_c)
    raise KeyError(name)


WONLY_CASES = [
    "int8-channel",
    "int4-group32-offset",
    "uint4-group32-zeropoint",
    "fp4_e2m1-group64-lut",
    "fp6-bytecodes-lut64",
    "uint8-raw",
    "fp8_e4m3-channel",
    "fp8_e5m2-channel",
    "fp8_e4m3-as-bytes-table",
]


@interp
@pytest.mark.parametrize("case", WONLY_CASES)
def test_wonly_matches_reference_fp32(case):
    m, n, k = 37, 45, 128
    kw, wd = wonly_case(case, n, k)
    x = torch.randn(m, k, generator=_gen(12))
    bias = torch.randn(n, generator=_gen(13))
    y = tk.linear_wonly(x, bias=bias, compute_dtype=torch.float32, **kw)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert_close_to(y, x.double() @ wd.T + bias.double(), 1e-5)


@interp
@pytest.mark.parametrize(
    "case", ["int4-group32-offset", "fp4_e2m1-group64-lut", "fp8_e4m3-channel"]
)
def test_wonly_fp16_compute(case):
    m, n, k = 20, 33, 128
    kw, wd = wonly_case(case, n, k)
    x = torch.randn(m, k, generator=_gen(14)).half()
    y = tk.linear_wonly(x, **kw)
    assert y.dtype == torch.float16
    assert_close_to(y, x.double() @ wd.T, 2e-3)


@interp
def test_int_lut_is_decoded_by_offset():
    """A 16-entry INT table (what dq.modules passes for int4/uint4) skips the gather."""
    codes = torch.arange(16, dtype=torch.float32)
    assert tk._lut_as_offset(codes - 8) == 8
    assert tk._lut_as_offset(codes) == 0
    assert tk._lut_as_offset(FP4_E2M1.clone()) is None


# ---------------------------------------------------------------------------- conv2d (im2col)

CONVS = [  # (C, O, kernel, stride, padding, dilation, groups)
    (8, 12, 3, 1, 1, 1, 1),
    (8, 12, 3, 2, 1, 1, 1),
    (8, 12, 1, 1, 0, 1, 1),
    (8, 12, 3, 1, 2, 2, 2),
]
CONV_IDS = ["3x3", "3x3-stride2", "1x1", "3x3-dil2-groups2"]


@interp
@pytest.mark.parametrize("conv", CONVS, ids=CONV_IDS)
def test_conv2d_w8a8_matches_reference(conv):
    c, o, kk, st, pad, dil, grp = conv
    x = torch.randn(2, c, 7, 9, generator=_gen(15))
    wv = torch.randint(-127, 128, (o, c // grp, kk, kk), generator=_gen(16), dtype=torch.int8)
    w_scale = torch.rand(o, generator=_gen(17)) * 0.01 + 0.001
    bias = torch.randn(o, generator=_gen(18))
    s, zp = act_params(zp=120)
    y = tk.conv2d_w8a8(x, wv, w_scale, bias, s, zp, st, pad, dil, grp)
    xd = (ref_act_codes(x, s, zp) - zp).double() * s.double()
    wd = wv.double() * w_scale.double().reshape(-1, 1, 1, 1)
    ref = F.conv2d(xd, wd, bias.double(), st, pad, dil, grp)
    assert y.shape == ref.shape
    assert_close_to(y, ref, 1e-6)


@interp
def test_conv2d_channels_last_input_gives_identical_output():
    """Layout is not maths: an NHWC input yields the same codes, columns and outputs bit for bit."""
    x = torch.randn(2, 8, 7, 9, generator=_gen(24))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    wv = torch.randint(-127, 128, (12, 8, 3, 3), generator=_gen(25), dtype=torch.int8)
    s, zp = act_params()
    for pad in (0, 1):
        args = (wv, torch.full((12,), 0.01), None, s, zp, 1, pad, 1, 1)
        y, y_cl = tk.conv2d_w8a8(x, *args), tk.conv2d_w8a8(x_cl, *args)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, y_cl)
    kw, _ = wonly_case("int8-channel", 12, 8)
    one = (kw["qdata"], kw["scale"], None, None, None, [12, 8, 1, 1], 1, 0, 1, 1)
    assert torch.equal(tk.conv2d_wonly(x, *one), tk.conv2d_wonly(x_cl, *one))


@interp
def test_conv2d_w4a8_packed_weight():
    c, o = 8, 12
    x = torch.randn(2, c, 6, 6, generator=_gen(19))
    wv, w = int_weight("int4", o, c * 9)
    w_scale = torch.rand(o, generator=_gen(20)) * 0.05 + 0.01
    s, zp = act_params()
    y = tk.conv2d_w8a8(x, w, w_scale, None, s, zp, 1, 1, 1, 1, weight_shape=[o, c, 3, 3])
    xd = (ref_act_codes(x, s, zp) - zp).double() * s.double()
    ref = F.conv2d(xd, grouped(wv, w_scale).reshape(o, c, 3, 3), None, 1, 1)
    assert_close_to(y, ref, 1e-6)


@interp
@pytest.mark.parametrize("case", ["fp4_e2m1-group64-lut", "int8-channel"])
def test_conv2d_wonly_matches_reference(case):
    c, o = 16, 10  # K = 16 * 3 * 3 = 144: not a multiple of 64; per-group uses 1x1 below
    kk = 3 if case == "int8-channel" else 2  # 16 * 2 * 2 = 64 for the group-64 case
    kw, wd = wonly_case(case, o, c * kk * kk)
    x = torch.randn(2, c, 6, 7, generator=_gen(21))
    y = tk.conv2d_wonly(
        x,
        kw.pop("qdata"),
        kw.pop("scale"),
        None,
        None,
        kw.pop("lut", None),
        [o, c, kk, kk],
        1,
        1,
        1,
        1,
        compute_dtype=torch.float32,
        **kw,
    )
    ref = F.conv2d(x.double(), wd.reshape(o, c, kk, kk), None, 1, 1)
    assert_close_to(y, ref, 1e-5)


# ---------------------------------------------------------------------------- conventions


MODULE_SPECS = [
    ("int8", "channel", "uint8"),
    ("int8", "channel", "int8"),
    ("int4", "channel", "uint8"),
    ("int4", "group16", None),
    ("fp4_e2m1", "group16", None),
    ("fp6_e3m2", "channel", None),
    ("fp8_e4m3", "channel", None),
]


@interp
@pytest.mark.parametrize(
    "w,g,a", MODULE_SPECS, ids=[f"{w}-{g}-a{a or 'float'}" for w, g, a in MODULE_SPECS]
)
def test_kernels_read_qlinear_storage(w, g, a):
    """The kernels decode dq.modules' stored codes exactly as its plain-PyTorch reference does."""
    from dq.config import LayerSpec
    from dq.modules import QLinear, reference_forward

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(3, 7, 64, generator=_gen(22))
    q = QLinear.from_float(lin, LayerSpec(w, g, act=a), act_range=(float(x.min()), float(x.max())))
    ref = reference_forward(q, x).double()
    if a is not None:
        y = tk.linear_w8a8(x, q.qdata, q.scale, q.bias, q.input_scale, q.input_zero_point)
    else:
        gs = int(g[5:]) if g.startswith("group") else 0
        y = tk.linear_wonly(
            x,
            q.qdata,
            q.scale,
            None,
            q.bias,
            q.lut,
            q._kernel_args["bits"],
            gs,
            compute_dtype=torch.float32,
        )
    assert_close_to(y, ref, 1e-5)


@interp
def test_register_adds_the_triton_backend():
    from dq.kernels import ops

    tk.register("cpu")  # the interpreter runs CPU tensors; on import only "cuda" is registered
    for op in ops.OP_NAMES:
        assert ops._IMPLS[op]["cuda"]["triton"] is tk.OPS[op]
        assert ops._IMPLS[op]["cpu"]["triton"] is tk.OPS[op]
    assert "triton" in ops.available_backends()


LAYER_SPECS = [
    ("linear", "int8", "channel", "uint8"),
    ("linear", "int4", "channel", "int8"),
    ("linear", "fp4_e2m1", "group32", None),
    ("conv", "int8", "channel", "uint8"),
    ("conv", "int4", "group16", None),
    ("conv", "fp8_e4m3", "channel", None),
]


@interp
@pytest.mark.parametrize(
    "kind,w,g,a", LAYER_SPECS, ids=[f"{k}-{w}-{g}-a{a or 'float'}" for k, w, g, a in LAYER_SPECS]
)
def test_quantized_layers_run_through_the_triton_backend(kind, w, g, a):
    """QLinear / QConv2d forward -> torch.ops.dq -> these kernels (not a fallback) == reference."""
    from dq import kernels
    from dq.config import LayerSpec
    from dq.kernels import ops
    from dq.modules import QConv2d, QLinear

    ran = []

    def spy(op):
        def impl(**kwargs):
            out = tk.OPS[op](**kwargs)
            ran.append(out is not NotImplemented)
            return out

        return impl

    for op in ops.OP_NAMES:
        ops.register_impl(op, "cpu", "triton", spy(op))
    try:
        torch.manual_seed(0)
        if kind == "linear":
            layer, x, cls = (
                torch.nn.Linear(64, 24),
                torch.randn(2, 5, 64, generator=_gen(23)),
                QLinear,
            )
        else:
            layer, cls = torch.nn.Conv2d(16, 8, 3, padding=1), QConv2d
            x = torch.randn(2, 16, 6, 6, generator=_gen(23))
        act_range = (float(x.min()), float(x.max())) if a else None
        q = cls.from_float(layer, LayerSpec(w, g, act=a), act_range=act_range)
        with kernels.use_backend("reference"):
            ref = q(x)
        with kernels.use_backend("triton"):
            y = q(x)
    finally:
        tk.register("cpu")
    assert ran == [True]
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # weight-only kernels multiply in fp16 (activations rounded); W8A8 is exact up to fp32 sums
    assert_close_to(y, ref.double(), 1e-5 if a else 2e-3)


# ---------------------------------------------------------------------------- bad input


@interp
def test_bad_shapes_raise_with_a_fix():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="does not match K=64"):
        tk.linear_w8a8(x, torch.zeros(8, 48, dtype=torch.int8), torch.ones(8), None, *act_params())
    with pytest.raises(ValueError, match="multiple of 16"):
        tk.linear_wonly(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 8), group_size=8)
    with pytest.raises(ValueError, match="signed INT"):
        tk.linear_w8a8(x, torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8), None, *act_params())
