"""dq.recipes: every recipe against its real architecture on `meta`, detection, prompts, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dq import assets, formats, recipes
from dq.recipes import Calibration, Recipe

WITH_CONFIG = [n for n in recipes.names() if recipes.get(n).unet_config is not None]
# (quantizable layers, content, quality, parameters) of the real architectures. SDXL's split is
# the one MixDQ reports for SDXL-Turbo (794 layers: 420 content, 374 quality).
EXPECTED = {
    "sd15": (282, 96, 186, 859_520_964),
    "sd21": (282, 96, 186, 865_910_724),
    "sdxl": (794, 420, 374, 2_567_463_684),
}


def _layers(unet: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


@pytest.fixture(scope="module")
def meta_unets() -> dict[str, nn.Module]:
    return {n: recipes.meta_unet(n) for n in WITH_CONFIG}


def test_registry_names_and_lookup():
    assert recipes.names() == [
        "sd15", "sd21", "sd_turbo", "sdxl", "sdxl_turbo", "lcm_lora_sd15", "lcm_lora_sdxl",
        "embedded", "generic",
    ]  # fmt: skip
    for n in recipes.names():
        r = recipes.get(n)
        assert isinstance(r, Recipe) and r.name == n
    assert recipes.get("SDXL-Turbo").name == "sdxl_turbo"
    r = recipes.get("sd15")
    assert recipes.get(r) is r
    assert set(WITH_CONFIG) == set(recipes.names()) - {"generic"}


@pytest.mark.parametrize("bad", ["sd3", "", "flux-dev"])
def test_unknown_name_lists_known_recipes(bad):
    with pytest.raises(ValueError, match=r"unknown recipe .*known recipes: sd15, sd21, sd_turbo"):
        recipes.get(bad)


def test_generic_has_no_unet_to_build():
    with pytest.raises(ValueError, match="no UNet config.*sd15"):
        recipes.meta_unet("generic")


def test_candidate_formats_are_registered():
    known = formats.names()
    assert recipes.WEIGHT_FORMATS == (
        "int2", "int3", "int4", "int6", "int8", "fp4_e2m1", "fp4_e3m0", "fp6_e2m3", "fp6_e3m2",
        "fp8_e4m3",
    )  # fmt: skip
    for n in recipes.names():
        r = recipes.get(n)
        assert set(r.weight_formats) <= set(known)
        assert set(r.act_formats) - {None} <= set(known)
        assert {formats.get(a).bits for a in r.act_formats if a} == {8, 4} and None in r.act_formats
    with pytest.raises(ValueError, match="unknown format.*'int9'"):
        Recipe("x", "generic", "", weight_formats=("int9",))
    with pytest.raises(ValueError, match="'_'-prefixed"):
        Recipe("x", "generic", "", unet_config={"_class_name": "UNet2DConditionModel"})


@pytest.mark.parametrize("name", WITH_CONFIG)
def test_groups_cover_every_layer_of_the_real_architecture(name, meta_unets):
    r, unet = recipes.get(name), meta_unets[name]
    assert all(p.device.type == "meta" for p in unet.parameters())
    layers = _layers(unet)
    groups = r.groups(layers)
    content, quality = groups["content"], groups["quality"]
    print(f"{name}: {len(layers)} layers, content {len(content)}, quality {len(quality)}")
    # each layer in exactly one group
    assert sorted(content + quality) == sorted(layers)
    assert not set(content) & set(quality)
    assert all(("attn2" in n or ".ff." in n) for n in content)
    assert all(("attn2" not in n and ".ff." not in n) for n in quality)
    if r.family in EXPECTED:
        n_layers, n_content, n_quality, n_params = EXPECTED[r.family]
        assert (len(layers), len(content), len(quality)) == (n_layers, n_content, n_quality)
        assert sum(p.numel() for p in unet.parameters()) == n_params
    else:  # embedded: small, both groups present
        assert 20 < len(layers) < 500 and content and quality
    # convolutions and resnets are quality, the time embedding too
    assert r.layer_group("conv_in") == r.layer_group("time_embedding.linear_1") == "quality"


@pytest.mark.parametrize("name", WITH_CONFIG)
def test_bos_layers_exist_and_skips_match(name, meta_unets):
    r, unet = recipes.get(name), meta_unets[name]
    layers = _layers(unet)
    bos = [n for n in layers if r.is_bos_layer(n)]
    n_cross = sum(1 for n in layers if n.endswith("attn2.to_q"))
    assert n_cross > 0 and len(bos) == 2 * n_cross
    width = r.unet_config["cross_attention_dim"]
    for n in bos:
        assert r.layer_group(n) == "content"
        assert isinstance(layers[n], nn.Linear) and layers[n].in_features == width
    for suffix in r.bos_layers:
        assert any(n.endswith(suffix) for n in layers), suffix
    assert [n for n in layers if r.is_skipped(n)] == ["conv_in", "conv_out"]


def test_lora_recipes_say_to_fuse_first():
    # an unfused LoRA is refused by dq.quantize (tests/test_flows.py), so the recipe says to fuse
    r = recipes.get("lcm_lora_sdxl")
    assert r.fuse_lora and r.lora and r.scheduler == "LCMScheduler" and "fuse_lora()" in r.notes


def test_calibration_defaults_match_how_models_are_used():
    c = {n: recipes.get(n).calibration for n in recipes.names()}
    sizes = {"sd15": (25, 7.5, 512), "sd21": (25, 7.5, 768), "sdxl": (30, 7.5, 1024)}
    for n, (steps, guidance, side) in sizes.items():
        assert c[n].call_kwargs() == {
            "num_inference_steps": steps, "guidance_scale": guidance, "height": side, "width": side
        }  # fmt: skip
    for n in ("sd_turbo", "sdxl_turbo"):
        assert 1 <= c[n].num_inference_steps <= 4 and c[n].guidance_scale == 0.0
        assert (c[n].height, c[n].width) == (512, 512)
    for n in ("lcm_lora_sd15", "lcm_lora_sdxl"):
        assert c[n].num_inference_steps == 4 and 1.0 <= c[n].guidance_scale <= 1.5
    emb = assets.embedded_defaults()
    assert {k: v for k, v in c["embedded"].call_kwargs().items()} == emb
    assert c["embedded"].num_prompts == len(assets.calibration_prompts())
    assert c["generic"].call_kwargs() == {}
    for cal in c.values():
        assert cal.num_prompts >= 16 and cal.batch_size >= 1
    with pytest.raises(ValueError, match="multiple of 8"):
        Calibration(4, 1.0, 500, 512)


def test_get_returns_independent_copies():
    r = recipes.get("sd15")
    r.unet_config["cross_attention_dim"] = 1
    assert recipes.get("sd15").unet_config["cross_attention_dim"] == 768
    assert all(not k.startswith("_") for k in recipes.get("sdxl").unet_config)


# ------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_recipe_for_detects_family_from_config(name, meta_unets):
    cfg = recipes.get(name).unet_config
    assert recipes.recipe_for(cfg).name == name
    assert recipes.recipe_for(dict(meta_unets[name].config)).name == name
    # an unknown checkpoint name keeps the base family
    unet = recipes.meta_unet(name)
    unet.register_to_config(_name_or_path="/models/my-finetune/unet")
    assert recipes.recipe_for(unet).name == name


def test_recipe_for_uses_name_and_scheduler_hints(meta_unets):
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    assert recipes.recipe_for(meta_unets["sd_turbo"]).name == "sd_turbo"
    assert recipes.recipe_for(meta_unets["sdxl_turbo"]).name == "sdxl_turbo"
    pipe = SimpleNamespace(unet=recipes.meta_unet("sdxl"), scheduler=EulerDiscreteScheduler(),
                           name_or_path="/cache/models--stabilityai--sdxl-turbo/snapshots/abc")  # fmt: skip
    assert recipes.recipe_for(pipe).name == "sdxl_turbo"
    for family in ("sd15", "sdxl"):
        pipe = SimpleNamespace(unet=recipes.meta_unet(family), scheduler=LCMScheduler())
        assert recipes.recipe_for(pipe).name == f"lcm_lora_{family}"
    # Turbo hints mean nothing for SD 1.5; LCM ones nothing for SD 2.1 (no such recipe)
    pipe = SimpleNamespace(unet=recipes.meta_unet("sd21"), scheduler=LCMScheduler())
    assert recipes.recipe_for(pipe).name == "sd21"


def test_recipe_for_embedded_pipeline():
    pipe = assets.load_embedded_pipeline()
    assert recipes.recipe_for(pipe).name == "embedded"
    assert recipes.recipe_for(pipe.unet).name == "embedded"
    assert recipes.recipe_for(recipes.meta_unet("embedded")).name == "embedded"


def test_recipe_for_tiny_pipelines_falls_back_to_generic():
    from dq.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    assert recipes.recipe_for(tiny_sd_pipeline()).name == "generic"
    assert recipes.recipe_for(tiny_sdxl_pipeline()).name == "generic"
    # SD 1.5's text width alone does not make an SD 1.5 UNet
    assert recipes.recipe_for(tiny_sd_pipeline(cross_attention_dim=768)).name == "generic"
    # the generic recipe still groups any UNet's layers by name
    pipe = tiny_sdxl_pipeline()
    groups = recipes.get("generic").groups(_layers(pipe.unet))
    assert groups["content"] and groups["quality"]
    assert sum(map(len, groups.values())) == len(_layers(pipe.unet))


def test_recipe_for_rejects_non_models():
    with pytest.raises(ValueError, match="needs a diffusers pipeline"):
        recipes.recipe_for(42)
    with pytest.raises(ValueError, match="needs a diffusers pipeline"):
        recipes.recipe_for(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------- prompts


def test_shipped_prompt_set():
    prompts = recipes.calibration_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert all(p.strip() and p == p.strip() for p in prompts)
    for n in ("sd15", "sdxl_turbo", "lcm_lora_sdxl", "generic"):
        assert recipes.calibration_prompts(n) == prompts
    r = recipes.get("sdxl")
    assert recipes.calibration_prompts(r, n=r.calibration.num_prompts) == prompts[:32]
    with pytest.raises(ValueError, match="n must be in 1.."):
        recipes.calibration_prompts("sd15", n=10_000)


def test_embedded_prompts_are_its_own():
    assert recipes.calibration_prompts("embedded") == assets.calibration_prompts()
