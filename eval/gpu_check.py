"""GPU check of dq's Triton kernels: correctness against the plain-PyTorch reference and speed
against fp16 cuBLAS (`torch.nn.functional.linear` / cuDNN conv) at SD-UNet layer shapes.

Run from the repository root on a CUDA machine (needs only torch with CUDA and triton; dq's
kernel modules are loaded without the package, so diffusers etc. need not be installed):

    python eval/gpu_check.py            # ~2-3 min on an H100, Triton compiles and autotuning included
    python eval/gpu_check.py --quick    # two linear shapes and the conv, ~1 min
    python eval/gpu_check.py --dry-run  # no GPU: tiny shapes on CPU in the Triton interpreter,
                                        # checks the script itself (timings meaningless)

For each shape it prints one row per kernel: the time replayed in a CUDA graph (kernel time,
no Python launch overhead), the eager time (what an un-graphed pipeline pays), the speed-up
over fp16 cuBLAS on the same graph timing (>1 is faster), and the max error relative to
max |reference|. Exactness checks (activation codes, the int32 accumulator) come first.
Exit status 1 if any correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

# Load dq's kernel modules without running the package __init__ files: those may import
# diffusers and friends, which a bare GPU image need not have. Only torch and triton are needed.
ROOT = Path(__file__).resolve().parents[1]
for _name, _path in (("dq", ROOT / "dq"), ("dq.kernels", ROOT / "dq" / "kernels")):
    if _name not in sys.modules:
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [str(_path)]
        sys.modules[_name] = _pkg

from dq.kernels import reference  # noqa: E402
from dq.kernels import triton_kernels as tk  # noqa: E402

# SD-UNet linear layers, M = 2 (classifier-free guidance) x latent tokens
SHAPES = (
    ("sd15 attn1.to_q @64x64 (320)", 8192, 320, 320),
    ("sd15 ff.net.0.proj @64x64", 8192, 2560, 320),
    ("sd15 ff.net.2 @64x64", 8192, 320, 1280),
    ("sdxl attn1.to_q @32x32 (1280)", 2048, 1280, 1280),
    ("sdxl ff.net.0.proj @32x32", 2048, 10240, 1280),
)
# SD 1.5 resnet conv: x [B, C, H, W], O, kernel
CONV = ("sd15 resnet conv3x3 @64x64 (320)", (2, 320, 64, 64), 320, 3)
if DRY_RUN:  # same code paths, interpreter-sized
    SHAPES = tuple((f"dry-run {m}x{n}x{k}", m, n, k) for m, n, k in ((70, 40, 64), (33, 96, 128)))
    CONV = ("dry-run conv3x3", (1, 32, 6, 6), 8, 3)  # K = 288: whole groups of 32
DEV = "cpu" if DRY_RUN else "cuda"

FP4_E2M1 = (0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6)


@dataclass(frozen=True)
class Settings:
    quick: bool = False  # two linear shapes and the conv only
    group_size: int = 64  # K per scale group for the per-group weight-only kernels
    w8a8_tol: float = 2e-3  # max |y - ref| / max |ref|: fp16 output rounding + fp32 sum order
    wonly_tol: float = 1e-2  # fp16 activations and fp16-rounded dequantized weights
    time_budget_s: float = 170.0  # stop timing new shapes past this (compiles included)
    seed: int = 0


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def timings(fn) -> tuple[float, float]:
    """(CUDA-graph ms, eager ms) of fn; the first call autotunes and compiles."""
    fn()
    if DRY_RUN:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=40), do_bench(fn, warmup=10, rep=40)


class Report:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)

    def row(
        self,
        kernel: str,
        graph_ms: float,
        eager_ms: float,
        base_ms: float,
        err: float | None,
        tol: float | None,
    ) -> None:
        speed = base_ms / graph_ms
        err_s = "" if err is None else f"{err:9.2e}"
        ok = "" if err is None else ("ok" if err <= tol else "FAIL")
        print(
            f"  {kernel:<34} {graph_ms * 1e3:9.1f} {eager_ms * 1e3:9.1f} {speed:7.2f}x {err_s:>9} {ok}",
            flush=True,
        )
        if err is not None and err > tol:
            self.failed.append(kernel)


def exactness_checks(rep: Report, s: Settings) -> None:
    """Activation codes and the int32 accumulator equal integer maths bit for bit."""
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(s.seed)
    x = (
        torch.randn(
            *((64, 96) if DRY_RUN else (4096, 1280)), device=dev, generator=g, dtype=torch.float16
        )
        * 3
    )
    x_scale = torch.tensor(6.0 / 255, device=dev)
    x_zp = torch.tensor(121, dtype=torch.int32, device=dev)
    q = tk.quantize_act(x, x_scale, x_zp)
    ref_q = reference.quantize_act(x, x_scale, x_zp).to(torch.int16) - 128
    rep.check(
        "quantize_act == reference codes",
        torch.equal(q.to(torch.int16), ref_q),
        f"{x.numel()} values",
    )

    m, n, k = (50, 40, 70) if DRY_RUN else (1000, 1000, 1000)  # masking on every edge
    xs = x[:m, :k].contiguous()
    w8 = torch.randint(-127, 128, (n, k), device=dev, generator=g, dtype=torch.int8)
    w4 = torch.randint(-8, 8, (n, k), device=dev, generator=g, dtype=torch.int8)
    packed = ((w4[:, 0::2] + 8) | ((w4[:, 1::2] + 8) << 4)).to(torch.uint8)
    qx = reference.quantize_act(xs, x_scale, x_zp).double() - x_zp.double()
    # two of the four (weights x quant) variants: each new variant costs an autotuning round
    for name, w, wv, fuse in (("int8", w8, w8, False), ("int4 packed", packed, w4, True)):
        acc = tk.linear_w8a8(
            xs, w, torch.ones(n, device=dev), None, x_scale, x_zp, fuse_quant=fuse, return_acc=True
        )
        ref = qx @ wv.double().T
        label = f"W8A8 int32 accumulator, {name} weights, {'fused' if fuse else 'separate'} quant"
        rep.check(label, torch.equal(acc.double(), ref), f"{m}x{n}x{k}")


def linear_cases(m: int, n: int, k: int, s: Settings):
    """[(label, fn, reference output fp32, tol)] for one linear shape, plus the fp16 baseline fn."""
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(s.seed)
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.float16)
    xf = x.float()
    bias = torch.randn(n, device=dev, generator=g) * 0.1
    x_scale = torch.tensor(8.0 / 255, device=dev)
    x_zp = torch.tensor(124, dtype=torch.int32, device=dev)
    wsc = torch.rand(n, device=dev, generator=g) * 0.002 + 0.001

    w8 = torch.randint(-127, 128, (n, k), device=dev, generator=g, dtype=torch.int8)
    c4 = torch.randint(0, 16, (n, k), device=dev, generator=g, dtype=torch.uint8)
    p4 = (c4[:, 0::2] | (c4[:, 1::2] << 4)).to(torch.uint8)
    gsc = torch.rand(n, k // s.group_size, device=dev, generator=g) * 0.02 + 0.01
    lut = torch.tensor(FP4_E2M1, device=dev)
    f8 = (torch.randn(n, k, device=dev, generator=g) * 4).to(torch.float8_e4m3fn)

    w16 = (w8.float() * wsc[:, None]).half()
    b16 = bias.half()
    base = lambda: F.linear(x, w16, b16)  # noqa: E731
    xq = tk.quantize_act(x, x_scale, x_zp)

    ref_w8a8 = reference.linear_w8a8(xf, w8, wsc, bias, x_scale, x_zp)
    ref_w4a8 = reference.linear_w8a8(xf, p4, wsc, bias, x_scale, x_zp)
    gs = s.group_size
    cases = [
        (
            "W8A8 int8 (quant + GEMM)",
            lambda: tk.linear_w8a8(x, w8, wsc, bias, x_scale, x_zp),
            ref_w8a8,
            s.w8a8_tol,
        ),
        (
            "W8A8 int8 (fused quant)",
            lambda: tk.linear_w8a8(x, w8, wsc, bias, x_scale, x_zp, fuse_quant=True),
            ref_w8a8,
            s.w8a8_tol,
        ),
        (
            "W8A8 int8 GEMM only (x pre-quant)",
            lambda: tk.linear_w8a8(
                xq, w8, wsc, bias, x_scale, x_zp, x_is_quantized=True, out_dtype=torch.float16
            ),
            ref_w8a8,
            s.w8a8_tol,
        ),
        (
            "W4A8 int4/channel (quant + GEMM)",
            lambda: tk.linear_w8a8(x, p4, wsc, bias, x_scale, x_zp),
            ref_w4a8,
            s.w8a8_tol,
        ),
        (
            f"W4A16 int4/group{gs}",
            lambda: tk.linear_wonly(x, p4, gsc, None, bias, None, 4, gs),
            reference.linear_wonly(xf, p4, gsc, None, bias, None, 4, gs),
            s.wonly_tol,
        ),
        (
            f"W4A16 fp4_e2m1 LUT/group{gs}",
            lambda: tk.linear_wonly(x, p4, gsc, None, bias, lut, 4, gs),
            reference.linear_wonly(xf, p4, gsc, None, bias, lut, 4, gs),
            s.wonly_tol,
        ),
        (
            "W8A16 fp8_e4m3/channel",
            lambda: tk.linear_wonly(x, f8, wsc, None, bias, None, 8, 0),
            reference.linear_wonly(xf, f8, wsc, None, bias, None, 8, 0),
            s.wonly_tol,
        ),
        (
            "W8A16 int8/channel",
            lambda: tk.linear_wonly(x, w8, wsc, None, bias, None, 8, 0),
            reference.linear_wonly(xf, w8, wsc, None, bias, None, 8, 0),
            s.wonly_tol,
        ),
    ]
    extra = []
    if hasattr(torch, "_int_mm"):  # cuBLASLt int8 GEMM for context (no epilogue, int32 out)
        wt = w8.t()
        extra.append(("[ctx] torch._int_mm int8 (cuBLASLt)", lambda: torch._int_mm(xq, wt)))
    return base, cases, extra


def conv_cases(s: Settings):
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(s.seed)
    _, (b, c, h, w), o, kk = CONV
    x = torch.randn(b, c, h, w, device=dev, generator=g, dtype=torch.float16)
    xf = x.float()
    wv = torch.randint(-127, 128, (o, c, kk, kk), device=dev, generator=g, dtype=torch.int8)
    wsc = torch.rand(o, device=dev, generator=g) * 0.002 + 0.001
    bias = torch.randn(o, device=dev, generator=g) * 0.1
    x_scale = torch.tensor(8.0 / 255, device=dev)
    x_zp = torch.tensor(124, dtype=torch.int32, device=dev)
    c4 = torch.randint(0, 16, (o, c * kk * kk), device=dev, generator=g, dtype=torch.uint8)
    p4 = (c4[:, 0::2] | (c4[:, 1::2] << 4)).to(torch.uint8)
    gsc = torch.rand(o, c * kk * kk // s.group_size, device=dev, generator=g) * 0.02 + 0.01
    pad = [kk // 2] * 2
    one = [1, 1]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w16 = (
        (wv.float() * wsc[:, None, None, None]).half().contiguous(memory_format=torch.channels_last)
    )
    base = lambda: F.conv2d(x_cl, w16, bias.half(), 1, pad)  # noqa: E731
    shape = [o, c, kk, kk]
    cases = [
        (
            "W8A8 conv (quant + im2col + GEMM)",
            lambda: tk.conv2d_w8a8(x, wv, wsc, bias, x_scale, x_zp, one, pad, one, 1),
            reference.conv2d_w8a8(xf, wv, wsc, bias, x_scale, x_zp, one, pad, one, 1),
            s.w8a8_tol,
        ),
        (
            f"W4A16 conv int4/group{s.group_size} (im2col)",
            lambda: tk.conv2d_wonly(
                x, p4, gsc, None, bias, None, shape, one, pad, one, 1, 4, s.group_size
            ),
            reference.conv2d_wonly(
                xf, p4, gsc, None, bias, None, shape, one, pad, one, 1, 4, s.group_size
            ),
            s.wonly_tol,
        ),
    ]
    return base, cases


def run_shape(rep: Report, title: str, base, cases, extra=()) -> None:
    print(f"\n{title}")
    print(f"  {'kernel':<34} {'graph us':>9} {'eager us':>9} {'vs fp16':>8} {'rel err':>9}")
    base_graph, base_eager = timings(base)
    rep.row("fp16 cuBLAS/cuDNN (baseline)", base_graph, base_eager, base_graph, None, None)
    for label, fn, ref, tol in cases:
        try:
            err = rel_err(fn(), ref)
            graph_ms, eager_ms = timings(fn)
            rep.row(label, graph_ms, eager_ms, base_graph, err, tol)
        except Exception as e:  # keep going: one broken kernel should not hide the others
            print(f"  {label:<34} ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc(limit=2)
            rep.failed.append(label)
    for label, fn in extra:
        try:
            graph_ms, eager_ms = timings(fn)
            rep.row(label, graph_ms, eager_ms, base_graph, None, None)
        except Exception as e:
            print(f"  {label:<34} skipped ({type(e).__name__})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two linear shapes and the conv")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes, CPU, Triton interpreter"
    )
    s = Settings(quick=parser.parse_args().quick, group_size=32 if DRY_RUN else 64)
    if not DRY_RUN and not torch.cuda.is_available():
        print("no CUDA device: this script checks the Triton kernels on a GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in full precision
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    name = "CPU (Triton interpreter, dry run)" if DRY_RUN else torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}")
    rep = Report()
    print("\nexactness")
    exactness_checks(rep, s)
    shapes = SHAPES[::3] if s.quick else SHAPES
    for title, m, n, k in shapes:
        if time.time() - t0 > s.time_budget_s:
            print(f"\n{title}: skipped (time budget {s.time_budget_s:.0f} s spent)")
            continue
        base, cases, extra = linear_cases(m, n, k, s)
        run_shape(rep, f"{title}: M={m} N={n} K={k}", base, cases, extra)
        del base, cases, extra
        torch.cuda.empty_cache()
    base, cases = conv_cases(s)
    _, xshape, o, kk = CONV
    run_shape(rep, f"{CONV[0]}: x={list(xshape)} O={o} k={kk}", base, cases)
    print(
        f"\n{'FAILED: ' + ', '.join(sorted(set(rep.failed))) if rep.failed else 'all checks passed'}"
        f"  ({time.time() - t0:.0f} s)"
    )
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
