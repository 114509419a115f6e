"""BOS-aware against BOS-unaware text-embedding quantization on the embedded pipeline, at W8A8
and at dq's mixed W4A8 (CLIP score and PSNR vs full precision, bootstrap 95% intervals).

    .venv/bin/python eval/bos_embedded.py

Writes eval/results/bos_embedded.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dq  # noqa: E402
from dq import assets, metrics  # noqa: E402
from dq.generate import Sampling, generate  # noqa: E402


@dataclass
class Settings:
    n_prompts: int = 100  # held-out prompts, one image each, same seeds for every pipeline
    n_calib: int = 32  # calibration prompts (as the allocation comparison)
    bootstrap: int = 1000  # resamples of the prompts for the intervals
    table: str = "runs/allocate_embedded/sensitivity/table.json"  # cached table for mixed w4a8
    threads: int = 1  # torch threads (the 2 cores are shared)


def _interval(values: torch.Tensor, n: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (n, len(values)), generator=g)
    means = values[idx].mean(dim=1)
    return [round(float(means.quantile(0.025)), 3), round(float(means.quantile(0.975)), 3)]


def main() -> None:
    s = Settings()
    torch.set_num_threads(s.threads)
    ev = assets.load_evaluators()
    prompts = assets.heldout_prompts(s.n_prompts)[0]
    calib = assets.calibration_prompts()[: s.n_calib]
    call = dq.recipes.get("embedded").calibration.call_kwargs()
    sampling = Sampling(batch_size=50, **call)
    fp = generate(assets.load_embedded_pipeline(), prompts, sampling)
    fp_clip = metrics.clip_score(fp, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer)
    rows = {"fp32": {"clip_score": round(fp_clip, 3)}}
    configs = {
        "w8a8": dq.QuantConfig.from_preset("w8a8"),
        "w4a8 (mixed, ILP)": "w4a8",
    }
    for name, cfg in configs.items():
        for bos in (True, False):
            pipe = assets.load_embedded_pipeline()
            pipe.set_progress_bar_config(disable=True)
            t0 = time.time()
            if isinstance(cfg, str):
                target = replace(dq.api.MIXED_PRESETS[cfg])
                qcfg = dq.api._allocated_config(pipe, target, calib, sampling, s.table, None, False)
                qcfg = replace(qcfg, bos_aware=bos)
            else:
                qcfg = replace(cfg, bos_aware=bos)
            dq.quantize(pipe, qcfg, calib_prompts=calib, calibration=call, progress=False)
            imgs = generate(pipe, prompts, sampling)
            mse = (imgs - fp).pow(2).flatten(1).mean(1)  # per prompt
            psnr = -10 * torch.log10(mse.clamp_min(1e-12))
            clip = metrics.clip_score(imgs, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer)
            bos_layers = sum(1 for m in pipe.unet.modules() if "bos_output" in getattr(m, "_buffers", {}))
            key = f"{name} {'BOS-aware' if bos else 'BOS-unaware'}"
            rows[key] = {
                "psnr_vs_fp": round(float(psnr.mean()), 3), "psnr_ci95": _interval(psnr, s.bootstrap),
                "clip_score": round(clip, 3), "bos_layers": bos_layers, "seconds": round(time.time() - t0, 1),
            }
            print(key, rows[key], flush=True)
    out = {"settings": asdict(s), "rows": rows, "command": ".venv/bin/python eval/bos_embedded.py"}
    (ROOT / "eval/results/bos_embedded.json").write_text(json.dumps(out, indent=1))
    md = ["# BOS-aware vs BOS-unaware on the embedded pipeline", "", f"Command: `{out['command']}`", "",
          f"{s.n_prompts} held-out prompts (same seeds), {s.n_calib} calibration prompts, 8-bit activations; "
          "PSNR is the mean of per-image PSNR vs full precision with a bootstrap 95% interval over prompts.",
          "", "| config | PSNR vs FP (dB) | CLIP score | BOS layers |", "|---|---|---|---|",
          f"| fp32 | — | {rows['fp32']['clip_score']} | — |"]
    for k, r in rows.items():
        if k != "fp32":
            md.append(f"| {k} | {r['psnr_vs_fp']} {r['psnr_ci95']} | {r['clip_score']} | {r['bos_layers']} |")
    (ROOT / "eval/results/bos_embedded.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
