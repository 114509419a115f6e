"""QuantConfig / LayerSpec: validation, presets, JSON round-trip, plan lookup."""

import json

import pytest

from dq.config import CONFIG_VERSION, PRESETS, LayerSpec, QuantConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = QuantConfig.from_preset(name)
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["version"] == CONFIG_VERSION


def test_mixed_plan_round_trips_and_lookup_order():
    plan = {
        "down_blocks.0.attentions.0.proj_in": LayerSpec("int4", "group32"),
        "mid_block.resnets.0.conv1": LayerSpec("fp8_e4m3"),
        "up_blocks.1.resnets.0.conv2": None,
        "conv_in": LayerSpec("int8"),  # an explicit plan entry beats the skip list
    }
    cfg = QuantConfig(default=LayerSpec("int8", act="uint8"), layers=plan)
    again = QuantConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.spec_for("mid_block.resnets.0.conv1").weight == "fp8_e4m3"
    assert again.spec_for("up_blocks.1.resnets.0.conv2") is None
    assert again.spec_for("conv_in").weight == "int8"
    assert again.spec_for("conv_out") is None  # default skip
    assert again.spec_for("anything.else").act == "uint8"
    assert cfg.needs_activation_calibration


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"weight": "int9"}, "unknown weight format"),
        ({"act": "fp2"}, "unknown activation format"),
        ({"weight_granularity": "row"}, "group<N>"),
        ({"act_granularity": "channel"}, "per tensor"),
        ({"weight_method": "magic"}, "weight_method"),
        ({"weight": "fp8_e4m3", "pair_limit": 128}, "signed INT"),
        ({"weight": "uint8", "pair_limit": 128}, "signed INT"),
        ({"weight_granularity": "group32", "pair_limit": 128}, "'channel'"),
        ({"pair_limit": 100}, "integer >= 127"),
        ({"pair_limit": 128.0}, "integer >= 127"),
    ],
    ids=["bad-weight", "bad-act", "bad-granularity", "bad-act-granularity", "bad-method",
         "pair-fp", "pair-unsigned", "pair-group", "pair-small", "pair-float"],
)
def test_layer_spec_rejects_bad_values_with_fix(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LayerSpec(**kwargs)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="w8a8"):
        QuantConfig.from_preset("w3a3")


def test_newer_version_is_refused():
    d = QuantConfig.from_preset("w8a8").to_dict()
    d["version"] = CONFIG_VERSION + 1
    with pytest.raises(ValueError, match="upgrade dq"):
        QuantConfig.from_dict(d)


def test_unknown_keys_are_refused():
    d = QuantConfig.from_preset("w8a8").to_dict()
    d["default"]["extra"] = 1
    with pytest.raises(ValueError, match="unknown LayerSpec keys"):
        QuantConfig.from_dict(d)


def test_group_size_property():
    assert LayerSpec("int4", "group64").group_size == 64
    assert LayerSpec("int4", "channel").group_size == 0


def test_rounding_is_not_a_layer_setting():
    with pytest.raises(TypeError):
        LayerSpec(rounding="learned")  # a procedure setting of dq.quantize now
    # version-1 plans always wrote "nearest": read and dropped; anything else is refused
    assert LayerSpec.from_dict({"weight": "int8", "rounding": "nearest"}) == LayerSpec("int8")
    with pytest.raises(ValueError, match="rounding"):
        LayerSpec.from_dict({"weight": "int8", "rounding": "learned"})


def test_plan_carries_format_definitions_and_refuses_conflicts():
    from dq import formats

    fmt = formats.get("fp4_e2m1").with_bias(2, name="fp4_e2m1_b2_cfgtest")
    cfg = QuantConfig(default=LayerSpec(fmt, "channel"))
    assert cfg.default.weight == "fp4_e2m1_b2_cfgtest"
    d = json.loads(cfg.to_json())
    assert d["formats"]["fp4_e2m1_b2_cfgtest"]["bias"] == 2
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    d["formats"]["fp4_e2m1_b2_cfgtest"]["bias"] = 3  # same name, another grid
    with pytest.raises(ValueError, match="already has"):
        QuantConfig.from_dict(d)


def test_version_1_plan_is_upgraded():
    d = QuantConfig.from_preset("w8a8").to_dict()
    d["version"] = 1
    d.pop("formats")
    d["default"]["rounding"] = "nearest"
    cfg = QuantConfig.from_dict(d)
    assert cfg == QuantConfig.from_preset("w8a8") and cfg.version == CONFIG_VERSION
