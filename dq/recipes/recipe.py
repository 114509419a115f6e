"""What dq knows about one model family, as data: layer groups, BOS layers, skips, candidate
formats, calibration defaults and the UNet config.

Pure data plus small functions: nothing here imports diffusers.

Example:
    >>> layer_group("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    'content'
    >>> layer_group("down_blocks.1.resnets.0.conv1")
    'quality'
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from dq.sampling import Sampling

Group = Literal["content", "quality"]

# MixDQ's metric-decoupled split: cross-attention and feed-forward layers shape *what* is drawn
# (scored by an image-level metric), every other layer *how well* (scored by output SQNR).
CONTENT_MARKERS: tuple[str, ...] = ("attn2", ".ff.")
# Cross-attention key/value projections: their token-0 (BOS) input is prompt-independent under
# CLIP's causal mask and a large outlier, so dq keeps that token's path in full precision.
BOS_LAYER_SUFFIXES: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")
# The first and last convolutions: tiny and among the most sensitive layers (MixDQ keeps FP16).
BASE_SKIP: tuple[str, ...] = ("conv_in", "conv_out")
# Every weight format a plan may choose from (sensitivity scoring and the ILP search these).
WEIGHT_FORMATS: tuple[str, ...] = (
    "int2", "int3", "int4", "int6", "int8",
    "fp4_e2m1", "fp4_e3m0", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3",
)  # fmt: skip
# Activation candidates: 8-bit and 4-bit asymmetric per-tensor INT, None = keep float.
ACT_FORMATS: tuple[str | None, ...] = ("uint8", "uint4", None)


def layer_group(name: str, markers: Iterable[str] = CONTENT_MARKERS) -> Group:
    """The group of layer `name`: "content" for cross-attention / feed-forward layers (the
    name contains a marker), "quality" for every other layer.

    Args:
        name: a layer name as in `unet.named_modules()`.
        markers: substrings marking content layers (default: `attn2`, `.ff.`).

    Example:
        >>> layer_group("mid_block.attentions.0.transformer_blocks.0.ff.net.2")
        'content'
    """
    return "content" if any(m in name for m in markers) else "quality"


@dataclass(frozen=True)
class Calibration(Sampling):
    """Pipeline settings for calibration runs, as the model is normally used: a `dq.Sampling`
    (same fields, same checks; None for steps, guidance or size means the pipeline's own
    default) plus how many prompts to run.

    Args:
        num_inference_steps, guidance_scale, height, width, seed, extra: as in `Sampling`.
        batch_size: prompts per pipeline call (1 unless the recipe says otherwise).
        num_prompts: how many calibration prompts to run.
        steps_range: (fewest, most) steps the model is used with, for reference.

    Example:
        >>> Calibration(4, 1.5, 512, 512).call_kwargs()
        {'num_inference_steps': 4, 'guidance_scale': 1.5, 'height': 512, 'width': 512}
    """

    batch_size: int = 1
    num_prompts: int = 32
    steps_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_prompts
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_prompts={n!r}: must be an int >= 1")

    def sampling(self) -> Sampling:
        """The plain `Sampling` of these settings (what `dq.quantize` calls the pipeline with)."""
        return Sampling(**{f.name: getattr(self, f.name) for f in fields(Sampling)})


@dataclass(frozen=True)
class Recipe:
    """One model family's quantization knowledge.

    Args:
        name: registry name, e.g. "sdxl_turbo".
        family: architecture family: "sd15", "sd21", "sdxl", "embedded" or "generic".
        description: one line for listings.
        model: the reference checkpoint (hub id) the recipe was written for, if any.
        unet_config: the UNet2DConditionModel constructor config (plain dict, no "_" keys), for
            meta-device checks; None for the generic fallback. Treat as read-only.
        calibration: calibration defaults.
        skip: fnmatch globs of layers kept in float.
        bos_layers: name suffixes of the BOS-aware cross-attention key/value layers.
        content_markers: substrings putting a layer in the "content" group.
        weight_formats: candidate weight formats (names in `dq.formats`).
        act_formats: candidate activation formats; None = float activations.
        scheduler: the scheduler class the model is meant to run with, if it needs a special one.
        lora: a LoRA to load into the base model, if the recipe is a LoRA recipe.
        fuse_lora: fuse that LoRA into the weights before quantizing (dq quantizes plain
            Linear/Conv2d layers, not PEFT wrappers).
        notes: anything a user must do or know, in a sentence or two.
    """

    name: str
    family: str
    description: str
    model: str | None = None
    unet_config: dict[str, Any] | None = field(default=None, hash=False, repr=False)
    calibration: Calibration = field(default_factory=Calibration)
    skip: tuple[str, ...] = BASE_SKIP
    bos_layers: tuple[str, ...] = BOS_LAYER_SUFFIXES
    content_markers: tuple[str, ...] = CONTENT_MARKERS
    weight_formats: tuple[str, ...] = WEIGHT_FORMATS
    act_formats: tuple[str | None, ...] = ACT_FORMATS
    scheduler: str | None = None
    lora: str | None = None
    fuse_lora: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        from dq import formats  # light: pure format tables

        known = formats.names()
        bad = [
            f for f in (*self.weight_formats, *self.act_formats) if f is not None and f not in known
        ]
        if bad:
            raise ValueError(
                f"recipe {self.name!r}: unknown format(s) {bad}; known formats: {', '.join(known)}"
            )
        if self.unet_config is not None and any(k.startswith("_") for k in self.unet_config):
            raise ValueError(
                f"recipe {self.name!r}: unet_config holds constructor arguments only; drop the "
                "'_'-prefixed metadata keys (_class_name, _diffusers_version, ...)"
            )
        if self.fuse_lora and self.lora is None:
            raise ValueError(f"recipe {self.name!r}: fuse_lora=True needs a lora")

    def layer_group(self, name: str) -> Group:
        """The group ("content" or "quality") of layer `name`; see the module-level `layer_group`."""
        return layer_group(name, self.content_markers)

    def groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Split layer names into {"content": [...], "quality": [...]}, order kept.

        Example:
            >>> Recipe("demo", "generic", "").groups(["conv_in", "mid_block.attentions.0.proj_in",
            ...     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"])['content']
            ['up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v']
        """
        out: dict[str, list[str]] = {"content": [], "quality": []}
        for n in names:
            out[self.layer_group(n)].append(n)
        return out

    def is_bos_layer(self, name: str) -> bool:
        """Whether `name` is a cross-attention key/value layer (BOS-aware candidate)."""
        return name.endswith(self.bos_layers)

    def is_skipped(self, name: str) -> bool:
        """Whether `name` matches one of the recipe's skip globs (stays float)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)
