"""Model recipes: what dq knows about each model family, as data shipped inside the package.

A recipe names a family's layer groups (content: cross-attention and feed-forward; quality: the
rest), its BOS-aware layers, the layers kept in float, the candidate formats, the calibration
defaults (steps, guidance, size, prompt count as the model is normally used) and the real UNet
config, so that plans and byte costs can be checked on the `meta` device without a download.

    >>> from dq import recipes
    >>> r = recipes.get("sdxl_turbo")
    >>> r.calibration.call_kwargs()
    {'num_inference_steps': 1, 'guidance_scale': 0.0, 'height': 512, 'width': 512}
    >>> r.layer_group("up_blocks.0.attentions.0.transformer_blocks.3.attn2.to_k")
    'content'
    >>> unet = recipes.meta_unet(r)                 # real-size SDXL UNet, no memory
    >>> recipes.recipe_for(pipe).name               # detect from a loaded pipeline  # doctest: +SKIP
    >>> prompts = recipes.calibration_prompts(r, n=r.calibration.num_prompts)

Recipes: sd15, sd21, sd_turbo, sdxl, sdxl_turbo, lcm_lora_sd15, lcm_lora_sdxl, embedded, generic.
"""

from dq.recipes.recipe import (
    ACT_FORMATS,
    BASE_SKIP,
    BOS_LAYER_SUFFIXES,
    CONTENT_MARKERS,
    WEIGHT_FORMATS,
    Calibration,
    Recipe,
    layer_group,
)
from dq.recipes.registry import (
    calibration_prompts,
    get,
    meta_unet,
    names,
    recipe_for,
    with_calibration,
)

__all__ = [
    "ACT_FORMATS",
    "BASE_SKIP",
    "BOS_LAYER_SUFFIXES",
    "CONTENT_MARKERS",
    "WEIGHT_FORMATS",
    "Calibration",
    "Recipe",
    "calibration_prompts",
    "get",
    "layer_group",
    "meta_unet",
    "names",
    "recipe_for",
    "with_calibration",
]
