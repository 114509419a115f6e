"""LoRA on quantized pipelines (peft / diffusers), `.weight` readers, fusing."""

from __future__ import annotations

import warnings

import pytest
import torch

import dq
from dq.metrics import psnr_vs_reference
from dq.modules import QLinear
from dq.testing import tiny_sd_pipeline

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_STD = 0.2
CALL = {"num_inference_steps": 2, "output_type": "pt", "guidance_scale": 1.0}


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS[0], generator=g, **CALL).images


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A diffusers-format LoRA for the tiny UNet with random (non-zero) weights."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_STD)
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    return path


@pytest.fixture(scope="module")
def float_images(lora_dir):
    pipe = tiny_sd_pipeline(seed=0)
    base = _images(pipe)
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    return base, _images(pipe)


def _quantized(config="w8a8"):
    pipe = tiny_sd_pipeline(seed=0)
    kw = {"calib_prompts": PROMPTS, "calibration": {"num_inference_steps": 2}} if "a8" in config else {}
    return dq.quantize(pipe, config, progress=False, **kw)


@pytest.mark.parametrize("config", ["w8a8", "w4a16"])
def test_lora_on_a_quantized_pipeline_changes_images_as_on_the_float_one(lora_dir, float_images, config):
    fp, fp_lora = float_images
    pipe = _quantized(config)
    q = _images(pipe)
    targets = [n for n, m in pipe.unet.named_modules()
               if isinstance(m, QLinear) and n.endswith(tuple("." + t for t in TARGETS))]
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    wrapped = [m for m in pipe.unet.modules() if type(m).__name__ == "LoraQLinear"]
    assert targets and len(wrapped) == len(targets)
    assert all(isinstance(m.base_layer, QLinear) for m in wrapped)
    q_lora = _images(pipe)
    lora_effect = psnr_vs_reference(fp_lora, fp)
    assert lora_effect < 36  # the LoRA changes the float images visibly (measured 33 dB)
    base_psnr = psnr_vs_reference(q, fp)  # measured: w8a8 54 dB, w4a16 41.6 dB
    lora_psnr = psnr_vs_reference(q_lora, fp_lora)  # measured: w8a8 51 dB, w4a16 40.4 dB
    assert lora_psnr > base_psnr - 4, (lora_psnr, base_psnr)
    # and it takes effect on the quantized pipeline as on the float one
    assert abs(psnr_vs_reference(q_lora, q) - lora_effect) < 3

    # scales, enabling, disabling, unloading
    pipe.disable_lora()
    torch.testing.assert_close(_images(pipe), q)
    pipe.enable_lora()
    torch.testing.assert_close(_images(pipe), q_lora)
    pipe.set_adapters(["a"], [0.0])
    torch.testing.assert_close(_images(pipe), q, atol=1e-5, rtol=0)
    pipe.set_adapters(["a"], [1.0])
    pipe.unload_lora_weights()
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())
    assert any(isinstance(m, QLinear) for m in pipe.unet.modules())
    torch.testing.assert_close(_images(pipe), q)


def test_fuse_lora_requantizes_and_unfuse_restores_the_codes(lora_dir):
    pipe = _quantized("w8a8")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    unfused = _images(pipe)
    pipe.fuse_lora()
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.merged
    base = layer.base_layer
    # the fused layer holds codes of (dequantized + delta) in its own spec, range kept
    ref = dq.quant.quantize_weight(_expected(layer), base.spec)
    torch.testing.assert_close(base.qweight().values, ref.values)
    assert torch.equal(base.input_scale, layer._dq_saved["input_scale"])  # range kept
    fused = _images(pipe)
    assert psnr_vs_reference(fused, unfused) > 25  # rounding of the merged weight only
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _expected(layer):
    saved = layer._dq_saved
    probe = QLinear(layer.base_layer.in_features, layer.base_layer.out_features,
                    layer.base_layer.bias is not None, layer.base_layer.spec)
    probe.load_state_dict(saved)
    return probe.dequantize() + layer.get_delta_weight("a")


def test_add_adapter_training_step_updates_only_the_lora_weights():
    pipe = _quantized("w8a8")
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in names)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.SGD(trainable, lr=1.0)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim)
    unet(x, torch.tensor([10]), ctx).sample.square().mean().backward()
    assert all(p.grad is not None for p in trainable)
    # B starts at zero, so only B has a gradient on the first step
    assert all(p.grad.abs().sum() > 0 for n, p in zip(names, trainable, strict=True) if "lora_B" in n)
    opt.step()
    after = unet.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all("lora_" in k for k in changed)


def test_lora_on_a_quantized_conv_layer():
    pipe = _quantized("w4a16")
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=2, init_lora_weights="gaussian", target_modules=["conv1"]))
    m = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert type(m).__name__ == "LoraQConv2d"
    x = torch.randn(1, m.in_features, 8, 8)
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
        delta = m.get_delta_weight("default")
        ref = torch.nn.functional.conv2d(x, m.base_layer.dequantize() + delta, m.base_layer.bias,
                                         padding=1)
        torch.testing.assert_close(m(x), ref, rtol=1e-3, atol=1e-3)


def test_dora_is_refused_with_a_clear_error():
    pipe = _quantized("w4a16")
    with pytest.raises(ValueError, match="DoRA"):
        pipe.unet.add_adapter(LoraConfig(r=2, use_dora=True, target_modules=["to_q"]))


# ----------------------------------------------------------------------------- .weight readers


def test_weight_reads_a_float_copy_with_a_one_time_warning():
    from dq import modules

    pipe = _quantized("w4a16")
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    modules._WEIGHT_VIEW_WARNED.discard("QLinear")
    with pytest.warns(UserWarning, match="float copy"):
        w = layer.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w2 = layer.weight  # warned once only
    assert w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w, layer.dequantize())
    w2.zero_()  # a copy: the layer is unchanged
    torch.testing.assert_close(layer.weight, w)


@pytest.mark.parametrize("config", ["w8a8", "w4a16"])
def test_fuse_qkv_projections_on_a_quantized_pipeline(config):
    pipe = _quantized(config)
    ref = _images(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pipe.fuse_qkv_projections()
    assert any(hasattr(m, "to_qkv") for m in pipe.unet.modules())
    fused = _images(pipe)
    # the fused projections hold the dequantized weights in float (activations unrounded)
    assert psnr_vs_reference(fused, ref) > 30
    pipe.unfuse_qkv_projections()
    torch.testing.assert_close(_images(pipe), ref)
