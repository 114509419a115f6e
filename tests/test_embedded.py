"""The shipped embedded pipeline: loads offline with plain diffusers and draws quickly."""

import json
import time
from pathlib import Path

import pytest
import torch

import dq.assets


@pytest.fixture(scope="module")
def pipe():
    return dq.assets.load_embedded_pipeline()


def test_loads_with_plain_from_pretrained():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        str(dq.assets.embedded_pipeline_path()), local_files_only=True
    )
    assert type(p.unet).__name__ == "UNet2DConditionModel"
    assert type(p.text_encoder).__name__ == "CLIPTextModel"
    assert type(p.tokenizer).__name__.startswith("CLIPTokenizer")
    assert type(p.vae).__name__ == "AutoencoderKL"


def test_generates_an_image_in_seconds(pipe):
    t = time.time()
    out = pipe("a big red circle in the middle on a black background", num_inference_steps=8,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    assert time.time() - t < 10
    img = out.images
    assert img.shape == (1, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
    again = pipe("a big red circle in the middle on a black background", num_inference_steps=8,
                 guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert torch.equal(img, again)


@pytest.mark.parametrize(
    "kind", ["attn1", "attn2", "ff", "resnets", "proj_in", "time_emb", "conv_in"]
)
def test_unet_has_every_layer_kind_mixdq_treats(pipe, kind):
    names = [
        n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    assert any(kind in n for n in names), kind


def test_unet_has_sd_block_structure(pipe):
    c = pipe.unet.config
    assert "CrossAttnDownBlock2D" in c.down_block_types and "DownBlock2D" in c.down_block_types
    assert "CrossAttnUpBlock2D" in c.up_block_types and "UpBlock2D" in c.up_block_types
    assert c.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert c.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_text_encoder_is_causal_bos_output_prompt_independent(pipe):
    ids = pipe.tokenizer(["a red circle", "a big blue square at the top on white"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        h = pipe.text_encoder(ids).last_hidden_state
    assert torch.allclose(h[0, 0], h[1, 0], atol=1e-5)
    assert not torch.allclose(h[0, 3], h[1, 3], atol=1e-3)


def test_world_words_are_single_tokens(pipe):
    for word in ["circle", "triangle", "purple", "background", "middle", "centre"]:
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_assets_are_safetensors_and_small():
    root = dq.assets.assets_dir()
    files = [f for d in ("tiny-shapes", "evaluators") for f in (root / d).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert any(f.suffix == ".safetensors" for f in files)


def test_defaults_and_prompt_files():
    d = dq.assets.embedded_defaults()
    assert d["height"] == d["width"] == 32 and d["num_inference_steps"] > 0
    prompts, labels = dq.assets.heldout_prompts(10)
    assert len(prompts) == len(labels) == 10 and set(labels[0]) == {
        "colour",
        "shape",
        "size",
        "position",
        "background",
    }
    assert len(dq.assets.calibration_prompts()) == 64
    with pytest.raises(ValueError, match="n must be"):
        dq.assets.heldout_prompts(0)
    assert json.loads((Path(dq.assets.embedded_pipeline_path()) / "model_index.json").read_text())[
        "unet"
    ]
