"""Quantized layers: real packed storage, dequantize == fake-quant maths, kernel forward ==
reference forward, for format x granularity x module type."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dq import formats, quant
from dq.config import LayerSpec
from dq.modules import QConv2d, QLinear, reference_forward

CASES = [
    ("int8", "channel", None),
    ("int8", "tensor", None),
    ("int8", "channel", "uint8"),
    ("int8", "channel", "int8"),
    ("int4", "channel", "uint8"),
    ("int4", "group16", None),
    ("uint4", "group16", None),
    ("int3", "channel", None),
    ("fp8_e4m3", "channel", None),
    ("fp8_e5m2", "channel", None),
    ("fp6_e3m2", "group16", None),
    ("fp4_e2m1", "group16", None),
    ("fp4_e3m0", "channel", None),
]
IDS = [f"{w}-{g}-a{a or 'float'}" for w, g, a in CASES]

STORAGE_DTYPES = {
    "int8": torch.int8,
    "packed4": torch.uint8,
    "uint8codes": torch.uint8,
    "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(64, 24)
    return nn.Conv2d(16, 8, 3, stride=1, padding=1)


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        return torch.randn(2, 5, 64, generator=g)
    return torch.randn(2, 16, 6, 6, generator=g)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("w,g,a", CASES, ids=IDS)
def test_codes_are_real_and_dequantize_matches_fake_quant(kind, w, g, a):
    float_layer = _layer(kind)
    x = _input(kind)
    spec = LayerSpec(w, g, act=a)
    act_range = (float(x.min()), float(x.max())) if a else None
    cls = QLinear if kind == "linear" else QConv2d
    q = cls.from_float(float_layer, spec, act_range=act_range)

    fmt = formats.get(w)
    assert q.qdata.dtype == STORAGE_DTYPES[fmt.storage]
    k = float_layer.weight[0].numel()
    expected_cols = (k + 1) // 2 if fmt.storage == "packed4" else k
    assert q.qdata.shape == (float_layer.weight.shape[0], expected_cols)
    assert not any(
        p.dtype == torch.float32 and p.shape == float_layer.weight.shape
        for p in q.state_dict().values()
    )

    w2 = float_layer.weight.detach().reshape(float_layer.weight.shape[0], -1)
    gran = quant.parse_granularity(g)
    symmetric = not (fmt.kind == "int" and not fmt.signed)  # unsigned INT weights carry a zero point
    s, zp = quant.compute_qparams(w2, fmt, gran, method=spec.weight_method, symmetric=symmetric)
    expected = quant.fake_quantize(w2, fmt, s, zp, gran).reshape(float_layer.weight.shape)
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("w,g,a", CASES, ids=IDS)
def test_kernel_forward_matches_reference(kind, w, g, a):
    float_layer = _layer(kind)
    x = _input(kind)
    act_range = (float(x.min()), float(x.max())) if a else None
    cls = QLinear if kind == "linear" else QConv2d
    q = cls.from_float(float_layer, LayerSpec(w, g, act=a), act_range=act_range)
    with torch.inference_mode():
        y = q(x)
        y_ref = reference_forward(q, x)
        y_fp = float_layer(x)
    assert y.shape == y_fp.shape and y.dtype == x.dtype
    # fast kernels differ from the reference only by accumulation order / engine rounding
    scale = y_ref.abs().max().item()
    assert (y - y_ref).abs().max().item() <= 2e-3 * scale + 1e-5
    # and the quantized layer is close to float (loose: 3-bit formats are coarse)
    assert quant.sqnr_db(y_fp, y) > (25 if formats.get(w).bits >= 8 else 6)


def test_group_size_that_does_not_divide_falls_back_to_channel():
    q = QLinear.from_float(nn.Linear(48, 8), LayerSpec("int4", "group32"))
    assert q.spec.weight_granularity == "channel"
    assert q.scale.shape == (8,)


def test_activation_spec_without_range_is_a_clear_error():
    with pytest.raises(ValueError, match="calibrated activation range"):
        QLinear.from_float(nn.Linear(16, 8), LayerSpec("int8", act="uint8"))


# every weight format with 8-bit activations: on the integer engine where the grid is int8
# once scaled by a power of two, through the reference path otherwise
WEIGHT_FORMATS = [
    ("int8", "channel"), ("int7", "channel"), ("int4", "channel"), ("int4", "group16"),
    ("int3", "channel"), ("int2", "channel"), ("uint8", "channel"), ("uint4", "group16"),
    ("fp8_e4m3", "channel"), ("fp8_e5m2", "channel"), ("fp6_e2m3", "channel"),
    ("fp6_e3m2", "channel"), ("fp5_e2m2", "channel"), ("fp5_e3m1", "channel"),
    ("fp4_e2m1", "channel"), ("fp4_e2m1", "group16"), ("fp4_e3m0", "channel"),
    ("fp3_e2m0", "channel"),
]
ENGINE_EXPECTED = {"int8", "int7", "int4", "int3", "int2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1",
                   "fp4_e3m0", "fp3_e2m0"}


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("act", ["uint8", "int8", "fp8_e4m3", "uint4"])
@pytest.mark.parametrize("w,g", WEIGHT_FORMATS, ids=[f"{w}-{g}" for w, g in WEIGHT_FORMATS])
def test_every_weight_format_runs_with_quantized_activations(kind, w, g, act):
    from dq.modules import runs_on_engine

    float_layer, x = _layer(kind), _input(kind)
    spec = LayerSpec(w, g, act=act)
    cls = QLinear if kind == "linear" else QConv2d
    q = cls.from_float(float_layer, spec, act_range=(float(x.min()), float(x.max())))
    on_engine = act in ("uint8", "int8") and w in ENGINE_EXPECTED
    assert runs_on_engine(q.spec) is on_engine
    with torch.inference_mode():
        y = q(x)
        y_ref = reference_forward(q, x)
    scale = y_ref.abs().max().item()
    assert (y - y_ref).abs().max().item() <= 2e-3 * scale + 1e-5
    # the activations really are rounded: a float input gives another output
    if act != "fp8_e4m3":
        assert not torch.allclose(y_ref, F.linear(x, q.dequantize(), q.bias) if kind == "linear"
                                  else F.conv2d(x, q.dequantize(), q.bias, 1, 1), atol=1e-6)


def test_fp_weights_on_the_engine_use_exact_int8_codes():
    from dq.modules import engine_step

    assert engine_step("fp4_e2m1") == 0.5 and engine_step("fp6_e2m3") == 0.125
    assert engine_step("fp6_e3m2") is None and engine_step("uint8") is None
    lin = nn.Linear(64, 24)
    q = QLinear.from_float(lin, LayerSpec("fp4_e2m1", act="uint8"), act_range=(-3.0, 3.0))
    codes, s = q._engine_weight()
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 12
    torch.testing.assert_close(codes.float() * s[:, None], q.dequantize(), rtol=0, atol=0)


def test_int4_storage_is_a_quarter_of_fp16():
    lin = nn.Linear(1024, 512, bias=False)
    q = QLinear.from_float(lin, LayerSpec("int4", "group64"))
    fp16_bytes = lin.weight.numel() * 2
    assert q.quant_nbytes() <= 0.3 * fp16_bytes


def test_cache_nbytes_counts_only_the_given_modules_prepacked_weights():
    from dq import kernels

    spec = LayerSpec("int8", act="uint8")
    a = QLinear.from_float(nn.Linear(256, 128), spec, act_range=(-1.0, 1.0))
    b = QLinear.from_float(nn.Linear(256, 64), spec, act_range=(-1.0, 1.0))
    with torch.inference_mode():
        a(torch.randn(4, 256))
        b(torch.randn(4, 256))
    assert kernels.cache_nbytes(a) >= 128 * 256  # one int8 prepacked copy at least
    assert kernels.cache_nbytes(b) >= 64 * 256
    assert kernels.cache_nbytes(a) < 128 * 256 * 2
    assert kernels.cache_nbytes() >= kernels.cache_nbytes(a) + kernels.cache_nbytes(b)


# ----------------------------------------------------------------------------- pair limit


def _sqnr(w, wq):
    return float(10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum()))


@pytest.mark.parametrize("shape", [(48, 96), (32, 24, 3, 3), (16, 7, 3, 3)])
def test_pair_limited_codes_meet_the_limit_between_int8_and_int7(shape):
    from dq.modules import pair_limited_codes
    from dq.quant import pair_absmax

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w2 = w.reshape(shape[0], -1)
    s_mm = w2.abs().amax(1) / 127
    s, q = pair_limited_codes(w, s_mm, 127, 128)
    assert q.shape == w2.shape and bool((q == q.round()).all()) and int(q.abs().max()) <= 127
    assert int(pair_absmax(q.reshape(shape)).max()) <= 128
    assert bool((s >= s_mm).all())
    s7 = w2.abs().amax(1) / 63  # 7-bit weights: the other way to one exact AVX2 pass
    assert _sqnr(w2, q * s[:, None]) > _sqnr(w2, (w2 / s7[:, None]).round() * s7[:, None]) + 1
    full = (w2 / s_mm[:, None]).round() * s_mm[:, None]  # no limit: the upper bound
    assert _sqnr(w2, q * s[:, None]) <= _sqnr(w2, full) + 1e-6


def test_pair_limit_keeps_min_max_scale_when_no_pair_is_large():
    from dq.modules import pair_limited_codes

    w = torch.full((4, 8), 0.005)
    w[:, 3] = 1.0  # one large weight per row: every pair sum <= 128 at the min-max scale
    s_mm = w.abs().amax(1) / 127
    s, q = pair_limited_codes(w, s_mm, 127, 128)
    torch.testing.assert_close(s, s_mm)
    assert q[:, 3].tolist() == [127.0] * 4


def test_w8a8_preset_layers_run_in_one_engine_pass(monkeypatch):
    from dq.config import PRESETS
    from dq.kernels import cpu

    monkeypatch.setattr(cpu, "INT32_DOT_PRODUCTS", False)
    torch.manual_seed(0)
    spec = PRESETS["w8a8"][0]
    lin = QLinear.from_float(nn.Linear(64, 32), spec, act_range=(-1.0, 1.0))
    assert int(quant.pair_absmax(lin.qdata).max()) <= 128
    assert cpu.safe_code_max(int(quant.pair_absmax(lin.qdata).max())) == 255
    plain = QLinear.from_float(nn.Linear(64, 32), replace(spec, pair_limit=None), act_range=(-1.0, 1.0))
    assert int(quant.pair_absmax(plain.qdata).max()) > 128  # what the limit avoids


def test_cache_nbytes_counts_the_derived_int8_copy_of_fp_weights_on_the_engine():
    from dq import kernels

    q = QLinear.from_float(nn.Linear(256, 128), LayerSpec("fp4_e2m1", act="uint8"), act_range=(-1.0, 1.0))
    with torch.inference_mode():
        q(torch.randn(4, 256))
    numel = 256 * 128
    # derived int8 codes (1 byte per weight) and the engine's packed copy of them
    assert kernels.cache_nbytes(q) >= 2 * numel
