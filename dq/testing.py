"""Tiny seeded text-to-image pipelines built offline, for tests and smoke runs.

The pipelines have the real diffusers/transformers classes and the structure of Stable
Diffusion (1.x / 2.x) and SDXL -- resnets, ``conv_in``/``conv_out``, the time embedding,
self-attention (``attn1``), cross-attention (``attn2``) and feed-forward (``ff``) layers, a
VAE with an 8x spatial factor, CLIP text encoders with CLIP's causal mask -- at widths of a
few dozen channels, with random weights drawn from a seed. No file is downloaded: the CLIP
tokenizer is built from a small byte-level BPE vocabulary written once per process to a
temporary directory.

Example:
    >>> from dq.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    >>> tuple(image.shape)
    (1, 3, 64, 64)
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "TINY_VOCAB_WORDS",
    "tiny_clip_text_config",
    "tiny_scheduler",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_tokenizer",
    "tiny_tokenizer_dir",
    "tiny_vae",
]

# Words that get a single token each (with the end-of-word marker); any other text still
# tokenizes, byte by byte. Lowercase only: the CLIP tokenizer lowercases its input.
TINY_VOCAB_WORDS: tuple[str, ...] = tuple(
    "a an the of on in with and or at by to from under over next near behind above below "
    "red green blue yellow orange purple pink black white gray grey brown gold silver "
    "circle square triangle star heart ring line dot disk cross box cube sphere shape shapes "
    "small big large tiny huge bright dark light striped spotted round "
    "photo photograph picture painting drawing image render sketch "
    "cat dog bird fish horse cow tree flower house car boat sky sea mountain city road "
    "astronaut riding man woman person child face apple banana "
    "background foreground left right top bottom center middle corner "
    "one two three four many several".split()
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; position embeddings match it

_TOKENIZER_DIR: Path | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character map (as in GPT-2 / CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@functools.lru_cache(maxsize=4)
def _build_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: 256 byte symbols, the same with ``</w>``, merges, specials.

    The merges are learned as BPE does (most frequent adjacent pair first, ties broken by the
    pair itself, so the result is deterministic) until every word of ``words`` is one symbol;
    encoding replays merges in that order, so each of those words becomes one token.
    """
    byte_map = _bytes_to_unicode()
    byte_chars = list(byte_map.values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(tokens)
    merges: list[str] = []
    corpus = []
    for word in dict.fromkeys(words):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        corpus.append(symbols[:-1] + [symbols[-1] + "</w>"])
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in corpus:
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        for k, symbols in enumerate(corpus):
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            corpus[k] = out
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def tiny_tokenizer_dir() -> Path:
    """Directory holding the tiny CLIP tokenizer files, written once per process.

    Holds ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json``; ``CLIPTokenizer.from_pretrained(dir)`` loads it offline. The
    directory is removed when the process exits.
    """
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is not None and (_TOKENIZER_DIR / "vocab.json").exists():
        return _TOKENIZER_DIR
    path = Path(tempfile.mkdtemp(prefix="dq-tiny-clip-tokenizer-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    vocab, merges = _build_vocab(TINY_VOCAB_WORDS)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, **specials}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    _TOKENIZER_DIR = path
    return path


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the tiny vocabulary (pads with ``<|endoftext|>`` to 77 tokens)."""
    return CLIPTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def tiny_clip_text_config(
    hidden_size: int = 32, num_hidden_layers: int = 2, projection_dim: int = 32
) -> CLIPTextConfig:
    """Config of a tiny CLIP text encoder matching :func:`tiny_tokenizer`'s vocabulary.

    Args:
        hidden_size: width of the token embeddings and of the output hidden states.
        num_hidden_layers: number of transformer layers (causal self-attention, as CLIP).
        projection_dim: output width of ``CLIPTextModelWithProjection``'s ``text_embeds``.
    """
    vocab, _ = _build_vocab(TINY_VOCAB_WORDS)
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 5,  # odd on purpose: no accidental square shapes
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def tiny_vae() -> AutoencoderKL:
    """A 4-level AutoencoderKL: 4 latent channels, images 8x the latent size."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_scheduler(name: str = "euler"):
    """A Stable-Diffusion-style scheduler (scaled-linear betas, 1000 training steps).

    Args:
        name: ``"euler"`` (EulerDiscreteScheduler) or ``"ddim"`` (DDIMScheduler).
    """
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
    )
    if name == "euler":
        return EulerDiscreteScheduler(**common, timestep_spacing="leading", steps_offset=1)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    raise ValueError(f"unknown tiny scheduler {name!r}; use 'euler' or 'ddim'")


def tiny_sd_pipeline(
    seed: int = 0,
    cross_attention_dim: int = 32,
    *,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    sample_size: int = 8,
    scheduler: str = "euler",
) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion pipeline with random weights drawn from ``seed``, built offline.

    UNet: ``CrossAttnDownBlock2D`` + ``DownBlock2D`` down, a cross-attention mid block,
    ``UpBlock2D`` + ``CrossAttnUpBlock2D`` up (the SD layout, two levels instead of four). Text
    encoder: CLIP, 2 layers, width ``cross_attention_dim``. Images are ``8 * sample_size``
    pixels square (64 by default). The global torch RNG is left untouched.

    Args:
        seed: seed of every weight; the same seed gives the same pipeline, bit for bit.
        cross_attention_dim: text-encoder width, i.e. the UNet's cross-attention input width.
        block_out_channels: UNet widths per level (each divisible by 8).
        layers_per_block: resnets (and transformers) per UNet level.
        sample_size: latent side length the UNet is configured for (default image side / 8).
        scheduler: ``"euler"`` or ``"ddim"``.

    Example:
        >>> pipe = tiny_sd_pipeline(seed=0)
        >>> out = pipe("a red circle", num_inference_steps=2, output_type="pt")
    """
    levels = len(block_out_channels)
    if levels < 2 or any(c % 8 for c in block_out_channels):
        raise ValueError(
            f"block_out_channels={block_out_channels!r}: give at least two widths, each a "
            "multiple of 8 (the UNet uses 8 normalization groups), e.g. (32, 64)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,  # diffusers' legacy name: 8 heads
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=cross_attention_dim))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=tiny_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(
    seed: int = 0, *, sample_size: int = 8, scheduler: str = "euler"
) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline with random weights drawn from ``seed``, built offline.

    Two CLIP text encoders of width 32 (``CLIPTextModel`` and ``CLIPTextModelWithProjection``)
    whose penultimate hidden states are concatenated (cross-attention width 64); the UNet uses
    ``addition_embed_type="text_time"`` (pooled text embedding + 6 micro-conditioning ids),
    linear attention projections and two transformer layers in its cross-attention level.

    Args:
        seed: seed of every weight; the same seed gives the same pipeline, bit for bit.
        sample_size: latent side length (default image side is ``8 * sample_size`` = 64).
        scheduler: ``"euler"`` or ``"ddim"``.

    Example:
        >>> pipe = tiny_sdxl_pipeline(seed=0)
        >>> out = pipe("a red circle", num_inference_steps=2, output_type="pt")
    """
    text_width, time_dim = 32, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * time_dim + text_width,
            cross_attention_dim=2 * text_width,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = tiny_vae()
        config = tiny_clip_text_config(hidden_size=text_width, projection_dim=text_width)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(config)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=tiny_scheduler(scheduler),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
