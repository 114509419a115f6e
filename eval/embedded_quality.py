"""Evaluate a pipeline on the embedded world's held-out prompts.

Generates one image per held-out prompt (fixed seeds), then reports attribute accuracy
(colour, shape, size, position, background, all) judged by the shipped attribute classifier,
the CLIP score of the shipped tiny CLIP, and FID (classifier features) against real images
of the world drawn for the same prompts. Results go to eval/results/<name>.json.

    python eval/embedded_quality.py                          # FP embedded pipeline
    python eval/embedded_quality.py --pipeline out/w4 --name embedded_w4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dq.assets  # noqa: E402
from dq.metrics import evaluate_pipeline, fid  # noqa: E402


@dataclass(frozen=True)
class Settings:
    n_prompts: int = 300  # held-out prompts, one image each
    seed: int = 0  # image i uses generator seed seed + i
    real_seed: int = 1000  # jitter seed of the real images drawn for the same prompts
    batch_size: int = 50  # prompts per pipeline call
    threads: int = 2  # torch CPU threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pipeline", default=None, help="pipeline folder (default: the embedded one)")
    ap.add_argument("--name", default="embedded_fp", help="results file name (no extension)")
    ap.add_argument("--n", type=int, default=Settings.n_prompts, help="number of held-out prompts")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: dq_defaults)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: dq_defaults)")
    args = ap.parse_args()
    s = Settings(n_prompts=args.n)
    torch.set_num_threads(s.threads)

    t0 = time.time()
    pipe = dq.assets.load_embedded_pipeline(args.pipeline)
    ev = dq.assets.load_evaluators()
    defaults = dq.assets.embedded_defaults()
    steps = args.steps or defaults["num_inference_steps"]
    guidance = args.guidance if args.guidance is not None else defaults["guidance_scale"]
    prompts, labels = dq.assets.heldout_prompts(s.n_prompts)
    real = dq.assets.real_images(labels, s.real_seed)
    res, images = evaluate_pipeline(
        pipe, prompts, ev, labels=labels, real=real, seed=s.seed, batch_size=s.batch_size,
        num_inference_steps=steps, guidance_scale=guidance,
    )  # fmt: skip
    # Noise floor: FID between two real sets of the same prompts, and the judge on real images.
    real2 = dq.assets.real_images(labels, s.real_seed + 10_000)
    res["fid_real_vs_real"] = fid(real, real2, feature=ev.fid_feature)
    from dq.metrics import attribute_accuracy, clip_score

    res["real_acc_all"] = attribute_accuracy(real, labels, ev.classifier, ev.values)["all"]
    res["real_clip_score"] = clip_score(real, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer)
    res.update(
        pipeline=str(args.pipeline or dq.assets.embedded_pipeline_path().relative_to(ROOT)),
        settings=asdict(s), seconds=round(time.time() - t0, 1),
        torch=torch.__version__, machine=platform.machine(),
        command=" ".join(["python eval/embedded_quality.py", *sys.argv[1:]]),
    )  # fmt: skip
    out = ROOT / "eval" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    grid = out.with_suffix(".png")
    from torchvision.utils import save_image

    save_image(images[:64], grid, nrow=8, padding=1)
    for k, v in res.items():
        if k != "settings":
            print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    print(f"wrote {out.relative_to(ROOT)} and {grid.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
