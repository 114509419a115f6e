"""BOS-aware text-embedding quantization: token 0's key/value path stays in full precision."""

import copy

import pytest
import torch
from torch import nn

import dq
from dq.config import LayerSpec, QuantConfig
from dq.modules import QLinear
from dq.quant import sqnr_db

PROMPTS = ["a red circle", "a blue square on a white background", "a small green triangle"]


def _cross_attn_input(outlier: float = 60.0, batch: int = 4, tokens: int = 12, dim: int = 32):
    """Text-embedding-like input whose token 0 is the same large outlier in every row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, dim, generator=g)
    bos = torch.randn(dim, generator=g) * outlier
    x[:, 0] = bos
    return x, bos


def test_bos_row_is_exact_and_other_tokens_gain_precision():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x, bos = _cross_attn_input()
    with torch.no_grad():
        ref = lin(x)
    spec = LayerSpec("int8", act="uint8")
    naive = QLinear.from_float(lin, spec, act_range=(float(x.min()), float(x.max())))
    aware = QLinear.from_float(lin, spec, act_range=(float(x[:, 1:].min()), float(x[:, 1:].max())))
    aware.enable_bos(lin, bos)
    with torch.no_grad():
        y_naive, y_aware = naive(x), aware(x)
    torch.testing.assert_close(y_aware[:, 0], ref[:, 0], rtol=1e-5, atol=1e-4)  # precomputed in FP
    gain = sqnr_db(ref[:, 1:], y_aware[:, 1:]) - sqnr_db(ref[:, 1:], y_naive[:, 1:])
    assert gain > 10, gain  # the outlier no longer stretches the activation scale


def test_rows_whose_token0_is_not_bos_use_the_kernel():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x, bos = _cross_attn_input()
    x[1, 0] = 0.0  # e.g. SDXL's all-zero unconditional embedding
    q = QLinear.from_float(lin, LayerSpec("int8", act="uint8"), act_range=(-4.0, 4.0))
    plain = copy.deepcopy(q)
    q.enable_bos(lin, bos)
    with torch.no_grad():
        y, y_plain = q(x), plain(x)
    torch.testing.assert_close(y[1], y_plain[1])  # that row is computed from codes
    with torch.no_grad():
        torch.testing.assert_close(y[0, 0], lin(bos), rtol=1e-5, atol=1e-4)


def test_bos_layer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x, bos = _cross_attn_input()
    q = QLinear.from_float(lin, LayerSpec("int8", act="uint8"), act_range=(-4.0, 4.0))
    q.enable_bos(lin, bos)
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), q(x))


def _bos_layers(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, QLinear) and "bos_output" in m._buffers}


def test_quantize_makes_cross_attention_kv_bos_aware(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    float_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        ids = pipe.tokenizer(["x"], return_tensors="pt").input_ids
        bos = pipe.text_encoder(ids)[0][0, 0]
    dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 2})
    layers = _bos_layers(pipe.unet)
    assert layers and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    name, q = next(iter(layers.items()))
    with torch.no_grad():
        expected = float_unet.get_submodule(name)(bos)
    torch.testing.assert_close(q.bos_output, expected, rtol=1e-5, atol=1e-4)
    # the calibrated activation range excludes token 0
    assert q.input_scale.item() * 255 < (bos.abs().max().item() + 50)


def test_bos_aware_off_keeps_plain_layers(fresh_tiny_sd):
    pipe = fresh_tiny_sd
    cfg = QuantConfig(default=LayerSpec("int8", act="uint8"), bos_aware=False)
    dq.quantize(pipe, cfg, calib_prompts=PROMPTS, calibration={"num_inference_steps": 2})
    assert not _bos_layers(pipe.unet)


def test_bos_constants_survive_save_and_load(fresh_tiny_sd, tmp_path):
    pipe = fresh_tiny_sd
    dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 2})
    kw = dict(num_inference_steps=2, output_type="pt")
    img = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.save_pretrained(tmp_path / "p")
    again = dq.load(tmp_path / "p")
    assert set(_bos_layers(again.unet)) == set(_bos_layers(pipe.unet))
    img2 = again(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(img, img2)


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["cfg-off", "cfg-on"])
def test_sdxl_with_bos(tiny_sdxl, guidance):
    pipe = copy.deepcopy(tiny_sdxl)
    dq.quantize(pipe, "w8a8", calib_prompts=PROMPTS, calibration={"num_inference_steps": 2, "guidance_scale": guidance})
    img = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=guidance, output_type="pt").images
    assert torch.isfinite(img).all()
