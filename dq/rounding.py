"""Learned rounding (AdaRound) on INT and FP grids, and the per-layer scale / FP-format search.

Everything here is a pure function of one layer: its float weight ``W`` [O, I, *k], viewed as
``W2`` [O, K] (K = I * prod(k)), and its captured inputs ``X`` [N, K] (the reservoir rows of
`dq.capture`: im2col patches for convolutions, so ``X @ W2.T`` is the layer's output without
bias). Nothing touches modules, files or global state; the pipeline path (`dq.quantize`) calls
these per layer and stores the returned `dq.quant.QWeight` with ``from_qweight``.

The maths (Nagel et al. 2020, "Up or Down? Adaptive Rounding"; Q-Diffusion's settings):

- Scaled weights ``w = W2 / s + zp`` lie between two neighbours on the format's grid,
  ``lo <= w <= hi`` (`neighbours`): floor / ceil for INT, the adjacent members of
  ``fmt.grid()`` for the non-uniform FP grids. Round-to-nearest picks the closer one.
- Per weight a free variable ``V`` gives ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
  (the rectified sigmoid, zeta = 1.1, gamma = -0.1) and the soft weight
  ``W_soft = s * (lo + h (hi - lo) - zp)``. ``V`` starts where ``h`` equals the fractional
  position of ``w`` between its neighbours, i.e. at the round-to-nearest solution's soft twin.
- Minimise the layer's output error plus a regulariser that drives every ``h`` to 0 or 1::

      E(W_soft) / u  +  lambda * sum(1 - |2 h - 1| ** beta)

  with ``E(W') = mean_n r_n ||x_n (W' - W2)^T||^2`` (rows weighted by ``r``, e.g. per timestep,
  normalised to sum 1) and ``u`` the error of moving one weight by one grid step (the mean of
  ``s^2 (hi - lo)^2 H_kk``, ``H = X^T diag(r) X``): the loss is in "grid-step flips", so
  ``lambda`` means the same on every layer whatever the scale of its weights and inputs (the
  default 10 plays the role of AdaRound's 0.01 on its unnormalised loss; see
  `RoundingSettings`).
  ``beta`` is annealed from 20 to 2 after a warm-up without the regulariser (AdaRound: 20%).
- Finally round hard: ``hi`` where ``h >= 0.5`` (``V >= 0``), else ``lo``. The values are grid
  points by construction; the scale is the one learning started from.

Assumptions: the layer is linear in its weight on the captured rows (true for Linear and for
Conv2d with groups == 1 on im2col rows); the rows are representative of inference inputs
(sampled across timesteps by the capture); the scale is fixed while rounding is learned (search
it first with `search_scale` and pass it in). The reconstruction is per layer, not per block.

    >>> import torch
    >>> from dq.config import LayerSpec
    >>> w, x = torch.randn(16, 32), torch.randn(256, 32)
    >>> qw = learn(w, LayerSpec("int4", "channel"), x, RoundingSettings(iterations=50))
    >>> qw.on_grid(), qw.values.shape
    (True, torch.Size([16, 32]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from dq import formats as _formats
from dq import quant
from dq.formats import Format, FPFormat
from dq.quant import QWeight

__all__ = [
    "RoundingSettings",
    "neighbours",
    "rectified_sigmoid",
    "init_logits",
    "rounding_regulariser",
    "beta_at",
    "timestep_row_weights",
    "output_mse",
    "learn",
    "bias_correction",
    "search_scale",
    "search_fp_format",
    "SearchSettings",
    "search",
    "fp_formats_of_width",
    "DEFAULT_SHRINK",
]

# rectified sigmoid stretch (AdaRound): h reaches exactly 0 and 1 at finite V
_ZETA, _GAMMA = 1.1, -0.1

# shrink factors of the min-max range tried by `search_scale`: 1.0 (min-max) down to 0.4
DEFAULT_SHRINK: tuple[float, ...] = tuple(1.0 - i / 40 for i in range(25))

_WEIGHTINGS = ("given", "none")


@dataclass(frozen=True)
class RoundingSettings:
    """Knobs of learned rounding for one layer (`learn`).

    Args:
        iterations: optimiser steps per layer.
        lr: Adam learning rate on the rounding variables V.
        reg_weight: lambda, the regulariser's price of a fully undecided weight in units of the
            output error of moving one weight by one grid step (see the module docstring).
            AdaRound's 0.01 multiplies an unnormalised loss whose unit is typically ~1e-3 of
            ours; on the embedded UNet's captured rows (132 layers, INT4 per channel, held-out
            rows) 0.01 here cuts round-to-nearest's output error by 37%, 1 by 78%, 10 by 79%.
        beta_start, beta_end: the regulariser's exponent, annealed linearly after the warm-up.
        warmup: fraction of the iterations run on the reconstruction alone.
        batch_size: rows per step. When the rows or the inputs per row fit in it, every step
            uses the exact loss over all rows (through the Gram matrix X^T X when K < N);
            otherwise each step draws this many rows.
        seed: seed of the row sampling (only used with mini-batches).
        timestep_weighting: "given" weights the reconstruction by the ``row_weights`` passed
            to `learn` (uniform when none are passed; build them with `timestep_row_weights`);
            "none" ignores them (every row counts the same), to switch weighting off in an
            experiment without changing the call.
        bias_correction: learn the rounding on centred inputs, ignoring the part of the error
            that a bias shift removes. The caller must then add `bias_correction(...)` to the
            layer's bias (`learn` returns only the weight): set it only for layers that have a
            bias, or that can be given one.
        keep_best: return round-to-nearest instead when the learned rounding's output error on
            the given rows is not lower (a guard, so `learn` never makes a layer worse there).
    """

    iterations: int = 500  # embedded UNet, 132 layers: ~75 s on one core (800: 2% lower error)
    lr: float = 3e-2  # Adam on V; AdaRound's 1e-3 is tuned for 10-20k iterations
    reg_weight: float = 10.0  # in grid-step flips; 0.01 here leaves 3x the held-out error
    beta_start: float = 20.0  # AdaRound: sharp at first (only |h - 0.5| ~ 0.5 is cheap) ...
    beta_end: float = 2.0  # ... then smooth, pushing every h to 0 or 1
    warmup: float = 0.2  # AdaRound: 20% of the iterations without the regulariser
    batch_size: int = 2048  # >= the capture's 2048-row cap: exact loss on the embedded UNet
    seed: int = 0  # mini-batch row sampling
    timestep_weighting: str = "given"  # use row_weights when passed
    bias_correction: bool = False  # True: centred objective, caller adds bias_correction()
    keep_best: bool = True  # never return something worse than round-to-nearest on the rows

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations={self.iterations!r} must be an int >= 0, e.g. 400")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} must be a positive number, e.g. 3e-2")
        if not (self.reg_weight >= 0 and math.isfinite(self.reg_weight)):
            raise ValueError(f"reg_weight={self.reg_weight!r} must be >= 0, e.g. 10.0")
        if not (self.beta_start >= self.beta_end > 0):
            raise ValueError(
                f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}: need "
                "beta_start >= beta_end > 0 (AdaRound anneals 20 -> 2)"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup!r} must be a fraction in [0, 1), e.g. 0.2")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an int >= 1, e.g. 2048")
        if self.timestep_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"timestep_weighting={self.timestep_weighting!r}: use one of {_WEIGHTINGS}"
            )


# ----- the rounding maths (pure) -----


def neighbours(w_scaled: torch.Tensor, fmt: str | Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper grid neighbours of every scaled weight value.

    ``lower`` is the largest grid point <= w and ``upper`` the smallest >= w, so a value on the
    grid has ``lower == upper == w``. Values beyond the grid saturate: both neighbours are the
    nearest end (``fmt.round`` saturates the same way). INT grids use floor / ceil clamped to
    [qmin, qmax]; FP grids search ``fmt.grid()`` (non-uniform, subnormals included).

    Args:
        w_scaled: float tensor of weights divided by their scale (zero point added), any shape.
        fmt: an IntFormat / FPFormat or its registry name.

    Returns:
        (lower, upper), float32, shaped like ``w_scaled``.

    Example:
        >>> lo, hi = neighbours(torch.tensor([0.7, 2.4, 9.0]), "fp4_e2m1")
        >>> lo.tolist(), hi.tolist()
        ([0.5, 2.0, 6.0], [1.0, 3.0, 6.0])
    """
    fmt = _formats.get(fmt)
    w = torch.as_tensor(w_scaled).float()
    if bool(torch.isnan(w).any()):
        raise ValueError("neighbours: w_scaled contains NaN; there is no grid point next to NaN")
    if fmt.kind == "int":
        return w.floor().clamp(fmt.qmin, fmt.qmax), w.ceil().clamp(fmt.qmin, fmt.qmax)
    grid = fmt.grid().to(w.device)  # ascending, finite
    last = grid.numel() - 1
    lo_idx = (torch.searchsorted(grid, w, right=True) - 1).clamp(0, last)  # last g <= w
    hi_idx = torch.searchsorted(grid, w, right=False).clamp(0, last)  # first g >= w
    return grid[lo_idx], grid[hi_idx]


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1): 0 = lower, 1 = upper neighbour."""
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def init_logits(frac: torch.Tensor) -> torch.Tensor:
    """The V with ``rectified_sigmoid(V) == frac`` for frac in [0, 1] (finite everywhere)."""
    p = (frac.clamp(0.0, 1.0) - _GAMMA) / (_ZETA - _GAMMA)  # in [0.083, 0.917]
    return torch.log(p) - torch.log1p(-p)


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1| ** beta): 0 when every h is 0 or 1, large while they are undecided."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, settings: RoundingSettings) -> float | None:
    """The regulariser's exponent at ``step``; None during the warm-up (no regulariser)."""
    warm = int(settings.warmup * settings.iterations)
    if step < warm:
        return None
    t = (step - warm) / max(1, settings.iterations - warm)  # 0 -> 1
    return settings.beta_end + (settings.beta_start - settings.beta_end) * (1.0 - t)


def timestep_row_weights(
    sample_timesteps: torch.Tensor, timestep_weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Per-row weights from the rows' timestep indices, mean 1.

    Each timestep's rows together carry that timestep's weight (all equal by default), so a
    timestep the reservoir happened to sample more often does not count more: the
    reconstruction is balanced across the trajectory. Pass e.g. the scheduler's noise level or
    each step's measured sensitivity, indexed like ``record.timesteps``, to weight it.

    Args:
        sample_timesteps: [N] int64 timestep index of each row
            (``record.layers[name].sample_timesteps``).
        timestep_weights: [T] non-negative weight per timestep index, or None for equal.

    Example:
        >>> [round(v, 3) for v in timestep_row_weights(torch.tensor([0, 0, 0, 1])).tolist()]
        [0.667, 0.667, 0.667, 2.0]
    """
    t = torch.as_tensor(sample_timesteps).long().reshape(-1)
    if t.numel() == 0:
        raise ValueError("timestep_row_weights: no rows (sample_timesteps is empty)")
    if bool((t < 0).any()):
        raise ValueError("timestep_row_weights: timestep indices must be >= 0")
    n_t = int(t.max()) + 1
    count = torch.bincount(t, minlength=n_t).float()  # rows per timestep
    if timestep_weights is None:
        per_t = torch.ones(n_t)
    else:
        per_t = torch.as_tensor(timestep_weights, dtype=torch.float32).reshape(-1)
        if per_t.numel() < n_t:
            raise ValueError(
                f"timestep_weights has {per_t.numel()} entries but rows use timestep index "
                f"{n_t - 1}; give one weight per captured timestep (record.timesteps)"
            )
        if not bool(torch.isfinite(per_t).all()) or bool((per_t < 0).any()):
            raise ValueError("timestep_weights must be finite and >= 0")
    r = per_t[t] / count[t]  # each timestep's weight shared by its rows
    if not float(r.sum()) > 0:
        raise ValueError("timestep_weights give every row weight 0; nothing to reconstruct")
    return r * (t.numel() / r.sum())


# ----- the layer's output error on its captured rows -----


class _OutputError:
    """E(dW) = mean_n r_n ||x_n dW^T||^2 per output channel, for any weight error dW [O, K].

    Holds the cheaper exact form: the weighted rows ``sqrt(r_n) x_n`` [N, K] when N <= K, else
    the Gram matrix ``H = X^T diag(r) X`` [K, K] (accumulated in float64). With ``batch_size``
    below both N and K, `sampled` uses random mini-batches of rows instead (for big layers).
    ``center`` subtracts the (weighted) mean row first: the error left after bias correction.
    """

    def __init__(self, x: torch.Tensor, r: torch.Tensor | None, batch_size: int | None,
                 center: bool = False):
        n, k = x.shape
        r = torch.full((n,), 1.0 / n, device=x.device) if r is None else r / r.sum()
        self.n, self.k, self.batch_size = n, k, batch_size
        if center:
            x = x - (r[:, None] * x).sum(0, keepdim=True)
        self.x, self.r = x, r  # [N, K], [N] summing to 1
        self.exact_each_step = batch_size is None or n <= batch_size or k <= batch_size
        self.h = None
        if k < n:  # Gram form: E = sum((dW @ H) * dW, 1)
            h = torch.zeros(k, k, dtype=torch.float64, device=x.device)
            for i in range(0, n, 4096):  # chunks bound the float64 copy
                xc = x[i : i + 4096].double()
                h += (xc * r[i : i + 4096, None].double()).T @ xc
            self.h = h.float()  # [K, K]
        self.xr = None if self.h is not None else x * r.sqrt()[:, None]  # [N, K]

    def diag(self) -> torch.Tensor:
        """H_kk = E of a unit change of input weight k in one channel, [K]."""
        if self.h is not None:
            return self.h.diagonal()
        return self.xr.square().sum(0)

    def per_channel(self, dw: torch.Tensor) -> torch.Tensor:
        """Exact E per output channel, [O]."""
        if self.h is not None:
            return ((dw @ self.h) * dw).sum(1)
        return (self.xr @ dw.T).square().sum(0)

    def sampled(self, dw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """E summed over channels: exact, or on one random mini-batch of rows (unbiased)."""
        if self.exact_each_step:
            return self.per_channel(dw).sum()
        idx = torch.randint(0, self.n, (self.batch_size,), generator=gen).to(self.x.device)
        rows = self.x[idx] * (self.r[idx] * (self.n / self.batch_size)).sqrt()[:, None]
        return (rows @ dw.T).square().sum()

    def per_group(self, dw: torch.Tensor, groups: int) -> torch.Tensor:
        """E of each (channel, group) block alone, [O, G] (cross-group terms left out)."""
        o, k = dw.shape
        dg = dw.reshape(o, groups, k // groups)  # [O, G, gs]
        if self.h is not None:
            hb = self.h.reshape(groups, k // groups, groups, k // groups)
            hb = hb.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, gs, gs] diagonal blocks
            return torch.einsum("ogi,gij,ogj->og", dg, hb, dg)
        xg = self.xr.reshape(self.xr.shape[0], groups, k // groups)  # [N, G, gs]
        return torch.einsum("ngi,ogi->ngo", xg, dg).square().sum(0).T


# ----- input checks -----


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor [out, in, *k], got {type(weight).__name__}")
    if weight.dim() < 2 or weight.numel() == 0:
        raise ValueError(f"weight must be [out, in, *k] and non-empty, got {list(weight.shape)}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or inf; there is no rounding of it to learn")
    return w


def _check_inputs(inputs: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    k = math.prod(weight_shape[1:])
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be a float tensor of rows [N, {k}], got {type(inputs).__name__}"
            + (f" of {inputs.dtype}" if isinstance(inputs, torch.Tensor) else "")
        )
    if inputs.dim() != 2 or inputs.shape[1] != k:
        raise ValueError(
            f"inputs have shape {list(inputs.shape)} but a weight of shape {list(weight_shape)} "
            f"needs rows [N, {k}] (in * prod(kernel)); pass the layer's captured rows "
            "(record.samples(name)), im2col patches for a convolution (dq.capture.conv2d_patches)"
        )
    if inputs.shape[0] == 0:
        raise ValueError(
            "inputs are empty (0 rows); capture calibration samples first "
            "(CaptureSettings.max_bytes > 0) or use round-to-nearest for this layer"
        )
    x = inputs.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs contain NaN or inf; clean the calibration rows first")
    return x


def _check_row_weights(row_weights: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if row_weights is None:
        return None
    r = torch.as_tensor(row_weights).detach().float().reshape(-1)
    if r.numel() != n:
        raise ValueError(f"row_weights has {r.numel()} entries for {n} input rows; give one per row")
    if not bool(torch.isfinite(r).all()) or bool((r < 0).any()) or not float(r.sum()) > 0:
        raise ValueError("row_weights must be finite, >= 0 and not all 0")
    return r


def _per_element(p: torch.Tensor | None, o: int, k: int) -> torch.Tensor | None:
    """A QWeight scale / zero point ([O] or [O, G]) expanded to every weight, [O, K]."""
    if p is None:
        return None
    p = p.float().reshape(o, -1)
    return p.repeat_interleave(k // p.shape[1], dim=1)


@dataclass(frozen=True)
class _Spec:
    """A `dq.quant.WeightSpec` whose format may be any Format (e.g. an unregistered one)."""

    weight: str | Format
    weight_granularity: str
    weight_method: str = "minmax"
    pair_limit: int | None = None


def output_mse(
    weight: torch.Tensor,
    w_hat: torch.Tensor | QWeight,
    inputs: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per output channel, the mean over rows of the squared output error ``(x (W_hat - W)^T)^2``.

    Args:
        weight: float weight [O, I, *k].
        w_hat: its quantized version: a `QWeight` or a float tensor of the weight's shape.
        inputs: rows [N, I * prod(k)].
        row_weights: optional [N] non-negative weights (normalised to sum 1).

    Returns:
        [O] float32; ``.sum()`` is the layer's output error summed over channels.
    """
    w = _check_weight(weight)
    x = _check_inputs(inputs, w.shape)
    r = _check_row_weights(row_weights, x.shape[0])
    w_hat = w_hat.dequantize() if isinstance(w_hat, QWeight) else torch.as_tensor(w_hat).float()
    if w_hat.shape != w.shape:
        raise ValueError(f"w_hat has shape {list(w_hat.shape)}, the weight {list(w.shape)}")
    dw = (w_hat.to(w.device) - w).reshape(w.shape[0], -1)
    return _OutputError(x.to(w.device), r, None).per_channel(dw)


# ----- learned rounding -----


def _fix_pairs(values: torch.Tensor, w_scaled: torch.Tensor, limit: int) -> torch.Tensor:
    """Keep |q[o, 2j]| + |q[o, 2j + 1]| <= limit (per kernel tap) after learned rounding.

    The scale was grown so the unrounded pairs fit; rounding can overshoot by one when both
    members rounded away from zero. The member that rounded further away is moved back to its
    other neighbour (towards zero), as `dq.quant.pair_limited_values` does.

    values, w_scaled: [O, I, taps]. Returns values of the same shape.
    """
    q, x = values.clone(), w_scaled
    if q.shape[1] % 2:  # an odd last channel pairs with zero padding
        q = torch.nn.functional.pad(q, (0, 0, 0, 1))
        x = torch.nn.functional.pad(x, (0, 0, 0, 1))
    qa, qb, xa, xb = q[:, 0::2], q[:, 1::2], x[:, 0::2], x[:, 1::2]
    over = qa.abs() + qb.abs() > limit
    down_a = over & (qa.abs() - xa.abs() >= qb.abs() - xb.abs())
    qa = qa - qa.sign() * down_a
    qb = qb - qb.sign() * (over & ~down_a)
    q = torch.stack((qa, qb), dim=2).reshape(q.shape)
    return q[:, : values.shape[1]]


def learn(
    weight: torch.Tensor,
    spec: quant.WeightSpec,
    inputs: torch.Tensor,
    settings: RoundingSettings | None = None,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    progress: bool = False,
) -> QWeight:
    """Learn each weight's rounding (up or down to a grid neighbour) on the layer's output error.

    INT and FP formats alike, any granularity the spec allows (per tensor, channel or group).
    The scale is the spec's own (`dq.quant.quantize_weight`) unless given, e.g. from
    `search_scale`. With ``spec.pair_limit`` the pair cap holds afterwards: learning starts from
    the pair-limited scale and the few pairs that rounding pushes over the cap are fixed by
    moving one member back to its other neighbour.

    Args:
        weight: float weight [O, I, *k] (a Linear's [O, I]).
        spec: the layer's shape-resolved spec (a `dq.LayerSpec`, see `dq.storage.resolve_spec`).
        inputs: captured rows [N, I * prod(k)] (`record.samples(name)`; im2col patches for a
            convolution), any float dtype.
        settings: iterations, learning rate, regulariser, ...; `RoundingSettings()` if None.
        scale, zero_point: fixed quantization parameters in the `QWeight` layout ([O] or
            [O, G]; zero point for unsigned INT only).
        row_weights: [N] non-negative weight per row, e.g. `timestep_row_weights(...)`.
        progress: show a progress bar (tqdm) for this layer.

    Returns:
        A `QWeight` with the start's scale and zero point whose values are grid points
        (``on_grid()``); store it with ``QLinear.from_qweight(module, qw, spec)``.

    Example (per layer of a captured pipeline)::

        spec = dq.storage.resolve_spec(plan_spec, module.weight.shape)
        rows = record.samples(name)
        r = timestep_row_weights(record.layers[name].sample_timesteps)
        qw = learn(module.weight, spec, rows, row_weights=r)
        layer = QLinear.from_qweight(module, qw, spec, act_range=...)
    """
    settings = settings or RoundingSettings()
    w = _check_weight(weight)
    x = _check_inputs(inputs, w.shape).to(w.device)
    r = _check_row_weights(row_weights, x.shape[0])
    if settings.timestep_weighting == "none":
        r = None
    start = quant.quantize_weight(w, spec, scale=scale, zero_point=zero_point)  # round-to-nearest
    fmt = start.fmt
    o, k = start.values.shape
    s = _per_element(start.scale, o, k)  # [O, K]
    zp = _per_element(start.zero_point, o, k)  # [O, K] or None
    w2 = w.reshape(o, k)
    w_scaled = w2 / s if zp is None else w2 / s + zp  # [O, K], grid units
    lower, upper = neighbours(w_scaled, fmt)  # [O, K] each
    gap = upper - lower  # 0 where w is on the grid or saturated
    frac = torch.where(gap > 0, (w_scaled - lower) / gap.clamp_min(1e-30), torch.zeros_like(gap))
    err = _OutputError(x, r, settings.batch_size, center=settings.bias_correction)

    def dequant(v: torch.Tensor) -> torch.Tensor:  # grid values [O, K] -> float weight [O, K]
        return (v if zp is None else v - zp) * s

    free = gap > 0
    if settings.iterations > 0 and bool(free.any()):
        # loss unit: the output error of moving one (free) weight by one grid step
        unit = ((s * gap).square() * err.diag()[None, :])[free].mean().clamp_min(1e-30)
        v = init_logits(frac).requires_grad_(True)  # [O, K]
        opt = torch.optim.Adam([v], lr=settings.lr)
        gen = torch.Generator().manual_seed(settings.seed)
        steps = range(settings.iterations)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(steps, desc=f"learned rounding {list(w.shape)}", leave=False)
            steps = bar
        for step in steps:
            h = rectified_sigmoid(v)
            rec = err.sampled(dequant(lower + h * gap) - w2, gen) / unit
            beta = beta_at(step, settings)
            loss = rec if beta is None else rec + settings.reg_weight * rounding_regulariser(
                h[free], beta
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bar is not None:
            bar.close()
        up = v.detach() >= 0  # h >= 0.5
    else:
        up = frac >= 0.5
    values = torch.where(up, upper, lower)  # [O, K] grid values
    if spec.pair_limit is not None:
        shape3 = (o, w.shape[1], -1)
        values = _fix_pairs(values.reshape(shape3), w_scaled.reshape(shape3), spec.pair_limit)
        values = values.reshape(o, k)
    if settings.keep_best:
        exact = err if err.exact_each_step else _OutputError(x, r, None, settings.bias_correction)
        learned_err = exact.per_channel(dequant(values) - w2)  # [O]
        nearest_err = exact.per_channel(dequant(start.values) - w2)
        # per channel: channels are independent in the output error
        values = torch.where((learned_err <= nearest_err)[:, None], values, start.values)
    qw = QWeight(values.contiguous(), start.scale, start.zero_point, fmt, w.shape)
    if not qw.on_grid():  # by construction; a failure here is a bug in this module
        raise RuntimeError(f"learned rounding left values off the {fmt.name} grid")
    return qw


def bias_correction(
    weight: torch.Tensor,
    qweight: QWeight,
    inputs: torch.Tensor,
    *,
    row_weights: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The bias shift that removes the mean output error of a quantized weight.

    ``delta = mean_n x_n (W - W_hat)^T``: adding it to the layer's bias makes the error on the
    rows zero-mean per output channel, which lowers its mean square by ``delta^2`` on those
    rows. With ``validate`` it is kept only for channels where it helps out of sample: a delta
    fitted on either half of the rows must lower the error on the other half.

    Args:
        weight: float weight [O, I, *k].
        qweight: its quantized version.
        inputs: rows [N, I * prod(k)].
        row_weights: optional [N] weights (as in `learn`).
        validate: split-half check per channel (channels failing it get 0).

    Returns:
        [O] float32, to add to the bias (a layer without a bias needs one).
    """
    w = _check_weight(weight)
    x = _check_inputs(inputs, w.shape).to(w.device)
    r = _check_row_weights(row_weights, x.shape[0])
    r = torch.ones(x.shape[0], device=x.device) if r is None else r.to(x.device)
    dw = (w - qweight.dequantize().to(w.device)).reshape(w.shape[0], -1)  # [O, K]
    e = x @ dw.T  # [N, O] output error y - y_hat
    delta = (r[:, None] * e).sum(0) / r.sum()  # [O]
    if validate and x.shape[0] >= 4:
        a, b = torch.arange(0, x.shape[0], 2), torch.arange(1, x.shape[0], 2)
        ok = torch.ones_like(delta, dtype=torch.bool)
        for fit, test in ((a, b), (b, a)):
            d = (r[fit, None] * e[fit]).sum(0) / r[fit].sum().clamp_min(1e-30)
            before = (r[test, None] * e[test].square()).sum(0)
            after = (r[test, None] * (e[test] - d).square()).sum(0)
            ok &= after < before
        delta = torch.where(ok, delta, torch.zeros_like(delta))
    return delta


# ----- scale and format search -----


def search_scale(
    weight: torch.Tensor,
    spec: quant.WeightSpec,
    inputs: torch.Tensor,
    *,
    candidates: Sequence[float] = DEFAULT_SHRINK,
    row_weights: torch.Tensor | None = None,
) -> QWeight:
    """The clipping scale chosen by the layer's output error on its rows (not weight error).

    Each candidate shrinks the min-max range by a factor alpha (scale * alpha; an asymmetric
    grid keeps its zero point, which is alpha-free) and rounds to nearest. The factor is chosen
    per output channel for per-channel specs (channels are independent in the output error), once
    for per-tensor specs, and per group for group specs (by each group's own error, then per
    channel the better of that and the best shared factor, measured exactly). alpha = 1 is tried
    first and only a strictly smaller error replaces it. INT and FP alike; with ``pair_limit``
    the scale still grows to meet the cap.

    Args:
        weight: float weight [O, I, *k].
        spec: the layer's spec (format, granularity, pair_limit; ``weight_method`` is ignored:
            the search starts from min-max).
        inputs: rows [N, I * prod(k)].
        candidates: shrink factors in (0, 1].
        row_weights: optional [N] weights (as in `learn`).

    Returns:
        The round-to-nearest `QWeight` on the chosen scale (pass its ``scale`` to `learn`).
    """
    w = _check_weight(weight)
    x = _check_inputs(inputs, w.shape).to(w.device)
    r = _check_row_weights(row_weights, x.shape[0])
    alphas = [float(a) for a in candidates]
    if not alphas or any(not 0 < a <= 1 for a in alphas):
        raise ValueError(f"candidates must be shrink factors in (0, 1], got {list(candidates)}")
    if alphas[0] != 1.0:
        alphas = [1.0, *[a for a in alphas if a != 1.0]]
    base_spec = _Spec(spec.weight, spec.weight_granularity, "minmax", spec.pair_limit)
    base = quant.quantize_weight(w, base_spec)  # min-max scale, [O] or [O, G]
    err = _OutputError(x, r, None)
    o = w.shape[0]
    w2 = w.reshape(o, -1)
    per_tensor = str(quant.parse_granularity(spec.weight_granularity)) == "tensor"
    groups = base.groups

    def rtn(sc: torch.Tensor) -> QWeight:
        return quant.quantize_weight(w, base_spec, scale=sc, zero_point=base.zero_point)

    errs, group_errs = [], []
    for a in alphas:
        dw = rtn(base.scale * a).dequantize().reshape(o, -1) - w2
        errs.append(err.per_channel(dw))  # [O]
        if groups > 1:
            group_errs.append(err.per_group(dw, groups))  # [O, G]
    errs_t = torch.stack(errs)  # [A, O]
    alpha_t = torch.tensor(alphas, device=w.device)
    if per_tensor:
        best = int(torch.argmin(errs_t.sum(1)))  # first minimum: alpha = 1 wins ties
        return rtn(base.scale * alphas[best])
    shared = alpha_t[torch.argmin(errs_t, dim=0)]  # [O] best factor per channel
    if groups == 1:
        return rtn(base.scale * shared)
    shared_q = rtn(base.scale * shared[:, None])
    per_group = alpha_t[torch.argmin(torch.stack(group_errs), dim=0)]  # [O, G]
    group_q = rtn(base.scale * per_group)
    e_shared = err.per_channel(shared_q.dequantize().reshape(o, -1) - w2)
    e_group = err.per_channel(group_q.dequantize().reshape(o, -1) - w2)
    pick = (e_group < e_shared)[:, None]  # [O, 1]
    return rtn(torch.where(pick, base.scale * per_group, base.scale * shared[:, None]))


def fp_formats_of_width(bits: int) -> list[FPFormat]:
    """Registered FP formats of ``bits`` bits, in registration order (e.g. 4: E2M1, E3M0)."""
    return [f for f in map(_formats.get, _formats.names()) if f.kind == "fp" and f.bits == bits]


def search_fp_format(
    weight: torch.Tensor,
    bits: int,
    inputs: torch.Tensor,
    *,
    granularity: str = "channel",
    candidates: Sequence[str | Format] | None = None,
    shrink: Sequence[float] = DEFAULT_SHRINK,
    row_weights: torch.Tensor | None = None,
) -> tuple[Format, QWeight]:
    """The FP format of a given width (exponent / mantissa split) and its clipping scale, chosen
    by the layer's output error on its rows.

    What it explores: every candidate ExMy split (the grid's shape: how values crowd towards 0),
    each with its own `search_scale` (the clipping maximum, per tensor / channel / group). What
    it does not: the exponent bias. ``fmt.with_bias(b)`` multiplies every grid value, subnormals
    included, by the same power of two, so with a free fp32 scale a bias shift is exactly a
    scale change by 2**(bias - b), a coarser version of what the scale search already covers
    (candidates passed as bias-shifted formats give the same errors). The returned format is
    therefore a registered one (the plan names it) and the bias lives in the scale.

    Args:
        weight: float weight [O, I, *k].
        bits: total width, e.g. 4 (fp4_e2m1, fp4_e3m0) or 6 (fp6_e3m2, fp6_e2m3).
        inputs: rows [N, I * prod(k)].
        granularity: "tensor", "channel" or "group<N>".
        candidates: formats (or names) to try instead of the registered FP ones of ``bits``
            (any of the same width, INT included).
        shrink: shrink factors for `search_scale`.
        row_weights: optional [N] weights (as in `learn`).

    Returns:
        (format, its round-to-nearest QWeight on the searched scale). Ties keep the earlier
        candidate, so the default (first registered) format wins unless another is better.

    Example::

        fmt, qw = search_fp_format(w, 4, rows)                    # e.g. fp4_e2m1
        spec = LayerSpec(fmt.name, "channel")
        qw = learn(w, spec, rows, scale=qw.scale)                 # learned rounding on it
    """
    fmts = fp_formats_of_width(bits) if candidates is None else [_formats.get(c) for c in candidates]
    if not fmts:
        widths = sorted({f.bits for f in map(_formats.get, _formats.names()) if f.kind == "fp"})
        raise ValueError(f"no registered FP format has {bits} bits; FP widths: {widths}")
    wrong = [f.name for f in fmts if f.bits != bits]
    if wrong:
        raise ValueError(f"candidates {wrong} are not {bits}-bit formats")
    w = _check_weight(weight)
    x = _check_inputs(inputs, w.shape).to(w.device)
    r = _check_row_weights(row_weights, x.shape[0])
    best: tuple[float, Format, QWeight] | None = None
    for fmt in fmts:
        qw = search_scale(w, _Spec(fmt, granularity), x, candidates=shrink, row_weights=r)
        e = float(output_mse(w, qw, x, r).sum())
        if best is None or e < best[0]:
            best = (e, fmt, qw)
    return best[1], best[2]


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the per-layer scale and FP-format search (`search`).

    Args:
        shrink: clipping factors of the min-max range tried per tensor / channel / group
            (`search_scale`); 1.0 (min-max) is always tried first and kept on ties.
        fp_formats: for an FP layer, also choose its exponent / mantissa split among the
            registered FP formats of the same width (`search_fp_format`). The plan then names
            the chosen format (same bytes, same kernels; see `search`).
    """

    shrink: tuple[float, ...] = DEFAULT_SHRINK  # 1.0 down to 0.4 in steps of 0.025
    fp_formats: bool = True  # E2M1 / E3M0 at 4 bits, E2M3 / E3M2 at 6 bits, ...

    def __post_init__(self) -> None:
        shrink = tuple(float(a) for a in self.shrink)
        if not shrink or any(not 0 < a <= 1 for a in shrink):
            raise ValueError(f"shrink={self.shrink!r} must be factors in (0, 1], e.g. (1.0, 0.9, 0.8)")
        object.__setattr__(self, "shrink", shrink)
        if not isinstance(self.fp_formats, bool):
            raise ValueError(f"fp_formats={self.fp_formats!r} must be True or False")


def search(
    weight: torch.Tensor,
    spec,
    inputs: torch.Tensor,
    settings: SearchSettings | None = None,
    *,
    formats_allowed: Sequence[str] | None = None,
    row_weights: torch.Tensor | None = None,
):
    """The layer's format (FP split) and clipping scale chosen by its output error on its rows:
    what `dq.quantize(..., rounding="search")` does per layer, and where `rounding="learned"`
    starts.

    Args:
        weight: float weight [O, I, *k].
        spec: the layer's shape-resolved `LayerSpec` (a dataclass: the returned spec is
            ``dataclasses.replace(spec, weight=<chosen format>)``).
        inputs: rows [N, I * prod(k)].
        settings: `SearchSettings()` if None.
        formats_allowed: names the FP split may pick from (the caller keeps it to formats with
            the same storage and kernels as ``spec.weight``); None: every registered FP format
            of the width. Ignored for INT layers or with ``settings.fp_formats=False``.
        row_weights: optional [N] weights (as in `learn`).

    Returns:
        (spec, QWeight): the spec with the chosen format, and the round-to-nearest weight on the
        searched scale. An INT layer (or ``fp_formats=False``) keeps its format.
    """
    settings = settings or SearchSettings()
    fmt = _formats.get(spec.weight)
    if fmt.kind == "fp" and settings.fp_formats:
        names = [f.name for f in fp_formats_of_width(fmt.bits)]
        if formats_allowed is not None:
            names = [n for n in names if n in set(formats_allowed)]
        if fmt.name not in names:  # a bias-shifted or user format: first among the candidates
            names = [fmt.name, *names]
        chosen, qw = search_fp_format(
            weight, fmt.bits, inputs, granularity=spec.weight_granularity, candidates=names,
            shrink=settings.shrink, row_weights=row_weights,
        )
        if chosen.name != fmt.name:
            spec = replace(spec, weight=chosen.name)
        if spec.pair_limit is None:
            return spec, qw
    # INT, fixed format, or a pair-limited spec (the scale must still meet the cap)
    return spec, search_scale(weight, spec, inputs, candidates=settings.shrink, row_weights=row_weights)

