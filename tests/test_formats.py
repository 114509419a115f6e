"""dq.formats: grids, rounding, codes and special values, checked against ml_dtypes where it has
the format and against a brute-force nearest-value reference everywhere."""

import json
import math

import numpy as np
import pytest
import torch

import dq.formats as F
from dq.formats import FPFormat, IntFormat

ml_dtypes = pytest.importorskip("ml_dtypes")

# (our format, ml_dtypes type): registered formats plus ad-hoc ones (custom bias / special rule)
ML_CASES = {
    "fp8_e4m3": (F.get("fp8_e4m3"), "float8_e4m3fn"),
    "fp8_e5m2": (F.get("fp8_e5m2"), "float8_e5m2"),
    "fp6_e3m2": (F.get("fp6_e3m2"), "float6_e3m2fn"),
    "fp6_e2m3": (F.get("fp6_e2m3"), "float6_e2m3fn"),
    "fp4_e2m1": (F.get("fp4_e2m1"), "float4_e2m1fn"),
    "e3m4-ieee": (FPFormat("e3m4", 3, 4, special="ieee"), "float8_e3m4"),
    "e4m3-ieee": (FPFormat("e4m3", 4, 3, special="ieee"), "float8_e4m3"),
    "e4m3fnuz": (FPFormat("e4m3fnuz", 4, 3, bias=8, special="fnuz"), "float8_e4m3fnuz"),
    "e4m3b11fnuz": (FPFormat("e4m3b11fnuz", 4, 3, bias=11, special="fnuz"), "float8_e4m3b11fnuz"),
    "e5m2fnuz": (FPFormat("e5m2fnuz", 5, 2, bias=16, special="fnuz"), "float8_e5m2fnuz"),
}
ML_CASES = {
    k: (f, getattr(ml_dtypes, d)) for k, (f, d) in ML_CASES.items() if hasattr(ml_dtypes, d)
}

FP_NAMES = [n for n in F.names() if F.get(n).kind == "fp"]
INT_NAMES = [n for n in F.names() if F.get(n).kind == "int"]

EXPECTED_MAX = {
    "fp8_e4m3": 448.0,
    "fp8_e5m2": 57344.0,
    "fp6_e3m2": 28.0,
    "fp6_e2m3": 7.5,
    "fp5_e2m2": 7.0,
    "fp5_e3m1": 24.0,
    "fp4_e2m1": 6.0,
    "fp4_e3m0": 16.0,
    "fp3_e2m0": 4.0,
}


def ml_round(x: np.ndarray, dt) -> np.ndarray:
    return x.astype(np.float32).astype(dt).astype(np.float32)


def round_paths(fmt, x32: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every route through round(): public float32 (native cast where torch has the dtype),
    the bit-level reference in float32 and float64, and a bfloat16 input where exact."""
    return {
        "round-f32": fmt.round(x32),
        "exact-f32": fmt._round_exact(x32),
        "round-f64": fmt.round(x32.double()).float(),
    }


def brute_round(fmt: FPFormat, x: np.ndarray) -> np.ndarray:
    """Nearest finite grid value by exhaustive search, ties to the even code, saturating."""
    grid = fmt.grid().double().numpy()
    codes = fmt.encode(fmt.grid()).numpy().astype(np.int64)
    x = np.clip(x.astype(np.float64), grid[0], grid[-1])
    d = np.abs(x[:, None] - grid[None, :])
    best = d.min(axis=1, keepdims=True)
    cand = d == best
    # among tied candidates prefer the even code
    score = np.where(cand, 1 + (codes[None, :] % 2 == 0), 0)
    return grid[score.argmax(axis=1)]


# ----- registry and definitions -----


def test_registry_has_the_documented_formats():
    expected = {f"int{b}" for b in range(2, 9)} | {f"uint{b}" for b in range(2, 9)}
    expected |= set(EXPECTED_MAX)
    assert expected <= set(F.names())


@pytest.mark.parametrize("name", list(EXPECTED_MAX))
def test_fp_max(name):
    fmt = F.get(name)
    assert fmt.max == EXPECTED_MAX[name]
    assert fmt.grid()[-1].item() == fmt.max and fmt.grid()[0].item() == -fmt.max
    assert fmt.bits == 1 + fmt.exp_bits + fmt.man_bits


@pytest.mark.parametrize("name", FP_NAMES + INT_NAMES)
def test_grid_sorted_single_zero(name):
    g = F.get(name).grid()
    assert g.dtype == torch.float32
    assert bool((g[1:] > g[:-1]).all())
    assert int((g == 0).sum()) == 1
    assert g.numel() <= 2 ** F.get(name).bits


def test_fp4_e3m0_is_powers_of_two():
    pos = [2.0**k for k in range(-2, 5)]  # 0.25 .. 16
    assert F.get("fp4_e3m0").grid().tolist() == [-v for v in reversed(pos)] + [0.0] + pos


def test_get_unknown_lists_known_names():
    with pytest.raises(ValueError, match="fp4_e2m1"):
        F.get("fp4_e9m9")


def test_register_conflict_and_overwrite():
    fmt = FPFormat("test_fmt_conflict", 2, 1)
    assert F.register(fmt) is fmt
    assert F.register(FPFormat("test_fmt_conflict", 2, 1)) == fmt  # same definition: fine
    with pytest.raises(ValueError, match="already registered"):
        F.register(FPFormat("test_fmt_conflict", 3, 0))
    F.register(FPFormat("test_fmt_conflict", 3, 0), overwrite=True)
    assert F.get("test_fmt_conflict").exp_bits == 3


@pytest.mark.parametrize(
    "name,storage,dtype",
    [
        ("int8", "int8", torch.int8),
        ("uint8", "uint8", torch.uint8),
        ("int6", "int8", None),
        ("int4", "packed4", None),
        ("uint2", "packed4", None),
        ("fp8_e4m3", "float8_e4m3fn", torch.float8_e4m3fn),
        ("fp8_e5m2", "float8_e5m2", torch.float8_e5m2),
        ("fp6_e2m3", "uint8codes", None),
        ("fp5_e3m1", "uint8codes", None),
        ("fp4_e2m1", "packed4", None),
        ("fp3_e2m0", "packed4", None),
    ],
)
def test_storage_and_torch_dtype(name, storage, dtype):
    fmt = F.get(name)
    assert fmt.storage == storage
    assert fmt.torch_dtype == dtype


def test_custom_bias_e4m3_loses_torch_dtype():
    assert F.get("fp8_e4m3").with_bias(8).torch_dtype is None
    assert F.get("fp8_e4m3").with_bias(8).storage == "uint8codes"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: IntFormat("x", 1), id="int-1bit"),
        pytest.param(lambda: IntFormat("x", 9), id="int-9bit"),
        pytest.param(lambda: IntFormat("", 4), id="int-noname"),
        pytest.param(lambda: FPFormat("x", 0, 3), id="fp-e0"),
        pytest.param(lambda: FPFormat("x", 2, -1), id="fp-m-1"),
        pytest.param(lambda: FPFormat("x", 5, 3), id="fp-9bit"),
        pytest.param(lambda: FPFormat("x", 1, 0, special="fn"), id="fp-fn-no-finite-value"),
        pytest.param(lambda: FPFormat("x", 1, 2, special="ieee"), id="fp-ieee-e1"),
        pytest.param(lambda: FPFormat("x", 2, 1, special="weird"), id="fp-special"),
        pytest.param(lambda: FPFormat("x", 4, 3, bias=200), id="fp-bias-range"),
        pytest.param(lambda: FPFormat("x", 4, 3, bias=1.5), id="fp-bias-float"),
    ],
)
def test_validation_errors(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("name", F.names())
def test_dict_round_trip(name):
    fmt = F.get(name)
    d = json.loads(json.dumps(F.to_dict(fmt)))
    assert F.from_dict(d) == fmt


# ----- FP against ml_dtypes -----


@pytest.mark.parametrize("case", list(ML_CASES))
def test_every_code_decodes_like_ml_dtypes(case):
    fmt, dt = ML_CASES[case]
    codes = np.arange(2**fmt.bits, dtype=np.uint8)
    want = codes.view(dt).astype(np.float32)
    got = fmt.decode(torch.from_numpy(codes)).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])
    assert np.array_equal(np.signbit(got[ok]), np.signbit(want[ok]))  # -0 too


@pytest.mark.parametrize("case", list(ML_CASES))
def test_range_constants_like_ml_dtypes(case):
    fmt, dt = ML_CASES[case]
    fi = ml_dtypes.finfo(dt)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    codes = np.arange(2**fmt.bits, dtype=np.uint8).view(dt).astype(np.float64)
    finite = np.unique(codes[np.isfinite(codes)])
    assert np.array_equal(fmt.grid().double().numpy(), finite)


@pytest.mark.parametrize("case", list(ML_CASES))
def test_representable_values_round_trip(case):
    fmt, dt = ML_CASES[case]
    g = torch.cat([fmt.grid(), torch.tensor([-0.0])])
    for path, r in round_paths(fmt, g).items():
        assert torch.equal(r, g), path
    codes = fmt.encode(g)
    assert codes.dtype == torch.uint8
    assert np.array_equal(codes.numpy(), g.numpy().astype(dt).view(np.uint8))
    back = fmt.decode(codes)
    assert torch.equal(back, g)
    neg_zero_lost = (g == 0) & (fmt.special == "fnuz")  # fnuz has no negative zero
    assert torch.equal(torch.signbit(back), torch.signbit(g) & ~neg_zero_lost)


@pytest.mark.parametrize("case", list(ML_CASES))
def test_midpoints_round_like_ml_dtypes(case):
    fmt, dt = ML_CASES[case]
    g = fmt.grid().double()
    mid = (g[:-1] + g[1:]) / 2  # exact in float32 for these grids
    x = mid.float()
    assert torch.equal(x.double(), mid)
    # the midpoints themselves (ties to even) and one float32 ulp either side
    x = torch.cat([x, torch.nextafter(x, x - 1), torch.nextafter(x, x + 1)])
    want = torch.from_numpy(ml_round(x.numpy(), dt))
    for path, r in round_paths(fmt, x).items():
        assert torch.equal(r, want), path


@pytest.mark.parametrize("case", list(ML_CASES))
def test_random_values_round_like_ml_dtypes(case):
    fmt, dt = ML_CASES[case]
    gen = torch.Generator().manual_seed(0)
    n = 20000
    mag = torch.exp(
        torch.empty(n).uniform_(math.log(fmt.min_subnormal / 8), math.log(fmt.max), generator=gen)
    )
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    x = torch.cat([mag * sign, torch.randn(n, generator=gen) * fmt.max / 4])
    x = x[x.abs() <= fmt.max]
    want = torch.from_numpy(ml_round(x.numpy(), dt))
    for path, r in round_paths(fmt, x).items():
        assert torch.equal(r, want), path
        assert torch.equal(fmt.decode(fmt.encode(r)), r)
    assert np.array_equal(fmt.encode(want).numpy(), want.numpy().astype(dt).view(np.uint8))


@pytest.mark.parametrize("case", list(ML_CASES))
def test_out_of_range_saturates_and_nan_stays(case):
    fmt, _ = ML_CASES[case]
    big = torch.tensor([fmt.max * 1.01, fmt.max * 1.5, fmt.max * 1000, math.inf])
    x = torch.cat([big, -big, torch.tensor([math.nan])])
    for path, r in round_paths(fmt, x).items():
        assert torch.equal(r[:4], torch.full((4,), fmt.max)), path
        assert torch.equal(r[4:8], torch.full((4,), -fmt.max)), path
        assert torch.isnan(r[8]), path


# ----- every FP format against the brute-force reference -----

EXTRA_FP = {
    "fp4_e2m1-bias0": F.get("fp4_e2m1").with_bias(0),
    "fp4_e2m1-bias3": F.get("fp4_e2m1").with_bias(3),
    "fp4_e3m0-bias5": F.get("fp4_e3m0").with_bias(5),
    "e1m2": FPFormat("e1m2", 1, 2),
    "e2m0-fn": FPFormat("e2m0fn", 2, 0, special="fn"),
    "e3m0-ieee": FPFormat("e3m0ieee", 3, 0, special="ieee"),
}
ALL_FP = {n: F.get(n) for n in FP_NAMES} | EXTRA_FP


@pytest.mark.parametrize("case", list(ALL_FP))
def test_round_matches_brute_force(case):
    fmt = ALL_FP[case]
    g = fmt.grid()
    mid = ((g[:-1].double() + g[1:].double()) / 2).float()
    gen = torch.Generator().manual_seed(1)
    x = torch.cat(
        [
            g,
            mid,
            torch.nextafter(mid, mid - 1),
            torch.nextafter(mid, mid + 1),
            torch.empty(3000).uniform_(-1.2 * fmt.max, 1.2 * fmt.max, generator=gen),
            torch.randn(3000, generator=gen) * fmt.min_normal * 2,
        ]
    )
    want = torch.from_numpy(brute_round(fmt, x.double().numpy())).float()
    for path, r in round_paths(fmt, x).items():
        assert torch.equal(r, want), path


@pytest.mark.parametrize("case", list(ALL_FP))
def test_encode_decode_all_grid_values(case):
    fmt = ALL_FP[case]
    g = fmt.grid()
    codes = fmt.encode(g)
    assert codes.dtype == torch.uint8
    assert int(codes.max()) < 2**fmt.bits
    assert len(set(codes.tolist())) == g.numel()
    assert torch.equal(fmt.decode(codes), g)


def test_m0_ties_go_to_even_code():
    fmt = F.get("fp4_e3m0")  # codes 1..7 = 0.25 .. 16; E even -> code even
    # 3 = tie between 2 (E=4) and 4 (E=5) -> 2; 6 = tie between 4 (E=5) and 8 (E=6) -> 8
    # 12 = tie between 8 (E=6) and 16 (E=7) -> 8; 0.375 between 0.25 (E=1) and 0.5 (E=2) -> 0.5
    # 0.125 = tie between 0 (code 0) and 0.25 (code 1) -> 0
    x = torch.tensor([3.0, 6.0, 12.0, 0.375, 0.125])
    assert fmt.round(x).tolist() == [2.0, 8.0, 8.0, 0.5, 0.0]


def test_custom_bias_scales_the_grid():
    base = F.get("fp4_e2m1")
    wide = base.with_bias(-1)  # bias 1 -> -1: everything x4
    assert wide.name == "fp4_e2m1_b-1"
    assert wide.max == 24.0
    assert torch.equal(wide.grid(), base.grid() * 4)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 10
    assert torch.equal(wide.round(x), base.round(x / 4) * 4)


def test_round_keeps_float_dtypes():
    fmt = F.get("fp6_e2m3")
    x = torch.tensor([0.3, -1.1, 9.0])
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        r = fmt.round(x.to(dt))
        assert r.dtype == dt
        assert torch.equal(r.float(), fmt.round(x.to(dt).float()))


def test_fp_encode_rejects_off_grid_and_unrepresentable():
    fmt = F.get("fp4_e2m1")
    with pytest.raises(ValueError, match="round them first"):
        fmt.encode(torch.tensor([0.7]))
    with pytest.raises(ValueError):
        fmt.encode(torch.tensor([math.nan]))  # finite-only: no NaN code
    with pytest.raises(ValueError):
        F.get("fp8_e4m3").encode(torch.tensor([math.inf]))  # E4M3FN has no inf
    with pytest.raises(ValueError):
        fmt.decode(torch.tensor([16]))
    assert (
        F.get("fp8_e5m2").decode(F.get("fp8_e5m2").encode(torch.tensor([-math.inf]))).item()
        == -math.inf
    )
    assert math.isnan(
        F.get("fp8_e4m3").decode(F.get("fp8_e4m3").encode(torch.tensor([math.nan]))).item()
    )


# ----- INT -----


def test_int_round_ties_to_even_and_clamps():
    fmt = F.get("int4")
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, 7.49, 100.0, -8.4, -100.0, math.inf])
    assert fmt.round(x).tolist() == [0, 2, 2, 0, -2, -2, 6, 7, 7, -8, -8, 7]
    assert torch.isnan(fmt.round(torch.tensor([math.nan]))).all()
    u = F.get("uint4")
    assert u.round(torch.tensor([-3.0, 0.5, 14.5, 15.6])).tolist() == [0, 0, 14, 15]


@pytest.mark.parametrize("name", INT_NAMES)
def test_int_ranges_and_codes(name):
    fmt = F.get(name)
    b = fmt.bits
    lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if fmt.signed else (0, 2**b - 1)
    assert (fmt.qmin, fmt.qmax, fmt.min, fmt.max) == (lo, hi, float(lo), float(hi))
    g = fmt.grid()
    assert g.tolist() == list(range(lo, hi + 1))
    codes = fmt.encode(g)
    assert codes.dtype == (torch.int8 if fmt.signed else torch.uint8)
    assert codes.tolist() == list(range(lo, hi + 1))
    assert torch.equal(fmt.decode(codes), g)


def test_int_encode_rejects_off_grid():
    with pytest.raises(ValueError, match="round them first"):
        F.get("int4").encode(torch.tensor([0.5]))
    with pytest.raises(ValueError):
        F.get("int4").encode(torch.tensor([8.0]))
    with pytest.raises(ValueError):
        F.get("int4").decode(torch.tensor([9], dtype=torch.int8))
