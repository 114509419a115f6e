"""Learned rounding on the embedded pipeline: W4A8 and W3A8, FP and INT, nearest / search / learned.

Issue #12, "Show", second bullet. For each weight format (FP4 E2M1, INT4; FP3 E2M0, INT3; per
output channel, uint8 activations) three real quantized pipelines are built from one capture
(`dq.capture`, cached in runs/):

- ``rtn``: round-to-nearest on min-max scales (`dq.apply_plan` without qweights);
- ``search``: per layer, the clipping scale chosen by the layer's output error on its captured
  rows (`dq.rounding.search_scale`); for FP also the exponent / mantissa split among the
  registered formats of that width (`dq.rounding.search_fp_format`: E2M1 / E3M0 at 4 bits,
  E2M0 alone at 3), rounded to nearest;
- ``learned``: AdaRound (`dq.rounding.learn`) on the searched format and scale, rows balanced
  across timesteps (`timestep_row_weights`, as `dq.quantize(..., rounding="learned")` does).

All of them go through `dq.apply_plan(..., qweights=)` with the same calibrated activation
ranges and BOS handling as `dq.quantize` (this path rather than ``dq.quantize(rounding=
"learned")`` so that learned rounding starts from the searched scales, and every row shares one
capture). Timestep weighting is tried on FP4 learned: raw reservoir rows vs uniform per
timestep vs the scheduler's noise level sqrt(1 - alpha_bar_t).

Every pipeline is scored on the same held-out prompts and seeds against full precision: PSNR,
feature distance and FID vs FP, CLIP score, attribute accuracy (all attributes right), each
with a bootstrap 95% interval over prompts (FID resampled as paired image sets), plus paired
bootstrap intervals of the differences the issue's target names.

    nohup .venv/bin/python eval/rounding_embedded.py > runs/rounding.log 2>&1 &
    .venv/bin/python eval/rounding_embedded.py --n 100 --iterations 500

Results: eval/results/rounding_embedded.json and .md. Per-config results are cached in
runs/rounding_embedded/ so an interrupted run resumes (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dq  # noqa: E402
import dq.api  # noqa: E402
import dq.assets  # noqa: E402
import dq.capture  # noqa: E402
import dq.formats  # noqa: E402
import dq.modules  # noqa: E402
import dq.quant  # noqa: E402
from dq import rounding as R  # noqa: E402
from dq.config import LayerSpec, QuantConfig  # noqa: E402
from dq.metrics import clip_score, evaluate_pipeline, to_float, to_uint8  # noqa: E402


@dataclass
class Settings:
    n_prompts: int = 100  # held-out prompts, one image each, same seeds for every pipeline
    n_calib: int = 32  # calibration prompts (MixDQ uses 32; dq's embedded recipe too)
    rows_per_layer: int = 1024  # reservoir rows per layer (dq.quantize's learned-rounding cap)
    seed: int = 0  # image i uses generator seed seed + i; also the capture's seed
    threads: int = 1  # torch CPU threads (the machine's 2 cores are shared)
    iterations: int = 500  # learned-rounding steps per layer (RoundingSettings' default)
    bootstrap: int = 1000  # bootstrap resamples of the prompts for every interval
    boot_seed: int = 0  # seed of the bootstrap resampling (same indices for every config)
    act: str = "uint8"  # activation format of every quantized layer (8-bit, calibrated)
    granularity: str = "channel"  # weight scales per output channel


# name -> (weight format, mode, timestep weighting of the reconstruction)
# mode: rtn (min-max, nearest), search (output-error scale [+ FP split] search, nearest),
# learned (AdaRound on the searched scales). Weighting: "timestep" (uniform per timestep, dq's
# default), "raw" (reservoir rows as sampled), "noise" (timestep weight sqrt(1 - alpha_bar)).
CONFIGS: dict[str, tuple[str, str, str]] = {
    "w4a8-fp4-rtn": ("fp4_e2m1", "rtn", "timestep"),
    "w4a8-fp4-search": ("fp4_e2m1", "search", "timestep"),
    "w4a8-fp4-learned": ("fp4_e2m1", "learned", "timestep"),
    "w4a8-int4-rtn": ("int4", "rtn", "timestep"),
    "w4a8-int4-search": ("int4", "search", "timestep"),
    "w4a8-int4-learned": ("int4", "learned", "timestep"),
    "w4a8-fp4-learned-raw": ("fp4_e2m1", "learned", "raw"),
    "w4a8-fp4-learned-noise": ("fp4_e2m1", "learned", "noise"),
    "w3a8-fp3-rtn": ("fp3_e2m0", "rtn", "timestep"),
    "w3a8-fp3-search": ("fp3_e2m0", "search", "timestep"),
    "w3a8-fp3-learned": ("fp3_e2m0", "learned", "timestep"),
    "w3a8-int3-rtn": ("int3", "rtn", "timestep"),
    "w3a8-int3-search": ("int3", "search", "timestep"),
    "w3a8-int3-learned": ("int3", "learned", "timestep"),
}

# name -> (dq.quantize config, rounding): rows built by the library's own path,
# `dq.quantize(pipe, config, calib_prompts=..., rounding=...)`, on the same calibration prompts.
# "w4a8" is the ILP-allocated mixed preset (sensitivity table of eval/allocate_embedded.py,
# cached there); the fp4 row checks that the pipeline path matches this script's own build.
PIPELINE_CONFIGS: dict[str, tuple[str, str]] = {
    "w4a8-fp4-learned-dq": ("fp4-channel-uint8", "learned"),
    "w4a8-ilp-rtn": ("w4a8", "nearest"),
    "w4a8-ilp-search": ("w4a8", "search"),
    "w4a8-ilp-learned": ("w4a8", "learned"),
    # the preset as shipped: its own default sensitivity table (max_steps=10), computed here
    "w4a8-ilp10-rtn": ("w4a8-default-table", "nearest"),
}
ALL_CONFIGS = [*CONFIGS, *PIPELINE_CONFIGS]

# metrics with a per-prompt value (bootstrap of the mean); FID is resampled as image sets
PER_PROMPT = ("psnr_vs_ref", "feature_dist_vs_ref", "clip_score", "acc_all")
METRICS = (*PER_PROMPT, "fid_vs_ref")
# paired differences the issue's target names (a - b; PSNR higher is better, FID lower)
TARGETS = (
    ("w4a8-fp4-learned", "w4a8-fp4-rtn"),
    ("w4a8-fp4-learned", "w4a8-int4-rtn"),
    ("w4a8-fp4-learned", "w4a8-int4-learned"),
    ("w3a8-int3-learned", "w3a8-int3-rtn"),
    ("w4a8-fp4-learned-raw", "w4a8-fp4-learned"),
    ("w4a8-fp4-learned-noise", "w4a8-fp4-learned"),
    ("w4a8-fp4-learned-dq", "w4a8-fp4-learned"),
    ("w4a8-ilp-learned", "w4a8-ilp-rtn"),
    ("w4a8-ilp-learned", "w4a8-fp4-learned"),
    ("w4a8-ilp-learned", "w4a8-int4-learned"),
    ("w4a8-ilp10-rtn", "w4a8-ilp-rtn"),
)

WORK = ROOT / "runs" / "rounding_embedded"


def log(msg: str) -> None:
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.2f}] {msg}", flush=True)


# ----- capture (cached) -----


def get_capture(
    s: Settings, call: dict, fresh: bool
) -> tuple[dq.capture.CalibrationRecord, dict, float]:
    """One capture of the FP pipeline on the calibration prompts: ranges, BOS token, rows."""
    from safetensors.torch import load_file, save_file

    path, meta_path = WORK / "capture.safetensors", WORK / "capture.json"
    key = {"n_calib": s.n_calib, "rows": s.rows_per_layer, "seed": s.seed, **call}
    if not fresh and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["key"] == key:
            log(
                f"capture: cached {path.relative_to(ROOT)} (took {meta['seconds']:.1f} s when made)"
            )
            record = dq.capture.CalibrationRecord.from_state_dict(load_file(str(path)))
            return record, {k: tuple(v) for k, v in meta["tail_ranges"].items()}, meta["seconds"]
    pipe = dq.assets.load_embedded_pipeline()
    plan = dq.api.resolve_plan(pipe.unet, QuantConfig(default=LayerSpec("int4", act=s.act)))
    bos_layers = dq.api.bos_candidates(plan)
    t0 = time.time()
    # token-1.. ranges of the cross-attention k/v inputs, as dq.quantize records them
    with dq.api._TokenRange(pipe.unet, bos_layers) as tail:
        record = dq.capture.capture(
            pipe, dq.assets.calibration_prompts()[: s.n_calib],
            num_inference_steps=call["num_inference_steps"], guidance_scale=call["guidance_scale"],
            height=call["height"], width=call["width"], max_samples_per_layer=s.rows_per_layer,
            max_bytes=1 << 30, max_unet_calls=0, seed=s.seed, progress=False,
        )  # fmt: skip
    seconds = time.time() - t0
    WORK.mkdir(parents=True, exist_ok=True)
    save_file(record.to_state_dict(), str(path))
    meta = {"key": key, "seconds": seconds, "tail_ranges": tail.ranges()}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"capture: {len(record.layers)} layers, {len(record.timesteps)} timesteps, {seconds:.1f} s")
    return record, tail.ranges(), seconds


# ----- building one quantized pipeline -----


def row_weights(record, name: str, weighting: str, noise: list[float]) -> torch.Tensor | None:
    t = record.layers[name].sample_timesteps
    if weighting == "raw":
        return None
    if weighting == "timestep":
        return R.timestep_row_weights(t)
    return R.timestep_row_weights(t, noise)  # "noise"


def build(pipe, record, tail_ranges, fmt: str, mode: str, weighting: str, s: Settings,
          noise: list[float]) -> tuple[dict, dict]:  # fmt: skip
    """Quantize `pipe.unet` in place; returns (timings, per-layer summary)."""
    unet = pipe.unet
    base = LayerSpec(fmt, s.granularity, "minmax", act=s.act)
    plan = {n: sp for n, sp in dq.api.resolve_plan(unet, QuantConfig(default=base)).items() if sp}
    times: dict[str, float] = {}
    qweights: dict = {}
    chosen: dict[str, int] = {}
    if mode in ("search", "learned"):
        t0 = time.time()
        width = dq.formats.get(fmt).bits
        is_fp = dq.formats.get(fmt).kind == "fp"
        for name, spec in plan.items():
            w = unet.get_submodule(name).weight
            rows = record.layers[name].samples
            r = R.timestep_row_weights(record.layers[name].sample_timesteps)
            if is_fp:
                f, qw = R.search_fp_format(w, width, rows, granularity=s.granularity, row_weights=r)
                plan[name] = dataclasses.replace(spec, weight=f.name)
            else:
                qw = R.search_scale(w, spec, rows, row_weights=r)
            chosen[qw.fmt.name] = chosen.get(qw.fmt.name, 0) + 1
            qweights[name] = qw
        times["search_s"] = time.time() - t0
        log(f"  search: {times['search_s']:.1f} s, formats {chosen}")
    if mode == "learned":
        rs = R.RoundingSettings(iterations=s.iterations,
                                timestep_weighting="none" if weighting == "raw" else "given")  # fmt: skip
        t0, load0 = time.time(), os.getloadavg()[0]
        todo = list(plan)
        for i, name in enumerate(todo):
            w = unet.get_submodule(name).weight
            rows = record.layers[name].samples
            qweights[name] = R.learn(w, plan[name], rows, rs, scale=qweights[name].scale,
                                     row_weights=row_weights(record, name, weighting, noise))  # fmt: skip
            if (i + 1) % 33 == 0 or i + 1 == len(todo):
                el = time.time() - t0
                log(f"  learned {i + 1}/{len(todo)} layers, {el:.0f} s, "
                    f"ETA {el / (i + 1) * (len(todo) - i - 1):.0f} s")  # fmt: skip
        times["learn_s"] = time.time() - t0
        times["learn_load"] = round((load0 + os.getloadavg()[0]) / 2, 2)
    # output error on the captured rows (the training rows) relative to the layer's output power
    rel = []
    for name, spec in plan.items():
        w = unet.get_submodule(name).weight
        rows = record.layers[name].samples
        qw = qweights[name] if name in qweights else dq.quant.quantize_weight(w, spec)
        err = float(R.output_mse(w, qw, rows).sum())
        power = float((rows @ w.detach().reshape(w.shape[0], -1).T).square().mean(0).sum())
        rel.append(err / max(power, 1e-30))
    act_ranges = {n: record.minmax(n) for n in plan}
    bos_layers = dq.api.bos_candidates(plan)
    bos = dq.api.prompt_independent_bos(record)
    if bos is not None:
        act_ranges.update({n: r for n, r in tail_ranges.items() if n in plan})
    t0 = time.time()
    dq.apply_plan(unet, plan, act_ranges, qweights, bos=bos, bos_layers=bos_layers)
    times["apply_s"] = time.time() - t0
    summary = {"layers": len(plan), "formats": chosen or {fmt: len(plan)},
               "rel_output_mse_mean": float(np.mean(rel)), "bos_aware": bos is not None}  # fmt: skip
    return times, summary


def build_with_dq(pipe, record, config: str, rounding: str, s: Settings, call: dict) -> tuple[dict, dict]:
    """Quantize `pipe` with `dq.quantize` itself; returns (timings, summary) like `build`
    (the relative output error measured on this script's captured rows)."""
    if config == "w4a8":
        sys.path.insert(0, str(ROOT / "eval"))
        from allocate_embedded import Settings as AllocSettings
        from allocate_embedded import load_table

        a = AllocSettings()
        table = ROOT / a.cache / "sensitivity" / "table.json"  # the table allocate_embedded used
        cfg, extra = "w4a8", {"sensitivity": table if table.is_file() else load_table(pipe, a)}
    elif config == "w4a8-default-table":
        cfg, extra = "w4a8", {}
    else:  # "fp4-channel-uint8"
        cfg, extra = QuantConfig(default=LayerSpec("fp4_e2m1", s.granularity, "minmax", act=s.act)), {}
    settings = R.RoundingSettings(iterations=s.iterations) if rounding == "learned" else None
    fp_unet = dq.assets.load_embedded_pipeline().unet
    t0, load0 = time.time(), os.getloadavg()[0]
    dq.quantize(pipe, cfg, calib_prompts=dq.assets.calibration_prompts()[: s.n_calib], progress=False,
                calibration={k: call[k] for k in ("num_inference_steps", "guidance_scale", "height", "width")},
                rounding=rounding, rounding_settings=settings, **extra)  # fmt: skip
    times = {"quantize_s": time.time() - t0, "learn_load": round((load0 + os.getloadavg()[0]) / 2, 2)}
    chosen: dict[str, int] = {}
    rel = []
    for name, m in pipe.unet.named_modules():
        if not isinstance(m, dq.modules.QuantizedLayerMixin):
            continue
        chosen[m.spec.weight] = chosen.get(m.spec.weight, 0) + 1
        w = fp_unet.get_submodule(name).weight
        rows = record.layers[name].samples
        err = float(R.output_mse(w, m.qweight(), rows).sum())
        power = float((rows @ w.detach().reshape(w.shape[0], -1).T).square().mean(0).sum())
        rel.append(err / max(power, 1e-30))
    summary = {"layers": len(rel), "formats": chosen, "rel_output_mse_mean": float(np.mean(rel)),
               "config": config, "rounding": rounding}  # fmt: skip
    log(f"  dq.quantize({config!r}, rounding={rounding!r}): {times['quantize_s']:.0f} s, formats {chosen}")
    return times, summary


# ----- per-prompt metrics and the bootstrap -----


@torch.no_grad()
def per_prompt(images, ref, prompts, labels, ev) -> dict[str, np.ndarray]:
    from dq.metrics import attribute_accuracy  # noqa: F401  (same judge; per image below)

    x, y = to_float(images), to_float(ref)
    mse = (x - y).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    psnr = (10 * torch.log10(1.0 / mse)).clamp(max=100)  # as dq.metrics.psnr_vs_reference
    fa, fb = ev.fid_feature(to_uint8(images)).double(), ev.fid_feature(to_uint8(ref)).double()
    fdist = 1 - torch.nn.functional.cosine_similarity(fa, fb, dim=-1)
    clip = clip_score(
        images, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer, reduce=False
    )
    out = ev.classifier(x)
    ok = torch.ones(len(labels), dtype=torch.bool)
    for k, vals in ev.values.items():
        pred = out[k].argmax(-1)
        for i, lab in enumerate(labels):
            if k in lab:
                ok[i] &= vals[int(pred[i])] == lab[k]
    return {"psnr_vs_ref": psnr.numpy(), "feature_dist_vs_ref": fdist.numpy(),
            "clip_score": clip.numpy(), "acc_all": ok.float().numpy(),
            "feat": fa.numpy(), "ref_feat": fb.numpy()}  # fmt: skip


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets (as torchmetrics' FID on the same features)."""
    return float(frechet_batch(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0])


def frechet_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fréchet distances of B pairs of feature sets [B, n, d] (float64).

    ``tr sqrt(S1 S2)`` is the sum of the singular values of ``Xc Yc^T / (n - 1)`` (centred
    features; the non-zero eigenvalues of S1 S2 are the squared singular values of that n x n
    matrix): exact, and cheap when n <= d.
    """
    a, b = a.double(), b.double()
    n = a.shape[1]
    x, y = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    mean_term = (a.mean(1) - b.mean(1)).square().sum(-1)
    tr1, tr2 = x.square().sum((1, 2)) / (n - 1), y.square().sum((1, 2)) / (n - 1)
    tr_covmean = torch.linalg.svdvals(x @ y.transpose(1, 2) / (n - 1)).sum(-1)
    return mean_term + tr1 + tr2 - 2 * tr_covmean


def boot_indices(n: int, s: Settings) -> np.ndarray:
    return np.random.default_rng(s.boot_seed).integers(0, n, size=(s.bootstrap, n))


def stats_of(pp: dict, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every metric (same resampled prompts for every config)."""
    reps = {m: pp[m][idx].mean(1) for m in PER_PROMPT}
    ref, feat = torch.from_numpy(pp["ref_feat"]), torch.from_numpy(pp["feat"])
    fids = [frechet_batch(ref[c], feat[c]) for c in torch.from_numpy(idx).split(100)]
    reps["fid_vs_ref"] = torch.cat(fids).numpy()
    return reps


def interval(v: np.ndarray, point: float | None = None) -> list[float]:
    """Percentile 95% interval of bootstrap replicates ``v``.

    With ``point`` (used for FID) the replicates are first re-centred on it by the bootstrap's
    bias estimate ``mean(v) - point``: resampling with replacement duplicates images, which
    shrinks the feature covariance and inflates FID, so raw percentiles can exclude the point
    estimate itself. The raw percentiles are kept in the JSON as ``ci95_raw``.
    """
    shift = 0.0 if point is None else float(np.mean(v)) - point
    return [float(np.percentile(v, 2.5)) - shift, float(np.percentile(v, 97.5)) - shift]


# ----- main -----


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=ALL_CONFIGS, help=f"of {ALL_CONFIGS}")
    ap.add_argument("--n", type=int, default=Settings.n_prompts, help="held-out prompts")
    ap.add_argument("--iterations", type=int, default=Settings.iterations)
    ap.add_argument("--n-calib", type=int, default=Settings.n_calib)
    ap.add_argument("--bootstrap", type=int, default=Settings.bootstrap)
    ap.add_argument("--fresh", action="store_true", help="ignore cached capture and results")
    ap.add_argument("--out", default="eval/results/rounding_embedded", help="results path stem")
    a = ap.parse_args()
    s = Settings(n_prompts=a.n, iterations=a.iterations, n_calib=a.n_calib, bootstrap=a.bootstrap)
    unknown = [c for c in a.configs if c not in ALL_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {ALL_CONFIGS}")
    torch.set_num_threads(s.threads)
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    t_start = time.time()
    log(f"settings {s}")

    ev = dq.assets.load_evaluators()
    call = dq.assets.embedded_defaults()
    prompts, labels = dq.assets.heldout_prompts(s.n_prompts)
    record, tail_ranges, capture_s = get_capture(s, call, a.fresh)
    sched = dq.assets.load_embedded_pipeline().scheduler
    abar = sched.alphas_cumprod
    noise = [float((1 - abar[int(round(t))]).sqrt()) for t in record.timesteps]

    cache = WORK / f"rows-n{s.n_prompts}-it{s.iterations}-c{s.n_calib}"
    cache.mkdir(parents=True, exist_ok=True)
    fp_path = cache / "fp32.pt"
    if fp_path.exists() and not a.fresh:
        fp_res, fp_images = torch.load(fp_path, weights_only=False)
    else:
        t0 = time.time()
        fp_res, fp_images = evaluate_pipeline(dq.assets.load_embedded_pipeline(), prompts, ev, labels,
                                              seed=s.seed, **call)  # fmt: skip
        fp_res["eval_s"] = time.time() - t0
        torch.save((fp_res, fp_images), fp_path)
    log(f"fp32: clip {fp_res['clip_score']:.2f} acc_all {fp_res['acc_all']:.3f}")

    results: dict[str, dict] = {}
    per: dict[str, dict] = {}
    for name in a.configs:
        fmt, mode, weighting = CONFIGS.get(name) or (*PIPELINE_CONFIGS[name], "timestep")
        path = cache / f"{name}.pt"
        if path.exists() and not a.fresh:
            results[name], per[name] = torch.load(path, weights_only=False)
            log(f"{name}: cached")
            continue
        log(f"{name}: {fmt} {mode} ({weighting})")
        pipe = dq.assets.load_embedded_pipeline()
        if name in PIPELINE_CONFIGS:
            times, summary = build_with_dq(pipe, record, fmt, mode, s, call)
        else:
            times, summary = build(pipe, record, tail_ranges, fmt, mode, weighting, s, noise)
        t0 = time.time()
        res, images = evaluate_pipeline(
            pipe, prompts, ev, labels, reference=fp_images, seed=s.seed, **call
        )
        times["eval_s"] = time.time() - t0
        res.update(times=times, **summary, fmt=fmt, mode=mode, weighting=weighting)
        pp = per_prompt(images, fp_images, prompts, labels, ev)
        results[name], per[name] = res, pp
        torch.save((res, pp), path)
        log(f"{name}: psnr {res['psnr_vs_ref']:.2f} fid_vs_ref {res['fid_vs_ref']:.3f} "
            f"clip {res['clip_score']:.2f} acc {res['acc_all']:.3f} rel_mse {summary['rel_output_mse_mean']:.4f} "
            f"times {({k: round(v, 1) for k, v in times.items()})}")  # fmt: skip

    # the bootstrap: one set of resampled prompt indices for every config (paired)
    idx = boot_indices(s.n_prompts, s)
    reps = {name: stats_of(pp, idx) for name, pp in per.items()}
    for name, res in results.items():
        pp = per[name]
        res["ci95"] = {m: interval(reps[name][m]) for m in PER_PROMPT}
        res["ci95"]["fid_vs_ref"] = interval(reps[name]["fid_vs_ref"], res["fid_vs_ref"])
        res["ci95_raw"] = {"fid_vs_ref": interval(reps[name]["fid_vs_ref"])}
        res["fid_vs_ref_features"] = frechet(pp["ref_feat"], pp["feat"])  # check vs torchmetrics
    fp_acc = float(np.mean(fp_res["acc_all"])) if "acc_all" in fp_res else None
    fp_res["ci95"] = {}
    if fp_acc is not None:
        fp_pp = per_prompt(fp_images, fp_images, prompts, labels, ev)
        fp_res["ci95"] = {m: interval(fp_pp[m][idx].mean(1)) for m in ("clip_score", "acc_all")}
    diffs = {}
    for x, y in TARGETS:
        if x in reps and y in reps:
            diffs[f"{x} - {y}"] = {
                m: {"diff": float(np.mean(per[x][m]) - np.mean(per[y][m])) if m in PER_PROMPT
                    else results[x]["fid_vs_ref"] - results[y]["fid_vs_ref"],
                    "ci95": interval(reps[x][m] - reps[y][m], None if m in PER_PROMPT else
                                     results[x]["fid_vs_ref"] - results[y]["fid_vs_ref"])}
                for m in ("psnr_vs_ref", "fid_vs_ref")
            }  # fmt: skip

    command = " ".join([".venv/bin/python eval/rounding_embedded.py", *sys.argv[1:]])
    total_s = time.time() - t_start
    stages_s = (
        capture_s
        + fp_res.get("eval_s", 0.0)
        + sum(sum(v for k, v in r["times"].items() if k.endswith("_s")) for r in results.values())
    )
    doc = {"command": command, "settings": dataclasses.asdict(s), "sampling": call,
           "capture_s": capture_s, "total_s": total_s, "stages_s": stages_s, "cpu_count": os.cpu_count(),
           "noise_weights": noise, "fp32": fp_res, "rows": results, "paired_differences": diffs}  # fmt: skip
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    table = _table(doc)
    out.with_suffix(".md").write_text(table)
    print(table, flush=True)
    log(f"done in {total_s:.0f} s")


def _ci(r: dict, m: str, digits: int) -> str:
    v = r.get(m)
    if v is None:
        return "—"
    lo, hi = r.get("ci95", {}).get(m, (None, None))
    if lo is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _table(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        "# Learned rounding on the embedded pipeline (issue #12)", "",
        f"`{doc['command']}`", "",
        f"{s['n_prompts']} held-out prompts (same seeds for every pipeline), {s['n_calib']} "
        f"calibration prompts, {s['rows_per_layer']} captured rows per layer, weights per output "
        f"channel, {s['act']} activations (calibrated min-max, BOS-aware as dq.quantize), "
        f"{s['iterations']} learned-rounding iterations per layer, torch threads {s['threads']}. "
        f"Intervals: bootstrap 95% over prompts ({s['bootstrap']} resamples; FID on resampled "
        "paired image sets). acc_all: share of images with every prompted attribute right.", "",
        "| config | PSNR vs FP (dB) | feature dist vs FP | FID vs FP | CLIP score | acc_all | "
        "rel. output MSE | search s | learn s (load) | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    fp = doc["fp32"]
    lines.append(f"| fp32 | — | — | — | {_ci(fp, 'clip_score', 2)} | {_ci(fp, 'acc_all', 3)} | — | — | — "
                 f"| {fp.get('eval_s', 0):.0f} |")  # fmt: skip
    for name, r in doc["rows"].items():
        t = r["times"]
        learn = f"{t['learn_s']:.0f} ({t['learn_load']:.1f})" if "learn_s" in t else "—"
        if "quantize_s" in t:  # a dq.quantize row: its whole call (calibration included)
            learn = f"{t['quantize_s']:.0f} ({t['learn_load']:.1f}), whole dq.quantize"
        search = f"{t['search_s']:.0f}" if "search_s" in t else "—"
        lines.append(
            f"| {name} | {_ci(r, 'psnr_vs_ref', 2)} | {_ci(r, 'feature_dist_vs_ref', 4)} | "
            f"{_ci(r, 'fid_vs_ref', 3)} | {_ci(r, 'clip_score', 2)} | {_ci(r, 'acc_all', 3)} | "
            f"{r['rel_output_mse_mean']:.4f} | {search} | {learn} | {t['eval_s']:.0f} |"
        )
    lines += ["", "Formats chosen by the FP split search (layers): " + "; ".join(
        f"{n}: {r['formats']}" for n, r in doc["rows"].items() if r["mode"] == "search"), ""]  # fmt: skip
    lines += ["## Paired differences (same resampled prompts)", "",
              "| a - b | PSNR diff (dB) [95%] | FID diff [95%] |", "|---|---|---|"]  # fmt: skip
    for k, d in doc["paired_differences"].items():
        p, f = d["psnr_vs_ref"], d["fid_vs_ref"]
        lines.append(f"| {k} | {p['diff']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | "
                     f"{f['diff']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}] |")  # fmt: skip
    lines += ["", f"Capture: {doc['capture_s']:.0f} s. Sum of every measured stage (capture, FP "
              f"and all builds and evaluations): {doc['stages_s'] / 60:.1f} min; wall time of "
              f"this invocation: {doc['total_s']:.0f} s (cached stages not re-run). CPU cores: "
              f"{doc['cpu_count']}, shared; load = 1-minute load average during learning.",
              "FID intervals: bootstrap percentiles re-centred by the bootstrap's bias estimate "
              "(duplicated images inflate FID); raw percentiles in the JSON (ci95_raw).",
              "rel. output MSE: mean over layers of the output error on the captured rows "
              "divided by the layer's output power (training rows).", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
