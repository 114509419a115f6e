"""dq.quantize end to end on tiny offline pipelines: the three-line path, errors, identities."""

import copy

import pytest
import torch
import torch.nn.functional as F

import dq
from dq.config import LayerSpec, QuantConfig
from dq.modules import QConv2d, QLinear, QuantizedLayerMixin

PROMPTS = ["a red circle", "a blue square on a white background", "a small green triangle"]
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"


def _unet_io(pipe, seed=0):
    """A calibration-like UNet input: a noised latent, a mid timestep, real text embeddings."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    with torch.no_grad():
        ids = pipe.tokenizer(
            PROMPTS[:2],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        ctx = pipe.text_encoder(ids)[0]
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return x, torch.tensor([500, 500]), ctx


def _cos(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_w8a8_three_lines_int8_storage_and_close_to_fp(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    x, t, ctx = _unet_io(pipe)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
    out = dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 3})
    assert out is pipe
    qlayers = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLayerMixin)]
    assert len(qlayers) > 20
    assert all(m.qdata.dtype == torch.int8 for m in qlayers)
    assert not any(
        isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and not isinstance(m, QuantizedLayerMixin)
        for n, m in pipe.unet.named_modules()
        if n not in ("conv_in", "conv_out")
    )
    with torch.no_grad():
        y = pipe.unet(x, t, ctx).sample
    assert _cos(ref, y) >= 0.99
    # still a pipeline with all its usual arguments
    img = pipe(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_w4a16_unet_bytes_at_most_035_of_fp16():
    from dq.testing import tiny_sd_pipeline

    # wide enough that scales and float norms are a realistic share
    pipe = tiny_sd_pipeline(seed=0, block_out_channels=(128, 256), cross_attention_dim=64)
    fp16_bytes = sum(p.numel() * 2 for p in pipe.unet.state_dict().values())
    dq.quantize(pipe, "w4a16")
    q_bytes = sum(t.numel() * t.element_size() for t in pipe.unet.state_dict().values())
    assert q_bytes <= 0.35 * fp16_bytes, q_bytes / fp16_bytes


@pytest.mark.parametrize("preset", ["w4a16", "fp8", "w8a16", "fp4", "w4a8_uniform"])
def test_presets_run_and_stay_close(fresh_tiny_sd, preset):
    pipe = fresh_tiny_sd
    x, t, ctx = _unet_io(pipe)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
    dq.quantize(pipe, preset, calib_prompts=PROMPTS, calibration={"num_inference_steps": 2})
    with torch.no_grad():
        y = pipe.unet(x, t, ctx).sample
    assert _cos(ref, y) >= 0.95


def test_pass_through_plan_is_bit_identical(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    x, t, ctx = _unet_io(pipe)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
    names = dq.quantizable_layers(pipe.unet)
    dq.quantize(pipe, QuantConfig(default=None, layers={n: None for n in names}))
    with torch.no_grad():
        y = pipe.unet(x, t, ctx).sample
    assert torch.equal(ref, y)


def test_mixed_plan_applies_per_layer(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    names = list(dq.quantizable_layers(pipe.unet))
    lin = next(n for n in names if n.endswith("attn2.to_q"))
    conv = next(n for n in names if n.endswith("conv1"))
    cfg = QuantConfig(
        default=LayerSpec("int8"),
        layers={lin: LayerSpec("fp4_e2m1", "group16"), conv: LayerSpec("int4", "channel")},
    )
    dq.quantize(pipe, cfg)
    assert isinstance(pipe.unet.get_submodule(lin), QLinear)
    assert pipe.unet.get_submodule(lin).spec.weight == "fp4_e2m1"
    assert isinstance(pipe.unet.get_submodule(conv), QConv2d)
    assert pipe.unet.get_submodule(conv).spec.weight == "int4"


def test_errors_name_problem_and_fix(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    with pytest.raises(ValueError, match="needs a diffusers pipeline with a `unet`"):
        dq.quantize(object(), "w8a8", calib_prompts=PROMPTS)
    with pytest.raises(ValueError, match="unknown preset"):
        dq.quantize(pipe, "w3a5", calib_prompts=PROMPTS)
    with pytest.raises(ValueError, match="non-empty list"):
        dq.quantize(pipe, "w8a8", calib_prompts=[])
    with pytest.raises(ValueError, match="needs calibration"):
        dq.quantize(pipe, "w8a8")
    with pytest.raises(ValueError, match="does not have"):
        dq.quantize(pipe, QuantConfig(layers={"no.such.layer": LayerSpec()}))
    # nothing was changed by the failed calls
    assert not any(isinstance(m, QuantizedLayerMixin) for m in pipe.unet.modules())


def test_nan_in_calibration_is_a_clear_error(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    lin = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 2})
    assert not isinstance(lin, QuantizedLayerMixin)


def test_quantizing_twice_is_refused(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    dq.quantize(pipe, "w8a16")
    with pytest.raises(ValueError, match="already quantized"):
        dq.quantize(pipe, "w8a16")


def test_sdxl_w8a8(tiny_sdxl):
    pipe = copy.deepcopy(tiny_sdxl)
    dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 2})
    img = pipe(PROMPTS[0], num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(img).all()


def test_learned_rounding_and_unknown_options_are_refused(tiny_sd):
    with pytest.raises(ValueError, match="uses rounding=.learned. and needs calibration"):
        dq.quantize(tiny_sd, "w4a16", rounding="learned")  # no prompts for the generic recipe
    with pytest.raises(ValueError, match="rounding="):
        dq.quantize(tiny_sd, "w4a16", rounding="stochastic")
    with pytest.raises(TypeError):
        dq.quantize(tiny_sd, "w4a16", num_inference_steps=2)  # pipeline args go in calibration=
    with pytest.raises(ValueError, match="unknown keys"):
        dq.quantize(tiny_sd, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_step": 2})
    with pytest.raises(ValueError, match="num_inference_steps"):
        dq.quantize(tiny_sd, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 0})


def test_calibration_settings_reach_the_pipeline_call(fresh_tiny_sd, monkeypatch):
    seen = []
    orig = type(fresh_tiny_sd).__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(type(fresh_tiny_sd), "__call__", spy)
    dq.quantize(fresh_tiny_sd, "w8a8", calib_prompts=PROMPTS, progress=False,
                calibration=dq.Sampling(num_inference_steps=2, guidance_scale=1.0, batch_size=2,
                                        extra={"negative_prompt": "blurry"}))
    assert seen and all(k["num_inference_steps"] == 2 and k["guidance_scale"] == 1.0 for k in seen)
    assert all(k["negative_prompt"] == "blurry" and k["output_type"] == "latent" for k in seen)
    assert sum(len(k["prompt"]) for k in seen) == len(PROMPTS)


def test_recipe_calibration_defaults_are_used_when_none_are_given(monkeypatch):
    import dq.api
    from dq import assets, recipes

    pipe = assets.load_embedded_pipeline()
    seen = {}

    class Stop(Exception):
        pass

    def spy(pipe_, prompts, sampling, **kw):
        seen.update(prompts=prompts, sampling=sampling)
        raise Stop

    monkeypatch.setattr(dq.api, "generate", spy)
    recipe = recipes.recipe_for(pipe)
    assert recipe.name == "embedded"
    with pytest.raises(Stop):
        dq.quantize(pipe, "w8a8", progress=False)  # no prompts, no settings: the recipe's
    want = recipe.calibration.call_kwargs()
    assert seen["sampling"].call_kwargs() == want and want["num_inference_steps"] == assets.embedded_defaults()["num_inference_steps"]
    assert seen["prompts"] == recipes.calibration_prompts(recipe)[: recipe.calibration.num_prompts]
    with pytest.raises(Stop):  # a dict overrides single fields over the recipe's defaults
        dq.quantize(pipe, "w8a8", calib_prompts=["a red circle"], calibration={"num_inference_steps": 3})
    assert seen["sampling"].num_inference_steps == 3
    assert seen["sampling"].guidance_scale == want["guidance_scale"]


def _unet_error(pipes, fp=None):
    from dq.testing import tiny_sd_pipeline

    fp = fp if fp is not None else tiny_sd_pipeline(seed=0).unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=g)
    ctx = torch.randn(2, 77, fp.config.cross_attention_dim, generator=g)
    t = torch.tensor([400, 50])
    with torch.inference_mode():
        y = fp(x, t, ctx).sample
        return {m: float((p.unet(x, t, ctx).sample - y).pow(2).mean()) for m, p in pipes.items()}


def test_search_and_learned_rounding_in_the_pipeline_path_beat_nearest():
    from dq import rounding
    from dq.testing import tiny_sd_pipeline

    pipes = {}
    settings = {"learned": rounding.RoundingSettings(iterations=100), "search": None, "nearest": None}
    for mode in ("nearest", "search", "learned"):
        pipe = tiny_sd_pipeline(seed=0)
        pipes[mode] = dq.quantize(pipe, "w4a16", calib_prompts=PROMPTS, progress=False, rounding=mode,
                                  calibration={"num_inference_steps": 2},
                                  rounding_settings=settings[mode])
    err = _unet_error(pipes)
    assert err["learned"] < err["search"] < err["nearest"]
    a, b, c = (pipes[m].unet.get_submodule(f"{ATTN}.attn1.to_q") for m in ("nearest", "search", "learned"))
    assert not torch.equal(a.scale, b.scale)  # the search moved the clipping scale
    assert torch.equal(b.scale, c.scale) and not torch.equal(b.qdata, c.qdata)  # learned: from there
    assert c.qweight().on_grid()


def test_fp_split_search_stays_within_the_bytes_and_kernels_and_the_plan_names_it(tmp_path):
    from diffusers import DiffusionPipeline

    from dq.testing import tiny_sd_pipeline

    heavy = f"{ATTN}.attn2.to_v"  # heavy-tailed weights: E3M0's wider range should win there

    def pipe():
        p = tiny_sd_pipeline(seed=0)
        w = p.unet.get_submodule(heavy).weight
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            w.copy_(0.02 * torch.randn(w.shape, generator=g) / torch.rand(w.shape, generator=g).clamp_min(0.05))
        return p

    pipes = {m: dq.quantize(pipe(), "fp4", calib_prompts=PROMPTS, progress=False,
                            rounding=m, calibration={"num_inference_steps": 2})
             for m in ("nearest", "search")}
    specs = {n: m.spec for n, m in pipes["search"].unet.named_modules() if isinstance(m, QuantizedLayerMixin)}
    chosen = {s.weight for s in specs.values()}
    assert chosen <= {"fp4_e2m1", "fp4_e3m0"} and specs[heavy].weight == "fp4_e3m0"  # searched
    nbytes = {m: sum(q.quant_weight_nbytes() for q in p.unet.modules() if isinstance(q, QuantizedLayerMixin))
              for m, p in pipes.items()}
    assert nbytes["search"] == nbytes["nearest"]
    err = _unet_error(pipes, pipe().unet)
    assert err["search"] < err["nearest"]
    saved = pipes["search"].unet.config.quantization_config.to_dict()["plan"]
    assert {n: saved["layers"][n]["weight"] for n in specs} == {n: s.weight for n, s in specs.items()}
    pipes["search"].save_pretrained(tmp_path / "p")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert _unet_error({"a": loaded}) == _unet_error({"a": pipes["search"]})


def test_rounding_settings_must_match_the_mode(tiny_sd):
    from dq import rounding

    with pytest.raises(ValueError, match="takes rounding_settings=dq.rounding.SearchSettings"):
        dq.quantize(tiny_sd, "w4a16", PROMPTS, rounding="search", rounding_settings=rounding.RoundingSettings())
    with pytest.raises(ValueError, match="applies to rounding='search'"):
        dq.quantize(tiny_sd, "w4a16", PROMPTS, rounding_settings=rounding.SearchSettings())
    with pytest.raises(ValueError, match="shrink="):
        rounding.SearchSettings(shrink=(1.0, 1.5))
    with pytest.raises(ValueError, match="uses rounding='search' and needs calibration"):
        dq.quantize(tiny_sd, "w4a16", rounding="search")


def test_w4a8_is_mixed_precision_allocated_under_the_byte_budget(monkeypatch):
    import dq.sensitivity as S
    from dq.generate import Sampling
    from dq.storage import spec_nbytes
    from dq.testing import tiny_sd_pipeline

    small = S.SensitivitySettings(
        weight_candidates=("int4", "int8", "fp4_e2m1"), act_candidates=("uint8",), num_images=2,
        num_unet_calls=2, sampling=Sampling(num_inference_steps=2, guidance_scale=2.0, batch_size=3))
    calls = {"n": 0}
    real = S.analyze

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(S, "analyze", counting)
    results = {}
    for bits in (4.0, 5.0):
        pipe = tiny_sd_pipeline(seed=0)
        target = dq.MixedPrecision(avg_weight_bits=bits, sensitivity=small, name="w4a8")
        dq.quantize(pipe, target, calib_prompts=PROMPTS, progress=False,
                    calibration={"num_inference_steps": 2, "guidance_scale": 2.0})
        q = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, QuantizedLayerMixin)}
        held = sum(m.quant_weight_nbytes() for m in q.values())
        uniform = sum(spec_nbytes(LayerSpec("int4", "channel", act="uint8"), m.weight_shape) for m in q.values())
        results[bits] = (held, uniform, {m.spec.weight for m in q.values()})
        assert all(m.spec.act == "uint8" or m.spec.act is None for m in q.values())
    held, uniform, used = results[4.0]
    assert held <= uniform * 1.0001 and len(used) >= 2  # mixed, within uniform INT4's bytes
    assert results[5.0][0] > held  # a larger budget buys more bytes
    assert calls["n"] == 1  # the second budget reused the table
    with pytest.raises(ValueError, match="mixed-precision preset"):
        QuantConfig.from_preset("w4a8")
    with pytest.raises(ValueError, match="calib_prompts"):
        dq.quantize(tiny_sd_pipeline(seed=0), "w4a8")
