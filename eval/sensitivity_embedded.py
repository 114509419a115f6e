"""Sensitivity analysis on the embedded pipeline: time of the whole table (one process, and two
under accelerate), rank stability over disjoint prompt sets and seeds, and the additivity of
the normalised loss over random mixed plans (issue #10).

    .venv/bin/python eval/sensitivity_embedded.py                       # all parts
    .venv/bin/python eval/sensitivity_embedded.py --parts table         # one part
    accelerate launch --cpu --num_processes 2 eval/sensitivity_embedded.py --parts table --cache runs/sens_acc

Writes eval/results/sensitivity_embedded.json, .md and additivity_embedded.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dq  # noqa: E402
from dq import assets, metrics  # noqa: E402
from dq import sensitivity as S  # noqa: E402
from dq.config import LayerSpec  # noqa: E402
from dq.generate import generate  # noqa: E402
from dq.simulate import fake_quantized  # noqa: E402


@dataclass
class Settings:
    num_calib: int = 16  # calibration prompts per table (MixDQ: 32 at 512 px; ours are 32 px)
    threads: int = 1  # torch threads per process (2 processes under accelerate share 2 cores)
    cache: str = "runs/sens_full"  # cache folder of the full table (git-ignored)
    stability_candidates: tuple[str, ...] = ("int4",)  # weight candidate of the rank-stability tables
    stability_act: tuple[str, ...] = ("uint4",)  # activation candidate of the rank-stability tables
    plans: int = 40  # random mixed plans for the additivity check
    plan_prompts: int = 16  # held-out prompts whose images measure each plan
    seed: int = 0  # seed of the random plans


def _rows_md(d: dict) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in d.items())


def part_table(s: Settings, pipe, prompts) -> dict:
    t0 = time.perf_counter()
    table = S.analyze(pipe, prompts, cache_dir=ROOT / s.cache, progress=True)
    secs = time.perf_counter() - t0
    from accelerate import PartialState

    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        (ROOT / s.cache / "table.json").write_text(table.to_json())
    n_items = len(table.items)
    per_group = {}
    for it in table.items:
        g = per_group.setdefault(f"{it.group}/{it.kind}", [0, 0.0])
        g[0] += 1
        g[1] += it.seconds
    return {"seconds": round(secs, 1), "items": n_items, "layers": len(table.layers), "gain": table.gain,
            "item_seconds_by_group": {k: {"items": v[0], "seconds": round(v[1], 1)} for k, v in per_group.items()}}


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def part_stability(s: Settings, pipe) -> dict:
    calib = assets.calibration_prompts()
    sets = {"A": calib[: s.num_calib], "B": calib[s.num_calib : 2 * s.num_calib]}
    base = dq.recipes.get("embedded").calibration.sampling().replace(batch_size=8)
    tables = {}
    for name, prompts, seed in (("A-seed0", sets["A"], 0), ("B-seed0", sets["B"], 0), ("A-seed1", sets["A"], 1)):
        st = S.SensitivitySettings(weight_candidates=s.stability_candidates, act_candidates=s.stability_act,
                                   sampling=base.replace(seed=seed))
        t0 = time.perf_counter()
        tables[name] = S.analyze(pipe, prompts, settings=st, progress=False)
        print(f"stability table {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    out = {}
    for pair in (("A-seed0", "B-seed0"), ("A-seed0", "A-seed1")):
        ta, tb = tables[pair[0]], tables[pair[1]]
        for kind, cand in (("weight", s.stability_candidates[0]), ("act", s.stability_act[0])):
            for group in ("content", "quality"):
                names = [n for n in ta.layers if ta.layers[n]["group"] == group]
                la = [ta.loss(ta.item(n, kind, cand)) for n in names]
                lb = [tb.loss(tb.item(n, kind, cand)) for n in names]
                out[f"{pair[0]} vs {pair[1]} / {kind} {cand} / {group}"] = round(_spearman(la, lb), 3)
    return out


def part_additivity(s: Settings, pipe, table: S.SensitivityTable) -> dict:
    ref_meta = S._Reference.load(ROOT / s.cache)
    ev = assets.load_evaluators()
    prompts = assets.heldout_prompts(s.plan_prompts)[0]
    sampling = dq.recipes.get("embedded").calibration.sampling().replace(batch_size=s.plan_prompts)
    fp = generate(pipe, prompts, sampling)
    rng = random.Random(s.seed)
    wc, ac = table.candidates("weight"), [None, *table.candidates("act")]
    rows = []
    for i in range(s.plans):
        p = 0.05 + 0.6 * i / max(1, s.plans - 1)  # fraction of layers touched: spreads the losses
        plan, weights, predicted = {}, set(), 0.0
        for n in table.layers:
            w = rng.choice(wc) if rng.random() < p else None
            a = rng.choice(ac) if rng.random() < p else None
            if w is None and a is None:
                continue
            plan[n] = LayerSpec(w or "int8", table.settings["weight_granularity"], act=a)
            if w is not None:
                weights.add(n)
                predicted += table.loss(table.item(n, "weight", w))
            if a is not None:
                predicted += table.loss(table.item(n, "act", a))
        bos_layers = [n for n in plan if plan[n].act and n.endswith(("attn2.to_k", "attn2.to_v"))]
        with fake_quantized(pipe.unet, plan, ref_meta.ranges, weights=weights, bos=ref_meta.bos,
                            bos_layers=bos_layers if ref_meta.bos is not None else ()):
            imgs = generate(pipe, prompts, sampling)
        mse = float((imgs - fp).pow(2).mean())
        fd = metrics.feature_distance_vs_reference(imgs, fp, ev.fid_feature)
        rows.append({"layers": len(plan), "predicted_mse": predicted, "measured_mse": mse,
                     "psnr_vs_fp": -10 * math.log10(max(mse, 1e-12)), "feature_dist": fd})
        print(f"plan {i}: {len(plan)} layers, predicted {predicted:.2e}, measured {mse:.2e}", flush=True)
    pred = [r["predicted_mse"] for r in rows]
    out = {
        "plans": len(rows),
        "spearman_predicted_vs_mse": round(_spearman(pred, [r["measured_mse"] for r in rows]), 3),
        "spearman_predicted_vs_feature_dist": round(_spearman(pred, [r["feature_dist"] for r in rows]), 3),
        "median_ratio_measured_over_predicted": round(float(torch.tensor(
            [r["measured_mse"] / r["predicted_mse"] for r in rows if r["predicted_mse"] > 0]).median()), 3),
        "rows": rows,
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].loglog(pred, [r["measured_mse"] for r in rows], "o")
    lim = [min(pred + [r["measured_mse"] for r in rows]), max(pred + [r["measured_mse"] for r in rows])]
    axes[0].loglog(lim, lim, "k--", lw=0.8)
    axes[0].set(xlabel="predicted image MSE (sum of item losses)", ylabel="measured image MSE vs FP",
                title=f"Spearman {out['spearman_predicted_vs_mse']}")
    axes[1].semilogx(pred, [r["feature_dist"] for r in rows], "o")
    axes[1].set(xlabel="predicted image MSE", ylabel="feature distance vs FP",
                title=f"Spearman {out['spearman_predicted_vs_feature_dist']}")
    fig.tight_layout()
    fig.savefig(ROOT / "eval/results/additivity_embedded.png", dpi=110)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["table", "stability", "additivity"])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    s = Settings(cache=a.cache or Settings.cache, threads=a.threads or Settings.threads)
    torch.set_num_threads(s.threads)
    pipe = assets.load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = assets.calibration_prompts()[: s.num_calib]
    out_file = ROOT / "eval/results/sensitivity_embedded.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    results["settings"] = asdict(s)
    rank = 0
    if "table" in a.parts:
        res = part_table(s, pipe, prompts)
        from accelerate import PartialState

        st = PartialState(cpu=not torch.cuda.is_available())
        rank = st.process_index
        key = "table_1_process" if st.num_processes == 1 else f"table_{st.num_processes}_processes"
        results[key] = res
        print(key, res, flush=True)
        if st.num_processes > 1 and rank == 0 and (ROOT / Settings.cache / "table.json").exists():
            one = json.loads((ROOT / Settings.cache / "table.json").read_text())
            many = json.loads((ROOT / s.cache / "table.json").read_text())
            diff = max((abs(x["metrics"]["unet_noise"] - y["metrics"]["unet_noise"]) /
                        max(abs(x["metrics"]["unet_noise"]), 1e-30))
                       for x, y in zip(one["items"], many["items"], strict=True)
                       if math.isfinite(x["metrics"]["unet_noise"]))
            results[key]["max_rel_diff_vs_1_process"] = diff
    if rank != 0:
        return
    if "stability" in a.parts:
        results["rank_stability_spearman"] = part_stability(s, pipe)
        print(results["rank_stability_spearman"], flush=True)
    if "additivity" in a.parts:
        table = S.SensitivityTable.from_json((ROOT / s.cache / "table.json").read_text())
        results["additivity"] = part_additivity(s, pipe, table)
    results["command"] = " ".join(["python eval/sensitivity_embedded.py", *sys.argv[1:]])
    out_file.write_text(json.dumps(results, indent=1, default=str))
    md = ["# Sensitivity analysis on the embedded pipeline", "", f"Command: `{results['command']}`", ""]
    for k in ("table_1_process", "table_2_processes"):
        if k in results:
            md += [f"## {k}", "", "| | |", "|---|---|", _rows_md({kk: vv for kk, vv in results[k].items()}), ""]
    if "rank_stability_spearman" in results:
        md += ["## Rank stability (Spearman of per-layer losses)", "", "| pair / kind / group | Spearman |",
               "|---|---|", _rows_md(results["rank_stability_spearman"]), ""]
    if "additivity" in results:
        ad = {k: v for k, v in results["additivity"].items() if k != "rows"}
        md += ["## Additivity over random mixed plans", "", "| | |", "|---|---|", _rows_md(ad), "",
               "![additivity](additivity_embedded.png)", ""]
    (ROOT / "eval/results/sensitivity_embedded.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
