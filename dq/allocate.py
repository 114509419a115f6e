"""Bit allocation as pure functions: choose one candidate (format) per layer minimising the
total loss under one or more budgets, exactly (an integer program solved by HiGHS through
``scipy.optimize.milp``), for one budget or a whole sweep of budgets.

Assumptions (the model the program optimises):

- **Additive losses.** The loss of a plan is the sum of per-layer losses,
  ``sum_l loss[l, choice[l]]``: layers are scored one at a time and their damage is taken to
  add up (the usual sensitivity-table approximation; interactions are ignored).
- **Separable costs.** Every budgeted quantity is a sum of per-layer terms,
  ``sum_l cost[m, l, choice[l]] <= budget[m]``: weight bytes (scales included), bit-operations,
  measured latency, or an average number of bits written as a weighted sum
  (``bits * params_l / total_params``).
- A candidate a layer cannot take is marked ``inf`` in ``loss`` or in any row of ``cost``.

Shapes (L layers, C candidates per layer, M budgets at once, K budgets in a sweep):

- ``loss``:    [L, C]
- ``cost``:    [L, C] with a scalar budget, or [M, L, C] with a length-M budget
- ``choice``:  [L] int64, the chosen column of each layer
- ``pareto_choices`` budgets: [K] (cost [L, C]) or [K, M] (cost [M, L, C])

The program: binary ``x[l, c]`` for every allowed entry, ``sum_c x[l, c] = 1`` per layer,
``sum_{l,c} cost[m, l, c] x[l, c] <= budget[m]`` per budget, minimise
``sum_{l,c} loss[l, c] x[l, c]``. With one budget this is the multiple-choice knapsack; its
LP relaxation is solved by walking each layer's lower convex hull in order of marginal loss
decrease per unit cost, which ``pareto_choices`` and ``equal_marginal_choice`` use.

Exactness: the MILP runs with relative gap 0 and the objective rescaled so HiGHS's absolute
gap is ~1e-12 of the largest per-layer loss spread; every returned choice satisfies every
budget exactly as summed in float64 (a solution HiGHS accepts within its feasibility
tolerance but which overshoots is re-solved with the budget tightened by the overshoot).
The HiGHS in scipy 1.17 (1.12) sometimes prints a stray debug line on stdout (HiGHS issue
#2783; harmless): ``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``

    >>> import numpy as np
    >>> loss = np.array([[4.0, 1.0, 0.0], [9.0, 3.0, 0.5]])   # 2 layers x (2, 4, 8 bits)
    >>> cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])   # bytes
    >>> solve_choice(loss, cost, 12.0)
    array([1, 2])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

__all__ = [
    "solve_choice",
    "pareto_choices",
    "equal_marginal_choice",
    "feasible_range",
    "choice_loss",
    "choice_cost",
    "Budget",
    "plan",
    "plan_summary",
    "backend_weight_formats",
]

# The objective handed to HiGHS is (loss - per-layer min) / largest per-layer spread * this:
# HiGHS stops at an absolute gap of 1e-6, so the optimum is exact to ~1e-12 of a layer's spread.
_OBJ_SCALE = 1e6
# Re-solves with a tightened budget when HiGHS's answer overshoots it (tolerance 1e-6).
_MAX_TIGHTEN = 4
# Partial plans the exact core search of pareto_choices may hold before it hands a budget to
# HiGHS instead (a few hundred to a few thousand on the 800-layer benchmark).
_MAX_STATES = 200_000


# ----- inputs -----


@dataclass
class _Problem:
    loss: np.ndarray  # [L, C] float64, inf where not allowed
    cost: np.ndarray  # [M, L, C] float64, inf where not allowed
    allowed: np.ndarray  # [L, C] bool (pins applied)
    stacked: bool  # cost was given as [M, L, C]

    @property
    def shape(self) -> tuple[int, int]:
        return self.loss.shape

    def restricted(self, allowed: np.ndarray) -> _Problem:
        """The same problem with fewer allowed entries (a subset of ``self.allowed``)."""
        return _Problem(
            np.where(allowed, self.loss, np.inf),
            np.where(allowed, self.cost, np.inf),
            allowed,
            self.stacked,
        )


def _problem(loss, cost, pinned: Mapping[int, int] | None) -> _Problem:
    loss = np.asarray(loss, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if loss.ndim != 2:
        raise ValueError(f"loss must be [L, C] (layers x candidates), got shape {loss.shape}")
    if cost.ndim not in (2, 3) or cost.shape[-2:] != loss.shape:
        raise ValueError(
            f"cost must be [L, C] or [M, L, C] matching loss {loss.shape}, got shape {cost.shape}"
        )
    stacked = cost.ndim == 3
    cost = cost if stacked else cost[None]
    if stacked and cost.shape[0] == 0:
        raise ValueError("cost [M, L, C] needs at least one budget row (M >= 1)")
    for name, a in (("loss", loss), ("cost", cost)):
        if np.isnan(a).any():
            where = tuple(int(i) for i in np.argwhere(np.isnan(a))[0])
            raise ValueError(
                f"{name} has NaN (first at index {where}); mark a candidate a layer "
                "cannot take with inf"
            )
        if np.isneginf(a).any():
            where = tuple(int(i) for i in np.argwhere(np.isneginf(a))[0])
            raise ValueError(
                f"{name} has -inf (first at index {where}); only +inf (not allowed) is accepted"
            )
    allowed = np.isfinite(loss) & np.isfinite(cost).all(axis=0)
    L, C = loss.shape
    if pinned:
        allowed = allowed.copy()
        for layer, col in pinned.items():
            if not _is_int(layer) or not 0 <= layer < L:
                raise ValueError(f"pinned layer {layer!r} is not a layer index in [0, {L})")
            if not _is_int(col) or not 0 <= col < C:
                raise ValueError(f"pinned column {col!r} of layer {layer} is not in [0, {C})")
            if not allowed[layer, col]:
                raise ValueError(
                    f"layer {layer} is pinned to column {col}, which it cannot take "
                    "(inf loss or cost)"
                )
            allowed[layer] = False
            allowed[layer, col] = True
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        shown = ", ".join(str(int(i)) for i in empty[:10]) + (" ..." if empty.size > 10 else "")
        raise ValueError(
            f"{empty.size} layer(s) have no allowed candidate (every loss or cost is inf): {shown}"
        )
    return _Problem(
        np.where(allowed, loss, np.inf), np.where(allowed, cost, np.inf), allowed, stacked
    )


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _budget_vector(budget, p: _Problem) -> np.ndarray:
    """budget -> [M] float64, checked against the cost's shape."""
    M = p.cost.shape[0]
    if p.stacked:
        b = np.asarray(budget, dtype=np.float64)
        if b.shape != (M,):
            raise ValueError(
                f"cost is [M={M}, L, C], so budget must be a sequence of {M} "
                f"numbers, got {budget!r}"
            )
    else:
        if np.ndim(budget) != 0:
            raise ValueError(
                f"cost is [L, C], so budget must be one number, got {budget!r}; "
                "for several budgets at once stack cost as [M, L, C]"
            )
        b = np.array([float(budget)])
    if np.isnan(b).any():
        raise ValueError(f"budget is NaN: {budget!r}")
    return b


# ----- small pure helpers -----


def choice_loss(loss: ArrayLike, choice: ArrayLike) -> float:
    """Total loss of a choice: ``sum_l loss[l, choice[l]]``.

    Args:
        loss: [L, C].
        choice: [L] column per layer.

    Example:
        >>> choice_loss(np.array([[1.0, 0.5], [2.0, 0.0]]), [1, 0])
        2.5
    """
    loss = np.asarray(loss, dtype=np.float64)
    return float(loss[np.arange(loss.shape[0]), np.asarray(choice)].sum())


def choice_cost(cost: ArrayLike, choice: ArrayLike) -> np.ndarray | float:
    """Total cost of a choice: ``sum_l cost[..., l, choice[l]]`` (a float for [L, C], an [M]
    array for [M, L, C]).

    Args:
        cost: [L, C] or [M, L, C].
        choice: [L] column per layer.

    Example:
        >>> choice_cost(np.array([[1.0, 4.0], [1.0, 8.0]]), [1, 0])
        5.0
    """
    cost = np.asarray(cost, dtype=np.float64)
    t = _totals(cost if cost.ndim == 3 else cost[None], np.asarray(choice))
    return t if cost.ndim == 3 else float(t[0])


def _totals(cost: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """cost [M, L, C], choice [L] -> [M] totals (the one summation used for every check)."""
    return cost[:, np.arange(cost.shape[1]), choice].sum(axis=1)


def _min_cost_choice(p: _Problem, m: int) -> np.ndarray:
    """The cheapest allowed column per layer in row m, ties to the lower loss. -> [L]"""
    c = p.cost[m]
    tie = c == c.min(axis=1, keepdims=True)
    return np.where(tie, p.loss, np.inf).argmin(axis=1)


def _loss_optimal_choice(p: _Problem) -> np.ndarray:
    """The lowest-loss allowed column per layer, ties to the lower summed cost. -> [L]"""
    tie = p.loss == p.loss.min(axis=1, keepdims=True)
    return np.where(tie, p.cost.sum(axis=0), np.inf).argmin(axis=1)


def _ranges(p: _Problem) -> tuple[np.ndarray, np.ndarray]:
    """(lowest achievable total per budget row [M], totals of the loss-optimal choice [M])."""
    lo = np.array(
        [_totals(p.cost[m : m + 1], _min_cost_choice(p, m))[0] for m in range(p.cost.shape[0])]
    )
    return lo, _totals(p.cost, _loss_optimal_choice(p))


def feasible_range(
    loss: ArrayLike, cost: ArrayLike, *, pinned: Mapping[int, int] | None = None
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """The budgets worth asking for: (lowest achievable cost, cost of the loss-optimal choice).

    Below the first no choice fits; at or above the second the budget no longer binds and
    the answer is the loss-optimal choice. For cost [M, L, C] both are [M] arrays, each row on
    its own (the rows together may still exclude each other).

    Args:
        loss: [L, C] loss per layer and candidate (inf: not allowed).
        cost: [L, C] or [M, L, C].
        pinned: layer index -> forced column.

    Example:
        >>> feasible_range([[4.0, 1.0], [2.0, 0.0]], [[1.0, 2.0], [1.0, 3.0]])
        (2.0, 5.0)
    """
    p = _problem(loss, cost, pinned)
    lo, hi = _ranges(p)
    return (lo, hi) if p.stacked else (float(lo[0]), float(hi[0]))


def _infeasible(p: _Problem, budget: np.ndarray, joint: bool = False) -> ValueError:
    lo, hi = _ranges(p)
    if not p.stacked:
        return ValueError(
            f"budget {budget[0]:.10g} is infeasible: the lowest achievable cost is {lo[0]:.10g} "
            f"(the cheapest allowed candidate in every layer, pins included); budgets in "
            f"[{lo[0]:.10g}, {hi[0]:.10g}] trade loss for cost, and from {hi[0]:.10g} (the cost "
            f"of the loss-optimal choice) up the budget no longer binds"
        )
    rows = "; ".join(
        f"row {m}: budget {budget[m]:.10g}, feasible from {lo[m]:.10g}, binds below {hi[m]:.10g}"
        for m in range(len(budget))
    )
    what = "cannot be met together (each row alone can)" if joint else "are infeasible"
    return ValueError(f"budgets {what}: {rows}")


# ----- the exact solver -----


def _milp(p: _Problem, budget: np.ndarray) -> np.ndarray | None:
    """One HiGHS solve over the allowed entries. -> choice [L], or None if infeasible."""
    L, C = p.shape
    idx = np.flatnonzero(p.allowed.ravel())  # [n] flat (l, c) of each variable
    layer = idx // C
    lmin = p.loss.min(axis=1)  # [L]
    spread = float((np.where(p.allowed, p.loss, -np.inf).max(axis=1) - lmin).max())
    obj = (p.loss.ravel()[idx] - lmin[layer]) * (_OBJ_SCALE / spread if spread > 0 else 1.0)
    one_hot = csr_array((np.ones(idx.size), (layer, np.arange(idx.size))), shape=(L, idx.size))
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    rows, rhs = [], []
    for m in range(p.cost.shape[0]):
        if np.isposinf(budget[m]):
            continue
        cmin = p.cost[m].min(axis=1)  # [L]; shifting keeps coefficients >= 0, same program
        rows.append(p.cost[m].ravel()[idx] - cmin[layer])
        rhs.append(budget[m] - cmin.sum())
    if rows:
        constraints.append(LinearConstraint(np.stack(rows), -np.inf, np.array(rhs)))
    res = milp(
        obj,
        integrality=np.ones(idx.size),
        bounds=Bounds(0.0, 1.0),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    if res.status == 2:
        return None
    if res.x is None:
        raise RuntimeError(f"HiGHS did not solve the allocation: {res.message}")
    x = np.zeros(L * C)
    x[idx] = res.x
    return x.reshape(L, C).argmax(axis=1)


def _improve(p: _Problem, choice: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Best single-layer swaps while one lowers the loss and keeps every budget (greedy fill of
    leftover budget; after HiGHS it only ever removes tolerance-sized slack). -> [L]"""
    L = p.shape[0]
    ar = np.arange(L)
    choice = choice.copy()
    for _ in range(4 * L + 8):
        tot = _totals(p.cost, choice)  # [M]
        fits = p.allowed.copy()  # [L, C]
        for m in range(p.cost.shape[0]):
            fits &= tot[m] - p.cost[m, ar, choice][:, None] + p.cost[m] <= budget[m]
        cur = p.loss[ar, choice]
        gain = np.where(fits, cur[:, None] - p.loss, -np.inf)  # [L, C]
        flat = int(gain.argmax())
        if not gain.flat[flat] > 1e-12 * max(abs(float(cur.sum())), 1e-300):
            break
        trial = choice.copy()
        trial[flat // gain.shape[1]] = flat % gain.shape[1]
        if (_totals(p.cost, trial) > budget).any():
            break
        choice = trial
    return choice


def _solve(p: _Problem, budget: np.ndarray) -> np.ndarray | None:
    """Exact choice under [M] budgets; None if no choice fits them all."""
    lo, hi = _ranges(p)
    best = _loss_optimal_choice(p)
    if (hi <= budget).all():
        return best
    if p.cost.shape[0] == 1 and budget[0] <= lo[0]:  # only cheapest candidates fit
        return _min_cost_choice(p, 0) if budget[0] == lo[0] else None
    b = budget.copy()
    for _ in range(_MAX_TIGHTEN + 1):
        choice = _milp(p, b)
        if choice is None:
            return None
        over = _totals(p.cost, choice) - budget
        if (over <= 0).all():
            return _improve(p, choice, budget)
        b = np.where(over > 0, b - over - 1e-12 * np.abs(b), b)
    raise RuntimeError("HiGHS kept returning choices over the budget; rescale the costs")


def solve_choice(
    loss: ArrayLike,
    cost: ArrayLike,
    budget: float | Sequence[float],
    *,
    pinned: Mapping[int, int] | None = None,
) -> np.ndarray:
    """The choice minimising ``sum_l loss[l, choice[l]]`` with every budget respected, exactly
    (one MILP; binary one-hot variables per layer, solved by HiGHS).

    Args:
        loss: [L, C] loss of layer l under candidate c (inf: layer l cannot take c).
        cost: [L, C] with one ``budget`` number, or [M, L, C] with ``budget`` a length-M
            sequence (e.g. weight bytes and activation bits, all constraints at once).
        budget: the upper bound(s) on ``sum_l cost[..., l, choice[l]]``; inf means unbounded.
        pinned: layer index -> the column that layer must take.

    Returns:
        int64 array [L] of chosen columns.

    Raises:
        ValueError: bad shapes, NaN or -inf entries, a layer with no allowed candidate, a pin
            to a column the layer cannot take, or an infeasible budget (the message gives the
            feasible range: the lowest achievable cost and the cost of the loss-optimal
            choice, above which the budget no longer binds).

    Example:
        >>> loss = np.array([[5.0, 1.0, np.inf], [4.0, 2.0, 0.0]])
        >>> cost = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
        >>> solve_choice(loss, cost, 4.0), solve_choice(loss, cost, 4.0, pinned={1: 2})
        (array([1, 1]), array([0, 2]))
    """
    p = _problem(loss, cost, pinned)
    b = _budget_vector(budget, p)
    if p.shape[0] == 0:
        if (b < 0).any():
            raise _infeasible(p, b)
        return np.zeros(0, dtype=np.int64)
    choice = _solve(p, b)
    if choice is None:
        lo, _ = _ranges(p)
        raise _infeasible(p, b, joint=bool((b >= lo).all()))
    return choice.astype(np.int64)


# ----- one budget: lower convex hulls -----


def _prune_dominated(p: _Problem) -> np.ndarray:
    """Allowed entries no other candidate of the same layer dominates (loss and every cost
    <=, one of them <, or all equal and a lower column). -> [L, C] bool"""
    L, C = p.shape
    le = (p.loss[:, :, None] <= p.loss[:, None, :]) & (
        p.cost[:, :, :, None] <= p.cost[:, :, None, :]
    ).all(axis=0)  # [L, a, b]: a <= b
    lt = (p.loss[:, :, None] < p.loss[:, None, :]) | (
        p.cost[:, :, :, None] < p.cost[:, :, None, :]
    ).any(axis=0)
    lower_col = np.arange(C)[:, None] < np.arange(C)[None, :]
    dom = le & (lt | lower_col) & p.allowed[:, :, None] & ~np.eye(C, dtype=bool)
    return p.allowed & ~dom.any(axis=1)


@dataclass
class _Hull:
    """Each layer's lower convex hull in the (cost, loss) plane, and the hull segments of all
    layers in order of falling slope (loss saved per unit cost): the LP relaxation's path."""

    points: np.ndarray  # [L, H] columns along each hull by rising cost (padded with -1)
    slope: np.ndarray  # [S] loss saved per unit cost of each segment, non-increasing
    seg_layer: np.ndarray  # [S] layer of each segment
    seg_cost: np.ndarray  # [S] cost the segment adds (> 0)
    seg_save: np.ndarray  # [S] loss the segment saves (> 0)

    def choice(self, k: int) -> np.ndarray:
        """Every layer at its cheapest hull point, then the first k segments taken. -> [L]"""
        steps = np.bincount(self.seg_layer[:k], minlength=self.points.shape[0])
        return self.points[np.arange(self.points.shape[0]), steps]


def _hull(p: _Problem, keep: np.ndarray) -> _Hull:
    L, _ = p.shape
    loss, cost = p.loss, p.cost[0]
    hulls, seg_layer, seg_pos = [], [], []
    for lay in range(L):
        cols = np.flatnonzero(keep[lay])
        cols = cols[np.lexsort((loss[lay, cols], cost[lay, cols]))]  # rising cost, falling loss
        h: list[int] = []
        for c in cols:
            while len(h) >= 2 and _slope(loss, cost, lay, h[-2], h[-1]) <= _slope(
                loss, cost, lay, h[-1], c
            ):
                h.pop()  # h[-1] lies on or above the chord: not a hull vertex
            h.append(int(c))
        hulls.append(h)
        seg_layer += [lay] * (len(h) - 1)
        seg_pos += range(1, len(h))
    H = max(len(h) for h in hulls)
    points = np.full((L, H), -1, dtype=np.int64)
    for lay, h in enumerate(hulls):
        points[lay, : len(h)] = h
    layer_a = np.array(seg_layer, dtype=np.int64)
    pos_a = np.array(seg_pos, dtype=np.int64)
    a, b = points[layer_a, pos_a - 1], points[layer_a, pos_a]  # segment end points
    d_cost = cost[layer_a, b] - cost[layer_a, a]
    d_save = loss[layer_a, a] - loss[layer_a, b]
    slopes = d_save / d_cost  # the same arithmetic as _slope, so the hull test and order agree
    # falling slope; ties by layer then position, so every prefix takes a layer's segments in
    # hull order (within a layer slopes strictly fall, so this only orders equal slopes)
    order = np.lexsort((pos_a, layer_a, -slopes))
    return _Hull(points, slopes[order], layer_a[order], d_cost[order], d_save[order])


def _slope(loss, cost, lay, a, b) -> float:
    return float((loss[lay, a] - loss[lay, b]) / (cost[lay, b] - cost[lay, a]))


def _hull_prefix(p: _Problem, hull: _Hull, budget: float) -> int:
    """Bisection on the multiplier: the largest k whose hull choice fits ``budget`` (costs
    summed exactly at every probe; the hull choice's cost rises with k). -> k in [0, S]"""
    lo, hi = 0, hull.slope.size  # choice(lo) fits (budget >= lowest cost); find the last fit
    if _totals(p.cost, hull.choice(hi))[0] <= budget:
        return hi
    while hi - lo > 1:  # invariant: choice(lo) fits, choice(hi) does not
        mid = (lo + hi) // 2
        if _totals(p.cost, hull.choice(mid))[0] <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def equal_marginal_choice(
    loss: ArrayLike, cost: ArrayLike, budget: float, *, pinned: Mapping[int, int] | None = None
) -> tuple[np.ndarray, float]:
    """The equal-marginal-loss allocation (BAQ's closed form, the Lagrangian solution): every
    layer sits on its lower convex hull at the point where its marginal loss saved per unit
    cost brackets one shared multiplier ``lam``; the multiplier is found by bisection over the
    hull slopes so that the total cost is the largest that fits ``budget``.

    Each layer's choice minimises ``loss[l, c] + lam * cost[l, c]``, so the choice is optimal
    for its own total cost; under ``budget`` its loss is an upper bound on the MILP optimum
    (equal to it when the budget sits on a hull breakpoint). Use it as a warm start and a
    sanity check of ``solve_choice``. One budget row only.

    Args:
        loss: [L, C] (inf: not allowed).
        cost: [L, C].
        budget: upper bound on the total cost.
        pinned: layer index -> forced column.

    Returns:
        (choice int64 [L], lam): lam = 0 when the budget does not bind.

    Example:
        >>> loss = np.array([[4.0, 1.0, 0.0], [9.0, 3.0, 0.5]])
        >>> cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
        >>> equal_marginal_choice(loss, cost, 9.0)
        (array([1, 1]), 0.625)
    """
    p = _problem(loss, cost, pinned)
    if p.stacked:
        raise ValueError("equal_marginal_choice takes one budget: cost [L, C], a number")
    b = _budget_vector(budget, p)
    lo, hi = _ranges(p)
    if b[0] < lo[0] or p.shape[0] == 0 and b[0] < 0:
        raise _infeasible(p, b)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    if hi[0] <= b[0]:
        return _loss_optimal_choice(p).astype(np.int64), 0.0
    hull = _hull(p, _prune_dominated(p))
    k = _hull_prefix(p, hull, b[0])
    lam = float(hull.slope[k]) if k < hull.slope.size else 0.0
    return hull.choice(k).astype(np.int64), lam


# ----- many budgets -----


def _solve_on_hull(p: _Problem, keep: np.ndarray, hull: _Hull, budget: float) -> np.ndarray:
    """Exact choice under one budget row, from the hulls.

    1. LP relaxation: the hull choice with the first k segments (the most that fit) and the
       multiplier lam = slope of segment k; the Lagrangian bound
       ``z_lr = sum_l min_c (loss + lam * cost) - lam * budget`` is <= every feasible loss.
    2. Incumbent: the hull choice, then greedy single-layer swaps into the leftover budget.
    3. Reduced-cost fixing: ``loss(x) >= z_lr + sum_l rc[l, x_l]`` with
       ``rc = loss + lam * cost - min_c(...) >= 0``, so a candidate whose rc exceeds the gap
       ``z_inc - z_lr`` is in no better choice; layers left with one candidate are decided.
    4. The open layers go to ``_core_search`` (exact enumeration, below), or to HiGHS if that
       grows past ``_MAX_STATES`` partial plans.
    """
    b = np.array([budget])
    k = _hull_prefix(p, hull, budget)
    if k == hull.slope.size:
        return hull.choice(k)
    lam = float(hull.slope[k])
    q = p.restricted(keep)
    base = hull.choice(k)
    incumbent = _improve(q, base, b)
    z_inc = choice_loss(q.loss, incumbent)
    lagr = np.where(keep, q.loss + lam * q.cost[0], np.inf)  # [L, C]
    rmin = lagr.min(axis=1)  # [L]
    rc = lagr - rmin[:, None]  # [L, C] >= 0, inf outside keep
    z_lr = float(rmin.sum() - lam * budget)
    scale = float(np.abs(rmin).sum() + abs(lam * budget) + abs(z_inc))
    tol = 1e-9 * scale  # float slack for pruning: keeping more than needed is always safe
    if z_inc - z_lr <= 1e-13 * scale:  # the incumbent meets the bound: optimal
        return incumbent
    found = _core_search(q, hull, k, base, rc, z_lr, incumbent, budget, tol)
    if found is not None:
        return found
    near = keep & (rc <= z_inc - z_lr + tol)  # [L, C]
    near[np.arange(p.shape[0]), incumbent] = True  # holds in exact arithmetic; kept for floats
    choice = _solve(p.restricted(near), b)
    if choice is None or choice_loss(p.loss, choice) > z_inc:
        return incumbent
    return choice


def _core_search(
    q: _Problem,
    hull: _Hull,
    k: int,
    base: np.ndarray,
    rc: np.ndarray,
    z_lr: float,
    incumbent: np.ndarray,
    budget: float,
    tol: float,
) -> np.ndarray | None:
    """Exact search over the layers still open after reduced-cost fixing (all others stay at
    their hull choice ``base``): a dynamic programme over partial plans, the largest layers
    first. A partial plan is (extra cost, extra loss) against ``base`` over the layers done;
    it is dropped when another is no worse in both, or when its loss plus the LP bound of the
    layers not yet done (their hull moves from ``base``: upgrades by falling slope into the
    slack, or downgrades by rising slope out of an overdraft) cannot beat the incumbent. Every
    complete plan that fits improves the incumbent, which shrinks the gap and the candidates of
    the layers that follow. -> the optimal choice [L], or None past ``_MAX_STATES`` plans."""
    L = q.shape[0]
    ar = np.arange(L)
    loss, cost = q.loss, q.cost[0]  # [L, C], inf outside keep
    base_loss = float(loss[ar, base].sum())
    base_cost = float(cost[ar, base].sum())
    z_inc = choice_loss(loss, incumbent)
    other = rc.copy()
    other[ar, base] = np.inf
    open_ = np.flatnonzero(other.min(axis=1) <= z_inc - z_lr + tol)
    if open_.size == 0:
        return incumbent
    move = np.where(
        np.isfinite(other[open_]), np.abs(cost[open_] - cost[open_, base[open_], None]), 0
    )
    order = open_[np.argsort(-move.max(axis=1), kind="stable")]  # largest cost moves first
    rank = np.full(L, -1)
    rank[order] = np.arange(order.size)
    seg_rank = rank[hull.seg_layer]  # [S]; -1: layer fixed at base
    up = np.arange(k, hull.slope.size)
    up = up[seg_rank[up] >= 0]  # upgrades from base, falling slope
    down = np.arange(k - 1, -1, -1)
    down = down[seg_rank[down] >= 0]  # downgrades to base's left, rising slope
    cost_tol = 1e-9 * (abs(budget) + abs(base_cost))
    d_cost, d_loss = np.zeros(1), np.zeros(1)  # [P] partial plans
    trail: list[tuple[int, np.ndarray, np.ndarray]] = []  # (layer, parent plan, column)
    for i, lay in enumerate(order):
        cols = np.flatnonzero(rc[lay] <= z_inc - z_lr + tol)
        cols = np.union1d(cols, [base[lay]])
        if cols.size == 1:
            continue  # no candidate but base can still beat the incumbent
        u, d = up[seg_rank[up] > i], down[seg_rank[down] > i]
        up_cost = np.concatenate([[0.0], np.cumsum(hull.seg_cost[u])])
        up_save = np.concatenate([[0.0], np.cumsum(hull.seg_save[u])])
        dn_cost = np.concatenate([[0.0], np.cumsum(hull.seg_cost[d])])
        dn_loss = np.concatenate([[0.0], np.cumsum(hull.seg_save[d])])
        n_cost = (d_cost[:, None] + (cost[lay, cols] - cost[lay, base[lay]])).ravel()  # [P*c]
        n_loss = (d_loss[:, None] + (loss[lay, cols] - loss[lay, base[lay]])).ravel()
        slack = budget - base_cost - n_cost
        rest = np.where(
            slack >= 0, -np.interp(slack, up_cost, up_save), np.interp(-slack, dn_cost, dn_loss)
        )
        rest[-slack > dn_cost[-1] + cost_tol] = np.inf  # cannot shed enough cost
        idx = np.flatnonzero(base_loss + n_loss + rest <= z_inc + tol)
        if idx.size == 0:
            break  # nothing left can beat the incumbent
        idx = idx[np.lexsort((n_loss[idx], n_cost[idx]))]  # by cost, then loss
        nl = n_loss[idx]
        keep_plan = np.ones(idx.size, dtype=bool)
        keep_plan[1:] = nl[1:] < np.minimum.accumulate(nl)[:-1]  # drop dominated plans
        idx = idx[keep_plan]
        d_cost, d_loss = n_cost[idx], n_loss[idx]
        trail.append((int(lay), idx // cols.size, cols[idx % cols.size]))
        if d_cost.size > _MAX_STATES:
            return None
        fits = np.flatnonzero(base_cost + d_cost <= budget)
        if fits.size and base_loss + d_loss[fits].min() < z_inc:
            choice = base.copy()
            j = int(fits[np.argmin(d_loss[fits])])
            for layer, parent, col in reversed(trail):
                choice[layer] = col[j]
                j = int(parent[j])
            if _totals(q.cost, choice)[0] <= budget:  # the exact sum, as for every answer
                incumbent, z_inc = choice, choice_loss(loss, choice)
    return incumbent


def pareto_choices(
    loss: ArrayLike,
    cost: ArrayLike,
    budgets: ArrayLike,
    *,
    pinned: Mapping[int, int] | None = None,
) -> list[np.ndarray]:
    """Exact choices for many budgets in one call (the Pareto front of loss against cost).

    Work shared across budgets: dominated candidates (loss and every cost >= another's) are
    dropped once; with one budget row the layers' lower convex hulls are built once and each
    budget is placed on them by bisection (a hull choice is optimal for its own cost). Between
    hull breakpoints the LP bound and an incumbent fix every layer whose other candidates
    cannot help (reduced-cost fixing), and the few layers left open are searched exactly by a
    dynamic programme over partial plans with LP-bound pruning (``_core_search``); HiGHS
    takes a budget only if that search grows past ``_MAX_STATES`` plans. (A MILP on the open
    layers is exact too but costs 0.1-1 s a budget here: HiGHS spends it finding an incumbent,
    and ``scipy.optimize.milp`` cannot be handed one.) With several budget rows each budget is
    one MILP on the pruned candidates. Every answer has the optimal loss of ``solve_choice``
    at that budget, and the front is monotone: a budget >= another (every row) never gets a
    larger loss.

    Args:
        loss: [L, C] (inf: not allowed).
        cost: [L, C] or [M, L, C].
        budgets: [K] numbers for cost [L, C], or [K, M] for cost [M, L, C].
        pinned: layer index -> forced column (the same for every budget).

    Returns:
        K int64 arrays [L], in the order of ``budgets``.

    Raises:
        ValueError: as ``solve_choice`` (an infeasible budget gives the feasible range).

    Example:
        >>> loss = np.array([[4.0, 1.0, 0.0], [9.0, 3.0, 0.5]])
        >>> cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
        >>> [c.tolist() for c in pareto_choices(loss, cost, [4, 8, 12, 16])]
        [[0, 0], [1, 1], [1, 2], [2, 2]]
    """
    p = _problem(loss, cost, pinned)
    M = p.cost.shape[0]
    bs = np.asarray(budgets, dtype=np.float64)
    if bs.size == 0:
        return []
    want = (bs.shape[0], M) if p.stacked else (bs.shape[0],)
    if bs.shape != want:
        raise ValueError(
            f"budgets must have shape {want} for cost of shape "
            f"{(M, *p.shape) if p.stacked else p.shape}, got {bs.shape}"
        )
    bs = bs.reshape(-1, M)
    if np.isnan(bs).any():
        raise ValueError("budgets contain NaN")
    lo, _ = _ranges(p)
    for b in bs:  # an impossible budget fails before any solving, as in solve_choice
        if (b < lo).any() or p.shape[0] == 0 and (b < 0).any():
            raise _infeasible(p, b)
    if p.shape[0] == 0:
        return [np.zeros(0, dtype=np.int64) for _ in bs]
    keep = _prune_dominated(p)
    q = p.restricted(keep)
    hull = _hull(p, keep) if M == 1 else None
    binds_below = _ranges(q)[1][0]
    out = []
    for b in bs:
        if hull is not None and b[0] < binds_below:
            choice = _solve_on_hull(p, keep, hull, float(b[0]))
        else:
            choice = _solve(q, b)
        if choice is None:
            raise _infeasible(p, b, joint=True)
        out.append(choice.astype(np.int64))
    # monotone front: a budget that is >= another takes the other's choice if that one is better
    z = np.array([choice_loss(p.loss, c) for c in out])
    fixed = []
    for j in range(len(out)):
        below = np.flatnonzero((bs <= bs[j]).all(axis=1))
        i = below[np.argmin(z[below])]
        fixed.append(out[i] if z[i] < z[j] else out[j])
    return fixed


# ----- from a sensitivity table to a plan -----

# Bits and bytes a weight kept in full precision counts for (a layer pinned to None): the
# pipelines dq quantizes here hold fp32 weights.
FLOAT_WEIGHT_BITS = 32
# Bits a float activation counts for in an average-activation-bits budget (fp32 inputs).
FLOAT_ACT_BITS = 32
# Backends `plan` allocates for: "cpu" keeps the weight formats dq's CPU int8 engine runs with
# 8-bit activations (`dq.modules.runs_on_engine`); "any" keeps every candidate of the table.
BACKENDS = ("cpu", "any")


@dataclass(frozen=True)
class Budget:
    """What a plan may spend; every field given is one constraint, all must hold together.

    Args:
        avg_weight_bits: size-weighted average *nominal* weight bits over the table's layers
            (``sum bits_l * numel_l / sum numel_l``; int2 counts 2 although it is stored in a
            4-bit nibble; a float weight counts ``FLOAT_WEIGHT_BITS``).
        weight_bytes: total bytes of the table's layers as stored (`dq.storage.spec_nbytes`:
            codes, scales, zero points and activation parameters; float weights
            ``numel * FLOAT_WEIGHT_BITS / 8``).
        avg_act_bits: average activation bits over the table's layers, every layer counting
            once (the table records no activation sizes); float inputs count
            ``FLOAT_ACT_BITS``.
        bitops: ``sum numel_l * weight_bits * act_bits``: bit-operations per output position
            (the table records weight shapes, not activation sizes, so this is the per-position
            proxy of a layer's MACs x bits).
        latency_s: seconds spent in the table's layers per UNet call, measured on this
            machine: ``sum latency[l, column]`` from a `dq.latency.LatencyTable` (pass it to
            `plan` as ``latency=``; columns not measured are refused).

    Example:
        >>> Budget(avg_weight_bits=4).label()
        'avg_weight_bits=4'
    """

    avg_weight_bits: float | None = None
    weight_bytes: float | None = None
    avg_act_bits: float | None = None
    bitops: float | None = None
    latency_s: float | None = None

    def __post_init__(self) -> None:
        given = self.items()
        if not given:
            raise ValueError(
                "a Budget needs at least one of avg_weight_bits, weight_bytes, avg_act_bits, "
                "bitops, latency_s"
            )
        for k, v in given:
            if not isinstance(v, int | float | np.integer | np.floating) or not np.isfinite(v):
                raise ValueError(f"Budget {k}={v!r}: give a finite number")

    def items(self) -> list[tuple[str, float]]:
        """(field, value) of every constraint given, in field order."""
        names = ("avg_weight_bits", "weight_bytes", "avg_act_bits", "bitops", "latency_s")
        return [(k, float(getattr(self, k))) for k in names if getattr(self, k) is not None]

    def label(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.items())


def backend_weight_formats(candidates: Sequence[str], backend: str, act: str) -> list[str]:
    """The weight candidates ``backend`` executes fast with activations ``act``.

    "cpu": those for which ``runs_on_engine(LayerSpec(w, "channel", act=act))`` holds, i.e.
    signed INT and the FP formats whose grid is an int8 code times a power of two (FP4 E2M1,
    FP4 E3M0, FP6 E2M3), with an 8-bit engine activation; "any": every candidate.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    if backend == "any":
        return list(candidates)
    from dq.config import LayerSpec
    from dq.modules import ENGINE_ACT_FORMATS, runs_on_engine

    if act not in ENGINE_ACT_FORMATS:
        raise ValueError(
            f"backend 'cpu' runs activations {ENGINE_ACT_FORMATS} on its int8 engine, not "
            f"{act!r}; use act='uint8' or backend='any'"
        )
    return [w for w in candidates if runs_on_engine(LayerSpec(w, "channel", act=act))]


def plan(
    table,
    budget: Budget,
    *,
    backend: str = "cpu",
    act: str = "uint8",
    pin_fp: float = 0.01,
    pinned: Mapping[str, object] | None = None,
    latency=None,
):
    """A mixed-precision `QuantConfig` from a `dq.sensitivity.SensitivityTable`: one exact
    program over every layer of both groups (content and quality) with the table's normalised
    losses (predicted image MSE against full precision).

    Candidates of a layer: pairs (weight format w, activation a) with w among the table's
    weight candidates the backend runs fast (`backend_weight_formats`) and a = ``act``. The
    loss of a pair is ``loss(weight w) + loss(act a)``: weight and activation errors of a layer
    are taken to add, as errors of different layers do (the table scores them separately).
    ``pin_fp`` keeps the most sensitive fraction of activation layers (by their loss at
    ``act``; ``ceil(pin_fp * L)`` layers) with float inputs, weights still allocated (MixDQ
    keeps ~1 % in FP16). Float activations cost nothing in bytes (no activation parameters)
    and ``FLOAT_ACT_BITS`` in the act-bits and bitops budgets.

    Args:
        table: the sensitivity table (its weight and act items for ``act``).
        budget: a `Budget` (one or more constraints).
        backend: "cpu" (formats dq's CPU int8 engine runs with 8-bit activations) or "any".
        act: the activation format of every layer not pinned (a table act candidate).
        pin_fp: fraction of activation layers kept in float, most sensitive first.
        pinned: layer name -> `LayerSpec` (one of its candidates, or with ``act=None`` for
            float inputs) or None (full precision weights and inputs), forced.
        latency: a `dq.latency.LatencyTable` of the same UNet, needed by a ``latency_s``
            budget (it must hold every layer and every column the plan may take).

    Returns:
        `QuantConfig(default=None, layers={every table layer: spec}, skip=())` named
        ``"mixed-<budget>@<backend>"`` (the backend it was allocated for).

    Raises:
        ValueError: an unknown backend or act, a pin that is not a candidate, or a budget that
            cannot be met (the message gives the feasible range of each constraint, from the
            solver, in the budget's own units).

    Example:
        >>> cfg = plan(table, Budget(weight_bytes=2.5e6))
        >>> cfg.name
        'mixed-weight_bytes=2.5e+06@cpu'
    """
    import math

    from dq import formats
    from dq.config import LayerSpec, QuantConfig
    from dq.storage import spec_nbytes

    if not 0 <= pin_fp < 1:
        raise ValueError(f"pin_fp={pin_fp!r}: give a fraction in [0, 1)")
    if act not in table.candidates("act"):
        raise ValueError(
            f"act={act!r} is not an activation candidate of the table {table.candidates('act')}"
        )
    wforms = backend_weight_formats(table.candidates("weight"), backend, act)
    if not wforms:
        raise ValueError(f"no weight candidate of the table runs on backend {backend!r}")
    gran, method = table.settings["weight_granularity"], table.settings["weight_method"]
    names = sorted(table.layers)
    if not names:
        raise ValueError("the table has no layers")
    pinned = dict(pinned or {})
    unknown = sorted(set(pinned) - set(names))
    if unknown:
        raise ValueError(f"pinned layers not in the table: {unknown[:5]}")

    def item_loss(layer, kind, cand):
        try:
            return table.loss(table.item(layer, kind, cand))
        except ValueError:
            return math.inf

    # activation layers kept float: the most sensitive at `act`
    act_loss = {n: item_loss(n, "act", act) for n in names}
    n_fp = math.ceil(pin_fp * len(names) - 1e-9)
    fp_act = set(sorted(names, key=lambda n: -act_loss[n])[:n_fp])

    # columns: every (w, act) pair, every (w, float) pair, then full precision
    cols: list[tuple[str | None, str | None]] = (
        [(w, act) for w in wforms] + [(w, None) for w in wforms] + [(None, None)]
    )
    L, C = len(names), len(cols)
    numel = np.array([float(table.layers[n]["numel"]) for n in names])
    loss = np.full((L, C), np.inf)
    wbits = np.zeros((L, C))
    abits = np.zeros((L, C))
    nbytes = np.zeros((L, C))
    for i, n in enumerate(names):
        shape = tuple(table.layers[n]["shape"])
        for j, (w, a) in enumerate(cols):
            wl = 0.0 if w is None else item_loss(n, "weight", w)
            al = 0.0 if a is None else act_loss[n]
            loss[i, j] = wl + al
            wbits[i, j] = FLOAT_WEIGHT_BITS if w is None else formats.get(w).bits
            abits[i, j] = FLOAT_ACT_BITS if a is None else formats.get(a).bits
            nbytes[i, j] = (numel[i] * FLOAT_WEIGHT_BITS / 8 if w is None
                            else spec_nbytes(LayerSpec(w, gran, method, act=a), shape))  # fmt: skip
    # which columns a layer may take: (w, act) normally, (w, float) when pinned by pin_fp,
    # its pin when the caller pinned it
    allowed = np.zeros((L, C), dtype=bool)
    for i, n in enumerate(names):
        if n in pinned:
            spec = pinned[n]
            key = (None, None) if spec is None else (spec.weight, spec.act)
            if key not in cols or (
                spec is not None and (spec.weight_granularity, spec.weight_method) != (gran, method)
            ):
                raise ValueError(
                    f"layer {n!r} is pinned to {spec!r}, which is not a candidate on backend "
                    f"{backend!r} (weights {wforms}, activations {act!r} or float)"
                )
            allowed[i, cols.index(key)] = True
        else:
            for j, (w, a) in enumerate(cols):
                allowed[i, j] = w is not None and (a is None) == (n in fp_act)
    loss = np.where(allowed, loss, np.inf)
    seconds = None
    if budget.latency_s is not None:
        if latency is None:
            raise ValueError(
                "a latency_s budget needs measured latencies: pass latency=dq.latency.measure(unet, "
                "columns, dq.latency.unet_inputs(unet)) (or LatencyTable.from_json of a saved one)"
            )
        seconds = np.zeros((L, C))
        for i, n in enumerate(names):
            for j, (w, a) in enumerate(cols):
                if allowed[i, j]:
                    seconds[i, j] = latency.seconds(n, w, a)
    elif latency is not None:
        raise ValueError("latency= is used by a Budget(latency_s=...) only; add one or drop latency=")
    # budget rows: sums of per-layer terms; averages are summed (bits x params, act bits) and
    # their budget multiplied by the divisor, so HiGHS works on well-scaled integers
    rows, values, scale = [], [], []
    for k, v in budget.items():
        if k == "avg_weight_bits":
            rows.append(wbits * numel[:, None])
            scale.append(float(numel.sum()))
        elif k == "weight_bytes":
            rows.append(nbytes)
            scale.append(1.0)
        elif k == "avg_act_bits":
            rows.append(abits)
            scale.append(float(L))
        elif k == "latency_s":  # whole nanoseconds: integer costs, as bytes, solve exactly
            rows.append(np.round(seconds * 1e9))
            scale.append(1e9)
        else:
            rows.append(wbits * abits * numel[:, None])
            scale.append(1.0)
        values.append(v * scale[-1])
    cost = np.where(allowed[None], np.stack(rows), np.inf)
    try:
        choice = solve_choice(loss, cost, values)
    except ValueError:
        lo, hi = feasible_range(loss, cost)
        rng = "; ".join(
            f"{k} {v:.10g}: feasible from {lo[m] / scale[m]:.10g}, binds below {hi[m] / scale[m]:.10g}"
            for m, (k, v) in enumerate(budget.items())
        )
        joint = " (each alone can be met, not together)" if (np.array(values) >= lo).all() else ""
        raise ValueError(
            f"{budget.label()} cannot be met on backend {backend!r}{joint}: {rng}"
        ) from None
    layers = {}
    for i, n in enumerate(names):
        w, a = cols[choice[i]]
        layers[n] = None if w is None else LayerSpec(w, gran, method, act=a)
    return QuantConfig(
        default=None, layers=layers, skip=(), name=f"mixed-{budget.label()}@{backend}"
    )


def plan_summary(table, config, latency=None) -> dict:
    """Totals of a plan over the table's layers: average nominal weight bits, weight bytes
    (as `Budget` counts them), predicted loss (sum of the normalised losses), layers with float
    activations, the weight formats used, and with a `dq.latency.LatencyTable` the predicted
    seconds in those layers (``latency_s``)."""
    import math

    from dq import formats
    from dq.storage import spec_nbytes

    numel = bits = nbytes = loss = 0.0
    fp_act, used = 0, {}
    for n, info in table.layers.items():
        spec = config.layers.get(n)
        k = float(info["numel"])
        numel += k
        if spec is None:
            bits += FLOAT_WEIGHT_BITS * k
            nbytes += FLOAT_WEIGHT_BITS * k / 8
            fp_act += 1
            continue
        bits += formats.get(spec.weight).bits * k
        nbytes += spec_nbytes(spec, tuple(info["shape"]))
        used[spec.weight] = used.get(spec.weight, 0) + 1
        for kind, cand in (("weight", spec.weight), ("act", spec.act)):
            if cand is None:
                continue
            try:
                loss += table.loss(table.item(n, kind, cand))
            except ValueError:
                loss = math.inf
        fp_act += spec.act is None
    out = {
        "avg_weight_bits": bits / numel,
        "weight_bytes": nbytes,
        "predicted_loss": loss,
        "float_act_layers": fp_act,
        "weight_formats": dict(sorted(used.items())),
    }
    if latency is not None:
        out["latency_s"] = latency.total({n: config.layers.get(n) for n in table.layers})
    return out


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """Register `dq allocate TABLE --budget ... --out PLAN.json`."""
    p = subparsers.add_parser(
        "allocate", help="pick a format per layer from a sensitivity table under a budget",
        description="One exact integer program over every layer (dq.allocate.plan); prints the "
                    "plan summary and writes the plan JSON (load it with dq quantize --config).",
    )
    p.add_argument("table", help="a table.json written by dq sensitivity")
    g = p.add_argument_group("budget (one or more)")
    g.add_argument("--avg-weight-bits", type=float, default=None, help="size-weighted nominal weight bits")
    g.add_argument("--weight-bytes", type=float, default=None, help="bytes of codes, scales, zero points")
    g.add_argument("--avg-act-bits", type=float, default=None, help="average activation bits over layers")
    g.add_argument("--latency-s", type=float, default=None,
                   help="seconds in the quantizable layers per UNet call (needs --latency)")
    p.add_argument("--latency", default=None, metavar="LATENCY.json",
                   help="per-layer latencies measured on this machine (dq.latency.measure(...).to_json())")
    p.add_argument("--backend", choices=BACKENDS, default="cpu", help="formats the target runs fast (default: cpu)")
    p.add_argument("--act", default="uint8", help="activation format of every layer (default: uint8)")
    p.add_argument("--pin-fp", type=float, default=0.01, help="most sensitive fraction of activation layers kept float")
    p.add_argument("--out", default=None, help="write the plan (QuantConfig JSON) here")
    p.set_defaults(func=_cli_run)


def _cli_run(args) -> int:
    from pathlib import Path

    from dq.sensitivity import SensitivityTable

    path = Path(args.table)
    if not path.is_file():
        raise SystemExit(f"dq allocate: TABLE {args.table}: no such file (write one with dq sensitivity)")
    try:
        table = SensitivityTable.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"dq allocate: TABLE {args.table} is not a sensitivity table: {e}") from None
    given = (args.avg_weight_bits, args.weight_bytes, args.avg_act_bits, args.latency_s)
    if all(v is None for v in given):
        raise SystemExit("dq allocate: give a budget: --avg-weight-bits, --weight-bytes, "
                         "--avg-act-bits or --latency-s")  # fmt: skip
    latency = None
    if (args.latency_s is None) != (args.latency is None):
        raise SystemExit("dq allocate: --latency-s and --latency go together (a budget in seconds "
                         "needs the measured per-layer latencies, and they serve only that budget)")  # fmt: skip
    if args.latency is not None:
        from dq.latency import LatencyTable

        lpath = Path(args.latency)
        if not lpath.is_file():
            raise SystemExit(f"dq allocate: --latency {args.latency}: no such file")
        try:
            latency = LatencyTable.from_json(lpath.read_text())
        except ValueError as e:
            raise SystemExit(f"dq allocate: --latency {args.latency}: {e}") from None
    budget = Budget(avg_weight_bits=args.avg_weight_bits, weight_bytes=args.weight_bytes,
                    avg_act_bits=args.avg_act_bits, latency_s=args.latency_s)
    try:
        cfg = plan(table, budget, backend=args.backend, act=args.act, pin_fp=args.pin_fp, latency=latency)
    except ValueError as e:
        raise SystemExit(f"dq allocate: {e}") from None
    s = plan_summary(table, cfg, latency)
    groups: dict[str, dict[str, int]] = {}
    for n, spec in cfg.layers.items():
        g = groups.setdefault(table.layers[n]["group"], {})
        key = "float" if spec is None else f"{spec.weight}/{spec.act or 'float'}"
        g[key] = g.get(key, 0) + 1
    print(f"dq: plan {cfg.name} for {len(cfg.layers)} layers")
    for g, counts in sorted(groups.items()):
        print(f"  {g:8s} " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    print(f"  average weight bits {s['avg_weight_bits']:.3f}, weight bytes {s['weight_bytes']:.0f}, "
          f"predicted loss {s['predicted_loss']:.3e}, float activations {s['float_act_layers']}"
          + (f", predicted {s['latency_s'] * 1e3:.2f} ms in these layers" if "latency_s" in s else ""))
    if args.out:
        Path(args.out).write_text(cfg.to_json())
        print(f"dq: wrote {args.out}")
    return 0
