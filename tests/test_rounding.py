"""dq.rounding: grid neighbours, learned rounding on INT and FP grids, scale and FP-format search.

Layers are synthetic: Student-t weights (heavy tails, df = 3) and correlated inputs (x = z @ A,
images smoothed in space and mixed across channels for the convolution), with held-out rows
drawn from the same distribution as the calibration rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import dq.formats as fmts
from dq import quant
from dq import rounding as R
from dq.capture import conv2d_patches
from dq.config import LayerSpec
from dq.modules import QConv2d, QLinear

# ----- synthetic layers -----


def student_t(shape, df: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t samples: z / sqrt(chi2_df / df)."""
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((df, *shape), generator=gen).square().sum(0)
    return z / (chi2 / df).sqrt()


def linear_case(seed: int = 0, out: int = 64, k: int = 256, n: int = 2048):
    """(Linear layer, calibration rows [n, k], held-out rows [n, k])."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, out)
    with torch.no_grad():
        layer.weight.copy_(student_t((out, k), 3, gen) * 0.05)
    a = torch.randn(k, k, generator=gen) / k**0.5 + 0.3 * torch.randn(1, k, generator=gen)
    rows = [torch.randn(n, k, generator=gen) @ a for _ in range(2)]
    return layer, rows[0], rows[1]


def conv_case(seed: int = 0, cin: int = 16, cout: int = 32, images: int = 8, hw: int = 16):
    """(Conv2d 3x3, calibration im2col rows, held-out rows), rows from dq.capture's layout."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(student_t(tuple(conv.weight.shape), 3, gen) * 0.05)
    mix = torch.randn(cin, cin, generator=gen) / cin**0.5 + 0.5

    def rows():
        z = F.avg_pool2d(torch.randn(images, cin, hw, hw, generator=gen), 3, 1, 1)
        x = torch.einsum("bchw,cd->bdhw", z, mix)
        return conv2d_patches(x, conv, torch.arange(images * hw * hw)), x

    (calib, _), (held, x_held) = rows(), rows()
    return conv, calib, held, x_held


def heldout_error(w: torch.Tensor, qw: quant.QWeight, x: torch.Tensor) -> float:
    return float(R.output_mse(w, qw, x).sum())


# ----- neighbours -----

NEIGHBOUR_FMTS = ["int4", "int3", "uint4", "int8", "fp4_e2m1", "fp4_e3m0", "fp6_e2m3", "fp8_e4m3"]


@pytest.mark.parametrize("name", NEIGHBOUR_FMTS)
def test_neighbours_equal_brute_force(name):
    fmt = fmts.get(name)
    grid = fmt.grid()
    gen = torch.Generator().manual_seed(1)
    span = float(grid.abs().max()) * 1.3  # beyond both ends too
    w = torch.cat([(torch.rand(500, generator=gen) * 2 - 1) * span, grid, grid[[0, -1]] * 2])
    lo, hi = R.neighbours(w, fmt)
    for v, a, b in zip(w.tolist(), lo.tolist(), hi.tolist(), strict=True):
        below = [g for g in grid.tolist() if g <= v]
        above = [g for g in grid.tolist() if g >= v]
        want_lo = max(below) if below else grid[0].item()  # saturate below the grid
        want_hi = min(above) if above else grid[-1].item()  # and above it
        assert (a, b) == (want_lo, want_hi), (v, a, b)
    # round-to-nearest always picks one of the two
    r = fmt.round(w)
    assert bool(((r == lo) | (r == hi)).all())


def test_neighbours_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        R.neighbours(torch.tensor([0.5, float("nan")]), "fp4_e2m1")


# ----- learned rounding beats round-to-nearest -----

CASES = ["int4", "fp4_e2m1", "int3"]


@pytest.fixture(scope="module")
def lin():
    torch.manual_seed(0)
    return linear_case()


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    return conv_case()


def assert_values_on_grid(qw: quant.QWeight, w: torch.Tensor):
    """Every value is a member of fmt.grid(), and the dequantized weight lies on the scaled grid."""
    grid = qw.fmt.grid()
    assert bool(torch.isin(qw.values, grid).all())
    assert qw.on_grid()
    def per_weight(p):  # [O] or [O, G] -> [O, K]
        p = p.reshape(p.shape[0], -1)
        return p.repeat_interleave(qw.values.shape[1] // p.shape[1], dim=1)

    s = per_weight(qw.scale)
    zp = torch.zeros_like(s) if qw.zero_point is None else per_weight(qw.zero_point)
    scaled_grid = (grid[None, None, :] - zp[..., None]) * s[..., None]  # [O, K, |grid|]
    deq = qw.dequantize().reshape(s.shape)
    assert bool((scaled_grid == deq[..., None]).any(-1).all())
    assert qw.shape == w.shape


@pytest.mark.parametrize("name", CASES)
def test_learned_beats_nearest_linear(name, lin):
    layer, x_cal, x_held = lin
    spec = LayerSpec(name, "channel")
    rtn = quant.quantize_weight(layer.weight, spec)
    qw = R.learn(layer.weight, spec, x_cal)
    e_rtn, e = heldout_error(layer.weight, rtn, x_held), heldout_error(layer.weight, qw, x_held)
    print(f"linear {name}: held-out output MSE {e_rtn:.4g} -> {e:.4g} ({1 - e / e_rtn:.0%} lower)")
    assert e <= 0.8 * e_rtn
    assert_values_on_grid(qw, layer.weight)
    assert torch.equal(qw.scale, rtn.scale)


@pytest.mark.parametrize("name", CASES)
def test_learned_beats_nearest_conv(name, conv):
    layer, x_cal, x_held, _ = conv
    spec = LayerSpec(name, "channel")
    rtn = quant.quantize_weight(layer.weight, spec)
    qw = R.learn(layer.weight, spec, x_cal)
    e_rtn, e = heldout_error(layer.weight, rtn, x_held), heldout_error(layer.weight, qw, x_held)
    print(f"conv {name}: held-out output MSE {e_rtn:.4g} -> {e:.4g} ({1 - e / e_rtn:.0%} lower)")
    assert e <= 0.8 * e_rtn
    assert_values_on_grid(qw, layer.weight)


def test_conv_rows_are_the_layer_output(conv):
    """The test's im2col rows really are the convolution (so its output error is the layer's)."""
    layer, _, x_rows, x_img = conv
    w2 = layer.weight.detach().reshape(layer.out_channels, -1)
    y = layer(x_img).detach().permute(0, 2, 3, 1).reshape(-1, layer.out_channels)
    torch.testing.assert_close(x_rows @ w2.T + layer.bias.detach(), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gran", ["group32", "tensor"])
@pytest.mark.parametrize("name", ["int4", "fp4_e2m1", "uint4"])
def test_granularity_and_zero_point(name, gran, lin):
    layer, x_cal, x_held = lin
    spec = LayerSpec(name, gran)
    rtn = quant.quantize_weight(layer.weight, spec)
    qw = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=200))
    assert qw.scale.shape == rtn.scale.shape and torch.equal(qw.scale, rtn.scale)
    if rtn.zero_point is None:
        assert qw.zero_point is None
    else:
        assert torch.equal(qw.zero_point, rtn.zero_point)
    assert_values_on_grid(qw, layer.weight)
    assert heldout_error(layer.weight, qw, x_held) < 0.8 * heldout_error(layer.weight, rtn, x_held)


def test_pair_limit_kept(lin, monkeypatch):
    """pair_limit survives learning: pairs that rounding pushes over the cap are fixed."""
    _, x_cal, x_held = lin
    gen = torch.Generator().manual_seed(3)
    u = 0.2 + 0.6 * torch.rand(64, 128, generator=gen)  # every pair |a| + |b| just under 1
    mag = torch.stack([u, 1 - u - 0.01 * torch.rand(64, 128, generator=gen)], 2).reshape(64, 256)
    w = torch.sign(torch.randn(64, 256, generator=gen)) * mag
    spec = LayerSpec("int4", "channel", pair_limit=8)
    over = []
    fix = R._fix_pairs

    def counting_fix(values, w_scaled, limit):
        over.append(int((values[:, 0::2].abs() + values[:, 1::2].abs() > limit).sum()))
        return fix(values, w_scaled, limit)

    monkeypatch.setattr(R, "_fix_pairs", counting_fix)
    rtn = quant.quantize_weight(w, spec)
    qw = R.learn(w, spec, x_cal, R.RoundingSettings(iterations=200))
    assert over and over[0] > 0  # learning did push pairs over the cap ...
    assert int(quant.pair_absmax(qw.values.round().to(torch.int32)).max()) <= 8  # ... fixed
    assert torch.equal(qw.scale, rtn.scale)  # the pair-limited scale
    assert qw.on_grid()
    assert heldout_error(w, qw, x_held) < 0.8 * heldout_error(w, rtn, x_held)


def test_zero_iterations_is_round_to_nearest(conv):
    layer, x_cal, _, _ = conv
    for name in CASES:
        spec = LayerSpec(name, "channel")
        qw = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=0))
        assert torch.equal(qw.values, quant.quantize_weight(layer.weight, spec).values)


def test_minibatch_path(lin):
    """Batches smaller than both the rows and the inputs per row: sampled rows each step."""
    layer, x_cal, x_held = lin
    spec = LayerSpec("int4", "channel")
    rtn = quant.quantize_weight(layer.weight, spec)
    qw = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=200, batch_size=128))
    assert qw.on_grid()
    assert heldout_error(layer.weight, qw, x_held) < 0.8 * heldout_error(layer.weight, rtn, x_held)


def test_searched_scale_is_reused(lin):
    layer, x_cal, _ = lin
    spec = LayerSpec("fp4_e2m1", "channel")
    qs = R.search_scale(layer.weight, spec, x_cal)
    qw = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=100), scale=qs.scale)
    assert torch.equal(qw.scale, qs.scale)
    assert float(R.output_mse(layer.weight, qw, x_cal).sum()) <= float(
        R.output_mse(layer.weight, qs, x_cal).sum()
    )


# ----- row weights -----


def test_timestep_row_weights_balance_timesteps():
    r = R.timestep_row_weights(torch.tensor([0, 0, 0, 1, 2, 2]))
    assert r.mean().item() == pytest.approx(1.0)
    per_t = [float(r[torch.tensor([0, 0, 0, 1, 2, 2]) == t].sum()) for t in range(3)]
    assert per_t == pytest.approx([2.0, 2.0, 2.0])
    r = R.timestep_row_weights(torch.tensor([0, 1, 1]), [3.0, 1.0])
    assert r.tolist() == pytest.approx([2.25, 0.375, 0.375])
    with pytest.raises(ValueError, match="one weight per captured timestep"):
        R.timestep_row_weights(torch.tensor([0, 3]), [1.0, 1.0])


def test_zero_row_weights_drop_rows(lin):
    """Rows of weight 0 do not count: the result matches learning on the other rows alone."""
    layer, x_cal, x_held = lin
    spec = LayerSpec("int4", "channel")
    st = R.RoundingSettings(iterations=150)
    half = x_cal.shape[0] // 2
    r = torch.cat([torch.ones(half), torch.zeros(x_cal.shape[0] - half)])
    a = R.learn(layer.weight, spec, x_cal, st, row_weights=r)
    b = R.learn(layer.weight, spec, x_cal[:half], st)
    ea, eb = heldout_error(layer.weight, a, x_held), heldout_error(layer.weight, b, x_held)
    assert ea == pytest.approx(eb, rel=0.02)
    off = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=150,
                  timestep_weighting="none"), row_weights=r)
    assert torch.equal(off.values, R.learn(layer.weight, spec, x_cal, st).values)


# ----- stored exactly, saved and reloaded -----


@pytest.mark.parametrize("name", ["int4", "fp4_e2m1", "int3"])
def test_stored_and_reloaded_exactly(name, lin, conv, tmp_path):
    for layer, x_cal, make_shell in (
        (lin[0], lin[1], lambda m, s: QLinear(m.in_features, m.out_features, True, s)),
        (conv[0], conv[1], lambda m, s: QConv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups, True, s)),
    ):
        spec = LayerSpec(name, "channel")
        qw = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=100))
        assert not torch.equal(qw.values, quant.quantize_weight(layer.weight, spec).values)
        cls = QLinear if isinstance(layer, nn.Linear) else QConv2d
        q = cls.from_qweight(layer, qw, spec)
        assert torch.equal(q.qweight().values, qw.values)  # stored as given, never re-rounded
        assert torch.equal(q.qweight().scale, qw.scale)
        path = tmp_path / f"{name}_{cls.__name__}.safetensors"
        save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(path))
        shell = make_shell(layer, spec)
        shell.load_state_dict(load_file(str(path)))
        assert torch.equal(shell.qdata, q.qdata)  # the packed codes
        assert torch.equal(shell.qweight().values, qw.values)
        torch.testing.assert_close(shell.dequantize(), qw.dequantize(), rtol=0, atol=0)


# ----- scale and format search -----


@pytest.mark.parametrize("gran", ["channel", "tensor", "group32"])
@pytest.mark.parametrize("name", ["int4", "fp4_e2m1", "uint4"])
def test_search_scale_lowers_output_error(name, gran, lin):
    layer, x_cal, _ = lin
    spec = LayerSpec(name, gran)
    minmax = quant.quantize_weight(layer.weight, spec)
    qs = R.search_scale(layer.weight, spec, x_cal)
    e0 = R.output_mse(layer.weight, minmax, x_cal)
    e1 = R.output_mse(layer.weight, qs, x_cal)
    assert float(e1.sum()) < float(e0.sum())
    if gran == "channel":
        assert bool((e1 <= e0 * (1 + 1e-6)).all())  # per channel never worse
    if gran == "tensor":
        ratio = qs.scale / minmax.scale
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))  # one factor
    assert bool((qs.scale <= minmax.scale * (1 + 1e-6)).all())  # shrink only
    assert qs.on_grid()


def test_search_scale_with_pair_limit(lin):
    layer, x_cal, _ = lin
    spec = LayerSpec("int8", "channel", pair_limit=128)
    qs = R.search_scale(layer.weight, spec, x_cal)
    assert int(quant.pair_absmax(qs.values.round().to(torch.int32)).max()) <= 128


@pytest.mark.parametrize("bits", [4, 6])
def test_search_fp_format(bits, conv):
    layer, x_cal, _, _ = conv
    fmt, qw = R.search_fp_format(layer.weight, bits, x_cal, granularity="channel")
    names = {4: {"fp4_e2m1", "fp4_e3m0"}, 6: {"fp6_e2m3", "fp6_e3m2"}}[bits]
    assert fmt.name in names and fmt.bits == bits and qw.fmt == fmt
    assert fmt in R.fp_formats_of_width(bits)  # a registered format: the plan can name it
    default = R.fp_formats_of_width(bits)[0]
    e = float(R.output_mse(layer.weight, qw, x_cal).sum())
    for ref in (
        quant.quantize_weight(layer.weight, LayerSpec(default.name, "channel")),  # plain default
        R.search_scale(layer.weight, LayerSpec(default.name, "channel"), x_cal),
    ):
        assert e <= float(R.output_mse(layer.weight, ref, x_cal).sum())
    spec = LayerSpec(fmt.name, "channel")
    learned = R.learn(layer.weight, spec, x_cal, R.RoundingSettings(iterations=100), scale=qw.scale)
    assert learned.fmt == fmt and learned.on_grid()


def test_exponent_bias_is_a_scale_change(conv):
    """What search_fp_format leaves out: a bias-shifted E2M1 gives the same error (up to fp32
    rounding) as E2M1 once the scale is searched, because its grid is E2M1's times 2**-2."""
    layer, x_cal, _, _ = conv
    e2m1 = fmts.get("fp4_e2m1")
    shifted = e2m1.with_bias(e2m1.bias + 2)
    _, qa = R.search_fp_format(layer.weight, 4, x_cal, candidates=[e2m1])
    fmt_b, qb = R.search_fp_format(layer.weight, 4, x_cal, candidates=[shifted])
    assert fmt_b == shifted
    ea = float(R.output_mse(layer.weight, qa, x_cal).sum())
    eb = float(R.output_mse(layer.weight, qb, x_cal).sum())
    assert eb == pytest.approx(ea, rel=1e-4)
    torch.testing.assert_close(qb.dequantize(), qa.dequantize())


def test_search_fp_format_bad_width(conv):
    layer, x_cal, _, _ = conv
    with pytest.raises(ValueError, match="no registered FP format has 7 bits"):
        R.search_fp_format(layer.weight, 7, x_cal)
    with pytest.raises(ValueError, match="not 4-bit"):
        R.search_fp_format(layer.weight, 4, x_cal, candidates=["fp6_e2m3"])


# ----- bias correction -----


def test_bias_correction_lowers_heldout_error(lin):
    layer, x_cal, x_held = lin
    shift = torch.linspace(-1, 2, x_cal.shape[1])  # non-zero-mean inputs (post-SiLU-like)
    x_cal, x_held = x_cal + shift, x_held + shift
    spec = LayerSpec("int3", "channel")
    for qw in (quant.quantize_weight(layer.weight, spec), R.learn(layer.weight, spec, x_cal,
               R.RoundingSettings(iterations=200, bias_correction=True))):
        delta = R.bias_correction(layer.weight, qw, x_cal)
        assert delta.shape == (layer.out_features,)
        w2 = layer.weight.detach()
        err = x_held @ (w2 - qw.dequantize()).T  # [N, O], y - y_hat
        assert float((err - delta).square().mean()) < float(err.square().mean())


# ----- bad input -----


def test_bad_inputs_raise_clear_errors(lin):
    layer, x_cal, _ = lin
    w, spec = layer.weight, LayerSpec("int4", "channel")
    with pytest.raises(ValueError, match=r"needs rows \[N, 256\]"):
        R.learn(w, spec, x_cal[:, :100])
    with pytest.raises(ValueError, match=r"needs rows \[N, 256\]"):
        R.learn(w, spec, x_cal[0])
    bad = x_cal.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        R.learn(w, spec, bad)
    with pytest.raises(ValueError, match="empty"):
        R.learn(w, spec, x_cal[:0])
    with pytest.raises(ValueError, match="float tensor"):
        R.learn(w, spec, x_cal.long())
    wn = w.detach().clone()
    wn[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        R.learn(wn, spec, x_cal)
    with pytest.raises(ValueError, match="one per row"):
        R.learn(w, spec, x_cal, row_weights=torch.ones(5))
    with pytest.raises(ValueError, match="not all 0"):
        R.learn(w, spec, x_cal, row_weights=torch.zeros(x_cal.shape[0]))
    for fn in (R.search_scale, R.bias_correction):
        with pytest.raises(ValueError, match="needs rows"):
            fn(w, spec if fn is R.search_scale else quant.quantize_weight(w, spec), x_cal[:, :3])
    with pytest.raises(ValueError, match="shrink factors"):
        R.search_scale(w, spec, x_cal, candidates=[1.5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iterations": -1}, "iterations"),
        ({"lr": 0.0}, "lr"),
        ({"reg_weight": -1.0}, "reg_weight"),
        ({"beta_start": 2.0, "beta_end": 20.0}, "beta_start"),
        ({"warmup": 1.0}, "warmup"),
        ({"batch_size": 0}, "batch_size"),
        ({"timestep_weighting": "noise"}, "timestep_weighting"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_settings_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.RoundingSettings(**kwargs)


def test_beta_schedule():
    st = R.RoundingSettings(iterations=100)
    assert R.beta_at(0, st) is None and R.beta_at(19, st) is None  # 20% warm-up
    assert R.beta_at(20, st) == pytest.approx(20.0)
    assert R.beta_at(99, st) == pytest.approx(2.0, abs=0.3)
    h = torch.tensor([0.0, 1.0, 0.5])
    assert float(R.rounding_regulariser(h, 2.0)) == pytest.approx(1.0)
    frac = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(R.rectified_sigmoid(R.init_logits(frac)), frac)
