"""`dq.simulate.fake_quantized`: the simulated UNet equals the real quantized UNet bit for bit
(reference backend) for every preset and for a mixed plan, and the float model comes back
untouched, also after an exception."""

import copy
import random

import pytest
import torch

import dq
from dq import kernels
from dq.api import bos_candidates, prompt_independent_bos, resolve_plan
from dq.capture import capture
from dq.config import PRESETS, LayerSpec, QuantConfig
from dq.simulate import SimulatedLayer, fake_quantized

PROMPTS = ["a red circle", "a blue square", "a small green triangle"]


@pytest.fixture(scope="module")
def calibrated():
    from dq.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    record = capture(pipe, PROMPTS, num_inference_steps=2, max_bytes=0, progress=False)
    ranges = {n: record.minmax(n) for n in record.layers}
    return pipe, ranges, prompt_independent_bos(record)


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([500, 20]), ctx


def _mixed_plan(unet) -> dict:
    rng = random.Random(0)
    choices = [
        LayerSpec("int8", "channel", act="uint8", pair_limit=128), LayerSpec("int4", "channel", act="int8"),
        LayerSpec("fp4_e2m1", "channel", act="uint8"), LayerSpec("fp6_e2m3", "channel", act="uint8"),
        LayerSpec("uint4", "group16", act="uint8"), LayerSpec("fp8_e4m3", "channel", act="fp8_e4m3"),
        LayerSpec("int6", "channel", act="uint4"), LayerSpec("fp4_e3m0", "group16"),
        LayerSpec("int3", "channel"), None,
    ]
    plan = resolve_plan(unet, QuantConfig.from_preset("w8a8"))
    return {n: (rng.choice(choices) if s is not None else None) for n, s in plan.items()}


def _compare(pipe, ranges, bos, cfg: QuantConfig):
    unet = pipe.unet
    x, t, ctx = _inputs(unet)
    ctx[:, 0] = bos  # token 0 is the BOS, as a causal text encoder gives
    plan = resolve_plan(unet, cfg)
    bos_layers = bos_candidates(plan) if cfg.bos_aware else []
    real = copy.deepcopy(unet)
    dq.apply_plan(real, plan, ranges, bos=bos, bos_layers=bos_layers)
    with torch.inference_mode(), kernels.use_backend("reference"):
        y_real = real(x, t, ctx).sample
        with fake_quantized(unet, plan, ranges, bos=bos, bos_layers=bos_layers) as sim:
            assert any(isinstance(m, SimulatedLayer) for m in sim.modules())
            y_sim = sim(x, t, ctx).sample
    return y_real, y_sim


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_simulation_equals_real_modules_bit_for_bit(calibrated, preset):
    pipe, ranges, bos = calibrated
    y_real, y_sim = _compare(pipe, ranges, bos, QuantConfig.from_preset(preset))
    assert torch.equal(y_real, y_sim)
    with torch.inference_mode():
        x, t, ctx = _inputs(pipe.unet)
        y_fp = pipe.unet(x, t, ctx).sample
    assert not torch.equal(y_fp, y_sim)  # it did quantize


def test_mixed_plan_with_every_kind_of_pair_is_bit_exact(calibrated):
    pipe, ranges, bos = calibrated
    plan = _mixed_plan(pipe.unet)
    cfg = QuantConfig(default=None, layers=plan, skip=())
    y_real, y_sim = _compare(pipe, ranges, bos, cfg)
    assert torch.equal(y_real, y_sim)


def test_float_model_restored_exactly_also_after_an_exception(calibrated):
    pipe, ranges, _ = calibrated
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = dict(unet.named_modules())
    plan = resolve_plan(unet, QuantConfig.from_preset("w4a8_uniform"))
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quantized(unet, plan, ranges):
            raise RuntimeError("boom")
    after = dict(unet.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_weights_only_or_activations_only(calibrated):
    pipe, ranges, _ = calibrated
    unet = pipe.unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(name)
    spec = LayerSpec("int4", "channel", act="uint4")
    x = torch.randn(3, 7, layer.in_features)
    outs = {}
    for w, a in [(True, True), (True, False), (False, True)]:
        with torch.inference_mode(), fake_quantized(unet, {name: spec}, ranges, weights=w, activations=a):
            outs[(w, a)] = unet.get_submodule(name)(x)
    y_fp = layer(x)
    assert all(not torch.allclose(o, y_fp) for o in outs.values())
    assert not torch.allclose(outs[(True, False)], outs[(False, True)])


def test_bad_input_is_a_clear_error(calibrated):
    pipe, ranges, _ = calibrated
    name = "down_blocks.0.attentions.0.proj_in"
    with pytest.raises(ValueError, match="act_ranges has no range"):
        with fake_quantized(pipe.unet, {name: LayerSpec("int8", act="uint8")}, {}):
            pass
    q = copy.deepcopy(pipe.unet)
    dq.apply_plan(q, {name: LayerSpec("int8")})
    with pytest.raises(ValueError, match="float"):
        with fake_quantized(q, {name: LayerSpec("int8")}):
            pass
