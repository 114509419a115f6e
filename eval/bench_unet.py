"""UNet forward latency, peak memory and weight bytes: fp32 vs dq presets vs peers, one run.

    .venv/bin/python eval/bench_unet.py                      # embedded + SD1.5-size UNet
    .venv/bin/python eval/bench_unet.py --models tiny --configs fp32 dq-w8a8

Every (model, config) runs in a fresh child process, so memory numbers are not polluted by
earlier runs: the child builds the model (seeded random weights for the real-size SD 1.5 UNet
config; the shipped weights for the embedded pipeline), quantizes it (activation ranges
calibrated on a few inputs of the benchmark's distribution), then measures

- latency: median of `repeats` timed forwards after `warmup` untimed ones, batch 1;
- resident weight memory: bytes of every parameter and buffer plus dq's prepacked-kernel cache;
- peak memory during the timed forwards: the process's RSS high-water mark, reset just before
  them (Linux `/proc/self/clear_refs`), minus nothing: it is the whole process, so the fp32 row
  is the baseline to compare with.

Ratios are against fp32 measured in the same run. Results go to eval/results/bench_unet.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dq import recipes


@dataclass
class Settings:
    models: tuple[str, ...] = ("sd15", "embedded", "embedded-pipeline")  # also "tiny"
    configs: tuple[str, ...] = (
        "fp32", "dq-w8a8", "dq-w8a8-full", "dq-w7a8", "dq-w4a8-uniform", "dq-w4a8-mixed", "dq-w4a8-mixed-pattern", "dq-w4a16", "dq-fp8",
        "torchao-int8-dynamic", "torchao-int8-weight-only", "quanto-w8a8",
    )
    sd15_latent: int = 32  # latent side for the SD 1.5 UNet: 256 px images, ~2-3 s per fp32 forward here
    embedded_batch: int = 2  # the embedded pipeline runs classifier-free guidance: batch 2
    repeats: int = 5  # timed forwards (median reported)
    warmup: int = 2  # untimed forwards first (kernel caches, allocator)
    threads: int = 2  # torch intra-op threads (this machine has 2 cores)
    out: Path = Path("eval/results/bench_unet.json")
    seed: int = 0


# --- the SD 1.5 UNet, built offline from its published config (written out once, in dq.recipes)
SD15_UNET_CONFIG = recipes.get("sd15").unet_config


def build_model(name: str, s: Settings):
    """(unet, make_inputs(seed) -> kwargs) for a benchmark model."""
    from diffusers import UNet2DConditionModel

    if name == "sd15":
        torch.manual_seed(s.seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
        lat, batch, ctx_len, ctx_dim = s.sd15_latent, 1, 77, 768
    elif name == "embedded":
        from dq import assets

        pipe = assets.load_embedded_pipeline()
        unet = pipe.unet.eval()
        cfg = unet.config
        lat = cfg.sample_size
        batch, ctx_len, ctx_dim = s.embedded_batch, pipe.tokenizer.model_max_length, cfg.cross_attention_dim
    elif name == "tiny":
        from dq.testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(seed=s.seed)
        unet = pipe.unet.eval()
        lat, batch, ctx_len, ctx_dim = unet.config.sample_size, 2, 77, unet.config.cross_attention_dim
    else:
        raise ValueError(f"unknown model {name!r}; use embedded, tiny or sd15")

    def make_inputs(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {
            "sample": torch.randn(batch, 4, lat, lat, generator=g),
            "timestep": torch.tensor(500 + 37 * seed),
            "encoder_hidden_states": torch.randn(batch, ctx_len, ctx_dim, generator=g),
        }

    return unet, make_inputs


def apply_config(unet, config: str, make_inputs) -> str | None:
    """Quantize `unet` in place per `config`; returns a note (or raises if unavailable)."""
    if config == "fp32":
        return None
    if config.startswith("dq-"):
        import dq

        calib = [make_inputs(100 + i) for i in range(2)]

        def calibrate(model):
            with torch.inference_mode():
                for inp in calib:
                    model(**inp)

        note = None
        if config in ("dq-w4a8-mixed", "dq-w4a8-mixed-pattern"):
            cfg, note = mixed_cpu_plan(unet) if config == "dq-w4a8-mixed" else pattern_plan(unet)
            dq.quantize_model(unet, cfg, calibrate=calibrate, progress=False)
            return note
        cfg = dq_config(config)
        if cfg.default.weight_method != "minmax":
            # latency and bytes do not depend on how scales were searched; min-max keeps the
            # quantization step of an 860M-parameter UNet short
            cfg = replace(cfg, default=replace(cfg.default, weight_method="minmax"))
            note = "scales: min-max (preset uses MSE search; same bytes and kernels)"
        dq.quantize_model(unet, cfg, calibrate=calibrate, progress=False)
        return note
    if config.startswith("torchao-"):
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        cfg = Int8DynamicActivationInt8WeightConfig() if "dynamic" in config else Int8WeightOnlyConfig()
        quantize_(unet, cfg)
        return None
    if config == "quanto-w8a8":
        from optimum.quanto import Calibration, freeze, qint8
        from optimum.quanto import quantize as qquantize

        qquantize(unet, weights=qint8, activations=qint8)
        with Calibration(), torch.inference_mode():
            for i in range(2):
                unet(**make_inputs(100 + i))
        freeze(unet)
        return None
    raise ValueError(f"unknown config {config!r}")


def _status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; a wrapper subclass (torchao's quantized weights) counts the
    inner tensors it holds, not its nominal dtype."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _weight_bytes(unet) -> int:
    """Every parameter and buffer, plus dq's prepacked engine copies (resident weight memory)."""
    n = sum(_tensor_bytes(t) for t in unet.state_dict().values())
    if any(type(m).__module__.startswith("dq.") for m in unet.modules()):
        from dq import kernels

        n += kernels.cache_nbytes(unet)
    return n


def run_one(model: str, config: str, s: Settings) -> dict:
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    unet, make_inputs = build_model(model, s)
    try:
        note = apply_config(unet, config, make_inputs)
    except Exception as e:  # a peer that fails on this torch/CPU is reported, not fatal
        return {"model": model, "config": config, "error": f"{type(e).__name__}: {e}"[:300]}
    gc.collect()
    inp = make_inputs(1)
    with torch.inference_mode():
        for _ in range(s.warmup):
            unet(**inp)
        gc.collect()
        rss_before = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        times = []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            out = unet(**inp).sample
            times.append(time.perf_counter() - t0)
        peak = _status("VmHWM")
    return {
        "model": model, "config": config, "latency_s": statistics.median(times),
        "weight_bytes": _weight_bytes(unet), "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak, "out_norm": float(out.float().norm()), "note": note,
    }


# engine formats of a CPU-allocated plan with 8-bit activations (dq.allocate.backend_weight_formats)
MIXED_CANDIDATES = ("int3", "int4", "int6", "int8", "fp4_e2m1", "fp4_e3m0", "fp6_e2m3")


def mixed_cpu_plan(unet):
    """A mixed W4A8 plan allocated for the CPU backend by the ILP (dq.allocate.solve_choice)
    under the bytes of uniform per-channel INT4 (scales counted), on this UNet's real shapes.
    Random weights have no image-level sensitivity, so the losses are a data-free proxy (each
    candidate's relative weight error x the layer's size); latency depends only on the formats
    chosen, all of which run on the int8 engine."""
    import numpy as np

    import dq
    from dq import allocate, quant
    from dq.storage import spec_nbytes

    cands = allocate.backend_weight_formats(MIXED_CANDIDATES, "cpu", "uint8")
    layers = [(n, m) for n, m in dq.quantizable_layers(unet).items() if n not in ("conv_in", "conv_out")]
    loss = np.zeros((len(layers), len(cands)))
    cost = np.zeros_like(loss)
    for i, (_, m) in enumerate(layers):
        w = m.weight.detach()
        for j, c in enumerate(cands):
            spec = dq.LayerSpec(c, "channel", act="uint8")
            qw = quant.quantize_weight(w, spec)
            rel = float((qw.dequantize() - w).pow(2).sum() / w.pow(2).sum())
            loss[i, j] = rel * w.numel()
            cost[i, j] = spec_nbytes(spec, w.shape)
    budget = sum(spec_nbytes(dq.LayerSpec("int4", "channel", act="uint8"), m.weight.shape) for _, m in layers)
    choice = allocate.solve_choice(loss, cost, budget)
    plan = {n: dq.LayerSpec(cands[c], "channel", act="uint8") for (n, _), c in zip(layers, choice, strict=True)}
    used = {f: int((np.array([cands[c] for c in choice]) == f).sum()) for f in cands}
    note = f"ILP plan for the cpu backend, bytes <= uniform INT4 ({budget} B): {used}; losses: weight-error proxy"
    return dq.QuantConfig(default=None, layers=plan, name="w4a8-mixed-cpu"), note


def pattern_plan(unet):
    """The format pattern dq's ILP chose on the embedded pipeline at INT4's bytes
    (eval/results/allocate_embedded.md: FP4 E2M1 where the recipe's content layers are,
    INT4 elsewhere) applied to this UNet: a heterogeneous plan of the same bytes, for speed."""
    import dq
    from dq import recipes

    recipe = recipes.get("sd15")
    plan = {}
    for n in dq.quantizable_layers(unet):
        if recipe.is_skipped(n):
            continue
        w = "fp4_e2m1" if recipe.layer_group(n) == "content" else "int4"
        plan[n] = dq.LayerSpec(w, "channel", act="uint8")
    used = {f: sum(s.weight == f for s in plan.values()) for f in ("fp4_e2m1", "int4")}
    note = f"embedded ILP pattern: content layers fp4_e2m1, quality int4 {used}"
    return dq.QuantConfig(default=None, layers=plan, name="w4a8-mixed-pattern"), note


def dq_config(config: str):
    """"dq-<preset>", or "dq-w8a8-full": int8 weights without the preset's AVX2 pair limit."""
    import dq

    if config == "dq-w8a8-full":
        cfg = dq.QuantConfig.from_preset("w8a8")
        return replace(cfg, default=replace(cfg.default, pair_limit=None), name="w8a8-full")
    return dq.QuantConfig.from_preset(config[3:])


def run_pipeline(config: str, s: Settings) -> dict:
    """Whole text-to-image call on the embedded pipeline (text encoder + UNet steps + VAE)."""
    import dq
    from dq import assets

    torch.set_num_threads(s.threads)
    pipe = assets.load_embedded_pipeline()
    call = assets.embedded_defaults()
    if config != "fp32":
        dq.quantize(pipe, dq_config(config), calib_prompts=assets.calibration_prompts()[:16], progress=False,
                    calibration={"num_inference_steps": call["num_inference_steps"],
                                 "guidance_scale": call["guidance_scale"]})  # fmt: skip
    prompts = assets.heldout_prompts(4)[0]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.inference_mode():
        for _ in range(s.warmup):
            pipe(prompts, generator=gen(), output_type="pt", **call)
        times = []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            pipe(prompts, generator=gen(), output_type="pt", **call)
            times.append(time.perf_counter() - t0)
    return {"model": "embedded-pipeline (4 prompts)", "config": config, "latency_s": statistics.median(times),
            "weight_bytes": _weight_bytes(pipe.unet), "peak_rss_bytes": _status("VmHWM"), "note": str(call)}  # fmt: skip


def _child(model, config, s, q):
    try:
        if model == "embedded-pipeline":
            q.put(run_pipeline(config, s))
            return
        q.put(run_one(model, config, s))
    except Exception as e:
        q.put({"model": model, "config": config, "error": f"{type(e).__name__}: {e}"[:300]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--configs", nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--sd15-latent", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    s = Settings()
    if a.models:
        s.models = tuple(a.models)
    if a.configs:
        s.configs = tuple(a.configs)
    if a.repeats:
        s.repeats = a.repeats
    if a.sd15_latent:
        s.sd15_latent = a.sd15_latent
    if a.out:
        s.out = Path(a.out)
    if a.threads:
        s.threads = a.threads

    ctx = mp.get_context("spawn")
    rows = []
    for model in s.models:
        base = None
        configs = s.configs
        if model == "embedded-pipeline":  # whole pipeline: dq configs only (peers quantize UNets)
            configs = tuple(c for c in s.configs if c == "fp32" or c.startswith("dq-"))
        for config in configs:
            q = ctx.Queue()
            proc = ctx.Process(target=_child, args=(model, config, s, q))
            proc.start()
            r = q.get()
            proc.join()
            if base is None and config == "fp32" and "error" not in r:
                base = r
            if base is not None and "error" not in r:
                r["speedup_vs_fp32"] = base["latency_s"] / r["latency_s"]
                r["weight_bytes_vs_fp32"] = r["weight_bytes"] / base["weight_bytes"]
                r["weight_bytes_vs_fp16"] = r["weight_bytes"] / (base["weight_bytes"] / 2)
                r["peak_rss_vs_fp32"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
            rows.append(r)
            _print_row(r)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
    }
    s.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {s.out}")


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['model']:9s} {r['config']:26s} FAILED: {r['error']}", flush=True)
        return
    ratio = ""
    if "speedup_vs_fp32" in r:
        ratio = (
            f" speedup {r['speedup_vs_fp32']:.2f}x  weights {r['weight_bytes_vs_fp16']:.3f}x fp16"
            f"  peak RSS {r['peak_rss_vs_fp32']:.2f}x fp32"
        )
    print(
        f"{r['model']:9s} {r['config']:26s} {r['latency_s'] * 1e3:9.1f} ms  "
        f"weights {r['weight_bytes'] / 2**20:8.1f} MiB  peak {r['peak_rss_bytes'] / 2**20:8.0f} MiB{ratio}",
        flush=True,
    )


if __name__ == "__main__":
    main()
