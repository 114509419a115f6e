"""The one loop that drives a diffusers pipeline: calibration, sensitivity, metrics, the main
job and the benchmarks all call `generate`.

One seeding rule everywhere: prompt ``i`` of a call (counting from 0 over the whole prompt
list) draws its noise from ``torch.Generator(device).manual_seed(seed + i)``, so an image
depends only on its prompt, its index and the seed — never on the batch size or on which
process of a sharded run drew it.

    images = generate(pipe, prompts, Sampling(num_inference_steps=20, guidance_scale=4.0))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dq.sampling import Sampling, check_prompts

__all__ = ["Sampling", "generate", "check_prompts"]


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: str | Sequence[str],
    sampling: Sampling | None = None,
    *,
    output_type: str = "pt",
    first_index: int = 0,
    progress: bool = False,
    desc: str = "dq generate",
) -> torch.Tensor:
    """Run `pipe` over `prompts` in batches and return its outputs, stacked.

    Args:
        pipe: a diffusers text-to-image pipeline.
        prompts: the prompts.
        sampling: pipeline arguments, batch size and seed (default `Sampling()`).
        output_type: "pt" for images (N, 3, H, W) in [0, 1] (float32, CPU), "latent" for the
            final latents (what calibration uses: the VAE adds nothing to UNet statistics).
        first_index: global index of `prompts[0]` (a shard of a longer list keeps its seeds).
        progress: one progress bar over prompts (the pipeline's own per-step bar is hidden).
        desc: the progress bar's label.

    Example:
        >>> imgs = generate(pipe, ["a red circle", "a blue square"], Sampling(seed=3))
        >>> imgs.shape
        torch.Size([2, 3, 32, 32])
    """
    prompts = check_prompts(prompts)
    sampling = sampling or Sampling()
    call = sampling.call_kwargs()
    device = getattr(pipe, "device", torch.device("cpu"))
    outs: list[torch.Tensor] = []
    had_config = hasattr(pipe, "_progress_bar_config")
    old_config = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**(old_config or {}), "disable": True})
    try:
        with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt") as bar:
            for i in range(0, len(prompts), sampling.batch_size):
                chunk = prompts[i : i + sampling.batch_size]
                gens = [
                    torch.Generator(device=device).manual_seed(sampling.seed + first_index + i + j)
                    for j in range(len(chunk))
                ]
                res = pipe(prompt=chunk, generator=gens, output_type=output_type, **call)
                out = res.images
                outs.append(out.float().cpu() if isinstance(out, torch.Tensor) else out)
                bar.update(len(chunk))
    finally:
        if had_config:
            pipe._progress_bar_config = old_config
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config
    return torch.cat(outs) if outs and isinstance(outs[0], torch.Tensor) else outs
