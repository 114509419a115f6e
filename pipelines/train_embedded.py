"""Build and train the embedded tiny-shapes pipeline and its evaluators, on CPU, from a seed.

Stages (each skipped when its output exists, unless --force names it):

    tokenizer   CLIP-style BPE vocab.json + merges.txt covering the world's words
    vae         AutoencoderKL, 32x32x3 pixels <-> 8x8x4 latents
    text        CLIPTextModel (causal, like CLIP), pre-trained contrastively against a tiny CNN
    classifier  attribute classifier (evaluator: attribute accuracy, FID features)
    unet        UNet2DConditionModel (SD structure), epsilon prediction, text encoder fine-tuned
    decoder     the VAE decoder fine-tuned alone on the frozen encoder's latents
    judge       the attribute classifier fine-tuned on real images + VAE reconstructions
    clip        open_clip CLIP evaluator (tiny ViT + text tower) for the CLIP score
    assemble    StableDiffusionPipeline -> dq/data/tiny-shapes, evaluators -> dq/data/evaluators

Stages write to runs/embedded/ (ignored) and dq/data/ (package data, shipped in the wheel).
A full run uses two processes, one core each: lane a (vae, unet) and lane b (text, classifier,
clip, decoder, judge); a stage waits for what it needs from the other lane, and the UNet takes
both cores once lane b is done.
From scratch on a 2-core machine this took 48.5 minutes
(eval/results/train_embedded.log).

Run:  python pipelines/train_embedded.py            (log: runs/embedded/train.log)
      python pipelines/train_embedded.py --force unet assemble
      python pipelines/train_embedded.py --only clip          (one stage, this process)
      python pipelines/train_embedded.py --set work=runs/fresh pipeline_out=runs/fresh/tiny-shapes \
          evaluators_out=runs/fresh/evaluators               (a second run beside the shipped one)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq import world  # noqa: E402


@dataclass(frozen=True)
class Settings:
    seed: int = 0  # one seed for data order, init and noise of every stage
    # torch CPU threads per lane: two lanes run at once, one core each (2 threads per process
    # on a shared 2-core machine oversubscribe: measured 4x slower)
    threads: int = 1
    threads_alone: int = 2  # the UNet lane's threads once the other lane has finished
    work: str = "runs/embedded"  # checkpoints and the log (not shipped)
    pipeline_out: str = "dq/data/tiny-shapes"  # the shipped diffusers pipeline (package data)
    evaluators_out: str = "dq/data/evaluators"  # the shipped evaluator networks (package data)
    n_images: int = 60_000  # training images drawn once from the world's train split
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: x4 downsampling, 32 -> 8
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4  # KL weight per latent element (keeps latents smooth, near N(0, s^2))
    decoder_steps: int = 1000  # decoder-only fine-tuning on frozen-encoder latents, per round
    decoder_rounds: int = 3  # rounds of decoder_steps, each with its own warm-up + cosine LR
    decoder_lr: float = 1e-3
    # text encoder (pipeline's CLIPTextModel)
    text_width: int = 64  # hidden size = UNet cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4
    context: int = 32  # tokenizer.model_max_length = max_position_embeddings
    text_steps: int = 500  # contrastive pre-training
    text_batch: int = 96
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 64)  # latent 8x8 -> 4x4 -> 2x2
    unet_heads: int = 4  # attention heads per transformer block
    # Constant LR after warm-up, so stopping early (or resuming from a checkpoint and going
    # on) equals a run with that many steps. The shipped pipeline is one uninterrupted run of
    # this script from scratch: 48.5 min on 2 cores (UNet 0.33 s/step on one core beside
    # lane b, 0.30 s/step on both after it).
    unet_steps: int = 8250
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_ft_lr: float = 1e-4  # text encoder fine-tuned jointly with the UNet
    # From this step on, an auxiliary loss (attribute classification from the end-of-text
    # state) and a higher text LR. The contrastive pre-training leaves shape/position words
    # almost indistinguishable; this loss, first added to a run at step 4500, is kept there.
    text_aux_from: int = 4500
    text_aux_weight: float = 0.05  # relative to the diffusion loss (~0.03)
    text_aux_lr: float = 1e-3  # attribute heads (not shipped)
    text_ft_lr2: float = 3e-4  # text encoder LR once the auxiliary loss is on
    warmup: int = 100  # linear LR warm-up steps, then cosine to 10% (constant for the UNet)
    ema: float = 0.998  # EMA decay of UNet and text encoder weights (what is shipped)
    min_snr: float = 5.0  # min-SNR-gamma loss weighting (faster convergence)
    caption_drop: float = 0.1  # empty caption share, for classifier-free guidance
    attr_drop: float = 0.2  # chance of leaving size / position / background out of a caption
    ckpt_every: int = 250  # UNet checkpoint interval (resumable mid-stage)
    # evaluators
    clf_steps: int = 600
    clf_batch: int = 64
    judge_steps: int = 400  # classifier fine-tuning on VAE reconstructions (stage judge)
    judge_recon: int = 6000  # training images reconstructed for it
    clip_steps: int = 500
    clip_batch: int = 64
    clip_width: int = 64
    # sampling defaults written next to the pipeline
    sample_steps: int = 20
    guidance: float = 4.0


STAGES = ("tokenizer", "vae", "text", "classifier", "unet", "decoder", "judge", "clip", "assemble")
S = Settings()
WORK = ROOT / S.work
LOG = WORK / "train.log"


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with LOG.open("a") as f:
        f.write(line + "\n")


def seed_all(offset: int) -> torch.Generator:
    random.seed(S.seed + offset)
    np.random.seed(S.seed + offset)
    torch.manual_seed(S.seed + offset)
    return torch.Generator().manual_seed(S.seed + offset)


def lr_at(step: int, total: int, base: float) -> float:
    if step < S.warmup:
        return base * (step + 1) / S.warmup
    p = (step - S.warmup) / max(1, total - S.warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------- data


def load_data() -> tuple[torch.Tensor, np.ndarray]:
    """The training images (uint8 N,3,32,32) and their labels (N,5); cached under work/."""
    path = WORK / f"data_{S.n_images}_{S.seed}.npz"
    if not path.exists():
        t = time.time()
        imgs, labels = world.images_and_labels(S.n_images, "train", S.seed)
        np.savez(path, imgs=imgs, labels=labels)
        log(f"drew {S.n_images} images in {time.time() - t:.0f}s")
    d = np.load(path)
    return torch.from_numpy(d["imgs"]), d["labels"]


def attrs_of(label_row: np.ndarray) -> world.Attributes:
    return world.Attributes(*(world.VALUES[n][i] for n, i in zip(world.ATTRIBUTES, label_row, strict=True)))


def captions_for(labels: np.ndarray, rng: random.Random, drop_caption: float) -> list[str]:
    out = []
    for row in labels:
        if rng.random() < drop_caption:
            out.append("")
        else:
            out.append(world.caption(attrs_of(row), rng, S.attr_drop))
    return out


def match_matrix(labels: np.ndarray, texts: list[str]) -> torch.Tensor:
    """m[i, j] = 1 when caption j is true of image i (all attributes it names agree)."""
    named = [world.parse_caption(t) for t in texts]
    m = torch.zeros(len(labels), len(texts))
    for i, row in enumerate(labels):
        a = attrs_of(row)
        for j, p in enumerate(named):
            m[i, j] = float(all(getattr(a, k) == v for k, v in p.items()))
    return m


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0  # uint8 -> [-1, 1]


# ---------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (ASCII letters map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: apply the lowest-ranked available merge until none."""
    rank = {m: i for i, m in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        r, i = min(pairs)
        if r == math.inf:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def stage_tokenizer(out: Path) -> None:
    """vocab.json + merges.txt: every byte (alone and word-final) plus one token per world word."""
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    # For each word, run BPE with the merges so far, then append merges joining what is left
    # left to right. Later merges rank lower, so no earlier word's tokenization changes.
    for word in (w for w in world.vocabulary() if len(w) > 1):
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in known:
                known.add(pieces[0])
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # end-of-text has the largest id (open_clip argmax)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=S.context)
    bad = [w for w in world.vocabulary() if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise RuntimeError(f"words not single tokens: {bad}")
    tok.save_pretrained(out)
    log(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges -> {out}")


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(WORK / "tokenizer")


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=S.context, truncation=True,
               return_tensors="pt").input_ids  # fmt: skip


# ---------------------------------------------------------------------------- VAE


def build_vae():
    from diffusers import AutoencoderKL

    n = len(S.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=S.vae_channels, layers_per_block=1, norm_num_groups=8,
    )  # fmt: skip


def stage_vae(out: Path, imgs: torch.Tensor) -> None:
    g = seed_all(1)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=S.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(S.vae_steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, S.vae_steps, S.vae_lr)
        x = to_unit(imgs[torch.randint(0, len(imgs), (S.vae_batch,), generator=g)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + S.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == S.vae_steps - 1:
            log(f"vae {step}/{S.vae_steps} loss {loss.item():.4f} kl {kl.item():.2f} "
                f"{time.time() - t0:.0f}s")  # fmt: skip
    vae.eval()
    with torch.no_grad():  # scaling factor: 1 / std of latents (as SD)
        z = torch.cat([vae.encode(to_unit(imgs[i : i + 500])).latent_dist.mean for i in range(0, min(4000, len(imgs)), 500)])
        x = to_unit(imgs[:500])
        mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out)
    (WORK / "latents.pt").unlink(missing_ok=True)  # a new encoder: re-encode (UNet, decoder)
    latents(vae, imgs)
    log(f"vae done in {time.time() - t0:.0f}s: recon mse {mse:.5f} psnr "
        f"{10 * math.log10(4 / mse):.1f} dB, scaling_factor {1 / z.std():.4f}")  # fmt: skip


def stage_decoder(out: Path, imgs: torch.Tensor) -> None:
    """Fine-tune the VAE decoder alone on the frozen encoder's latents (as SD's ft-MSE decoder).

    The encoder, hence the UNet's latent space, is unchanged, so this can run beside the UNet.
    """
    from diffusers import AutoencoderKL

    done = int((out / "rounds.txt").read_text()) if (out / "rounds.txt").exists() else 0
    g = seed_all(6 + done)
    vae = AutoencoderKL.from_pretrained(out if done else WORK / "vae")
    lat_mean, lat_std = latents(vae, imgs)
    vae.requires_grad_(False).eval()
    dec = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in dec:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(dec, lr=S.decoder_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(S.decoder_steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, S.decoder_steps, S.decoder_lr)
        idx = torch.randint(0, len(imgs), (S.vae_batch,), generator=g)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        x = to_unit(imgs[idx])
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == S.decoder_steps - 1:
            log(f"decoder {step}/{S.decoder_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        x = to_unit(imgs[:500])
        mse = F.mse_loss(vae.decode(lat_mean[:500]).sample, x).item()
    vae.save_pretrained(out)
    (out / "rounds.txt").write_text(str(done + 1))
    log(f"decoder round {done + 1} done in {time.time() - t0:.0f}s: recon mse {mse:.5f} "
        f"psnr {10 * math.log10(4 / mse):.1f} dB")  # fmt: skip


# ---------------------------------------------------------------------------- text encoder


def build_text_encoder(vocab_size: int, tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=S.text_width, intermediate_size=4 * S.text_width,
        num_hidden_layers=S.text_layers, num_attention_heads=S.text_heads,
        max_position_embeddings=S.context, hidden_act="quick_gelu", projection_dim=S.text_width,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return CLIPTextModel(cfg)


class TinyCNN(nn.Module):
    """32x32 image -> d-dim embedding; the image side of contrastive text pre-training."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, d),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def soft_clip_loss(a: torch.Tensor, b: torch.Tensor, match: torch.Tensor, scale: torch.Tensor):
    """Contrastive loss with every true (image, caption) pair as a positive."""
    logits = scale.exp() * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # (N_img, N_txt)
    t_i = match / match.sum(1, keepdim=True)
    t_t = match.T / match.T.sum(1, keepdim=True)
    return -(t_i * logits.log_softmax(1)).sum(1).mean() / 2 - (
        t_t * logits.T.log_softmax(1)
    ).sum(1).mean() / 2


def stage_text(out: Path, imgs: torch.Tensor, labels: np.ndarray) -> None:
    g = seed_all(2)
    rng = random.Random(S.seed + 2)
    tok = load_tokenizer()
    te = build_text_encoder(len(tok), tok).train()
    cnn = TinyCNN(S.text_width)
    proj = nn.Linear(S.text_width, S.text_width, bias=False)
    scale = nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*te.parameters(), *cnn.parameters(), *proj.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    t0 = time.time()
    for step in range(S.text_steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, S.text_steps, 1e-3)
        idx = torch.randint(0, len(imgs), (S.text_batch,), generator=g)
        texts = captions_for(labels[idx.numpy()], rng, 0.0)
        ids = tokenize(tok, texts)
        t_emb = proj(te(ids).pooler_output)
        loss = soft_clip_loss(cnn(to_unit(imgs[idx])), t_emb, match_matrix(labels[idx.numpy()], texts), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == S.text_steps - 1:
            log(f"text {step}/{S.text_steps} loss {loss.item():.3f} {time.time() - t0:.0f}s")
    te.save_pretrained(out)
    log(f"text done in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------- classifier


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make the judge robust to generated images: blur some, add noise, shift colours a bit."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = (torch.rand(n, 1, 1, 1, generator=g) * 0.8) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = (1 - w) * x + w * blur
    x = x + 0.03 * torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    return (x + 0.03 * torch.randn(n, 3, 1, 1, generator=g)).clamp(0, 1)


def stage_classifier(out: Path, imgs: torch.Tensor, labels: np.ndarray) -> None:
    from dq.assets import AttributeNet, save_module

    g = seed_all(3)
    heads = {n: len(world.VALUES[n]) for n in world.ATTRIBUTES}
    net = AttributeNet(heads).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    y_all = torch.from_numpy(labels)
    t0 = time.time()
    for step in range(S.clf_steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, S.clf_steps, 2e-3)
        idx = torch.randint(0, len(imgs), (S.clf_batch,), generator=g)
        logits = net(augment(imgs[idx].float() / 255, g))
        loss = sum(F.cross_entropy(logits[n], y_all[idx, k]) for k, n in enumerate(world.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == S.clf_steps - 1:
            log(f"classifier {step}/{S.clf_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    net.eval()
    x, y = world.images_and_labels(1000, "heldout", S.seed + 99)
    with torch.no_grad():
        logits = net(torch.from_numpy(x).float() / 255)
    acc = {n: (logits[n].argmax(1).numpy() == y[:, k]).mean() for k, n in enumerate(world.ATTRIBUTES)}
    config = {"heads": heads, "values": {n: list(world.VALUES[n]) for n in world.ATTRIBUTES},
              "image_size": world.IMAGE_SIZE}  # fmt: skip
    save_module(net, out, config)
    log(f"classifier done in {time.time() - t0:.0f}s; held-out accuracy "
        + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))  # fmt: skip


def stage_judge(out: Path, imgs: torch.Tensor, labels: np.ndarray) -> None:
    """Fine-tune the attribute classifier on real images *and* their VAE reconstructions.

    The small VAE shifts hues a little (red and yellow drift towards orange) and blurs small
    shapes; a judge trained on clean images alone would blame the UNet for the VAE. Trained
    on reconstructions with the true labels, it judges what the UNet and text encoder chose.
    """
    from diffusers import AutoencoderKL

    from dq.assets import AttributeNet, _load_state, save_module

    g = seed_all(7)
    folder = ROOT / S.evaluators_out / "attributes"
    config = json.loads((folder / "config.json").read_text())
    net = _load_state(AttributeNet(config["heads"]), folder).train().requires_grad_(True)
    vae = AutoencoderKL.from_pretrained(WORK / "vae_ft").eval()
    lat_mean, lat_std = latents(vae, imgs)
    n = S.judge_recon
    with torch.no_grad():  # reconstructions of the first n training images, from latent samples
        z = lat_mean[:n] + lat_std[:n] * torch.randn(lat_mean[:n].shape, generator=g)
        recon = torch.cat([vae.decode(z[i : i + 250]).sample for i in range(0, n, 250)])
    recon = ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    y_all = torch.from_numpy(labels)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=1e-4)
    t0 = time.time()
    for step in range(S.judge_steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, S.judge_steps, 5e-4)
        i_real = torch.randint(0, len(imgs), (S.clf_batch // 2,), generator=g)
        i_rec = torch.randint(0, n, (S.clf_batch // 2,), generator=g)
        x = torch.cat([imgs[i_real], recon[i_rec]]).float() / 255
        y = torch.cat([y_all[i_real], y_all[i_rec]])
        logits = net(augment(x, g))
        loss = sum(F.cross_entropy(logits[k], y[:, j]) for j, k in enumerate(world.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == S.judge_steps - 1:
            log(f"judge {step}/{S.judge_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    net.eval()
    x, y = world.images_and_labels(500, "heldout", S.seed + 99)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_unit(xt)).latent_dist.mean).sample
        accs = {}
        for name, inp in (("real", xt.float() / 255), ("recon", (rec + 1).clamp(0, 2) / 2)):
            lg = net(inp)
            accs[name] = {k: float((lg[k].argmax(1).numpy() == y[:, j]).mean())
                          for j, k in enumerate(world.ATTRIBUTES)}  # fmt: skip
    config["finetuned_on"] = "world images + reconstructions by the pipeline's VAE"
    config["heldout_accuracy"] = accs
    save_module(net, folder, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "done.json").write_text(json.dumps(accs))
    log(f"judge done in {time.time() - t0:.0f}s; held-out accuracy {accs}")


# ---------------------------------------------------------------------------- UNet


def build_unet():
    from diffusers import UNet2DConditionModel

    n = len(S.unet_channels)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=S.unet_channels, layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=S.text_width, attention_head_dim=S.unet_heads,
    )  # fmt: skip


def build_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")  # fmt: skip


@torch.no_grad()
def encode_latents(vae, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = [], []
    for i in range(0, len(imgs), 500):
        d = vae.encode(to_unit(imgs[i : i + 500])).latent_dist
        mean.append(d.mean)
        std.append(d.std)
    return torch.cat(mean), torch.cat(std)


def latents(vae, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image under the VAE encoder (cached)."""
    lat_path = WORK / "latents.pt"
    if not lat_path.exists():
        t = time.time()
        torch.save(encode_latents(vae, imgs), str(lat_path) + ".tmp")
        Path(str(lat_path) + ".tmp").replace(lat_path)
        log(f"encoded latents in {time.time() - t:.0f}s")
    return torch.load(lat_path)


def stage_unet(out: Path, imgs: torch.Tensor, labels: np.ndarray) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    g = seed_all(4)
    rng = random.Random(S.seed + 4)
    tok = load_tokenizer()
    vae = AutoencoderKL.from_pretrained(WORK / "vae").eval()
    lat_mean, lat_std = latents(vae, imgs)
    sf = vae.config.scaling_factor
    te = CLIPTextModel.from_pretrained(WORK / "text").train()
    unet = build_unet().train()
    ema_unet, ema_te = build_unet().eval(), CLIPTextModel.from_pretrained(WORK / "text").eval()
    ema_unet.load_state_dict(unet.state_dict())
    sched = build_train_scheduler()
    abar = sched.alphas_cumprod  # (1000,)
    snr = abar / (1 - abar)
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": S.unet_lr},
                             {"params": te.parameters(), "lr": S.text_ft_lr}], weight_decay=0.01)  # fmt: skip
    # Attribute heads on the text encoder's end-of-text state (from step text_aux_from): the
    # contrastive pre-training leaves shape/position words nearly indistinguishable (cos 0.99).
    aux = nn.ModuleDict({n: nn.Linear(S.text_width, len(world.VALUES[n])) for n in world.ATTRIBUTES})
    ckpt = WORK / "unet_ckpt.pt"
    start = 0
    if ckpt.exists():  # resume mid-stage
        st = torch.load(ckpt, weights_only=False)
        if "aux" in st:
            aux.load_state_dict(st["aux"])
            opt.add_param_group({"params": aux.parameters(), "lr": S.text_aux_lr})
        for m, k in ((unet, "unet"), (te, "te"), (ema_unet, "ema_unet"), (ema_te, "ema_te"), (opt, "opt")):
            m.load_state_dict(st[k])
        g.set_state(st["g"])
        rng.setstate(st["rng"])
        start = st["step"]
        log(f"unet resumed at step {start}")
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text {sum(p.numel() for p in te.parameters()) / 1e6:.2f}M")  # fmt: skip
    t0, tl, losses = time.time(), time.time(), []
    for step in range(start, S.unet_steps):
        use_aux = step >= S.text_aux_from
        if use_aux and len(opt.param_groups) == 2:
            opt.add_param_group({"params": aux.parameters(), "lr": S.text_aux_lr})
        bases = (S.unet_lr, S.text_ft_lr2 if use_aux else S.text_ft_lr, S.text_aux_lr)
        for pg, base in zip(opt.param_groups, bases[: len(opt.param_groups)], strict=True):
            pg["lr"] = base * min(1.0, (step + 1) / S.warmup)
        idx = torch.randint(0, len(imgs), (S.unet_batch,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        texts = captions_for(labels[idx.numpy()], rng, S.caption_drop)
        ids = tokenize(tok, texts)
        t = torch.randint(0, 1000, (S.unet_batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, eps, t)
        hidden = te(ids).last_hidden_state  # (B, context, width)
        pred = unet(zt, t, hidden).sample
        w = torch.clamp(snr[t], max=S.min_snr) / snr[t]  # min-SNR-gamma for epsilon targets
        loss = (w * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        if use_aux:  # classify every attribute a caption names from its end-of-text state
            eot = hidden[torch.arange(len(ids)), (ids == tok.eos_token_id).int().argmax(1)]  # (B, width)
            named = [world.parse_caption(x) for x in texts]
            for n in world.ATTRIBUTES:
                y = torch.tensor([world.VALUES[n].index(d[n]) if n in d else -100 for d in named])
                if (y >= 0).any():
                    loss = loss + S.text_aux_weight * F.cross_entropy(aux[n](eot), y, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *te.parameters()], 1.0)
        opt.step()
        with torch.no_grad():
            d = min(S.ema, (1 + step) / (10 + step))
            for e, p in zip([*ema_unet.parameters(), *ema_te.parameters()],
                            [*unet.parameters(), *te.parameters()], strict=True):  # fmt: skip
                e.lerp_(p, 1 - d)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 and torch.get_num_threads() < S.threads_alone and marker("lane_b").exists():
            torch.set_num_threads(S.threads_alone)  # the other lane is done: take both cores
            log(f"unet: lane b done, {S.threads_alone} threads from step {step + 1}")
        if (step + 1) % 50 == 0:
            log(f"unet {step + 1}/{S.unet_steps} loss {np.mean(losses):.4f} "
                f"{(time.time() - tl) / 50:.2f}s/step")  # fmt: skip
            losses, tl = [], time.time()
        if (step + 1) % S.ckpt_every == 0 or step + 1 == S.unet_steps:
            st = {"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                  "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "g": g.get_state(),
                  "rng": rng.getstate(), "step": step + 1}  # fmt: skip
            if use_aux:
                st["aux"] = aux.state_dict()
            torch.save(st, str(ckpt) + ".tmp")
            Path(str(ckpt) + ".tmp").replace(ckpt)
            ema_unet.save_pretrained(WORK / "unet_latest")  # an EMA snapshot to sample from
            ema_te.save_pretrained(WORK / "text_latest")
    ema_unet.save_pretrained(out)
    ema_te.save_pretrained(WORK / "text_ft")
    log(f"unet done: {S.unet_steps - start} steps in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------- CLIP evaluator


def clip_model_config(vocab_size: int) -> dict:
    """open_clip CLIP config of the evaluator: a tiny ViT on 32x32 and a tiny text tower."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": world.IMAGE_SIZE, "patch_size": 4, "width": S.clip_width,
                       "layers": 3, "head_width": 16, "mlp_ratio": 2.0},  # fmt: skip
        "text_cfg": {"context_length": S.context, "vocab_size": vocab_size, "width": 64,
                     "heads": 4, "layers": 3, "mlp_ratio": 2.0},  # fmt: skip
    }


def stage_clip(out: Path, imgs: torch.Tensor, labels: np.ndarray) -> None:
    from dq.assets import CLIP_MEAN, CLIP_STD, build_clip, save_module

    g = seed_all(5)
    rng = random.Random(S.seed + 5)
    tok = load_tokenizer()
    cfg = clip_model_config(len(tok))
    model = build_clip(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    t0 = time.time()
    for step in range(S.clip_steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, S.clip_steps, 1e-3)
        idx = torch.randint(0, len(imgs), (S.clip_batch,), generator=g)
        texts = captions_for(labels[idx.numpy()], rng, 0.0)
        x = (augment(imgs[idx].float() / 255, g) - mean) / std
        img_f, txt_f, _ = model(x, tokenize(tok, texts))[:3]
        loss = soft_clip_loss(img_f, txt_f, match_matrix(labels[idx.numpy()], texts),
                              model.logit_scale.clamp(max=math.log(100)))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == S.clip_steps - 1:
            log(f"clip {step}/{S.clip_steps} loss {loss.item():.3f} {time.time() - t0:.0f}s")
    save_module(model.eval(), out, {"model_cfg": cfg, "mean": CLIP_MEAN, "std": CLIP_STD})
    shutil.copytree(WORK / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    log(f"clip done in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------- assemble


def stage_assemble(out: Path) -> None:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet_dir = WORK / "unet" if (WORK / "unet").exists() else WORK / "unet_latest"
    text_dir = WORK / "text_ft" if (WORK / "unet").exists() else WORK / "text_latest"
    from diffusers import UNet2DConditionModel

    sched = DPMSolverMultistepScheduler.from_config(build_train_scheduler().config,
                                                    algorithm_type="dpmsolver++", solver_order=2,
                                                    steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(WORK / "vae_ft" if (WORK / "vae_ft").exists() else WORK / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(text_dir),
        tokenizer=load_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(unet_dir),
        scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    defaults = {"num_inference_steps": S.sample_steps, "guidance_scale": S.guidance,
                "height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE,
                "trained_from": "pipelines/train_embedded.py", "settings": asdict(S),
                "unet_source": unet_dir.name}  # fmt: skip
    (out / "dq_defaults.json").write_text(json.dumps(defaults, indent=1))
    ev = ROOT / S.evaluators_out
    prompts = [{"prompt": p, **asdict(a)} for p, a in world.eval_prompts(500, S.seed)]
    (ev / "heldout_prompts.json").write_text(json.dumps(prompts, indent=0))
    calib = [world.sample(i, "train", S.seed + 7, S.attr_drop)[1] for i in range(64)]
    (out / "calibration_prompts.txt").write_text("\n".join(calib) + "\n")
    log(f"assembled {out} from {unet_dir.name}")


# ---------------------------------------------------------------------------- main


def configure(overrides: list[str]) -> None:
    """Apply KEY=VALUE overrides to the settings (values parsed as the field's type)."""
    global S, WORK, LOG
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        default = getattr(Settings(), key)
        if isinstance(default, tuple):
            changes[key] = tuple(int(v) for v in value.split(","))
        elif isinstance(default, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = type(default)(value)
    S = dataclasses.replace(Settings(), **changes)
    WORK = ROOT / S.work
    LOG = WORK / "train.log"


# Two lanes, one core each: the UNet (lane a, the long pole) and everything else (lane b).
# A stage that needs another lane's output waits for that stage's marker file.
LANES = {"a": ("vae", "unet"), "b": ("text", "classifier", "clip", "decoder", "judge")}
NEEDS = {"unet": ("vae", "text"), "decoder": ("vae",), "judge": ("decoder", "classifier")}


def outputs() -> dict[str, Path]:
    evals = ROOT / S.evaluators_out
    return {
        "tokenizer": WORK / "tokenizer", "vae": WORK / "vae", "text": WORK / "text",
        "classifier": evals / "attributes", "unet": WORK / "unet", "decoder": WORK / "vae_ft",
        "judge": WORK / "judge", "clip": evals / "clip",
        "assemble": ROOT / S.pipeline_out,
    }  # fmt: skip


def marker(stage: str) -> Path:
    return WORK / f"{stage}.done"


def wait_for(stage: str, partner_alive) -> None:
    """Block until the stages `stage` needs have finished (in the other lane)."""
    missing = [n for n in NEEDS.get(stage, ()) if not marker(n).exists()]
    if missing:
        log(f"{stage} waits for {', '.join(missing)}")
    while any(not marker(n).exists() for n in NEEDS.get(stage, ())):
        if not partner_alive():
            raise SystemExit(f"{stage}: the other lane stopped before {missing} finished; see {LOG}")
        time.sleep(2)


def run_stages(stages, force: list[str], data, partner_alive=None):
    for stage in stages:
        out = outputs()[stage]
        done = out.exists() and stage != "assemble"
        if stage == "decoder" and done:  # several rounds, one output folder
            done = int((out / "rounds.txt").read_text()) >= S.decoder_rounds
        if done and stage not in force:
            log(f"skip {stage}: {out} exists")
            marker(stage).touch()
            continue
        marker(stage).unlink(missing_ok=True)
        if stage in force and out.exists() and stage != "assemble":
            shutil.rmtree(out)
            if stage == "unet":
                (WORK / "unet_ckpt.pt").unlink(missing_ok=True)
        if partner_alive is not None:
            wait_for(stage, partner_alive)
        if data is None and stage not in ("tokenizer", "assemble"):
            data = load_data()
        t = time.time()
        log(f"stage {stage} -> {out}")
        if stage == "tokenizer":
            stage_tokenizer(out)
        elif stage == "assemble":
            stage_assemble(out)
        elif stage == "vae":
            stage_vae(out, data[0])
        elif stage == "decoder":
            while not (out / "rounds.txt").exists() or int((out / "rounds.txt").read_text()) < S.decoder_rounds:
                stage_decoder(out, data[0])
        else:
            stage_fns = {"text": stage_text, "classifier": stage_classifier, "unet": stage_unet,
                         "judge": stage_judge, "clip": stage_clip}  # fmt: skip
            stage_fns[stage](out, *data)
        marker(stage).touch()
        log(f"stage {stage} took {time.time() - t:.0f}s")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--force", nargs="*", default=[], choices=STAGES, help="re-run these stages")
    ap.add_argument("--only", nargs="*", default=None, choices=STAGES,
                    help="run only these, in order, in this process")
    ap.add_argument("--lane", choices=sorted(LANES), help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set unet_steps=100 work=/tmp/run")
    args = ap.parse_args()
    configure(args.set)
    torch.set_num_threads(S.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    (ROOT / S.evaluators_out).mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    if args.only is not None:
        run_stages([s for s in STAGES if s in args.only], args.force, None)
    elif args.lane == "b":  # started by the parent below; stops if the parent dies
        parent = os.getppid()
        run_stages(LANES["b"], args.force, None, lambda: os.getppid() == parent)
        marker("lane_b").touch()
        log(f"lane b done in {time.time() - t_all:.0f}s")
        return
    else:
        data = run_stages(["tokenizer"], args.force, load_data())
        for stage in (*LANES["a"], *LANES["b"], "lane_b"):  # markers of earlier runs: each
            marker(stage).unlink(missing_ok=True)  # lane re-marks what it finds done or does
        argv = [sys.executable, __file__, "--lane", "b", "--force", *args.force, "--set", *args.set]
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)  # it logs to the same file
        try:
            run_stages(LANES["a"], args.force, data, lambda: child.poll() is None)
        except BaseException:
            child.terminate()  # lane b may be waiting for this lane's output
            child.wait()
            raise
        if child.wait() != 0:
            raise SystemExit(f"lane b failed (exit {child.returncode}); see {LOG}")
        run_stages(["assemble"], args.force, data)
    log(f"all stages done in {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
