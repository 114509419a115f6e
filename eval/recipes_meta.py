"""Every recipe against its real architecture, on the `meta` device: layers per group, parameters,
and the weight bytes each dq preset would give, computed from the real shapes alone.

    .venv/bin/python eval/recipes_meta.py | tee eval/results/recipes_meta.log

For each recipe with a UNet config the script builds the real-size UNet2DConditionModel on
`meta` (no memory, no download: `dq.recipes.meta_unet`), lists its quantizable layers
(nn.Linear / nn.Conv2d), splits them into the recipe's content / quality groups, counts the
BOS-aware cross-attention key/value layers and the layers its skip globs keep in float, and
checks that every layer is in exactly one group.

Bytes are those of the quantizable layers' weights: for a quantized layer
`dq.storage.spec_nbytes(spec, weight_shape)` (codes, scales, zero points, activation
parameters), for a layer the recipe keeps in float its fp16 weight. "UNet" adds every other
parameter (biases, norms, embeddings) at fp16, as a whole-model figure. Ratios are against the
fp16 row of the same recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

import dq
from dq import recipes
from dq.storage import spec_nbytes


@dataclass
class Settings:
    # recipes to check (those without a UNet config are listed and skipped)
    recipes: tuple[str, ...] = tuple(recipes.names())
    presets: tuple[str, ...] = tuple(dq.PRESETS)  # dq presets to cost, besides the fp16 baseline
    float_bytes: int = 2  # bytes per element of float layers and the baseline (fp16)
    mb: float = 1e6  # unit for byte columns (1 MB = 10^6 bytes)


def layer_table(recipe: recipes.Recipe, unet: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers (name -> module), each checked to sit in exactly one group."""
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    groups = recipe.groups(layers)
    assert sorted(groups["content"] + groups["quality"]) == sorted(layers), recipe.name
    return layers


def preset_bytes(
    recipe: recipes.Recipe, layers: dict[str, nn.Module], preset: str, s: Settings
) -> dict[str, int]:
    """{"content", "quality"} -> weight bytes of that group under `preset` with the recipe's skips."""
    spec = dq.QuantConfig.from_preset(preset).default
    out = {"content": 0, "quality": 0}
    for name, m in layers.items():
        shape = tuple(m.weight.shape)
        if recipe.is_skipped(name) or spec is None:
            n = m.weight.numel() * s.float_bytes
        else:
            n = spec_nbytes(spec, shape)
        out[recipe.layer_group(name)] += n
    return out


def report(name: str, s: Settings) -> dict | None:
    """Print one recipe's section; return its summary row (None without a UNet config)."""
    r = recipes.get(name)
    if r.unet_config is None:
        print(f"\n== {name}: no UNet config (generic fallback: groups any UNet by name), skipped")
        return None
    unet = recipes.meta_unet(r)
    layers = layer_table(r, unet)
    groups = r.groups(layers)
    skipped = [n for n in layers if r.is_skipped(n)]
    bos = [n for n in layers if r.is_bos_layer(n)]
    params = sum(p.numel() for p in unet.parameters())
    weight_params = {g: sum(layers[n].weight.numel() for n in ns) for g, ns in groups.items()}
    other = params - sum(weight_params.values())
    print(f"\n== {name}: {r.description}")
    print(
        f"   model {r.model or '-'}; recipe_for(this meta UNet) -> {recipes.recipe_for(unet).name}"
    )
    print(
        f"   quantizable layers {len(layers)}: content {len(groups['content'])}, quality "
        f"{len(groups['quality'])}; BOS-aware K/V {len(bos)}; kept float by skips "
        f"{len(skipped)} ({', '.join(skipped)})"
    )
    print(
        f"   parameters {params / 1e6:.1f} M: layer weights content "
        f"{weight_params['content'] / 1e6:.1f} M, quality {weight_params['quality'] / 1e6:.1f} M; "
        f"other (biases, norms, embeddings) {other / 1e6:.2f} M"
    )
    print(f"   calibration {r.calibration.call_kwargs()}, {r.calibration.num_prompts} prompts")
    base_total = sum(weight_params.values()) * s.float_bytes
    other_bytes = other * s.float_bytes
    print(
        f"   {'preset':<8}{'content MB':>12}{'quality MB':>12}{'weights MB':>12}{'x fp16':>8}"
        f"{'UNet MB':>10}{'x fp16':>8}"
    )
    rows = {"fp16": {g: n * s.float_bytes for g, n in weight_params.items()}}
    rows |= {p: preset_bytes(r, layers, p, s) for p in s.presets}
    ratios = {}
    for p, b in rows.items():
        total = sum(b.values())
        ratios[p] = (total + other_bytes) / (base_total + other_bytes)
        print(
            f"   {p:<8}{b['content'] / s.mb:12.1f}{b['quality'] / s.mb:12.1f}{total / s.mb:12.1f}"
            f"{total / base_total:8.3f}{(total + other_bytes) / s.mb:10.1f}{ratios[p]:8.3f}"
        )
    return {
        "recipe": name, "layers": len(layers), "content": len(groups["content"]),
        "quality": len(groups["quality"]), "params": params,
        "fp16": base_total + other_bytes, "ratios": ratios,
    }  # fmt: skip


def main(s: Settings) -> None:
    print(f"command: {' '.join(['python', *sys.argv])}")
    print("weights: dq.storage.spec_nbytes per quantized layer (codes + scales + zero points +")
    print(
        f"activation parameters); float layers and the baseline at {s.float_bytes} bytes/element;"
    )
    print("MB = 10^6 bytes. Presets (default spec; the recipe's skips stay float):")
    for p in s.presets:
        spec = dq.QuantConfig.from_preset(p).default
        print(
            f"   {p:<8}{spec.weight} {spec.weight_granularity}, activations {spec.act or 'float'}"
        )
    print(
        "LCM-LoRA recipes are told apart by the pipeline's LCMScheduler; a bare UNet gives the base."
    )
    summary = [row for name in s.recipes if (row := report(name, s)) is not None]
    print("\n== summary: whole UNet bytes per preset, x fp16")
    print(
        f"{'recipe':<15}{'layers':>7}{'content':>8}{'quality':>8}{'params M':>10}{'fp16 MB':>9}"
        + "".join(f"{p:>7}" for p in s.presets)
    )
    for row in summary:
        print(
            f"{row['recipe']:<15}{row['layers']:>7}{row['content']:>8}{row['quality']:>8}"
            f"{row['params'] / 1e6:>10.1f}{row['fp16'] / s.mb:>9.1f}"
            + "".join(f"{row['ratios'][p]:>7.3f}" for p in s.presets)
        )


if __name__ == "__main__":
    main(Settings())
