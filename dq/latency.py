"""Measured per-layer latency of every candidate format on this machine: the cost behind a
latency budget, `dq.allocate.plan(table, Budget(latency_s=...), latency=...)`.

A `LatencyTable` holds, per layer and per candidate column (weight format and activation
format, or full precision), the median seconds of one call of that layer built as dq builds it
(`QLinear` / `QConv2d.from_float`, the active kernel backend) on an input of the shape the layer
sees in the UNet call given. `measure` builds it with a short benchmark: one hooked UNet
forward records every layer's input shape, then each distinct (layer type, weight shape, layer
arguments, input shape, column) is timed once and shared by the layers that have it.

    >>> inputs = unet_inputs(unet, batch=2)                     # random, of the UNet's shapes
    >>> lat = measure(unet, [("int8", "uint8"), ("int4", "uint8"), (None, None)], inputs)
    >>> lat.seconds("mid_block.attentions.0.proj_in", "int8", "uint8")

What the sum over layers predicts is the time spent in the quantizable layers; the rest of a
UNet forward (norms, attention softmax, activations) does not change with the plan. Timings are
of this machine under its current load: measure on the machine and thread count the model will
run on, ideally when it is otherwise idle.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LatencyTable", "column_key", "input_shapes", "measure", "unet_inputs"]

LATENCY_VERSION = 1

Column = tuple[str | None, str | None]  # (weight format or None = float, act format or None)


def column_key(weight: str | None, act: str | None) -> str:
    """The table's name of a column: "float" (full precision), "int4/float" (weight-only),
    "int4/uint8"."""
    if weight is None:
        return "float"
    return f"{weight}/{act or 'float'}"


@dataclass
class LatencyTable:
    """Median seconds per call, per layer and column (`column_key`).

    Args:
        layers: layer name -> column key -> seconds.
        settings: how it was measured (threads, repeats, input shapes' source, kernel
            backend, torch version, machine), kept so a reader can tell two tables apart.
    """

    layers: dict[str, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)

    def seconds(self, layer: str, weight: str | None, act: str | None) -> float:
        """Seconds per call of `layer` in the column; ValueError naming what is missing."""
        row = self.layers.get(layer)
        if row is None:
            raise ValueError(
                f"the latency table has no layer {layer!r}: measure it on the same UNet "
                "(dq.latency.measure) as the sensitivity table"
            )
        key = column_key(weight, act)
        if key not in row:
            raise ValueError(
                f"the latency table has no column {key!r} for layer {layer!r} (it has "
                f"{sorted(row)}); measure with that candidate among the columns"
            )
        return row[key]

    def total(self, plan: Mapping[str, Any]) -> float:
        """Predicted seconds in the quantizable layers for a plan {layer: LayerSpec | None}."""
        return sum(
            self.seconds(n, None if s is None else s.weight, None if s is None else s.act)
            for n, s in plan.items()
        )

    def to_json(self) -> str:
        return json.dumps({"version": LATENCY_VERSION, "settings": self.settings,
                           "layers": self.layers}, indent=1, sort_keys=True)  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a latency table (invalid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("version") != LATENCY_VERSION or "layers" not in d:
            raise ValueError(
                f"not a dq latency table of version {LATENCY_VERSION} (write one with "
                "dq.latency.measure(...).to_json())"
            )
        bad = [n for n, row in d["layers"].items()
               if not isinstance(row, dict) or not all(isinstance(v, int | float) and v > 0 for v in row.values())]  # fmt: skip
        if bad:
            raise ValueError(f"latency table rows {bad[:3]} hold non-positive or non-numeric seconds")
        return cls(layers=d["layers"], settings=d.get("settings", {}))


def unet_inputs(unet: nn.Module, *, batch: int = 2, latent: int | None = None,
                text_len: int = 77, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Random keyword arguments for one `unet(**kwargs)` call of the model's own shapes:
    `batch` latents of `latent` x `latent` (default: the config's sample_size), `text_len`
    text tokens, and SDXL's added conditions where the config asks for them."""
    cfg = unet.config
    side = latent or cfg.sample_size
    side = side if isinstance(side, int) else side[0]
    g = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    kwargs: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, side, side, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * batch, dtype=torch.float32),
        }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else
            ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in kwargs.items()}  # fmt: skip


def input_shapes(unet: nn.Module, inputs: Mapping[str, Any], layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Input shape of each named layer in one `unet(**inputs)` call (its first call, if it runs
    more than once). Raises ValueError for a layer the call never reaches."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name in layers:
        def hook(_m, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))
        hooks.append(unet.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            unet(**inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in shapes]
    if missing:
        raise ValueError(f"the UNet call never reached {len(missing)} layer(s), e.g. {missing[:3]}; "
                         "give inputs that run every layer")  # fmt: skip
    return shapes


def _time(fn, x: torch.Tensor, reps: int, warmup: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_key(m: nn.Module, shape: tuple[int, ...]) -> tuple:
    if isinstance(m, nn.Conv2d):
        return ("conv", tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, shape)  # fmt: skip
    return ("linear", tuple(m.weight.shape), m.bias is not None, shape)


def measure(
    unet: nn.Module,
    columns: Sequence[Column],
    inputs: Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
    granularity: str = "channel",
    method: str = "minmax",
    reps: int = 5,
    warmup: int = 2,
    progress: bool = True,
) -> LatencyTable:
    """Time every layer in every column on this machine (see the module docstring).

    Args:
        unet: the float UNet (not modified).
        columns: (weight format, activation format) pairs; (w, None) weight-only; (None, None)
            the float layer.
        inputs: keyword arguments of one UNet call at the size it will run (`unet_inputs`).
        layers: layer names (default: every quantizable layer, `dq.quantizable_layers`).
        granularity, method: the weight scales of the built layers (as the sensitivity table's).
        reps, warmup: timed and untimed calls per measurement (the median of the timed ones).
        progress: a progress bar over the distinct measurements.
    """
    from dq.api import quantizable_layers
    from dq.config import LayerSpec
    from dq.kernels import get_backend
    from dq.modules import quantized_module_for

    if reps < 1 or warmup < 0:
        raise ValueError(f"reps={reps}, warmup={warmup}: need reps >= 1 and warmup >= 0")
    cols = [(w, a) for w, a in columns]
    if not cols:
        raise ValueError("give at least one column, e.g. [('int8', 'uint8'), (None, None)]")
    all_layers = quantizable_layers(unet)
    names = list(all_layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(f"not quantizable layers of this UNet: {unknown[:3]}")
    shapes = input_shapes(unet, inputs, names)
    jobs: dict[tuple, tuple[nn.Module, tuple[int, ...], Column]] = {}
    keys: dict[tuple[str, str], tuple] = {}
    for n in names:
        m = all_layers[n]
        for w, a in cols:
            key = (*_layer_key(m, shapes[n]), w, a)
            jobs.setdefault(key, (m, shapes[n], (w, a)))
            keys[(n, column_key(w, a))] = key
    done: dict[tuple, float] = {}
    g = torch.Generator().manual_seed(0)
    for key, (m, shape, (w, a)) in tqdm(jobs.items(), desc="dq latency", disable=not progress, unit="timing"):
        x = torch.randn(shape, generator=g).to(m.weight.device)
        if w is None:
            layer = m
        else:
            spec = LayerSpec(w, granularity, method, act=a)
            layer = quantized_module_for(m).from_float(m, spec, (-3.0, 3.0) if a else None).eval()
        done[key] = _time(layer, x, reps, warmup)
    table = {n: {} for n in names}
    for (n, ck), key in keys.items():
        table[n][ck] = done[key]
    settings = {
        "threads": torch.get_num_threads(), "reps": reps, "warmup": warmup,
        "granularity": granularity, "method": method, "backend": get_backend(),
        "inputs": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
        "distinct_timings": len(jobs), "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }  # fmt: skip
    return LatencyTable(layers=table, settings=settings)
