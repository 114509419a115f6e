"""Tests of dq.testing (tiny offline pipelines) and of the offline guard in conftest."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from torch import nn

from dq.testing import (
    TINY_VOCAB_WORDS,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_tokenizer,
    tiny_tokenizer_dir,
)

BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}


def _state(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is not None:
            out.update({f"{comp}.{k}": v for k, v in module.state_dict().items()})
    return out


def _generate(pipe, prompt="a red circle", **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, generator=generator, output_type="pt", **kwargs
    ).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_same_seed_same_pipeline_bit_for_bit(kind):
    a, b = BUILDERS[kind](seed=3), BUILDERS[kind](seed=3)
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_generate(a), _generate(b))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_different_seeds_differ_and_global_rng_untouched(kind):
    before = torch.get_rng_state()
    a, b = BUILDERS[kind](seed=0), BUILDERS[kind](seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    w = "conv_in.weight"
    assert not torch.equal(a.unet.state_dict()[w], b.unet.state_dict()[w])


@pytest.mark.parametrize("output_type", ["pt", "pil"])
def test_tiny_sd_generates_64px_images(tiny_sd, output_type):
    out = tiny_sd(
        "a red circle", num_inference_steps=2, height=64, width=64, output_type=output_type
    )
    image = out.images
    if output_type == "pt":
        assert tuple(image.shape) == (1, 3, 64, 64)
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    else:
        assert image[0].size == (64, 64)


def test_tiny_sdxl_generates_64px_images(tiny_sdxl):
    assert isinstance(tiny_sdxl, StableDiffusionXLPipeline)
    image = _generate(tiny_sdxl, guidance_scale=5.0)
    assert tuple(image.shape) == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


def test_tiny_sd_runs_two_steps_fast(tiny_sd):
    tiny_sd("a red circle", num_inference_steps=2, output_type="pt")  # warm-up
    times = []
    for _ in range(2):
        start = time.perf_counter()
        tiny_sd("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt")
        times.append(time.perf_counter() - start)
    assert min(times) < 2.0, f"tiny pipeline too slow: {times}"  # ~0.15 s single-threaded


def test_tiny_sd_has_stable_diffusion_structure(tiny_sd):
    assert isinstance(tiny_sd, StableDiffusionPipeline)
    assert tiny_sd.vae_scale_factor == 8
    assert tiny_sd.safety_checker is None and tiny_sd.feature_extractor is None
    unet = tiny_sd.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for part in (
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "resnets.0.conv1",
        "attn1.to_q",
        "attn2.to_k",
        "ff.net.0.proj",
        "ff.net.2",
    ):
        assert any(part in n for n in names), part
    attn2_k = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert attn2_k.in_features == tiny_sd.text_encoder.config.hidden_size == 32


def test_tiny_sdxl_has_sdxl_structure(tiny_sdxl):
    unet = tiny_sdxl.unet
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == 64  # two CLIP encoders of width 32, concatenated
    assert type(tiny_sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert hasattr(unet, "add_embedding") and hasattr(unet, "add_time_proj")


@pytest.mark.parametrize("cross_attention_dim", [16, 48])
def test_cross_attention_dim_sets_text_width(cross_attention_dim):
    pipe = tiny_sd_pipeline(seed=0, cross_attention_dim=cross_attention_dim)
    assert pipe.text_encoder.config.hidden_size == cross_attention_dim
    assert tuple(_generate(pipe).shape) == (1, 3, 64, 64)


def test_tokenizer_single_tokens_for_vocab_words():
    tok = tiny_tokenizer()
    ids = tok("a red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "circle</w>"]
    for word in TINY_VOCAB_WORDS:
        assert len(tok(word).input_ids) == 3, word  # BOS, one token, EOS


def test_tokenizer_handles_any_text_and_pads_to_77():
    tok = tiny_tokenizer()
    enc = tok(
        "Zebra-42 über!", padding="max_length", max_length=tok.model_max_length, truncation=True
    )
    assert tok.model_max_length == 77 and len(enc.input_ids) == 77
    assert tok.unk_token_id not in enc.input_ids[1:5]  # byte fallback, no unknowns
    assert enc.input_ids[-1] == tok.pad_token_id == tok.eos_token_id


def test_tokenizer_files_written_once_per_process():
    first, second = tiny_tokenizer_dir(), tiny_tokenizer_dir()
    assert first == second
    assert {"vocab.json", "merges.txt"} <= {p.name for p in first.iterdir()}


def test_text_encoder_is_causal_bos_output_prompt_independent(tiny_sd):
    tok, enc = tiny_sd.tokenizer, tiny_sd.text_encoder
    ids = tok(
        ["a red circle", "two dogs under a tree"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = enc(ids).last_hidden_state  # [2, 77, 32]
    assert torch.allclose(hidden[0, 0], hidden[1, 0], atol=0, rtol=0)
    assert not torch.allclose(hidden[0, 1], hidden[1, 1])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_and_reload_offline_identical(kind, tmp_path):
    pipe = BUILDERS[kind](seed=0)
    pipe.save_pretrained(tmp_path)
    cls = type(pipe)
    loaded = cls.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_generate(pipe), _generate(loaded))


def test_bad_arguments_raise_helpful_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_sd_pipeline(block_out_channels=(30, 64))
    with pytest.raises(ValueError, match="'euler' or 'ddim'"):
        tiny_sd_pipeline(scheduler="pndm-ish")


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_scheduler_choice(scheduler):
    pipe = tiny_sd_pipeline(scheduler=scheduler)
    expected = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}[scheduler]
    assert type(pipe.scheduler).__name__ == expected
    assert torch.isfinite(_generate(pipe)).all()


# --- the offline guard from conftest -----------------------------------------------------------


def test_offline_environment_is_set():
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[var] == "1"


@pytest.mark.parametrize("address", [("8.8.8.8", 53), ("huggingface.co", 443)], ids=["ip", "name"])
def test_network_connections_are_refused(address):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(RuntimeError, match="offline"):
            sock.connect(address)


def test_loopback_connections_are_allowed():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.connect(server.getsockname())
            conn, _ = server.accept()
            conn.close()
