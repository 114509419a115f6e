"""The three-line entry point: `dq.quantize(pipe, "w8a8", calib_prompts=[...])`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dq import formats as _formats
from dq.config import LayerSpec, QuantConfig
from dq.generate import Sampling, check_prompts, generate
from dq.modules import QuantizedLayerMixin, check_spec_fits, quantized_module_for, runs_on_engine
from dq.quant import QWeight
from dq.storage import resolve_spec

logger = logging.getLogger(__name__)


def _check_pipe(pipe: Any) -> nn.Module:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ValueError(
            f"dq.quantize needs a diffusers pipeline with a `unet` (e.g. StableDiffusionPipeline, "
            f"StableDiffusionXLPipeline); got {type(pipe).__name__} without one. Transformer-based "
            "pipelines (FLUX, SD3) are not supported yet."
        )
    return unet


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """A mixed-precision target: `dq.quantize` scores every layer (`dq.sensitivity.analyze`,
    or a given table) and one integer program (`dq.allocate.plan`) picks a format per layer
    under the budget, among the formats the backend runs fast.

    Args:
        avg_weight_bits: average weight bits by bytes, scales counted: the plan holds at most
            the bytes of `avg_weight_bits`-bit codes plus a per-channel fp32 scale per layer
            (4.0: the bytes of uniform per-channel INT4), e.g. 4.0 or 3.5.
        weight_bytes: or a budget in weight bytes (codes, scales, zero points).
        act: activation format of every quantized layer ("uint8"), or None for weight-only.
        backend: the kernels the plan is allocated for ("cpu": the int8 engine's formats;
            "any": every candidate).
        pin_fp: fraction of the most sensitive activation layers kept in float (MixDQ: ~1%).
        sensitivity: settings of the sensitivity run (candidates, sizes); None for defaults.
        name: the label saved with the plan.

    Example:
        >>> pipe = dq.quantize(pipe, dq.MixedPrecision(avg_weight_bits=3.5), calib_prompts=p)
    """

    avg_weight_bits: float | None = 4.0
    weight_bytes: int | None = None
    act: str | None = "uint8"
    backend: str = "cpu"
    pin_fp: float = 0.01
    sensitivity: Any = None
    name: str = "mixed"

    def __post_init__(self) -> None:
        if (self.avg_weight_bits is None) == (self.weight_bytes is None):
            raise ValueError("MixedPrecision needs exactly one of avg_weight_bits= or weight_bytes=")
        if self.avg_weight_bits is not None and not 1 < float(self.avg_weight_bits) <= 16:
            raise ValueError(f"avg_weight_bits={self.avg_weight_bits!r}: use a number in (1, 16], e.g. 4.0")
        if not 0 <= self.pin_fp < 1:
            raise ValueError(f"pin_fp={self.pin_fp!r}: a fraction in [0, 1), e.g. 0.01")


# presets allocated per layer (uniform counterparts keep a name that says so: "w4a8_uniform")
MIXED_PRESETS: dict[str, MixedPrecision] = {
    # weights averaging 4 bits by bytes (scales counted), 8-bit activations, BOS-aware
    "w4a8": MixedPrecision(avg_weight_bits=4.0, act="uint8", name="w4a8"),
}


def _as_config(config: str | QuantConfig | MixedPrecision) -> QuantConfig | MixedPrecision:
    if isinstance(config, QuantConfig | MixedPrecision):
        return config
    if isinstance(config, str):
        key = config.lower().replace("-", "_")
        if key in MIXED_PRESETS:
            return MIXED_PRESETS[key]
        return QuantConfig.from_preset(config)
    raise ValueError(
        "config must be a preset name (e.g. 'w8a8'), a dq.QuantConfig or a dq.MixedPrecision, "
        f"got {type(config).__name__}"
    )


# sensitivity tables computed in this process, by (model fingerprint, settings): a second
# dq.quantize at another budget does no sensitivity work
_TABLES: dict[tuple[str, str], Any] = {}


def _budget_bytes(table, target: MixedPrecision) -> float:
    """The weight-byte budget: given, or `avg_weight_bits` by bytes with scales counted, i.e.
    what every table layer would hold at that many bits per weight plus one fp32 scale per
    output channel (and the activation parameters when activations are quantized)."""
    if target.weight_bytes is not None:
        return float(target.weight_bytes)
    act = 8 if target.act is not None else 0
    return float(sum(info["numel"] * target.avg_weight_bits / 8 + info["shape"][0] * 4 + act
                     for info in table.layers.values()))


def _allocated_config(pipe, target: MixedPrecision, prompts, sampling, table, cache_dir, progress) -> QuantConfig:
    from dq import allocate
    from dq import sensitivity as S

    if table is None:
        if prompts is None:
            raise ValueError(
                f"{target.name!r} allocates formats per layer from a sensitivity analysis: pass "
                "calib_prompts=[...] (or sensitivity=<a SensitivityTable>)"
            )
        settings = target.sensitivity or S.SensitivitySettings(sampling=sampling)
        key = (S.model_fingerprint(pipe.unet), json.dumps(
            {"s": repr(settings), "p": list(prompts)}, sort_keys=True))
        table = _TABLES.get(key)
        if table is None:
            table = S.analyze(pipe, prompts, settings=settings, cache_dir=cache_dir, progress=progress)
            _TABLES[key] = table
    elif isinstance(table, str | os.PathLike):
        table = S.SensitivityTable.from_json(Path(table).read_text())
    if table.model != S.model_fingerprint(pipe.unet):
        raise ValueError(
            "the sensitivity table was computed on another model (its fingerprint differs); "
            "analyze this pipeline's UNet or drop sensitivity="
        )
    budget = allocate.Budget(weight_bytes=_budget_bytes(table, target))
    cfg = allocate.plan(table, budget, backend=target.backend, act=target.act, pin_fp=target.pin_fp)
    return dataclasses.replace(cfg, name=f"{target.name} ({cfg.name})")


def quantizable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Name -> float Linear/Conv2d layer of `unet` that dq can replace."""
    return {
        name: m
        for name, m in unet.named_modules()
        if name and quantized_module_for(m) is not None and not isinstance(m, QuantizedLayerMixin)
    }


def resolve_plan(unet: nn.Module, config: QuantConfig) -> dict[str, LayerSpec | None]:
    """The explicit per-layer plan for `unet`: every quantizable layer -> its (shape-resolved)
    spec, or None where it stays in float. Raises ValueError for plan entries naming layers
    that do not exist, or specs that cannot fit a layer."""
    layers = quantizable_layers(unet)
    missing = sorted(set(config.layers) - set(layers))
    if missing:
        raise ValueError(
            f"the plan names {len(missing)} layer(s) the UNet does not have, e.g. {missing[:3]}; "
            "layer names are those of unet.named_modules() (Linear and Conv2d only)"
        )
    plan: dict[str, LayerSpec | None] = {}
    for name, m in layers.items():
        spec = config.spec_for(name)
        if spec is not None:
            spec = resolve_spec(spec, m.weight.shape)
            check_spec_fits(spec, m.weight.shape, name)
        plan[name] = spec
    return plan


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_plan(
    unet: nn.Module,
    plan: dict[str, LayerSpec | None],
    act_ranges: dict[str, tuple[float, float]] | None = None,
    qweights: dict[str, QWeight] | None = None,
    bos: torch.Tensor | None = None,
    bos_layers: Sequence[str] = (),
    progress: bool = False,
) -> nn.Module:
    """Replace every layer the plan quantizes by its quantized module, in place.

    Args:
        unet: the float UNet.
        plan: name -> LayerSpec (None keeps the layer in float), e.g. from `resolve_plan`.
        act_ranges: name -> calibrated (min, max) input range, for specs with activations.
        qweights: name -> grid values to store as they are (e.g. learned rounding results);
            other layers are rounded to nearest.
        bos: [D] the BOS token's text embedding; with `bos_layers`, those cross-attention
            key/value layers keep token 0 in full precision (see `QLinear.enable_bos`).
        bos_layers: layer names to make BOS-aware (ignored when `bos` is None).
        progress: a progress bar over layers.
    """
    act_ranges = act_ranges or {}
    qweights = qweights or {}
    bos_set = set(bos_layers) if bos is not None else set()
    todo = [(n, s) for n, s in plan.items() if s is not None]
    for name, spec in tqdm(todo, desc="dq weights", disable=not progress, unit="layer"):
        module = unet.get_submodule(name)
        cls = quantized_module_for(module)
        if cls is None:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) cannot be quantized")
        qw = qweights.get(name)
        if qw is None:
            q = cls.from_float(module, spec, act_range=act_ranges.get(name))
        else:
            q = cls.from_qweight(module, qw, spec, act_range=act_ranges.get(name))
        if name in bos_set:
            q.enable_bos(module, bos)
        _set_submodule(unet, name, q)
    return unet


# --- BOS-aware text embedding ---------------------------------------------------------------
# Cross-attention key/value projections read the text embedding; diffusers names them so.
from dq.recipes import BOS_LAYER_SUFFIXES  # noqa: E402


def bos_candidates(plan: dict[str, LayerSpec | None]) -> list[str]:
    """Cross-attention key/value layers whose activations the plan quantizes."""
    return [
        n for n, s in plan.items()
        if s is not None and s.act is not None and n.endswith(BOS_LAYER_SUFFIXES)
    ]


def prompt_independent_bos(record, rtol: float = 1e-3) -> torch.Tensor | None:
    """Token 0 of the recorded text embeddings if it is the same for every prompt (a causal
    encoder such as CLIP), else None. All-zero embeddings (SDXL's empty negative prompt) are
    ignored."""
    if not record.text_embeddings:
        return None
    rows = record.bos_embeddings().float()  # [n, D]
    rows = rows[rows.abs().amax(dim=1) > 0]
    if rows.shape[0] == 0:
        return None
    ref = rows[0]
    if (rows - ref).abs().amax() > rtol * ref.abs().amax() + 1e-6:
        return None
    return ref.clone()


class _TokenRange:
    """Scoped forward pre-hooks recording each layer's input range over tokens 1.. only."""

    def __init__(self, unet: nn.Module, names: Sequence[str]):
        self.unet, self.names = unet, list(names)
        self._lo: dict[str, float] = {}
        self._hi: dict[str, float] = {}
        self._handles: list = []

    def __enter__(self) -> _TokenRange:
        for name in self.names:
            def hook(module, args, name=name):
                x = args[0]
                if x.dim() == 3 and x.shape[1] > 1:
                    lo, hi = torch.aminmax(x[:, 1:].detach().float())
                    self._lo[name] = min(self._lo.get(name, float("inf")), float(lo))
                    self._hi[name] = max(self._hi.get(name, float("-inf")), float(hi))

            self._handles.append(self.unet.get_submodule(name).register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {n: (self._lo[n], self._hi[n]) for n in self._lo}


ROUNDINGS = ("nearest", "search", "learned")
# reservoir rows per layer for search / learned rounding (AdaRound needs a few hundred to thousands)
LEARNED_ROWS_PER_LAYER = 1024


def _check_rounding(rounding: str, rounding_settings: Any) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not valid; use one of {ROUNDINGS}")
    if rounding_settings is None:
        return
    from dq import rounding as R

    want = {"search": R.SearchSettings, "learned": R.RoundingSettings}.get(rounding)
    if want is None:
        raise ValueError(
            "rounding_settings= applies to rounding='search' (a dq.rounding.SearchSettings) or "
            "rounding='learned' (a dq.rounding.RoundingSettings) only"
        )
    if not isinstance(rounding_settings, want):
        raise ValueError(
            f"rounding={rounding!r} takes rounding_settings=dq.rounding.{want.__name__}(...), "
            f"got {type(rounding_settings).__name__}"
        )


def _same_kernels(spec: LayerSpec) -> list[str]:
    """FP formats of the spec's width that store and run like its own (the searched split may
    change the format, never the bytes or the kernel path)."""
    from dq.rounding import fp_formats_of_width

    fmt = _formats.get(spec.weight)
    engine = runs_on_engine(spec)
    return [f.name for f in fp_formats_of_width(fmt.bits)
            if f.storage == fmt.storage and runs_on_engine(dataclasses.replace(spec, weight=f.name)) == engine]


def _rounded_qweights(
    unet: nn.Module, plan: dict, record: Any, rounding: str, settings: Any, progress: bool
) -> tuple[dict, dict[str, QWeight]]:
    """Per quantized layer, on its captured input rows balanced across timesteps: the output-
    error search of format (FP split) and clipping scale (`dq.rounding.search`), then for
    "learned" AdaRound from there (`dq.rounding.learn`). Returns the plan (FP layers name the
    chosen split) and the weights to store as given (`from_qweight`)."""
    from dq import rounding as R

    search_settings = settings if rounding == "search" else None
    learn_settings = settings if rounding == "learned" else None
    plan = dict(plan)
    out: dict[str, QWeight] = {}
    todo = [(n, s) for n, s in plan.items() if s is not None]
    for name, spec in tqdm(todo, desc=f"dq {rounding} rounding", disable=not progress, unit="layer"):
        stats = record.layers.get(name)
        if stats is None or stats.samples.shape[0] == 0:
            raise ValueError(
                f"rounding={rounding!r}: no captured inputs for layer {name!r} (it never ran during "
                "calibration); keep it in float (QuantConfig.skip) or calibrate with inputs that reach it"
            )
        weights = R.timestep_row_weights(stats.sample_timesteps)
        w = unet.get_submodule(name).weight
        allowed = _same_kernels(spec) if _formats.get(spec.weight).kind == "fp" else None
        spec, qw = R.search(w, spec, stats.samples, search_settings, formats_allowed=allowed,
                            row_weights=weights)
        if rounding == "learned":
            qw = R.learn(w, spec, stats.samples, learn_settings, scale=qw.scale,
                         zero_point=qw.zero_point, row_weights=weights)
        plan[name], out[name] = spec, qw
    return plan, out


def _calibrate_and_apply(
    unet: nn.Module,
    cfg: QuantConfig,
    run: Callable[[], Any] | None,
    *,
    missing_run: str,
    rounding: str,
    rounding_settings: Any = None,
    progress: bool,
) -> nn.Module:
    """The one quantization path: resolve the plan, calibrate with `run()` (hooks on `unet`
    while it runs) where activations need ranges or rounding is learned, quantize every
    layer, record the plan."""
    _check_rounding(rounding, rounding_settings)
    if any(isinstance(m, QuantizedLayerMixin) for m in unet.modules()):
        raise ValueError(
            "this model is already quantized; load the float model again to quantize it with "
            "another config"
        )
    plan = resolve_plan(unet, cfg)
    from dq import validate

    validate.check_before_quantize(unet, cfg, plan)  # meta / NaN weights, unmatched skips
    act_ranges: dict[str, tuple[float, float]] = {}
    qweights: dict[str, QWeight] = {}
    bos, bos_layers = None, []
    needs_act = any(s is not None and s.act is not None for s in plan.values())
    learned = rounding != "nearest"  # search / learned: per-layer input rows
    if needs_act or learned:
        if run is None:
            why = "quantizes activations" if needs_act else f"uses rounding={rounding!r}"
            raise ValueError(f"config {cfg.name!r} {why} and needs calibration: {missing_run}")
        from dq.capture import Capture, CaptureSettings

        bos_layers = bos_candidates(plan) if cfg.bos_aware else []
        if learned:  # input rows for reconstruction, byte-capped
            settings = CaptureSettings(max_samples_per_layer=LEARNED_ROWS_PER_LAYER, max_unet_calls=0)
        else:  # ranges and text embeddings only: no reservoir rows, no stored UNet calls
            settings = CaptureSettings(max_bytes=0, max_samples_per_layer=0, max_unet_calls=0)
        with _TokenRange(unet, bos_layers) as tail_ranges, Capture(unet, settings) as cap:
            run()
        record = cap.record
        del cap  # its accumulators hold every float layer: free each as it is replaced
        if needs_act:
            validate.check_calibration(record, plan, missing_run)  # layers that never ran
            act_ranges = _act_ranges(record, plan)
        if bos_layers:
            bos = prompt_independent_bos(record)
            if bos is None:
                logger.warning(
                    "dq: token 0 of the text embedding differs between prompts (not a causal "
                    "encoder?); BOS-aware quantization is off for this pipeline"
                )
            else:
                act_ranges.update(tail_ranges.ranges())
        if learned:
            plan, qweights = _rounded_qweights(unet, plan, record, rounding, rounding_settings, progress)
    apply_plan(unet, plan, act_ranges, qweights, bos=bos, bos_layers=bos_layers, progress=progress)
    _register_config(unet, _resolved_config(cfg, plan))
    return unet


def quantize(
    pipe: Any,
    config: str | QuantConfig = "w8a8",
    calib_prompts: Sequence[str] | None = None,
    *,
    calibration: Sampling | Mapping[str, Any] | None = None,
    rounding: str = "nearest",
    rounding_settings: Any = None,
    sensitivity: Any = None,
    sensitivity_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> Any:
    """Quantize a diffusers pipeline's UNet in place and return the pipeline.

    Activation ranges are calibrated by running the pipeline's own `__call__` on
    `calib_prompts` with hooks on the UNet (see `dq.capture`); weight-only configs need no
    prompts.

    Args:
        pipe: a diffusers pipeline with a `unet` (StableDiffusionPipeline, SDXL, ...).
        config: a preset name ("w8a8", "w4a8" (mixed precision), "w4a8_uniform", "w4a16",
            "w8a16", "fp8", "fp4"), a QuantConfig, or a `MixedPrecision` target.
        calib_prompts: prompts for calibration; None takes the model recipe's prompt set
            (`dq.recipes`: dq's shipped captions for SD/SDXL families, the embedded world's own
            captions for the embedded pipeline); unknown models must pass prompts when
            activations are quantized.
        calibration: the calibration run's pipeline arguments (`dq.Sampling`, used as given,
            or a dict of its fields: num_inference_steps, guidance_scale, height, width,
            batch_size, seed, extra); unset fields come from the model's recipe
            (`dq.recipes.recipe_for(pipe).calibration`, e.g. SDXL-Turbo 1 step without
            guidance), then from the pipeline's own defaults.
        rounding: "nearest" (round to nearest on the spec's scales); "search" (per layer, the
            clipping scale, and for FP layers the exponent / mantissa split among formats of
            the same width, bytes and kernels, chosen by the layer's output error on its
            captured input rows, `dq.rounding.search`; round to nearest there); or "learned"
            (that search, then AdaRound on the INT or FP grid, `dq.rounding.learn`). Rows are
            balanced across timesteps; both need calibration prompts, also for weight-only
            configs. The saved plan names the formats chosen.
        rounding_settings: a `dq.rounding.SearchSettings` for rounding="search" or a
            `dq.rounding.RoundingSettings` for rounding="learned" (iterations, regulariser,
            ...); None for their defaults.
        sensitivity: for mixed precision, a `dq.sensitivity.SensitivityTable` (or its JSON
            file) to allocate from instead of analysing; tables computed here are kept for the
            process, so a second call at another budget does no sensitivity work.
        sensitivity_cache: folder caching the sensitivity run on disk (resumable).
        progress: show progress bars.

    Example:
        >>> pipe = dq.quantize(pipe, "w8a8", calib_prompts=["a red circle", "a blue square"],
        ...                    calibration={"num_inference_steps": 20})
        >>> image = pipe("a green triangle").images[0]
    """
    unet = _check_pipe(pipe)
    cfg = _as_config(config)
    from dq import recipes

    recipe = recipes.recipe_for(pipe)
    sampling = _as_sampling(calibration, recipe.calibration)
    if calib_prompts is not None:
        calib_prompts = check_prompts(calib_prompts, "calib_prompts")
    elif recipe.name != "generic":  # a known model family ships a calibration prompt set
        n = recipe.calibration.num_prompts
        calib_prompts = recipes.calibration_prompts(recipe)[:n]
    if isinstance(cfg, MixedPrecision):
        from dq import validate

        validate.check_adapters(unet)  # before the costly sensitivity run
        validate.check_weights(unet, {n: LayerSpec() for n in quantizable_layers(unet)})
        cfg = _allocated_config(pipe, cfg, calib_prompts, sampling, sensitivity, sensitivity_cache, progress)
    elif sensitivity is not None or sensitivity_cache is not None:
        raise ValueError("sensitivity= and sensitivity_cache= apply to mixed-precision configs only")
    run = None
    if calib_prompts is not None:
        def run():
            return generate(pipe, calib_prompts, sampling, output_type="latent",
                            progress=progress, desc="dq calibration")
    _calibrate_and_apply(
        unet, cfg, run, rounding=rounding, rounding_settings=rounding_settings, progress=progress,
        missing_run="pass calib_prompts=[...] (16-64 prompts like the ones the pipeline will serve)",
    )
    from dq.serialization import bind_atomic_save, record_calibration

    if calib_prompts is not None:
        record_calibration(unet, {"num_prompts": len(calib_prompts), "sampling": sampling.to_dict(),
                                  "rounding": rounding})
    return bind_atomic_save(pipe)  # pipe.save_pretrained now writes atomically


def _as_sampling(calibration: Sampling | Mapping[str, Any] | None, defaults) -> Sampling:
    """The calibration run's settings: a `Sampling` as given; a dict over the recipe's
    defaults (`defaults`, a `dq.recipes.Calibration`); None for the recipe's defaults."""
    base = defaults.sampling()
    if calibration is None:
        return base
    if isinstance(calibration, Sampling):
        return calibration
    if isinstance(calibration, Mapping):
        known = {f.name for f in dataclasses.fields(Sampling)}
        unknown = sorted(set(calibration) - known)
        if unknown:
            raise ValueError(
                f"calibration has unknown keys {unknown}; use {sorted(known)} (other pipeline "
                "arguments go in 'extra')"
            )
        fields = {**base.to_dict(), **{k: v for k, v in calibration.items() if v is not None}}
        return Sampling(**fields)
    raise ValueError(
        f"calibration must be a dq.Sampling or a dict of its fields, got {type(calibration).__name__}"
    )


def _act_ranges(record, plan: dict[str, LayerSpec | None]) -> dict[str, tuple[float, float]]:
    """Calibrated (min, max) of every layer that quantizes activations (`dq.validate.
    check_calibration` has refused layers that never ran)."""
    return {n: record.minmax(n) for n, s in plan.items() if s is not None and s.act is not None}


def _resolved_config(cfg: QuantConfig, plan: dict[str, LayerSpec | None]) -> QuantConfig:
    """The saved form of a config: every layer named explicitly, no default, no skips."""
    return QuantConfig(default=None, layers=plan, skip=(), bos_aware=cfg.bos_aware, name=cfg.name)


def quantize_model(
    unet: nn.Module,
    config: str | QuantConfig = "w8a8",
    calibrate: Callable[[nn.Module], None] | None = None,
    *,
    rounding: str = "nearest",
    rounding_settings: Any = None,
    progress: bool = False,
) -> nn.Module:
    """Quantize a bare UNet (no pipeline) in place and return it.

    Args:
        unet: a diffusers UNet (or any module with Linear/Conv2d layers).
        config: preset name or QuantConfig.
        calibrate: `calibrate(unet)` runs forwards on representative inputs; hooks record the
            activation ranges meanwhile. Required when the config quantizes activations.
        rounding, rounding_settings: as in `quantize`.
        progress: progress bars: UNet calls during calibration, then layers while weights are
            quantized.

    Example:
        >>> dq.quantize_model(unet, "w8a8", calibrate=lambda m: m(x, t, ctx))
    """
    cfg = _as_config(config)
    if isinstance(cfg, MixedPrecision):
        raise ValueError(
            f"{cfg.name!r} is mixed precision, allocated from image-level sensitivity: use "
            "dq.quantize(pipe, ...) with the pipeline, or pass the allocated QuantConfig here"
        )
    run = None if calibrate is None else (lambda: _calls_with_progress(unet, calibrate, progress))
    return _calibrate_and_apply(
        unet, cfg, run, rounding=rounding, rounding_settings=rounding_settings, progress=progress,
        missing_run="pass calibrate=fn where fn(unet) runs the model on representative inputs",
    )


def _calls_with_progress(unet: nn.Module, calibrate: Callable[[nn.Module], None], progress: bool) -> None:
    """`calibrate(unet)` under a progress bar counting the UNet calls it makes."""
    with tqdm(desc="dq calibration", unit="call", disable=not progress) as bar:
        handle = unet.register_forward_hook(lambda *_: bar.update(1))
        try:
            calibrate(unet)
        finally:
            handle.remove()


def _register_config(unet: nn.Module, cfg: QuantConfig) -> None:
    """Store the resolved per-layer plan on the model (what save_pretrained writes)."""
    from dq.serialization import attach_quantization_config  # sets unet._dq_config too

    attach_quantization_config(unet, cfg)
