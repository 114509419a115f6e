"""Metric-decoupled sensitivity analysis: every layer x candidate format x kind (weight,
activation), scored against full precision one layer at a time.

MixDQ's finding: cross-attention and feed-forward layers change *what* is drawn (content),
the rest change *how clean* it is (quality), and one metric cannot see both. So

- every item is simulated (`dq.simulate.fake_quantized`: only that layer's weights, or only its
  activations, quantized) and scored on the UNet output of stored calibration calls (timesteps
  across the whole trajectory, one batched forward): `sqnr_db` and the relative noise power
  `unet_noise = ||y - y_fp||^2 / ||y_fp||^2`;
- content-layer items also generate images for the same prompts and seeds as the
  full-precision reference: `ssim` (as MixDQ), `image_mse`, and with evaluators the feature
  distance and the CLIP-score change.

**The normalised loss** (what `dq.allocate` adds up) is a predicted image MSE against full
precision. Content items: their measured `image_mse`. Quality items: `gain * unet_noise`, where
`gain` is the median ratio image_mse / unet_noise over the content items (both are measured
there). Assumptions, stated so they can be checked: (1) errors from different layers are
uncorrelated, so their powers add (the end-to-end MSE of a mixed plan is the sum of its items'
losses); (2) the UNet-output-to-image gain of quality layers is that of content layers.
`eval/sensitivity_embedded.py` measures both (Spearman of predicted vs measured loss over random
mixed plans).

Cost: the full-precision reference (images, stored calls, activation ranges) is computed once
and cached in `cache_dir`; items are appended to `items-<shard>.jsonl` as they finish, so a
killed run resumes and recomputes nothing finished; `shard=(rank, world)` (default: the
accelerate process, if launched with `accelerate launch`) splits the items, and the merged table
equals the one-process table.

    table = dq.sensitivity.analyze(pipe, prompts, cache_dir="sens/")
    names, loss, cost = table.matrix("weight")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dq import formats
from dq.config import LayerSpec
from dq.generate import Sampling, check_prompts, generate
from dq.modules import QuantizedLayerMixin, check_spec_fits
from dq.recipes import BOS_LAYER_SUFFIXES
from dq.simulate import fake_quantized
from dq.storage import resolve_spec, spec_nbytes

__all__ = ["SensitivitySettings", "SensitivityTable", "Item", "analyze", "TABLE_VERSION"]

TABLE_VERSION = 1  # layout of SensitivityTable.to_json; loaders refuse newer ones
KINDS = ("weight", "act")
# activations are simulated on a weight kept in float: the spec's weight field is not used
_ACT_CARRIER = "int8"


@dataclass(frozen=True)
class SensitivitySettings:
    """What `analyze` scores and how.

    Args:
        weight_candidates: weight formats to score; None takes the recipe's (INT 2-8, FP4/6/8).
        act_candidates: activation formats to score; None takes the recipe's (8- and 4-bit).
            Full precision is the implicit zero-loss choice.
        weight_granularity: granularity of every weight candidate ("channel" as MixDQ).
        weight_method: scale method of the weight candidates.
        kinds: which kinds to score ("weight", "act").
        num_images: prompts (of those given) whose images score content items.
        num_unet_calls: calibration UNet calls stored for the SQNR of quality items.
        max_rows: batch rows of those calls kept for the SQNR forward, evenly spaced over the
            calls (so over the trajectory); None keeps all (calls x batch, e.g. 16 x 16).
        sampling: pipeline arguments of the calibration and image runs; None: the recipe's.
        max_steps: sampling steps of those runs, at most (a cap on ``sampling``'s, or on the
            pipeline's default where it sets none); None: exactly the sampling's. On the
            embedded pipeline, content images at 10 steps rank layers at least as stably
            across prompt sets and seeds as the recipe's 20 (Spearman 0.82-0.91 per group,
            eval/results/sensitivity_embedded.md) at half the cost of content items, the
            table's dominant cost.
    """

    weight_candidates: tuple[str, ...] | None = None
    weight_granularity: str = "channel"  # MixDQ: per output channel, min-max
    weight_method: str = "minmax"
    act_candidates: tuple[str, ...] | None = None
    kinds: tuple[str, ...] = KINDS
    num_images: int = 8  # 8 prompts x every content item: the dominant cost
    num_unet_calls: int = 16  # stored calls spread over the trajectory, one batched forward
    max_rows: int | None = 64  # latents of those calls kept, evenly spread (the SQNR forward's batch)
    sampling: Sampling | None = None
    max_steps: int | None = 10  # half the embedded recipe's 20: same ranking, half the cost

    def __post_init__(self) -> None:
        for attr in ("weight_candidates", "act_candidates", "kinds"):
            v = getattr(self, attr)
            if isinstance(v, str):
                object.__setattr__(self, attr, (v,))
            elif v is not None:
                object.__setattr__(self, attr, tuple(v))
        bad = set(self.kinds) - set(KINDS)
        if bad or not self.kinds:
            raise ValueError(f"kinds={self.kinds!r}: use a non-empty subset of {KINDS}")
        for attr in ("weight_candidates", "act_candidates"):
            v = getattr(self, attr)
            if v is not None:
                if not v:
                    raise ValueError(f"{attr} is empty; give at least one format or None for the recipe's")
                for f in v:
                    formats.get(f)  # unknown name -> ValueError listing the known ones
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps={self.max_steps!r}: must be an int >= 1 or None (the sampling's own steps)")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows}: must be >= 1 or None (all rows)")
        if self.num_images < 1 or self.num_unet_calls < 1:
            raise ValueError(
                f"num_images={self.num_images}, num_unet_calls={self.num_unet_calls}: both must be >= 1"
            )


@dataclass(frozen=True)
class Item:
    """One scored (layer, kind, candidate)."""

    layer: str
    kind: str  # "weight" | "act"
    candidate: str  # format name
    group: str  # "content" | "quality"
    metrics: dict[str, float]  # sqnr_db, unet_noise (+ ssim, image_mse, feature_dist, clip_delta)
    seconds: float = 0.0

    def key(self) -> tuple[str, str, str]:
        return (self.layer, self.kind, self.candidate)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "candidate": self.candidate,
                "group": self.group, "metrics": self.metrics, "seconds": self.seconds}


@dataclass
class SensitivityTable:
    """Scores of every layer x candidate x kind, plus what the allocator needs.

    Attributes:
        layers: name -> {"group", "shape", "numel", "type"} for every scored layer.
        items: the scored items.
        settings: what produced it (candidates, granularity, sampling, prompts' hash).
        model: fingerprint of the UNet it was computed on.
        gain: image MSE per unit of UNet-output noise (see the module docstring).
    """

    layers: dict[str, dict[str, Any]]
    items: list[Item]
    settings: dict[str, Any]
    model: str
    gain: float = float("nan")
    version: int = TABLE_VERSION
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {it.key(): it for it in self.items}

    def item(self, layer: str, kind: str, candidate: str) -> Item:
        try:
            return self._index[(layer, kind, candidate)]
        except KeyError:
            raise ValueError(f"the table has no item {(layer, kind, candidate)}") from None

    def candidates(self, kind: str) -> list[str]:
        return list(self.settings[f"{kind}_candidates"])

    def loss(self, it: Item) -> float:
        """Normalised loss (predicted image MSE vs full precision) of one item; inf if unfit."""
        m = it.metrics
        if not math.isfinite(m.get("unet_noise", math.inf)):
            return math.inf
        if it.group == "content" and "image_mse" in m:
            return float(m["image_mse"])
        return float(self.gain * m["unet_noise"])

    def spec(self, kind: str, candidate: str) -> LayerSpec:
        """The LayerSpec a weight candidate stands for (weight kind) or an activation
        candidate's spec on an int8 carrier weight (act kind)."""
        if kind == "weight":
            return LayerSpec(candidate, self.settings["weight_granularity"], self.settings["weight_method"])
        return LayerSpec(_ACT_CARRIER, act=candidate)

    def matrix(self, kind: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(layer names, loss [L, C], weight bytes [L, C]) over this kind's candidates, in
        `candidates(kind)` order; inf marks a candidate a layer cannot take. Bytes are those of
        the weight candidate (`spec_nbytes`; for the act kind, the activation parameters)."""
        names = sorted(n for n in self.layers if any((n, kind, c) in self._index for c in self.candidates(kind)))
        cands = self.candidates(kind)
        loss = torch.full((len(names), len(cands)), math.inf, dtype=torch.float64)
        cost = torch.full_like(loss, math.inf)
        for i, n in enumerate(names):
            shape = tuple(self.layers[n]["shape"])
            for j, c in enumerate(cands):
                it = self._index.get((n, kind, c))
                if it is None or not math.isfinite(self.loss(it)):
                    continue
                loss[i, j] = self.loss(it)
                cost[i, j] = spec_nbytes(self.spec(kind, c), shape) if kind == "weight" else 8
        return names, loss, cost

    def ranking(self, kind: str, candidate: str, group: str | None = None) -> list[str]:
        """Layers most sensitive first at one candidate (optionally one group)."""
        its = [self._index[(n, kind, candidate)] for n in self.layers
               if (n, kind, candidate) in self._index and (group is None or self.layers[n]["group"] == group)]
        return [it.layer for it in sorted(its, key=lambda it: -self.loss(it))]

    # --- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "gain": self.gain,
                "settings": self.settings, "layers": self.layers,
                "items": [it.to_dict() for it in sorted(self.items, key=Item.key)]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityTable:
        v = int(d.get("version", 0))
        if v > TABLE_VERSION:
            raise ValueError(f"sensitivity table version {v} is newer than this dq ({TABLE_VERSION}); upgrade dq")
        return cls(layers=d["layers"], items=[Item(**it) for it in d["items"]],
                   settings=d["settings"], model=d["model"], gain=float(d["gain"]), version=v)

    @classmethod
    def from_json(cls, s: str) -> SensitivityTable:
        return cls.from_dict(json.loads(s))


# ------------------------------------------------------------------------------ helpers


def model_fingerprint(unet: nn.Module) -> str:
    """sha256 over parameter names, shapes and sums: a cache written for another model (or
    other weights) never matches."""
    h = hashlib.sha256()
    for name, p in sorted(unet.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{float(p.double().sum()):.10e};".encode())
    return h.hexdigest()[:16]


def _settings_dict(s: SensitivitySettings, prompts: list[str], sampling: Sampling, wc, ac) -> dict:
    return {
        "weight_candidates": list(wc), "act_candidates": list(ac),
        "weight_granularity": s.weight_granularity, "weight_method": s.weight_method,
        "kinds": list(s.kinds), "num_images": s.num_images, "num_unet_calls": s.num_unet_calls,
        "max_rows": s.max_rows,
        "sampling": sampling.to_dict(),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
    }


def _batched_calls(calls) -> dict[str, Any]:
    """Stored UNet calls -> one batched call (timesteps repeated per batch item)."""
    sample = torch.cat([c.sample for c in calls])
    t = torch.cat([torch.full((c.sample.shape[0],), float(c.timestep)) for c in calls])
    ehs = torch.cat([c.encoder_hidden_states for c in calls])
    extra = {k: torch.cat([c.extra[k] for c in calls]) for k in calls[0].extra}
    return {"sample": sample, "timestep": t, "encoder_hidden_states": ehs, **{f"extra.{k}": v for k, v in extra.items()}}


def _unet_forward(unet: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    kwargs: dict = {}
    for key, value in batch.items():
        if key.startswith("extra."):
            head, _, tail = key[len("extra."):].partition(".")
            if tail:
                kwargs.setdefault(head, {})[tail] = value
            else:
                kwargs[head] = value
    with torch.inference_mode():
        out = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"], **kwargs)
    return (out.sample if hasattr(out, "sample") else out[0]).float()


def _default_shard() -> tuple[int, int]:
    try:
        from accelerate import PartialState

        if os.environ.get("WORLD_SIZE") or os.environ.get("ACCELERATE_MIXED_PRECISION"):
            st = PartialState(cpu=not torch.cuda.is_available())
            return st.process_index, st.num_processes
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    return 0, 1


# ------------------------------------------------------------------------------ reference


class _Reference:
    """The full-precision side, computed once and cached: images, one batched UNet call with
    its output, activation ranges, the BOS embedding."""

    FILE = "reference.safetensors"
    META = "reference.json"

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        self.images = tensors["images"]
        self.calls = {k[len("call."):]: v for k, v in tensors.items() if k.startswith("call.")}
        self.output = tensors["output"]
        self.bos = tensors.get("bos")
        self.ranges = {k: tuple(v) for k, v in meta["ranges"].items()}

    @classmethod
    def compute(cls, pipe, prompts, sampling, settings: SensitivitySettings, progress: bool) -> _Reference:
        from dq.api import prompt_independent_bos
        from dq.capture import capture

        record = capture(
            pipe, prompts, max_samples_per_layer=0, max_bytes=0, max_unet_calls=settings.num_unet_calls,
            progress=progress, **{**sampling.call_kwargs(), "batch_size": sampling.batch_size, "seed": sampling.seed},
        )
        calls = _batched_calls(record.unet_calls)
        n = calls["sample"].shape[0]
        if settings.max_rows is not None and n > settings.max_rows:  # evenly over calls / timesteps
            keep = torch.linspace(0, n - 1, settings.max_rows).round().long()
            calls = {k: v[keep] for k, v in calls.items()}
        images = generate(pipe, prompts[: settings.num_images], sampling, progress=progress, desc="dq reference images")
        tensors = {"images": images.contiguous(), **{f"call.{k}": v.contiguous() for k, v in calls.items()}}
        tensors["output"] = _unet_forward(pipe.unet, calls)
        bos = prompt_independent_bos(record)
        if bos is not None:
            tensors["bos"] = bos
        meta = {"ranges": {n: list(record.minmax(n)) for n in record.layers}}
        return cls(tensors, meta), tensors, meta

    @classmethod
    def load(cls, folder: Path) -> _Reference:
        return cls(load_file(folder / cls.FILE), json.loads((folder / cls.META).read_text()))

    @classmethod
    def save(cls, folder: Path, tensors, meta) -> None:
        tmp = folder / (cls.FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / cls.FILE)
        (folder / (cls.META + ".tmp")).write_text(json.dumps(meta))
        os.replace(folder / (cls.META + ".tmp"), folder / cls.META)


# ------------------------------------------------------------------------------ scoring


def _image_metrics(images: torch.Tensor, ref: torch.Tensor, prompts, evaluators) -> dict[str, float]:
    from dq import metrics

    out = {
        "image_mse": float((images - ref).pow(2).mean()),
        "ssim": metrics.ssim_vs_reference(images, ref),
    }
    if evaluators is not None:
        if isinstance(evaluators.fid_feature, nn.Module):
            out["feature_dist"] = metrics.feature_distance_vs_reference(images, ref, evaluators.fid_feature)
        ev = evaluators
        out["clip"] = metrics.clip_score(images, prompts, ev.clip_model, ev.clip_preprocess, ev.clip_tokenizer)
    return out


def _score(pipe, ref: _Reference, layer: str, kind: str, cand: str, spec: LayerSpec, group: str,
           image_prompts, sampling, evaluators, ref_clip) -> dict[str, float]:
    unet = pipe.unet
    bos_layers = [layer] if (ref.bos is not None and layer.endswith(BOS_LAYER_SUFFIXES)) else []
    with fake_quantized(unet, {layer: spec}, ref.ranges, weights=kind == "weight",
                        activations=kind == "act", bos=ref.bos, bos_layers=bos_layers):
        y = _unet_forward(unet, ref.calls)
        noise = float((y - ref.output).pow(2).sum() / ref.output.pow(2).sum().clamp_min(1e-30))
        m = {"unet_noise": noise, "sqnr_db": -10 * math.log10(noise) if noise > 0 else math.inf}
        if group == "content":
            images = generate(pipe, image_prompts, sampling)
            im = _image_metrics(images, ref.images, image_prompts, evaluators)
            if "clip" in im:
                im["clip_delta"] = im.pop("clip") - ref_clip
            m.update(im)
    return m


def analyze(
    pipe: Any,
    prompts: Sequence[str],
    *,
    settings: SensitivitySettings | None = None,
    recipe: Any = None,
    cache_dir: str | os.PathLike | None = None,
    evaluators: Any = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """Score every quantizable layer x candidate x kind against full precision.

    Args:
        pipe: a diffusers text-to-image pipeline with a float UNet.
        prompts: calibration prompts (ranges and stored UNet calls); the first
            `settings.num_images` also score content layers by their images.
        settings: candidates, granularity, sampling, sizes (`SensitivitySettings`).
        recipe: a `dq.recipes` recipe or name; None detects it (`recipe_for(pipe)`): it names
            the groups, the skipped layers and the default candidates and sampling.
        cache_dir: folder for the cached reference and the per-item results (resumable);
            None keeps everything in memory.
        evaluators: `dq.assets.Evaluators`-like (CLIP + features) for feature distance and
            CLIP change of content items; None: the embedded pipeline's own when the recipe is
            "embedded", else only SSIM and image MSE.
        shard: (rank, world): score every world-th item from rank; default from accelerate.
        progress: a progress bar with ETA over items.

    Returns:
        The `SensitivityTable` (on a shard: that shard's items; `merge` joins shards).

    Example:
        >>> table = analyze(pipe, prompts, cache_dir="out/sens")
        >>> table.ranking("weight", "int4", "content")[:3]
    """
    from dq import recipes
    from dq.api import quantizable_layers

    settings = settings or SensitivitySettings()
    prompts = check_prompts(prompts, "prompts")
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ValueError("analyze needs a diffusers pipeline with a `unet`")
    if any(isinstance(m, QuantizedLayerMixin) for m in unet.modules()):
        raise ValueError("the pipeline's UNet is already quantized; analyze the float pipeline")
    recipe = recipes.get(recipe) if recipe is not None else recipes.recipe_for(pipe)
    rank, world = shard or _default_shard()
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise ValueError(f"shard={shard!r}: use (rank, world) with 0 <= rank < world")
    sampling = settings.sampling or recipe.calibration.sampling().replace(batch_size=max(1, min(8, len(prompts))))
    if settings.max_steps is not None:
        steps = sampling.num_inference_steps
        sampling = sampling.replace(num_inference_steps=min(steps or settings.max_steps, settings.max_steps))
    wc = settings.weight_candidates or tuple(recipe.weight_formats)
    ac = settings.act_candidates or tuple(a for a in recipe.act_formats if a is not None)
    if evaluators is None and recipe.family == "embedded":
        from dq import assets

        evaluators = assets.load_evaluators()

    layers = {n: m for n, m in quantizable_layers(unet).items() if not recipe.is_skipped(n)}
    info = {n: {"group": recipe.layer_group(n), "shape": list(m.weight.shape),
                "numel": m.weight.numel(), "type": type(m).__name__} for n, m in layers.items()}
    # every (layer, kind, candidate), deterministic order; candidates a layer cannot take -> inf
    todo: list[tuple[str, str, str, LayerSpec | None]] = []
    unfit: dict[str, str] = {}
    for n, m in layers.items():
        for kind in settings.kinds:
            for c in (wc if kind == "weight" else ac):
                spec = (LayerSpec(c, settings.weight_granularity, settings.weight_method) if kind == "weight"
                        else LayerSpec(_ACT_CARRIER, act=c))
                try:
                    check_spec_fits(resolve_spec(spec, m.weight.shape) if kind == "act" else spec, m.weight.shape, n)
                    todo.append((n, kind, c, spec))
                except ValueError as e:
                    unfit.setdefault(c, str(e))
                    todo.append((n, kind, c, None))
    for c, why in unfit.items():
        if all(s is None for (_, _, cc, s) in todo if cc == c):
            raise ValueError(f"candidate {c!r} fits no layer of this UNet: {why}")

    fp = model_fingerprint(unet)
    sdict = _settings_dict(settings, prompts, sampling, wc, ac)
    folder = Path(cache_dir) if cache_dir is not None else None
    ref = _prepare_reference(pipe, prompts, sampling, settings, folder, fp, sdict, rank, world, progress)

    done: dict[tuple[str, str, str], Item] = {}
    out_file = None
    if folder is not None:
        for f in sorted(folder.glob("items-*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    it = Item(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line cut by a kill: recomputed
                done[it.key()] = it
        out_file = (folder / f"items-{rank}.jsonl").open("a")
    mine = [t for i, t in enumerate(todo) if i % world == rank]
    image_prompts = prompts[: settings.num_images]
    ref_clip = None
    if evaluators is not None:
        from dq import metrics

        ref_clip = metrics.clip_score(ref.images, image_prompts, evaluators.clip_model,
                                      evaluators.clip_preprocess, evaluators.clip_tokenizer)
    items = []
    try:
        pending = [t for t in mine if (t[0], t[1], t[2]) not in done]
        items.extend(done[(n, k, c)] for (n, k, c, _) in mine if (n, k, c) in done)
        for n, kind, c, spec in tqdm(pending, desc="dq sensitivity", disable=not progress, unit="item"):
            t0 = time.perf_counter()
            if spec is None:
                metrics_ = {"unet_noise": math.inf, "sqnr_db": -math.inf}
            else:
                metrics_ = _score(pipe, ref, n, kind, c, spec, info[n]["group"], image_prompts,
                                  sampling, evaluators, ref_clip)
            it = Item(n, kind, c, info[n]["group"], metrics_, round(time.perf_counter() - t0, 4))
            items.append(it)
            if out_file is not None:
                out_file.write(json.dumps(it.to_dict()) + "\n")
                out_file.flush()
                os.fsync(out_file.fileno())
    finally:
        if out_file is not None:
            out_file.close()
    if world > 1:
        _barrier()
        if folder is not None:  # every shard's items are on disk now: all return the merged table
            return merge(folder, info, sdict, fp)
    return _table(info, items, sdict, fp)


def _barrier() -> None:
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def _prepare_reference(pipe, prompts, sampling, settings, folder, fp, sdict, rank, world, progress) -> _Reference:
    if folder is None:
        return _Reference.compute(pipe, prompts, sampling, settings, progress)[0]
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    want = {"version": TABLE_VERSION, "model": fp, "settings": sdict}
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if have.get("model") != fp:
            raise ValueError(
                f"cache_dir {folder} was written for another model (fingerprint {have.get('model')}, "
                f"this UNet is {fp}); use another cache_dir or delete that folder"
            )
        if have != want:
            raise ValueError(
                f"cache_dir {folder} was written with other settings or prompts; use another "
                "cache_dir (or delete it) to analyze with these"
            )
    if rank == 0 and not manifest.exists():  # written last: a kill before it recomputes
        ref, tensors, meta = _Reference.compute(pipe, prompts, sampling, settings, progress)
        _Reference.save(folder, tensors, meta)
        manifest.write_text(json.dumps(want, indent=1, sort_keys=True))
    if world > 1:
        _barrier()
    return _Reference.load(folder)


def _table(info, items: list[Item], sdict, fp) -> SensitivityTable:
    table = SensitivityTable(layers=info, items=items, settings=sdict, model=fp)
    ratios = [it.metrics["image_mse"] / it.metrics["unet_noise"] for it in items
              if "image_mse" in it.metrics and math.isfinite(it.metrics["unet_noise"])
              and it.metrics["unet_noise"] > 0 and it.metrics["image_mse"] > 0]
    table.gain = float(torch.tensor(ratios).median()) if ratios else 1.0
    return table


def merge(cache_dir: str | os.PathLike, layers: dict | None = None, settings: dict | None = None,
          model: str | None = None) -> SensitivityTable:
    """The table from every shard's items in `cache_dir` (what `analyze` returns under
    accelerate). `layers`, `settings` and `model` default to the last analyzed run's."""
    folder = Path(cache_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    items: dict[tuple, Item] = {}
    for f in sorted(folder.glob("items-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                it = Item(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            items[it.key()] = it
    if layers is None:
        raise ValueError("merge needs the layer table (pass layers=, or call analyze)")
    return _table(layers, list(items.values()), settings or manifest["settings"], model or manifest["model"])


# ------------------------------------------------------------------------------ CLI


def add_cli(subparsers) -> None:
    """Register `dq sensitivity MODEL_OR_DIR --prompts FILE --out DIR`."""
    p = subparsers.add_parser(
        "sensitivity", help="score every layer x candidate format against full precision",
        description="Metric-decoupled sensitivity analysis (resumable; shardable with accelerate launch).",
    )
    p.add_argument("pipeline", help="a diffusers pipeline folder or hub id ('embedded' for dq's own)")
    p.add_argument("--prompts", default=None,
                   help="calibration prompts, one per line (default: the model recipe's prompt set)")
    p.add_argument("--out", required=True, help="cache folder; the table is written to OUT/table.json")
    p.add_argument("--weights", nargs="+", default=None, help="weight candidates (default: the recipe's)")
    p.add_argument("--acts", nargs="+", default=None, help="activation candidates (default: the recipe's)")
    p.add_argument("--num-images", type=int, default=SensitivitySettings.num_images,
                   help="prompts whose images score content layers")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of calibration and images, exactly (default: the model recipe's, at most 10)")
    p.set_defaults(func=_cli_run)


def _cli_run(args) -> int:
    from dq import recipes

    if args.num_images < 1:
        raise SystemExit("dq sensitivity: --num-images must be >= 1")
    for f in (args.weights or []) + (args.acts or []):
        try:
            formats.get(f)
        except ValueError as e:
            raise SystemExit(f"dq sensitivity: --weights/--acts: {e}") from None
    prompts = None
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"dq sensitivity: --prompts {args.prompts}: no such file")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise SystemExit(f"dq sensitivity: --prompts {args.prompts} has no prompts (one per line)")
    if args.pipeline == "embedded":
        from dq import assets

        pipe = assets.load_embedded_pipeline()
    else:
        from diffusers import DiffusionPipeline

        if not Path(args.pipeline).exists() and "/" not in args.pipeline:
            raise SystemExit(f"dq sensitivity: {args.pipeline}: no such folder (or a hub id owner/name)")
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=torch.float32)
    recipe = recipes.recipe_for(pipe)
    if prompts is None:
        prompts = recipes.calibration_prompts(recipe)[: recipe.calibration.num_prompts]
    sampling = recipe.calibration.sampling().replace(batch_size=max(1, min(8, len(prompts))))
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("dq sensitivity: --steps must be >= 1")
        sampling = sampling.replace(num_inference_steps=args.steps)
    settings = SensitivitySettings(weight_candidates=args.weights, act_candidates=args.acts,
                                   num_images=min(args.num_images, len(prompts)), sampling=sampling,
                                   max_steps=None if args.steps is not None else SensitivitySettings.max_steps)
    table = analyze(pipe, prompts, settings=settings, recipe=recipe, cache_dir=args.out)
    out = Path(args.out) / "table.json"
    out.write_text(table.to_json())
    print(f"dq: {len(table.items)} items over {len(table.layers)} layers -> {out}")
    return 0
