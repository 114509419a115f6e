"""The `dq` console script.

    dq run                         # the main job on the embedded pipeline: quantize, report, grid
    dq quantize PIPE OUT --config w8a8 --prompts prompts.txt
    dq presets                     # list presets
    dq formats                     # list number formats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"dq: prompt file {path!r} does not exist; give a text file, one prompt per line")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"dq: prompt file {path!r} has no prompts; put one prompt per line")
    return prompts


def _cmd_presets(args: argparse.Namespace) -> int:
    from dq.config import PRESETS

    for name, (spec, doc) in PRESETS.items():
        act = spec.act or "float"
        print(f"{name:8s} {doc:36s} weights {spec.weight}/{spec.weight_granularity}, acts {act}")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from dq import formats

    for name in formats.names():
        f = formats.get(name)
        print(f"{name:10s} {f.kind:3s} {f.bits} bits  max {f.max:g}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    import dq

    prompts = _read_prompts(args.prompts)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=torch.float32)
    config = dq.QuantConfig.from_json(Path(args.config).read_text()) if args.config.endswith(".json") else args.config
    dq.quantize(pipe, config, calib_prompts=prompts, calibration={"num_inference_steps": args.steps})
    pipe.save_pretrained(args.out)
    print(f"dq: saved quantized pipeline to {args.out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from dq.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out=Path(args.out), config=args.config, pipeline=args.pipeline,
        num_prompts=args.num_prompts, steps=args.steps,
    )
    run_demo(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dq", description="Low-bit quantization of diffusers text-to-image pipelines."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="main job: quantize the embedded pipeline, write a report and an image grid")
    p.add_argument("--out", default="out/run", help="output folder (default: out/run)")
    p.add_argument("--config", default="w8a8", help="preset name or QuantConfig JSON file (default: w8a8)")
    p.add_argument("--pipeline", default=None, help="pipeline folder (default: the embedded one packaged in dq/data/)")
    p.add_argument("--num-prompts", type=int, default=8, help="evaluation prompts (default: 8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("quantize", help="quantize a saved pipeline and save the result")
    p.add_argument("pipeline", help="a diffusers pipeline folder or hub id")
    p.add_argument("out", help="output folder for the quantized pipeline")
    p.add_argument("--config", default="w8a8", help="preset name or QuantConfig JSON file")
    p.add_argument("--prompts", default=None, help="calibration prompts file, one per line")
    p.add_argument("--steps", type=int, default=None, help="sampling steps during calibration")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("presets", help="list quantization presets")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("formats", help="list number formats")
    p.set_defaults(func=_cmd_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: print the message (it names the fix), no traceback
        print(f"dq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
