"""Quantization settings as data: one `LayerSpec` per layer, a `QuantConfig` holding a default
spec, a per-layer plan and skip patterns, presets, and a versioned JSON round-trip.

A mixed-precision plan (what the ILP allocator returns) is simply `QuantConfig.layers`: a mapping
from layer name to `LayerSpec` (or `None` to keep the layer in full precision), with `default`
applying to every layer the plan does not name.

Example:
    >>> cfg = QuantConfig.from_preset("w8a8")
    >>> cfg.spec_for("down_blocks.0.attentions.0.proj_in").weight
    'int8'
    >>> QuantConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from dq import formats

# bump when the JSON layout changes; loaders refuse newer versions.
# 2: plans carry each format's definition ("formats"); `rounding` left LayerSpec (a procedure
#    setting of dq.quantize). Version 1 plans still load.
CONFIG_VERSION = 2

_GRANULARITY_RE = re.compile(r"^(tensor|channel|group(\d+))$")
_SCALE_METHODS = ("minmax", "percentile", "mse")


def _known_formats() -> list[str]:
    return formats.names()


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized.

    Args:
        weight: weight format name (see `dq.formats.names()`), or a format object (e.g. from
            `FPFormat.with_bias`), which is registered under its name.
        weight_granularity: "tensor", "channel" (per output channel) or "group<N>" (groups of N
            input elements per output channel).
        weight_method: scale search for weights: "minmax", "percentile" or "mse".
        act: activation format name (or format object), or None for weight-only
            quantization. uint8 / int8 run on the integer engines; other INT and FP formats
            (e.g. "uint4", "fp8_e4m3") are simulated on the reference path.
        act_granularity: only "tensor" is supported for activations (static, calibrated).
        act_symmetric: symmetric activation range (zero point 0); default asymmetric.
        pair_limit: signed INT weights per channel only: cap on |code[n, 2j]| +
            |code[n, 2j + 1]| over adjacent input channels (at each kernel tap). AVX2 CPUs
            without VNNI add u8 x s8 products in such pairs into saturating int16, so with 128
            any uint8 activation runs in one exact integer pass. Each channel's scale grows just
            enough to meet the cap (`dq.modules.pair_limited_codes`).
    """

    weight: str = "int8"
    weight_granularity: str = "channel"
    weight_method: str = "minmax"
    act: str | None = None
    act_granularity: str = "tensor"
    act_symmetric: bool = False
    pair_limit: int | None = None

    def __post_init__(self) -> None:
        for attr in ("weight", "act"):
            value = getattr(self, attr)
            if isinstance(value, formats.IntFormat | formats.FPFormat):
                object.__setattr__(self, attr, formats.register(value).name)
        known = _known_formats()
        if self.weight not in known:
            raise ValueError(
                f"unknown weight format {self.weight!r}; choose one of {known} "
                "(or register a new one with dq.formats.register)"
            )
        if self.act is not None and self.act not in known:
            raise ValueError(f"unknown activation format {self.act!r}; choose one of {known}")
        if not _GRANULARITY_RE.match(self.weight_granularity):
            raise ValueError(
                f"weight_granularity {self.weight_granularity!r} is not valid; use 'tensor', "
                "'channel' or 'group<N>' such as 'group64'"
            )
        if self.act_granularity != "tensor":
            raise ValueError(
                f"act_granularity {self.act_granularity!r} is not supported; activations are "
                "quantized per tensor with calibrated ranges, use 'tensor'"
            )
        if self.weight_method not in _SCALE_METHODS:
            raise ValueError(
                f"weight_method {self.weight_method!r} is not valid; use one of {_SCALE_METHODS}"
            )
        if self.pair_limit is not None:
            fmt = formats.get(self.weight)
            if fmt.kind != "int" or not fmt.signed:
                raise ValueError(
                    f"pair_limit applies to signed INT weights, not {self.weight!r}; "
                    "drop pair_limit or use an intN weight format"
                )
            if self.weight_granularity != "channel":
                raise ValueError(
                    f"pair_limit needs weight_granularity 'channel', not "
                    f"{self.weight_granularity!r}"
                )
            if not isinstance(self.pair_limit, int) or not fmt.qmax <= self.pair_limit:
                raise ValueError(
                    f"pair_limit must be an integer >= {fmt.qmax} (the largest {self.weight} "
                    f"code), got {self.pair_limit!r}; 128 suits AVX2 CPUs"
                )

    @property
    def group_size(self) -> int:
        """Group size for "group<N>" granularity, 0 otherwise."""
        m = _GRANULARITY_RE.match(self.weight_granularity)
        return int(m.group(2)) if m and m.group(2) else 0

    @property
    def weight_bits(self) -> int:
        return formats.get(self.weight).bits

    @property
    def act_bits(self) -> int | None:
        return None if self.act is None else formats.get(self.act).bits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        names = {f.name for f in fields(cls)}
        d = dict(d)
        if d.get("rounding", "nearest") == "nearest":  # version-1 plans always said "nearest"
            d.pop("rounding", None)
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown LayerSpec keys {sorted(unknown)}; valid keys are {sorted(names)}. "
                "Was this written by a newer dq? Upgrade dq to read it."
            )
        return cls(**d)


# Layers kept in full precision by default: the first and last convolutions are tiny, and
# MixDQ found them among the most sensitive (references.md).
DEFAULT_SKIP = ("conv_in", "conv_out")


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model quantization recipe: a default `LayerSpec`, a per-layer plan, skips.

    Args:
        default: spec applied to every quantizable layer not named in `layers`.
        layers: per-layer plan `{name: LayerSpec | None}`; None keeps that layer in float.
        skip: patterns of layers kept in float: a glob (`*`, `?` or `[`, fnmatch on the whole
            name, e.g. "down_blocks.*.attn1.*") or, as diffusers' `modules_to_not_convert`, a
            plain name matching every layer at or under a module of that name ("to_k" keeps
            every `...to_k`, "attn2" every layer inside an `attn2`, "conv_in" the layer itself).
            A single string is one pattern.
        components: pipeline components to quantize (currently "unet").
        bos_aware: keep the BOS token's cross-attention key/value path in full precision.
        name: a label, e.g. the preset name.
    """

    default: LayerSpec | None = field(default_factory=LayerSpec)
    layers: dict[str, LayerSpec | None] = field(default_factory=dict)
    skip: tuple[str, ...] = DEFAULT_SKIP
    components: tuple[str, ...] = ("unet",)
    bos_aware: bool = True
    name: str = "custom"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", _skip_patterns(self.skip))
        object.__setattr__(self, "components", tuple(self.components))
        for k, v in self.layers.items():
            if v is not None and not isinstance(v, LayerSpec):
                raise ValueError(
                    f"plan entry {k!r} is a {type(v).__name__}; use a LayerSpec or None"
                )
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"this quantization config has version {self.version}, newer than this dq "
                f"understands ({CONFIG_VERSION}); upgrade dq (pip install -U dq)"
            )
        if self.components != ("unet",):
            raise ValueError(
                f"components={self.components!r}: only ('unet',) is supported in this version"
            )

    def spec_for(self, name: str) -> LayerSpec | None:
        """The spec for layer `name` (None means keep it in full precision).

        A spec from `layers` comes back marked as an explicit plan entry for `name` (see
        `explicit_layer`): shape resolution then refuses to adapt it, where the default may
        fall back (e.g. to per-channel scales when a group size does not divide the inputs).
        """
        if name in self.layers:
            spec = self.layers[name]
            return None if spec is None else _mark_explicit(spec, name)
        if self.is_skipped(name):
            return None
        return self.default

    def is_skipped(self, name: str) -> bool:
        """Whether layer `name` matches a skip pattern (see `skip`)."""
        return any(skip_matches(p, name) for p in self.skip)

    def unmatched_skips(self, names: Iterable[str]) -> list[str]:
        """The skip patterns matching none of `names` (the model's quantizable layers)."""
        names = list(names)
        return [p for p in self.skip if not any(skip_matches(p, n) for n in names)]

    @property
    def needs_activation_calibration(self) -> bool:
        specs = [self.default, *self.layers.values()]
        return any(s is not None and s.act is not None for s in specs)

    def format_names(self) -> list[str]:
        """Every weight and activation format the config uses, sorted."""
        specs = [s for s in (self.default, *self.layers.values()) if s is not None]
        return sorted({n for s in specs for n in (s.weight, s.act) if n is not None})

    def with_plan(self, plan: dict[str, LayerSpec | None]) -> QuantConfig:
        return replace(self, layers=dict(plan))

    # --- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "default": None if self.default is None else self.default.to_dict(),
            "layers": {k: (None if v is None else v.to_dict()) for k, v in self.layers.items()},
            "skip": list(self.skip),
            "components": list(self.components),
            "bos_aware": self.bos_aware,
            # each format's definition, so custom or bias-shifted formats load anywhere
            "formats": {n: formats.to_dict(formats.get(n)) for n in self.format_names()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a QuantConfig dict is required, got {type(d).__name__}")
        version = int(d.get("version", 0))
        if version > CONFIG_VERSION:
            raise ValueError(
                f"this quantization config has version {version}, newer than this dq "
                f"understands ({CONFIG_VERSION}); upgrade dq (pip install -U dq)"
            )
        known = {"version", "name", "default", "layers", "skip", "components", "bos_aware", "formats"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {sorted(unknown)}; valid: {sorted(known)}")
        _register_formats(d.get("formats", {}))
        default = d.get("default")
        return cls(
            default=None if default is None else LayerSpec.from_dict(default),
            layers={
                k: (None if v is None else LayerSpec.from_dict(v))
                for k, v in d.get("layers", {}).items()
            },
            skip=d.get("skip", DEFAULT_SKIP),
            components=tuple(d.get("components", ("unet",))),
            bos_aware=bool(d.get("bos_aware", True)),
            name=str(d.get("name", "custom")),
            version=CONFIG_VERSION,  # older layouts are upgraded on reading
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_preset(cls, name: str) -> QuantConfig:
        """A named preset; see `PRESETS` for the list."""
        key = name.lower().replace("-", "_")
        if key in MIXED_PRESET_NAMES:
            raise ValueError(
                f"{name!r} is a mixed-precision preset: dq.quantize(pipe, {name!r}, ...) allocates a "
                "format per layer from a sensitivity table, so it is not one QuantConfig; for "
                f"uniform weights use {key + '_uniform'!r}"
            )
        if key not in PRESETS:
            raise ValueError(
                f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or pass a QuantConfig"
            )
        default, doc = PRESETS[key]
        return cls(default=default, name=key)


_GLOB_CHARS = frozenset("*?[")


def skip_matches(pattern: str, name: str) -> bool:
    """Whether skip `pattern` matches layer `name`: a glob matches the whole name (fnmatch); a
    plain name matches as a run of whole dotted components ("to_k" and "attn2.to_k" match
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "attn2" every layer inside an
    attn2, but "to" matches nothing there).

    Example:
        >>> skip_matches("to_k", "mid_block.attentions.0.transformer_blocks.0.attn1.to_k")
        True
        >>> skip_matches("down_blocks.*.conv1", "down_blocks.0.resnets.0.conv1")
        True
    """
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


def _skip_patterns(skip: Any) -> tuple[str, ...]:
    if isinstance(skip, str):
        return (skip,)  # one pattern, not its characters
    if skip is None:
        return ()
    try:
        patterns = tuple(skip)
    except TypeError:
        raise ValueError(
            f"skip must be a layer-name pattern or a list of them, got {type(skip).__name__}"
        ) from None
    bad = [p for p in patterns if not isinstance(p, str) or not p.strip(".")]
    if bad:
        raise ValueError(
            f"skip patterns must be non-empty strings (layer names or globs such as "
            f"'down_blocks.*.attn1.*'), got {bad[0]!r}"
        )
    return patterns


# Specs returned by `QuantConfig.spec_for` for explicit plan entries carry the layer name here
# (not a dataclass field: equality, hashing and JSON are unchanged).
_EXPLICIT_ATTR = "_dq_explicit_layer"


def _mark_explicit(spec: LayerSpec, name: str) -> LayerSpec:
    marked = copy.copy(spec)
    object.__setattr__(marked, _EXPLICIT_ATTR, name)
    return marked


def explicit_layer(spec: LayerSpec) -> str | None:
    """The layer name if `spec` came from an explicit plan entry (`QuantConfig.layers`), else
    None (a default or a bare spec)."""
    return getattr(spec, _EXPLICIT_ATTR, None)


def _register_formats(defs: Any) -> None:
    """Register the format definitions a plan carries; a name already registered with another
    definition is refused (the plan would silently mean something else)."""
    if not isinstance(defs, dict):
        raise ValueError(f"'formats' must map format names to definitions, got {type(defs).__name__}")
    for name, d in defs.items():
        try:
            fmt = formats.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"format {name!r} in the plan has an invalid definition {d!r}: {e}") from None
        if fmt.name != name:
            raise ValueError(f"format entry {name!r} defines a format named {fmt.name!r}")
        if name in formats.names() and formats.get(name) != fmt:
            raise ValueError(
                f"the plan defines format {name!r} as {fmt}, but this process already has "
                f"{formats.get(name)} under that name; rename one of them"
            )
        formats.register(fmt)


# presets whose formats are allocated per layer by dq.quantize (dq.api.MIXED_PRESETS)
MIXED_PRESET_NAMES = ("w4a8",)

# name -> (default LayerSpec, one-line description)
PRESETS: dict[str, tuple[LayerSpec, str]] = {
    # int8 per-channel weights, uint8 per-tensor static activations: the fast CPU/GPU path.
    # Adjacent input-channel weight pairs keep |a| + |b| <= 128 so that AVX2 CPUs without VNNI
    # run every layer in one exact integer pass (costs ~3-4 dB of weight SQNR, about half a bit;
    # eval/pair_limit_sqnr.py)
    "w8a8": (
        LayerSpec("int8", "channel", act="uint8", pair_limit=128),
        "INT8 weights and activations",
    ),
    # int7 per-channel weights, uint8 activations: runs in one integer pass on AVX2 CPUs without
    # VNNI (u8 x s8 pair sums cannot saturate int16 when |w| <= 63); int8 kernels elsewhere
    "w7a8": (LayerSpec("int7", "channel", act="uint8"), "INT7 weights, INT8 activations"),
    # int4 weights (groups of 64 inputs), float activations: about 4x smaller weights
    "w4a16": (LayerSpec("int4", "group64", "mse"), "INT4 weight-only, group 64"),
    # uniform int4 per-channel weights with uint8 activations ("w4a8" itself is mixed precision:
    # dq.quantize allocates formats per layer, see dq.api.MIXED_PRESETS)
    "w4a8_uniform": (
        LayerSpec("int4", "channel", "mse", act="uint8"), "uniform INT4 weights, INT8 activations",
    ),
    # int8 per-channel weight-only
    "w8a16": (LayerSpec("int8", "channel"), "INT8 weight-only"),
    # OCP E4M3 weights per channel, float activations
    "fp8": (LayerSpec("fp8_e4m3", "channel"), "FP8 E4M3 weight-only"),
    # OCP E2M1 weights in groups of 32, float activations
    "fp4": (LayerSpec("fp4_e2m1", "group32", "mse"), "FP4 E2M1 weight-only, group 32"),
}
