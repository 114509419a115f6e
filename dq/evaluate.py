"""Batch image-quality evaluation: the library behind `dq eval`.

For each model (a pipeline folder, a hub id, or a loaded pipeline) and for a reference model
(normally the full-precision one) this generates one PNG per prompt with the seeding rule of
`dq.generate` (prompt i draws seed `seed + i`), into `out/<model-name>/<index>.png`, and scores:

- FID against a folder of real images and against the reference's images (torchmetrics);
- CLIP score (open_clip; ViT-L-14 for real models, the embedded world's tiny CLIP for the
  embedded pipeline);
- PSNR, SSIM and LPIPS against the reference's images for the same prompts and seeds (where
  LPIPS weights cannot be loaded, or for the embedded world, the feature distance of
  `dq.metrics.feature_distance_vs_reference`);
- per-image latency, peak memory (RSS; CUDA peak on GPU) and weight bytes.

Per-image metrics get bootstrap 95% intervals over prompts. A rerun regenerates nothing that is
already on disk; FID statistics of every image set are cached in `out/.stats/`, keyed by the
feature network and the images' bytes. Under `accelerate launch --num_processes N` each process
generates its share of the prompts and the main process scores the files after a barrier, so N
processes give the numbers of one.

    res = evaluate(["runs/w8a8"], "prompts.txt", reference=dq.assets.embedded_pipeline_path(),
                   real="real/", out="eval/out")
    compare(["eval/out"], "eval/out/pareto.png")

Prompt selection with `num_images=N`: the prompt list is shuffled with
`random.Random(settings.select_seed)` and the first N are kept, in that shuffled order; the
image index (and so the seed) is the position in that order. Asking for more later keeps the
first N (a prefix), so a run can grow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["EvalSettings", "evaluate", "read_prompts", "select_prompts", "compare", "add_cli",
           "weight_bytes", "bootstrap_interval"]

REFERENCE = "reference"  # folder (under out/) and report name of the reference model's images
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what a real-image folder may hold
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name": a hub repository id
# per-image metrics: report key -> (label, higher is better)
PER_IMAGE = {
    "clip_score": ("CLIP score", True),
    "psnr_vs_ref": ("PSNR vs ref (dB)", True),
    "ssim_vs_ref": ("SSIM vs ref", True),
    "lpips_vs_ref": ("LPIPS vs ref", False),
    "feature_dist_vs_ref": ("feature distance vs ref", False),
}
SET_METRICS = {"fid_real": ("FID vs real", False), "fid_ref": ("FID vs ref", False)}
# metrics are computed by the main process alone, from files: no torchmetrics sync across ranks
_LOCAL = {"sync_on_compute": False, "dist_sync_on_step": False}
_FID_REAL_STATE = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


@dataclass
class EvalSettings:
    """How `evaluate` judges images (the sampling itself is a `dq.Sampling`).

    Example:
        >>> EvalSettings(clip_weights="/models/open_clip_vit_l14.bin", inception_weights="/models/pt_inception.pth")
    """

    evaluator: str = "auto"  # "embedded" (the shipped tiny judges), "standard" (open_clip + Inception), "auto": embedded for the embedded pipeline
    clip_model: str = "ViT-L-14"  # open_clip backbone of the standard CLIP score (the usual one)
    clip_pretrained: str = "openai"  # open_clip pretrained tag used when clip_weights is None (downloads)
    clip_weights: str | None = None  # local open_clip checkpoint file (offline); overrides clip_pretrained
    fid_feature: int = 2048  # Inception tap of the standard FID (64, 192, 768 or 2048)
    inception_weights: str | None = None  # local torch-fidelity Inception state dict (offline); None: download
    fid_antialias: bool = True  # torchmetrics' resize to 299x299 with antialiasing (its default since 1.8); pinned
    lpips: bool = True  # standard evaluator: LPIPS (torchvision weights); False or unloadable: feature distance
    lpips_net: str = "alex"  # LPIPS backbone: alex, vgg or squeeze
    device: str | None = None  # generation device; None: the accelerate process's, else cuda if present, else cpu
    bootstrap: int = 1000  # bootstrap resamples (over prompts) for the per-image metric intervals
    confidence: float = 0.95  # interval coverage
    seed: int = 0  # bootstrap resampling seed
    select_seed: int = 0  # shuffle seed of the `num_images` prompt selection
    grid_prompts: int = 8  # columns (prompts) of the comparison grid
    grid_cell: int = 128  # grid cell side in pixels (small images are upscaled, nearest)
    metric_batch_size: int = 32  # images per metric forward pass
    stats_dir: str | None = None  # FID statistics cache; None: out/.stats

    def __post_init__(self) -> None:
        if self.evaluator not in ("auto", "embedded", "standard"):
            raise ValueError(f"evaluator={self.evaluator!r}: use 'auto', 'embedded' or 'standard'")
        if self.fid_feature not in (64, 192, 768, 2048):
            raise ValueError(f"fid_feature={self.fid_feature}: Inception taps are 64, 192, 768, 2048")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence}: must be in (0, 1), e.g. 0.95")
        if self.bootstrap < 0 or self.grid_prompts < 1 or self.grid_cell < 8 or self.metric_batch_size < 1:
            raise ValueError("bootstrap >= 0, grid_prompts >= 1, grid_cell >= 8, metric_batch_size >= 1")
        for name in ("clip_weights", "inception_weights"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{name}={p!r} is not a file; give the path of a local weights file, "
                                 "or None to download the usual weights")  # fmt: skip


# ------------------------------------------------------------------------------- prompts


def read_prompts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Prompts from a file: plain text (one per line), COCO captions JSON
    (`annotations[].caption`), or TSV/CSV with a header row and a named column.

    Args:
        path: the file; its suffix picks the format (.json, .tsv, .csv, anything else: text).
        column: the TSV/CSV column holding prompts (default: "caption" or "prompt" if present).

    Example:
        >>> read_prompts("captions_val2014.json")[:1]
        ['A man with a red helmet on a small moped on a dirt road.']
    """
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise ValueError(f"prompt file {str(p)!r} {what}; give a .txt (one prompt per line), a COCO "
                         "captions .json or a .tsv/.csv with a prompt column")  # fmt: skip
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt file {str(p)!r} cannot be read as UTF-8 text ({e}); save it as UTF-8") from e
    suffix = p.suffix.lower()
    if suffix == ".json":
        prompts = _coco_captions(text, p)
    elif suffix in (".tsv", ".csv"):
        prompts = _table_column(text, p, column, "\t" if suffix == ".tsv" else ",")
    else:
        if column is not None:
            raise ValueError(f"--column {column!r} given but {p.name} is plain text (one prompt per "
                             "line); name the file .tsv or .csv if it is a table")  # fmt: skip
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(p)!r} holds no prompts; put one prompt per line (or captions "
                         "in annotations[].caption for COCO JSON)")  # fmt: skip
    return prompts


def _coco_captions(text: str, p: Path) -> list[str]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e.msg}, line {e.lineno}); give a COCO captions file "
                         "or a .txt with one prompt per line") from e  # fmt: skip
    ann = d.get("annotations") if isinstance(d, dict) else None
    if not isinstance(ann, list) or not all(isinstance(a, dict) and isinstance(a.get("caption"), str) for a in ann):
        raise ValueError(f"{p} is JSON but not COCO captions: expected {{'annotations': [{{'caption': "
                         "'...'}}, ...]}}; convert it, or give a .txt with one prompt per line")  # fmt: skip
    return [a["caption"].strip() for a in ann if a["caption"].strip()]


def _table_column(text: str, p: Path, column: str | None, delimiter: str) -> list[str]:
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if column is None:
        column = next((c for c in ("caption", "prompt", "text") if c in header), None)
        if column is None:
            raise ValueError(f"{p} has columns {header}; name the prompt column with --column "
                             "(column=...)")  # fmt: skip
    if column not in header:
        raise ValueError(f"{p} has no column {column!r}; its columns are {header}; pass one of them "
                         "with --column")  # fmt: skip
    k = header.index(column)
    short = [i + 2 for i, r in enumerate(rows[1:]) if r and len(r) <= k]
    if short:
        raise ValueError(f"{p}: line {short[0]} has fewer than {k + 1} fields (column {column!r}); "
                         "fix the row or quote fields holding the delimiter")  # fmt: skip
    return [r[k].strip() for r in rows[1:] if r and r[k].strip()]


def select_prompts(prompts: Sequence[str], num_images: int | None, seed: int = 0) -> list[str]:
    """The first `num_images` prompts after a shuffle seeded with `seed` (all when None, in
    the file's order). A larger `num_images` keeps the smaller selection as its prefix.

    Example:
        >>> select_prompts(["a", "b", "c", "d"], 2, seed=0)
        ['c', 'a']
    """
    prompts = list(prompts)
    if num_images is None:
        return prompts
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images={num_images!r}: give an int >= 2 (FID compares image sets)")
    if num_images > len(prompts):
        raise ValueError(f"num_images={num_images} but the prompt set holds {len(prompts)}; ask for at "
                         f"most {len(prompts)} or give a larger prompt file")  # fmt: skip
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order[:num_images]]


# ------------------------------------------------------------------------------- images on disk


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)


def _check_real(real: str | os.PathLike) -> list[Path]:
    from PIL import Image

    folder = Path(real)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ValueError(f"real-image folder {str(folder)!r} {what}; give a folder of real images "
                         f"({', '.join(IMAGE_EXTS)}), or leave --real out to skip FID vs real")  # fmt: skip
    files = _image_files(folder)
    if len(files) < 2:
        raise ValueError(f"real-image folder {str(folder)!r} holds {len(files)} images "
                         f"({', '.join(IMAGE_EXTS)}); FID needs at least 2 (a few thousand for a "
                         "stable value)")  # fmt: skip
    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except OSError as e:
            raise ValueError(f"{f} is not a readable image ({e}); remove or replace it") from e
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} ({f.name})" for (w, h), f in list(sizes.items())[:3])
        raise ValueError(f"real images in {str(folder)!r} differ in size: {shown}; resize (or "
                         "center-crop) them all to one size first")  # fmt: skip
    return files


def _load_images(files: Sequence[Path]):
    """uint8 (N, 3, H, W) from image files (converted to RGB)."""
    import numpy as np
    import torch
    from PIL import Image

    arrs = []
    for f in files:
        with Image.open(f) as im:
            arrs.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _save_png(image, path: Path) -> None:
    """Write a (3, H, W) [0, 1] float image atomically (a killed run leaves no half PNG)."""
    from PIL import Image

    from dq.metrics import to_uint8

    arr = to_uint8(image[None])[0].permute(1, 2, 0).numpy()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def _digest_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------- models


@dataclass
class _Model:
    name: str
    source: Any  # path string, hub id, or a loaded pipeline
    identity: str  # what produced the images (checked on resume)
    size: tuple[int, int] | None  # (height, width) of its images, when known before loading


def _pipeline_size(unet_cfg: Mapping, vae_cfg: Mapping | None) -> tuple[int, int] | None:
    s = unet_cfg.get("sample_size")
    if vae_cfg is None or s is None:
        return None
    factor = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    s = (s, s) if isinstance(s, int) else tuple(s)
    return (s[0] * factor, s[1] * factor)


def _check_model(model: Any, name: str, what: str) -> _Model:
    """Refuse a path that is not a pipeline folder, before anything is loaded."""
    if not isinstance(model, str | os.PathLike):
        if not hasattr(model, "unet") or not callable(model):
            raise ValueError(f"{what} is a {type(model).__name__}, not a diffusers pipeline; pass a "
                             "pipeline folder, a hub id or a loaded pipeline")  # fmt: skip
        vae = getattr(model, "vae", None)
        size = _pipeline_size(dict(model.unet.config), dict(vae.config) if vae is not None else None)
        ident = f"{type(model).__name__}:{getattr(model, 'name_or_path', '') or id(model)}"
        return _Model(name, model, ident, size)
    p = Path(model)
    if not p.exists():
        if _HUB_ID.match(str(model)):
            return _Model(name, str(model), f"hub:{model}", None)
        raise ValueError(f"{what} {str(model)!r} does not exist; give a pipeline folder (written by "
                         "save_pretrained or dq quantize) or a hub id owner/name")  # fmt: skip
    if not (p / "model_index.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:8] if p.is_dir() else "a file"
        raise ValueError(f"{what} {str(model)!r} is not a diffusers pipeline folder (no model_index.json; "
                         f"found {found}); save the whole pipeline with pipe.save_pretrained(folder) "
                         "or dq quantize, not only the UNet")  # fmt: skip
    size = None
    try:
        unet = json.loads((p / "unet" / "config.json").read_text())
        vae_f = p / "vae" / "config.json"
        size = _pipeline_size(unet, json.loads(vae_f.read_text()) if vae_f.is_file() else None)
    except (OSError, json.JSONDecodeError):
        pass
    return _Model(name, str(model), f"path:{p.resolve()}", size)


def _load(m: _Model, device: Any):
    from diffusers import DiffusionPipeline

    import dq  # noqa: F401  (registers the dq quantizer with diffusers)
    from dq.serialization import check_saved, load

    if not isinstance(m.source, str):
        pipe = m.source
    elif Path(m.source).is_dir() and check_saved(m.source):
        pipe = load(m.source)
    else:
        pipe = DiffusionPipeline.from_pretrained(m.source)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_bytes(unet: Any) -> dict[str, float]:
    """Bytes of a UNet's weights as stored: `quant_weight_nbytes()` of every dq layer plus every
    parameter (float layers, biases, norms), against the same weights in fp16.

    Returns:
        {"bytes", "fp16_bytes", "numel", "avg_bits"} (avg_bits = 8 * bytes / numel).

    Example:
        >>> weight_bytes(dq.quantize(pipe, "w8a8").unet)["avg_bits"]
        8.1
    """
    import math

    from dq.modules import QuantizedLayerMixin

    nbytes = numel = 0
    for m in unet.modules():
        if isinstance(m, QuantizedLayerMixin):
            nbytes += m.quant_weight_nbytes()
            numel += math.prod(m.weight_shape)
    for p in unet.parameters():
        nbytes += p.numel() * p.element_size()
        numel += p.numel()
    return {"bytes": nbytes, "fp16_bytes": 2 * numel, "numel": numel, "avg_bits": 8 * nbytes / max(numel, 1)}


class _PeakMemory:
    """Peak RSS (sampled every 5 ms in a thread) and CUDA peak allocation over a block."""

    def __init__(self, device: Any) -> None:
        self.cuda = str(device).startswith("cuda")
        self.rss = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.rss = max(self.rss, proc.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.cuda_peak = torch.cuda.max_memory_allocated() if self.cuda else None


def _generate_missing(m: _Model, prompts: list[str], indices: list[int], folder: Path, sampling,
                      device: Any, rank: int, progress: bool, counter: dict | None) -> None:
    """Generate the PNGs of `indices` not yet in `folder`, timing each batch."""
    from dq.generate import generate

    todo = [i for i in indices if not (folder / f"{i}.png").is_file()]
    need_weights = rank == 0 and not (folder / "weights.json").is_file()
    if not todo and not need_weights:
        return
    pipe = _load(m, device)
    if need_weights:
        (folder / "weights.json").write_text(json.dumps(weight_bytes(pipe.unet)))
    # batches aligned to multiples of batch_size over the whole prompt list, as one process
    # would run them: batched float maths is not bit-identical across batch compositions, so
    # the same batches make the same PNGs whatever the number of processes
    batches: list[list[int]] = []
    for i in todo:
        if batches and batches[-1][-1] // sampling.batch_size == i // sampling.batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    from tqdm.auto import tqdm

    with (tqdm(total=len(todo), desc=f"dq eval {m.name}", unit="image", disable=not progress) as bar,
          open(folder / f"timing-{rank}.jsonl", "a") as log):  # fmt: skip
        for b in batches:
            with _PeakMemory(device) as mem:
                t0 = time.perf_counter()
                images = generate(pipe, [prompts[i] for i in b], sampling, first_index=b[0])
                dt = time.perf_counter() - t0
            for i, im in zip(b, images, strict=True):
                _save_png(im, folder / f"{i}.png")
                log.write(json.dumps({"index": i, "seconds": dt / len(b), "batch": len(b),
                                      "peak_rss": mem.rss, "cuda_peak": mem.cuda_peak}) + "\n")  # fmt: skip
            log.flush()
            if counter is not None:
                counter[m.name] = counter.get(m.name, 0) + len(b)
            bar.update(len(b))
    if isinstance(m.source, str):
        del pipe


def _check_folder(m: _Model, folder: Path, prompts: list[str], sampling, rank: int) -> None:
    """A resumed folder must have been written by the same model, prompts and sampling."""
    meta = {"model": m.identity, "sampling": sampling.to_dict()}
    f = folder / "meta.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{folder} holds images of another run ({old.get('model')}, sampling "
                             f"{old.get('sampling')}); use a new --out folder or delete {folder}")  # fmt: skip
        seen = old.get("prompts", [])
        n = min(len(seen), len(prompts))
        bad = next((i for i in range(n) if seen[i] != prompts[i]), None)
        if bad is not None:
            raise ValueError(f"{folder}/{bad}.png was generated for another prompt ({seen[bad]!r}, now "
                             f"{prompts[bad]!r}); use a new --out folder or delete {folder}")  # fmt: skip
        if len(seen) >= len(prompts):
            return
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({**meta, "prompts": prompts}, indent=1))


# ------------------------------------------------------------------------------- judges


@dataclass
class _Judge:
    """Loaded metric networks and what to call them in the report."""

    clip: tuple  # (model, preprocess, tokenizer)
    clip_name: str
    fid: Any  # a torchmetrics FrechetInceptionDistance, reused for every pair
    fid_name: str  # identifies the feature network (part of the statistics cache key)
    resize: str  # how images reach the FID network
    feature: Any  # module uint8 (N, 3, H, W) -> (N, d): the feature distance's network
    lpips: Any = None  # torchmetrics LPIPS module, or None (feature distance instead)
    perceptual: str = ""


def _state_digest(module: Any) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _is_embedded(reference: _Model) -> bool:
    from dq.recipes import recipe_for

    src = reference.source
    try:
        if isinstance(src, str):
            cfg = json.loads((Path(src) / "unet" / "config.json").read_text())
            return recipe_for(cfg).name == "embedded"
        return recipe_for(src).name == "embedded"
    except (OSError, ValueError, json.JSONDecodeError):
        return False


def _build_judge(evaluators: Any, settings: EvalSettings, reference: _Model) -> _Judge:
    from torchmetrics.image.fid import FrechetInceptionDistance

    kind = evaluators if isinstance(evaluators, str) else None
    if evaluators is None:
        kind = settings.evaluator
        if kind == "auto":
            kind = "embedded" if _is_embedded(reference) else "standard"
    if kind == "embedded":
        from dq.assets import load_evaluators

        evaluators = load_evaluators()
    elif kind is not None and kind != "standard":
        raise ValueError(f"evaluators={kind!r}: use 'embedded', 'standard' or a dq.assets.Evaluators")
    if kind == "standard":
        import open_clip

        weights = settings.clip_weights or settings.clip_pretrained
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(settings.clip_model, pretrained=weights)
        except Exception as e:
            raise RuntimeError(f"could not load open_clip {settings.clip_model} weights {weights!r} ({e}); "
                               "give a local checkpoint with clip_weights= (--clip-weights), or run "
                               "once with network access") from e  # fmt: skip
        clip = (model.eval(), preprocess, open_clip.get_tokenizer(settings.clip_model))
        clip_name = f"open_clip {settings.clip_model} ({Path(weights).name if settings.clip_weights else weights})"
        try:
            fid = FrechetInceptionDistance(feature=settings.fid_feature, antialias=settings.fid_antialias,
                                           feature_extractor_weights_path=settings.inception_weights,
                                           **_LOCAL)  # fmt: skip
        except Exception as e:
            raise RuntimeError(f"could not load Inception weights for FID ({e}); give a local file with "
                               "inception_weights= (--inception-weights), or run once with network "
                               "access") from e  # fmt: skip
        src = _state_digest(fid.inception) if settings.inception_weights else "torch-fidelity"
        fid_name = f"inception-v3-compat pool {settings.fid_feature} ({src})"
        resize = ("bilinear to 299x299, antialias=True (torchmetrics default since 1.8)"
                  if settings.fid_antialias else "bilinear to 299x299 like TF1 (antialias=False, pytorch-fid/clean-fid legacy)")  # fmt: skip
        judge = _Judge(clip, clip_name, fid, fid_name, resize, fid.inception)
        if settings.lpips:
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                judge.lpips = LearnedPerceptualImagePatchSimilarity(net_type=settings.lpips_net, normalize=True, **_LOCAL)
                judge.perceptual = f"LPIPS ({settings.lpips_net}, torchmetrics)"
            except Exception as e:  # weights absent offline
                judge.perceptual = f"feature distance (1 - cos) of {fid_name}; LPIPS unavailable: {e}"
        else:
            judge.perceptual = f"feature distance (1 - cos) of {fid_name}"
        return judge
    ev = evaluators
    for f in ("clip_model", "clip_preprocess", "clip_tokenizer", "fid_feature"):
        if not hasattr(ev, f):
            raise ValueError(f"evaluators lacks {f!r}; pass a dq.assets.Evaluators, 'embedded' or 'standard'")
    fid = FrechetInceptionDistance(feature=ev.fid_feature, antialias=settings.fid_antialias, **_LOCAL)
    feat = fid.inception
    fid_name = (f"{type(feat).__name__} {getattr(feat, 'num_features', '?')}-d ({_state_digest(feat)})"
                if hasattr(feat, "state_dict") else type(feat).__name__)  # fmt: skip
    resize = "the feature network's own (embedded: bilinear antialiased to 32x32)"
    if isinstance(ev.fid_feature, int):
        resize = f"bilinear to 299x299, antialias={settings.fid_antialias}"
    preprocess = ev.clip_preprocess
    side = getattr(getattr(ev.clip_model, "visual", None), "image_size", None)
    if side is not None:  # the world's CLIP has no resize of its own: bring any image to its size
        import torchvision.transforms as T

        side = tuple(side) if isinstance(side, tuple | list) else (side, side)
        preprocess = T.Compose([T.Resize(side, interpolation=T.InterpolationMode.BICUBIC), preprocess])
    return _Judge((ev.clip_model, preprocess, ev.clip_tokenizer),
                  f"{type(ev.clip_model).__name__} ({_state_digest(ev.clip_model)})", fid, fid_name, resize,
                  feat, None, f"feature distance (1 - cos) of {fid_name}")  # fmt: skip


def _fid_stats(judge: _Judge, files: Sequence[Path], cache: Path, batch: int) -> dict:
    """torchmetrics FID state (feature sums, covariance sums, count) of an image set, cached by
    the feature network and the images' bytes."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{judge.fid_name}|{judge.resize}|{_digest_files(files)}".encode()).hexdigest()[:24]
    f = cache / f"fid-{key}.safetensors"
    if f.is_file():
        return load_file(str(f))
    m = judge.fid
    m.reset()
    for i in range(0, len(files), batch):
        m.update(_load_images(files[i : i + batch]), real=True)
    state = {k: getattr(m, k).detach().clone().contiguous() for k in _FID_REAL_STATE}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, f)
    return state


def _fid_between(judge: _Judge, a: dict, b: dict) -> float:
    """FID of two cached states through torchmetrics' own compute."""
    import torch

    m = judge.fid
    m.reset()
    for k in _FID_REAL_STATE:
        setattr(m, k, a[k].clone())
        setattr(m, k.replace("real", "fake"), b[k].clone())
    m.orig_dtype = torch.float32
    m._update_count = 1  # states were set, not updated: silence the "compute before update" warning
    return float(m.compute())


def _per_image(judge: _Judge, images, prompts: list[str], ref, batch: int) -> dict[str, list[float]]:
    import torch

    from dq import metrics as M

    out: dict[str, list[float]] = {}
    model, preprocess, tokenizer = judge.clip
    out["clip_score"] = M.clip_score(images, prompts, model, preprocess, tokenizer,
                                     batch_size=batch, reduce=False).tolist()  # fmt: skip
    if ref is None:
        return out
    pairs = [(images[i : i + 1], ref[i : i + 1]) for i in range(len(images))]
    out["psnr_vs_ref"] = [M.psnr_vs_reference(a, b) for a, b in pairs]
    out["ssim_vs_ref"] = [M.ssim_vs_reference(a, b) for a, b in pairs]
    if judge.lpips is not None:
        vals = []
        with torch.no_grad():
            for a, b in pairs:
                judge.lpips.reset()
                vals.append(float(judge.lpips(M.to_float(a), M.to_float(b))))
        out["lpips_vs_ref"] = vals
    else:
        out["feature_dist_vs_ref"] = [M.feature_distance_vs_reference(a, b, judge.feature) for a, b in pairs]
    return out


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `resamples` draws of len(values) items with
    replacement (seeded); the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles.

    Example:
        >>> bootstrap_interval([1.0, 2.0, 3.0, 4.0], seed=0)
        (1.75, 3.25)
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or resamples == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (float(lo), float(hi))


# ------------------------------------------------------------------------------- evaluate


def _names(models: Any) -> list[tuple[str, Any]]:
    if isinstance(models, Mapping):
        items = list(models.items())
    else:
        models = [models] if isinstance(models, str | os.PathLike) or hasattr(models, "unet") else list(models)
        items = []
        for k, m in enumerate(models):
            base = Path(m).name if isinstance(m, str | os.PathLike) else f"model{k}"
            items.append((base or f"model{k}", m))
    if not items:
        raise ValueError("no models to evaluate; give at least one pipeline folder, hub id or pipeline")
    out, seen = [], {REFERENCE}
    for name, m in items:
        name = re.sub(r"[^\w.+-]", "_", str(name))
        base, k = name, 1
        while name in seen:
            k += 1
            name = f"{base}-{k}"
        seen.add(name)
        out.append((name, m))
    return out


def _default_sampling(reference: _Model):
    from dq.generate import Sampling
    from dq.recipes import recipe_for

    src = reference.source
    kwargs: dict[str, Any] = {}
    try:
        cfg = json.loads((Path(src) / "unet" / "config.json").read_text()) if isinstance(src, str) else src
        kwargs = recipe_for(cfg).calibration.call_kwargs()
    except (OSError, ValueError, json.JSONDecodeError):
        pass
    if isinstance(src, str) and (Path(src) / "dq_defaults.json").is_file():
        d = json.loads((Path(src) / "dq_defaults.json").read_text())
        kwargs.update({k: d[k] for k in ("num_inference_steps", "guidance_scale", "height", "width") if k in d})
    return Sampling(**kwargs)


def _device(settings: EvalSettings, state: Any) -> Any:
    import torch

    if settings.device:
        return torch.device(settings.device)
    if state is not None and state.num_processes > 1:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(
    models: Any,
    prompts: str | os.PathLike | Sequence[str],
    *,
    reference: Any,
    real: str | os.PathLike | None = None,
    num_images: int | None = None,
    out: str | os.PathLike,
    sampling: Any = None,
    evaluators: Any = None,
    progress: bool = True,
    settings: EvalSettings | None = None,
    column: str | None = None,
    shard: tuple[int, int] | None = None,
    command: str | None = None,
    _counter: dict | None = None,
) -> dict:
    """Generate images for a prompt set with each model and the reference, score them, write
    reports (JSON, CSV, Markdown) and a grid into `out`.

    Args:
        models: pipeline folders, hub ids or loaded pipelines (a list, or {name: model}).
        prompts: a prompt file (see `read_prompts`) or a list of prompts.
        reference: the model the fidelity metrics compare against (normally full precision).
        real: a folder of real images for FID vs real (None: skipped).
        num_images: how many prompts (see `select_prompts`); None: all.
        out: output folder; images in out/<model-name>/<index>.png, reused by a rerun.
        sampling: a `dq.Sampling` (None: the reference's recipe and dq_defaults.json).
        evaluators: None (settings.evaluator), "embedded", "standard" or a `dq.assets.Evaluators`.
        progress: progress bars with ETA.
        settings: metric networks, weights paths, intervals (default `EvalSettings()`).
        column: the prompt column of a TSV/CSV prompt file.
        shard: (rank, world) to run one share of the prompts by hand; None: from accelerate's
            `PartialState` (one process when not launched).
        command: the command line recorded in the Markdown report (default: sys.argv).

    Returns:
        The report dict on the main process (also out/report.json); {} on the others.

    Example:
        >>> res = evaluate(["runs/w8a8"], "prompts.txt", reference="fp", real="coco/val",
        ...                num_images=1000, out="eval/out")
        >>> res["models"][1]["metrics"]["psnr_vs_ref"]
    """
    from dq.generate import Sampling

    settings = settings or EvalSettings()
    # ---- every check before any generation
    if isinstance(prompts, str | os.PathLike):
        source = str(prompts)
        prompt_list = read_prompts(prompts, column)
    else:
        from dq.generate import check_prompts

        source, prompt_list = "<list>", check_prompts(list(prompts))
    prompt_list = select_prompts(prompt_list, num_images, settings.select_seed)
    if len(prompt_list) < 2:
        raise ValueError(f"{len(prompt_list)} prompt(s): FID compares image sets, give at least 2")
    real_files = _check_real(real) if real is not None else None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; give a folder for images and reports")
    ref = _check_model(reference, REFERENCE, "reference")
    entries = [ref] + [_check_model(m, n, f"model {n!r}") for n, m in _names(models)]
    if sampling is None:
        sampling = _default_sampling(ref)
    elif isinstance(sampling, Mapping):
        sampling = Sampling.from_kwargs(**sampling)
    want = (sampling.height, sampling.width) if sampling.height and sampling.width else None
    sizes = {e.name: want or e.size for e in entries}
    known = {s for s in sizes.values() if s is not None}
    if len(known) > 1:
        raise ValueError(f"the models make images of different sizes {sizes} (height, width); PSNR/SSIM "
                         "against the reference need one size: set height and width in sampling "
                         "(--height/--width)")  # fmt: skip
    for e in entries:  # images left by an earlier run must match too
        folder = out / e.name
        first = next(iter(sorted(folder.glob("*.png"))), None) if folder.is_dir() else None
        if first is not None and known:
            from PIL import Image

            with Image.open(first) as im:
                h, w = im.height, im.width
            if (h, w) != next(iter(known)):
                raise ValueError(f"{first} is {h}x{w} but this run makes {next(iter(known))}; use a new "
                                 f"--out folder or delete {folder}")  # fmt: skip
    if shard is None:
        import torch
        from accelerate import PartialState

        # cpu=True lets `accelerate launch --multi_gpu` spread CPU processes (gloo) on a machine
        # without GPUs; `accelerate launch --cpu` alone starts one process
        state = PartialState(cpu=not torch.cuda.is_available() or str(settings.device) == "cpu")
        rank, world = state.process_index, state.num_processes
    else:
        state = None
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard={shard}: need 0 <= rank < world")
    device = _device(settings, state)
    n = len(prompt_list)
    nb = -(-n // sampling.batch_size)  # whole batches per process, contiguous
    lo, hi = rank * nb // world * sampling.batch_size, (rank + 1) * nb // world * sampling.batch_size
    mine = list(range(lo, min(hi, n)))

    # ---- generation (each process its share; files are the only hand-over)
    for e in entries:
        _check_folder(e, out / e.name, prompt_list, sampling, rank)
    if state is not None:
        state.wait_for_everyone()  # folders and meta exist before any process writes images
    for e in entries:
        (out / e.name).mkdir(parents=True, exist_ok=True)
        _generate_missing(e, prompt_list, mine, out / e.name, sampling, device, rank, progress, _counter)
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return {}
    missing = {e.name: sum(not (out / e.name / f"{i}.png").is_file() for i in range(n)) for e in entries}
    if any(missing.values()):
        if shard is not None:
            return {"pending": missing}  # the other shards have not written theirs yet
        raise RuntimeError(f"images missing after generation: {missing}")

    # ---- scoring, once, from the files
    report = _score(entries, prompt_list, real_files, out, settings, evaluators, ref, progress)
    report.update({
        "command": command if command is not None else " ".join(sys.argv),
        "prompts": {"source": source, "count": n, "num_images": num_images, "select_seed": settings.select_seed,
                    "column": column},
        "real": str(real) if real is not None else None,
        "sampling": sampling.to_dict(),
        "settings": asdict(settings),
        "processes": world,
    })  # fmt: skip
    _write_reports(report, out)
    _grid(entries, prompt_list, out, settings, out / "grid.png")
    return report


def _score(entries: list[_Model], prompts: list[str], real_files, out: Path, settings: EvalSettings,
           evaluators: Any, ref: _Model, progress: bool) -> dict:
    import numpy as np
    from tqdm.auto import tqdm

    judge = _build_judge(evaluators, settings, ref)
    cache = Path(settings.stats_dir) if settings.stats_dir else out / ".stats"
    n = len(prompts)
    bs = settings.metric_batch_size
    files = {e.name: [out / e.name / f"{i}.png" for i in range(n)] for e in entries}
    real_stats = _fid_stats(judge, real_files, cache, bs) if real_files else None
    ref_stats = _fid_stats(judge, files[REFERENCE], cache, bs)
    ref_images = _load_images(files[REFERENCE])
    rows = []
    for e in tqdm(entries, desc="dq eval metrics", unit="model", disable=not progress):
        stats = ref_stats if e.name == REFERENCE else _fid_stats(judge, files[e.name], cache, bs)
        images = ref_images if e.name == REFERENCE else _load_images(files[e.name])
        per = _per_image(judge, images, prompts, None if e.name == REFERENCE else ref_images, bs)
        metrics: dict[str, float | None] = {k: float(np.mean(v)) for k, v in per.items()}
        metrics["fid_real"] = _fid_between(judge, real_stats, stats) if real_stats else None
        metrics["fid_ref"] = None if e.name == REFERENCE else _fid_between(judge, ref_stats, stats)
        ci = {k: bootstrap_interval(v, settings.bootstrap, settings.confidence, settings.seed)
              for k, v in per.items()}  # fmt: skip
        timing = []
        for f in sorted((out / e.name).glob("timing-*.jsonl")):
            timing += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        last = {t["index"]: t for t in timing}  # the latest record of each image
        secs = [t["seconds"] for t in last.values()]
        weights = json.loads((out / e.name / "weights.json").read_text())
        rows.append({
            "name": e.name,
            "role": "reference" if e.name == REFERENCE else "model",
            "source": e.identity,
            "n_images": n,
            "metrics": metrics,
            "ci": ci,
            "per_image": per,
            "latency_s_per_image": {"median": float(np.median(secs)) if secs else None,
                                    "mean": float(np.mean(secs)) if secs else None, "timed": len(secs)},
            "peak_rss_bytes": max((t["peak_rss"] for t in last.values()), default=None),
            "cuda_peak_bytes": max((t["cuda_peak"] or 0 for t in last.values()), default=None) or None,
            "weights": weights,
        })  # fmt: skip
    return {
        "fid": {"feature": judge.fid_name, "resize": judge.resize, "antialias": settings.fid_antialias},
        "clip": judge.clip_name,
        "perceptual": judge.perceptual,
        "bootstrap": {"resamples": settings.bootstrap, "confidence": settings.confidence, "over": "prompts"},
        "models": rows,
    }


# ------------------------------------------------------------------------------- reports


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _write_reports(report: dict, out: Path) -> None:
    """report.json (without per-image values), per_image.json, report.csv and report.md."""
    slim = {**report, "models": [{k: v for k, v in r.items() if k != "per_image"} for r in report["models"]]}
    (out / "report.json").write_text(json.dumps(slim, indent=1))
    (out / "per_image.json").write_text(json.dumps(
        {r["name"]: r["per_image"] for r in report["models"]}))  # fmt: skip
    keys = [k for k in (*SET_METRICS, *PER_IMAGE) if any(r["metrics"].get(k) is not None for r in report["models"])]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "avg_weight_bits", "weight_bytes", "fp16_bytes", "latency_s_median",
                    "peak_rss_bytes", "cuda_peak_bytes",
                    *[c for k in keys for c in (k, f"{k}_lo", f"{k}_hi")]])  # fmt: skip
        for r in report["models"]:
            ws = r["weights"]
            cells = []
            for k in keys:
                lo, hi = r["ci"].get(k, (None, None))
                cells += [r["metrics"].get(k), lo, hi]
            w.writerow([r["name"], ws["avg_bits"], ws["bytes"], ws["fp16_bytes"],
                        r["latency_s_per_image"]["median"], r["peak_rss_bytes"], r["cuda_peak_bytes"], *cells])
    (out / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The Markdown report: settings, the metric table with bootstrap intervals, the command."""
    pct = round(100 * report["bootstrap"]["confidence"])
    keys = [k for k in (*SET_METRICS, *PER_IMAGE) if any(r["metrics"].get(k) is not None for r in report["models"])]
    labels = {**SET_METRICS, **PER_IMAGE}
    s = report["sampling"]
    lines = [
        "# dq eval report", "",
        f"- prompts: {report['prompts']['count']} from `{report['prompts']['source']}`"
        + (f" (first {report['prompts']['num_images']} after a shuffle with seed {report['prompts']['select_seed']})"
           if report["prompts"]["num_images"] else ""),
        f"- sampling: {s['num_inference_steps']} steps, guidance {s['guidance_scale']}, "
        f"{s['height']}x{s['width']}, seed {s['seed']} (prompt i uses seed + i), batch {s['batch_size']}",
        f"- FID features: {report['fid']['feature']}; resize: {report['fid']['resize']}",
        f"- CLIP score: {report['clip']}",
        f"- perceptual distance vs reference: {report['perceptual']}",
        f"- real images: `{report['real']}`" if report["real"] else "- real images: none (no FID vs real)",
        f"- intervals: percentile bootstrap {pct}% over prompts, {report['bootstrap']['resamples']} resamples "
        "(per-image metrics only; FID is a set statistic)",
        f"- processes: {report['processes']}", "",
        "| model | avg weight bits | weights MB (vs fp16) | " + " | ".join(labels[k][0] for k in keys)
        + " | latency s/image | peak RSS MB |",
        "|---|---:|---:|" + "---:|" * len(keys) + "---:|---:|",
    ]  # fmt: skip
    for r in report["models"]:
        ws = r["weights"]
        cells = []
        for k in keys:
            v = r["metrics"].get(k)
            ci = r["ci"].get(k)
            cells.append(_fmt(v) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and v is not None else ""))
        mem = r["peak_rss_bytes"]
        cuda = f" (CUDA {r['cuda_peak_bytes'] / 2**20:.0f})" if r["cuda_peak_bytes"] else ""
        lines.append(f"| {r['name']} | {ws['avg_bits']:.2f} | {ws['bytes'] / 1e6:.3f} ({ws['bytes'] / ws['fp16_bytes']:.2f}x) | "
                     + " | ".join(cells)
                     + f" | {_fmt(r['latency_s_per_image']['median'], 3)} | {_fmt(mem / 2**20 if mem else None, 4)}{cuda} |")  # fmt: skip
    lines += ["", "Higher is better for CLIP score, PSNR and SSIM; lower for FID, LPIPS and feature "
              "distance. Latency is the median per-image time of its generation batch (first batch "
              "includes warm-up); peak RSS is the process's resident memory during that model's "
              "generation.", "", "Command:", "", "```", report["command"], "```", ""]  # fmt: skip
    return "\n".join(lines)


def _grid(entries: list[_Model], prompts: list[str], out: Path, settings: EvalSettings, path: Path) -> None:
    """Rows: the reference then each model; columns: the first prompts, captioned."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    k = min(settings.grid_prompts, len(prompts))
    cell, label_w, cap_h = settings.grid_cell, 120, 48
    font = ImageFont.load_default()
    grid = Image.new("RGB", (label_w + k * cell, cap_h + len(entries) * cell), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, cell // 6)
    for j in range(k):
        text = "\n".join(textwrap.wrap(prompts[j], chars)[:4])
        draw.multiline_text((label_w + j * cell + 2, 2), text, fill="black", font=font, spacing=1)
    for r, e in enumerate(entries):
        y = cap_h + r * cell
        draw.multiline_text((4, y + cell // 2 - 6), "\n".join(textwrap.wrap(e.name, 18)), fill="black", font=font)
        for j in range(k):
            with Image.open(out / e.name / f"{j}.png") as im:
                grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST if im.width < cell else Image.BICUBIC),
                           (label_w + j * cell, y))  # fmt: skip
    grid.save(path)


def _load_run(run: Any) -> dict:
    if isinstance(run, Mapping):
        return dict(run)
    p = Path(run)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"--compare {str(run)!r}: no report.json there; give a dq eval --out folder or its report.json")
    return json.loads(f.read_text())


def compare(runs: Sequence[Any], out_png: str | os.PathLike, x: str = "avg_bits") -> Path:
    """The Pareto plot of one or more `dq eval` runs: average weight bits (x="avg_bits") or
    weight bytes (x="bytes") against each metric; the Pareto front of each panel is drawn.

    Args:
        runs: `dq eval` out folders, report.json files, or report dicts.
        out_png: the PNG to write.
        x: "avg_bits" or "bytes".

    Example:
        >>> compare(["eval/out-a", "eval/out-b"], "pareto.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("avg_bits", "bytes"):
        raise ValueError(f"x={x!r}: use 'avg_bits' or 'bytes'")
    reports = [_load_run(r) for r in runs]
    if not reports:
        raise ValueError("compare needs at least one run (a dq eval --out folder)")
    points: dict[str, list[tuple[float, float, str]]] = {}
    labels = {**SET_METRICS, **PER_IMAGE}
    for rep in reports:
        for r in rep["models"]:
            for k, v in r["metrics"].items():
                if v is not None and k in labels:
                    points.setdefault(k, []).append((float(r["weights"][x]), float(v), r["name"]))
    keys = [k for k in labels if k in points]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = sorted(points[k])
        higher = labels[k][1]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        for px, py, name in pts:
            ax.annotate(name, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], None  # fewest bits first: a point is on the front if it beats all cheaper ones
        for px, py, _ in pts:
            if best is None or (py > best if higher else py < best):
                front.append((px, py))
                best = py
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:orange", zorder=2)
        ax.set_title(f"{labels[k][0]} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("average weight bits" if x == "avg_bits" else "weight bytes")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------- CLI


def add_cli(subparsers: Any) -> Any:
    """Register `dq eval` on an argparse subparsers object; returns the sub-parser.

    Example:
        >>> add_cli(parser.add_subparsers())
    """
    p = subparsers.add_parser(
        "eval", help="generate and score images: FID, CLIP score, PSNR/SSIM/LPIPS vs a reference, latency, bytes",
        description="Generate one PNG per prompt (seed + index) for each MODEL and the reference, "
                    "score them and write report.{json,csv,md} and grid.png to --out. A rerun "
                    "resumes. Under `accelerate launch` prompts are split across processes.",
    )  # fmt: skip
    p.add_argument("models", metavar="MODEL_OR_DIR", nargs="*", help="pipeline folders or hub ids to evaluate")
    p.add_argument("--prompts", help="prompt file: .txt (one per line), COCO captions .json, or .tsv/.csv")
    p.add_argument("--column", default=None, help="prompt column of a .tsv/.csv file (default: caption/prompt)")
    p.add_argument("--reference", help="the full-precision pipeline folder or hub id (fidelity metrics compare to it)")
    p.add_argument("--real", default=None, help="folder of real images for FID vs real (default: skipped)")
    p.add_argument("--num-images", type=int, default=None,
                   help="prompts to use: the first N after a seeded shuffle (default: all, in file order)")
    p.add_argument("--out", default="out/eval", help="output folder (default: out/eval)")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                   help="draw the Pareto plot of these dq eval --out folders (plus this run's) to OUT/pareto.png")
    g = p.add_argument_group("sampling (unset: the reference's recipe / dq_defaults.json)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale")
    g.add_argument("--height", type=int, default=None, help="image height in pixels")
    g.add_argument("--width", type=int, default=None, help="image width in pixels")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default: 8)")
    g.add_argument("--seed", type=int, default=0, help="seed of prompt 0 (default: 0)")
    g = p.add_argument_group("judges")
    g.add_argument("--evaluator", choices=("auto", "embedded", "standard"), default="auto",
                   help="embedded tiny judges or open_clip + Inception (default: auto)")
    g.add_argument("--clip-model", default="ViT-L-14", help="open_clip backbone (default: ViT-L-14)")
    g.add_argument("--clip-weights", default=None, help="local open_clip checkpoint (default: the openai weights, downloaded)")
    g.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception weights (default: downloaded)")
    g.add_argument("--no-lpips", action="store_true", help="feature distance instead of LPIPS")
    g.add_argument("--device", default=None, help="generation device (default: accelerate's, else cuda if present)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
    return p


def _cmd_eval(args: Any) -> int:
    if not args.models:
        if not args.compare:
            raise ValueError("dq eval: give MODEL_OR_DIR ... with --prompts and --reference, or --compare RUN ...")
        png = compare(args.compare, Path(args.out) / "pareto.png")
        print(f"wrote {png}")
        return 0
    if not args.prompts or not args.reference:
        raise ValueError("dq eval: --prompts FILE and --reference MODEL_OR_DIR are required to evaluate models")
    for name in ("steps", "batch_size", "num_images"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    base = _default_sampling(_check_model(args.reference, REFERENCE, "--reference"))
    sampling = base.replace(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                            width=args.width, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    settings = EvalSettings(evaluator=args.evaluator, clip_model=args.clip_model, clip_weights=args.clip_weights,
                            inception_weights=args.inception_weights, lpips=not args.no_lpips,
                            device=args.device)  # fmt: skip
    report = evaluate(args.models, args.prompts, reference=args.reference, real=args.real,
                      num_images=args.num_images, out=args.out, sampling=sampling, progress=not args.quiet,
                      settings=settings, column=args.column, command=" ".join(["dq", *sys.argv[1:]]))  # fmt: skip
    if report:
        print((Path(args.out) / "report.md").read_text())
        if args.compare:
            print(f"wrote {compare([*args.compare, args.out], Path(args.out) / 'pareto.png')}")
    return 0

