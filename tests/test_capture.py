"""Tests of dq.capture: hooks, per-timestep statistics, reservoir, errors, round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dq.capture import (
    CalibrationRecord,
    Capture,
    CaptureSettings,
    capture,
    conv2d_patches,
    reservoir_slots,
)
from dq.testing import tiny_sd_pipeline

SAMPLE_BYTES = 2**24  # a reservoir budget that never binds on the tiny UNet
PROMPTS = ["a red circle", "two blue squares", "a cat under a tree"]


def _hooked_layers(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _hook_state(module: nn.Module) -> dict[str, list]:
    """Keys of every hook dict of every submodule (what Capture must leave as it found)."""
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return {
        f"{n}:{attr}": list(getattr(m, attr).keys())
        for n, m in module.named_modules()
        for attr in names
    }


def _run(pipe, prompts=("a red circle",), steps=2, guidance=7.5, **kwargs):
    kwargs.setdefault("max_bytes", 0)  # no reservoir unless a test asks for one (speed)
    return capture(
        pipe,
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        progress=False,
        **kwargs,
    )


def _failing_callback(pipe, step, timestep, callback_kwargs):
    raise RuntimeError("callback failed")


# --- hooks --------------------------------------------------------------------------------------


def test_hooks_removed_after_normal_run(tiny_sd):
    before = _hook_state(tiny_sd.unet)
    with Capture(tiny_sd.unet) as cap:
        assert len(cap.handles) == len(_hooked_layers(tiny_sd.unet)) + 2  # + UNet pre/post
        assert all(name.startswith("dq.capture:") for name in cap.handles)
        assert _hook_state(tiny_sd.unet) != before
        tiny_sd("a red circle", num_inference_steps=2, output_type="latent")
    assert _hook_state(tiny_sd.unet) == before
    assert cap.record.num_calls == 2


def test_hooks_removed_after_exception_in_pipeline_call(tiny_sd):
    before = _hook_state(tiny_sd.unet)

    with pytest.raises(RuntimeError, match="callback failed"):
        with Capture(tiny_sd.unet):
            tiny_sd(
                "a red circle",
                num_inference_steps=2,
                output_type="latent",
                callback_on_step_end=_failing_callback,
            )
    assert _hook_state(tiny_sd.unet) == before


def test_capture_function_leaves_pipeline_as_found(tiny_sd):
    hooks, bar = _hook_state(tiny_sd.unet), dict(tiny_sd._progress_bar_config)
    with pytest.raises(RuntimeError, match="callback failed"):
        _run(tiny_sd, callback_on_step_end=_failing_callback)
    _run(tiny_sd)
    assert _hook_state(tiny_sd.unet) == hooks
    assert tiny_sd._progress_bar_config == bar


def test_capture_cannot_be_entered_twice(tiny_sd):
    cap = Capture(tiny_sd.unet)
    with cap, pytest.raises(RuntimeError, match="already active"):
        cap.__enter__()
    assert not cap.handles


# --- statistics ---------------------------------------------------------------------------------


def test_stats_for_every_linear_and_conv_in_the_unet(tiny_sd):
    record = _run(tiny_sd, PROMPTS[:2])
    assert set(record.layers) == set(_hooked_layers(tiny_sd.unet))
    for name, stats in record.layers.items():
        assert (stats.count > 0).all(), name
        assert torch.isfinite(stats.min).all() and (stats.min <= stats.max).all(), name
        assert torch.allclose(stats.absmax, torch.maximum(-stats.min, stats.max)), name
        assert (stats.mean_absmax <= stats.absmax + 1e-6).all(), name
        assert (stats.ema_min >= stats.min - 1e-6).all() and (
            stats.ema_max <= stats.max + 1e-6
        ).all()
        assert torch.allclose(stats.channel_absmax.amax(dim=1), stats.absmax), name
    conv = record.layers["conv_in"]
    assert conv.kind == "conv2d" and conv.channel_absmax.shape == (2, 4)
    lin = record.layers["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert lin.kind == "linear" and lin.channel_absmax.shape == (2, 32)


def test_stats_match_a_direct_computation(tiny_sd):
    """Hook statistics equal min/max computed on the layer's input captured independently."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    layer = tiny_sd.unet.get_submodule(name)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        record = _run(tiny_sd, PROMPTS[:1], steps=2)
    finally:
        handle.remove()
    assert len(seen) == 2
    stats = record.layers[name]
    for t, x in enumerate(seen):
        assert stats.min[t] == x.min() and stats.max[t] == x.max()
        assert torch.equal(stats.channel_absmax[t], x.abs().flatten(0, -2).amax(0))
        assert stats.count[t] == x.shape[0] == 2  # CFG: uncond + cond


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg_on", "cfg_off"])
def test_timesteps_match_scheduler(scheduler, guidance):
    pipe = tiny_sd_pipeline(seed=0, scheduler=scheduler)
    record = _run(pipe, PROMPTS[:2], steps=3, guidance=guidance)
    expected = [float(t) for t in pipe.scheduler.timesteps]
    assert record.timesteps == expected and len(expected) == 3
    assert record.num_calls == 2 * 3  # two prompts (batch_size 1), three steps
    for stats in record.layers.values():
        assert stats.calls.tolist() == [2, 2, 2]
    assert record.timestep_index(expected[1]) == 1
    assert record.absmax("conv_in", timestep=expected[2]) == float(
        record.layers["conv_in"].absmax[2]
    )


def test_cfg_doubles_counts(tiny_sd):
    on = _run(tiny_sd, PROMPTS, steps=2, guidance=7.5, batch_size=2)
    off = _run(tiny_sd, PROMPTS, steps=2, guidance=1.0, batch_size=2)
    for name in on.layers:
        assert on.layers[name].count.tolist() == [6, 6], name  # 3 prompts x (cond + uncond)
        assert off.layers[name].count.tolist() == [3, 3], name
        assert torch.equal(on.layers[name].calls, off.layers[name].calls)  # 2 batches per step
    assert len(on.text_embeddings) == 6 and len(off.text_embeddings) == 3


def test_ema_follows_mixdq_update():
    """EMA over calls: ema = m * ema + (1 - m) * current, first call initialises."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, sample, timestep):
            return self.lin(sample)

    net = Denoiser()
    xs = [torch.randn(2, 4) * s for s in (1.0, 3.0, 0.5)]
    with Capture(net, CaptureSettings(ema_momentum=0.9, max_bytes=0)) as cap:
        for x in xs:
            net(x, timestep=10)
    stats = cap.record.layers["lin"]
    ema_max = xs[0].max()
    for x in xs[1:]:
        ema_max = 0.9 * ema_max + 0.1 * x.max()
    assert torch.allclose(stats.ema_max[0], ema_max) and torch.allclose(
        stats.global_ema_max, ema_max
    )
    assert torch.allclose(stats.mean_absmax[0], torch.stack([x.abs().max() for x in xs]).mean())
    assert cap.record.minmax("lin", reduce="ema")[1] == pytest.approx(float(ema_max))


# --- reservoir ----------------------------------------------------------------------------------


def test_reservoir_respects_byte_cap(tiny_sd):
    max_bytes = 2**20
    record = _run(tiny_sd, PROMPTS[:2], steps=2, max_bytes=max_bytes, max_samples_per_layer=None)
    sizes = {name: s.samples.shape[0] for name, s in record.layers.items()}
    total = sum(s.samples.numel() * s.samples.element_size() for s in record.layers.values())
    assert 0 < total <= max_bytes
    rows = max(sizes.values())  # one row capacity for every layer
    assert all(sizes[n] == min(rows, s.seen) for n, s in record.layers.items())
    assert any(s.seen > rows for s in record.layers.values())  # the cap binds somewhere
    row_bytes = sum(s.samples.shape[1] * 4 for s in record.layers.values())
    assert rows == max_bytes // row_bytes  # float32 rows, budget split evenly in rows


def test_reservoir_row_cap_and_zero_budget(tiny_sd):
    capped = _run(tiny_sd, max_samples_per_layer=7, max_bytes=SAMPLE_BYTES)
    assert all(s.samples.shape[0] == min(7, s.seen) for s in capped.layers.values())
    assert capped.layers["conv_in"].samples.shape[0] == 7
    none = _run(tiny_sd, max_bytes=0)
    assert all(s.samples.shape[0] == 0 for s in none.layers.values())
    assert all(s.count.sum() > 0 for s in none.layers.values())  # statistics still recorded


def test_reservoir_rows_are_real_inputs(tiny_sd):
    """to_k/to_v of cross-attention read the text embeddings: sampled rows are among them."""
    record = _run(tiny_sd, PROMPTS[:2], steps=2, max_samples_per_layer=64, max_bytes=SAMPLE_BYTES)
    tokens = torch.cat(record.text_embeddings)  # [items * 77, 32]
    rows = record.samples("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert rows.shape == (64, 32)
    found = (rows[:, None, :] == tokens[None, :, :]).all(dim=-1).any(dim=1)  # [64]
    assert found.all()


def test_conv_reservoir_rows_are_patches(tiny_sd):
    """conv rows times the flattened weight give the conv's output values."""
    name = "down_blocks.0.resnets.0.conv1"
    conv = tiny_sd.unet.get_submodule(name)
    outputs: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    try:
        record = _run(tiny_sd, steps=2, max_samples_per_layer=32, max_bytes=SAMPLE_BYTES)
    finally:
        handle.remove()
    rows = record.samples(name)  # [32, C * 3 * 3]
    assert rows.shape == (32, conv.in_channels * 9)
    with torch.no_grad():
        values = rows @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias  # [32, C_out]
    every_output = torch.cat(
        [o.permute(0, 2, 3, 1).reshape(-1, conv.out_channels) for o in outputs]
    )
    err = (values[:, None, :] - every_output[None]).abs().amax(dim=-1)  # [32, locations]
    assert err.min(dim=1).values.max() < 1e-4


def test_reservoir_is_seeded(tiny_sd):
    a = _run(tiny_sd, max_samples_per_layer=8, seed=0, max_bytes=SAMPLE_BYTES)
    b = _run(tiny_sd, max_samples_per_layer=8, seed=0, max_bytes=SAMPLE_BYTES)
    c = _run(tiny_sd, max_samples_per_layer=8, seed=1, max_bytes=SAMPLE_BYTES)
    assert torch.equal(a.samples("conv_out"), b.samples("conv_out"))
    assert not torch.equal(a.samples("conv_out"), c.samples("conv_out"))


def test_reservoir_slots_sample_uniformly():
    """Every one of 40 items ends up kept with probability capacity / 40, whatever the batching."""
    gen = torch.Generator().manual_seed(0)
    capacity, trials, kept = 8, 1000, torch.zeros(40)
    for _ in range(trials):
        slots_to_item = torch.full((capacity,), -1)
        seen = 0
        for n in (3, 10, 1, 26):  # uneven batches
            slots, items = reservoir_slots(seen, n, capacity, gen)
            assert slots.unique().numel() == slots.numel()
            slots_to_item[slots] = items + seen
            seen += n
        kept[slots_to_item] += 1
    freq = kept / trials
    # binomial std sqrt(0.2 * 0.8 / 1000) = 0.013: 0.05 is ~4 std
    assert torch.allclose(freq, torch.full_like(freq, capacity / 40), atol=0.05), freq


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.Conv2d(3, 5, (3, 1), dilation=(2, 1), padding=(2, 0)),
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 5, 1),
    ],
    ids=["3x3", "stride2", "dilated", "reflect", "1x1"],
)
def test_conv2d_patches_reproduce_the_conv(conv):
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        y = conv(x)  # [2, 5, H, W]
    flat = y.permute(0, 2, 3, 1).reshape(-1, 5)  # rows in (b, oy, ox) order
    rows = torch.tensor([0, 3, flat.shape[0] // 2, flat.shape[0] - 1])
    patches = conv2d_patches(x, conv, rows)
    assert patches.shape == (4, 3 * conv.kernel_size[0] * conv.kernel_size[1])
    got = patches @ conv.weight.reshape(5, -1).T + conv.bias
    torch.testing.assert_close(got, flat[rows].detach(), rtol=1e-5, atol=1e-5)


# --- UNet calls, text embeddings -----------------------------------------------------------------


def test_unet_calls_replay_exactly(tiny_sd):
    record = _run(tiny_sd, PROMPTS[:2], steps=2, max_unet_calls=3)
    assert len(record.unet_calls) == 3
    assert [c.call_index for c in record.unet_calls] == sorted(
        c.call_index for c in record.unet_calls
    )
    call = record.unet_calls[0]
    with torch.no_grad():
        out = tiny_sd.unet(
            call.sample, call.timestep, call.encoder_hidden_states, **call.unet_kwargs()
        ).sample
    assert torch.equal(out, call.output)


def test_bos_embedding_is_prompt_independent(tiny_sd):
    record = _run(tiny_sd, PROMPTS, steps=1, guidance=1.0)
    bos = record.bos_embeddings()  # [3, 32]
    assert bos.shape == (3, 32) and (bos == bos[0]).all()
    second = torch.stack([e[1] for e in record.text_embeddings])
    assert not (second == second[0]).all()


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_activation_raises_clear_error(tiny_sd, bad):
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = tiny_sd.unet.get_submodule(name)
    before = _hook_state(tiny_sd.unet)
    inject = layer.register_forward_pre_hook(lambda m, args: (args[0] * bad,))
    try:
        with pytest.raises(ValueError) as err:
            _run(tiny_sd, steps=2)
    finally:
        inject.remove()
    message = str(err.value)
    first_t = float(tiny_sd.scheduler.timesteps[0])
    assert name in message and f"timestep {first_t:g}" in message and "float32" in message
    assert _hook_state(tiny_sd.unet) == before


def test_non_finite_check_can_be_turned_off(tiny_sd):
    layer = tiny_sd.unet.get_submodule("conv_out")
    inject = layer.register_forward_pre_hook(lambda m, args: (args[0] * float("nan"),))
    try:
        with Capture(tiny_sd.unet, CaptureSettings(check_finite=False, max_bytes=0)) as cap:
            tiny_sd("a", num_inference_steps=1, output_type="latent")
    finally:
        inject.remove()
    assert torch.isnan(cap.record.layers["conv_out"].max).all()


def test_pipeline_without_unet_is_rejected():
    class NotAPipeline:
        transformer = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"NotAPipeline without a `\.unet`.*UNet"):
        capture(NotAPipeline(), ["a red circle"])


@pytest.mark.parametrize("prompts", [[], None], ids=["empty", "none"])
def test_empty_prompts_are_rejected(tiny_sd, prompts):
    with pytest.raises(ValueError, match="at least one calibration prompt"):
        capture(tiny_sd, prompts)


def test_other_bad_arguments(tiny_sd):
    with pytest.raises(ValueError, match="must be a str"):
        capture(tiny_sd, ["ok", 3])
    with pytest.raises(ValueError, match="set by capture"):
        capture(tiny_sd, ["ok"], generator=torch.Generator())
    with pytest.raises(ValueError, match="layer_types"):
        CaptureSettings(layer_types=(nn.GroupNorm,))
    with pytest.raises(ValueError, match="ema_momentum"):
        CaptureSettings(ema_momentum=1.0)
    with pytest.raises(ValueError, match="no statistics for layer 'conv_inn'"):
        _run(tiny_sd, steps=1, max_bytes=0).absmax("conv_inn")


def test_module_without_timestep_is_rejected():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="without a `timestep`"):
        with Capture(net):
            net(torch.randn(1, 2))
    assert not net[0]._forward_pre_hooks


# --- SDXL, round trip, progress -------------------------------------------------------------------


def test_sdxl_capture(tiny_sdxl):
    record = _run(tiny_sdxl, PROMPTS[:2], steps=2, guidance=5.0, max_unet_calls=2)
    assert set(record.layers) == set(_hooked_layers(tiny_sdxl.unet))
    assert "add_embedding.linear_1" in record.layers
    assert record.timesteps == [float(t) for t in tiny_sdxl.scheduler.timesteps]
    assert all((s.count == 4).all() for s in record.layers.values())  # 2 prompts x CFG
    call = record.unet_calls[0]
    assert {"added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"} <= set(call.extra)
    with torch.no_grad():
        out = tiny_sdxl.unet(
            call.sample, call.timestep, call.encoder_hidden_states, **call.unet_kwargs()
        ).sample
    assert torch.equal(out, call.output)
    assert record.text_embeddings[0].shape == (77, 64)


def test_context_manager_and_function_agree(tiny_sd):
    settings = CaptureSettings(max_samples_per_layer=16, seed=0, max_bytes=SAMPLE_BYTES)
    with Capture(tiny_sd.unet, settings) as cap:
        tiny_sd(
            ["a red circle"],
            num_inference_steps=2,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    via_function = _run(tiny_sd, max_samples_per_layer=16, seed=0, max_bytes=SAMPLE_BYTES)
    assert cap.record is cap.record  # built once after exit
    for name, stats in via_function.layers.items():
        other = cap.record.layers[name]
        assert torch.equal(stats.max, other.max) and torch.equal(stats.samples, other.samples)


def test_state_dict_round_trip_through_safetensors(tiny_sd, tmp_path):
    record = _run(
        tiny_sd,
        PROMPTS[:2],
        steps=2,
        max_samples_per_layer=16,
        max_unet_calls=2,
        max_bytes=SAMPLE_BYTES,
    )
    path = tmp_path / "calib.safetensors"
    save_file(record.to_state_dict(), str(path))
    loaded = CalibrationRecord.from_state_dict(load_file(str(path)))
    assert loaded.timesteps == record.timesteps and loaded.num_calls == record.num_calls
    assert loaded.layers.keys() == record.layers.keys()
    for name, stats in record.layers.items():
        other = loaded.layers[name]
        assert other.kind == stats.kind and other.seen == stats.seen
        for key in (
            "count",
            "min",
            "channel_absmax",
            "global_ema_max",
            "samples",
            "sample_timesteps",
        ):
            assert torch.equal(getattr(other, key), getattr(stats, key)), (name, key)
    assert len(loaded.unet_calls) == 2
    assert loaded.unet_calls[1].extra.keys() == record.unet_calls[1].extra.keys()
    assert torch.equal(loaded.unet_calls[1].output, record.unet_calls[1].output)
    pairs = zip(loaded.text_embeddings, record.text_embeddings, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert loaded.minmax("conv_in") == record.minmax("conv_in")


def test_state_dict_version_is_checked(tiny_sd):
    sd = _run(tiny_sd, steps=1, max_bytes=0).to_state_dict()
    sd["version"] = torch.tensor(99)
    with pytest.raises(ValueError, match="version 99"):
        CalibrationRecord.from_state_dict(sd)


def test_progress_bar_over_prompt_batches(tiny_sd, capsys):
    capture(tiny_sd, PROMPTS, num_inference_steps=1, batch_size=2, max_bytes=0, progress=True)
    err = capsys.readouterr().err
    n = len(PROMPTS)
    assert "dq capture" in err and f"{n}/{n}" in err  # one bar over prompts
