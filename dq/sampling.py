"""How a pipeline is called (`Sampling`) and the prompt check: plain data, no torch, so the
recipes (`dq.recipes.Calibration` is a `Sampling`) and the command line read them cheaply.
`dq.generate` re-exports both."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Sampling", "check_prompts"]

# set by `generate` itself: a caller passing them would silently lose them
_RESERVED = ("prompt", "generator", "output_type", "num_images_per_prompt", "return_dict")


@dataclass(frozen=True)
class Sampling:
    """How a pipeline is called: the pipeline arguments of calibration and evaluation.

    Args:
        num_inference_steps: sampling steps; None keeps the pipeline's default.
        guidance_scale: classifier-free guidance scale (<= 1 turns CFG off); None keeps the
            pipeline's default.
        height, width: image size in pixels (multiples of 8); None keeps the default.
        batch_size: prompts per pipeline call (changes speed and memory, not the images).
        seed: prompt i draws its noise with seed `seed + i`.
        extra: further pipeline arguments (e.g. negative_prompt); not the ones `generate` sets.

    Example:
        >>> Sampling(num_inference_steps=4, guidance_scale=0.0).call_kwargs()
        {'num_inference_steps': 4, 'guidance_scale': 0.0}
    """

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.num_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"num_inference_steps={n!r}: must be an int >= 1 (the layers must run at least once)"
            )
        g = self.guidance_scale
        if g is not None and (not isinstance(g, int | float) or not math.isfinite(g) or g < 0):
            raise ValueError(f"guidance_scale={g!r}: must be a finite number >= 0")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
                raise ValueError(f"{name}={v!r}: must be a positive multiple of 8 (pixels)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be an int >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an int")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"extra must be a dict of pipeline arguments, got {type(self.extra).__name__}")
        bad = sorted(set(self.extra) & set(_RESERVED))
        if bad:
            raise ValueError(
                f"extra sets {bad}, which generate() sets itself; pass prompts as `prompts` and "
                "the noise seed as `seed`"
            )
        object.__setattr__(self, "extra", dict(self.extra))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Sampling:
        """Known fields by name, every other keyword into `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        extra = dict(kwargs.pop("extra", {}) or {})
        extra.update({k: v for k, v in kwargs.items() if k not in names})
        return cls(**{k: v for k, v in kwargs.items() if k in names}, extra=extra)

    def replace(self, **changes: Any) -> Sampling:
        """A copy with some fields changed (None values leave a field as it is)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update({k: v for k, v in changes.items() if v is not None})
        return type(self)(**d)

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline arguments this stands for (unset ones left to the pipeline)."""
        out = {
            k: getattr(self, k)
            for k in ("num_inference_steps", "guidance_scale", "height", "width")
            if getattr(self, k) is not None
        }
        return {**out, **self.extra}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what a report or a saved plan records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_prompts(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
    """A non-empty list of strings, or a ValueError naming the problem."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"{what} must be a non-empty list of strings (at least one calibration prompt), "
            f"e.g. ['a red circle']; got {prompts!r}"
        )
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"every entry of {what} must be a str; got {type(bad[0]).__name__}: {bad[0]!r}")
    return list(prompts)
