"""Calibration capture: forward hooks on a UNet while the pipeline's own ``__call__`` runs.

What is recorded, per hooked layer (``nn.Linear`` / ``nn.Conv2d`` by default) and per
timestep of the sampling trajectory, all about the layer's INPUT activation:

- true ``min`` / ``max`` / ``absmax``, the running mean of the per-call abs-max, an EMA of the
  per-call min and max (MixDQ's running min-max, momentum 0.95), a per-input-channel abs-max
  (``Linear``: last dim; ``Conv2d``: dim 1), and how many batch items / calls were seen;
- a bounded, seeded reservoir sample of input rows for reconstruction (learned rounding):
  ``Linear`` -> token rows, the input flattened to ``[-1, in_features]``; ``Conv2d`` -> im2col
  patches, one row per output location, ``[C_in * kh * kw]`` in ``(c, ky, kx)`` order with the
  conv's own padding, so ``row @ weight.reshape(out, -1).T + bias`` is the conv output at that
  location (``groups == 1``). One reservoir budget (``max_bytes``) is shared by all layers:
  every layer gets the same row capacity, ``min(max_samples_per_layer, max_bytes // (sum of
  one row's bytes over the layers))``; a layer that sees fewer rows (the time embedding)
  keeps them all and leaves its share unused.

Per UNet call: the timestep (read by a pre-hook on the UNet, positional or keyword), and a
bounded reservoir of whole calls (inputs and output) for output-level metrics; the distinct
text-encoder outputs handed to the UNet (``encoder_hidden_states``) for BOS analysis.

Timesteps are keyed by value (``float(t)``; the first element when the UNet gets one timestep
per batch item), in first-seen order; with one scheduler setting this is the step order, and
``record.timesteps == pipe.scheduler.timesteps.tolist()``. The finiteness check synchronises
once per hooked call (a device-to-host copy of two numbers).

Example:
    >>> record = capture(pipe, ["a red circle", "a blue square"], num_inference_steps=4)
    >>> record.minmax("conv_in")
    >>> with Capture(pipe.unet) as cap:      # the context-manager form
    ...     pipe("a red circle", num_inference_steps=4)
    >>> record = cap.record
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "CalibrationRecord",
    "Capture",
    "CaptureSettings",
    "LayerStats",
    "UNetCall",
    "capture",
    "conv2d_patches",
    "reservoir_slots",
    "row_features",
]

STATE_DICT_VERSION = 1
HOOK_PREFIX = "dq.capture"
_KIND_CODES = {"linear": 0, "conv2d": 1}  # LayerStats.kind <-> int code in state dicts


@dataclass(frozen=True)
class CaptureSettings:
    """What :class:`Capture` records and how much memory it may use.

    Args:
        layer_types: module types to hook; each must subclass ``nn.Linear`` or ``nn.Conv2d``.
        ema_momentum: EMA weight of the past for the running min/max (MixDQ: 0.95).
        max_bytes: reservoir budget in bytes, all layers together (every layer gets the same
            number of rows); 0 keeps no samples.
        max_samples_per_layer: row cap per layer on top of ``max_bytes``; None for no cap.
        sample_dtype: dtype the reservoir rows are stored in.
        storage_device: where samples, UNet calls and text embeddings are kept.
        max_unet_calls: how many whole UNet calls (inputs + output) to keep, reservoir-sampled.
        max_text_embeddings: how many text-encoder outputs (batch items) to keep, first seen.
        check_finite: raise ``ValueError`` on NaN/inf in a captured input.
        seed: seed of the reservoir sampling.
    """

    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
    ema_momentum: float = 0.95  # MixDQ's running min-max
    max_bytes: int = 256 * 2**20  # 256 MiB of reservoir rows, all layers together
    max_samples_per_layer: int | None = 2048  # enough rows for per-layer reconstruction
    sample_dtype: torch.dtype = torch.float32  # reconstruction runs in float32
    storage_device: str = "cpu"  # keep accelerator memory for the pipeline
    max_unet_calls: int = 32  # MixDQ scores output SQNR on 32 stored samples
    max_text_embeddings: int = 256  # batch items of encoder_hidden_states
    check_finite: bool = True  # NaN/inf -> ValueError naming layer and timestep
    seed: int = 0  # reservoir sampling seed

    def __post_init__(self) -> None:
        types = self.layer_types
        if isinstance(types, type):
            types = (types,)
            object.__setattr__(self, "layer_types", types)
        if not types or not all(
            isinstance(t, type) and issubclass(t, (nn.Linear, nn.Conv2d)) for t in types
        ):
            raise ValueError(
                f"layer_types={self.layer_types!r}: give a non-empty tuple of nn.Linear / "
                "nn.Conv2d subclasses, e.g. (nn.Linear, nn.Conv2d)"
            )
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(
                f"ema_momentum={self.ema_momentum}: must be in [0, 1), e.g. 0.95 as in MixDQ"
            )
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes={self.max_bytes}: must be >= 0 (0 keeps no samples)")
        if self.max_samples_per_layer is not None and self.max_samples_per_layer < 0:
            raise ValueError(
                f"max_samples_per_layer={self.max_samples_per_layer}: must be >= 0 or None"
            )
        if self.max_unet_calls < 0 or self.max_text_embeddings < 0:
            raise ValueError(
                f"max_unet_calls={self.max_unet_calls}, max_text_embeddings="
                f"{self.max_text_embeddings}: both must be >= 0 (0 keeps none)"
            )
        if not self.sample_dtype.is_floating_point:
            raise ValueError(
                f"sample_dtype={self.sample_dtype}: must be a floating dtype, e.g. torch.float32"
            )


@dataclass
class LayerStats:
    """Input statistics of one layer; per-timestep tensors are indexed like ``record.timesteps``.

    Timesteps at which the layer never ran have ``count == 0`` and NaN statistics.

    Attributes:
        kind: ``"linear"`` (rows are tokens) or ``"conv2d"`` (rows are im2col patches).
        count: [T] int64, batch items seen (doubles with classifier-free guidance).
        calls: [T] int64, forward calls seen.
        min, max, absmax: [T] float32, true extrema over everything seen.
        mean_absmax: [T] float32, mean over calls of each call's abs-max.
        ema_min, ema_max: [T] float32, EMA over calls of each call's min / max.
        channel_absmax: [T, C_in] float32, abs-max per input channel.
        global_ema_min, global_ema_max: [] float32, EMA over all calls in call order.
        samples: [n, F] reservoir rows (F = in_features, or C_in * kh * kw for Conv2d).
        sample_timesteps: [n] int64, timestep index of each row.
        seen: rows offered to the reservoir.
    """

    kind: str
    count: Tensor
    calls: Tensor
    min: Tensor
    max: Tensor
    absmax: Tensor
    mean_absmax: Tensor
    ema_min: Tensor
    ema_max: Tensor
    channel_absmax: Tensor
    global_ema_min: Tensor
    global_ema_max: Tensor
    samples: Tensor
    sample_timesteps: Tensor
    seen: int = 0

    _TENSOR_FIELDS = (
        "count calls min max absmax mean_absmax ema_min ema_max channel_absmax "
        "global_ema_min global_ema_max samples sample_timesteps"
    ).split()


@dataclass
class UNetCall:
    """One stored UNet call: ``unet(sample, timestep, encoder_hidden_states, **kwargs)``.

    Attributes:
        call_index: position of the call among all UNet calls of the capture.
        timestep: the timestep value.
        sample: [B, C, H, W] latent input.
        encoder_hidden_states: [B, L, D] text embeddings (None if not given).
        output: [B, C, H, W] the UNet's output (the first element of a tuple output).
        extra: other tensor arguments, nested dicts flattened with dots
            (e.g. ``"added_cond_kwargs.text_embeds"``).
    """

    call_index: int
    timestep: float
    sample: Tensor
    encoder_hidden_states: Tensor | None
    output: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def unet_kwargs(self) -> dict:
        """Keyword arguments (besides sample, timestep, encoder_hidden_states) to replay the call."""
        out: dict = {}
        for key, value in self.extra.items():
            head, _, tail = key.partition(".")
            if tail:
                out.setdefault(head, {})[tail] = value
            else:
                out[head] = value
        return out


@dataclass
class CalibrationRecord:
    """Everything a capture recorded; plain tensors, see :meth:`to_state_dict`.

    Attributes:
        layers: layer name (relative to the UNet) -> :class:`LayerStats`.
        timesteps: timestep values in first-seen order; index i is "timestep index" i.
        num_calls: UNet forward calls seen.
        unet_calls: stored UNet calls, in call order (at most ``max_unet_calls``).
        text_embeddings: distinct text-encoder outputs given to the UNet, one [L, D] tensor
            per batch item (conditional and unconditional rows alike).
    """

    layers: dict[str, LayerStats]
    timesteps: list[float]
    num_calls: int = 0
    unet_calls: list[UNetCall] = field(default_factory=list)
    text_embeddings: list[Tensor] = field(default_factory=list)

    def _layer(self, name: str) -> LayerStats:
        if name not in self.layers:
            some = ", ".join(list(self.layers)[:3])
            raise ValueError(
                f"no statistics for layer {name!r}; names are relative to the UNet "
                f"(e.g. {some}); see record.layers for all {len(self.layers)}"
            )
        return self.layers[name]

    def timestep_index(self, timestep: float) -> int:
        """Index of a timestep value in :attr:`timesteps`."""
        for i, t in enumerate(self.timesteps):
            if math.isclose(t, float(timestep), rel_tol=0.0, abs_tol=1e-6):
                return i
        raise ValueError(
            f"timestep {timestep} was not captured; captured timesteps: {self.timesteps}"
        )

    def absmax(self, name: str, timestep: float | None = None) -> float:
        """Abs-max of a layer's input over all timesteps, or at one timestep value."""
        stats = self._layer(name)
        if timestep is not None:
            return float(stats.absmax[self.timestep_index(timestep)])
        return float(_nanmax(stats.absmax))

    def channel_absmax(self, name: str) -> Tensor:
        """[C_in] abs-max per input channel over all timesteps."""
        stats = self._layer(name)
        seen = stats.count > 0
        return stats.channel_absmax[seen].amax(dim=0)

    def minmax(self, name: str, reduce: str = "global") -> tuple:
        """Input range of a layer.

        Args:
            name: layer name relative to the UNet.
            reduce: ``"global"`` -> (min, max) floats over everything; ``"per_timestep"`` ->
                ([T], [T]) tensors; ``"ema"`` -> (min, max) floats of the EMA over all calls
                (MixDQ's activation range).
        """
        stats = self._layer(name)
        if reduce == "global":
            return float(_nanmin(stats.min)), float(_nanmax(stats.max))
        if reduce == "per_timestep":
            return stats.min.clone(), stats.max.clone()
        if reduce == "ema":
            return float(stats.global_ema_min), float(stats.global_ema_max)
        raise ValueError(f"reduce={reduce!r}: use 'global', 'per_timestep' or 'ema'")

    def samples(self, name: str, timestep: float | None = None) -> Tensor:
        """[n, F] reservoir rows of a layer's input, all timesteps or one timestep value."""
        stats = self._layer(name)
        if timestep is None:
            return stats.samples
        return stats.samples[stats.sample_timesteps == self.timestep_index(timestep)]

    def bos_embeddings(self) -> Tensor:
        """[n, D] the first token's text embedding of every stored text-encoder output."""
        if not self.text_embeddings:
            raise ValueError("no text embeddings were recorded (max_text_embeddings=0?)")
        return torch.stack([e[0] for e in self.text_embeddings])

    def to_state_dict(self) -> dict[str, Tensor]:
        """Flat ``name -> tensor`` dict (contiguous, unshared), storable with safetensors."""
        sd: dict[str, Tensor] = {
            "version": torch.tensor(STATE_DICT_VERSION, dtype=torch.int64),
            "timesteps": torch.tensor(self.timesteps, dtype=torch.float64),
            "num_calls": torch.tensor(self.num_calls, dtype=torch.int64),
        }
        for name, stats in self.layers.items():
            prefix = f"layers.{name}."
            sd[prefix + "kind"] = torch.tensor(_KIND_CODES[stats.kind], dtype=torch.int64)
            sd[prefix + "seen"] = torch.tensor(stats.seen, dtype=torch.int64)
            for key in LayerStats._TENSOR_FIELDS:
                sd[prefix + key] = getattr(stats, key)
        for i, call in enumerate(self.unet_calls):
            prefix = f"unet_calls.{i}."
            sd[prefix + "call_index"] = torch.tensor(call.call_index, dtype=torch.int64)
            sd[prefix + "timestep"] = torch.tensor(call.timestep, dtype=torch.float64)
            sd[prefix + "sample"] = call.sample
            sd[prefix + "output"] = call.output
            if call.encoder_hidden_states is not None:
                sd[prefix + "encoder_hidden_states"] = call.encoder_hidden_states
            for key, value in call.extra.items():
                sd[prefix + "extra." + key] = value
        for i, emb in enumerate(self.text_embeddings):
            sd[f"text_embeddings.{i}"] = emb
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> CalibrationRecord:
        """Rebuild a record from :meth:`to_state_dict`'s output."""
        version = int(sd.get("version", torch.tensor(-1)))
        if version != STATE_DICT_VERSION:
            raise ValueError(
                f"calibration state dict version {version}, expected {STATE_DICT_VERSION}: "
                "re-run dq.capture.capture with this dq version"
            )
        kinds = {v: k for k, v in _KIND_CODES.items()}
        layer_parts: dict[str, dict[str, Tensor]] = {}
        call_parts: dict[int, dict[str, Tensor]] = {}
        texts: dict[int, Tensor] = {}
        for key, value in sd.items():
            if key.startswith("layers."):
                name, _, attr = key[len("layers.") :].rpartition(".")
                layer_parts.setdefault(name, {})[attr] = value
            elif key.startswith("unet_calls."):
                index, _, attr = key[len("unet_calls.") :].partition(".")
                call_parts.setdefault(int(index), {})[attr] = value
            elif key.startswith("text_embeddings."):
                texts[int(key.rpartition(".")[2])] = value
        layers = {}
        for name, parts in layer_parts.items():
            layers[name] = LayerStats(
                kind=kinds[int(parts["kind"])],
                seen=int(parts["seen"]),
                **{k: parts[k] for k in LayerStats._TENSOR_FIELDS},
            )
        calls = []
        for index in sorted(call_parts):
            parts = call_parts[index]
            calls.append(
                UNetCall(
                    call_index=int(parts["call_index"]),
                    timestep=float(parts["timestep"]),
                    sample=parts["sample"],
                    encoder_hidden_states=parts.get("encoder_hidden_states"),
                    output=parts["output"],
                    extra={
                        k[len("extra.") :]: v for k, v in parts.items() if k.startswith("extra.")
                    },
                )
            )
        return cls(
            layers=layers,
            timesteps=[float(t) for t in sd["timesteps"].tolist()],
            num_calls=int(sd["num_calls"]),
            unet_calls=calls,
            text_embeddings=[texts[i] for i in sorted(texts)],
        )


def _nanmin(x: Tensor) -> Tensor:
    finite = x[~torch.isnan(x)]
    return finite.min() if finite.numel() else torch.tensor(float("nan"))


def _nanmax(x: Tensor) -> Tensor:
    finite = x[~torch.isnan(x)]
    return finite.max() if finite.numel() else torch.tensor(float("nan"))


# ---------------------------------------------------------------------------------------------
# Pure helpers: reservoir sampling and im2col rows
# ---------------------------------------------------------------------------------------------


def reservoir_slots(
    seen: int, n: int, capacity: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Algorithm R over a batch: which of ``n`` new items go into which reservoir slots.

    Item ``j`` (0-based over the whole stream, ``j = seen + i``) fills slot ``j`` while the
    reservoir has room, and later replaces slot ``r ~ U{0..j}`` if ``r < capacity``; every item
    seen so far is then kept with probability ``capacity / (seen + n)``. When two new items hit
    the same slot the later one wins, as in the sequential algorithm.

    Args:
        seen: items offered before this batch.
        n: items in this batch.
        capacity: reservoir size.
        generator: CPU generator (seeded: the choice is reproducible).

    Returns:
        (slots [m] int64, items [m] int64 in [0, n)): write new item ``items[k]`` to
        ``slots[k]``; each slot appears at most once.
    """
    empty = torch.empty(0, dtype=torch.int64)
    if capacity <= 0 or n <= 0:
        return empty, empty
    j = seen + torch.arange(n, dtype=torch.int64)  # [n] stream positions
    r = (torch.rand(n, generator=generator, dtype=torch.float64) * (j + 1)).long()
    r = torch.minimum(r, j)  # guard against rounding up to j + 1
    slot = torch.where(j < capacity, j, r)  # [n]
    accept = slot < capacity
    items = torch.arange(n, dtype=torch.int64)[accept]
    slot = slot[accept]
    if items.numel() == 0:
        return empty, empty
    winner = torch.full((capacity,), -1, dtype=torch.int64)
    winner.scatter_reduce_(0, slot, items, reduce="amax")  # last writer wins
    slots = torch.nonzero(winner >= 0).flatten()
    return slots, winner[slots]


def conv2d_patches(x: Tensor, conv: nn.Conv2d, rows: Tensor) -> Tensor:
    """im2col rows of a Conv2d input at selected output locations.

    Row ``r`` is output location ``(b, oy, ox)`` with ``r = (b * H_out + oy) * W_out + ox``;
    its patch is the padded input window ``[C_in, kh, kw]`` flattened in ``(c, ky, kx)`` order,
    so with ``groups == 1``: ``patches @ conv.weight.reshape(C_out, -1).T + conv.bias`` equals
    ``conv(x)`` at those locations.

    Args:
        x: [B, C_in, H, W] the conv's input.
        conv: the Conv2d (its padding, padding mode, stride, dilation are used).
        rows: [m] int64 row indices in ``[0, B * H_out * W_out)``.

    Returns:
        [m, C_in * kh * kw] patches.
    """
    pad = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x  # [B, C, Hp, Wp]
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = rows.to(x.device)
    b = rows // (h_out * w_out)
    oy = (rows // w_out) % h_out
    ox = rows % w_out
    ys = oy[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # [m, kh]
    xs = ox[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # [m, kw]
    c = torch.arange(xp.shape[1], device=x.device)
    patches = xp[
        b[:, None, None, None], c[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]
    ]
    return patches.reshape(rows.numel(), -1)  # [m, C * kh * kw]


def _conv_out_hw(x: Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    h = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    w = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return h, w


# ---------------------------------------------------------------------------------------------
# Accumulators (mutable, used only while hooks are attached)
# ---------------------------------------------------------------------------------------------


class _Reservoir:
    """A growing buffer of at most ``capacity`` rows, filled by :func:`reservoir_slots`."""

    def __init__(self, capacity: int, features: int, dtype: torch.dtype, device: str):
        self.capacity, self.features, self.dtype, self.device = capacity, features, dtype, device
        self.rows = torch.empty(0, features, dtype=dtype, device=device)
        self.timestep = torch.empty(0, dtype=torch.int64)
        self.seen = 0

    def offer(self, n: int, make_rows: Callable[[Tensor], Tensor], t_index: int, gen) -> None:
        slots, items = reservoir_slots(self.seen, n, self.capacity, gen)
        self.seen += n
        if slots.numel() == 0:
            return
        need = int(slots.max()) + 1
        if need > self.rows.shape[0]:
            size = min(self.capacity, max(need, 2 * self.rows.shape[0]))
            grown = torch.empty(size, self.features, dtype=self.dtype, device=self.device)
            grown[: self.rows.shape[0]] = self.rows
            ts = torch.full((size,), -1, dtype=torch.int64)
            ts[: self.timestep.shape[0]] = self.timestep
            self.rows, self.timestep = grown, ts
        self.rows[slots.to(self.device)] = make_rows(items).to(self.device, self.dtype)
        self.timestep[slots] = t_index

    def filled(self) -> tuple[Tensor, Tensor]:
        k = min(self.seen, self.capacity, self.rows.shape[0])
        return self.rows[:k].clone(), self.timestep[:k].clone()


class _Running:
    """Statistics of one layer at one timestep (tensors stay on the activation's device)."""

    __slots__ = (
        "count",
        "calls",
        "min",
        "max",
        "absmax",
        "mean_absmax",
        "ema_min",
        "ema_max",
        "ch",
    )

    def __init__(self, mn: Tensor, mx: Tensor, amax: Tensor, ch: Tensor, batch: int):
        self.count, self.calls = batch, 1
        self.min, self.max, self.absmax, self.mean_absmax = mn, mx, amax, amax
        self.ema_min, self.ema_max, self.ch = mn, mx, ch

    def update(self, mn, mx, amax, ch, batch: int, momentum: float) -> None:
        self.count += batch
        self.calls += 1
        self.min, self.max = torch.minimum(self.min, mn), torch.maximum(self.max, mx)
        self.absmax = torch.maximum(self.absmax, amax)
        self.mean_absmax = self.mean_absmax + (amax - self.mean_absmax) / self.calls
        self.ema_min = momentum * self.ema_min + (1 - momentum) * mn
        self.ema_max = momentum * self.ema_max + (1 - momentum) * mx
        self.ch = torch.maximum(self.ch, ch)


class _LayerAccumulator:
    def __init__(self, name: str, module: nn.Module, capacity: int, settings: CaptureSettings):
        self.name, self.module = name, module
        self.kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        features = row_features(module)
        self.channels = module.in_features if self.kind == "linear" else module.in_channels
        self.reservoir = _Reservoir(
            capacity, features, settings.sample_dtype, settings.storage_device
        )
        self.per_t: dict[int, _Running] = {}
        self.global_ema: tuple[Tensor, Tensor] | None = None

    def update(self, x: Tensor, t_index: int, t_value: float, cap: Capture) -> None:
        s = cap.settings
        x = x.detach()
        mn, mx = x.amin().float(), x.amax().float()  # [] each; NaN propagates
        if s.check_finite and not bool(torch.isfinite(torch.stack([mn, mx])).all()):
            raise ValueError(
                f"non-finite input (NaN or inf) to layer {self.name!r} at timestep {t_value:g} "
                f"(step {t_index}): calibration needs finite activations. Run the pipeline in "
                "float32 (pipe.to(torch.float32)) or check the model weights and the prompts; "
                "CaptureSettings(check_finite=False) records it anyway"
            )
        amax = torch.maximum(-mn, mx)
        dims = tuple(range(x.ndim - 1)) if self.kind == "linear" else (0, *range(2, x.ndim))
        ch = x.abs().amax(dim=dims).float()  # [C_in]
        batch = x.shape[0] if x.ndim > 1 else 1
        run = self.per_t.get(t_index)
        if run is None:
            self.per_t[t_index] = _Running(mn, mx, amax, ch, batch)
        else:
            run.update(mn, mx, amax, ch, batch, s.ema_momentum)
        if self.global_ema is None:
            self.global_ema = (mn, mx)
        else:
            m = s.ema_momentum
            self.global_ema = (
                m * self.global_ema[0] + (1 - m) * mn,
                m * self.global_ema[1] + (1 - m) * mx,
            )
        if self.reservoir.capacity == 0:
            return
        if self.kind == "linear":
            flat = x.reshape(-1, x.shape[-1])  # [tokens, in_features]
            self.reservoir.offer(
                flat.shape[0], lambda i: flat[i.to(flat.device)], t_index, cap._gen
            )
        else:
            h, w = _conv_out_hw(x, self.module)
            self.reservoir.offer(
                x.shape[0] * h * w,
                lambda i: conv2d_patches(x, self.module, i),
                t_index,
                cap._gen,
            )

    def finish(self, num_timesteps: int) -> LayerStats:
        nan = torch.full((num_timesteps,), float("nan"))
        stats = {k: nan.clone() for k in "min max absmax mean_absmax ema_min ema_max".split()}
        count = torch.zeros(num_timesteps, dtype=torch.int64)
        calls = torch.zeros(num_timesteps, dtype=torch.int64)
        ch = torch.full((num_timesteps, self.channels), float("nan"))
        for t, run in self.per_t.items():
            count[t], calls[t] = run.count, run.calls
            for k in stats:
                stats[k][t] = getattr(run, k).cpu()
            ch[t] = run.ch.cpu()
        ema = self.global_ema or (torch.tensor(float("nan")), torch.tensor(float("nan")))
        rows, row_t = self.reservoir.filled()
        return LayerStats(
            kind=self.kind,
            count=count,
            calls=calls,
            channel_absmax=ch,
            global_ema_min=ema[0].cpu().clone(),
            global_ema_max=ema[1].cpu().clone(),
            samples=rows,
            sample_timesteps=row_t,
            seen=self.reservoir.seen,
            **stats,
        )


def row_features(module: nn.Module) -> int:
    """Width of one reservoir row: ``in_features`` (Linear) or ``C_in * kh * kw`` (Conv2d)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw
    raise ValueError(f"{type(module).__name__}: only nn.Linear and nn.Conv2d can be captured")


def _flatten_tensors(values: dict, prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in values.items():
        if isinstance(value, Tensor):
            out[prefix + key] = value
        elif isinstance(value, dict) and not prefix:  # one level: added_cond_kwargs
            out.update(_flatten_tensors(value, prefix=f"{key}."))
    return out


def _first_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, Tensor) else None


# ---------------------------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------------------------


class Capture:
    """Named, removable hooks on a UNet that fill a :class:`CalibrationRecord`.

    ``__exit__`` removes every hook this object added, also when the body raises; the
    modules' hook dicts are then exactly what they were before ``__enter__``.

    Args:
        unet: the denoiser (a diffusers ``UNet2DConditionModel``, or any module whose forward
            takes ``timestep``), called by the pipeline with its own ``__call__``.
        settings: what to record; defaults to ``CaptureSettings()``.

    Example:
        >>> with Capture(pipe.unet, CaptureSettings(max_bytes=2**20)) as cap:
        ...     pipe("a red circle", num_inference_steps=2)
        >>> cap.record.absmax("conv_in")
    """

    def __init__(self, unet: nn.Module, settings: CaptureSettings | None = None):
        if not isinstance(unet, nn.Module):
            raise ValueError(
                f"Capture needs the UNet module (e.g. pipe.unet), got {type(unet).__name__}"
            )
        self.unet = unet
        self.settings = settings or CaptureSettings()
        self.handles: dict[str, RemovableHandle] = {}
        self._record: CalibrationRecord | None = None
        self._signature = inspect.signature(unet.forward)
        self._reset()

    def _reset(self) -> None:
        s = self.settings
        self._gen = torch.Generator().manual_seed(s.seed)
        self._timesteps: dict[float, int] = {}
        self._current: tuple[int, float] | None = None
        self._num_calls = 0
        self._calls: dict[int, UNetCall] = {}  # reservoir slot -> call
        self._calls_seen = 0
        self._pending_slot: int | None = None
        self._texts: list[Tensor] = []
        self._last_text: Tensor | None = None
        modules = [
            (name, m) for name, m in self.unet.named_modules() if isinstance(m, s.layer_types)
        ]
        row_bytes = sum(row_features(m) for _, m in modules) * s.sample_dtype.itemsize
        capacity = s.max_bytes // row_bytes if row_bytes else 0
        if s.max_samples_per_layer is not None:
            capacity = min(capacity, s.max_samples_per_layer)
        self.samples_per_layer = capacity
        self._layers = {name: _LayerAccumulator(name, m, capacity, s) for name, m in modules}

    # -- hooks ---------------------------------------------------------------------------------

    def _unet_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        if "timestep" not in bound:
            raise ValueError(
                f"{type(module).__name__} was called without a `timestep` argument: Capture "
                "keys statistics by timestep and needs a diffusion UNet (e.g. pipe.unet)"
            )
        t = bound["timestep"]
        t_value = float(t.flatten()[0]) if isinstance(t, Tensor) else float(t)
        t_index = self._timesteps.setdefault(t_value, len(self._timesteps))
        self._current = (t_index, t_value)
        call_index = self._num_calls
        self._num_calls += 1
        s = self.settings
        ehs = bound.get("encoder_hidden_states")
        if isinstance(ehs, Tensor):
            self._record_text(ehs)
        slots, _ = reservoir_slots(self._calls_seen, 1, s.max_unet_calls, self._gen)
        self._calls_seen += 1
        self._pending_slot = None
        sample = bound.get("sample", args[0] if args else None)
        if slots.numel() and isinstance(sample, Tensor):
            store = lambda v: v.detach().to(s.storage_device, copy=True)  # noqa: E731
            rest = {
                k: v
                for k, v in bound.items()
                if k not in ("sample", "timestep", "encoder_hidden_states")
            }
            if "kwargs" in rest and isinstance(rest["kwargs"], dict):
                rest.update(rest.pop("kwargs"))
            self._pending_slot = int(slots[0])
            self._calls[self._pending_slot] = UNetCall(
                call_index=call_index,
                timestep=t_value,
                sample=store(sample),
                encoder_hidden_states=store(ehs) if isinstance(ehs, Tensor) else None,
                output=torch.empty(0),
                extra={k: store(v) for k, v in _flatten_tensors(rest).items()},
            )

    def _record_text(self, ehs: Tensor) -> None:
        last = self._last_text
        if last is ehs or (last is not None and last.shape == ehs.shape and torch.equal(last, ehs)):
            return
        self._last_text = ehs
        room = self.settings.max_text_embeddings - len(self._texts)
        for row in ehs[: max(room, 0)]:
            self._texts.append(row.detach().to(self.settings.storage_device, copy=True))

    def _unet_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._current = None
        slot, self._pending_slot = self._pending_slot, None
        out = _first_tensor(output)
        if slot is not None and out is not None:
            self._calls[slot].output = out.detach().to(self.settings.storage_device, copy=True)

    def _make_layer_hook(self, acc: _LayerAccumulator):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if self._current is None or not isinstance(x, Tensor):
                return  # called outside a UNet forward (not part of the trajectory)
            with torch.no_grad():
                acc.update(x, self._current[0], self._current[1], self)

        return hook

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Capture:
        if self.handles:
            raise RuntimeError("this Capture is already active; use a new Capture per run")
        self._record = None  # entering again resumes accumulation
        try:
            self.handles[f"{HOOK_PREFIX}:unet:pre"] = self.unet.register_forward_pre_hook(
                self._unet_pre_hook, with_kwargs=True
            )
            self.handles[f"{HOOK_PREFIX}:unet:post"] = self.unet.register_forward_hook(
                self._unet_hook, with_kwargs=True, always_call=True
            )
            for name, acc in self._layers.items():
                self.handles[f"{HOOK_PREFIX}:pre:{name}"] = acc.module.register_forward_pre_hook(
                    self._make_layer_hook(acc), with_kwargs=True
                )
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture added (idempotent)."""
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()
        self._current = None
        self._pending_slot = None
        self._last_text = None

    @property
    def record(self) -> CalibrationRecord:
        """The statistics so far, as a :class:`CalibrationRecord` of CPU tensors.

        Built on each access while the hooks are attached; built once and cached after exit.
        """
        if not self.handles and self._record is not None:
            return self._record
        num_t = len(self._timesteps)
        calls = sorted(
            (c for c in self._calls.values() if c.output.numel()), key=lambda c: c.call_index
        )
        record = CalibrationRecord(
            layers={name: acc.finish(num_t) for name, acc in self._layers.items()},
            timesteps=list(self._timesteps),
            num_calls=self._num_calls,
            unet_calls=calls,
            text_embeddings=list(self._texts),
        )
        if not self.handles:
            self._record = record
        return record


# ---------------------------------------------------------------------------------------------
# The one-call entry point
# ---------------------------------------------------------------------------------------------


def capture(
    pipe,
    prompts: str | Sequence[str],
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    max_samples_per_layer: int | None = 2048,
    max_bytes: int = 256 * 2**20,
    max_unet_calls: int = 32,
    ema_momentum: float = 0.95,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = True,
    **call_kwargs,
) -> CalibrationRecord:
    """Run a diffusers pipeline's own ``__call__`` over prompts with capture hooks on its UNet.

    The pipeline runs through `dq.generate.generate` (prompt ``i`` draws its noise with seed
    ``seed + i``); its own progress bar is hidden while one bar over prompts is shown. ``output_type`` defaults
    to ``"latent"`` (the VAE decode adds nothing to the UNet's statistics).

    Args:
        pipe: a diffusers pipeline with a ``.unet`` (SD 1.x/2.x, SDXL, their Turbo/LCM kin).
        prompts: calibration prompts (a string or a non-empty sequence of strings).
        num_inference_steps: sampling steps; None keeps the pipeline's default.
        guidance_scale: classifier-free guidance scale (<= 1 turns CFG off); None keeps the
            pipeline's default.
        layer_types: module types to hook (nn.Linear / nn.Conv2d subclasses).
        max_samples_per_layer: reservoir rows per layer (None: only ``max_bytes`` bounds it).
        max_bytes: reservoir budget in bytes over all layers.
        max_unet_calls: whole UNet calls (inputs + output) to keep.
        ema_momentum: EMA weight of the past for the running min/max.
        seed: seed of the pipeline's noise and of the reservoir sampling.
        batch_size: prompts per pipeline call.
        progress: show a progress bar over prompt batches.
        **call_kwargs: passed to ``pipe(...)`` (e.g. ``height``, ``width``, ``negative_prompt``).

    Returns:
        The :class:`CalibrationRecord`.

    Example:
        >>> record = capture(pipe, ["a red circle"], num_inference_steps=4, guidance_scale=7.5)
        >>> lo, hi = record.minmax("down_blocks.0.attentions.0.proj_in")
    """
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ValueError(
            f"capture() got a {type(pipe).__module__}.{type(pipe).__name__} without a `.unet` "
            "module: pass a diffusers text-to-image pipeline with a UNet (e.g. "
            "StableDiffusionPipeline or StableDiffusionXLPipeline)"
        )
    from dq.generate import Sampling, check_prompts, generate

    prompts = check_prompts(prompts, "capture() prompts")
    for reserved in ("prompt", "generator"):
        if reserved in call_kwargs:
            raise ValueError(
                f"{reserved}= is set by capture(); pass prompts as `prompts` and the noise seed "
                "as `seed`"
            )
    output_type = call_kwargs.pop("output_type", "latent")
    sampling = Sampling.from_kwargs(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        batch_size=batch_size, seed=seed, **call_kwargs,
    )
    settings = CaptureSettings(
        layer_types=tuple(layer_types),
        ema_momentum=ema_momentum,
        max_bytes=max_bytes,
        max_samples_per_layer=max_samples_per_layer,
        max_unet_calls=max_unet_calls,
        seed=seed,
    )
    with Capture(unet, settings) as cap:
        generate(pipe, prompts, sampling, output_type=output_type, progress=progress, desc="dq capture")
    return cap.record
