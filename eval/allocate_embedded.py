"""dq's ILP plan against uniform, random and MixDQ's procedure on the embedded pipeline.

One sensitivity table (default candidates, cached under runs/), then at equal weight bytes
(uniform INT4's, scales counted) with 8-bit activations: uniform INT4 RTN, uniform FP4 E2M1
RTN, a random plan of the same bytes, MixDQ's procedure (eval/mixdq_baseline.py) and dq's plan,
each built as a real quantized pipeline (`dq.quantize` with the plan's `QuantConfig`) and
evaluated on held-out prompts against full precision, with bootstrap 95% intervals over
prompts. Then a Pareto sweep (average weight bits 2.5-8) simulated with `fake_quantized`
(bit-exact with the real modules) on fewer prompts.

    .venv/bin/python eval/allocate_embedded.py                 # everything, in order
    .venv/bin/python eval/allocate_embedded.py --part main     # the equal-bytes table
    .venv/bin/python eval/allocate_embedded.py --part pareto   # the sweep (parallel to main)
    .venv/bin/python eval/allocate_embedded.py --part report   # JSON + Markdown + PNG

Results: eval/results/allocate_embedded.{json,md}, eval/results/pareto_embedded.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dq  # noqa: E402
import dq.assets  # noqa: E402
from dq import formats, metrics  # noqa: E402
from dq.allocate import Budget, plan, plan_summary  # noqa: E402
from dq.config import LayerSpec, QuantConfig  # noqa: E402
from dq.generate import Sampling, generate  # noqa: E402
from dq.sensitivity import Item, SensitivitySettings, SensitivityTable, analyze  # noqa: E402
from dq.storage import spec_nbytes  # noqa: E402
from eval.mixdq_baseline import MixDQSettings, mixdq_plan, simulated_images  # noqa: E402

RESULTS = ROOT / "eval" / "results"


@dataclass
class Settings:
    n_prompts: int = 100  # held-out prompts of the equal-bytes table, one image each (>= 100)
    n_pareto: int = 64  # held-out prompts per Pareto point (simulated; 19 points)
    sens_images: int = (
        2  # images scoring each content item of the table (dq default 8; 2 to fit the time)
    )
    n_calib: int = 32  # calibration prompts of the table and of dq.quantize (MixDQ: 32)
    seed: int = 0  # image i uses generator seed seed + i, the same for every config
    bootstrap: int = 1000  # bootstrap resamples of the prompts for the 95% intervals
    budget_bits: float = 4.0  # the equal-bytes budget: uniform INT4's bytes (scales counted)
    act: str = "uint8"  # activations of every plan (8-bit, per tensor, the CPU engine's)
    pin_fp: float = 0.01  # activation layers kept float, most sensitive first (MixDQ ~1 %)
    backend: str = "cpu"  # dq allocates among the formats dq's CPU int8 engine runs
    random_seed: int = 0  # seed of the random plan's random losses
    pareto_bits: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0)  # dq's front
    mixdq_bits: tuple[float, ...] = (3.0, 4.0, 5.0)  # MixDQ's procedure on the Pareto plot
    threads: int = 1  # torch CPU threads (2 cores shared by several engineers)
    cache: str = "runs/allocate_embedded"  # table cache and partial results (git-ignored)


def load_table(pipe, s: Settings) -> SensitivityTable:
    """The one table (default candidates), computed once into the cache and reused: its
    table.json when it was computed on this model (dq's sensitivity defaults have changed
    since, e.g. `max_rows`, so the cache's settings no longer match a fresh run's)."""
    from dq.sensitivity import model_fingerprint

    done = ROOT / s.cache / "sensitivity" / "table.json"
    if done.is_file():
        table = SensitivityTable.from_json(done.read_text())
        if table.model == model_fingerprint(pipe.unet):
            return table
    prompts = dq.assets.calibration_prompts()[: s.n_calib]
    return analyze(
        pipe, prompts, settings=SensitivitySettings(num_images=s.sens_images),
        cache_dir=ROOT / s.cache / "sensitivity", progress=False,
    )


def reference_ranges(s: Settings):
    """(activation ranges, BOS embedding) the table was calibrated with (for simulation)."""
    from safetensors.torch import load_file

    folder = ROOT / s.cache / "sensitivity"
    ranges = {
        k: tuple(v)
        for k, v in json.loads((folder / "reference.json").read_text())["ranges"].items()
    }
    return ranges, load_file(str(folder / "reference.safetensors")).get("bos")


def uniform(table, weight: str, fp_act: set[str], s: Settings, name: str) -> QuantConfig:
    gran, method = table.settings["weight_granularity"], table.settings["weight_method"]
    layers = {
        n: LayerSpec(weight, gran, method, act=None if n in fp_act else s.act) for n in table.layers
    }
    return QuantConfig(default=None, layers=layers, skip=(), name=name)


def random_table(table, seed: int) -> SensitivityTable:
    """The table with every weight item's loss replaced by a random number (activations
    kept): the ILP on it gives a random plan that fills the same budget."""
    rng = np.random.default_rng(seed)
    items = []
    for it in table.items:
        if it.kind == "weight" and math.isfinite(table.loss(it)):
            r = float(rng.uniform(0, 1))
            it = Item(
                it.layer,
                it.kind,
                it.candidate,
                it.group,
                {"unet_noise": r, "image_mse": r * table.gain},
            )
        items.append(it)
    return SensitivityTable(
        layers=table.layers,
        items=items,
        settings=table.settings,
        model=table.model,
        gain=table.gain,
    )


def bytes_of(table, cfg: QuantConfig) -> int:
    return int(sum(spec_nbytes(cfg.layers[n], tuple(v["shape"])) for n, v in table.layers.items()))


def equal_bytes_configs(pipe, table, s: Settings) -> tuple[dict[str, QuantConfig], dict]:
    fp_act = {
        n
        for n, sp in plan(table, Budget(avg_weight_bits=8), pin_fp=s.pin_fp).layers.items()
        if sp.act is None
    }
    int4 = uniform(table, "int4", fp_act, s, "uniform-int4-rtn")
    budget = Budget(weight_bytes=bytes_of(table, int4))
    ranges, bos = reference_ranges(s)
    sampling = table_sampling(table)
    prompt = dq.assets.calibration_prompts()[MixDQSettings().prompt_index]
    mix_n, log_n = mixdq_plan(
        pipe, table, s.budget_bits, ranges=ranges, bos=bos, prompt=prompt, sampling=sampling
    )
    mix_b, log_b = mixdq_plan(pipe, table, s.budget_bits, ranges=ranges, bos=bos, prompt=prompt, sampling=sampling,
                              settings=MixDQSettings(stored_bits=True, below_only=True))  # fmt: skip
    cfgs = {
        "uniform INT4 RTN": int4,
        "uniform FP4 E2M1 RTN": uniform(table, "fp4_e2m1", fp_act, s, "uniform-fp4-rtn"),
        "random plan": plan(
            random_table(table, s.random_seed),
            budget,
            backend=s.backend,
            act=s.act,
            pin_fp=s.pin_fp,
        ),
        "MixDQ procedure (stored bits: equal bytes)": mix_b,
        "MixDQ procedure (nominal 4 bits, 2/4/8)": mix_n,
        "dq plan (ILP)": plan(table, budget, backend=s.backend, act=s.act, pin_fp=s.pin_fp),
    }
    return cfgs, {"budget_bytes": budget.weight_bytes, "float_act_layers": sorted(fp_act),
                  "mixdq_nominal": log_n, "mixdq_stored": log_b}  # fmt: skip


def table_sampling(table) -> Sampling:
    d = dict(table.settings["sampling"])
    return Sampling.from_kwargs(**d)


# ----- metrics per prompt -----


@torch.no_grad()
def per_image(images, fp_images, prompts, labels, ev) -> dict[str, np.ndarray]:
    mse = (images.clamp(0, 1) - fp_images.clamp(0, 1)).pow(2).flatten(1).mean(1)
    out = {"psnr_vs_fp": (10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp(max=100).numpy()}
    fa, fb = features(images, ev), features(fp_images, ev)
    out["feature_dist_vs_fp"] = (1 - torch.nn.functional.cosine_similarity(fa, fb, dim=-1)).numpy()
    out["clip_score"] = metrics.clip_score(images, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer,
                                           reduce=False).numpy()  # fmt: skip
    out["attribute_acc"] = attribute_hits(images, labels, ev)
    return out


@torch.no_grad()
def features(images, ev) -> torch.Tensor:
    return ev.fid_feature(metrics.to_uint8(images)).double()


@torch.no_grad()
def attribute_hits(images, labels, ev) -> np.ndarray:
    """1 where the judge finds every attribute of the prompt, else 0 (acc_all per image)."""
    out = ev.classifier(metrics.to_float(images))
    preds = {k: out[k].argmax(-1).tolist() for k in ev.values}
    return np.array(
        [
            all(ev.values[k][preds[k][i]] == v for k, v in lab.items())
            for i, lab in enumerate(labels)
        ],
        float,
    )


def frechet(fa: np.ndarray, fb: np.ndarray) -> float:
    from scipy import linalg

    mu = fa.mean(0) - fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(mu @ mu + np.trace(ca + cb - 2 * covmean))


def bootstrap(row: dict, fa, fb, s: Settings, rng) -> dict:
    """Means with bootstrap 95% intervals over prompts; FID vs FP by resampling image pairs."""
    n = len(fa)
    idx = rng.integers(0, n, (s.bootstrap, n))
    res = {}
    for k, v in row.items():
        means = v[idx].mean(1)
        res[k] = [
            float(v.mean()),
            float(np.percentile(means, 2.5)),
            float(np.percentile(means, 97.5)),
        ]
    fids = np.array([frechet(fa[i], fb[i]) for i in idx[: min(s.bootstrap, 300)]])
    raw = [float(np.percentile(fids, 2.5)), float(np.percentile(fids, 97.5))]
    # resampling duplicates images, which inflates FID: shift the percentiles by the bootstrap's
    # bias estimate (its mean minus the point value) so the interval sits around the estimate
    shift = float(fids.mean()) - frechet(fa, fb)
    res["fid_vs_fp_boot"] = [raw[0] - shift, raw[1] - shift]
    res["fid_vs_fp_boot_raw"] = raw
    return res


# ----- parts -----


def run_main(s: Settings) -> None:
    out = ROOT / s.cache / "main.json"
    ev = dq.assets.load_evaluators()
    call = dq.assets.embedded_defaults()
    prompts, labels = dq.assets.heldout_prompts(s.n_prompts)
    calib = dq.assets.calibration_prompts()[: s.n_calib]
    pipe = dq.assets.load_embedded_pipeline()
    table = load_table(pipe, s)
    cfgs, info = equal_bytes_configs(pipe, table, s)
    fp_images = metrics.generate(pipe, prompts, s.seed, **call)
    ffp = features(fp_images, ev).numpy()
    rng = np.random.default_rng(0)
    fp_row = {
        "clip_score": clip_row(fp_images, prompts, ev),
        "attribute_acc": attribute_hits(fp_images, labels, ev),
    }
    idx = rng.integers(0, len(prompts), (s.bootstrap, len(prompts)))
    results = {"fp32": {k: [float(v.mean()), *np.percentile(v[idx].mean(1), [2.5, 97.5]).tolist()]
                        for k, v in fp_row.items()}}  # fmt: skip
    plans = {}
    for name, cfg in cfgs.items():
        t0 = time.time()
        p = dq.assets.load_embedded_pipeline()
        dq.quantize(p, cfg, calib_prompts=calib, progress=False,
                    calibration={"num_inference_steps": call["num_inference_steps"],
                                 "guidance_scale": call["guidance_scale"]})  # fmt: skip
        images = metrics.generate(p, prompts, s.seed, **call)
        row = per_image(images, fp_images, prompts, labels, ev)
        fq = features(images, ev).numpy()
        r = bootstrap(row, fq, ffp, s, rng)
        r["fid_vs_fp"] = metrics.fid(fp_images, images, feature=ev.fid_feature)
        r["fid_vs_fp_features"] = frechet(fq, ffp)
        r["seconds"] = round(time.time() - t0, 1)
        summ = plan_summary(table, cfg)
        r.update({k: summ[k] for k in ("avg_weight_bits", "weight_bytes", "predicted_loss", "float_act_layers",
                                        "weight_formats")})  # fmt: skip
        results[name] = r
        plans[name] = cfg.to_dict() if hasattr(cfg, "to_dict") else json.loads(cfg.to_json())
        print(
            name,
            {k: (round(v[0], 3) if isinstance(v, list) else v) for k, v in r.items()},
            flush=True,
        )
        out.write_text(
            json.dumps(
                {"settings": asdict(s), "info": info, "results": results, "plans": plans}, indent=1
            )
        )


def clip_row(images, prompts, ev) -> np.ndarray:
    return metrics.clip_score(
        images, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer, reduce=False
    ).numpy()


def run_pareto(s: Settings) -> None:
    out = ROOT / s.cache / "pareto.json"
    ev = dq.assets.load_evaluators()
    call = dq.assets.embedded_defaults()
    prompts, _ = dq.assets.heldout_prompts(s.n_pareto)
    pipe = dq.assets.load_embedded_pipeline()
    table = load_table(pipe, s)
    ranges, bos = reference_ranges(s)
    sampling = Sampling.from_kwargs(seed=s.seed, batch_size=50, **call)
    fp_images = generate(pipe, prompts, sampling)
    fp_act = {
        n
        for n, sp in plan(table, Budget(avg_weight_bits=8), pin_fp=s.pin_fp).layers.items()
        if sp.act is None
    }
    points = []
    todo = [("dq", b, lambda b=b: plan(table, Budget(avg_weight_bits=b), backend=s.backend, act=s.act, pin_fp=s.pin_fp))
            for b in s.pareto_bits]  # fmt: skip
    todo += [
        ("uniform INT", formats.get(w).bits, lambda w=w: uniform(table, w, fp_act, s, w))
        for w in ("int3", "int4", "int6", "int8")
    ]
    todo += [("uniform FP", formats.get(w).bits, lambda w=w: uniform(table, w, fp_act, s, w))
             for w in ("fp4_e2m1", "fp6_e2m3", "fp8_e4m3")]  # fmt: skip
    prompt = dq.assets.calibration_prompts()[MixDQSettings().prompt_index]
    todo += [("MixDQ procedure", b, lambda b=b: mixdq_plan(pipe, table, b, ranges=ranges, bos=bos, prompt=prompt,
                                                           sampling=table_sampling(table))[0]) for b in s.mixdq_bits]  # fmt: skip
    for family, bits, make in todo:
        t0 = time.time()
        cfg = make()
        images = simulated_images(pipe, cfg.layers, prompts, sampling, ranges, bos)
        summ = plan_summary(table, cfg)
        pt = {"family": family, "target_bits": bits, "name": cfg.name, "avg_weight_bits": summ["avg_weight_bits"],
              "weight_bytes": summ["weight_bytes"], "predicted_loss": summ["predicted_loss"],
              "psnr_vs_fp": metrics.psnr_vs_reference(images, fp_images),
              "fid_vs_fp": metrics.fid(fp_images, images, feature=ev.fid_feature),
              "weight_formats": summ["weight_formats"], "seconds": round(time.time() - t0, 1)}  # fmt: skip
        points.append(pt)
        print(pt, flush=True)
        out.write_text(json.dumps({"settings": asdict(s), "points": points}, indent=1))


def report(s: Settings, command: str) -> None:
    main = json.loads((ROOT / s.cache / "main.json").read_text())
    pareto_file = ROOT / s.cache / "pareto.json"
    pareto = json.loads(pareto_file.read_text()) if pareto_file.exists() else {"points": []}
    (RESULTS / "allocate_embedded.json").write_text(
        json.dumps({"command": command, **main, "pareto": pareto["points"]}, indent=1)
    )
    res = main["results"]

    def ci(v, nd=2):
        return f"{v[0]:.{nd}f} [{v[1]:.{nd}f}, {v[2]:.{nd}f}]"

    recentred = all("fid_vs_fp_boot_raw" in r for name, r in res.items() if name != "fp32")
    fid_note = ("percentiles re-centred by the bootstrap's bias estimate, raw ones in the JSON as "
                "fid_vs_fp_boot_raw" if recentred else "raw percentiles, not re-centred")

    lines = [f"`{command}`", "",
             f"Embedded pipeline, {s.n_prompts} held-out prompts (same seeds), 8-bit activations (uint8 per tensor; "
             f"the {len(main['info']['float_act_layers'])} most sensitive activation layers by dq's table kept float in "
             "every row but MixDQ's, which picks its own ~1 %). Equal weight bytes: uniform INT4's "
             f"{main['info']['budget_bytes']:.0f} bytes (scales counted). Real quantized modules (`dq.quantize`). "
             "Bootstrap 95% intervals over prompts in brackets (FID: resampled image pairs, own Fréchet on the same "
             f"features; {fid_note}).", "",
             "| config | avg w bits | weight bytes | PSNR vs FP (dB) | feature dist vs FP | FID vs FP | CLIP score | attribute acc (all) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fp = res["fp32"]
    lines.append(
        f"| full precision (fp32) | 32 | — | — | — | — | {ci(fp['clip_score'])} | {ci(fp['attribute_acc'], 3)} |"
    )
    for name, r in res.items():
        if name == "fp32":
            continue
        b = r["fid_vs_fp_boot"]
        lines.append(
            f"| {name} | {r['avg_weight_bits']:.3f} | {r['weight_bytes']:.0f} | {ci(r['psnr_vs_fp'])} | "
            f"{ci(r['feature_dist_vs_fp'], 4)} | {r['fid_vs_fp']:.3f} [{b[0]:.3f}, {b[1]:.3f}] | {ci(r['clip_score'])} | "
            f"{ci(r['attribute_acc'], 3)} |"
        )
    info = main["info"]
    lines += ["", "Formats chosen (layers per weight format):", ""]
    for name, r in res.items():
        if name != "fp32":
            lines.append(
                f"- {name}: {r['weight_formats']} (predicted loss {r['predicted_loss']:.3g})"
            )
    for k in ("mixdq_stored", "mixdq_nominal"):
        lg = info[k]
        lines.append(f"- MixDQ sweep ({k}): {lg['n_plans']} candidate plans, kept content-group target "
                     f"{lg['kept_split_content_bits']} bits (one-image MSE {lg['kept_image_mse']:.3g})")  # fmt: skip
    if pareto["points"]:
        lines += ["", f"Pareto sweep (simulated, bit-exact, {s.n_pareto} prompts): eval/results/pareto_embedded.png", "",
                  "| family | target | avg w bits | PSNR vs FP | FID vs FP |", "|---|---|---|---|---|"]  # fmt: skip
        for p in pareto["points"]:
            lines.append(
                f"| {p['family']} | {p['name']} | {p['avg_weight_bits']:.3f} | {p['psnr_vs_fp']:.2f} | {p['fid_vs_fp']:.3f} |"
            )
        plot(pareto["points"])
    (RESULTS / "allocate_embedded.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(points) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {
        "dq": ("C0", "o-"),
        "uniform INT": ("C1", "s"),
        "uniform FP": ("C2", "^"),
        "MixDQ procedure": ("C3", "D--"),
    }
    for ax, key, label in ((axes[0], "psnr_vs_fp", "PSNR vs FP (dB, higher is better)"),
                           (axes[1], "fid_vs_fp", "FID vs FP (lower is better)")):  # fmt: skip
        for fam, (color, mk) in style.items():
            pts = sorted(
                (p for p in points if p["family"] == fam), key=lambda p: p["avg_weight_bits"]
            )
            if pts:
                ax.plot(
                    [p["avg_weight_bits"] for p in pts],
                    [p[key] for p in pts],
                    mk,
                    color=color,
                    label=fam,
                )
        ax.set_xlabel("average weight bits (nominal, size-weighted)")
        ax.set_ylabel(label)
        ax.set_xlim(2.3, 8.2)
        ax.grid(alpha=0.3)
        if key == "fid_vs_fp":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("Embedded pipeline, W*A8: dq's ILP front vs uniform INT/FP and MixDQ's procedure")
    fig.tight_layout()
    fig.savefig(RESULTS / "pareto_embedded.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "table", "main", "pareto", "report"), default="all")
    ap.add_argument(
        "--n", type=int, default=Settings.n_prompts, help="held-out prompts of the main table"
    )
    ap.add_argument("--n-pareto", type=int, default=Settings.n_pareto)
    a = ap.parse_args()
    s = replace(Settings(), n_prompts=a.n, n_pareto=a.n_pareto)
    torch.set_num_threads(s.threads)
    extra = [x for x in sys.argv[1:] if x not in ("--part", a.part)]
    command = " ".join([".venv/bin/python eval/allocate_embedded.py", *extra])
    if a.part == "table":
        load_table(dq.assets.load_embedded_pipeline(), s)
    if a.part in ("all", "main"):
        run_main(s)
    if a.part in ("all", "pareto"):
        run_pareto(s)
    if a.part in ("all", "report"):
        report(s, command)


if __name__ == "__main__":
    main()
