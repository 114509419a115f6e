"""dq.sensitivity: decoupled scores per layer x candidate x kind; cached, resumable, shardable."""

import json

import pytest
import torch

import dq.sensitivity as S
from dq.generate import Sampling

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow star"]
SETTINGS = S.SensitivitySettings(
    weight_candidates=("int2", "int4", "int8"), act_candidates=("uint4", "uint8"),
    num_images=2, num_unet_calls=2,
    sampling=Sampling(num_inference_steps=2, guidance_scale=2.0, batch_size=4),
)


def _scores(t):
    """A table's content without the per-item timings."""
    d = t.to_dict()
    for it in d["items"]:
        it.pop("seconds")
    return d


@pytest.fixture(scope="module")
def pipe():
    from dq.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def table(pipe):
    return S.analyze(pipe, PROMPTS, settings=SETTINGS, progress=False)


def test_table_covers_every_layer_candidate_and_kind(pipe, table):
    from dq.api import quantizable_layers

    names = [n for n in quantizable_layers(pipe.unet) if n not in ("conv_in", "conv_out")]
    assert sorted(table.layers) == sorted(names)
    assert len(table.items) == len(names) * 5
    groups = {v["group"] for v in table.layers.values()}
    assert groups == {"content", "quality"}
    for it in table.items:
        assert ("ssim" in it.metrics) == (it.group == "content")
    w_names, loss, cost = table.matrix("weight")
    assert loss.shape == (len(names), 3) and bool(torch.isfinite(loss).all())
    assert bool((cost[:, 0] == cost[:, 1]).all() and (cost[:, 1] < cost[:, 2]).all())  # 2-bit codes sit in nibbles
    assert table.gain > 0
    again = S.SensitivityTable.from_json(table.to_json())
    assert again.to_dict() == table.to_dict()


def test_more_bits_never_score_worse_beyond_noise(table):
    for kind, cands in (("weight", ("int2", "int4", "int8")), ("act", ("uint4", "uint8"))):
        _, loss, _ = table.matrix(kind)
        for j in range(len(cands) - 1):
            worse = loss[:, j + 1] > loss[:, j] * 1.05 + 1e-9
            assert int(worse.sum()) <= max(1, loss.shape[0] // 20), (kind, cands[j + 1])


def test_killed_and_resumed_run_equals_uninterrupted(pipe, table, tmp_path, monkeypatch):
    real = S._score
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt  # killed mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_score", dying)
    with pytest.raises(KeyboardInterrupt):
        S.analyze(pipe, PROMPTS, settings=SETTINGS, cache_dir=tmp_path, progress=False)
    f = tmp_path / "items-0.jsonl"
    assert len(f.read_text().splitlines()) == 40
    with f.open("a") as fh:
        fh.write('{"layer": "cut by the kill')  # a half-written line
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_score", counting)
    resumed = S.analyze(pipe, PROMPTS, settings=SETTINGS, cache_dir=tmp_path, progress=False)
    assert counted["n"] == len(table.items) - 40  # nothing finished is recomputed
    assert _scores(resumed) == _scores(table)


def test_two_shards_merge_to_the_one_process_table(pipe, table, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_barrier", lambda: None)
    a = S.analyze(pipe, PROMPTS, settings=SETTINGS, cache_dir=tmp_path, shard=(0, 2), progress=False)
    b = S.analyze(pipe, PROMPTS, settings=SETTINGS, cache_dir=tmp_path, shard=(1, 2), progress=False)
    assert _scores(b) == _scores(table)  # the last shard merges every shard's items
    assert len(a.items) < len(table.items)


def test_bad_input_is_a_clear_error(pipe, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        S.analyze(pipe, [], settings=SETTINGS, progress=False)
    with pytest.raises(ValueError, match="unknown format"):
        S.SensitivitySettings(weight_candidates=("int9",))
    with pytest.raises(ValueError, match="fits no layer"):
        S.analyze(pipe, PROMPTS, settings=S.SensitivitySettings(
            weight_candidates=("int4",), kinds=("weight",), weight_granularity="group7",
            sampling=SETTINGS.sampling), progress=False)
    small = S.SensitivitySettings(weight_candidates=("int8",), kinds=("weight",), num_images=1,
                                  num_unet_calls=1, sampling=SETTINGS.sampling)
    S.analyze(pipe, PROMPTS[:1], settings=small, cache_dir=tmp_path, progress=False)
    from dq.testing import tiny_sd_pipeline

    other = tiny_sd_pipeline(seed=1)
    with pytest.raises(ValueError, match="another model"):
        S.analyze(other, PROMPTS[:1], settings=small, cache_dir=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"] == S.model_fingerprint(pipe.unet)


def test_cli_writes_the_table(pipe, tmp_path):
    import argparse

    pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    parser = argparse.ArgumentParser()
    S.add_cli(parser.add_subparsers())
    args = parser.parse_args(["sensitivity", str(tmp_path / "p"), "--prompts", str(tmp_path / "prompts.txt"),
                              "--out", str(tmp_path / "out"), "--weights", "int8", "--acts", "uint8",
                              "--num-images", "1", "--steps", "1"])
    assert args.func(args) == 0
    table = S.SensitivityTable.from_json((tmp_path / "out" / "table.json").read_text())
    assert {it.candidate for it in table.items} == {"int8", "uint8"}
    bad = parser.parse_args(["sensitivity", str(tmp_path / "p"), "--prompts", str(tmp_path / "nope.txt"),
                             "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="--prompts"):
        bad.func(bad)


def test_dq_allocate_cli_writes_a_plan_within_budget(table, tmp_path, capsys):
    from dq import cli
    from dq.config import QuantConfig

    (tmp_path / "t.json").write_text(table.to_json())
    rc = cli.main(["allocate", str(tmp_path / "t.json"), "--avg-weight-bits", "5", "--out", str(tmp_path / "plan.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "average weight bits" in out and "predicted loss" in out
    cfg = QuantConfig.from_json((tmp_path / "plan.json").read_text())
    assert set(cfg.layers) == set(table.layers)
    bits = sum(info["numel"] * (int(cfg.layers[n].weight[-1]) if cfg.layers[n] else 32)
               for n, info in table.layers.items()) / sum(i["numel"] for i in table.layers.values())
    assert bits <= 5 + 1e-9
    with pytest.raises(SystemExit, match="give a budget"):
        cli.main(["allocate", str(tmp_path / "t.json")])


def test_stored_rows_are_capped_evenly_over_the_trajectory(pipe):
    st = S.SensitivitySettings(weight_candidates=("int8",), kinds=("weight",), num_images=1,
                               num_unet_calls=2, max_rows=3, sampling=SETTINGS.sampling)
    ref = S._Reference.compute(pipe, PROMPTS, SETTINGS.sampling, st, progress=False)[0]
    assert ref.calls["sample"].shape[0] == 3 == ref.output.shape[0]
    assert len(set(ref.calls["timestep"].tolist())) == 2  # both stored calls (timesteps) kept
    with pytest.raises(ValueError, match="max_rows"):
        S.SensitivitySettings(max_rows=0)


def test_max_steps_caps_the_runs_and_none_keeps_the_sampling(pipe, monkeypatch):
    seen = []
    real = S.generate

    def spy(p, prompts, sampling, **kw):
        seen.append(sampling.num_inference_steps)
        return real(p, prompts, sampling, **kw)

    monkeypatch.setattr(S, "generate", spy)
    four = Sampling(num_inference_steps=4, guidance_scale=2.0, batch_size=4)
    for cap, want in ((2, 2), (None, 4), (10, 4)):
        seen.clear()
        st = S.SensitivitySettings(weight_candidates=("int8",), kinds=("weight",), num_images=1,
                                   num_unet_calls=2, sampling=four, max_steps=cap)
        t = S.analyze(pipe, PROMPTS, settings=st, progress=False)
        assert seen and set(seen) == {want}, (cap, seen)
        assert t.settings["sampling"]["num_inference_steps"] == want
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            S.SensitivitySettings(max_steps=bad)
