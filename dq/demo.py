"""dq's main job (`dq run`): quantize the embedded pipeline, compare it with full precision and
write a report (Markdown + JSON), the image grid and the saved quantized pipeline.

Images and metrics come from `dq.evaluate` (the library behind `dq eval`): FID against the
full-precision images, CLIP score, PSNR / SSIM / feature distance (or LPIPS) against full
precision, with bootstrap intervals over the prompts, so a report on 8 images shows how far
its numbers can be trusted. UNet weights are counted against fp16, as stored and as resident
after a forward (the CPU engine compacts the weights on the first one). Speed is reported
twice, measured in the same run: the embedded UNet itself (1.5 M parameters, where per-call
overhead dominates) and the SD 1.5 UNet architecture with random weights (`real_size`),
which is what the preset does on the models people use.

    report = run_demo(DemoSettings(out=Path("out/run"), config="w8a8"))
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class DemoSettings:
    out: Path = Path("out/run")  # output folder (its images/ subfolder is rewritten each run)
    config: str = "w8a8"  # preset name or a QuantConfig JSON file
    pipeline: str | None = None  # pipeline folder; None = the embedded one in dq/data/
    num_prompts: int = 8  # held-out prompts to generate and compare
    num_calib: int = 16  # calibration prompts
    steps: int | None = None  # sampling steps; None = the pipeline's default for dq
    seed: int = 0  # prompt i draws its noise with seed + i; also the bootstrap seed
    save: bool = True  # also save the quantized pipeline under out/pipeline
    real_size: bool = True  # also time the SD 1.5 UNet (random weights) in fp32 and the preset (~1-2 min)
    real_size_latent: int = 32  # latent side of that timing (32: 256x256 images), batch 1
    real_size_repeats: int = 3  # timed forwards per config, alternating, after one warm-up each (median reported)
    evaluator: str = "embedded"  # judges of a --pipeline folder: "embedded" (offline), "standard" (downloads), "auto"

    def check(self):
        """Raise ValueError for settings that cannot work (before anything is loaded); returns
        the QuantConfig that `config` names."""
        import dq

        for name, low in (("num_prompts", 2), ("num_calib", 1), ("real_size_repeats", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(
                    f"{name}={v!r}: must be an int >= {low}"
                    + (" (the report compares image sets; CLI: --num-prompts)" if name == "num_prompts" else "")
                )
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps={self.steps!r}: must be an int >= 1, or None for the pipeline's default (CLI: --steps)")
        lat = self.real_size_latent
        if isinstance(lat, bool) or not isinstance(lat, int) or lat < 8 or lat % 8:
            raise ValueError(f"real_size_latent={lat!r}: must be a multiple of 8 (the SD 1.5 UNet halves it 3 times)")
        if self.evaluator not in ("embedded", "standard", "auto"):
            raise ValueError(f"evaluator={self.evaluator!r}: use 'embedded', 'standard' or 'auto'")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out={str(out)!r} is a file; give a folder for the report (CLI: --out)")
        if self.pipeline is not None and not (Path(self.pipeline) / "model_index.json").is_file():
            raise ValueError(
                f"pipeline={self.pipeline!r} is not a diffusers pipeline folder (no model_index.json); "
                "give a folder written by save_pretrained, or None for the embedded one (CLI: --pipeline)"
            )
        if self.save:
            from dq.serialization import check_save_target

            check_save_target(out / "pipeline")
        config = self.config
        if str(config).endswith(".json"):
            path = Path(config)
            if not path.is_file():
                raise ValueError(f"config file {config!r} does not exist; give a preset name or a QuantConfig JSON file (CLI: --config)")
            try:
                return dq.QuantConfig.from_json(path.read_text())
            except ValueError as e:
                raise ValueError(f"config file {config!r} is not a valid QuantConfig JSON: {e} (CLI: --config)") from None
        from dq.config import MIXED_PRESET_NAMES

        if str(config).lower().replace("-", "_") in MIXED_PRESET_NAMES:
            from dq.api import MIXED_PRESETS

            return MIXED_PRESETS[str(config).lower().replace("-", "_")]
        return dq.QuantConfig.from_preset(config)


def _load(settings: DemoSettings):
    """(pipeline, assets module or None): the embedded pipeline unless a folder is given."""
    from diffusers import DiffusionPipeline

    if settings.pipeline is not None:
        pipe = DiffusionPipeline.from_pretrained(settings.pipeline, dtype=torch.float32)
        return pipe, None
    from dq import assets

    if not assets.embedded_pipeline_path().is_dir():
        raise FileNotFoundError(
            f"the embedded pipeline is missing at {assets.embedded_pipeline_path()}; reinstall dq "
            "with its package data (dq/data/), set DQ_ASSETS to a folder holding tiny-shapes/, "
            "or pass --pipeline DIR"
        )
    return assets.load_embedded_pipeline(), assets


def _workload(settings: DemoSettings, assets_mod) -> tuple[list[str], list | None, list[str], dict]:
    """(eval prompts, their labels, calibration prompts, pipeline call kwargs)."""
    if assets_mod is not None:
        prompts, labels = assets_mod.heldout_prompts(settings.num_prompts)
        calib = assets_mod.calibration_prompts()[: settings.num_calib]
        call = assets_mod.embedded_defaults()
    else:
        base = ["a red circle", "a blue square", "a green triangle", "a small yellow star"]
        prompts = [base[i % len(base)] for i in range(settings.num_prompts)]
        labels, calib, call = None, base, {}
    if settings.steps is not None:
        call["num_inference_steps"] = settings.steps
    return prompts, labels, calib, call


# ------------------------------------------------------------------------------- measuring


def resident_bytes(unet: torch.nn.Module) -> int:
    """Bytes a UNet holds for its weights right now, float or quantized
    (`dq.kernels.held_nbytes`: parameters, buffers and the engine's copies outside them).

    Example:
        >>> resident_bytes(pipe.unet) / (2 * sum(p.numel() for p in pipe.unet.parameters()))
    """
    from dq.kernels import held_nbytes

    return held_nbytes(unet)


def _unet_inputs(unet: torch.nn.Module, batch: int, latent: int, ctx_len: int, seed: int) -> dict:
    """Random UNet inputs of one call (`dq.latency.unet_inputs`)."""
    from dq.latency import unet_inputs

    return unet_inputs(unet, batch=batch, latent=latent, text_len=ctx_len, seed=seed)


def _forward_times(unet: torch.nn.Module, inputs: dict, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` forwards after `warmup` untimed ones (the first packs weights)."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            unet(**inputs)
        for _ in range(repeats):
            t0 = time.perf_counter()
            unet(**inputs)
            times.append(time.perf_counter() - t0)
    return times


def _median_forward(unet: torch.nn.Module, inputs: dict, repeats: int, warmup: int = 1) -> float:
    return statistics.median(_forward_times(unet, inputs, repeats, warmup))


def _swap_in(root: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """Put `layers` ({dotted name: module}) into `root` in place of what is there."""
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, m)


def _embedded_unet_latency(unet: torch.nn.Module, pipe: Any, reps: int = 5) -> float:
    """The pipeline's own UNet call: batch 2 (classifier-free guidance), its latent size."""
    inputs = _unet_inputs(unet, 2, None, pipe.tokenizer.model_max_length, seed=1)
    return _median_forward(unet, inputs, reps)


def _plan_by_group(unet: torch.nn.Module) -> dict[str, Any]:
    """The most common LayerSpec per recipe layer group ("content", "quality") of a quantized
    UNet: how a mixed plan allocated on one model is carried to another architecture."""
    from dq import recipes
    from dq.modules import QuantizedLayerMixin

    recipe = recipes.recipe_for(unet)
    seen: dict[str, Counter] = {}
    for name, m in unet.named_modules():
        if isinstance(m, QuantizedLayerMixin):
            seen.setdefault(recipe.layer_group(name), Counter())[m.spec] += 1
    return {g: c.most_common(1)[0][0] for g, c in seen.items()}


def real_size_unet_config() -> dict:
    """The SD 1.5 UNet's constructor arguments (written out once in `dq.recipes`)."""
    from dq import recipes

    return dict(recipes.get("sd15").unet_config)


def real_size_speed(
    config: Any,
    *,
    unet_config: dict | None = None,
    group_plan: dict[str, Any] | None = None,
    latent: int = 32,
    repeats: int = 2,
    seed: int = 0,
) -> dict:
    """Time a real-size UNet's forward in fp32 and quantized, in one process, and free it.

    The UNet is built from its config with seeded random weights (speed and bytes do not
    depend on the values) and quantized in place (activation ranges from one call on random
    inputs of the same distribution) while its float layers are kept aside; then fp32 and
    quantized forwards alternate (the layers swapped in and out, one warm-up each), so load
    from other processes on a shared machine hits both alike. Medians of `repeats` each are
    reported with their range, and the quantized UNet's resident weight bytes against fp16.
    Peak memory: the fp32 UNet plus its quantized layers.

    Args:
        config: a QuantConfig (or preset name) to apply; ignored when `group_plan` is given.
        unet_config: UNet2DConditionModel arguments (default: SD 1.5's, `real_size_unet_config`).
        group_plan: {"content" | "quality": LayerSpec}: a mixed plan carried over by layer group
            (`_plan_by_group` of a quantized UNet); layers the recipe skips stay float.
        latent: latent side (pixels / 8), batch 1.
        repeats: timed forwards per configuration.
        seed: weights and inputs seed.

    Returns:
        {"params", "latent", "repeats", "build_s", "fp32_s", "quantize_s", "quantized_s",
        "speedup", "fp32_range_s", "quantized_range_s", "fp16_bytes", "fp32_resident_bytes",
        "resident_bytes", "resident_vs_fp16", "plan"}.

    Example:
        >>> real_size_speed("w8a8")["speedup"]   # SD 1.5, 32x32 latent: ~2x on this CPU
    """
    from diffusers import UNet2DConditionModel

    import dq

    cfg = dict(unet_config if unet_config is not None else real_size_unet_config())
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    build_s = time.perf_counter() - t0
    try:
        numel = sum(p.numel() for p in unet.parameters())
        inputs = _unet_inputs(unet, 1, latent, 77, seed=1)
        fp32_resident = resident_bytes(unet)
        floats = dq.quantizable_layers(unet)  # kept aside: fp32 is timed with these swapped back in
        if group_plan is not None:
            from dq import recipes

            recipe = recipes.recipe_for(unet)
            layers = {n: group_plan.get(recipe.layer_group(n)) for n in floats if not recipe.is_skipped(n)}
            qcfg = dq.QuantConfig(default=None, layers=layers, name="plan-by-group")
            used = Counter(s.weight for s in layers.values() if s is not None)
            plan = f"the embedded plan's format per layer group: {dict(used)}"
        else:
            qcfg = dq.QuantConfig.from_preset(config) if isinstance(config, str) else config
            plan = qcfg.name
        calib = _unet_inputs(unet, 1, latent, 77, seed=100)

        def calibrate(model):
            with torch.inference_mode():
                model(**calib)

        t0 = time.perf_counter()
        dq.quantize_model(unet, qcfg, calibrate=calibrate, progress=False)
        quantize_s = time.perf_counter() - t0
        quantized = {n: unet.get_submodule(n) for n in floats}
        times: dict[str, list[float]] = {"fp32": [], "q": []}
        for i in range(repeats + 1):  # round 0: one warm-up each (the quantized one compacts its weights)
            for key, layers in (("fp32", floats), ("q", quantized)):
                _swap_in(unet, layers)
                t = _forward_times(unet, inputs, 1, warmup=0)
                if i:
                    times[key] += t
        q_resident = resident_bytes(unet)  # the quantized layers are in place (the float ones aside)
        fp32_s, q_s = statistics.median(times["fp32"]), statistics.median(times["q"])
    finally:
        del unet
        floats = quantized = None
        gc.collect()
    return {
        "params": numel, "latent": latent, "batch": 1, "repeats": repeats, "build_s": round(build_s, 2),
        "fp32_s": round(fp32_s, 4), "quantize_s": round(quantize_s, 2), "quantized_s": round(q_s, 4),
        "speedup": round(fp32_s / q_s, 3), "fp32_range_s": [round(min(times["fp32"]), 4), round(max(times["fp32"]), 4)],
        "quantized_range_s": [round(min(times["q"]), 4), round(max(times["q"]), 4)], "fp16_bytes": 2 * numel, "fp32_resident_bytes": fp32_resident,
        "resident_bytes": q_resident, "resident_vs_fp16": round(q_resident / (2 * numel), 4), "plan": plan,
    }  # fmt: skip


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) if folder.is_dir() else 0


def _model_name(config: str) -> str:
    name = Path(config).stem if str(config).endswith(".json") else str(config).lower().replace("-", "_")
    return "quantized" if name == "reference" else name


def _attribute_all_right(files: list[Path], labels: list, ev: Any) -> list[float]:
    """Per image 1.0 when the embedded attribute classifier finds every attribute its prompt names."""
    from dq import evaluate as E
    from dq import metrics

    images = E._load_images(files)
    return [metrics.attribute_accuracy(images[i : i + 1], labels[i : i + 1], ev.classifier, ev.values)["all"]
            for i in range(len(files))]  # fmt: skip


# ------------------------------------------------------------------------------- the job


def run_demo(settings: DemoSettings) -> dict:
    """Run the main job and return the report dict (also written to out/report.json).

    Args:
        settings: what to quantize, how many prompts, whether to time the SD 1.5 UNet.

    Example:
        >>> run_demo(DemoSettings(out=Path("out/run"), real_size=False))["unet_weight_bytes"]["resident_vs_fp16"]
        0.53
    """
    import dq
    from dq import evaluate as E
    from dq.generate import Sampling

    config = settings.check()  # every setting checked before the first model loads
    if settings.pipeline is None:
        from dq import assets

        n_max = len(assets.heldout_prompts()[0]) if assets.embedded_pipeline_path().is_dir() else None
        if n_max is not None and settings.num_prompts > n_max:
            raise ValueError(
                f"num_prompts={settings.num_prompts}: the embedded world has {n_max} held-out "
                f"prompts; use at most {n_max} (CLI: --num-prompts)"
            )
    torch.manual_seed(settings.seed)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    fp_pipe, assets_mod = _load(settings)
    q_pipe, _ = _load(settings)  # a second copy, quantized in place below
    for p in (fp_pipe, q_pipe):
        p.set_progress_bar_config(disable=True)
    prompts, labels, calib, call = _workload(settings, assets_mod)
    ev = assets_mod.load_evaluators() if assets_mod is not None else None
    name = _model_name(settings.config)

    t0 = time.perf_counter()
    calib_call = {k: v for k, v in call.items() if k in ("num_inference_steps", "guidance_scale", "height", "width")}
    dq.quantize(q_pipe, config, calib_prompts=calib, progress=False, calibration=calib_call)
    quant_seconds = time.perf_counter() - t0

    # the tiny UNet's own forward; the quantized one's warm-up also compacts its weights
    emb_fp, emb_q = _embedded_unet_latency(fp_pipe.unet, fp_pipe), _embedded_unet_latency(q_pipe.unet, q_pipe)
    fp_w, q_w = E.weight_bytes(fp_pipe.unet), E.weight_bytes(q_pipe.unet)
    fp16 = fp_w["fp16_bytes"]
    weights = {
        "fp16": fp16,
        "fp32": fp_w["bytes"],
        "stored": q_w["bytes"], "stored_vs_fp16": round(q_w["bytes"] / fp16, 4),
        "resident": resident_bytes(q_pipe.unet), "avg_bits": round(q_w["avg_bits"], 3),
    }  # fmt: skip
    weights["resident_vs_fp16"] = round(weights["resident"] / fp16, 4)

    # images and metrics: dq.evaluate, on a fresh folder (a resumed one could hold another config's images)
    images = out / "images"
    if images.exists():
        shutil.rmtree(images)
    sampling = Sampling.from_kwargs(seed=settings.seed, batch_size=min(len(prompts), 8), **call)
    eval_settings = E.EvalSettings(evaluator=settings.evaluator, device="cpu", seed=settings.seed,
                                   grid_prompts=min(8, len(prompts)))  # fmt: skip
    ev_report = E.evaluate({name: q_pipe}, prompts, reference=fp_pipe, out=images, sampling=sampling,
                           evaluators=ev if ev is not None else settings.evaluator, progress=False,
                           settings=eval_settings, shard=(0, 1), command="dq run")  # fmt: skip
    ref_row, q_row = ev_report["models"]
    point = {r["name"]: {k: v for k, v in r["metrics"].items() if v is not None} for r in ev_report["models"]}
    ci = {r["name"]: {k: list(v) for k, v in r["ci"].items()} for r in ev_report["models"]}
    if ev is not None and labels is not None and ev.classifier is not None:
        for r in (ref_row, q_row):
            vals = _attribute_all_right([images / r["name"] / f"{i}.png" for i in range(len(prompts))], labels, ev)
            point[r["name"]]["attributes_all_right"] = sum(vals) / len(vals)
            ci[r["name"]]["attributes_all_right"] = list(E.bootstrap_interval(vals, eval_settings.bootstrap,
                                                                              eval_settings.confidence, settings.seed))  # fmt: skip
    shutil.copy(images / "grid.png", out / "grid.png")

    per_image = {r["name"]: r["latency_s_per_image"]["median"] for r in (ref_row, q_row)}
    speed: dict[str, Any] = {
        "embedded_unet": {
            "fp32_s": round(emb_fp, 5), "quantized_s": round(emb_q, 5), "speedup": round(emb_fp / emb_q, 3),
            "params": sum(p.numel() for p in fp_pipe.unet.parameters()), "batch": 2, "repeats": 5,
        },
        "embedded_pipeline_per_image": {
            "fp32_s": round(per_image[E.REFERENCE], 4), "quantized_s": round(per_image[q_row["name"]], 4),
            "speedup": round(per_image[E.REFERENCE] / per_image[q_row["name"]], 3), "batch": sampling.batch_size,
        },
    }  # fmt: skip
    if settings.save:
        q_pipe.save_pretrained(out / "pipeline")
        weights["saved_file"] = _dir_bytes(out / "pipeline" / "unet")
        weights["saved_file_vs_fp16"] = round(weights["saved_file"] / fp16, 4)
    group_plan = _plan_by_group(q_pipe.unet) if isinstance(config, dq.MixedPrecision) else None
    del fp_pipe, q_pipe
    gc.collect()
    if settings.real_size:
        print(f"dq run: timing the SD 1.5 UNet (random weights) in fp32 and {settings.config} ...", flush=True)
        speed["sd15_unet"] = real_size_speed(
            config, unet_config=real_size_unet_config(), group_plan=group_plan,
            latent=settings.real_size_latent, repeats=settings.real_size_repeats, seed=settings.seed,
        )
    else:
        speed["sd15_unet"] = {"skipped": "real_size=False (CLI: --no-real-size)"}

    report = {
        "config": settings.config,
        "pipeline": settings.pipeline or "embedded (dq/data)",
        "num_prompts": len(prompts),
        "seed": settings.seed,
        "sampling": call,
        "quantize_seconds": round(quant_seconds, 2),
        "unet_weight_bytes": weights,
        "speed": speed,
        "fp": _round(point[E.REFERENCE]),
        "quantized": _round(point[q_row["name"]]),
        "intervals": {
            "method": f"percentile bootstrap {round(100 * eval_settings.confidence)}% of the mean over the "
                      f"{len(prompts)} prompts, {eval_settings.bootstrap} resamples",
            "fp": {k: [round(a, 4), round(b, 4)] for k, (a, b) in ci[E.REFERENCE].items()},
            "quantized": {k: [round(a, 4), round(b, 4)] for k, (a, b) in ci[q_row["name"]].items()},
        },
        "judges": {"fid": ev_report["fid"]["feature"], "clip": ev_report["clip"], "perceptual": ev_report["perceptual"]},
        "images": str(images),
    }  # fmt: skip
    if settings.save:
        report["saved"] = str(out / "pipeline")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"dq: wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'}")
    return report


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------- the report

# report key -> label, in table order (FID is a set statistic: no interval)
_LABELS = {
    "attributes_all_right": "attributes all right (embedded classifier)",
    "clip_score": "CLIP score",
    "psnr_vs_ref": "PSNR vs full precision (dB)",
    "ssim_vs_ref": "SSIM vs full precision",
    "lpips_vs_ref": "LPIPS vs full precision",
    "feature_dist_vs_ref": "feature distance vs full precision",
    "fid_ref": "FID vs full precision",
}


def _g(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}"


def _bytes_row(label: str, n: int, fp16: int) -> str:
    return f"| {label} | {n:,} | {n / fp16:.3f}x |"


def _t(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _speed_row(label: str, s: dict, unit: float = 1.0, suffix: str = "s") -> str:
    x = s["speedup"]
    verdict = f"{x:.2f}x ({'faster' if x >= 1 else 'slower'})"
    return f"| {label} | {_t(s['fp32_s'] * unit)} {suffix} | {_t(s['quantized_s'] * unit)} {suffix} | {verdict} |"


def _markdown(r: dict) -> str:
    name, n = r["config"], r["num_prompts"]
    lines = [f"# dq run: {name} on {r['pipeline']}", "",
             f"{n} held-out prompts (prompt i uses seed {r['seed']} + i), sampling {r['sampling']}; quantization took "
             f"{r['quantize_seconds']} s. Images, grid and the `dq eval` report of this run: `{r['images']}`.", "",
             "## Quality", "",
             f"Mean over the {n} images [{r['intervals']['method']}]. With this few images the intervals "
             "are wide: they show the spread, not a precise score (`eval/results/eval_embedded.md` has "
             "300 prompts). FID is a set statistic (no interval) and on a few images mostly small-sample bias.", "",
             f"| metric | full precision | {name} |", "|---|---|---|"]  # fmt: skip
    for k, label in _LABELS.items():
        if k not in r["quantized"] and k not in r["fp"]:
            continue
        cells = []
        for side in ("fp", "quantized"):
            v = r[side].get(k)
            lohi = r["intervals"][side].get(k)
            cells.append("—" if v is None else _g(v) + (f" [{_g(lohi[0])}, {_g(lohi[1])}]" if lohi else ""))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    j = r["judges"]
    lines += ["", f"Judges: CLIP {j['clip']}; FID features {j['fid']}; perceptual: {j['perceptual']}.", ""]

    w = r["unet_weight_bytes"]
    fp16 = w["fp16"]
    lines += ["## UNet weights, against fp16", "", "| weights | bytes | vs fp16 |", "|---|---:|---:|",
              _bytes_row("fp16 (the baseline)", fp16, fp16),
              _bytes_row("full precision as loaded (fp32)", w["fp32"], fp16),
              _bytes_row(f"{name}, stored (codes, scales, float layers; {w['avg_bits']:.2f} bits/weight)", w["stored"], fp16),
              _bytes_row(f"{name}, resident after a forward (parameters, buffers, engine copies)", w["resident"], fp16)]  # fmt: skip
    if "saved_file" in w:
        lines.append(_bytes_row(f"{name}, saved unet/ safetensors on disk", w["saved_file"], fp16))

    sp = r["speed"]
    e, p, s = sp["embedded_unet"], sp["embedded_pipeline_per_image"], sp["sd15_unet"]
    lines += ["", "## Speed (fp32 and the preset measured in this run, this machine)", "",
              f"| what is timed | fp32 | {name} | {name} vs fp32 |", "|---|---:|---:|---:|"]
    if "skipped" not in s:
        lines.append(_speed_row(f"**SD 1.5 UNet forward** (real size: {s['params'] / 1e6:.0f} M parameters, random "
                                f"weights; {s['latent']}x{s['latent']} latent, batch 1, median of {s['repeats']})", s))  # fmt: skip
    which = "embedded" if r["pipeline"].startswith("embedded") else "this pipeline's"
    lines += [_speed_row(f"{which} UNet forward ({e['params'] / 1e6:.1f} M parameters, batch {e['batch']}, "
                         f"median of {e['repeats']})", e, 1e3, "ms"),
              _speed_row(f"{which} pipeline, per image (text encoder, UNet steps, VAE; batch {p['batch']})", p)]  # fmt: skip
    lines.append("")
    if "skipped" not in s:
        lines.append(f"The SD 1.5 line is what {name} does on the models people use: the same UNet "
                     f"architecture with random weights (speed does not depend on their values), built, "
                     f"quantized ({s['plan']}; {s['quantize_s']} s, activation ranges from one random-input call), "
                     f"then fp32 and quantized forwards alternated in this process (fp32 "
                     f"{s['fp32_range_s'][0]:.3g}-{s['fp32_range_s'][1]:.3g} s, quantized "
                     f"{s['quantized_range_s'][0]:.3g}-{s['quantized_range_s'][1]:.3g} s); resident weights "
                     f"{s['resident_bytes']:,} B = {s['resident_vs_fp16']:.3f}x fp16.")  # fmt: skip
    else:
        lines.append(f"The real-size SD 1.5 UNet timing was skipped ({s['skipped']}).")
    if e["speedup"] < 1:
        tiny = "The embedded UNet's layers have 32-64 channels" if which == "embedded" else "This pipeline's UNet is small"
        lines += ["", f"{tiny}: per call, "
                  "quantizing the input, dispatching the kernel and dequantizing the output cost more than "
                  f"the small matrix product saves, so there {name} is slower than fp32 (per-call overhead, "
                  "not the arithmetic)."]  # fmt: skip
    lines += ["", "Times are medians on this machine, which may be shared: treat them as rough.", "",
              "![grid](grid.png) — top row full precision, below it the quantized pipeline (same prompts and seeds)", ""]  # fmt: skip
    return "\n".join(lines)
