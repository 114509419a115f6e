"""The named recipes, lookup by name or by model, the real-size UNet on `meta`, and the
calibration prompt set shipped with dq.

The UNet configs are written out once, as JSON under `dq/recipes/configs/` (constructor
arguments of diffusers' UNet2DConditionModel, values as published in the reference checkpoints'
`unet/config.json`). diffusers is imported only by `meta_unet`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from importlib import resources
from typing import Any

from dq.recipes.recipe import BASE_SKIP, Calibration, Recipe

logger = logging.getLogger(__name__)

_HERE = resources.files(__package__)
PROMPTS_FILE = "prompts/calibration.txt"  # the shipped calibration captions, one per line
# Keys that fix a UNet's layer structure; a model must agree on all of them to count as the
# embedded pipeline (other keys, e.g. sample_size, only change how it is run).
_STRUCTURE_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "addition_embed_type", "norm_num_groups",
)  # fmt: skip


def _config(file: str) -> dict[str, Any]:
    return json.loads((_HERE / "configs" / file).read_text())


_SD15 = _config("sd15_unet.json")  # runwayml/stable-diffusion-v1-5, unet/config.json
_SD21 = _config("sd21_unet.json")  # stabilityai/stable-diffusion-2-1 (SD-Turbo: same layers)
_SDXL = _config("sdxl_unet.json")  # stabilityai/stable-diffusion-xl-base-1.0 (SDXL-Turbo: same)

_STATIC: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="sd15",
            family="sd15",
            description="Stable Diffusion 1.5 (and SD 1.x fine-tunes), 25 steps with guidance",
            model="runwayml/stable-diffusion-v1-5",
            unet_config=_SD15,
            calibration=Calibration(
                25, 7.5, 512, 512, num_prompts=32, batch_size=4, steps_range=(20, 50)
            ),
        ),
        Recipe(
            name="sd21",
            family="sd21",
            description="Stable Diffusion 2.1 (768 px, v-prediction), 25 steps with guidance",
            model="stabilityai/stable-diffusion-2-1",
            unet_config=_SD21,
            calibration=Calibration(
                25, 7.5, 768, 768, num_prompts=32, batch_size=2, steps_range=(20, 50)
            ),
        ),
        Recipe(
            name="sd_turbo",
            family="sd21",
            description="SD-Turbo (distilled SD 2.1), 1-4 steps without guidance",
            model="stabilityai/sd-turbo",
            unet_config=_SD21,
            calibration=Calibration(
                1, 0.0, 512, 512, num_prompts=32, batch_size=4, steps_range=(1, 4)
            ),
            notes="Same UNet layers as SD 2.1. Calibrated at 1 step (the model card's default, "
            "as MixDQ does for SDXL-Turbo); pass num_inference_steps=4 to cover 4-step use.",
        ),
        Recipe(
            name="sdxl",
            family="sdxl",
            description="Stable Diffusion XL base 1.0, 30 steps with guidance",
            model="stabilityai/stable-diffusion-xl-base-1.0",
            unet_config=_SDXL,
            calibration=Calibration(
                30, 7.5, 1024, 1024, num_prompts=32, batch_size=1, steps_range=(20, 50)
            ),
        ),
        Recipe(
            name="sdxl_turbo",
            family="sdxl",
            description="SDXL-Turbo (distilled SDXL), 1-4 steps without guidance",
            model="stabilityai/sdxl-turbo",
            unet_config=_SDXL,
            calibration=Calibration(
                1, 0.0, 512, 512, num_prompts=32, batch_size=4, steps_range=(1, 4)
            ),
            notes="Same UNet layers as SDXL base. MixDQ calibrates it at 1 step on 32 prompts.",
        ),
        Recipe(
            name="lcm_lora_sd15",
            family="sd15",
            description="SD 1.5 + LCM-LoRA, 4 steps, guidance 1.0-1.5",
            model="runwayml/stable-diffusion-v1-5",
            unet_config=_SD15,
            calibration=Calibration(
                4, 1.5, 512, 512, num_prompts=32, batch_size=4, steps_range=(2, 8)
            ),
            skip=BASE_SKIP,
            scheduler="LCMScheduler",
            lora="latent-consistency/lcm-lora-sdv1-5",
            fuse_lora=True,
            notes="Load the LoRA, then pipe.fuse_lora() and pipe.unload_lora_weights() before "
            "quantizing, and use LCMScheduler. BOS-aware K/V stays valid: the LoRA changes the "
            "UNet, not the text encoder.",
        ),
        Recipe(
            name="lcm_lora_sdxl",
            family="sdxl",
            description="SDXL + LCM-LoRA, 4 steps, guidance 1.0-1.5",
            model="stabilityai/stable-diffusion-xl-base-1.0",
            unet_config=_SDXL,
            calibration=Calibration(
                4, 1.5, 1024, 1024, num_prompts=32, batch_size=1, steps_range=(2, 8)
            ),
            skip=BASE_SKIP,
            scheduler="LCMScheduler",
            lora="latent-consistency/lcm-lora-sdxl",
            fuse_lora=True,
            notes="Load the LoRA, then pipe.fuse_lora() and pipe.unload_lora_weights() before "
            "quantizing, and use LCMScheduler. MixDQ calibrates it at 4 steps, guidance 1.5.",
        ),
        Recipe(
            name="generic",
            family="generic",
            description="Fallback for other UNets: layers grouped by name, pipeline defaults",
            calibration=Calibration(num_prompts=32, batch_size=1),
            notes="No architecture check: content = names containing 'attn2' or '.ff.', quality "
            "= the rest. Steps, guidance and size are the pipeline's own defaults.",
        ),
    )
}
_LAZY: dict[str, Callable[[], Recipe]] = {}  # recipes that read package data when asked for


def _embedded() -> Recipe:
    from dq import assets

    cfg = json.loads((assets.embedded_pipeline_path() / "unet" / "config.json").read_text())
    call = assets.embedded_defaults()
    n_prompts = len(assets.calibration_prompts())
    return Recipe(
        name="embedded",
        family="embedded",
        description="dq's embedded tiny-shapes pipeline (32x32, trained here)",
        model=None,
        unet_config={k: v for k, v in cfg.items() if not k.startswith("_")},
        calibration=Calibration(
            call["num_inference_steps"],
            call["guidance_scale"],
            call["height"],
            call["width"],
            num_prompts=n_prompts,
            batch_size=16,
        ),
        notes="Calibration prompts are the embedded world's own captions (dq.assets).",
    )


_LAZY["embedded"] = _embedded
_ORDER = ("sd15", "sd21", "sd_turbo", "sdxl", "sdxl_turbo", "lcm_lora_sd15", "lcm_lora_sdxl",
          "embedded", "generic")  # fmt: skip


def names() -> list[str]:
    """Names of every recipe, e.g. ["sd15", "sd21", ..., "generic"]."""
    return list(_ORDER)


def get(name: str | Recipe) -> Recipe:
    """The recipe called `name` (a Recipe passes through). Case and "-"/"_" are ignored.

    Returns a copy: changing its `unet_config` changes nothing shared.

    Example:
        >>> get("sdxl-turbo").calibration.guidance_scale
        0.0
    """
    if isinstance(name, Recipe):
        return name
    key = str(name).strip().lower().replace("-", "_") if isinstance(name, str) else None
    if key in _STATIC:
        return copy.deepcopy(_STATIC[key])
    if key in _LAZY:
        return _LAZY[key]()
    raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(names())}")


# ------------------------------------------------------------------------- detection


def _norm(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_norm(x) for x in v)
    return v


def _unet_config(model: Any) -> Mapping[str, Any]:
    if isinstance(model, Mapping):
        return model
    unet = getattr(model, "unet", model)
    cfg = getattr(unet, "config", None)
    if not isinstance(cfg, Mapping):
        raise ValueError(
            f"recipe_for needs a diffusers pipeline with a `unet`, a UNet2DConditionModel or its "
            f"config dict; got {type(model).__name__}"
        )
    return cfg


def _same_family(cfg: Mapping[str, Any], ref: Mapping[str, Any]) -> bool:
    """Same text width, level widths and added conditioning as the family's reference UNet."""
    return all(
        _norm(cfg.get(k)) == _norm(ref.get(k))
        for k in ("cross_attention_dim", "block_out_channels", "addition_embed_type")
    )


def _is_embedded(cfg: Mapping[str, Any]) -> bool:
    try:
        ref = get("embedded").unet_config or {}
    except (ValueError, OSError, KeyError):  # no packaged assets: nothing can be the embedded one
        return False
    return all(k in cfg and _norm(cfg[k]) == _norm(ref.get(k)) for k in _STRUCTURE_KEYS if k in ref)


def _hints(model: Any, cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(lower-cased names the model was loaded from / adapters it carries, scheduler class)."""
    words = [str(cfg.get("_name_or_path") or "")]
    words.append(str(getattr(model, "name_or_path", "") or ""))
    unet = getattr(model, "unet", model)
    words += [str(k) for k in (getattr(unet, "peft_config", None) or {})]
    scheduler = type(getattr(model, "scheduler", None)).__name__
    return " ".join(words).lower(), scheduler


def recipe_for(model: Any) -> Recipe:
    """The recipe matching a pipeline, a UNet, or a UNet config dict.

    The family comes from the UNet config: cross-attention width 768 with SD's level widths
    (320, 640, 1280, 1280) is SD 1.x, 1024 is SD 2.x, 2048 with `addition_embed_type
    "text_time"` and widths (320, 640, 1280) is SDXL; the embedded pipeline is recognised by its
    layer structure. Within a family, "turbo" in the checkpoint's name picks the Turbo recipe,
    and an LCMScheduler, an "lcm" name or adapter, or an LCM time-conditioning input picks the
    LCM-LoRA one. Anything else gets `generic`.

    Args:
        model: a diffusers pipeline, its UNet, or the UNet's config (a mapping).

    Example:
        >>> recipe_for(get("sdxl").unet_config).name
        'sdxl'
    """
    cfg = _unet_config(model)
    if _is_embedded(cfg):
        return get("embedded")
    family = next(
        (f for f in ("sd15", "sd21", "sdxl") if _same_family(cfg, _STATIC[f].unet_config or {})),
        None,
    )
    if family is None:
        logger.info(
            "dq.recipes: UNet (cross_attention_dim=%s, block_out_channels=%s) matches no known "
            "family; using the generic recipe",
            cfg.get("cross_attention_dim"),
            cfg.get("block_out_channels"),
        )
        return get("generic")
    text, scheduler = _hints(model, cfg)
    lcm = scheduler == "LCMScheduler" or "lcm" in text or cfg.get("time_cond_proj_dim") is not None
    if lcm and family in ("sd15", "sdxl"):
        return get(f"lcm_lora_{family}")
    if "turbo" in text and family in ("sd21", "sdxl"):
        return get("sd_turbo" if family == "sd21" else "sdxl_turbo")
    return get(family)


# ------------------------------------------------------------------------- meta UNet


def meta_unet(recipe: str | Recipe):
    """The recipe's real-size UNet2DConditionModel on the `meta` device: every layer with its
    real shape, no memory for weights, nothing downloaded.

    Args:
        recipe: a Recipe or its name; it must have a `unet_config`.

    Example:
        >>> unet = meta_unet("sdxl")
        >>> sum(p.numel() for p in unet.parameters())
        2567463684
    """
    import torch
    from diffusers import UNet2DConditionModel

    r = get(recipe)
    if r.unet_config is None:
        with_config = [n for n in names() if n != r.name and n != "generic"]
        raise ValueError(
            f"recipe {r.name!r} has no UNet config to build; use one of {', '.join(with_config)}"
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(copy.deepcopy(r.unet_config))
    if r.model:
        unet.register_to_config(_name_or_path=r.model)
    return unet.eval()


# ------------------------------------------------------------------------- prompts


def calibration_prompts(recipe: str | Recipe | None = None, n: int | None = None) -> list[str]:
    """Calibration prompts for a recipe: dq's shipped caption set for real models, the embedded
    world's own captions for the embedded pipeline.

    Args:
        recipe: a Recipe or name; None means the shipped caption set.
        n: how many (the first n); None for all. `recipe.calibration.num_prompts` is the
            recipe's suggestion.

    Example:
        >>> prompts = calibration_prompts("sdxl_turbo", n=32)
    """
    r = None if recipe is None else get(recipe)
    if r is not None and r.family == "embedded":
        from dq import assets

        prompts = assets.calibration_prompts()
    else:
        text = (_HERE / PROMPTS_FILE).read_text(encoding="utf-8")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if n is not None:
        if not 0 < n <= len(prompts):
            raise ValueError(f"n must be in 1..{len(prompts)} for this prompt set, got {n}")
        prompts = prompts[:n]
    return prompts


def with_calibration(recipe: str | Recipe, **changes: Any) -> Recipe:
    """A copy of the recipe with some calibration defaults changed.

    Example:
        >>> with_calibration("sd_turbo", num_inference_steps=4).calibration.num_inference_steps
        4
    """
    r = get(recipe)
    return replace(r, calibration=replace(r.calibration, **changes))
