"""Everyday diffusers flows on a quantized pipeline: switching pipeline classes with
`from_pipe` (and back), and a UNet that carries an unfused LoRA at quantize time."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from peft import LoraConfig

import dq
from dq.modules import QuantizedLayerMixin
from dq.testing import tiny_sd_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
CALL = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def quantized():
    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 2},
                       progress=False)


def _n_quantized(unet):
    return sum(isinstance(m, QuantizedLayerMixin) for m in unet.modules())


@pytest.mark.parametrize("cls", [StableDiffusionImg2ImgPipeline, AutoPipelineForImage2Image])
def test_from_pipe_to_img2img_and_back_keeps_the_quantized_unet(quantized, cls):
    before = quantized(PROMPTS[0], generator=_gen(), **CALL).images

    i2i = cls.from_pipe(quantized)  # diffusers asks for float32 here: nothing to cast

    assert i2i.unet is quantized.unet and _n_quantized(i2i.unet) > 50
    image = torch.rand(1, 3, 32, 32, generator=_gen(1))
    out = i2i(PROMPTS[1], image=image, strength=0.75, generator=_gen(), **CALL).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    back = StableDiffusionPipeline.from_pipe(i2i)
    assert torch.equal(back(PROMPTS[0], generator=_gen(), **CALL).images, before)


def test_from_pipe_after_reload(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "p")
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p")
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(loaded)
    assert i2i.unet is loaded.unet and _n_quantized(i2i.unet) > 50


def test_model_to_same_dtype_is_nothing_other_dtypes_are_refused_with_the_fix(quantized):
    unet = quantized.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    assert unet.to(torch.float32) is unet and unet.to("cpu", torch.float32) is unet
    assert unet.to(dtype=torch.float32, device="cpu") is unet
    with pytest.raises(ValueError, match=r"float16.*dtype=torch.float32"):
        unet.to(torch.float16)
    with pytest.raises(ValueError, match="from_pipe pass dtype"):
        StableDiffusionImg2ImgPipeline.from_pipe(quantized, dtype=torch.bfloat16)
    after = unet.state_dict()
    assert all(torch.equal(state[k], after[k]) and state[k].dtype == after[k].dtype for k in state)


def test_unfused_lora_is_refused_before_any_work_with_both_fixes():
    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    for config in ("w8a8", "w4a16", "w4a8"):  # calibrated, weight-only, and mixed (sensitivity first)
        with pytest.raises(ValueError, match=r"unfused LoRA adapter\(s\) \['default'\]") as e:
            dq.quantize(pipe, config, calib_prompts=PROMPTS, progress=False)
        assert "fuse_lora()" in str(e.value) and "load_lora_weights" in str(e.value)
    assert calls == [] and _n_quantized(pipe.unet) == 0  # nothing ran, nothing replaced


def test_lora_fused_then_quantized_or_quantized_then_loaded_both_work():
    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    ref = pipe(PROMPTS[0], generator=_gen(), **CALL).images  # float + LoRA
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    fused = dq.quantize(pipe, "w8a16", progress=False)
    out = fused(PROMPTS[0], generator=_gen(), **CALL).images
    psnr = 10 * torch.log10(1 / ((out - ref) ** 2).mean())
    assert psnr > 30 and _n_quantized(fused.unet) > 50
