"""`dq eval` on the embedded pipeline: full precision (the reference), W8A8, uniform W4A8 and the
ILP-allocated mixed W4A8 (dq's `w4a8` preset: sensitivity table + integer program at uniform
INT4's bytes, 8-bit activations).

Writes the held-out prompts to a text file and real world images to a PNG folder, quantizes and
saves the models under runs/ (each once: an existing folder is reused), runs `dq.evaluate.evaluate`
(the library behind `dq eval`; images already on disk are not regenerated, so adding a row costs
that row only) and copies its report, grid and Pareto plot to eval/results/eval_embedded*.

    nohup .venv/bin/python eval/eval_embedded.py > runs/eval.log 2>&1 &

The same evaluation from the command line, once the folders exist:

    dq eval runs/eval_embedded/w8a8 runs/eval_embedded/w4a8_uniform runs/eval_embedded/w4a8_mixed \
        --prompts runs/eval_embedded/heldout.txt \
        --reference dq/data/tiny-shapes --real runs/eval_embedded/real --num-images 300 \
        --out runs/eval_embedded/out --batch-size 25
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

torch.set_num_threads(1)  # the machine's 2 cores are shared

import dq  # noqa: E402
from dq import assets, recipes  # noqa: E402
from dq import evaluate as E  # noqa: E402


@dataclass
class Settings:
    work: Path = Path("runs/eval_embedded")  # prompts, real images, saved models, images
    results: Path = Path("eval/results")  # where the committed report goes
    num_images: int = 300  # held-out prompts evaluated (of the 500 in the file; seeded shuffle)
    num_real: int = 500  # real world images for FID vs real (one per held-out label)
    real_seed: int = 1000  # jitter seed of the real images (dq.assets.real_images)
    batch_size: int = 25  # prompts per pipeline call


CONFIGS = {
    "w8a8": "w8a8",  # dq's preset: INT8 per channel (pair-limited), static UINT8 activations
    "w4a8_uniform": "w4a8_uniform",  # INT4 per channel (MSE scales) everywhere, UINT8 activations
    "w4a8_mixed": "w4a8",  # mixed precision: a format per layer from the ILP, INT4's bytes (~8 min here)
}


def prepare(s: Settings) -> tuple[Path, Path, list[Path]]:
    s.work.mkdir(parents=True, exist_ok=True)
    prompts, labels = assets.heldout_prompts()
    prompt_file = s.work / "heldout.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    real = s.work / "real"
    if len(list(real.glob("*.png"))) < s.num_real:
        from PIL import Image

        real.mkdir(exist_ok=True)
        for i, im in enumerate(assets.real_images(labels[: s.num_real], seed=s.real_seed)):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(real / f"{i:04d}.png")
    folders = []
    for name, cfg in CONFIGS.items():
        folder = s.work / name
        if not (folder / "model_index.json").is_file():
            print(f"quantizing {name}", flush=True)
            # the recipe's calibration set (64 world captions, 20 steps, guidance 4), given explicitly
            calib = assets.calibration_prompts()[: recipes.get("embedded").calibration.num_prompts]
            pipe = dq.quantize(assets.load_embedded_pipeline(), cfg, calib_prompts=calib)
            pipe.save_pretrained(folder)
        folders.append(folder)
    return prompt_file, real, folders


def main(s: Settings) -> None:
    prompt_file, real, folders = prepare(s)
    sampling = dq.Sampling(**assets.embedded_defaults(), batch_size=s.batch_size)
    out = s.work / "out"
    command = ("nohup .venv/bin/python eval/eval_embedded.py > runs/eval.log 2>&1 &   # equivalently: "
               f"dq eval {' '.join(map(str, folders))} --prompts {prompt_file} --reference dq/data/tiny-shapes "
               f"--real {real} --num-images {s.num_images} --out {out} --batch-size {s.batch_size}")  # fmt: skip
    E.evaluate(folders, prompt_file, reference=assets.embedded_pipeline_path(), real=real,
               num_images=s.num_images, out=out, sampling=sampling, command=command)  # fmt: skip
    s.results.mkdir(parents=True, exist_ok=True)
    for ext in ("json", "md", "csv"):
        shutil.copy(out / f"report.{ext}", s.results / f"eval_embedded.{ext}")
    shutil.copy(out / "grid.png", s.results / "eval_embedded_grid.png")
    E.compare([out], s.results / "eval_embedded_pareto.png")
    print((s.results / "eval_embedded.md").read_text())


if __name__ == "__main__":
    main(Settings())
