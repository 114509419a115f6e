"""Latency of the dq CPU kernels against fp32 at SD-UNet layer shapes.

    python eval/bench_kernels.py                 # all cases, prints a table
    python eval/bench_kernels.py --quick         # fewer repeats, fewer shapes

For every layer shape it times fp32 (`F.conv2d` / `F.linear`) and each dq op on the "auto"
backend, interleaved call by call (fp32, op 1, op 2, ..., fp32, ...) so that load from other
processes hits all variants alike, and reports the median of the repeats and the ratio to fp32
measured in the same run. Then it sweeps the weight-only block size.

W8A8 is timed twice: with activation codes within 0..127 ("a7": a scale calibrated to 128
levels, one integer GEMM) and with full 8-bit codes ("a8": on CPUs without VNNI the exact
kernel splits the codes and runs the integer GEMM twice; see dq/kernels/cpu.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dq.kernels import cpu


@dataclass(frozen=True)
class Settings:
    threads: int = 2  # torch intra-op threads (this dev machine has 2 cores)
    repeats: int = 7  # timed calls per variant; the median is reported
    warmup: int = 2  # untimed calls per variant first (weight prepacking, allocator warm-up)
    batch: int = 2  # UNet batch: one prompt with classifier-free guidance
    channels_last: bool = True  # inputs and fp32 conv weights in channels_last (fp32 is faster so)
    group_size: int = 64  # weight-only int4 group size
    # weight-only rows per dequantized block to sweep (0: the whole weight at once)
    block_sweep_rows: tuple[int, ...] = (64, 128, 256, 512, 1024, 0)
    seed: int = 0  # data seed
    conv_shapes: tuple = (  # (C_in, C_out, kernel, H=W): SD 1.5 / 2.1 UNet resnet and sampler convs
        (320, 320, 3, 64),
        (640, 640, 3, 32),
        (1280, 1280, 3, 16),
        (320, 320, 1, 64),
    )
    linear_shapes: tuple = (  # (tokens per image, K, N): attention / feed-forward projections
        (4096, 320, 1280),
        (4096, 1280, 320),
        (1024, 640, 640),
        (256, 1280, 1280),
        (77, 768, 320),
    )
    variants: tuple[str, ...] = field(
        default=("w8a8-a7", "w8a8-a8", "w8a8-dyn", "w8-only", "w4g-only", "fp8-only")
    )


# ----------------------------------------------------------------------------- data


def act_params(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor parameters over x's range with `levels` codes (128: codes 0..127)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / (levels - 1)
    return torch.tensor(s), torch.tensor(round(-lo / s), dtype=torch.int32)


def quantized_weights(w: torch.Tensor, group_size: int) -> dict[str, tuple]:
    """Codes and scales of one float weight for each weight format benchmarked."""
    o = w.shape[0]
    w2 = w.reshape(o, -1)
    s8 = w2.abs().amax(1) / 127
    q8 = torch.round(w2 / s8[:, None]).to(torch.int8)
    g = group_size if w2.shape[1] % group_size == 0 else w2.shape[1]
    wg = w2.reshape(o, -1, g)
    s4 = (wg.abs().amax(-1) / 7).clamp_min(1e-8)  # [O, K/g]
    c4 = (torch.round(wg / s4[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(o, -1)
    p4 = c4[:, 0::2] | (c4[:, 1::2] << 4)
    s_fp8 = w2.abs().amax(1) / 448
    f8 = (w2 / s_fp8[:, None]).to(torch.float8_e4m3fn)
    return {"int8": (q8, s8), "int4": (p4, s4), "fp8": (f8, s_fp8)}


# ----------------------------------------------------------------------------- timing


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def print_row(label: str, ms: dict[str, float]) -> None:
    base = ms["fp32"]
    cells = "  ".join(f"{name} {t:7.1f} ms ({base / t:4.2f}x)" for name, t in ms.items())
    print(f"{label:<28} {cells}", flush=True)


# ----------------------------------------------------------------------------- cases


def conv_variants(cfg: Settings, c_in: int, c_out: int, k: int, hw: int) -> dict[str, Callable]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, c_in, hw, hw, generator=g)
    w = torch.randn(c_out, c_in, k, k, generator=g) * (c_in * k * k) ** -0.5
    b = torch.randn(c_out, generator=g) * 0.1
    if cfg.channels_last:
        x, w = (
            x.contiguous(memory_format=torch.channels_last),
            w.contiguous(memory_format=torch.channels_last),
        )
    pad = k // 2
    geo = ([1, 1], [pad, pad], [1, 1], 1)
    q = quantized_weights(w, cfg.group_size)
    q8, s8 = q["int8"]
    q8_4d = q8.reshape(c_out, c_in, k, k)
    shape = [c_out, c_in, k, k]
    a7, a8 = act_params(x, 128), act_params(x, 256)
    ops = torch.ops.dq
    fns = {"fp32": lambda: F.conv2d(x, w, b, 1, pad)}
    table = {
        "w8a8-a7": lambda: ops.conv2d_w8a8(x, q8_4d, s8, b, *a7, *geo),
        "w8a8-a8": lambda: ops.conv2d_w8a8(x, q8_4d, s8, b, *a8, *geo),
        "w8a8-dyn": lambda: ops.conv2d_w8a8(x, q8_4d, s8, b, None, None, *geo),
        "w8-only": lambda: ops.conv2d_wonly(x, q8, s8, None, b, None, shape, *geo, 8, 0),
        "w4g-only": lambda: ops.conv2d_wonly(
            x, q["int4"][0], q["int4"][1], None, b, None, shape, *geo, 4, cfg.group_size
        ),
        "fp8-only": lambda: ops.conv2d_wonly(
            x, q["fp8"][0], q["fp8"][1], None, b, None, shape, *geo, 8, 0
        ),
    }
    fns.update({name: table[name] for name in cfg.variants})
    return fns


def linear_variants(cfg: Settings, m: int, k: int, n: int) -> dict[str, Callable]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) * 0.1
    q = quantized_weights(w, cfg.group_size)
    q8, s8 = q["int8"]
    a7, a8 = act_params(x, 128), act_params(x, 256)
    ops = torch.ops.dq
    fns = {"fp32": lambda: F.linear(x, w, b)}
    table = {
        "w8a8-a7": lambda: ops.linear_w8a8(x, q8, s8, b, *a7),
        "w8a8-a8": lambda: ops.linear_w8a8(x, q8, s8, b, *a8),
        "w8a8-dyn": lambda: ops.linear_w8a8(x, q8, s8, b),
        "w8-only": lambda: ops.linear_wonly(x, q8, s8, None, b, None, 8, 0),
        "w4g-only": lambda: ops.linear_wonly(
            x, q["int4"][0], q["int4"][1], None, b, None, 4, cfg.group_size
        ),
        "fp8-only": lambda: ops.linear_wonly(x, q["fp8"][0], q["fp8"][1], None, b, None, 8, 0),
    }
    fns.update({name: table[name] for name in cfg.variants})
    return fns


def block_sweep(cfg: Settings) -> None:
    """Weight-only int4 latency vs rows per dequantized block (fp32 for reference)."""
    print("\nweight-only int4 (group 64): rows per dequantized block (all = the whole weight)")
    saved = cpu.WONLY_BLOCK_BYTES, cpu.WONLY_CONV_BLOCK_BYTES, cpu.WONLY_MIN_ROWS
    cases = {
        "linear 2x4096x1280->1280": linear_variants(cfg, 4096, 1280, 1280),
        "conv 640->640 3x3 @32": conv_variants(cfg, 640, 640, 3, 32),
        "conv 1280->1280 3x3 @16": conv_variants(cfg, 1280, 1280, 3, 16),
    }
    try:
        for label, variants in cases.items():

            def with_rows(rows: int, fn=variants["w4g-only"]):
                def run():
                    cpu.WONLY_BLOCK_BYTES = cpu.WONLY_CONV_BLOCK_BYTES = 0
                    cpu.WONLY_MIN_ROWS = rows or 1 << 30
                    return fn()

                return run

            fns = {"fp32": variants["fp32"]}
            fns.update({f"{rows or 'all'}": with_rows(rows) for rows in cfg.block_sweep_rows})
            ms = time_interleaved(fns, cfg.repeats, 1)
            print_row(label, ms)
    finally:
        cpu.WONLY_BLOCK_BYTES, cpu.WONLY_CONV_BLOCK_BYTES, cpu.WONLY_MIN_ROWS = saved


def main(cfg: Settings) -> None:
    torch.set_num_threads(cfg.threads)
    print(
        f"torch {torch.__version__}, {cfg.threads} threads, {platform.processor() or platform.machine()}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"int32 dot products (VNNI/AMX): {cpu.INT32_DOT_PRODUCTS}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"batch {cfg.batch}, channels_last {cfg.channels_last}, median of {cfg.repeats}, ratio = fp32 / op\n"
    )
    with torch.inference_mode():
        for c_in, c_out, k, hw in cfg.conv_shapes:
            label = f"conv {c_in}->{c_out} {k}x{k} @{hw}"
            print_row(
                label,
                time_interleaved(conv_variants(cfg, c_in, c_out, k, hw), cfg.repeats, cfg.warmup),
            )
        for m, k, n in cfg.linear_shapes:
            label = f"linear {cfg.batch}x{m}x{k}->{n}"
            print_row(
                label, time_interleaved(linear_variants(cfg, m, k, n), cfg.repeats, cfg.warmup)
            )
        if cfg.block_sweep_rows:
            block_sweep(cfg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, two shapes each, no sweep")
    parser.add_argument("--threads", type=int, default=Settings.threads)
    args = parser.parse_args()
    cfg = Settings(threads=args.threads)
    if args.quick:
        cfg = Settings(
            threads=args.threads,
            repeats=3,
            warmup=1,
            conv_shapes=cfg.conv_shapes[:1] + cfg.conv_shapes[2:3],
            linear_shapes=cfg.linear_shapes[:1],
            block_sweep_rows=(),
        )
    main(cfg)
