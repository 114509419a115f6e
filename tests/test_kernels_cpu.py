"""dq.kernels on CPU: every fast kernel against its reference, the backend setting, the
prepack cache, torch.compile tracing, and input validation.

Tolerances:
- W8A8 integer engine vs an int64 computation on the same uint8 codes, full-range int8
  weights: max abs error <= 1e-6 * max|y| (the integer sums are exact, only the fp32 rescale
  rounds; on AVX2 this holds through the exact code split in dq/kernels/cpu.py).
- W8A8 vs the fp32 reference: <= 1e-5 * max|y| plus, where the fast quantizer rounded an exact
  tie of x / s the other way (one code, about 1e-5 of elements), that code's contribution
  s_x * s_w[n] * |w[n, k]|.
- Weight-only blocked path vs reference: max abs error <= 1e-5 * max|y|.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from dq import kernels, quant
from dq.kernels import cpu, ops, reference

OPS = torch.ops.dq
_GEO = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups of a 3x3 "same" conv


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8_weight(shape, lim: int = 127, seed: int = 1) -> torch.Tensor:
    return torch.randint(-lim, lim + 1, shape, generator=_gen(seed), dtype=torch.int8)


def _act_params(x: torch.Tensor, static: bool):
    """Static: min-max uint8 calibration on x; dynamic: None (symmetric, max|x| / 127)."""
    if not static:
        return None, None
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255
    return torch.tensor(s), torch.tensor(round(-lo / s), dtype=torch.int32)


def _codes(x, x_scale, x_zero_point):
    """The engine's own activation codes and (scale, zero point) as Python numbers."""
    s, zp = reference.act_qparams(x, x_scale, x_zero_point)
    return cpu.quantize_act(x, float(s), int(zp)), float(s), int(zp)


def _assert_close_rel(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.abs().max().item() + 1e-12, (
        f"max abs err {err:.3e} > {rel:g} * {ref.abs().max().item():.3e}"
    )


# ----------------------------------------------------------------------------- W8A8 linear

LINEAR_SHAPES = [((1, 16), 8), ((7, 64), 24), ((2, 5, 96), 40)]


@pytest.mark.parametrize("xshape,n", LINEAR_SHAPES, ids=["m1k16n8", "m7k64n24", "b2m5k96n40"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("shift", [0.0, -2.0], ids=["zp-mid", "zp-high"])
def test_linear_w8a8_is_exact_in_integers(xshape, n, has_bias, static, shift):
    k = xshape[-1]
    x = torch.randn(xshape, generator=_gen()) + shift
    w = _int8_weight((n, k))
    w_scale = torch.rand(n, generator=_gen(2)) * 0.01 + 1e-3
    bias = torch.randn(n, generator=_gen(3)) if has_bias else None
    xs, xz = _act_params(x, static)

    y = cpu.linear_w8a8(x, w, w_scale, bias, xs, xz)

    qx, s, zp = _codes(x, xs, xz)
    acc = (qx.long().reshape(-1, k) - zp) @ w.long().T  # exact integer GEMM
    ref = acc.double() * s * w_scale.double() + (0 if bias is None else bias.double())
    assert y.shape == (*xshape[:-1], n) and y.dtype == x.dtype
    _assert_close_rel(y.reshape(-1, n), ref, 1e-6)


# ----------------------------------------------------------------------------- W8A8 conv

CONV_CASES = {
    # name: (B, C, O, H, k, stride, padding, dilation, groups)
    "k3s1p1": (2, 8, 16, 9, 3, 1, 1, 1, 1),
    "k3s2p0g2": (1, 8, 12, 10, 3, 2, 0, 1, 2),
    "k3d2p2dw": (2, 6, 6, 8, 3, 1, 2, 2, 6),
    "k1": (2, 16, 8, 7, 1, 1, 0, 1, 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shift", [0.0, -2.0], ids=["zp-mid", "zp-high"])
def test_conv2d_w8a8_is_exact_in_integers(case, has_bias, static, channels_last, shift):
    b, c, o, h, k, st, pd, dl, g = CONV_CASES[case]
    x = torch.randn(b, c, h, h, generator=_gen()) + shift
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = _int8_weight((o, c // g, k, k))
    w_scale = torch.rand(o, generator=_gen(2)) * 0.01 + 1e-3
    bias = torch.randn(o, generator=_gen(3)) if has_bias else None
    xs, xz = _act_params(x, static)
    geo = ([st, st], [pd, pd], [dl, dl], g)

    y = cpu.conv2d_w8a8(x, w, w_scale, bias, xs, xz, *geo)

    qx, s, zp = _codes(x, xs, xz)
    acc = F.conv2d(qx.double() - zp, w.double(), None, *geo)  # integer sums, exact in float64
    ref = acc * s * w_scale.double().view(1, -1, 1, 1)
    if bias is not None:
        ref = ref + bias.double().view(1, -1, 1, 1)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    _assert_close_rel(y, ref, 1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_w8a8_packed_int4_weights_are_exact(kind):
    """W4A8: packed signed 4-bit codes are unpacked once into the int8 engine."""
    torch.manual_seed(0)
    if kind == "linear":
        x, n, k = torch.randn(6, 32), 10, 32
    else:
        x, n, k = torch.randn(2, 4, 6, 6), 10, 4 * 9
    codes = torch.randint(0, 16, (n, k + k % 2), dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    w_int = codes[:, :k].to(torch.int8) - 8
    w_scale = torch.rand(n) * 0.1 + 0.01
    xs, xz = _act_params(x, True)
    if kind == "linear":
        y = OPS.linear_w8a8(x, packed, w_scale, None, xs, xz)
        y_int8 = cpu.linear_w8a8(x, w_int, w_scale, None, xs, xz)
    else:
        geo = ([1, 1], [1, 1], [1, 1], 1)
        y = OPS.conv2d_w8a8(x, packed, w_scale, None, xs, xz, *geo, [n, 4, 3, 3])
        y_int8 = cpu.conv2d_w8a8(x, w_int.reshape(n, 4, 3, 3), w_scale, None, xs, xz, *geo)
    torch.testing.assert_close(y, y_int8, rtol=0, atol=0)


def test_w8a8_per_group_scales_fall_back_to_reference():
    x = torch.randn(3, 32, generator=_gen())
    w = _int8_weight((8, 32))
    w_scale = torch.rand(8, 2, generator=_gen(2)) + 0.1
    assert cpu.linear_w8a8(x, w, w_scale) is NotImplemented
    y = OPS.linear_w8a8(x, w, w_scale)
    torch.testing.assert_close(y, reference.linear_w8a8(x, w, w_scale), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_w8a8_matches_fp32_reference(kind):
    """Gaussian activations (8-bit codes up to 255), per-channel min-max int8 weights."""
    g = _gen(5)
    if kind == "linear":
        x, wf = torch.randn(64, 256, generator=g), torch.randn(96, 256, generator=g)
    else:
        x, wf = torch.randn(2, 32, 12, 12, generator=g), torch.randn(48, 32, 3, 3, generator=g)
    w_scale = wf.reshape(wf.shape[0], -1).abs().amax(1) / 127
    w = torch.round(wf / w_scale.view(-1, *[1] * (wf.dim() - 1))).to(torch.int8)
    xs, xz = _act_params(x, True)
    q_fast, s, zp = _codes(x, xs, xz)
    dq = (q_fast.int() - reference.quantize_act(x, xs, xz).int()).abs().double()  # tie flips
    assert dq.max() <= 1 and dq.mean() < 1e-3
    w_abs = w.double().abs()
    if kind == "linear":
        args = (x, w, w_scale, None, xs, xz)
        y, y_ref = OPS.linear_w8a8(*args), reference.linear_w8a8(*args)
        tie_err = dq @ w_abs.T * s * w_scale.double()
    else:
        args = (x, w, w_scale, None, xs, xz, [1, 1], [1, 1], [1, 1], 1)
        y, y_ref = OPS.conv2d_w8a8(*args), reference.conv2d_w8a8(*args)
        tie_err = F.conv2d(dq, w_abs, None, 1, 1) * s * w_scale.double().view(1, -1, 1, 1)
    err = (y.double() - y_ref.double()).abs()
    assert bool((err <= tie_err + 1e-5 * y_ref.abs().max()).all())


@pytest.mark.parametrize("pair_max,expected", [(254, 129), (128, 255), (16, 255), (0, 255)])
def test_safe_code_bound_on_int16_pair_engines(monkeypatch, pair_max, expected):
    monkeypatch.setattr(cpu, "INT32_DOT_PRODUCTS", False)
    assert cpu.safe_code_max(pair_max) == expected
    assert expected * pair_max <= 32767


def test_pair_absmax_pairs_adjacent_input_channels_per_tap():
    w = torch.zeros(2, 5, 1, 2, dtype=torch.int8)
    w[0, 0, 0, 0], w[0, 1, 0, 1] = 100, -90  # same pair (0, 1), different taps: not summed
    w[0, 2, 0, 1], w[0, 3, 0, 1] = 50, -60  # pair (2, 3) at tap 1: 110
    w[1, 1, 0, 0], w[1, 2, 0, 0] = 120, 120  # channels 1 and 2 are not a pair
    w[1, 4, 0, 0] = -128  # odd last channel pairs with padding; |-128| must not wrap in int8
    assert quant.pair_absmax(w).tolist() == [110, 128]
    assert quant.pair_absmax(w.reshape(2, -1)[:, :4]).tolist() == [100, 120]  # linear [N, K]


def _pair_patterns(shape):
    """Adversarial int8 weights [O, I, ...]: 127 on every even input channel (pairs 127 + 1), and
    127 on channels 4j + 1 and 4j + 2 (neighbours in different pairs): both have pair sums
    <= 128, so one engine pass is exact only if the engine pairs (2j, 2j + 1)."""
    even = torch.ones(shape, dtype=torch.int8)
    even[:, 0::2] = 127
    cross = torch.ones(shape, dtype=torch.int8)
    cross[:, 1::4] = 127
    cross[:, 2::4] = 127
    return {"even": even, "cross": cross}


@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (77, 320, 96), (300, 67, 32), (8, 1280, 512)])
def test_engine_pairs_are_adjacent_input_channels_linear(monkeypatch, m, k, n):
    """Every code 255 with pair sums of 128 is exact in one pass (on AVX2 this fails if the
    engine's int16 pairs are other than (2j, 2j + 1))."""
    code_maxes = []
    real = cpu._exact_engine_sum

    def spy(q, zp, bias, code_max, run):
        code_maxes.append(code_max)
        return real(q, zp, bias, code_max, run)

    monkeypatch.setattr(cpu, "_exact_engine_sum", spy)
    x = torch.full((m, k), 255.0)
    for w in _pair_patterns((n, k)).values():
        y = OPS.linear_w8a8(x, w, torch.ones(n), None, torch.tensor(1.0), torch.tensor(0))
        ref = x.double() @ w.double().T  # integers below 2**24: exact in fp32 too
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=0)
    assert code_maxes == [255, 255]  # every code safe: one engine pass, no split


@pytest.mark.parametrize(
    "b,i,hw,o,stride,ksize", [(1, 320, 8, 64, 1, 3), (2, 4, 16, 32, 1, 3), (1, 64, 8, 64, 2, 3),
                              (1, 96, 6, 48, 1, 1)]
)  # fmt: skip
def test_engine_pairs_are_adjacent_input_channels_conv(b, i, hw, o, stride, ksize):
    x = torch.full((b, i, hw, hw), 255.0)
    geo = ([stride] * 2, [ksize // 2] * 2, [1, 1], 1)
    for w in _pair_patterns((o, i, ksize, ksize)).values():
        y = OPS.conv2d_w8a8(x, w, torch.ones(o), None, torch.tensor(1.0), torch.tensor(0), *geo)
        ref = F.conv2d(x.double(), w.double(), None, *geo)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=0)


def test_weights_over_the_pair_bound_still_exact_through_the_split():
    w = torch.ones(16, 64, dtype=torch.int8)
    w[:, 0::4] = 127
    w[:, 1::4] = 127  # pairs of 254: one pass would saturate on AVX2
    x = torch.full((5, 64), 255.0)
    y = OPS.linear_w8a8(x, w, torch.ones(16), None, torch.tensor(1.0), torch.tensor(0))
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=0, atol=0)


@pytest.mark.parametrize("code_max", [255, 129])
def test_engine_split_runs_once_or_twice_and_sums_exactly(code_max):
    q = torch.randint(0, 256, (5, 7), generator=_gen(), dtype=torch.uint8)
    runs = []

    def run(codes, zp, bias):
        runs.append((int(codes.max()), zp, bias))
        return (codes.double() - zp).sum(1) + (0 if bias is None else bias)

    y = cpu._exact_engine_sum(q, 100, 0.5, code_max, run)
    torch.testing.assert_close(y, (q.double() - 100).sum(1) + 0.5, rtol=0, atol=0)
    if code_max == 255:
        assert len(runs) == 1
    else:  # both halves within the exact bound; zero point and bias applied once
        assert [r[1:] for r in runs] == [(100, 0.5), (0, None)]
        assert all(r[0] <= code_max for r in runs)


def test_fast_activation_quantizer_differs_from_reference_only_at_ties():
    x = torch.randn(4096, generator=_gen()) * 3
    s, zp = torch.tensor(0.03), torch.tensor(120, dtype=torch.int32)
    fast = cpu.quantize_act(x, float(s), int(zp)).int()
    ref = reference.quantize_act(x, s, zp).int()
    diff = (fast - ref).abs()
    assert diff.max() <= 1
    frac = (x / s - torch.floor(x / s) - 0.5).abs()  # distance of x/s from a tie
    assert bool((diff[frac > 1e-3] == 0).all())


# ----------------------------------------------------------------------------- weight-only


# name: (qdata maker(n, k, g) -> (qdata, lut, bits, zero_point?), group_size)
def _wonly_int8(n, k, gen):
    return torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), None, 8


def _wonly_fp8(dtype):
    def make(n, k, gen):
        return (torch.randn(n, k, generator=gen) * 4).to(dtype), None, 8

    return make


def _packed(n, k, gen):
    codes = torch.randint(0, 16, (n, k + k % 2), generator=gen, dtype=torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _wonly_int4(n, k, gen):
    return _packed(n, k, gen), None, 4


def _wonly_fp4_lut(n, k, gen):
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    return _packed(n, k, gen), torch.cat([e2m1, -e2m1]), 4


def _wonly_fp6_lut(n, k, gen):
    return (
        torch.randint(0, 64, (n, k), generator=gen, dtype=torch.uint8),
        torch.randn(64, generator=gen),
        6,
    )


def _wonly_uint8(n, k, gen):
    return torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8), None, 8


WONLY_CASES = {
    "int8-channel": (_wonly_int8, 0, False),
    "int8-group16-zp": (_wonly_int8, 16, True),
    "fp8e4m3-channel": (_wonly_fp8(torch.float8_e4m3fn), 0, False),
    "fp8e5m2-group32": (_wonly_fp8(torch.float8_e5m2), 32, False),
    "int4-group16": (_wonly_int4, 16, False),
    "uint4-group32-zp": (_wonly_int4, 32, True),
    "fp4lut-channel": (_wonly_fp4_lut, 0, False),
    "fp6lut-group16": (_wonly_fp6_lut, 16, False),
    "uint8-channel-zp": (_wonly_uint8, 0, True),
}


def _wonly_args(case: str, n: int, k: int, seed: int = 0, two_groups: bool = False):
    """Codes, scale, zero point, lut, bits, group size; `two_groups` sets group size K / 2."""
    make, group, has_zp = WONLY_CASES[case]
    group = k // 2 if group and two_groups else group
    gen = _gen(seed)
    qdata, lut, bits = make(n, k, gen)
    groups = k // group if group else 1
    scale = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    if not group:
        scale = scale.reshape(n)
    zp = torch.randint(0, 16, scale.shape, generator=gen).float() if has_zp else None
    return qdata, scale, zp, lut, bits, group


@pytest.fixture(params=[None, 16], ids=["block-default", "block-16rows"])
def block_rows(request, monkeypatch):
    """Run the blocked path with the default block, and with 16-row blocks (several, ragged)."""
    if request.param is not None:
        monkeypatch.setattr(cpu, "WONLY_MIN_ROWS", request.param)
        monkeypatch.setattr(cpu, "WONLY_BLOCK_BYTES", 0)
        monkeypatch.setattr(cpu, "WONLY_CONV_BLOCK_BYTES", 0)
    return request.param


@pytest.mark.parametrize("case", list(WONLY_CASES), ids=list(WONLY_CASES))
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_linear_wonly_blocked_matches_reference(case, has_bias, block_rows):
    n, k = 40, 64
    qdata, scale, zp, lut, bits, group = _wonly_args(case, n, k)
    x = torch.randn(2, 3, k, generator=_gen(7))
    bias = torch.randn(n, generator=_gen(8)) if has_bias else None
    args = (x, qdata, scale, zp, bias, lut, bits, group)
    y = cpu.linear_wonly(*args)
    y_ref = reference.linear_wonly(*args)
    assert y.shape == (2, 3, n)
    _assert_close_rel(y, y_ref, 1e-5)


@pytest.mark.parametrize(
    "case", ["int8-channel", "int4-group16", "fp4lut-channel", "fp6lut-group16"]
)
@pytest.mark.parametrize(
    "geo", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 4)], ids=["s1p1", "s2p0g2", "s1p2d2g4"]
)
def test_conv2d_wonly_blocked_matches_reference(case, geo, block_rows):
    st, pd, dl, g = geo
    o, c, kh = 40, 8, 3
    k = (c // g) * kh * kh
    qdata, scale, zp, lut, bits, group = _wonly_args(case, o, k, two_groups=True)
    x = torch.randn(2, c, 9, 9, generator=_gen(7))
    args = (
        x,
        qdata,
        scale,
        zp,
        torch.randn(o, generator=_gen(8)),
        lut,
        [o, c // g, kh, kh],
        [st, st],
        [pd, pd],
        [dl, dl],
        g,
        bits,
        group,
    )
    y = cpu.conv2d_wonly(*args)
    y_ref = reference.conv2d_wonly(*args)
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    _assert_close_rel(y, y_ref, 1e-5)


def _peak_alloc_bytes(fn) -> int:
    """Peak of live CPU allocations made inside fn (profiler allocation events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = getattr(getattr(prof.profiler, "kineto_results", None), "events", None)
    if events is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    mem = sorted((e.start_ns(), e.nbytes()) for e in events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_blocked_wonly_never_materialises_the_full_weight(monkeypatch):
    n, k, m = 1024, 256, 8
    qdata, scale, _, lut, bits, group = _wonly_args("int4-group16", n, k)
    x = torch.randn(m, k, generator=_gen(1))
    monkeypatch.setattr(cpu, "WONLY_BLOCK_BYTES", 0)
    monkeypatch.setattr(cpu, "WONLY_MIN_ROWS", 64)
    assert cpu.wonly_block_rows(k, n, cpu.WONLY_BLOCK_BYTES) == 64
    block, full_weight, out = 64 * k * 4, n * k * 4, m * n * 4
    args = (x, qdata, scale, None, None, lut, bits, group)
    peak_fast = _peak_alloc_bytes(lambda: cpu.linear_wonly(*args))
    peak_ref = _peak_alloc_bytes(lambda: reference.linear_wonly(*args))
    assert peak_ref >= full_weight  # the measurement sees a materialised weight
    # output + one block and its decode temporaries (gathered values, scaled block)
    assert peak_fast <= out + 4 * block < full_weight


@pytest.mark.parametrize("groups", [1, 4])
def test_blocked_conv_wonly_never_materialises_the_full_weight(monkeypatch, groups):
    o, c, k = 512, 32, 3
    kk = c // groups * k * k
    qdata, scale, _, lut, bits, group = _wonly_args("int4-group16", o, kk)
    x = torch.randn(1, c, 4, 4, generator=_gen(1)).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(cpu, "WONLY_CONV_BLOCK_BYTES", 0)
    monkeypatch.setattr(cpu, "WONLY_MIN_ROWS", 64)
    block, full_weight = 64 * kk * 4, o * kk * 4
    args = (
        x,
        qdata,
        scale,
        None,
        None,
        lut,
        [o, c // groups, k, k],
        *_GEO[:3],
        groups,
        bits,
        group,
    )
    peak_fast = _peak_alloc_bytes(lambda: cpu.conv2d_wonly(*args))
    peak_ref = _peak_alloc_bytes(lambda: reference.conv2d_wonly(*args))
    assert peak_ref >= full_weight
    assert peak_fast <= 2 * (o * 16 * 4) + 4 * block < full_weight  # outputs (+cat) and a block


def test_wonly_block_rows():
    assert cpu.wonly_block_rows(1280, 5120, block_bytes=2**24) == 3264  # 16 MiB / (4 * 1280)
    assert cpu.wonly_block_rows(23040, 1280, block_bytes=2**24) == 256  # never below 256 rows
    assert cpu.wonly_block_rows(320, 1280, block_bytes=2**24) == 1280  # never above N


# ----------------------------------------------------------------------------- prepack cache


def test_prepacked_weight_is_cached_and_repacked_after_update(monkeypatch):
    calls = []
    real = cpu._pack_linear
    monkeypatch.setattr(cpu, "_pack_linear", lambda w, k: calls.append(1) or real(w, k))
    cpu.clear_cache()
    x = torch.randn(4, 32, generator=_gen())
    w = _int8_weight((8, 32))
    s = torch.full((8,), 0.01)
    cpu.linear_w8a8(x, w, s)
    cpu.linear_w8a8(x, w, s)
    assert len(calls) == 1
    assert cpu.PACK_CACHE.nbytes() >= w.numel()  # the packed copy: ~1 byte per weight
    w.copy_(-w)  # an in-place update bumps the version counter
    y = cpu.linear_w8a8(x, w, s)
    assert len(calls) == 2
    qx, xs, zp = _codes(x, None, None)
    ref = ((qx.long() - zp) @ w.long().T).double() * xs * 0.01
    _assert_close_rel(y, ref, 1e-6)


class _Int8Conv(torch.nn.Module):
    """Holds codes as a flat buffer and reshapes them per forward, like dq.modules.QConv2d."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qdata", _int8_weight((6, 4 * 9)))
        self.register_buffer("scale", torch.full((6,), 0.01))

    def forward(self, x):
        w = self.qdata.reshape(6, 4, 3, 3)  # a new view object every call
        return torch.ops.dq.conv2d_w8a8(x, w, self.scale, None, None, None, *_GEO)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_weight_is_packed_once_across_views_and_compiled_aliases(monkeypatch, compiled):
    calls = []
    real = cpu._pack_conv
    monkeypatch.setattr(cpu, "_pack_conv", lambda *a: calls.append(1) or real(*a))
    cpu.clear_cache()
    layer = _Int8Conv()
    run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    x = torch.randn(1, 4, 5, 5, generator=_gen())
    for _ in range(3):
        run(x)
    with torch.inference_mode():
        run(x)
    assert len(calls) == 1


def test_cache_entry_dies_with_its_weight():
    cpu.clear_cache()
    w = _int8_weight((8, 32))
    cpu.linear_w8a8(torch.randn(2, 32), w, torch.full((8,), 0.01))
    assert cpu.PACK_CACHE.nbytes() > 0
    del w
    gc.collect()
    assert cpu.PACK_CACHE.nbytes() == 0


# ----------------------------------------------------------------------------- backends


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so test backends do not leak."""
    monkeypatch.setattr(ops, "_IMPLS", copy.deepcopy(ops._IMPLS))
    return ops._IMPLS


def _small_linear():
    x = torch.randn(3, 16, generator=_gen())
    return x, _int8_weight((8, 16)), torch.full((8,), 0.02)


def test_backend_setting_and_context_manager():
    assert kernels.get_backend() == "auto"
    assert {"auto", "reference", "cpu"} <= set(kernels.available_backends())
    with kernels.use_backend("reference"):
        assert kernels.get_backend() == "reference"
        assert [b for b, _ in kernels.resolve("linear_w8a8", "cpu")] == ["reference"]
    assert kernels.get_backend() == "auto"
    order = [b for b, _ in kernels.resolve("linear_w8a8", "cpu")]
    assert order[0] == "cpu" and order[-1] == "reference"  # auto: fast first, reference last
    with pytest.raises(RuntimeError), kernels.use_backend("reference"):
        raise RuntimeError("boom")
    assert kernels.get_backend() == "auto"  # restored after an error too
    kernels.set_backend("reference")
    try:
        assert kernels.get_backend() == "reference"
    finally:
        kernels.set_backend("auto")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda-magic'"):
        kernels.set_backend("cuda-magic")
    with pytest.raises(ValueError, match="reserved"):
        kernels.register_impl("linear_w8a8", "cpu", "reference", lambda **kw: None)
    with pytest.raises(ValueError, match="unknown op"):
        kernels.register_impl("linear_w3a3", "cpu", "mine", lambda **kw: None)


def test_registered_backend_is_called_by_keyword_and_may_decline(registry):
    seen = []

    def spy(**kwargs):
        seen.append(sorted(kwargs))
        return NotImplemented  # decline: the reference runs

    kernels.register_impl("linear_w8a8", "cpu", "spy", spy)
    x, w, s = _small_linear()
    with kernels.use_backend("spy"):
        y = OPS.linear_w8a8(x, w, s)
    assert seen == [["bias", "w", "w_scale", "x", "x_scale", "x_zero_point"]]
    torch.testing.assert_close(y, reference.linear_w8a8(x, w, s), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "auto", "cpu"])
def test_ops_run_under_every_cpu_backend(backend):
    x, w, s = _small_linear()
    xs, xz = _act_params(x, True)
    xc = torch.randn(1, 4, 5, 5, generator=_gen(3))
    wc = _int8_weight((6, 4, 3, 3))
    qdata, scale, zp, lut, bits, group = _wonly_args("int4-group16", 8, 16)
    with kernels.use_backend(backend):
        outs = [
            OPS.linear_w8a8(x, w, s, None, xs, xz),
            OPS.conv2d_w8a8(
                xc, wc, torch.full((6,), 0.02), None, None, None, [1, 1], [1, 1], [1, 1], 1
            ),
            OPS.linear_wonly(x, qdata, scale, zp, None, lut, bits, group),
            OPS.conv2d_wonly(
                xc,
                wc.reshape(6, -1),
                torch.full((6,), 0.02),
                None,
                None,
                None,
                [6, 4, 3, 3],
                [1, 1],
                [0, 0],
                [1, 1],
                1,
                8,
                0,
            ),
        ]
    shapes = [tuple(o.shape) for o in outs]
    assert shapes == [(3, 8), (1, 6, 5, 5), (3, 8), (1, 6, 3, 3)]
    assert all(torch.isfinite(o).all() for o in outs)


# ----------------------------------------------------------------------------- torch.compile


def _all_ops(x, xc, w, s, wc, qdata, scale, lut):
    a = torch.ops.dq.linear_w8a8(x, w, s, None, s[0], None)
    b = torch.ops.dq.conv2d_w8a8(xc, wc, s[:6], None, None, None, [1, 1], [1, 1], [1, 1], 1)
    c = torch.ops.dq.linear_wonly(x, qdata, scale, None, None, lut, 4, 16)
    d = torch.ops.dq.conv2d_wonly(
        xc,
        wc.reshape(6, -1),
        s[:6],
        None,
        None,
        None,
        [6, 4, 3, 3],
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        8,
        0,
    )
    return a.relu() + c, b * 2 + d


def _compile_inputs():
    x, w, s = _small_linear()
    xc = torch.randn(1, 4, 5, 5, generator=_gen(3))
    wc = _int8_weight((6, 4, 3, 3))
    qdata, scale, _, lut, _, _ = _wonly_args("fp4lut-channel", 8, 16)
    scale = torch.rand(8, 1, generator=_gen(4)).expand(8, 1).contiguous()
    return x, xc, w, s, wc, qdata, scale, lut


def test_ops_trace_without_graph_breaks():
    inputs = _compile_inputs()
    compiled = torch.compile(_all_ops, backend="aot_eager", fullgraph=True)
    for y, y_eager in zip(compiled(*inputs), _all_ops(*inputs), strict=True):
        torch.testing.assert_close(y, y_eager, rtol=0, atol=0)


def test_inductor_compiles_w8a8_linear():
    x, w, s = _small_linear()

    def f(x):
        return torch.ops.dq.linear_w8a8(x, w, s, None, None, None).sigmoid()

    torch.testing.assert_close(torch.compile(f, backend="inductor")(x), f(x))


@pytest.mark.parametrize("name", ["linear_w8a8", "conv2d_w8a8", "linear_wonly", "conv2d_wonly"])
def test_opcheck(name):
    """torch.library.opcheck: schema, fake (shapes and strides) and AOT dispatch agree."""
    x, xc, w, s, wc, qdata, scale, lut = _compile_inputs()
    args = {
        "linear_w8a8": (x, w, s, None, s[0].clone(), torch.tensor(128, dtype=torch.int32)),
        "conv2d_w8a8": (xc, wc, s[:6].clone(), None, None, None, [2, 2], [1, 1], [1, 1], 1),
        "linear_wonly": (x, qdata, scale, None, s.clone(), lut, 4, 0),
        "conv2d_wonly": (
            xc,
            wc.reshape(6, -1),
            s[:6].clone(),
            None,
            None,
            None,
            [6, 4, 3, 3],
            [1, 1],
            [1, 1],
            [1, 1],
            1,
            8,
            0,
        ),
    }[name]
    torch.library.opcheck(getattr(torch.ops.dq, name).default, args)


# ----------------------------------------------------------------------------- bad inputs

_X, _W, _S = torch.randn(3, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8)
_XC, _WC = torch.randn(1, 4, 5, 5), torch.zeros(6, 4, 3, 3, dtype=torch.int8)

BAD_INPUTS = {
    "float-weight": (lambda: OPS.linear_w8a8(_X, _W.float(), _S), "w must be int8"),
    "k-mismatch": (lambda: OPS.linear_w8a8(torch.randn(3, 15), _W, _S), "does not match N=8, K=15"),
    "int-activations": (lambda: OPS.linear_w8a8(_X.long(), _W, _S), "x must be a float tensor"),
    "scale-shape": (lambda: OPS.linear_w8a8(_X, _W, torch.ones(7)), "w_scale must be float"),
    "bias-shape": (
        lambda: OPS.linear_w8a8(_X, _W, _S, torch.ones(3)),
        "bias must be a float tensor of 8",
    ),
    "zp-without-scale": (
        lambda: OPS.linear_w8a8(_X, _W, _S, None, None, torch.tensor(3)),
        "without x_scale",
    ),
    "vector-act-scale": (
        lambda: OPS.linear_w8a8(_X, _W, _S, None, torch.ones(2)),
        "x_scale must be one float",
    ),
    "conv-channels": (
        lambda: OPS.conv2d_w8a8(
            torch.randn(1, 3, 5, 5), _WC, torch.ones(6), None, None, None, *_GEO
        ),
        "input has 3 channels",
    ),
    "conv-3d-input": (
        lambda: OPS.conv2d_w8a8(torch.randn(4, 5, 5), _WC, torch.ones(6), None, None, None, *_GEO),
        "must be 4-D",
    ),
    "conv-2d-codes-no-shape": (
        lambda: OPS.conv2d_w8a8(_XC, _WC.reshape(6, -1), torch.ones(6), None, None, None, *_GEO),
        "weight_shape is missing",
    ),
    "wonly-bad-dtype": (
        lambda: OPS.linear_wonly(_X, _W.short(), _S),
        "qdata must be int8, uint8 or float8",
    ),
    "wonly-group-mismatch": (
        lambda: OPS.linear_wonly(_X, _W, torch.ones(8, 3)),
        "does not fit K=16",
    ),
    "wonly-group-size": (
        lambda: OPS.linear_wonly(_X, _W, torch.ones(8, 2), group_size=4),
        "group_size=4",
    ),
    "wonly-short-lut": (
        lambda: OPS.linear_wonly(
            _X, torch.zeros(8, 8, dtype=torch.uint8), _S, lut=torch.ones(4), bits=4
        ),
        "lut must be a float table of >= 16",
    ),
    "wonly-packed-int8": (
        lambda: OPS.linear_wonly(_X, torch.zeros(8, 8, dtype=torch.int8), _S),
        "packed 4-bit",
    ),
    "conv-wonly-shape": (
        lambda: OPS.conv2d_wonly(
            _XC, _WC.reshape(6, -1), torch.ones(6), None, None, None, [6, 4, 3], *_GEO
        ),
        "weight shape must be",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(name):
    call, match = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=match):
        call()
