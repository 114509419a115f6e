"""Image-quality metrics: the same code for the embedded world and for real models.

Only the weights differ. For real models pass an open_clip ViT-L-14 (model, preprocess,
tokenizer) and `feature=2048` (Inception, downloaded by torch-fidelity at first use); for the
embedded world `dq.assets.load_evaluators()` returns the shipped tiny equivalents.

Images are float tensors (N, 3, H, W) in [0, 1] (diffusers `output_type="pt"`) unless said.

FID resizing: torchmetrics >= 1.8 resizes to Inception's 299x299 with antialiasing by default
(`antialias=True`), which differs from the original TF/pytorch-fid resize; `fid()` pins the
flag and `evaluate_pipeline` reports it. A custom feature module does its own resizing.

    ev = dq.assets.load_evaluators()
    s = clip_score(images, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer)
    d = fid(real_uint8, images, feature=ev.fid_feature)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FID_ANTIALIAS = True  # torchmetrics' default since 1.8; pinned here and reported with results


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (N, 3, H, W) -> uint8; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> [0, 1] float; float passes through (clamped)."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0, 1)


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"{name} must be a (N, 3, H, W) tensor, got {shape}; use output_type='pt' in the "
            "pipeline call or stack PIL images with torchvision's to_tensor"
        )


# ---------------------------------------------------------------------------- CLIP score


@torch.no_grad()
def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    model: nn.Module,
    preprocess: Callable,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int = 64,
    reduce: bool = True,
) -> float | torch.Tensor:
    """CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over images.

    Args:
        images: (N, 3, H, W) in [0, 1] or uint8.
        prompts: N captions.
        model: an open_clip model (`encode_image`, `encode_text`).
        preprocess: open_clip's image transform (PIL -> tensor).
        tokenizer: open_clip tokenizer (texts -> (N, context) ids).
        batch_size: images per forward pass.
        reduce: return the mean (float) or the (N,) per-image scores.

    Example:
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", "openai")
        clip_score(imgs, prompts, model, preprocess, open_clip.get_tokenizer("ViT-L-14"))
    """
    from torchvision.transforms.functional import to_pil_image

    _check_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one per image")
    u8 = to_uint8(images)
    scores = []
    for i in range(0, len(u8), batch_size):
        x = torch.stack([preprocess(to_pil_image(im)) for im in u8[i : i + batch_size]])
        ids = tokenizer(list(prompts[i : i + batch_size]))
        a = F.normalize(model.encode_image(x).float(), dim=-1)  # (B, D)
        b = F.normalize(model.encode_text(ids).float(), dim=-1)  # (B, D)
        scores.append(100 * (a * b).sum(-1).clamp(min=0))
    s = torch.cat(scores)
    return s.mean().item() if reduce else s


# ---------------------------------------------------------------------------- FID


@torch.no_grad()
def fid(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature: int | nn.Module = 2048,
    batch_size: int = 100,
    antialias: bool = FID_ANTIALIAS,
) -> float:
    """Fréchet distance between the feature statistics of two image sets (torchmetrics).

    Args:
        real: reference images, (N, 3, H, W) uint8 or [0, 1] float.
        fake: generated images, same convention.
        feature: 64/192/768/2048 for an Inception tap (weights downloaded at first use), or a
            module mapping uint8 (N, 3, H, W) to (N, d) features (e.g. `Evaluators.fid_feature`).
        batch_size: images per update.
        antialias: torchmetrics' resize antialiasing for Inception (ignored by custom modules).

    Example:
        fid(real_u8, fake, feature=dq.assets.load_evaluators().fid_feature)
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_images(real, "real")
    _check_images(fake, "fake")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 images per set; pass a few hundred for a stable value")
    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=False, antialias=antialias)
    except Exception as e:  # Inception weights need a download
        if isinstance(feature, int):
            raise RuntimeError(
                f"could not load Inception weights for FID ({e}); they download at first use — "
                "run once with network access, or pass a local feature module as feature="
            ) from e
        raise
    for x, real_flag in ((real, True), (fake, False)):
        for i in range(0, len(x), batch_size):
            metric.update(to_uint8(x[i : i + batch_size]), real=real_flag)
    return float(metric.compute())


# ---------------------------------------------------------------------------- attributes


@torch.no_grad()
def attribute_accuracy(
    images: torch.Tensor,
    labels: Sequence[Mapping[str, str]],
    classifier: nn.Module,
    values: Mapping[str, Sequence[str]],
    batch_size: int = 256,
) -> dict[str, float]:
    """Share of images whose attributes (as judged by `classifier`) match the prompt's.

    Args:
        images: (N, 3, H, W) in [0, 1] or uint8.
        labels: per image, {attribute: value} named by its prompt (missing ones are not judged).
        classifier: module returning {attribute: logits (N, n_values)} for [0, 1] images.
        values: class names of each classifier head, in logit order.
        batch_size: images per forward pass.

    Returns:
        {attribute: accuracy} for every attribute present in labels, plus "all": the share of
        images with every named attribute right.
    """
    _check_images(images)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; pass one per image")
    x = to_float(images)
    preds: dict[str, list[int]] = {k: [] for k in values}
    for i in range(0, len(x), batch_size):
        out = classifier(x[i : i + batch_size])
        for k in values:
            preds[k] += out[k].argmax(-1).tolist()
    hits: dict[str, list[bool]] = {}
    all_ok = []
    for i, lab in enumerate(labels):
        ok = True
        for k, v in lab.items():
            if k not in values:
                raise ValueError(f"label attribute {k!r} has no classifier head; heads: {list(values)}")
            right = values[k][preds[k][i]] == v
            hits.setdefault(k, []).append(right)
            ok &= right
        all_ok.append(ok)
    res = {k: float(np.mean(v)) for k, v in hits.items()}
    res["all"] = float(np.mean(all_ok))
    return res


# ---------------------------------------------------------------------------- vs reference


def psnr_vs_reference(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, data range 1) of images against reference images (e.g. FP)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_images(images)
    _check_images(reference, "reference")
    v = peak_signal_noise_ratio(to_float(images), to_float(reference), data_range=1.0,
                                reduction="none", dim=(1, 2, 3))  # fmt: skip
    return float(v.clamp(max=100).mean())


def ssim_vs_reference(images: torch.Tensor, reference: torch.Tensor, kernel_size: int = 11) -> float:
    """Mean SSIM (Gaussian window `kernel_size`, data range 1) against reference images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_images(images)
    _check_images(reference, "reference")
    k = min(kernel_size, images.shape[-1] // 2 * 2 - 1)  # odd and no larger than the image
    return float(structural_similarity_index_measure(
        to_float(images), to_float(reference), data_range=1.0, kernel_size=k))  # fmt: skip


def lpips_vs_reference(images: torch.Tensor, reference: torch.Tensor, net: str = "alex") -> float:
    """LPIPS (torchmetrics) against reference images; its backbone weights download at first use.

    Offline, use `feature_distance_vs_reference` with a local feature network instead.
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    _check_images(images)
    _check_images(reference, "reference")
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    except Exception as e:
        raise RuntimeError(
            f"LPIPS needs torchvision {net} weights, which could not be loaded ({e}); run once with "
            "network access, or use feature_distance_vs_reference with a local feature network"
        ) from e
    with torch.no_grad():
        return float(metric(to_float(images), to_float(reference)))


@torch.no_grad()
def feature_distance_vs_reference(
    images: torch.Tensor, reference: torch.Tensor, feature: nn.Module
) -> float:
    """Mean cosine distance (1 - cos) between per-image features of images and references.

    A local perceptual distance: with the embedded attribute classifier's features it plays
    LPIPS's role on the embedded world.
    """
    _check_images(images)
    _check_images(reference, "reference")
    a, b = feature(to_uint8(images)), feature(to_uint8(reference))  # (N, d)
    return float((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean())


# ---------------------------------------------------------------------------- pipelines


def generate(
    pipe,
    prompts: Sequence[str],
    seed: int = 0,
    batch_size: int = 50,
    **call_kwargs,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for `prompts` through `dq.generate.generate` (image i uses
    generator seed `seed + i`); `call_kwargs` are pipeline arguments (num_inference_steps,
    guidance_scale, ...)."""
    from dq.generate import Sampling
    from dq.generate import generate as run

    return run(pipe, prompts, Sampling.from_kwargs(seed=seed, batch_size=batch_size, **call_kwargs))


def evaluate_pipeline(
    pipe,
    prompts: Sequence[str],
    evaluators,
    labels: Sequence[Mapping[str, str]] | None = None,
    real: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 50,
    **call_kwargs,
) -> tuple[dict, torch.Tensor]:
    """Generate images for `prompts` and score them.

    Args:
        pipe: the (FP or quantized) pipeline.
        prompts: evaluation prompts.
        evaluators: a `dq.assets.Evaluators` (embedded) or the same fields with real weights.
        labels: per-prompt attributes, for attribute accuracy (needs evaluators.classifier).
        real: real images (uint8 or [0, 1]) for FID vs real.
        reference: images of the reference (FP) pipeline for the same prompts and seeds: adds
            PSNR, SSIM, feature distance and FID against them.
        seed: base generator seed (image i uses seed + i).
        batch_size: prompts per pipeline call.
        **call_kwargs: forwarded to the pipeline.

    Returns:
        (results dict, generated images).

    Example:
        ev = dq.assets.load_evaluators(); prompts, labels = dq.assets.heldout_prompts(300)
        res, imgs = evaluate_pipeline(pipe, prompts, ev, labels, real=dq.assets.real_images(1000))
    """
    images = generate(pipe, prompts, seed, batch_size, **call_kwargs)
    ev = evaluators
    res: dict = {"n": len(prompts), "seed": seed, **{k: v for k, v in call_kwargs.items()
                                                     if isinstance(v, (int, float, str))}}  # fmt: skip
    res["clip_score"] = clip_score(images, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer)
    if labels is not None and ev.classifier is not None:
        acc = attribute_accuracy(images, labels, ev.classifier, ev.values)
        res.update({f"acc_{k}": v for k, v in acc.items()})
    if real is not None:
        res["fid_real"] = fid(real, images, feature=ev.fid_feature)
    if reference is not None:
        res["psnr_vs_ref"] = psnr_vs_reference(images, reference)
        res["ssim_vs_ref"] = ssim_vs_reference(images, reference)
        res["fid_vs_ref"] = fid(reference, images, feature=ev.fid_feature)
        if isinstance(ev.fid_feature, nn.Module):
            res["feature_dist_vs_ref"] = feature_distance_vs_reference(images, reference, ev.fid_feature)
    res["fid_feature"] = ev.fid_feature if isinstance(ev.fid_feature, int) else type(ev.fid_feature).__name__
    res["fid_antialias"] = FID_ANTIALIAS
    return res, images
