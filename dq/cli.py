"""The `dq` console script.

    dq run                         # the main job on the embedded pipeline: quantize, report, grid
    dq quantize PIPE OUT --config w8a8 [--prompts prompts.txt] [--steps 20 ...]
    dq inspect OUT                 # what a saved folder holds: plan per group and format, bytes
    dq presets                     # list presets (which need calibration prompts)
    dq formats                     # list number formats (which can be activations)
    dq --version

Every user error (a missing file, a bad flag value, an unknown preset, a folder that must not
be overwritten) is one line naming the flag and the fix, exit status 2, no traceback; the
checks run before anything is loaded. Heavy modules (torch, diffusers) are imported inside the
commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "float16", "bfloat16")
# a hub repository id: "owner/name" (letters, digits, - _ .), not a path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UserError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


def _version() -> str:
    mod = sys.modules.get("dq")
    if mod is not None and hasattr(mod, "__version__"):
        return mod.__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dq")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- argument checks


def _read_prompts(path: str | None, flag: str = "--prompts") -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise UserError(f"{flag} {path!r} {what}; give a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path!r} cannot be read as UTF-8 text ({e}); give a text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{flag} {path!r} has no prompts; put one prompt per line")
    return prompts


ROUNDINGS = ("nearest", "search", "learned")  # dq.api.ROUNDINGS (not imported: torch)


def _preset_names() -> list[str]:
    from dq.config import MIXED_PRESET_NAMES, PRESETS

    return sorted({*PRESETS, *MIXED_PRESET_NAMES})


def _read_config(value: str, flag: str = "--config"):
    """A QuantConfig (or a mixed-precision target) from a preset name or a JSON file, or a
    UserError naming `flag`."""
    from dq.config import MIXED_PRESET_NAMES, QuantConfig

    p = Path(value)
    key = value.lower().replace("-", "_")
    names = _preset_names()
    looks_like_file = value.endswith(".json") or os.sep in value or (key not in names and p.is_file())
    if not looks_like_file:
        if key not in names:
            raise UserError(
                f"{flag} {value!r}: unknown preset; choose one of {', '.join(names)} "
                "(see `dq presets`) or give a QuantConfig JSON file"
            )
        if key in MIXED_PRESET_NAMES:
            from dq.api import MIXED_PRESETS

            return MIXED_PRESETS[key]
        return QuantConfig.from_preset(key)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise UserError(
            f"{flag} {value!r} {what}; give a preset name ({', '.join(names)}) or the "
            "path of a QuantConfig JSON file (QuantConfig.to_json())"
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag} {value!r} is not valid JSON ({e}); write it with QuantConfig.to_json()") from None
    try:
        return QuantConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{flag} {value!r} is not a valid QuantConfig: {e}") from None


def _needs_prompts(config: Any, rounding: str = "nearest") -> bool:
    """Activation ranges (QuantConfig), a sensitivity run (mixed precision) or a rounding that
    reads the layers' inputs (search, learned) need prompts."""
    if rounding != "nearest":
        return True
    needs = getattr(config, "needs_activation_calibration", None)
    return True if needs is None else bool(needs)


def _check_pipeline_arg(value: str, flag: str) -> str:
    """A local pipeline folder (checked) or a hub id (left to diffusers)."""
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{flag} {value!r} is a file; give a diffusers pipeline folder (with model_index.json) or a hub id")
        if not (p / "model_index.json").is_file():
            raise UserError(
                f"{flag} {value!r} is not a diffusers pipeline folder (no model_index.json in it); "
                "give the folder pipe.save_pretrained wrote, or a hub id such as 'stabilityai/sd-turbo'"
            )
        return str(p)
    if _HUB_ID.match(value) and not value.startswith("."):
        return value  # a hub id: diffusers resolves (and, offline, refuses) it
    raise UserError(
        f"{flag} {value!r} does not exist (looked in {Path.cwd()}); check the spelling, or "
        "give a hub id such as 'stabilityai/sd-turbo'"
    )


def _check_positive(args: argparse.Namespace, names: dict[str, str], minimum: int = 1) -> None:
    for attr, flag in names.items():
        v = getattr(args, attr, None)
        if v is not None and v < minimum:
            raise UserError(f"{flag} {v}: must be at least {minimum}")


def _check_device(device: str | None) -> Any:
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device!r}: MPS is not available here; use --device cpu")
    return dev


def _check_out(out: str, flag: str, source: str | None, overwrite: bool) -> None:
    """Refuse an output path that cannot or must not be written, before anything loads."""
    from dq.serialization import check_save_target

    def check(allow: bool) -> None:
        try:
            check_save_target(out, overwrite=allow)
        except ValueError as e:
            raise UserError(f"{flag}: {e}".replace("overwrite=True (CLI: --overwrite)", "--overwrite")) from None

    check(True)  # what no flag allows: a file in the way, no permission, the working folder
    if source is not None and os.path.isdir(source) and not overwrite:
        src = Path(os.path.realpath(source))
        target = Path(os.path.realpath(out))
        if target == src or target in src.parents:
            raise UserError(
                f"{flag} {out!r} is {'' if target == src else 'a parent of '}the pipeline folder "
                f"being quantized ({source}); saving there would replace the float model. Give "
                "another output folder, or add --overwrite to replace it on purpose"
            )
    check(overwrite)


# ----------------------------------------------------------------------------- commands


def _cmd_presets(args: argparse.Namespace) -> int:
    from dq.config import PRESETS

    print(f"{'preset':13s} {'description':44s} {'weights':18s} {'activations':12s} needs prompts")
    for name, (spec, doc) in PRESETS.items():
        act = spec.act or "float"
        needs = "yes (calibration)" if spec.act else "no"
        print(f"{name:13s} {doc:44s} {spec.weight + '/' + spec.weight_granularity:18s} {act:12s} {needs}")
    from dq.config import MIXED_PRESET_NAMES

    for name in MIXED_PRESET_NAMES:  # dq.api.MIXED_PRESETS (not imported: it loads every stage)
        doc = "mixed precision: a format per layer (ILP)"
        print(f"{name:13s} {doc:44s} {'allocated':18s} {'per plan':12s} yes (sensitivity)")
    print("\nPresets with quantized activations calibrate on prompts: --prompts FILE, or the "
          "model recipe's shipped set for SD/SDXL families and the embedded pipeline.")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from dq import formats
    from dq.recipes import ACT_FORMATS

    engine = {"uint8", "int8"}
    print(f"{'format':12s} kind bits {'max':>8s}  as activation")
    for name in formats.names():
        f = formats.get(name)
        act = ("yes, integer engine" if name in engine else
               "yes, simulated" if name in ACT_FORMATS else "possible, simulated")
        print(f"{name:12s} {f.kind:4s} {f.bits:4d} {f.max:8g}  {act}")
    return 0


def _calibration(args: argparse.Namespace, pipe: Any, folder: str | None) -> tuple[Any, Any, dict[str, str]]:
    """(Sampling, recipe, where each setting came from) for the calibration run: the flags,
    else the pipeline folder's own dq_defaults.json, else the model recipe's defaults."""
    import dq
    from dq import recipes

    recipe = recipes.recipe_for(pipe)
    cal = recipe.calibration
    fields: dict[str, Any] = {"batch_size": cal.batch_size, **cal.call_kwargs()}
    origin = {k: f"recipe {recipe.name}" for k in fields}
    own = Path(folder) / "dq_defaults.json" if folder else None
    if own is not None and own.is_file():
        try:
            d = json.loads(own.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{own} is not valid JSON ({e}); fix or remove it") from None
        for k in ("num_inference_steps", "guidance_scale", "height", "width"):
            if d.get(k) is not None:
                fields[k], origin[k] = d[k], own.name
    flags = {"num_inference_steps": args.steps, "guidance_scale": args.guidance,
             "height": args.height, "width": args.width, "batch_size": args.batch_size,
             "seed": args.seed}  # fmt: skip
    for k, v in flags.items():
        if v is not None:
            fields[k], origin[k] = v, "flag"
    names = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "height": "--height",
             "width": "--width", "batch_size": "--batch-size", "seed": "--seed"}  # fmt: skip
    try:
        sampling = dq.Sampling(**fields)
    except ValueError as e:
        bad = next((f for k, f in names.items() if str(e).startswith(k)), "a calibration flag")
        raise UserError(f"{bad}: {e}") from None
    return sampling, recipe, origin


class _UNetClock:
    """Times the first and last UNet call (calibration) inside `dq.quantize`."""

    def __init__(self, unet: Any) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.calls = 0
        self._h = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.last = time.perf_counter()
        self.calls += 1

    def remove(self) -> None:
        for h in self._h:
            h.remove()


def _cmd_quantize(args: argparse.Namespace) -> int:
    # 1. everything that can be checked without loading the pipeline
    config = _read_config(args.config)
    prompts = _read_prompts(args.prompts)
    _check_positive(args, {"steps": "--steps", "height": "--height", "width": "--width",
                           "num_prompts": "--num-prompts", "batch_size": "--batch-size"})  # fmt: skip
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and v % 8:
            raise UserError(f"{flag} {v}: must be a multiple of 8 (the VAE's downscale factor)")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance {args.guidance}: must be >= 0 (0 or 1 turns guidance off)")
    source = _check_pipeline_arg(args.pipeline, "PIPELINE")
    local = source if os.path.isdir(source) else None
    _check_out(args.out, "OUT", local, args.overwrite)
    device = _check_device(args.device)
    needs_prompts = _needs_prompts(config, args.rounding) and prompts is None
    if needs_prompts and local is not None:
        _refuse_without_prompts_if_generic(config, Path(local) / "unet" / "config.json", args.rounding)

    # 2. load, calibrate, quantize, save
    import torch
    from diffusers import DiffusionPipeline

    import dq
    from dq import recipes

    if args.quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(source, dtype=getattr(torch, args.dtype))
    if device is not None:
        pipe.to(device)
    t_load = time.perf_counter() - t0
    sampling, recipe, origin = _calibration(args, pipe, local)
    if _needs_prompts(config, args.rounding):
        if prompts is None:
            if recipe.name == "generic":
                raise UserError(_no_prompts_message(config, args.rounding))
            available = recipes.calibration_prompts(recipe)
            n = args.num_prompts or recipe.calibration.num_prompts
            prompts, prompt_origin = available[: min(n, len(available))], f"recipe {recipe.name}'s set"
        else:
            prompts, prompt_origin = prompts[: args.num_prompts or len(prompts)], args.prompts
    else:
        prompts, prompt_origin = None, None  # weight-only: no calibration run

    clock = _UNetClock(pipe.unet)
    t1 = time.perf_counter()
    try:
        dq.quantize(pipe, config, calib_prompts=prompts, calibration=sampling, rounding=args.rounding,
                    progress=not args.quiet)
    finally:
        clock.remove()
    t_quant = time.perf_counter() - t1
    if prompts is not None:
        from dq.serialization import record_calibration

        record_calibration(pipe.unet, {"num_prompts": len(prompts), "prompts": prompt_origin,
                                       "sampling": sampling.to_dict(), "recipe": recipe.name,
                                       "rounding": args.rounding})
    t2 = time.perf_counter()
    pipe.save_pretrained(args.out, overwrite=args.overwrite)
    t_save = time.perf_counter() - t2

    # 3. what was done
    from dq import summary

    calib_s = (clock.last - t1) if clock.last is not None else 0.0
    print(f"dq: quantized {type(pipe).__name__}.unet with {config.name} (recipe {recipe.name})")
    if prompts is not None:
        settings = ", ".join(f"{k}={v} ({origin.get(k, 'default')})" for k, v in sampling.to_dict().items()
                             if k != "extra" and v is not None)
        print(f"  calibration: {len(prompts)} prompts from {prompt_origin}; {settings}; "
              f"{clock.calls} UNet calls")
    print(summary.format_rows(summary.rows_from_model(pipe.unet, recipe)))
    file_bytes = sum(f.stat().st_size for f in (Path(args.out) / "unet").glob("*.safetensors"))
    print(f"  unet file {file_bytes / 1e6:.2f} MB")
    print(f"  time: load {t_load:.1f} s, calibration {calib_s:.1f} s, weights "
          f"{t_quant - calib_s:.1f} s, save {t_save:.1f} s")
    print(f"dq: saved quantized pipeline to {args.out}")
    return 0


def _no_prompts_message(config: Any, rounding: str = "nearest") -> str:
    if rounding != "nearest":
        return (
            f"--rounding {rounding} reads each layer's inputs from a calibration run, and this "
            "model's family has no shipped prompt set: pass --prompts FILE (one prompt per line, "
            "16-64 prompts like the ones the pipeline will serve), or use --rounding nearest"
        )
    return (
        f"--config {config.name!r} calibrates on prompts (activation ranges or per-layer "
        "sensitivity), and "
        "this model's family has no shipped prompt set: pass --prompts FILE (one prompt per "
        "line, 16-64 prompts like the ones the pipeline will serve), or use a weight-only "
        "preset such as w8a16 or w4a16"
    )


def _refuse_without_prompts_if_generic(config: Any, unet_config: Path, rounding: str = "nearest") -> None:
    if not unet_config.is_file():
        return
    from dq import recipes

    try:
        cfg = json.loads(unet_config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # diffusers' loader reports a broken config.json
    if isinstance(cfg, dict) and recipes.recipe_for(cfg).name == "generic":
        raise UserError(_no_prompts_message(config, rounding))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dq import summary

    info = summary.inspect_folder(args.folder)
    print(f"dq: {args.folder}: {info['pipeline'] or 'a single model'}")
    for name, c in info["components"].items():
        print(f"\n{name}: quantized by dq {c['dq_version']} (layout {c['format_version']}), "
              f"plan {c['plan_name']!r}{'' if c['plan_checksum'] else ' (no plan checksum: written by an older dq)'}")
        print(summary.format_rows(c["rows"]))
        f16 = c["fp16_file_bytes"]
        print(f"  files {c['file_bytes'] / 1e6:.2f} MB vs {f16 / 1e6:.2f} MB with every tensor "
              f"in fp16 ({c['file_bytes'] / f16 if f16 else 0:.3f}x)")
        cal = c["calibration"]
        if cal:
            s = cal.get("sampling", {})
            shown = ", ".join(f"{k}={v}" for k, v in s.items() if v not in (None, {}))
            print(f"  calibrated on {cal.get('num_prompts')} prompts ({cal.get('prompts')}); {shown}")
        else:
            print("  calibration: not recorded (weight-only, or saved without a record)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from dq.demo import DemoSettings, run_demo

    _check_positive(args, {"steps": "--steps"})
    if args.num_prompts < 2:
        raise UserError(
            f"--num-prompts {args.num_prompts}: the report compares image sets (FID, spread), "
            "which needs at least 2 prompts; use --num-prompts 8 (the default) or more"
        )
    _read_config(args.config)  # refuse an unknown preset or a bad file before any work
    pipeline = _check_pipeline_arg(args.pipeline, "--pipeline") if args.pipeline else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} is a file; give a folder for the report")
    _check_out(str(out / "pipeline"), "--out", pipeline, overwrite=False)
    settings = DemoSettings(
        out=out, config=args.config, pipeline=pipeline,
        num_prompts=args.num_prompts, steps=args.steps, real_size=not args.no_real_size,
    )
    run_demo(settings)
    return 0


# ----------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """argparse with an epilog computed when help is shown (it reads recipe data)."""

    def __init__(self, *a: Any, epilog_fn: Any = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self._epilog_fn is not None:
            self.epilog = self._epilog_fn()
        return super().format_help()


def _quantize_epilog() -> str:
    lines = ["Calibration defaults by model recipe (flags left unset take these; a pipeline "
             "folder's own dq_defaults.json overrides the recipe):", ""]
    try:
        from dq import recipes

        lines.append(f"  {'recipe':14s} {'steps':>5s} {'guidance':>8s} {'size':>9s} {'prompts':>7s} {'batch':>5s}")
        for name in recipes.names():
            c = recipes.get(name).calibration
            size = f"{c.height}x{c.width}" if c.height else "pipeline"
            lines.append(f"  {name:14s} {c.num_inference_steps or 'pipe':>5} "
                         f"{'pipe' if c.guidance_scale is None else c.guidance_scale:>8} {size:>9s} "
                         f"{c.num_prompts:>7d} {c.batch_size:>5d}")
    except Exception as e:  # help must never fail
        lines.append(f"  (recipes unavailable: {e})")
    return "\n".join(lines)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dq", description="Low-bit quantization of diffusers text-to-image pipelines."
    )
    parser.add_argument("--version", action="version", version=f"dq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="main job: quantize the embedded pipeline, write a report and an image grid")
    p.add_argument("--out", default="out/run", help="output folder (default: out/run)")
    p.add_argument("--config", default="w8a8", help="preset name or QuantConfig JSON file (default: w8a8)")
    p.add_argument("--pipeline", default=None, help="pipeline folder (default: the embedded one packaged in dq/data/)")
    p.add_argument("--num-prompts", type=int, default=8, help="evaluation prompts, at least 2 (default: 8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--no-real-size", action="store_true",
                   help="skip timing the SD 1.5 UNet (random weights) in fp32 and the preset (~1-2 min, ~5.7 GB)")
    p.set_defaults(func=_cmd_run)

    unset = "unset: from the model's recipe"
    p = sub.add_parser(
        "quantize", help="quantize a saved pipeline and save the result",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog_fn=_quantize_epilog,
        description="Quantize PIPELINE's UNet and save the pipeline to OUT (hub layout, reloads "
                    "with DiffusionPipeline.from_pretrained after `import dq`).",
    )
    p.add_argument("pipeline", metavar="PIPELINE", help="a diffusers pipeline folder or hub id")
    p.add_argument("out", metavar="OUT", help="output folder (new, empty, or written by dq before)")
    p.add_argument("--config", default="w8a8", help="preset name (see `dq presets`) or QuantConfig JSON file (default: w8a8)")
    p.add_argument("--prompts", default=None,
                   help="calibration prompts file, one per line (unset: the recipe's shipped set; "
                        "required for unknown models when activations are quantized)")
    p.add_argument("--rounding", choices=ROUNDINGS, default="nearest",
                   help="nearest: round to nearest on min-max/MSE scales; search: per layer the "
                        "clipping scale (and FP split) with the least output error on calibration "
                        "inputs; learned: that search, then AdaRound (default: nearest; search and "
                        "learned calibrate, also for weight-only presets)")
    g = p.add_argument_group("calibration run (unset flags: the model's recipe, see below)")
    g.add_argument("--steps", type=int, default=None, help=f"sampling steps ({unset})")
    g.add_argument("--guidance", type=float, default=None, help=f"guidance scale, 0 or 1 = off ({unset})")
    g.add_argument("--height", type=int, default=None, help=f"image height in pixels ({unset})")
    g.add_argument("--width", type=int, default=None, help=f"image width in pixels ({unset})")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="how many prompts (unset: all of --prompts, or the recipe's count)")
    g.add_argument("--batch-size", type=int, default=None, help=f"prompts per pipeline call ({unset})")
    g.add_argument("--seed", type=int, default=None, help="noise seed of prompt 0 (unset: 0)")
    g = p.add_argument_group("loading and saving")
    g.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype to load the pipeline in (default: float32)")
    g.add_argument("--device", default=None, help="device to calibrate on: cpu, cuda, cuda:1, mps (default: cpu)")
    g.add_argument("--overwrite", action="store_true",
                   help="allow OUT to be the source folder or a folder dq did not write (files it does not replace are kept)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("inspect", help="summarise a saved dq folder: plan per group and format, bytes, versions")
    p.add_argument("folder", metavar="DIR", help="a folder written by dq (pipe.save_pretrained / dq quantize)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("presets", help="list quantization presets (and which need prompts)")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("formats", help="list number formats (and which can be activations)")
    p.set_defaults(func=_cmd_formats)
    # stages with their own commands: a stage's module (torch and all) is imported only when
    # its command is the one asked for; otherwise a placeholder keeps it in `dq --help`
    asked = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    for name, (module, summary) in _STAGE_COMMANDS.items():
        if name == asked:
            importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


_STAGE_COMMANDS = {
    "sensitivity": ("dq.sensitivity", "score every layer x candidate format against full precision"),
    "allocate": ("dq.allocate", "pick a format per layer from a sensitivity table under a budget"),
    "eval": ("dq.evaluate", "generate and score images: FID, CLIP, PSNR/SSIM/LPIPS vs a reference"),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input: the message names the problem and the fix
        print(f"dq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
