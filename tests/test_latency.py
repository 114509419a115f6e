"""dq.latency (per-layer latency per format, measured here) and the latency budget of
dq.allocate.plan: timings are only checked for shape and consistency, never for speed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_allocate import WCANDS, synthetic_table  # noqa: E402  (tests/ is on sys.path)

from dq.latency import LatencyTable, column_key, input_shapes, measure, unet_inputs
from dq.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

COLS = [("int8", "uint8"), ("int4", "uint8"), ("int4", None), (None, None)]


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_pipeline(seed=0).unet.eval()


def test_measure_times_every_layer_in_every_column_and_shares_equal_shapes(unet):
    from dq.api import quantizable_layers

    before = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = unet_inputs(unet, batch=2)
    lat = measure(unet, COLS, inputs, reps=2, warmup=1, progress=False)
    layers = quantizable_layers(unet)
    assert set(lat.layers) == set(layers)
    assert all(set(row) == {column_key(w, a) for w, a in COLS} for row in lat.layers.values())
    assert all(np.isfinite(v) and v > 0 for row in lat.layers.values() for v in row.values())
    shapes = input_shapes(unet, inputs, list(layers))
    # layers of the same kind, weight shape and input shape share one timing
    same = [(a, b) for a, b in itertools.combinations(layers, 2)
            if type(layers[a]) is type(layers[b]) and layers[a].weight.shape == layers[b].weight.shape
            and shapes[a] == shapes[b] and (layers[a].bias is None) == (layers[b].bias is None)
            and getattr(layers[a], "stride", None) == getattr(layers[b], "stride", None)]
    assert same and all(lat.layers[a] == lat.layers[b] for a, b in same)
    assert lat.settings["distinct_timings"] < len(layers) * len(COLS)
    assert lat.settings["threads"] == torch.get_num_threads() and lat.settings["reps"] == 2
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the float UNet is untouched
    back = LatencyTable.from_json(lat.to_json())
    assert back.layers == lat.layers and back.settings == lat.settings


def test_sdxl_inputs_reach_every_layer():
    unet = tiny_sdxl_pipeline(seed=0).unet.eval()
    from dq.api import quantizable_layers

    shapes = input_shapes(unet, unet_inputs(unet, batch=1), list(quantizable_layers(unet)))
    assert len(shapes) == len(quantizable_layers(unet))


def test_bad_latency_inputs_are_refused(unet):
    with pytest.raises(ValueError, match="at least one column"):
        measure(unet, [], unet_inputs(unet), progress=False)
    with pytest.raises(ValueError, match="not quantizable layers"):
        measure(unet, COLS, unet_inputs(unet), layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="not a dq latency table"):
        LatencyTable.from_json('{"layers": {}}')
    with pytest.raises(ValueError, match="invalid JSON"):
        LatencyTable.from_json("{")
    lat = LatencyTable({"a": {"float": 1e-3}})
    with pytest.raises(ValueError, match="no column 'int8/uint8' for layer 'a'"):
        lat.seconds("a", "int8", "uint8")
    with pytest.raises(ValueError, match="no layer 'b'"):
        lat.seconds("b", None, None)


def _synthetic_latency(table, seed=0):
    """Seconds per layer and column: fewer bits faster, float slowest, layer-dependent."""
    rng = np.random.default_rng(seed)
    bits = {"int2": 2, "int4": 4, "int8": 8, "fp4_e2m1": 4, "fp8_e4m3": 8}
    out = {}
    for n in table.layers:
        base = rng.uniform(1e-4, 1e-3)
        row = {"float": 3 * base}
        for w in WCANDS:
            row[column_key(w, "uint8")] = base * (0.5 + bits[w] / 8)
            row[column_key(w, None)] = base * (1.0 + bits[w] / 8)
        out[n] = row
    return LatencyTable(out, {"synthetic": True})


def test_latency_budget_is_met_and_tighter_budgets_cost_quality():
    from dq.allocate import Budget, plan, plan_summary

    table = synthetic_table()
    lat = _synthetic_latency(table)
    fastest = sum(min(v for k, v in row.items() if k.endswith("/uint8")) for n, row in lat.layers.items())
    slowest = sum(max(v for k, v in row.items() if k.endswith("/uint8")) for n, row in lat.layers.items())
    prev_loss = -np.inf
    for budget in np.linspace(slowest, fastest * 1.0001, 5):  # loosest first
        cfg = plan(table, Budget(latency_s=float(budget)), pin_fp=0.0, latency=lat)
        s = plan_summary(table, cfg, lat)
        assert s["latency_s"] <= budget * (1 + 1e-9)
        assert s["latency_s"] == pytest.approx(lat.total(cfg.layers))
        assert s["predicted_loss"] >= prev_loss - 1e-12  # less time, no better quality
        prev_loss = s["predicted_loss"]
    assert {spec.weight for spec in cfg.layers.values()} == {"int2"}  # the fastest budget
    with pytest.raises(ValueError, match=r"latency_s .* feasible from"):
        plan(table, Budget(latency_s=fastest * 0.5), pin_fp=0.0, latency=lat)
    # two budgets together: bytes and time
    both = plan(table, Budget(latency_s=float(slowest), avg_weight_bits=4.0), pin_fp=0.0, latency=lat)
    assert plan_summary(table, both)["avg_weight_bits"] <= 4.0 + 1e-9


def test_latency_budget_needs_the_table_and_the_table_needs_the_budget():
    from dq.allocate import Budget, plan

    table = synthetic_table()
    with pytest.raises(ValueError, match="latency_s budget needs measured latencies"):
        plan(table, Budget(latency_s=1.0))
    with pytest.raises(ValueError, match="latency= is used by a Budget"):
        plan(table, Budget(avg_weight_bits=4.0), latency=_synthetic_latency(table))
    partial = LatencyTable({n: {"float": 1.0} for n in table.layers})
    with pytest.raises(ValueError, match="no column 'int2/uint8'"):
        plan(table, Budget(latency_s=1.0), latency=partial, pin_fp=0.0)


def test_cli_allocates_under_a_latency_budget(tmp_path, capsys):
    from dq.cli import main

    table = synthetic_table()
    lat = _synthetic_latency(table)
    (tmp_path / "t.json").write_text(table.to_json())
    (tmp_path / "l.json").write_text(lat.to_json())
    slowest = sum(max(row.values()) for row in lat.layers.values())
    rc = main(["allocate", str(tmp_path / "t.json"), "--latency-s", str(slowest * 0.6),
               "--latency", str(tmp_path / "l.json"), "--pin-fp", "0", "--out", str(tmp_path / "p.json")])
    assert rc == 0
    assert "predicted" in capsys.readouterr().out and (tmp_path / "p.json").is_file()
    with pytest.raises(SystemExit, match="--latency-s and --latency go together"):
        main(["allocate", str(tmp_path / "t.json"), "--latency-s", "1.0"])
