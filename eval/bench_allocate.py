"""How fast is the exact allocator on a model-sized problem? The whole Pareto front
(``dq.allocate.pareto_choices``) against one ``solve_choice`` MILP, on a random but realistic
instance: 800 layers x 8 formats, weight bytes as the budget, 50 budgets across the feasible
range (one hull, then per budget reduced-cost fixing and an exact search of the layers left
open; solve_choice is one HiGHS MILP over all 6,400 binaries). Every answer is checked: within budget, the front monotone, and for a few budgets the
same optimal loss as ``solve_choice``.

    .venv/bin/python eval/bench_allocate.py      (writes eval/results/bench_allocate.log)

The instance: layer sizes log-uniform over three orders of magnitude; candidates are the
weight bytes of INT2..INT8 with per-channel fp32 scales, FP4 (E2M1) with one fp16 scale per
32 weights and FP8 (E4M3) per channel; each layer's loss falls convexly in the format's
effective bits (a layer sensitivity times 4^-bits, times lognormal noise, so hulls skip
points); a few layers cannot take the FP formats (inf).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq.allocate import (  # noqa: E402
    choice_cost,
    choice_loss,
    equal_marginal_choice,
    feasible_range,
    pareto_choices,
    solve_choice,
)


@dataclass
class Settings:
    layers: int = 800  # roughly an SDXL UNet's Linear/Conv2d count
    min_params: float = 1e4  # smallest layer (weights)
    max_params: float = 1e7  # largest layer: three orders of magnitude above the smallest
    budgets: int = 50  # points on the front, evenly over [lowest cost, loss-optimal cost]
    sensitivity_sigma: float = 1.5  # log-std of the per-layer sensitivity (orders of spread)
    noise_sigma: float = 0.15  # log-std of per-(layer, format) noise on the loss
    no_fp_fraction: float = 0.03  # layers without an FP kernel: FP candidates are inf
    single_repeats: int = 3  # solve_choice timings (median reported), on budgets mid-range
    checked_budgets: int = 6  # budgets whose optimum is re-solved with solve_choice
    seed: int = 0  # instance seed


# name, storage bits, effective bits for the loss, scale bytes per weight (None: per channel)
CANDIDATES = [
    ("int2", 2, 2.0, None),
    ("int3", 3, 3.0, None),
    ("int4", 4, 4.0, None),
    ("fp4_e2m1/g32", 4, 4.4, 2 / 32),  # one fp16 scale per 32 weights; finer scales help
    ("int5", 5, 5.0, None),
    ("int6", 6, 6.0, None),
    ("int8", 8, 8.0, None),
    ("fp8_e4m3", 8, 6.6, None),  # 3 mantissa bits: worse than int8 on smooth weights
]


def instance(s: Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> loss [L, C], cost [L, C] (weight bytes, scales included), params [L]."""
    rng = np.random.default_rng(s.seed)
    L, C = s.layers, len(CANDIDATES)
    n = np.exp(rng.uniform(np.log(s.min_params), np.log(s.max_params), L))  # [L] weights
    out_ch = np.maximum(1.0, np.round(np.sqrt(n) * rng.uniform(0.5, 2.0, L)))  # [L]
    cost = np.empty((L, C))
    loss = np.empty((L, C))
    sens = np.exp(rng.normal(0.0, s.sensitivity_sigma, L)) * n / n.mean()  # [L]
    for c, (_, bits, eff, group_scale) in enumerate(CANDIDATES):
        scale_bytes = 4 * out_ch if group_scale is None else group_scale * n
        cost[:, c] = np.ceil(n * bits / 8) + scale_bytes
        loss[:, c] = sens * 4.0**-eff * np.exp(rng.normal(0.0, s.noise_sigma, L))
    fp = [c for c, (name, *_) in enumerate(CANDIDATES) if name.startswith("fp")]
    no_fp = rng.random(L) < s.no_fp_fraction
    loss[np.ix_(no_fp, fp)] = np.inf
    return loss, cost, n


def main() -> None:
    s = Settings()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    loss, cost, n = instance(s)
    lo, hi = feasible_range(loss, cost)
    budgets = np.linspace(lo, hi, s.budgets)
    total = n.sum()
    say(
        f"instance: {s.layers} layers x {len(CANDIDATES)} candidates "
        f"({', '.join(c[0] for c in CANDIDATES)}), {int(np.isinf(loss).sum())} inf entries"
    )
    say(
        f"layer sizes {n.min():.3g} .. {n.max():.3g} weights, {total:.4g} in all; budgets "
        f"{s.budgets} from {lo / 2**20:.2f} MiB ({8 * lo / total:.3f} bits/weight) to "
        f"{hi / 2**20:.2f} MiB ({8 * hi / total:.3f} bits/weight)"
    )
    say(
        f"machine: {os.cpu_count()} CPUs, load average before "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    say()

    t0 = time.perf_counter()
    front = pareto_choices(loss, cost, budgets)
    t_front = time.perf_counter() - t0

    mid = budgets[len(budgets) // 2 - s.single_repeats // 2 :][: s.single_repeats]
    t_single = []
    for b in mid:
        t0 = time.perf_counter()
        solve_choice(loss, cost, b)
        t_single.append(time.perf_counter() - t0)
    t_one = statistics.median(t_single)

    t0 = time.perf_counter()
    em = [equal_marginal_choice(loss, cost, b)[0] for b in budgets]
    t_em = time.perf_counter() - t0

    say(f"pareto_choices, whole front ({s.budgets} budgets): {t_front:7.3f} s")
    say(
        f"solve_choice, one budget (median of {s.single_repeats}):  {t_one:7.3f} s  "
        f"(runs {', '.join(f'{t:.3f}' for t in t_single)})"
    )
    say(
        f"ratio front / one solve: {t_front / t_one:.2f} "
        f"(a solve per budget would take ~{s.budgets * t_one:.1f} s, "
        f"{s.budgets * t_one / t_front:.1f}x the front)"
    )
    say(f"equal_marginal_choice, all {s.budgets} budgets: {t_em:.3f} s")
    say(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say()

    z = np.array([choice_loss(loss, c) for c in front])
    over = [choice_cost(cost, c) - b for c, b in zip(front, budgets, strict=True)]
    z_em = np.array([choice_loss(loss, c) for c in em])
    say(
        f"every choice within its budget: {all(o <= 0 for o in over)} "
        f"(smallest slack {abs(max(over)):.0f} bytes; the first budget is the lowest cost)"
    )
    say(f"front monotone (loss never rises with budget): {bool((np.diff(z) <= 0).all())}")
    say(
        f"equal-marginal loss >= optimum at every budget: {bool((z_em >= z * (1 - 1e-9)).all())}; "
        f"median excess {np.median(z_em / z - 1):.2e}, max {np.max(z_em / z - 1):.2e}"
    )
    check = np.unique(np.linspace(1, s.budgets - 2, s.checked_budgets).round().astype(int))
    worst = 0.0
    for i in check:
        z_ref = choice_loss(loss, solve_choice(loss, cost, budgets[i]))
        worst = max(worst, abs(z[i] - z_ref) / z_ref)
        say(
            f"  budget {i:2d} ({8 * budgets[i] / total:.3f} bits/weight): front loss "
            f"{z[i]:.9e}, solve_choice {z_ref:.9e}"
        )
    say(
        f"optimal against solve_choice on {len(check)} budgets: {worst <= 1e-9} "
        f"(largest relative difference {worst:.1e})"
    )
    say(f"target: whole front <= 5 s: {'met' if t_front <= 5 else 'MISSED'}")

    out = ROOT / "eval" / "results" / "bench_allocate.log"
    out.write_text("# .venv/bin/python eval/bench_allocate.py\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
