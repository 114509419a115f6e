"""dq's main job (`dq run`): quantize the embedded pipeline, compare it with full precision,
write a report (Markdown + JSON) and an image grid (top row full precision, bottom quantized)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class DemoSettings:
    out: Path = Path("out/run")  # output folder
    config: str = "w8a8"  # preset name or a QuantConfig JSON file
    pipeline: str | None = None  # pipeline folder; None = the embedded one in assets/
    num_prompts: int = 8  # held-out prompts to generate and compare
    num_calib: int = 16  # calibration prompts
    steps: int | None = None  # sampling steps; None = the pipeline's default for dq
    seed: int = 0  # generator seed for every image
    save: bool = True  # also save the quantized pipeline under out/pipeline
    extra: dict = field(default_factory=dict)


def _load(settings: DemoSettings):
    from diffusers import DiffusionPipeline

    if settings.pipeline is not None:
        pipe = DiffusionPipeline.from_pretrained(settings.pipeline, torch_dtype=torch.float32)
        return pipe, None
    try:
        from dq import assets

        return assets.load_embedded_pipeline(), assets
    except (ImportError, FileNotFoundError, AttributeError):
        from dq.testing import tiny_sd_pipeline

        print("dq: embedded pipeline not found; using a tiny random pipeline built offline")
        return tiny_sd_pipeline(seed=settings.seed), None


def _prompts(assets_mod, n: int, split: str) -> list[str]:
    if assets_mod is not None and hasattr(assets_mod, "prompts"):
        return list(assets_mod.prompts(split))[:n]
    base = ["a red circle", "a blue square", "a green triangle", "a small yellow star",
            "a large purple circle on a white background", "a tiny orange square at the top"]
    return [base[i % len(base)] for i in range(n)]


def _generate(pipe, prompts, settings, steps) -> torch.Tensor:
    g = torch.Generator().manual_seed(settings.seed)
    kw = {} if steps is None else {"num_inference_steps": steps}
    out = pipe(prompts, generator=g, output_type="pt", **kw)
    return out.images.float().clamp(0, 1)  # [N, 3, H, W]


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
    from dq.quant import sqnr_db

    torch.manual_seed(settings.seed)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    pipe, assets_mod = _load(settings)
    pipe.set_progress_bar_config(disable=True)
    steps = settings.steps
    eval_prompts = _prompts(assets_mod, settings.num_prompts, "heldout")
    calib_prompts = _prompts(assets_mod, settings.num_calib, "calib")

    fp_images = _generate(pipe, eval_prompts, settings, steps)
    fp_bytes = _nbytes(pipe.unet)
    fp_latency = _unet_latency(pipe.unet, pipe)
    fp_unet = copy.deepcopy(pipe.unet) if settings.extra.get("keep_fp") else None

    config = settings.config
    if config.endswith(".json"):
        config = dq.QuantConfig.from_json(Path(config).read_text())
    t0 = time.perf_counter()
    kw = {} if steps is None else {"num_inference_steps": steps}
    dq.quantize(pipe, config, calib_prompts=calib_prompts, **kw)
    quant_seconds = time.perf_counter() - t0
    q_images = _generate(pipe, eval_prompts, settings, steps)
    q_bytes = _nbytes(pipe.unet)
    q_latency = _unet_latency(pipe.unet, pipe)

    mse = torch.mean((fp_images - q_images) ** 2).item()
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
    report = {
        "config": settings.config,
        "pipeline": settings.pipeline or "embedded",
        "prompts": eval_prompts,
        "quantize_seconds": round(quant_seconds, 2),
        "unet_bytes_fp32": fp_bytes,
        "unet_bytes_quantized": q_bytes,
        "unet_bytes_ratio": round(q_bytes / fp_bytes, 4),
        "unet_latency_fp32_s": round(fp_latency, 4),
        "unet_latency_quantized_s": round(q_latency, 4),
        "unet_speedup": round(fp_latency / q_latency, 3),
        "psnr_vs_fp_db": round(psnr, 2),
        "image_sqnr_vs_fp_db": round(float(sqnr_db(fp_images, q_images)), 2),
    }
    if assets_mod is not None and hasattr(assets_mod, "load_evaluators"):
        try:
            from dq import metrics

            ev = assets_mod.load_evaluators()
            report["clip_score_fp"] = round(float(metrics.clip_score(fp_images, eval_prompts, **ev.clip_kwargs())), 4)
            report["clip_score_quantized"] = round(float(metrics.clip_score(q_images, eval_prompts, **ev.clip_kwargs())), 4)
        except (ImportError, AttributeError, TypeError) as e:  # evaluators optional for the job
            report["evaluator_note"] = f"evaluators unavailable: {e}"
    _grid(fp_images, q_images, out / "grid.png")
    if settings.save:
        pipe.save_pretrained(out / "pipeline")
        report["saved"] = str(out / "pipeline")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# dq run: {settings.config}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.items() if k != "prompts"]
    lines += ["", "![grid](grid.png) (top: full precision, bottom: quantized)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"dq: wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'}")
    return report


def settings_dict(s: DemoSettings) -> dict:
    d = asdict(s)
    d["out"] = str(s.out)
    return d
