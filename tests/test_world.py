"""The procedural world: determinism, captions that parse back, a disjoint held-out split."""

import random

import numpy as np
import pytest

from dq import world


def test_sample_is_deterministic():
    for i in (0, 7, 12345):
        img_a, cap_a, attrs_a = world.sample(i, "train", seed=3)
        img_b, cap_b, attrs_b = world.sample(i, "train", seed=3)
        assert cap_a == cap_b and attrs_a == attrs_b
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert world.sample(0, seed=0)[1:] != world.sample(0, seed=1)[1:] or not np.array_equal(
        np.asarray(world.sample(0, seed=0)[0]), np.asarray(world.sample(0, seed=1)[0])
    )


def test_images_and_labels_shapes():
    imgs, labels = world.images_and_labels(8, "heldout", seed=0)
    assert imgs.shape == (8, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and imgs.dtype == np.uint8
    assert labels.shape == (8, len(world.ATTRIBUTES))


def test_heldout_split_is_disjoint_and_nonempty():
    train, held = set(world.combinations("train")), set(world.combinations("heldout"))
    assert not train & held
    assert train | held == set(world.all_combinations())
    assert 0.08 < len(held) / len(world.all_combinations()) < 0.18
    assert all(not world.is_held_out(world.sample(i, "train")[2]) for i in range(300))
    assert all(world.is_held_out(a) for _, a in world.eval_prompts(200))


@pytest.mark.parametrize("drop", [0.0, 0.5], ids=["full", "dropped"])
def test_captions_parse_back_to_their_attributes(drop):
    rng = random.Random(0)
    for attrs in world.all_combinations()[::7]:
        text = world.caption(attrs, rng, drop)
        named = world.parse_caption(text)
        assert named["colour"] == attrs.colour and named["shape"] == attrs.shape, text
        assert all(getattr(attrs, k) == v for k, v in named.items()), text
        if drop == 0.0:
            assert len(named) == len(world.ATTRIBUTES), text


def test_eval_prompts_fully_specified_and_varied():
    prompts = world.eval_prompts(300)
    assert len({p for p, _ in prompts}) > 250
    for p, a in prompts:
        assert world.parse_caption(p) == {k: getattr(a, k) for k in world.ATTRIBUTES}


@pytest.mark.parametrize("background", list(world.BACKGROUNDS))
def test_render_draws_background_and_shape_colours(background):
    attrs = world.Attributes("red", "square", "large", "center", background)
    img = np.asarray(world.render(attrs, seed=0)).astype(int)
    assert np.abs(img[0, 0] - world.BACKGROUNDS[background]).max() <= 13  # jitter +-12
    assert np.abs(img[16, 16] - world.COLOURS["red"]).max() <= 13


def test_bad_attribute_raises_with_choices():
    with pytest.raises(ValueError, match="pick one of"):
        world.Attributes("teal", "circle", "small", "left", "black")
