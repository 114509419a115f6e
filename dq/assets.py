"""The embedded default: a tiny text-to-image pipeline and its evaluators, shipped in dq/data/.

They install with the package (package data), so an installed dq runs its main job from any
folder; `DQ_ASSETS` points at another folder of the same layout instead.

Everything here loads offline. The pipeline is an ordinary diffusers StableDiffusionPipeline
(AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel, DPMSolverMultistep),
trained by `pipelines/train_embedded.py` on a procedural world of coloured shapes (32x32,
`dq.world`).
The evaluators are a small open_clip CLIP (CLIP score) and an attribute classifier whose
penultimate features serve as FID features.

    pipe = dq.assets.load_embedded_pipeline()
    ev = dq.assets.load_evaluators()
    prompts, labels = dq.assets.heldout_prompts(300)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / "data"  # the package's shipped data folder
EMBEDDED_NAME = "tiny-shapes"  # the shipped pipeline's folder under DATA_DIR
EVALUATORS_NAME = "evaluators"  # the shipped evaluators' folder under DATA_DIR
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, reused
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def assets_dir() -> Path:
    """The folder holding `tiny-shapes/` and `evaluators/`: $DQ_ASSETS if set, else dq/data/.

    Example:
        DQ_ASSETS=/path/to/other/assets dq run    # same layout, other weights
    """
    env = os.environ.get("DQ_ASSETS")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"DQ_ASSETS={env!r} is not a folder; point it at a folder holding "
                f"{EMBEDDED_NAME}/ and {EVALUATORS_NAME}/, or unset it to use the packaged ones"
            )
        return path
    if not (DATA_DIR / EMBEDDED_NAME).is_dir():
        raise ValueError(
            f"the packaged embedded pipeline is missing ({DATA_DIR / EMBEDDED_NAME} not found); "
            "reinstall dq from a wheel or checkout that includes dq/data/, or set DQ_ASSETS to a "
            f"folder holding {EMBEDDED_NAME}/ and {EVALUATORS_NAME}/"
        )
    return DATA_DIR


def embedded_pipeline_path() -> Path:
    """Folder of the shipped pipeline, loadable by `StableDiffusionPipeline.from_pretrained`."""
    return assets_dir() / EMBEDDED_NAME


def embedded_defaults() -> dict:
    """Sampling settings the embedded pipeline was tuned for (steps, guidance, size)."""
    path = embedded_pipeline_path() / "dq_defaults.json"
    d = json.loads(path.read_text())
    return {k: d[k] for k in ("num_inference_steps", "guidance_scale", "height", "width")}


def load_embedded_pipeline(path: str | Path | None = None, **kwargs):
    """Load the embedded (or any saved) StableDiffusionPipeline offline, on CPU, fp32.

    Args:
        path: pipeline folder; defaults to `embedded_pipeline_path()`.
        **kwargs: passed to `StableDiffusionPipeline.from_pretrained`.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(path or embedded_pipeline_path()), local_files_only=True, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibration_prompts() -> list[str]:
    """64 training-split captions of the embedded world, for calibration."""
    text = (embedded_pipeline_path() / "calibration_prompts.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def heldout_prompts(n: int | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """Held-out evaluation prompts (attribute combinations never seen in training) and labels.

    Args:
        n: how many (at most 500); all when None.

    Returns:
        (prompts, labels) with labels[i] = {"colour": ..., "shape": ..., "size": ...,
        "position": ..., "background": ...}.
    """
    rows = json.loads((assets_dir() / EVALUATORS_NAME / "heldout_prompts.json").read_text())
    if n is not None and not 0 < n <= len(rows):
        raise ValueError(f"n must be in 1..{len(rows)}, got {n}")
    rows = rows[:n]
    return [r["prompt"] for r in rows], [{k: v for k, v in r.items() if k != "prompt"} for r in rows]


# ---------------------------------------------------------------------------- networks


class AttributeNet(nn.Module):
    """Small CNN judging a world image: one classification head per attribute.

    Input: float images (N, 3, H, W) in [0, 1] (resized to 32x32 if needed).
    `features(x)` gives the (N, 128) penultimate features used for FID.
    """

    def __init__(self, heads: dict[str, int], width: int = 32, image_size: int = 32) -> None:
        super().__init__()
        w = width
        self.image_size = image_size

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.num_features = 4 * w
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, n) for k, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        return self.body((x - 0.5) / 0.25)  # (N, 128)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


class UInt8Features(nn.Module):
    """FID feature extractor for torchmetrics: uint8 (N, 3, H, W) -> (N, d) float features.

    Wraps any module with a `features(x in [0, 1])` method (the attribute classifier) or a
    callable mapping [0, 1] images to features (e.g. a CLIP image tower).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | nn.Module, num_features: int):
        super().__init__()
        self.fn = fn
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        f = self.fn.features(x) if hasattr(self.fn, "features") else self.fn(x)
        return f.float()


def build_clip(cfg: dict) -> nn.Module:
    """An open_clip CLIP from a config dict {"embed_dim", "vision_cfg", "text_cfg"}."""
    import open_clip

    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]),
    )


def save_module(module: nn.Module, out: str | Path, config: dict) -> None:
    """Write `module` as model.safetensors (fp32) plus config.json into folder `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))


def _load_state(module: nn.Module, folder: Path) -> nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return module.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- evaluators


@dataclass
class Evaluators:
    """What the metric code needs to judge images of a world.

    For real models the same fields are filled with standard weights: an open_clip ViT-L-14
    with its preprocess and tokenizer, and `fid_feature=2048` (Inception).
    """

    clip_model: nn.Module  # open_clip CLIP (encode_image / encode_text)
    clip_preprocess: Callable  # PIL image -> normalised tensor (open_clip convention)
    clip_tokenizer: Callable[[Sequence[str]], torch.Tensor]  # texts -> (N, context) ids
    fid_feature: nn.Module | int  # torchmetrics FID `feature=`
    classifier: AttributeNet | None = None  # attribute judge (embedded world only)
    values: dict[str, list[str]] | None = None  # class names per classifier head


class PaddedTokenizer:
    """Texts -> (N, context) LongTensor with a transformers CLIPTokenizer (open_clip style)."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding="max_length", max_length=self.context_length,
                              truncation=True, return_tensors="pt").input_ids  # fmt: skip


def load_evaluators(path: str | Path | None = None) -> Evaluators:
    """Load the embedded world's evaluators (CLIP, attribute classifier, FID features) offline.

    Args:
        path: evaluators folder; defaults to `assets_dir() / "evaluators"`.
    """
    import torchvision.transforms as T
    from transformers import CLIPTokenizer

    root = Path(path) if path else assets_dir() / EVALUATORS_NAME
    ccfg = json.loads((root / "clip" / "config.json").read_text())
    clip = _load_state(build_clip(ccfg["model_cfg"]), root / "clip")
    tok = CLIPTokenizer.from_pretrained(str(root / "clip" / "tokenizer"))
    preprocess = T.Compose([T.ToTensor(), T.Normalize(ccfg["mean"], ccfg["std"])])
    acfg = json.loads((root / "attributes" / "config.json").read_text())
    clf = _load_state(AttributeNet(acfg["heads"], image_size=acfg["image_size"]), root / "attributes")
    return Evaluators(
        clip_model=clip,
        clip_preprocess=preprocess,
        clip_tokenizer=PaddedTokenizer(tok, ccfg["model_cfg"]["text_cfg"]["context_length"]),
        fid_feature=UInt8Features(clf, clf.num_features),
        classifier=clf,
        values=acfg["values"],
    )


def world():
    """The embedded world's generator module, `dq.world` (kept for callers of this name)."""
    from dq import world as world_module

    return world_module


def real_images(labels: Sequence[dict[str, str]], seed: int = 1000) -> torch.Tensor:
    """One real world image per label (same attributes, jitter seed `seed + i`), for FID.

    Args:
        labels: per image {"colour", "shape", "size", "position", "background"}.
        seed: base jitter seed; use another one for a second, independent real set.

    Returns:
        uint8 (N, 3, 32, 32).
    """
    import numpy as np

    w = world()
    imgs = [np.asarray(w.render(w.Attributes(**lab), seed + i)) for i, lab in enumerate(labels)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
