"""Checks that run before any quantization work: clear errors (and warnings) about the model and
the plan, instead of a failure deep inside torch after minutes of calibration.

`check_before_quantize(unet, config, plan)`: `dq.quantize` / `dq.quantize_model` make it right
after the plan is resolved, before calibration runs; `check_calibration(record, plan)` right
after the calibration run, before its ranges are used.

    >>> plan = dq.resolve_plan(unet, cfg)
    >>> check_before_quantize(unet, cfg, plan)   # raises or warns; returns nothing
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from dq.config import DEFAULT_SKIP, LayerSpec, QuantConfig

__all__ = [
    "check_adapters",
    "check_before_quantize",
    "check_calibration",
    "check_plan_coverage",
    "check_weights",
]


def check_adapters(unet: nn.Module) -> None:
    """Raise ValueError when the model carries unfused adapters (peft LoRA layers).

    Quantizing them would turn each adapter's A/B factors into quantized layers of their own
    and leave peft's wrapper around a base it cannot fuse into or read; dq quantizes plain
    weights, and LoRA goes either into the weights first (fused) or onto the quantized model
    afterwards (kept in float beside the quantized base, `dq.lora`).
    """
    import sys

    if "peft" not in sys.modules:  # no peft imported: no adapter can exist
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    if not wrapped:
        return
    adapters = sorted({a for n in wrapped for a in unet.get_submodule(n).active_adapters})
    raise ValueError(
        f"the UNet carries unfused LoRA adapter(s) {adapters} on {len(wrapped)} layer(s), e.g. "
        f"{wrapped[0]!r}; dq quantizes plain weights. Either fuse them in first "
        "(pipe.fuse_lora(); pipe.unload_lora_weights() — the fastest model, the LoRA baked "
        "into the quantized codes), or unload them (pipe.unload_lora_weights()), quantize, and "
        "load the LoRA onto the quantized pipeline (pipe.load_lora_weights(...) after "
        "dq.quantize keeps it in float beside the quantized layers)"
    )


def check_weights(unet: nn.Module, plan: Mapping[str, LayerSpec | None]) -> None:
    """Raise ValueError when the model cannot be quantized as it is.

    - any parameter or buffer on the `meta` device (a model built without its weights);
    - a layer the plan quantizes whose weight holds NaN or infinite values (its scales would be
      NaN), naming every such layer.

    Args:
        unet: the float model about to be quantized.
        plan: its resolved plan (layer name -> spec, None for float layers).
    """
    meta = [n for n, t in (*unet.named_parameters(), *unet.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"the model's weights are on the meta device ({len(meta)} tensor(s), e.g. "
            f"{meta[:3]}): it was built without loading its weights (init_empty_weights, "
            "torch.device('meta') or a device_map that left them unloaded), so there is "
            "nothing to quantize. Load the pipeline with from_pretrained (real weights) "
            "first, then call dq.quantize"
        )
    bad: list[str] = []
    for name, spec in plan.items():
        if spec is None:
            continue
        w = unet.get_submodule(name).weight
        with torch.no_grad():
            # a finite sum means every value is finite (NaN and inf propagate); only a
            # non-finite sum (or an overflowing one) pays for the element-wise check
            if not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
                n_bad = int((~torch.isfinite(w)).sum())
                bad.append(f"{name!r} ({n_bad} of {w.numel()} values)")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"layer(s) {shown} hold NaN or infinite weights; their quantization scales would be "
            "NaN. Reload or repair the checkpoint (a failed fp16 conversion or training run "
            "does this), or keep those layers in float with QuantConfig(skip=[...])"
        )


def check_plan_coverage(
    config: QuantConfig, plan: Mapping[str, LayerSpec | None], *, stacklevel: int = 3
) -> None:
    """Warn (UserWarning) about a plan that probably does not do what was meant:

    - a skip pattern the user gave that matches no quantizable layer (a typo keeps the layer
      quantized); dq's default skips (conv_in, conv_out) are exempt;
    - a plan that quantizes no layer at all (every layer skipped or set to None).

    Args:
        config: the QuantConfig the plan was resolved from.
        plan: the resolved plan.
        stacklevel: passed to `warnings.warn` (3 points at the caller of `dq.quantize`).
    """
    names = list(plan)
    unmatched = [p for p in config.unmatched_skips(names) if p not in DEFAULT_SKIP]
    if unmatched:
        warnings.warn(
            f"skip pattern(s) {unmatched} match none of the model's {len(names)} quantizable "
            "layers, so nothing is kept in float for them. Use layer names as in "
            "unet.named_modules(): a plain name matches that module and everything under it "
            "('to_k', 'attn2', 'conv_in'), a glob matches whole names ('down_blocks.*.attn1.*')",
            UserWarning,
            stacklevel=stacklevel,
        )
    if names and all(s is None for s in plan.values()):
        warnings.warn(
            f"the config {config.name!r} quantizes none of the model's {len(names)} layers "
            "(every one is skipped or set to None); the model stays in float. Check "
            "QuantConfig.skip and the plan",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_calibration(record, plan: Mapping[str, LayerSpec | None], missing_run: str = "") -> None:
    """Raise ValueError when calibration did not reach every layer whose activations the plan
    quantizes (their ranges would be NaN), before any other use of the record.

    Args:
        record: the `dq.capture.CalibrationRecord` of the calibration run.
        plan: the resolved plan.
        missing_run: how to give dq a calibration run (the caller's wording), appended.
    """
    names = [n for n, s in plan.items() if s is not None and s.act is not None]
    if not names:
        return
    fix = f" ({missing_run})" if missing_run else ""
    if getattr(record, "num_calls", 1) == 0:
        raise ValueError(
            "calibration never ran the model: the calibration run finished without a single "
            "UNet call, so no activation range was seen. Make the run call the model: with "
            "dq.quantize_model, calibrate=fn must call fn's argument on real inputs; with "
            f"dq.quantize, give prompts and at least one sampling step{fix}"
        )

    def seen(n: str) -> bool:
        stats = record.layers.get(n)
        return stats is not None and int(stats.calls.sum()) > 0

    unseen = [n for n in names if not seen(n)]
    if unseen:
        raise ValueError(
            f"calibration never reached {len(unseen)} layer(s) whose activations the plan "
            f"quantizes, e.g. {unseen[:3]}: their ranges are unknown. Keep them in float "
            "(QuantConfig(skip=[...])) or calibrate with inputs that run them"
            f"{fix}"
        )


def check_before_quantize(
    unet: nn.Module, config: QuantConfig, plan: Mapping[str, LayerSpec | None]
) -> None:
    """Every check to run before calibration: `check_adapters` and `check_weights` (errors),
    then `check_plan_coverage` (warnings).

    Args:
        unet: the float model about to be quantized.
        config: the QuantConfig given by the user.
        plan: `dq.resolve_plan(unet, config)`.
    """
    check_adapters(unet)
    check_weights(unet, plan)
    check_plan_coverage(config, plan, stacklevel=5)
