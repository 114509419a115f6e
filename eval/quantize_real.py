"""Quantizing real-size UNets: time, memory, bytes, save/reload and speed, per model and preset.

The SD 1.5 and SDXL UNets are built with seeded random weights (fp32) from the configs dq's
recipes ship (nothing is downloaded). Each (model, preset) runs in a fresh child process, so
memory peaks do not mix. The child

1. builds the UNet and times its fp32 forward (batch 1, a small latent: median of `repeats`);
2. quantizes it with `dq.quantize_model(unet, preset, calibrate)`, where `calibrate` runs
   `calib_calls` UNet calls on random latents, timesteps and text embeddings of the right shapes
   (SDXL also gets `added_cond_kwargs` text_embeds / time_ids); the calibration calls are timed
   on their own, so weight encoding = total - calibration (w4a16 is weight-only: no calibration);
   wall and CPU seconds, and the resident-set peak during quantization (sampled every 50 ms);
3. reports the UNet's bytes after quantization and after its first forward (the CPU engine's
   packed weight replaces the int8 codes then): `get_memory_footprint()`, the kernel cache
   (`dq.kernels.cache_nbytes`) and what the UNet holds, both together without double counting;
4. times the quantized forward on the same inputs (same process as the fp32 timing);
5. saves it (`save_pretrained`), reloads it with `UNet2DConditionModel.from_pretrained` after
   `import dq`, and checks the reloaded output equals the quantized one.

    .venv/bin/python eval/quantize_real.py                           # both models, both presets
    .venv/bin/python eval/quantize_real.py --models sd15 --presets w8a8
    .venv/bin/python eval/quantize_real.py --search-check            # MSE search vs exhaustive

Results: eval/results/quantize_real.json and .md (with the load average, since other jobs share
this machine's two cores).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


@dataclass
class Settings:
    models: tuple[str, ...] = ("sd15", "sdxl")  # dq.recipes names with a UNet config
    presets: tuple[str, ...] = ("w8a8", "w4a16")  # dq presets (w4a16: MSE scale search)
    latent: dict[str, int] = field(default_factory=lambda: {"sd15": 32, "sdxl": 32})  # latent side (256 px)
    calib_calls: int = 2  # UNet calls of the calibration run (random inputs, distinct timesteps)
    repeats: int = 3  # timed forwards per config (median reported)
    warmup: int = 1  # untimed forwards before timing (the quantized one packs the engine weights)
    threads: int = 2  # torch intra-op threads (this machine has 2 cores)
    seed: int = 0  # weights and inputs
    progress: bool = True  # dq's progress bars (to stderr, kept out of the JSON)
    out: str = "eval/results/quantize_real.json"  # results; the .md table beside it


# --- the child: one (model, preset) ----------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """The resident set's high-water mark while the block runs, sampled in a thread."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every)

    def __enter__(self) -> _PeakRSS:
        self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _inputs(unet, lat: int, seed: int) -> dict:
    """One batch-1 UNet call's random inputs at latent side `lat` (SDXL's added conditions too)."""
    from dq.latency import unet_inputs

    return unet_inputs(unet, batch=1, latent=lat, seed=seed)


def _median_forward(unet, inputs: dict, s: Settings) -> tuple[float, object]:
    import torch

    with torch.inference_mode():
        for _ in range(s.warmup):
            out = unet(**inputs).sample
        times = []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            out = unet(**inputs).sample
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _held_bytes(unet) -> dict:
    """What the UNet holds (`dq.kernels.held_nbytes`: parameters, buffers, and the kernel
    cache entries of its layers that are not buffers), its footprint and its cache."""
    import dq.kernels

    return {"footprint": unet.get_memory_footprint(), "cache": dq.kernels.cache_nbytes(unet),
            "held": dq.kernels.held_nbytes(unet)}


def child(model: str, preset: str, s: Settings) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    import dq
    from dq import recipes

    torch.set_num_threads(s.threads)
    rss_start = _rss()
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(copy.deepcopy(recipes.get(model).unet_config)).eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    fp32_bytes = sum(t.nbytes for t in (*unet.parameters(), *unet.buffers()))
    fp16_bytes = fp32_bytes // 2
    lat = s.latent[model]
    x = _inputs(unet, lat, s.seed + 1000)
    fp32_s, _ = _median_forward(unet, x, s)
    gc.collect()

    calib = [_inputs(unet, lat, s.seed + i) for i in range(s.calib_calls)]
    calib_s = [0.0, 0.0]  # wall, cpu

    def calibrate(m) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for kw in calib:
                m(**kw)
        calib_s[0] += time.perf_counter() - w0
        calib_s[1] += time.process_time() - c0

    rss_before = _rss()
    w0, c0 = time.perf_counter(), time.process_time()
    with _PeakRSS() as peak:
        dq.quantize_model(unet, preset, calibrate=calibrate, progress=s.progress)
    total_s, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    gc.collect()
    after_quant = _held_bytes(unet)
    rss_after = _rss()
    with torch.inference_mode():
        unet(**x)
    after_forward = _held_bytes(unet)
    q_s, q_out = _median_forward(unet, x, s)
    rss_after_forward = _rss()

    folder = Path(tempfile.mkdtemp(prefix=f"dq-{model}-{preset}-"))
    try:
        t0 = time.perf_counter()
        unet.save_pretrained(folder)
        save_s = time.perf_counter() - t0
        saved = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        del unet
        gc.collect()
        t0 = time.perf_counter()
        again = UNet2DConditionModel.from_pretrained(folder).eval()
        reload_s = time.perf_counter() - t0
        with torch.inference_mode():
            same = bool(torch.equal(again(**x).sample, q_out))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    ex_s, ex_cpu = total_s - calib_s[0], total_cpu - calib_s[1]
    return {
        "model": model,
        "preset": preset,
        "params": n_params,
        "fp32_bytes": fp32_bytes,
        "fp16_bytes": fp16_bytes,
        "build_s": round(build_s, 1),
        "quantize_s": round(total_s, 1),
        "quantize_cpu_s": round(total_cpu, 1),
        "calibration_s": round(calib_s[0], 1),
        "calibration_cpu_s": round(calib_s[1], 1),
        "weights_s": round(ex_s, 1),  # everything but the calibration calls
        "weights_cpu_s": round(ex_cpu, 1),
        "rss_start": rss_start,  # after imports, before the model
        "rss_before_quantize": rss_before,
        "rss_peak_quantize": peak.peak,
        # peak above the process without a model, against the fp32 model's bytes
        "peak_over_fp32": round((peak.peak - rss_start) / fp32_bytes, 3),
        "rss_after_quantize": rss_after,
        "rss_after_forward": rss_after_forward,
        "held_after_quantize": after_quant,
        "held_after_forward": after_forward,
        "held_after_forward_vs_fp16": round(after_forward["held"] / fp16_bytes, 3),
        "saved_bytes": saved,
        "saved_vs_fp16": round(saved / fp16_bytes, 3),
        "save_s": round(save_s, 1),
        "reload_s": round(reload_s, 1),
        "reload_equal": same,
        "latent": lat,
        "fp32_forward_s": round(fp32_s, 3),
        "quant_forward_s": round(q_s, 3),
        "speed_vs_fp32": round(fp32_s / q_s, 2),
    }


# --- MSE search vs trying every shrink factor -----------------------------------------------


def search_check() -> list[dict]:
    """Total squared weight error of dq's MSE scale search against the exhaustive search (every
    shrink factor 1 - i/100) and min-max, on the embedded UNet's trained weights and on normal
    weights, for the 4-bit group formats of the presets."""
    import torch

    import dq.assets
    from dq import formats
    from dq import quant as Q

    torch.manual_seed(0)
    unet = dq.assets.load_embedded_pipeline().unet
    trained = torch.cat([m.weight.detach().reshape(-1) for m in unet.modules()
                         if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)])
    sources = {"embedded UNet (trained)": trained, "normal": torch.randn(1 << 20)}
    rows = []
    for label, w in sources.items():
        for fmt_name, g in (("int4", 64), ("fp4_e2m1", 32), ("int3", 64)):
            fmt = formats.get(fmt_name)
            xr = w[: w.numel() // g * g].reshape(-1, g)

            def err(scale, xr=xr, fmt=fmt) -> float:
                return float(Q._row_errors(xr, fmt, scale, None).double().square().sum())

            hi = xr.abs().amax(dim=1, keepdim=True)
            s_mm, _ = Q._qparams_from_range(hi, hi, fmt, True)
            s_dq, _ = Q.compute_qparams(xr, fmt, Q.PerGroup(g), method="mse")
            best, s_ex = Q._row_errors(xr, fmt, s_mm, None), s_mm  # every i, keep strict gains
            for i in range(1, 100):
                s_a, _ = Q._qparams_from_range(hi * (1 - i / 100), hi * (1 - i / 100), fmt, True)
                e = Q._row_errors(xr, fmt, s_a, None)
                better = e < best
                best, s_ex = torch.where(better, e, best), torch.where(better, s_a, s_ex)
            ex = err(s_ex)
            rows.append({"weights": label, "format": f"{fmt_name} group{g}",
                         "dq_vs_exhaustive": round(err(s_dq.reshape(-1, 1)) / ex - 1, 5),
                         "minmax_vs_exhaustive": round(err(s_mm) / ex - 1, 4)})
    return rows


# --- the parent --------------------------------------------------------------------------------


def _md(s: Settings, rows: list[dict], command: str, load: dict, check: list[dict] | None) -> str:
    gb = lambda b: f"{b / GB:.2f}"  # noqa: E731
    out = [
        "# Quantizing real-size UNets (random weights, fp32, CPU)",
        "",
        f"`{command}`",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{s.threads}; load average (1/5/15 min) before {load['before']}, after {load['after']} "
        "(other jobs share these cores: wall times are upper bounds, CPU seconds steadier).",
        "",
        "Quantize = `dq.quantize_model` wall time; calibration = its UNet calls (random inputs, "
        f"{s.calib_calls} calls); weights = the rest (plan, checks, scale search, encoding). Peak = "
        "resident-set high-water mark during quantization minus the process before the model "
        "was built, over the fp32 model's bytes. Held = what the UNet holds after its first "
        "forward (parameters, buffers, engine weights, kernel cache), over its fp16 bytes.",
        "",
        "| model | preset | params | quantize s | calibration s | weights s (CPU s) | peak / fp32 | "
        "held after quantize GB | held after forward GB | held / fp16 | saved / fp16 | "
        "reload s | reload equal | fp32 fwd s | quant fwd s | speed vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['preset']} | failed: {r['error']} |")
            continue
        out.append(
            f"| {r['model']} | {r['preset']} | {r['params'] / 1e9:.2f} B | {r['quantize_s']} | "
            f"{r['calibration_s']} | {r['weights_s']} ({r['weights_cpu_s']}) | {r['peak_over_fp32']} "
            f"({gb(r['rss_peak_quantize'] - r['rss_start'])} of {gb(r['fp32_bytes'])} GB) | "
            f"{gb(r['held_after_quantize']['held'])} | {gb(r['held_after_forward']['held'])} | "
            f"{r['held_after_forward_vs_fp16']} | {r['saved_vs_fp16']} | {r['reload_s']} | "
            f"{r['reload_equal']} | {r['fp32_forward_s']} | {r['quant_forward_s']} | "
            f"{r['speed_vs_fp32']}x |"
        )
    out.append("")
    out.append(f"Forward: batch 1, latent {s.latent} (side), median of {s.repeats} after {s.warmup} warm-up.")
    if check:
        out += ["", "## MSE scale search vs trying every shrink factor (total squared weight error)",
                "", "| weights | format | dq search vs exhaustive | min-max vs exhaustive |",
                "|---|---|---|---|"]
        out += [f"| {c['weights']} | {c['format']} | {100 * c['dq_vs_exhaustive']:+.3f} % | "
                f"{100 * c['minmax_vs_exhaustive']:+.1f} % |" for c in check]
    return "\n".join(out) + "\n"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(Settings.models))
    ap.add_argument("--presets", nargs="+", default=list(Settings.presets))
    ap.add_argument("--repeats", type=int, default=Settings.repeats)
    ap.add_argument("--search-check", action="store_true", help="also compare the MSE search with the exhaustive one")
    ap.add_argument("--out", default=Settings.out)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "PRESET"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    s = Settings(models=tuple(a.models), presets=tuple(a.presets), repeats=a.repeats, out=a.out)
    if a.child:
        print("RESULT " + json.dumps(child(*a.child, s)), flush=True)
        return

    command = "python eval/quantize_real.py " + " ".join(sys.argv[1:])
    load = {"before": _load()}
    rows = []
    for model in s.models:
        for preset in s.presets:
            print(f"== {model} {preset} (load {_load()})", flush=True)
            argv = [sys.executable, __file__, "--child", model, preset, "--repeats", str(s.repeats)]
            p = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
            found = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(found[-1][7:]) if found else {"model": model, "preset": preset,
                                                            "error": f"exit {p.returncode}"}
            row["load_after"] = _load()
            print(json.dumps(row, indent=1), flush=True)
            rows.append(row)
    load["after"] = _load()
    check = search_check() if a.search_check else None
    out = ROOT / s.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "settings": asdict(s), "load": load,
                               "rows": rows, "search_check": check}, indent=2) + "\n")
    out.with_suffix(".md").write_text(_md(s, rows, command, load, check))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
