"""Does the embedded world rank quantization? FP vs dq configs on held-out prompts, one run.

For each config the embedded pipeline is loaded afresh, quantized (activation ranges calibrated
on the shipped calibration prompts), and evaluated on the same held-out prompts and seeds as
full precision: attribute accuracy (shipped judge), CLIP score (shipped tiny CLIP), FID vs real
images of the world, and against the FP images: PSNR, SSIM, FID, feature distance.

    .venv/bin/python eval/embedded_quant_quality.py
    .venv/bin/python eval/embedded_quant_quality.py --configs w8a8 w4-rtn --n 100

Results: eval/results/embedded_quant_quality.json and .md (the table below the command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import dq  # noqa: E402
import dq.assets  # noqa: E402
from dq.config import LayerSpec, QuantConfig  # noqa: E402
from dq.metrics import evaluate_pipeline, fid  # noqa: E402


@dataclass
class Settings:
    n_prompts: int = 200  # held-out prompts, one image each (same seeds for every config)
    n_calib: int = 32  # calibration prompts (MixDQ uses 32)
    seed: int = 0  # image i uses generator seed seed + i
    real_seed: int = 1000  # jitter seed of the real images for FID vs real
    threads: int = 2  # torch CPU threads


# name -> config; "w4-rtn" is uniform 4-bit weights, per channel, round-to-nearest with
# min-max scales: the naive baseline the world must show as damaged.
CONFIGS = {
    "w8a8": "w8a8",
    # int8 without the preset's pair limit (|w[2j]| + |w[2j+1]| <= 128 for AVX2's one-pass engine)
    "w8a8-full": QuantConfig(default=LayerSpec("int8", "channel", act="uint8"), name="w8a8-full"),
    "w7a8": "w7a8",
    "fp8": "fp8",
    "w4a16": "w4a16",
    "fp4": "fp4",
    "w4-rtn": QuantConfig(default=LayerSpec("int4", "channel", "minmax"), name="w4-rtn"),
    "w3-rtn": QuantConfig(default=LayerSpec("int3", "channel", "minmax"), name="w3-rtn"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"of {list(CONFIGS)}")
    ap.add_argument("--n", type=int, default=Settings.n_prompts)
    a = ap.parse_args()
    s = Settings(n_prompts=a.n)
    torch.set_num_threads(s.threads)
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")

    ev = dq.assets.load_evaluators()
    call = dq.assets.embedded_defaults()
    prompts, labels = dq.assets.heldout_prompts(s.n_prompts)
    calib = dq.assets.calibration_prompts()[: s.n_calib]
    real = dq.assets.real_images(labels, s.real_seed)
    real2 = dq.assets.real_images(labels, s.real_seed + 10_000)

    rows = {}
    pipe = dq.assets.load_embedded_pipeline()
    t0 = time.time()
    fp_res, fp_images = evaluate_pipeline(pipe, prompts, ev, labels, real=real, seed=s.seed, **call)
    fp_res["fid_real_vs_real"] = fid(real, real2, feature=ev.fid_feature)  # noise floor
    fp_res["seconds"] = round(time.time() - t0, 1)
    rows["fp32"] = fp_res
    print(_line("fp32", fp_res), flush=True)
    for name in a.configs:
        pipe = dq.assets.load_embedded_pipeline()
        t0 = time.time()
        dq.quantize(pipe, CONFIGS[name], calib_prompts=calib, progress=False,
                    calibration={"num_inference_steps": call["num_inference_steps"],
                                 "guidance_scale": call["guidance_scale"]})  # fmt: skip
        res, _ = evaluate_pipeline(pipe, prompts, ev, labels, real=real, reference=fp_images, seed=s.seed, **call)
        res["seconds"] = round(time.time() - t0, 1)
        rows[name] = res
        print(_line(name, res), flush=True)

    out = ROOT / "eval" / "results" / "embedded_quant_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python eval/embedded_quant_quality.py", *sys.argv[1:]])
    out.write_text(json.dumps({"command": command, "settings": s.__dict__, "sampling": call, "rows": rows},
                              indent=1, default=str) + "\n")  # fmt: skip
    out.with_suffix(".md").write_text(_table(rows, command, s))
    print(_table(rows, command, s))


COLUMNS = ["acc_colour", "acc_shape", "acc_all", "clip_score", "fid_real", "psnr_vs_ref", "ssim_vs_ref", "fid_vs_ref"]


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))


def _line(name: str, r: dict) -> str:
    return f"{name:8s} " + "  ".join(f"{c}={_fmt(r.get(c))}" for c in COLUMNS)


def _table(rows: dict, command: str, s: Settings) -> str:
    head = "| config | " + " | ".join(COLUMNS) + " |"
    lines = [f"`{command}` ({s.n_prompts} held-out prompts, same seeds)", "", head,
             "|" + "---|" * (len(COLUMNS) + 1)]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    floor = rows["fp32"].get("fid_real_vs_real")
    lines += ["", f"FID noise floor (real vs real, same prompts): {_fmt(floor)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
