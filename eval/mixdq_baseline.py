"""MixDQ's own bit-allocation procedure, written as a baseline (facts from references.md).

What MixDQ does (ECCV 2024, thu-nics/MixDQ), and how it is reproduced here on a dq
`SensitivityTable` (which already holds MixDQ's raw scores for every item):

1. Metric-decoupled scores, raw: content layers (names with `attn2` or `ff`) by the SSIM of
   images against full precision, quality layers (the rest) by the SQNR (dB) of the UNet
   output; one layer at a time at 2, 4 and 8 bits (INT, per output channel, min-max,
   round-to-nearest). Here: the table's `ssim` and `sqnr_db` of the int2/int4/int8 items.
   (MixDQ's SSIM window is 511 px on 512 px images, near-global; the table's is dq's default
   11 px on 32 px images, a third of the image.)
2. Activations: the ~1 % most sensitive activation layers (lowest score at 8 bits) are kept in
   float, the rest at 8 bits (a W*A8 plan).
3. Each group gets its own ILP: binary choice per layer, one-hot, size-weighted average bits
   within +-0.02 of the group's target, maximise the summed raw scores (MixDQ: OR-Tools SCIP;
   here HiGHS through `dq.allocate.solve_choice`, equally exact).
4. A hand-set split-ratio sweep between the groups: the content group's target bits run over
   a grid and the quality group takes what keeps the overall size-weighted average at the
   target; every split gives one candidate plan (MixDQ: 100-200 plans).
5. One image per candidate plan (one prompt, one seed); the plan with the lowest pixel MSE
   against the full-precision image is kept.

Images for step 5 are simulated (`dq.simulate.fake_quantized`, bit-exact with the real
modules) with the table's calibration ranges.

    from eval.mixdq_baseline import mixdq_plan
    cfg, log = mixdq_plan(pipe, table, 4.0, ranges=ranges, bos=bos)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dq.allocate import solve_choice
from dq.config import LayerSpec, QuantConfig
from dq.generate import Sampling, generate
from dq.simulate import fake_quantized


@dataclass(frozen=True)
class MixDQSettings:
    """MixDQ's procedure, as published, with the knobs it leaves to hand."""

    weight_bits: tuple[str, ...] = ("int2", "int4", "int8")  # MixDQ scores 2, 4, 8 bits
    act: str = "uint8"  # W*A8: every activation 8-bit but the pinned ones
    pin_fp: float = 0.01  # MixDQ keeps ~1 % of activation layers in FP16
    tolerance: float = 0.02  # MixDQ: average bits within +-0.02 of the target
    split_step: float = 0.1  # content-group target grid step (bits); ~40-60 plans per budget
    stored_bits: bool = False  # count int2 as the 4 bits it is stored in (equal-bytes variant)
    below_only: bool = False  # window [target - 2 tol, target] so the plan never exceeds it
    prompt_index: int = 0  # the one image: this calibration prompt ...
    seed: int = 0  # ... with this generator seed


_NOMINAL = {"int2": 2, "int3": 3, "int4": 4, "int6": 6, "int8": 8}


def raw_scores(table, kind: str, cands) -> tuple[list[str], np.ndarray]:
    """(names, score [L, C]): SSIM for content layers, SQNR (dB) for quality layers, -inf
    where the table holds no finite item."""
    names = sorted(table.layers)
    score = np.full((len(names), len(cands)), -np.inf)
    for i, n in enumerate(names):
        key = "ssim" if table.layers[n]["group"] == "content" else "sqnr_db"
        for j, c in enumerate(cands):
            try:
                m = table.item(n, kind, c).metrics
            except ValueError:
                continue
            v = m.get(key, -math.inf)
            if math.isfinite(m.get("unet_noise", math.inf)) and math.isfinite(v):
                score[i, j] = v
    return names, score


def pinned_act_layers(table, s: MixDQSettings) -> set[str]:
    """The ~pin_fp most sensitive activation layers of each group (lowest raw score at s.act)."""
    names, score = raw_scores(table, "act", [s.act])
    out = set()
    for group in ("content", "quality"):
        idx = [i for i, n in enumerate(names) if table.layers[n]["group"] == group]
        k = math.ceil(s.pin_fp * len(idx) - 1e-9)
        out |= {names[i] for i in sorted(idx, key=lambda i: score[i, 0])[:k]}
    return out


def group_ilp(score: np.ndarray, bits: np.ndarray, numel: np.ndarray, target: float,
              s: MixDQSettings) -> np.ndarray | None:  # fmt: skip
    """MixDQ's per-group ILP: maximise sum score s.t. the size-weighted average bits lie in
    the window around `target`. -> choice [L], or None if no plan fits the window."""
    lo, hi = (
        (target - 2 * s.tolerance, target)
        if s.below_only
        else (target - s.tolerance, target + s.tolerance)
    )
    total = bits[None, :] * numel[:, None]  # [L, C] bit-parameters (integers: exact sums)
    loss = np.where(np.isfinite(score), -score, np.inf)
    try:
        return solve_choice(loss, np.stack([total, -total]), [hi * numel.sum(), -lo * numel.sum()])
    except ValueError:
        return None


def candidate_plans(table, target: float, s: MixDQSettings) -> list[tuple[float, dict]]:
    """[(content-group target bits, plan {layer: LayerSpec})] over the split-ratio sweep."""
    names, score = raw_scores(table, "weight", s.weight_bits)
    numel = np.array([float(table.layers[n]["numel"]) for n in names])
    bits = np.array(
        [4 if (s.stored_bits and w == "int2") else _NOMINAL[w] for w in s.weight_bits], float
    )
    fp_act = pinned_act_layers(table, s)
    groups = {
        g: np.array([table.layers[n]["group"] == g for n in names]) for g in ("content", "quality")
    }
    n_c, n_q = numel[groups["content"]].sum(), numel[groups["quality"]].sum()
    gran, method = table.settings["weight_granularity"], table.settings["weight_method"]
    plans = []
    lo_b, hi_b = float(bits.min()), float(bits.max())
    for t_c in np.arange(lo_b, hi_b + 1e-9, s.split_step):
        t_q = (target * (n_c + n_q) - t_c * n_c) / n_q
        if not lo_b - 1e-9 <= t_q <= hi_b + 1e-9:
            continue
        choice = {}
        for g, t in (("content", t_c), ("quality", t_q)):
            m = groups[g]
            c = group_ilp(score[m], bits, numel[m], float(t), s)
            if c is None:
                break
            choice.update(dict(zip(np.flatnonzero(m).tolist(), c.tolist(), strict=True)))
        else:
            plan = {names[i]: LayerSpec(s.weight_bits[j], gran, method, act=None if names[i] in fp_act else s.act)
                    for i, j in choice.items()}  # fmt: skip
            plans.append((round(float(t_c), 4), plan))
    return plans


def _bos_layers(plan) -> list[str]:
    return [
        n for n, sp in plan.items() if sp is not None and n.endswith(("attn2.to_k", "attn2.to_v"))
    ]


def simulated_images(pipe, plan, prompts, sampling: Sampling, ranges, bos) -> torch.Tensor:
    """Images of `plan` simulated on the float pipeline (bit-exact with the real modules)."""
    with fake_quantized(
        pipe.unet, plan, ranges, bos=bos, bos_layers=_bos_layers(plan) if bos is not None else ()
    ):
        return generate(pipe, prompts, sampling)


def mixdq_plan(pipe, table, target_bits: float, *, ranges, bos, prompt: str, sampling: Sampling,
               settings: MixDQSettings | None = None) -> tuple[QuantConfig, dict]:  # fmt: skip
    """MixDQ's procedure at `target_bits` (average weight bits, size-weighted). -> (the kept
    plan as a QuantConfig naming every table layer, a log of every candidate's image MSE)."""
    s = settings or MixDQSettings()
    plans = candidate_plans(table, target_bits, s)
    if not plans:
        raise ValueError(f"MixDQ's sweep found no plan at {target_bits} bits")
    one = sampling.replace(seed=s.seed, batch_size=1)
    ref = generate(pipe, [prompt], one)
    mses = []
    for _, plan in plans:
        img = simulated_images(pipe, plan, [prompt], one, ranges, bos)
        mses.append(float((img - ref).pow(2).mean()))
    best = int(np.argmin(mses))
    tag = "stored" if s.stored_bits else "nominal"
    cfg = QuantConfig(
        default=None, layers=plans[best][1], skip=(), name=f"mixdq-{target_bits:g}bits-{tag}"
    )
    log = {"target_bits": target_bits, "n_plans": len(plans), "kept_split_content_bits": plans[best][0],
           "kept_image_mse": mses[best], "splits": [p[0] for p in plans], "image_mse": mses,
           "settings": s.__dict__}  # fmt: skip
    return cfg, log
