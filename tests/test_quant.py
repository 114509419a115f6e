"""dq.quant: granularity, scale estimation, quantize / dequantize error bounds, packing, SQNR."""

import math

import pytest
import torch

import dq.formats as F
import dq.quant as Q
from dq.quant import PerChannel, PerGroup, PerTensor

FMTS = ["int8", "int4", "int3", "uint8", "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp4_e2m1", "fp4_e3m0"]
GRANS = ["tensor", "channel", "group32", "group16"]
METHODS = ["minmax", "percentile", "mse"]


def weight(seed=0, shape=(16, 4, 4, 4), heavy=False):
    """A seeded conv-like weight [O, I, kh, kw] with per-channel magnitudes spanning 100x."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    if heavy:  # student-t-like tails: the MSE search has something to clip
        w = w / torch.rand(shape, generator=gen).clamp_min(0.05).sqrt()
    mags = torch.logspace(-1, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return w * mags


def error_bound(x, fmt, scale, zp, g):
    """Largest |x - x_hat| allowed, in the layout: half a grid step around each value."""
    xl = Q.to_layout(x, Q.parse_granularity(g))
    if fmt.kind == "int":
        return (scale / 2).expand_as(xl)
    y = (xl / scale).abs().clamp_max(fmt.max)
    half_ulp = torch.maximum(y * 2.0 ** -(fmt.man_bits + 1), torch.tensor(fmt.min_subnormal / 2))
    return half_ulp * scale


@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("name", FMTS)
def test_quantize_error_bound(name, g):
    fmt = F.get(name)
    x = weight()
    if not (fmt.kind == "int" and not fmt.signed):
        scale, zp = Q.compute_qparams(x, fmt, g)
    else:  # unsigned INT: asymmetric
        scale, zp = Q.compute_qparams(x, fmt, g, symmetric=False)
    assert scale.shape == Q.param_shape(x.shape, Q.parse_granularity(g))
    assert scale.dtype == torch.float32 and bool((scale > 0).all())
    q = Q.quantize(x, fmt, scale, zp, g)
    assert q.shape == x.shape and q.dtype == torch.float32
    assert bool(torch.isin(q, fmt.grid()).all())  # on the grid
    x_hat = Q.dequantize(q, scale, zp, g)
    err = (
        Q.to_layout(x, Q.parse_granularity(g)) - Q.to_layout(x_hat, Q.parse_granularity(g))
    ).abs()
    bound = error_bound(x, fmt, scale, zp, g)
    assert bool((err <= bound * (1 + 1e-5) + 1e-12).all())
    assert torch.equal(Q.fake_quantize(x, fmt, scale, zp, g), x_hat)


@pytest.mark.parametrize("g", GRANS)
def test_finer_granularity_is_not_worse(g):
    x = weight(heavy=True)
    sq = {}
    for gg in ("tensor", g):
        s, zp = Q.compute_qparams(x, "int4", gg)
        sq[gg] = Q.sqnr_db(x, Q.fake_quantize(x, "int4", s, zp, gg))
    assert sq[g] >= sq["tensor"] - 1e-9


@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("name", ["int8", "int4", "uint8", "uint4", "int2"])
def test_asymmetric_int_covers_min_max(name, g):
    fmt = F.get(name)
    x = weight(1) + 0.3  # off-centre data
    scale, zp = Q.compute_qparams(x, fmt, g, symmetric=False)
    assert zp.dtype == torch.int32 and zp.shape == scale.shape
    assert bool(((zp >= fmt.qmin) & (zp <= fmt.qmax)).all())
    x_hat = Q.fake_quantize(x, fmt, scale, zp, g)
    xl, xhl = (Q.to_layout(t, Q.parse_granularity(g)) for t in (x, x_hat))
    assert bool(((xl - xhl).abs() <= scale / 2 * (1 + 1e-5)).all())  # extremes included
    # 0 is exactly representable
    zero = Q.fake_quantize(torch.zeros_like(x), fmt, scale, zp, g)
    assert torch.equal(zero, torch.zeros_like(x))


def test_asymmetric_beats_symmetric_on_one_sided_data():
    x = weight(2).abs()
    s_sym, _ = Q.compute_qparams(x, "int4", "channel")
    s_asym, zp = Q.compute_qparams(x, "int4", "channel", symmetric=False)
    sym = Q.sqnr_db(x, Q.fake_quantize(x, "int4", s_sym, None, "channel"))
    asym = Q.sqnr_db(x, Q.fake_quantize(x, "int4", s_asym, zp, "channel"))
    assert asym > sym + 3


@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("name", ["int8", "int4", "int2", "fp8_e4m3", "fp4_e2m1", "fp4_e3m0"])
def test_mse_never_worse_than_minmax(name, g):
    x = weight(3, heavy=True)
    gg = Q.parse_granularity(g)

    def row_mse(method):
        s, zp = Q.compute_qparams(x, name, g, method=method, mse_grid=50)
        e = (Q.fake_quantize(x, name, s, zp, g) - x) ** 2
        return Q._rows(Q.to_layout(e, gg), gg).sum(dim=1)

    mm, mse = row_mse("minmax"), row_mse("mse")
    assert bool((mse <= mm).all())
    if name in ("int4", "int2"):
        assert mse.sum() < 0.95 * mm.sum()  # the search clips the tails for coarse grids


def test_mse_asymmetric_never_worse():
    x = weight(4, heavy=True) + 1.0
    errs = {}
    for method in ("minmax", "mse"):
        s, zp = Q.compute_qparams(x, "uint4", "channel", method=method, symmetric=False)
        errs[method] = ((Q.fake_quantize(x, "uint4", s, zp, "channel") - x) ** 2).sum(dim=(1, 2, 3))
    assert bool((errs["mse"] <= errs["minmax"]).all())


def test_percentile_clips_outliers():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 1000.0
    s_mm, _ = Q.compute_qparams(x, "int8", "channel")
    s_p, _ = Q.compute_qparams(x, "int8", "channel", method="percentile", percentile=0.99)
    assert bool((s_p < s_mm / 100).all())
    s_p1, _ = Q.compute_qparams(x, "int8", "channel", method="percentile", percentile=1.0)
    assert torch.equal(s_p1, s_mm)
    s_pa, zp = Q.compute_qparams(x, "int8", "tensor", method="percentile", symmetric=False)
    assert s_pa.item() < 0.1 and zp is not None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name,symmetric",
    [("int8", True), ("uint8", False), ("int4", False), ("fp4_e2m1", True), ("fp8_e4m3", True)],
)
def test_zero_channels_do_not_make_nan(name, symmetric, method):
    x = weight(6)
    x[3] = 0
    x[7] = 0
    for g in ("channel", "group16", "tensor"):
        xx = torch.zeros_like(x) if g == "tensor" else x
        s, zp = Q.compute_qparams(xx, name, g, method=method, symmetric=symmetric)
        assert bool(torch.isfinite(s).all() & (s > 0).all())
        zero_rows = s.flatten() if g == "tensor" else s[[3, 7]].flatten()
        assert bool((zero_rows == 1).all())  # a zero range gets scale 1 (safe in any dtype)
        x_hat = Q.fake_quantize(xx, name, s, zp, g)
        assert bool(torch.isfinite(x_hat).all())
        assert torch.equal(x_hat[3], torch.zeros_like(x_hat[3]))
        assert torch.equal(x_hat[7], torch.zeros_like(x_hat[7]))


def test_tiny_values_do_not_underflow_the_scale():
    x = torch.full((2, 8), 1e-44)
    s, _ = Q.compute_qparams(x, "int8", "channel")
    assert bool((s > 0).all()) and bool(
        torch.isfinite(Q.fake_quantize(x, "int8", s, None, "channel")).all()
    )


@pytest.mark.parametrize(
    "name", ["int8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1"]
)
def test_fake_quant_equals_real_quant(name):
    """Identity: encode -> stored codes -> decode -> dequantize reproduces fake quantization."""
    fmt = F.get(name)
    x = weight(7)
    g = PerGroup(32)
    s, zp = Q.compute_qparams(x, fmt, g, symmetric=fmt.kind == "fp" or fmt.signed)
    codes = fmt.encode(Q.quantize(x, fmt, s, zp, g))
    if fmt.storage == "packed4":
        flat = codes.reshape(x.shape[0], -1)
        stored = Q.pack_int4(flat)
        codes = Q.unpack_int4(stored, signed=fmt.kind == "int" and fmt.signed).reshape(x.shape)
    x_real = Q.dequantize(fmt.decode(codes), s, zp, g)
    assert torch.equal(x_real, Q.fake_quantize(x, fmt, s, zp, g))


def test_per_group_groups_consecutive_flattened_elements():
    # [O=2, I=2, kh=1, kw=4] -> rows of 8 -> groups of 4: each group has its own absmax
    x = torch.tensor([[[[1.0, -2, 0, 0]], [[0, 0, 0, 4]]], [[[8.0, 0, 0, 0]], [[0, -16, 0, 0]]]])
    s, _ = Q.compute_qparams(x, "int8", PerGroup(4))
    assert s.shape == (2, 2, 1)
    assert torch.allclose(s.flatten(), torch.tensor([2.0, 4.0, 8.0, 16.0]) / 127)


@pytest.mark.parametrize(
    "g,shape",
    [
        ("tensor", ()),
        ("channel", (16, 1, 1, 1)),
        ("channel:1", (1, 4, 1, 1)),
        ("channel:-1", (1, 1, 1, 4)),
        ("group16", (16, 4, 1)),
        ("group64", (16, 1, 1)),
    ],
)
def test_param_shapes(g, shape):
    x = weight()
    s, _ = Q.compute_qparams(x, "int8", g)
    assert tuple(s.shape) == shape
    assert torch.equal(Q.from_layout(Q.to_layout(x, Q.parse_granularity(g)), x.shape, g), x)


def test_compact_scale_shapes_are_accepted():
    x = weight()
    s, _ = Q.compute_qparams(x, "int4", "channel")
    assert torch.equal(
        Q.fake_quantize(x, "int4", s.flatten(), None, "channel"),
        Q.fake_quantize(x, "int4", s, None, "channel"),
    )
    s, zp = Q.compute_qparams(x, "uint4", "group16", symmetric=False)
    assert torch.equal(
        Q.fake_quantize(x, "uint4", s.squeeze(-1), zp.squeeze(-1), "group16"),
        Q.fake_quantize(x, "uint4", s, zp, "group16"),
    )


def test_linear_and_1d_inputs():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(8))
    s, _ = Q.compute_qparams(w, "fp4_e2m1", "group32")
    assert s.shape == (8, 2, 1)
    b = torch.randn(64, generator=torch.Generator().manual_seed(9))
    s, _ = Q.compute_qparams(b, "int8", "group32")
    assert s.shape == (1, 2, 1)
    assert Q.fake_quantize(b, "int8", s, None, "group32").shape == (64,)


@pytest.mark.parametrize(
    "g",
    [PerTensor(), PerChannel(), PerChannel(1), PerChannel(-1), PerGroup(64), PerGroup(1)],
    ids=str,
)
def test_granularity_str_round_trip(g):
    assert Q.parse_granularity(str(g)) == g


def test_parse_granularity_spellings():
    assert Q.parse_granularity("per_channel") == PerChannel(0)
    assert Q.parse_granularity(" GROUP128 ") == PerGroup(128)
    assert Q.parse_granularity("group:32") == PerGroup(32)
    assert Q.parse_granularity("per-tensor") == PerTensor()
    assert Q.parse_granularity(PerGroup(8)) == PerGroup(8)


# ----- bad input -----


def test_group_size_that_does_not_divide_names_alternatives():
    with pytest.raises(ValueError, match=r"divisible.*\b(32|64)\b"):
        Q.compute_qparams(weight(), "int4", PerGroup(48))  # row length 64


def qp(**kw):
    """compute_qparams on the test weight, int4 per channel unless overridden."""
    args = {"fmt": "int4", "granularity": "channel"} | kw
    x = args.pop("x", weight())
    return lambda: Q.compute_qparams(x, **args)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(qp(fmt="fp4_e2m1", symmetric=False), "symmetric", id="fp-asym"),
        pytest.param(qp(method="kl"), "method", id="method"),
        pytest.param(qp(granularity="blocks"), "granularity", id="granularity"),
        pytest.param(qp(fmt="int9"), "unknown format", id="format"),
        pytest.param(qp(granularity=PerChannel(4)), "axis", id="axis"),
        pytest.param(qp(method="percentile", percentile=1.5), "percentile", id="percentile"),
        pytest.param(qp(method="mse", mse_grid=0), "mse_grid", id="mse-grid"),
        pytest.param(qp(x=weight().int()), "float", id="int-input"),
        pytest.param(qp(x=torch.zeros(0, 4)), "empty", id="empty"),
        pytest.param(
            lambda: Q.quantize(weight(), "int4", torch.ones(3), None, "channel"),
            "scale",
            id="scale-shape",
        ),
        pytest.param(
            lambda: Q.quantize(weight(), "fp4_e2m1", torch.ones(16), torch.zeros(16), "channel"),
            "zero_point",
            id="fp-zero-point",
        ),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nonfinite_input_errors():
    x = weight()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        Q.compute_qparams(x, "int8", "channel")


def test_bad_granularity_values():
    with pytest.raises(ValueError):
        PerGroup(0)
    with pytest.raises(ValueError):
        PerChannel(1.5)


# ----- packing -----


def test_pack_int4_round_trip_and_nibble_order():
    assert Q.pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    gen = torch.Generator().manual_seed(10)
    codes = torch.randint(0, 16, (3, 5, 8), generator=gen).to(torch.uint8)
    packed = Q.pack_int4(codes)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_int4(packed), codes)


def test_pack_signed_int4_via_offset():
    q = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(Q.signed_to_offset(q), torch.arange(16, dtype=torch.uint8))
    assert torch.equal(Q.offset_to_signed(torch.arange(16, dtype=torch.uint8)), q)
    assert torch.equal(Q.unpack_int4(Q.pack_int4(q), signed=True), q)
    assert torch.equal(
        Q.offset_to_signed(Q.signed_to_offset(torch.tensor([-2, 1]), 2), 2),
        torch.tensor([-2, 1], dtype=torch.int8),
    )


@pytest.mark.parametrize(
    "codes,match",
    [
        (torch.zeros(3, dtype=torch.uint8), "even"),
        (torch.tensor([16, 0], dtype=torch.uint8), r"\[0, 15\]"),
        (torch.tensor([9, 0], dtype=torch.int8), "outside"),
        (torch.zeros(2, dtype=torch.int32), "uint8"),
    ],
    ids=["odd", "uint8-range", "int8-range", "dtype"],
)
def test_pack_int4_errors(codes, match):
    with pytest.raises(ValueError, match=match):
        Q.pack_int4(codes)


# ----- SQNR -----


def test_sqnr_db():
    x = torch.randn(100, generator=torch.Generator().manual_seed(11))
    assert Q.sqnr_db(x, x.clone()) == math.inf
    assert Q.sqnr_db(torch.ones(100), torch.full((100,), 1.1)) == pytest.approx(20.0, abs=1e-4)
    assert Q.sqnr_db(torch.zeros(4), torch.ones(4)) == -math.inf
    with pytest.raises(ValueError, match="shapes"):
        Q.sqnr_db(torch.ones(3), torch.ones(4))


def test_sqnr_orders_bit_widths():
    x = weight(12)
    sq = []
    for name in ("int2", "int4", "int8"):
        s, _ = Q.compute_qparams(x, name, "channel")
        sq.append(Q.sqnr_db(x, Q.fake_quantize(x, name, s, None, "channel")))
    assert sq[0] < sq[1] < sq[2]
    assert sq[2] > 35  # ~6 dB per bit


@pytest.mark.parametrize("name", ["int4", "uint4", "fp4_e2m1", "fp8_e4m3", "fp6_e3m2"])
def test_inputs_are_not_modified(name):
    x = weight(13)
    x0 = x.clone()
    s, zp = Q.compute_qparams(x, name, "group16", method="mse", symmetric=name != "uint4")
    Q.fake_quantize(x, name, s, zp, "group16")
    F.get(name).round(x)
    assert torch.equal(x, x0)
