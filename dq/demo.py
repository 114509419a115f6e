"""dq's main job (`dq run`): quantize the embedded pipeline, compare it with full precision,
write a report (Markdown + JSON) and an image grid (top row full precision, bottom quantized)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DemoSettings:
    out: Path = Path("out/run")  # output folder
    config: str = "w8a8"  # preset name or a QuantConfig JSON file
    pipeline: str | None = None  # pipeline folder; None = the embedded one in dq/data/
    num_prompts: int = 8  # held-out prompts to generate and compare
    num_calib: int = 16  # calibration prompts
    steps: int | None = None  # sampling steps; None = the pipeline's default for dq
    seed: int = 0  # generator seed for every image
    save: bool = True  # also save the quantized pipeline under out/pipeline

    def check(self):
        """Raise ValueError for settings that cannot work (before anything is loaded); returns
        the QuantConfig that `config` names."""
        import dq

        for name, low in (("num_prompts", 2), ("num_calib", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(
                    f"{name}={v!r}: must be an int >= {low}"
                    + (" (the report compares image sets; CLI: --num-prompts)" if name == "num_prompts" else "")
                )
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps={self.steps!r}: must be an int >= 1, or None for the pipeline's default (CLI: --steps)")
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


def _unet_latency(unet, pipe, reps: int = 5) -> float:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(2, cfg.in_channels, size, size)
    enc_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    ctx = torch.randn(2, pipe.tokenizer.model_max_length, enc_dim)
    t = torch.tensor([10, 10])
    times = []
    with torch.inference_mode():
        unet(x, t, ctx)
        for _ in range(reps):
            t0 = time.perf_counter()
            unet(x, t, ctx)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _grid(fp: torch.Tensor, q: torch.Tensor, path: Path) -> None:
    from PIL import Image

    rows = torch.cat([torch.cat(list(fp), dim=2), torch.cat(list(q), dim=2)], dim=1)  # [3, 2H, NW]
    arr = (rows.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    scale = max(1, 256 // fp.shape[-1])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def run_demo(settings: DemoSettings) -> dict:
    """Run the main job and return the report dict (also written to out/report.json)."""
    import dq
    from dq import metrics

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
    pipe, assets_mod = _load(settings)
    pipe.set_progress_bar_config(disable=True)
    prompts, labels, calib, call = _workload(settings, assets_mod)
    ev = assets_mod.load_evaluators() if assets_mod is not None else None

    def evaluate(reference=None):
        if ev is None:
            imgs = metrics.generate(pipe, prompts, settings.seed, **call)
            res = {}
            if reference is not None:
                res["psnr_vs_ref"] = metrics.psnr_vs_reference(imgs, reference)
            return res, imgs
        return metrics.evaluate_pipeline(
            pipe, prompts, ev, labels, reference=reference, seed=settings.seed, **call
        )

    fp_res, fp_images = evaluate()
    fp_bytes, fp_latency = _nbytes(pipe.unet), _unet_latency(pipe.unet, pipe)

    t0 = time.perf_counter()
    calib_call = {k: v for k, v in call.items() if k in ("num_inference_steps", "guidance_scale", "height", "width")}
    dq.quantize(pipe, config, calib_prompts=calib, progress=False, calibration=calib_call)
    quant_seconds = time.perf_counter() - t0
    q_res, q_images = evaluate(reference=fp_images)
    q_latency = _unet_latency(pipe.unet, pipe)  # also fills the CPU engine's prepack cache
    q_bytes = _nbytes(pipe.unet) + dq.kernels.cache_nbytes(pipe.unet)  # codes, scales + prepacked copies

    report = {
        "config": settings.config,
        "pipeline": settings.pipeline or "embedded (dq/data)",
        "num_prompts": len(prompts),
        "sampling": call,
        "quantize_seconds": round(quant_seconds, 2),
        "unet_weight_bytes": {"fp32": fp_bytes, "quantized": q_bytes, "ratio": round(q_bytes / fp_bytes, 4)},
        "unet_latency_s": {"fp32": round(fp_latency, 4), "quantized": round(q_latency, 4),
                           "speedup": round(fp_latency / q_latency, 3)},
        "fp": _round(fp_res),
        "quantized": _round(q_res),
    }
    _grid(fp_images[:8], q_images[:8], out / "grid.png")
    if settings.save:
        pipe.save_pretrained(out / "pipeline")
        report["saved"] = str(out / "pipeline")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"dq: wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'}")
    return report


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def _markdown(r: dict) -> str:
    lines = [f"# dq run: {r['config']} on {r['pipeline']}", ""]
    lines += ["| metric | full precision | quantized |", "|---|---|---|"]
    keys = [k for k, v in r["quantized"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in keys:
        if k in ("n", "seed") or k in r["sampling"]:
            continue
        lines.append(f"| {k} | {r['fp'].get(k, '—')} | {r['quantized'][k]} |")
    wb, lat = r["unet_weight_bytes"], r["unet_latency_s"]
    lines.append(f"| UNet weight bytes | {wb['fp32']:,} | {wb['quantized']:,} ({wb['ratio']:.3f}x) |")
    lines.append(f"| UNet forward (s) | {lat['fp32']} | {lat['quantized']} (speedup {lat['speedup']:.2f}x) |")
    lines += ["", f"quantization took {r['quantize_seconds']} s; sampling {r['sampling']}", "",
              "![grid](grid.png) — top row full precision, bottom row quantized (same seeds)", ""]
    return "\n".join(lines)
