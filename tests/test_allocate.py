"""dq.allocate: the exact solver against brute force, budgets, the Pareto sweep, the
equal-marginal (Lagrangian) allocation, and input errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dq.allocate import (
    choice_cost,
    choice_loss,
    equal_marginal_choice,
    feasible_range,
    pareto_choices,
    solve_choice,
)

REL = 1e-9  # optimal losses agree to this relative tolerance (HiGHS's gap is ~1e-12 of a layer)


def brute_force(loss, cost, budget, pinned=None):
    """Lowest total loss over every combination (C ** L of them) that fits; inf if none."""
    cost = cost if cost.ndim == 3 else cost[None]
    budget = np.atleast_1d(np.asarray(budget, dtype=np.float64))
    loss = loss.copy()
    for layer, col in (pinned or {}).items():
        keep = loss[layer, col]
        loss[layer] = np.inf
        loss[layer, col] = keep
    tot_loss = np.zeros(())
    tot_cost = [np.zeros(()) for _ in cost]
    for lay in range(loss.shape[0]):  # outer sums: one axis per layer
        tot_loss = tot_loss[..., None] + loss[lay]
        tot_cost = [t[..., None] + c[lay] for t, c in zip(tot_cost, cost, strict=True)]
    ok = np.ones(tot_loss.shape, dtype=bool)
    for t, b in zip(tot_cost, budget, strict=True):
        ok &= t <= b + 1e-12 * abs(b)  # these sums run in another order than np.sum's
    return float(np.where(ok, tot_loss, np.inf).min())


def random_instance(rng, L, C, p_inf=0.0, integer=False, rows=1):
    """loss [L, C] and cost [rows, L, C] (squeezed when rows == 1); every layer keeps at least
    one allowed candidate."""
    loss = rng.uniform(0, 10, (L, C))
    cost = (
        rng.integers(1, 6, (rows, L, C)).astype(float)
        if integer
        else rng.uniform(1, 5, (rows, L, C))
    )
    if p_inf:
        off = rng.random((L, C)) < p_inf
        off[np.arange(L), rng.integers(0, C, L)] = False
        where_cost = rng.random((L, C)) < 0.5
        loss[off & ~where_cost] = np.inf
        cost[:, off & where_cost] = np.inf
    return loss, (cost[0] if rows == 1 else cost)


def budget_between(rng, loss, cost, pinned=None):
    lo, hi = feasible_range(loss, cost, pinned=pinned)
    return lo + rng.uniform(-0.05, 1.05) * (hi - lo)


def assert_fits(cost, choice, budget):
    tot = np.atleast_1d(choice_cost(cost, choice))
    assert (tot <= np.atleast_1d(budget)).all(), (tot, budget)


# ----- solve_choice against brute force -----


@pytest.mark.parametrize(
    "seed, p_inf, integer",
    [(10, 0.0, False), (11, 0.3, False), (12, 0.0, True), (13, 0.3, True)],
    ids=["plain", "inf", "integer-ties", "inf-integer"],
)
def test_solve_choice_equals_brute_force(seed, p_inf, integer):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        L, C = int(rng.integers(1, 11)), int(rng.integers(1, 5))
        loss, cost = random_instance(rng, L, C, p_inf, integer)
        budget = budget_between(rng, loss, cost)
        if integer:
            budget = float(np.round(budget))  # budgets met exactly by many choices
        lo, _ = feasible_range(loss, cost)
        if budget < lo:
            continue
        choice = solve_choice(loss, cost, budget)
        assert choice.shape == (L,) and choice.dtype == np.int64
        assert np.isfinite(loss[np.arange(L), choice]).all()
        assert np.isfinite(cost[np.arange(L), choice]).all()
        assert_fits(cost, choice, budget)
        assert choice_loss(loss, choice) == pytest.approx(brute_force(loss, cost, budget), rel=REL)


def test_solve_choice_pinned_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(40):
        L, C = int(rng.integers(2, 11)), int(rng.integers(2, 5))
        loss, cost = random_instance(rng, L, C, p_inf=0.2, integer=bool(rng.integers(2)))
        layers = rng.choice(L, size=int(rng.integers(1, L)), replace=False)
        pinned = {}
        for lay in layers:
            ok = np.flatnonzero(np.isfinite(loss[lay]) & np.isfinite(cost[lay]))
            pinned[int(lay)] = int(rng.choice(ok))
        budget = budget_between(rng, loss, cost, pinned)
        if budget < feasible_range(loss, cost, pinned=pinned)[0]:
            continue
        choice = solve_choice(loss, cost, budget, pinned=pinned)
        assert all(choice[k] == v for k, v in pinned.items())
        assert_fits(cost, choice, budget)
        want = brute_force(loss, cost, budget, pinned)
        assert choice_loss(loss, choice) == pytest.approx(want, rel=REL)


def test_two_budgets_equal_brute_force():
    rng = np.random.default_rng(2)
    solved = 0
    for _ in range(60):
        L, C = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        loss, cost = random_instance(rng, L, C, p_inf=0.2, integer=bool(rng.integers(2)), rows=2)
        lo, hi = feasible_range(loss, cost)
        budget = lo + rng.uniform(0.0, 1.0, 2) * (hi - lo)
        want = brute_force(loss, cost, budget)
        if not np.isfinite(want):
            with pytest.raises(ValueError, match="cannot be met together"):
                solve_choice(loss, cost, budget)
            continue
        choice = solve_choice(loss, cost, list(budget))
        assert_fits(cost, choice, budget)  # both rows
        assert choice_loss(loss, choice) == pytest.approx(want, rel=REL)
        solved += 1
    assert solved > 30


def test_budgets_respected_exactly_at_scale():
    """Byte-sized costs (up to ~1e7 per layer), continuous: HiGHS's tolerance alone would let
    a choice overshoot by a few bytes; the returned choice never does."""
    rng = np.random.default_rng(3)
    L, bits = 120, np.array([2, 3, 4, 6, 8.0])
    n = np.exp(rng.uniform(np.log(1e4), np.log(1e7), L))
    cost = n[:, None] * bits / 8 + 2 * np.sqrt(n)[:, None] * rng.uniform(0.9, 1.1, (L, 5))
    loss = np.exp(rng.normal(0, 1, L))[:, None] * 4.0**-bits * np.exp(rng.normal(0, 0.3, (L, 5)))
    lo, hi = feasible_range(loss, cost)
    budgets = np.linspace(lo, hi, 12)
    for b, c in zip(budgets, pareto_choices(loss, cost, budgets), strict=True):
        assert_fits(cost, c, b)
    for b in budgets[1:-1:3]:
        assert_fits(cost, solve_choice(loss, cost, b), b)
    two = np.stack([cost, rng.uniform(0.5, 1.5, (L, 5)) * bits])  # bytes and activation bits
    b2 = [lo + 0.4 * (hi - lo), float(two[1].min(1).sum() + 0.5 * np.ptp(two[1], 1).sum())]
    assert_fits(two, solve_choice(loss, two, b2), b2)


def test_budget_edges():
    loss = np.array([[3.0, 1.0, 0.0], [5.0, 2.0, 2.0]])
    cost = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 3.0]])
    lo, hi = feasible_range(loss, cost)
    assert (lo, hi) == (2.0, 6.0)  # layer 1: column 2 ties column 1 on loss and costs more
    assert solve_choice(loss, cost, lo).tolist() == [0, 0]
    assert solve_choice(loss, cost, np.inf).tolist() == [2, 1]
    assert solve_choice(loss, cost, 1e9).tolist() == [2, 1]
    one = solve_choice(loss[:, :1], cost[:, :1], 5.0)  # a single candidate each
    assert one.tolist() == [0, 0]
    assert solve_choice(np.zeros((0, 3)), np.zeros((0, 3)), 0.0).shape == (0,)


# ----- infeasible budgets -----


def test_infeasible_budget_states_the_range():
    loss = np.array([[3.0, 1.0, np.inf], [5.0, 2.0, 0.5]])
    cost = np.array([[1.5, 2.0, 4.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError) as e:
        solve_choice(loss, cost, 2.0)
    msg = str(e.value)
    assert "budget 2 is infeasible" in msg
    assert "lowest achievable cost is 2.5" in msg and "[2.5, 5]" in msg
    assert "from 5 (the cost of the loss-optimal choice)" in msg
    with pytest.raises(ValueError, match=re.escape("lowest achievable cost is 4.5")):
        solve_choice(loss, cost, 3.0, pinned={1: 2})  # the pin raises the floor
    with pytest.raises(ValueError, match="infeasible"):
        pareto_choices(loss, cost, [3.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="infeasible"):
        equal_marginal_choice(loss, cost, 1.0)


def test_infeasible_two_budgets_give_each_range():
    loss = np.array([[2.0, 0.0], [2.0, 0.0]])
    cost = np.array([[[1.0, 3.0], [1.0, 3.0]], [[3.0, 1.0], [3.0, 1.0]]])  # rows pull apart
    with pytest.raises(ValueError, match=r"row 1: budget 1, feasible from 2"):
        solve_choice(loss, cost, [10.0, 1.0])
    with pytest.raises(ValueError, match="cannot be met together") as e:
        solve_choice(loss, cost, [3.0, 3.0])  # each row alone fits; together no choice does
    assert "row 0: budget 3, feasible from 2, binds below 6" in str(e.value)


# ----- pareto_choices -----


def front_instance(rng, L=60, C=6, p_inf=0.05):
    """Losses falling convexly in bits with noise (so hulls skip points), byte-like costs."""
    bits = np.sort(rng.choice(np.arange(2, 9), C, replace=False)).astype(float)
    n = np.exp(rng.uniform(np.log(1e2), np.log(1e5), L))
    cost = n[:, None] * bits / 8 + 4.0
    loss = np.exp(rng.normal(0, 1, L))[:, None] * 2.0**-bits * np.exp(rng.normal(0, 0.4, (L, C)))
    off = rng.random((L, C)) < p_inf
    off[:, 0] = False
    loss[off] = np.inf
    return loss, cost


def test_pareto_equals_solve_choice_and_is_monotone():
    rng = np.random.default_rng(4)
    loss, cost = front_instance(rng)
    lo, hi = feasible_range(loss, cost)
    budgets = np.concatenate([np.linspace(lo, hi * 1.1, 25), rng.uniform(lo, hi, 5)])
    front = pareto_choices(loss, cost, budgets)
    assert len(front) == len(budgets)
    z = np.array([choice_loss(loss, c) for c in front])
    for b, c, zb in zip(budgets, front, z, strict=True):
        assert_fits(cost, c, b)
        assert zb == pytest.approx(choice_loss(loss, solve_choice(loss, cost, b)), rel=REL)
    order = np.argsort(budgets, kind="stable")
    assert (np.diff(z[order]) <= 0).all()  # more budget never costs loss


def test_pareto_small_instances_equal_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(25):
        L, C = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        loss, cost = random_instance(rng, L, C, p_inf=0.2, integer=bool(rng.integers(2)))
        lo, hi = feasible_range(loss, cost)
        budgets = np.unique(np.round(np.linspace(lo, hi + 1, 6), 3))
        pinned = {0: int(np.flatnonzero(np.isfinite(loss[0] + cost[0]))[0])} if L > 1 else None
        lo_p, _ = feasible_range(loss, cost, pinned=pinned)
        budgets = budgets[budgets >= lo_p]
        z_prev = np.inf
        for b, c in zip(budgets, pareto_choices(loss, cost, budgets, pinned=pinned), strict=True):
            assert_fits(cost, c, b)
            z = choice_loss(loss, c)
            assert z == pytest.approx(brute_force(loss, cost, b, pinned), rel=REL)
            assert z <= z_prev
            z_prev = z


def test_pareto_two_budgets():
    rng = np.random.default_rng(6)
    loss, cost = front_instance(rng, L=30, C=4, p_inf=0.0)
    act = rng.uniform(0.5, 2.0, (30, 4)) * np.array([4.0, 8.0, 8.0, 16.0])  # activation bits
    two = np.stack([cost, act])
    lo, hi = feasible_range(loss, two)
    budgets = np.stack([lo + f * (hi - lo) for f in np.linspace(0.2, 1.0, 6)])  # [K, 2]
    budgets[3, 1] = hi[1] * 2  # one row no longer binds
    front = pareto_choices(loss, two, budgets)
    for b, c in zip(budgets, front, strict=True):
        assert_fits(two, c, b)
        assert choice_loss(loss, c) == pytest.approx(
            choice_loss(loss, solve_choice(loss, two, b)), rel=REL
        )
    with pytest.raises(ValueError, match=r"budgets must have shape \(6, 2\)"):
        pareto_choices(loss, two, budgets[:, 0])


# ----- equal-marginal (Lagrangian) allocation -----


def test_equal_marginal_bounds_the_optimum_and_meets_it_on_the_hull():
    rng = np.random.default_rng(7)
    loss, cost = front_instance(rng, L=40, C=5)
    lo, hi = feasible_range(loss, cost)
    ar = np.arange(40)
    lams = []
    met = 0
    for b in np.linspace(lo, hi, 15):
        choice, lam = equal_marginal_choice(loss, cost, b)
        assert_fits(cost, choice, b)
        z_em, z_opt = choice_loss(loss, choice), choice_loss(loss, solve_choice(loss, cost, b))
        assert z_em >= z_opt * (1 - REL)
        # every layer minimises loss + lam * cost: the marginals are equal at lam
        lagr = np.where(np.isfinite(loss), loss + lam * cost, np.inf)
        assert np.allclose(lagr[ar, choice], lagr.min(1), rtol=1e-9, atol=1e-15)
        # at its own cost (a hull breakpoint) the Lagrangian choice is optimal
        own = choice_cost(cost, choice)
        z_own = choice_loss(loss, solve_choice(loss, cost, own))
        assert z_em == pytest.approx(z_own, rel=REL)
        met += z_em <= z_opt * (1 + REL)
        lams.append(lam)
    assert (np.diff(lams) <= 0).all()  # more budget, cheaper marginal loss
    assert lams[-1] == 0.0  # at the loss-optimal cost the budget no longer binds
    assert met >= 2  # the two ends at least


def test_equal_marginal_example_and_pins():
    loss = np.array([[4.0, 1.0, 0.0], [9.0, 3.0, 0.5]])
    cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
    choice, lam = equal_marginal_choice(loss, cost, 9.0)
    assert choice.tolist() == [1, 1] and lam == 0.625  # layer 1's next step saves 2.5 / 4
    choice, _ = equal_marginal_choice(loss, cost, 12.0, pinned={0: 0})
    assert choice.tolist() == [0, 2]
    with pytest.raises(ValueError, match="one budget"):
        equal_marginal_choice(loss, np.stack([cost, cost]), [9.0, 9.0])


# ----- bad inputs -----


@pytest.mark.parametrize(
    "loss, cost, budget, pinned, match",
    [
        (np.ones(3), np.ones(3), 1.0, None, r"loss must be \[L, C\]"),
        (np.ones((2, 3)), np.ones((3, 2)), 1.0, None, r"cost must be \[L, C\] or \[M, L, C\]"),
        (np.ones((2, 3)), np.ones((1, 2, 2)), [1.0], None, "matching loss"),
        (np.array([[1.0, np.nan]]), np.ones((1, 2)), 1.0, None, r"loss has NaN .*\(0, 1\)"),
        (np.ones((1, 2)), np.array([[1.0, np.nan]]), 1.0, None, "cost has NaN"),
        (np.array([[1.0, -np.inf]]), np.ones((1, 2)), 1.0, None, "-inf"),
        (
            np.array([[1.0, 1.0], [np.inf, 1.0]]),
            np.array([[1.0, 1.0], [1.0, np.inf]]),
            5.0,
            None,
            r"1 layer\(s\) have no allowed candidate.*: 1",
        ),
        (np.ones((2, 2)), np.ones((2, 2)), [1.0, 2.0], None, "budget must be one number"),
        (np.ones((2, 2)), np.ones((2, 2, 2)), 3.0, None, "sequence of 2 numbers"),
        (np.ones((2, 2)), np.ones((2, 2)), np.nan, None, "budget is NaN"),
        (np.array([[1.0, np.inf]] * 2), np.ones((2, 2)), 5.0, {0: 1}, "pinned to column 1"),
        (np.ones((2, 2)), np.ones((2, 2)), 5.0, {2: 0}, r"pinned layer 2 .*\[0, 2\)"),
        (np.ones((2, 2)), np.ones((2, 2)), 5.0, {0: 5}, "pinned column 5"),
        (np.ones((2, 2)), np.ones((2, 2)), 5.0, {0: 1.0}, "pinned column 1.0"),
    ],
    ids=[
        "loss-1d",
        "cost-shape",
        "stacked-shape",
        "loss-nan",
        "cost-nan",
        "neg-inf",
        "no-candidate",
        "budget-vector",
        "budget-scalar-for-stacked",
        "budget-nan",
        "pin-to-inf",
        "pin-layer-range",
        "pin-column-range",
        "pin-non-int",
    ],
)
def test_bad_inputs_raise_clearly(loss, cost, budget, pinned, match):
    with pytest.raises(ValueError, match=match):
        solve_choice(loss, cost, budget, pinned=pinned)


def test_bad_sweep_inputs():
    loss, cost = np.ones((2, 2)), np.ones((2, 2))
    assert pareto_choices(loss, cost, []) == []
    with pytest.raises(ValueError, match="budgets contain NaN"):
        pareto_choices(loss, cost, [2.0, np.nan])
    with pytest.raises(ValueError, match=r"budgets must have shape \(1,\)"):
        pareto_choices(loss, cost, [[2.0]])


def test_pareto_falls_back_to_highs_when_the_core_search_grows(monkeypatch):
    """Past _MAX_STATES partial plans a budget goes to HiGHS on the open layers: same optimum."""
    import dq.allocate as A

    rng = np.random.default_rng(8)
    loss, cost = front_instance(rng, L=40, C=5)
    lo, hi = feasible_range(loss, cost)
    budgets = np.linspace(lo, hi, 9)
    want = [choice_loss(loss, c) for c in pareto_choices(loss, cost, budgets)]
    monkeypatch.setattr(A, "_MAX_STATES", 0)
    got = pareto_choices(loss, cost, budgets)
    for b, c, w in zip(budgets, got, want, strict=True):
        assert_fits(cost, c, b)
        assert choice_loss(loss, c) == pytest.approx(w, rel=REL)


# ----- plan: from a sensitivity table to a QuantConfig -----

WCANDS = ("int2", "int4", "int8", "fp4_e2m1", "fp8_e4m3")  # fp8_e4m3: not on the CPU engine


def synthetic_table(L=12, seed=0):
    """A hand-built SensitivityTable: L layers (content and quality), weight losses falling
    with bits, one act candidate, layer 3's activations far the most sensitive."""
    from dq.sensitivity import Item, SensitivityTable

    rng = np.random.default_rng(seed)
    bits = {"int2": 2, "int4": 4, "int8": 8, "fp4_e2m1": 4, "fp8_e4m3": 8}
    layers, items = {}, []
    for i in range(L):
        name = f"blocks.{i}.{'attn2.to_q' if i % 2 else 'conv1'}"
        group = "content" if i % 2 else "quality"
        shape = [int(rng.choice([16, 32, 64])), int(rng.choice([16, 32])), 1, 1]
        layers[name] = {
            "group": group,
            "shape": shape,
            "numel": shape[0] * shape[1],
            "type": "Conv2d",
        }
        scale = rng.uniform(0.1, 10)
        for w in WCANDS:
            err = scale * 4.0 ** -bits[w] * (0.5 if w.startswith("fp") else 1.0)
            m = {"unet_noise": err, "sqnr_db": -10 * np.log10(err)}
            if group == "content":
                m |= {"image_mse": 2 * err, "ssim": 1 - err}
            items.append(Item(name, "weight", w, group, m))
        a_err = 50.0 if i == 3 else rng.uniform(1e-4, 1e-3)
        m = {"unet_noise": a_err, "sqnr_db": -10 * np.log10(a_err)}
        if group == "content":
            m |= {"image_mse": 2 * a_err, "ssim": 1 - a_err}
        items.append(Item(name, "act", "uint8", group, m))
    settings = {"weight_candidates": list(WCANDS), "act_candidates": ["uint8"],
                "weight_granularity": "channel", "weight_method": "minmax"}  # fmt: skip
    return SensitivityTable(
        layers=layers, items=items, settings=settings, model="synthetic", gain=2.0
    )


def plan_bytes(table, cfg):
    from dq.storage import spec_nbytes

    return sum(spec_nbytes(cfg.layers[n], tuple(table.layers[n]["shape"])) for n in table.layers)


def test_plan_respects_a_bytes_budget_exactly_and_names_every_layer():
    from dq.allocate import Budget, plan, plan_summary
    from dq.config import LayerSpec
    from dq.storage import spec_nbytes

    table = synthetic_table()
    int4 = sum(
        spec_nbytes(LayerSpec("int4", act="uint8"), tuple(v["shape"]))
        for v in table.layers.values()
    )
    int8 = sum(
        spec_nbytes(LayerSpec("int8", act="uint8"), tuple(v["shape"]))
        for v in table.layers.values()
    )
    prev = np.inf
    for budget in np.linspace(int4, int8, 6):
        cfg = plan(table, Budget(weight_bytes=budget), pin_fp=0.0)
        assert set(cfg.layers) == set(table.layers) and cfg.default is None
        assert cfg.name == f"mixed-weight_bytes={budget:g}@cpu"
        assert plan_bytes(table, cfg) <= budget
        assert all(s.act == "uint8" for s in cfg.layers.values())
        s = plan_summary(table, cfg)
        assert s["weight_bytes"] == plan_bytes(table, cfg) and s["predicted_loss"] <= prev + 1e-12
        prev = s["predicted_loss"]
    # the summed loss is that of the exact solver on the same matrices (brute force, 12 layers
    # x 4 formats is too many: check against a smaller table)
    small = synthetic_table(L=5, seed=3)
    b = 0.5 * (plan_bytes(small, plan(small, Budget(weight_bytes=1e12), pin_fp=0.0)) +
               sum(spec_nbytes(LayerSpec("int4", act="uint8"), tuple(v["shape"])) for v in small.layers.values()))  # fmt: skip
    cfg = plan(small, Budget(weight_bytes=b), pin_fp=0.0)
    names = sorted(small.layers)
    forms = ["int2", "int4", "int8", "fp4_e2m1"]
    loss = np.array([[small.loss(small.item(n, "weight", w)) + small.loss(small.item(n, "act", "uint8"))
                      for w in forms] for n in names])  # fmt: skip
    cost = np.array([[spec_nbytes(LayerSpec(w, act="uint8"), tuple(small.layers[n]["shape"])) for w in forms]
                     for n in names])  # fmt: skip
    assert plan_summary(small, cfg)["predicted_loss"] == pytest.approx(
        brute_force(loss, cost, b), rel=REL
    )


def test_plan_limits_candidates_to_the_backend():
    from dq.allocate import Budget, backend_weight_formats, plan
    from dq.modules import runs_on_engine

    table = synthetic_table()
    assert backend_weight_formats(WCANDS, "cpu", "uint8") == ["int2", "int4", "int8", "fp4_e2m1"]
    big = Budget(avg_weight_bits=8)
    cpu = plan(table, big)  # fp8_e4m3 has the lowest loss at 8 bits but no CPU kernel
    assert all(runs_on_engine(s) for s in cpu.layers.values() if s.act is not None)
    assert {s.weight for s in cpu.layers.values()} == {"int8"}
    anyb = plan(table, big, backend="any")
    assert {s.weight for s in anyb.layers.values()} == {"fp8_e4m3"} and anyb.name.endswith("@any")
    with pytest.raises(ValueError, match="backend"):
        plan(table, big, backend="tpu")
    with pytest.raises(ValueError, match="uint8"):
        backend_weight_formats(WCANDS, "cpu", "uint4")


def test_plan_pins_the_most_sensitive_activations_to_float():
    from dq.allocate import Budget, plan

    table = synthetic_table(L=12)
    cfg = plan(table, Budget(avg_weight_bits=4), pin_fp=0.05)  # ceil(0.6) = 1 layer
    fp = [n for n, s in cfg.layers.items() if s.act is None]
    assert fp == ["blocks.3.attn2.to_q"]
    assert (
        len(
            [
                s
                for s in plan(table, Budget(avg_weight_bits=4), pin_fp=0.2).layers.values()
                if s.act is None
            ]
        )
        == 3
    )
    assert all(
        s.act == "uint8" for s in plan(table, Budget(avg_weight_bits=4), pin_fp=0.0).layers.values()
    )


def test_plan_avg_bits_budget_and_pins():
    from dq import formats
    from dq.allocate import Budget, plan
    from dq.config import LayerSpec

    table = synthetic_table()
    numel = {n: v["numel"] for n, v in table.layers.items()}
    for b in (2.0, 3.3, 5.5):
        cfg = plan(table, Budget(avg_weight_bits=b), pin_fp=0.0)
        avg = sum(formats.get(cfg.layers[n].weight).bits * k for n, k in numel.items()) / sum(
            numel.values()
        )
        assert avg <= b + 1e-12
    name = "blocks.0.conv1"
    cfg = plan(table, Budget(avg_weight_bits=8), pinned={name: LayerSpec("int2", act="uint8")})
    assert cfg.layers[name].weight == "int2"
    with pytest.raises(ValueError, match="not a candidate"):
        plan(table, Budget(avg_weight_bits=8), pinned={name: LayerSpec("fp8_e4m3", act="uint8")})


def test_plan_infeasible_budget_gives_the_range():
    from dq.allocate import Budget, plan

    table = synthetic_table()
    with pytest.raises(
        ValueError, match=r"avg_weight_bits=1\.5 cannot be met.*feasible from 2, binds below 8"
    ):
        plan(table, Budget(avg_weight_bits=1.5))
    with pytest.raises(
        ValueError, match=r"avg_weight_bits 1.5: feasible from 2.*weight_bytes 10: feasible from"
    ):
        plan(table, Budget(avg_weight_bits=1.5, weight_bytes=10))
    with pytest.raises(ValueError, match="at least one"):
        Budget()
